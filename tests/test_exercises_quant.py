"""The checkers of notebooks 01-03: right, wrong (with the specific hint) and not attempted."""
import pytest

from qlora_lab.codebooks import nf4_codebook
from qlora_lab.exercises import blockwise, double_quant, nf4


@pytest.mark.parametrize("check", [blockwise.check_int8_codes, blockwise.check_nbytes, blockwise.check_packing,
                                   nf4.check_positive_half, nf4.check_code_of,
                                   double_quant.check_bits_per_param, double_quant.check_saving_gb])
def test_none_is_not_attempted(check):
    fb = check(None)
    assert not fb.ok and not fb.attempted


def test_int8_codes():
    assert blockwise.check_int8_codes([6, -32, 127, 19, -81]).ok
    assert "127" in blockwise.check_int8_codes([6, -32, 128, 19, -82]).message
    assert "truncated" in blockwise.check_int8_codes([6, -31, 127, 19, -80]).message
    assert "Code 0" in blockwise.check_int8_codes([7, -32, 127, 19, -81]).message


def test_nbytes():
    assert blockwise.check_nbytes(9_437_184).ok
    assert "codes only" in blockwise.check_nbytes(4096 * 4096 // 2).message
    assert "4 bytes" in blockwise.check_nbytes(4096 * 4096 // 2 + 4096 * 4096 // 64).message
    assert not blockwise.check_nbytes(123).ok


def test_packing():
    assert blockwise.check_packing([0x3C, 0x79]).ok
    assert "swapped" in blockwise.check_packing([0xC3, 0x97]).message
    assert "x16" in blockwise.check_packing([42, 79]).message
    assert "2 bytes" in blockwise.check_packing([0x3C]).message


def test_positive_half():
    truth = nf4_codebook()[8:]
    assert nf4.check_positive_half(truth).ok
    assert "reversed" in nf4.check_positive_half(truth.flip(0)).message
    assert "normalised" in nf4.check_positive_half(truth * 1.848).message
    assert "Value 3" in nf4.check_positive_half(truth + (truth == truth[3]) * 0.01).message


def test_code_of():
    assert nf4.check_code_of(12).ok
    assert "midpoint" in nf4.check_code_of(13).message
    assert not nf4.check_code_of(3).ok


def test_bits_per_param():
    assert double_quant.check_bits_per_param(4 + 8 / 128 + 32 / (128 * 256)).ok
    assert "without double" in double_quant.check_bits_per_param(4.25).message
    assert "128 * 256" in double_quant.check_bits_per_param(4 + 8 / 128 + 32 / 256).message


def test_saving_gb():
    assert double_quant.check_saving_gb(1.539).ok
    assert "gigabits" in double_quant.check_saving_gb(1.539 * 8).message
    assert "GiB" in double_quant.check_saving_gb(1.539e9 / 2**30).message
    assert not double_quant.check_saving_gb(5.0).ok
