"""The codebooks equal bitsandbytes' tables and have the properties their definitions promise."""
import bitsandbytes.functional as bnbF
import pytest
import torch
from scipy.stats import norm

import qlora_lab as ql
from qlora_lab.codebooks import NF4_OFFSET, expected_quantile_offset, largest_gap


def test_nf4_equals_bitsandbytes():
    ours, theirs = ql.nf4_codebook(), bnbF.get_4bit_type("nf4", device="cpu")
    assert ours.dtype == torch.float32 and ours.shape == (16,)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-7)


def test_nf4_shape_of_the_code():
    code = ql.nf4_codebook()
    assert torch.all(code.diff() > 0)  # sorted, distinct
    assert code[0] == -1.0 and code[-1] == 1.0 and code[7] == 0.0  # exact zero, at code 0b0111
    assert (code < 0).sum() == 7 and (code > 0).sum() == 8  # the asymmetry that buys the zero


def test_nf4_comes_from_normal_quantiles():
    # independent check with scipy: the largest positive value is the quantile at the offset
    code = ql.nf4_codebook()
    top = norm.ppf(NF4_OFFSET)
    expected = norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double().numpy()) / top
    assert torch.allclose(code[8:].flip(0).double(), torch.from_numpy(expected), atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_normal_float_k_bits(bits):
    code = ql.normal_float_codebook(bits)
    assert code.shape == (2**bits,)
    assert torch.all(code.diff() > 0)
    assert code.min() == -1.0 and code.max() == 1.0 and (code == 0).sum() == 1


def test_offset_spreads_the_code():
    # a larger offset reaches further into the tail, so the inner values shrink
    assert ql.normal_float_codebook(4, 0.99)[8] < ql.normal_float_codebook(4, 0.9)[8]
    assert abs(expected_quantile_offset(4) - NF4_OFFSET) < 1e-7


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(bits="4"), dict(offset=0.5),
                                 dict(offset=1.0), dict(offset="0.9")])
def test_normal_float_rejects_bad_arguments(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        ql.normal_float_codebook(**bad)


def test_fp4_equals_bitsandbytes_in_bit_order():
    ours, theirs = ql.fp4_codebook(), bnbF.get_4bit_type("fp4", device="cpu")
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[8:], -ours[:8])  # the top bit is the sign
    assert ours.abs().max() == 1.0 and ours[3] == 1.0  # 0b0011 = 12/12


def test_int4_symmetric_grid():
    code = ql.int4_codebook()  # bitsandbytes' order: 7/7 .. 0/7, then -0/7 .. -7/7
    assert torch.equal(code[8:], -code[:8].flip(0))
    levels = code.unique()
    assert len(levels) == 15
    assert torch.allclose(levels.diff(), torch.full((14,), 1 / 7))


def test_dynamic_code_equals_bitsandbytes():
    ours = ql.dynamic_codebook()
    assert torch.equal(ours, bnbF.create_dynamic_map(signed=True))
    assert ours.shape == (256,) and len(ours.unique()) == 256 and torch.all(ours.diff() > 0)
    assert ours[-1] == 1.0 and (ours == 0).sum() == 1


def test_largest_gap():
    assert largest_gap(ql.int4_codebook()) == pytest.approx(1 / 7)
    assert largest_gap(ql.nf4_codebook()) == pytest.approx(1 - 0.6961928009986877)  # between -1 and the next
