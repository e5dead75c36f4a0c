"""quantize_4bit against bitsandbytes (bit-exact bytes, equal dequantized values), its storage
accounting, its error bound and its errors on bad input."""
import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlora_lab as ql
from qlora_lab import blockwise8
from qlora_lab.codebooks import codebook, largest_gap
from qlora_lab.quantize import double_quantize

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bnb_quantize(w, quant_type, blocksize, double_quant):
    return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                              compress_statistics=double_quant)


def assert_same_as_bnb(w, quant_type, blocksize, double_quant, dequantize=True):
    """Bytes, constants and dequantized values of ours equal bitsandbytes' on the same input."""
    packed, state = bnb_quantize(w, quant_type, blocksize, double_quant)
    q = ql.quantize_4bit(w, quant_type, blocksize, double_quant)
    where = f"{quant_type} bs={blocksize} dq={double_quant} {w.dtype} {tuple(w.shape)}"
    assert q.packed.dtype == torch.uint8 and q.packed.shape == packed.shape, where
    assert torch.equal(q.packed, packed), f"packed bytes differ: {where}"
    assert torch.equal(q.absmax, state.absmax), f"absmax differs: {where}"
    if double_quant:
        assert q.absmax.dtype == torch.uint8
        assert torch.equal(q.offset, state.offset), where
        assert torch.equal(q.absmax2, state.state2.absmax), where
        assert q.blocksize2 == state.state2.blocksize == 256
    if dequantize:
        ours, theirs = q.dequantize(), bnbF.dequantize_4bit(packed, state)
        assert ours.dtype == theirs.dtype == w.dtype and ours.shape == w.shape
        # bitsandbytes returns 1-D inputs as (1, n): compare values, not that quirk
        torch.testing.assert_close(ours.float().reshape(-1), theirs.float().reshape(-1),
                                   rtol=1e-6, atol=0)
    return q


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((7,), 64), ((3, 32), 32), ((129, 66), 64),
                                             ((2, 3, 1000), 128), ((300, 302), 4096)])
def test_matches_bitsandbytes_small(shape, blocksize, quant_type, double_quant, dtype):
    torch.manual_seed(hash((shape, blocksize)) % 1000)
    w = (torch.randn(shape) * 0.02).to(dtype)
    assert_same_as_bnb(w, quant_type, blocksize, double_quant)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matches_bitsandbytes_4m_normal(quant_type, dtype):
    """4,194,304 normal values, DQ on and off."""
    torch.manual_seed(1)
    w = torch.randn(2048, 2048).to(dtype)
    for double_quant in (False, True):
        assert_same_as_bnb(w, quant_type, 64, double_quant)


def test_values_on_the_thresholds():
    """Values at, and one float step either side of, every midpoint between codes: where a naive
    rounding rule would differ from bitsandbytes'."""
    for quant_type in ("nf4", "fp4"):
        code = codebook(quant_type).sort().values
        mids = (code[:-1] + code[1:]) / 2
        near = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
        block = torch.cat([torch.ones(1), near, torch.zeros(64 - 1 - near.numel())])  # absmax 1
        w = torch.cat([block, block * 0.37, -block * 3.1])  # three blocks, different scales
        for dtype in DTYPES:
            assert_same_as_bnb(w.to(dtype), quant_type, 64, False)
            assert_same_as_bnb(w[:150].to(dtype), quant_type, 64, False)  # partial last block


def test_double_quant_edge_cases():
    """All-equal constants (their mean removed leaves zeros) and zero blocks."""
    for w in (torch.ones(2048), torch.zeros(1000), torch.cat([torch.zeros(640), torch.randn(640)])):
        for quant_type in ("nf4", "fp4"):
            assert_same_as_bnb(w, quant_type, 64, True)


def test_blockwise8_matches_bitsandbytes():
    torch.manual_seed(2)
    x = torch.cat([torch.randn(5000) * 0.01, torch.rand(300)])
    codes, absmax = blockwise8.quantize(x, 256)
    theirs, state = bnbF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, theirs) and torch.equal(absmax, state.absmax)
    assert torch.equal(blockwise8.dequantize(codes, absmax, 256), bnbF.dequantize_blockwise(theirs, state))


@pytest.mark.slow
def test_every_linear_weight_of_the_model():
    """Every nn.Linear weight of the bundled model (7 per layer x 30 layers, and lm_head, which
    shares the embedding matrix), nf4 and fp4, in all three dtypes, DQ off and on.

    One bitsandbytes call per case: quantize_4bit without DQ gives the bytes and fp32 constants;
    its DQ bytes come from the same two lines its compress_statistics=True path runs
    (quantize_blockwise of absmax - absmax.mean(), blocksize 256). The 4M-value test calls that
    path end to end."""
    model, _ = ql.load_base_model()
    weights = {name: m.weight.detach() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert len(weights) == 7 * model.config.num_hidden_layers + 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many mid-sized ops: one thread avoids oversubscribing under xdist
    try:
        checked = _check_weights(weights)
    finally:
        torch.set_num_threads(threads)
    assert checked == len(weights) * 6


def _check_weights(weights):
    checked = 0
    for i, (name, weight) in enumerate(weights.items()):
        for quant_type in ("nf4", "fp4"):
            for dtype in DTYPES:
                where = f"{name} {quant_type} {dtype}"
                w = weight.to(dtype)
                packed, state = bnb_quantize(w, quant_type, 64, False)
                q = ql.quantize_4bit(w, quant_type, 64, False)
                assert torch.equal(q.packed, packed), where
                assert torch.equal(q.absmax, state.absmax), where
                offset = state.absmax.mean()
                qabsmax, state2 = bnbF.quantize_blockwise(state.absmax - offset, blocksize=256)
                dq = double_quantize(q)
                assert torch.equal(dq.absmax, qabsmax) and torch.equal(dq.offset, offset), where
                assert torch.equal(dq.absmax2, state2.absmax), where
                if i % 7 == 0:  # dequantized values on one weight in 7 (the C kernel vs our gather)
                    ours, theirs = q.dequantize(), bnbF.dequantize_4bit(packed, state)
                    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
                checked += 1
    return checked


def test_packing_layout():
    w = torch.tensor([1.0, -1.0, 0.0, 1.0, 0.0])  # odd length: the last byte's low nibble is padding
    q = ql.quantize_4bit(w, "nf4", 64)
    assert q.packed.shape == (3, 1) and q.packed.dtype == torch.uint8
    # nf4: -1 -> 0b0000, 0 -> 0b0111, 1 -> 0b1111; element 2i high nibble, 2i+1 low nibble
    assert q.packed.view(-1).tolist() == [0xF0, 0x7F, 0x77]
    assert torch.equal(q.dequantize(), w)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_bits_per_param_from_stored_bytes(quant_type):
    w = torch.randn(1024, 1024)
    q = ql.quantize_4bit(w, quant_type, 64)
    assert q.nbytes == q.packed.numel() + 4 * q.absmax.numel()
    assert q.bits_per_param == 4.5
    dq = ql.quantize_4bit(w, quant_type, 64, double_quant=True)
    assert dq.nbytes == dq.packed.numel() + dq.absmax.numel() + 4 * dq.absmax2.numel() + 4
    assert dq.bits_per_param == pytest.approx(8 / 64 + 32 / (64 * 256) + 4, abs=1e-4)
    assert round(dq.bits_per_param, 3) == 4.127
    assert ql.quantize_4bit(w, quant_type, 128).bits_per_param == 4.25


def test_int4_properties():
    w = torch.linspace(-1, 1, 1401)
    q = ql.quantize_4bit(w, "int4", 64)
    nibbles = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], 1).view(-1)[: w.numel()]
    assert 8 not in nibbles.tolist()  # the second zero is never used
    assert ql.quantize_4bit(torch.zeros(10), "int4").packed.view(-1).tolist() == [0x77] * 5
    # symmetric: negating the input negates the output (away from exact ties, which go down)
    r = torch.randn(4096)
    assert torch.equal(ql.quantize_4bit(-r, "int4").dequantize(), -ql.quantize_4bit(r, "int4").dequantize())


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=600),
    quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
    log_blocksize=st.integers(1, 9),
    dtype=st.sampled_from(DTYPES),
)
def test_error_bound(values, quant_type, log_blocksize, dtype):
    """Every dequantized value is within half the largest code gap times its block's absmax."""
    w = torch.tensor(values).to(dtype)
    blocksize = 2**log_blocksize
    q = ql.quantize_4bit(w, quant_type, blocksize)
    error = (q.dequantize(torch.float32) - w.float()).abs()
    n = w.numel()
    block_absmax = q.absmax.repeat_interleave(blocksize)[:n]
    bound = largest_gap(codebook(quant_type)) / 2 * block_absmax
    assert torch.all(error <= bound * (1 + 1e-5) + 1e-30)
    # re-quantizing a dequantized tensor gives it back (its values sit on the code; the bytes can
    # differ only between FP4's two zero codes)
    again = ql.quantize_4bit(q.dequantize(torch.float32), quant_type, blocksize)
    assert torch.equal(again.dequantize(torch.float32), q.dequantize(torch.float32))


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=3000))
def test_double_quant_error_bound(values):
    """DQ moves each constant by at most half a dynamic-code gap times its 256-block's absmax."""
    w = torch.tensor(values)
    q = ql.quantize_4bit(w, "nf4", 64)
    dq = double_quantize(q)
    code = ql.dynamic_codebook()
    err = (dq.absmax_float() - q.absmax).abs()
    scale = dq.absmax2.repeat_interleave(256)[: q.absmax.numel()]
    assert torch.all(err <= largest_gap(code) / 2 * scale * (1 + 1e-5) + 1e-6 * q.absmax.abs().max())


def test_to_device_returns_a_copy():
    q = ql.quantize_4bit(torch.randn(100), "nf4", 64, True)
    moved = q.to("cpu")
    assert moved is not q and moved.packed.data_ptr() != q.packed.data_ptr()
    assert torch.equal(moved.dequantize(), q.dequantize())
    meta = q.to("meta")
    assert meta.packed.device.type == "meta" and meta.absmax2.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_like_on_cpu():
    w = torch.randn(333, 257)
    for quant_type in ("nf4", "fp4", "int4"):
        cpu = ql.quantize_4bit(w, quant_type, 64, True)
        gpu = ql.quantize_4bit(w.cuda(), quant_type, 64, True)
        assert gpu.packed.is_cuda
        torch.testing.assert_close(gpu.dequantize().cpu(), cpu.dequantize(), rtol=1e-6, atol=0)
        # ties may differ in the last bit of the scaling on another device: allow a few codes
        assert (gpu.packed.cpu() != cpu.packed).sum() <= 2


def test_dequantize_dtype_argument():
    q = ql.quantize_4bit(torch.randn(64, dtype=torch.bfloat16), "nf4")
    assert q.dequantize().dtype == torch.bfloat16
    assert q.dequantize(torch.float32).dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        q.dequantize(torch.int8)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(w=torch.tensor([1.0, float("nan")])), ValueError, ["w", "NaN"]),
    (dict(w=torch.tensor([float("inf"), 1.0])), ValueError, ["w", "Inf"]),
    (dict(w=torch.ones(4, dtype=torch.int32)), TypeError, ["w", "float32", "int32"]),
    (dict(w=torch.ones(0, 5)), ValueError, ["w", "empty"]),
    (dict(w=[1.0, 2.0]), TypeError, ["w", "torch.Tensor"]),
    (dict(w=torch.ones(4), blocksize=48), ValueError, ["blocksize", "power of two", "48"]),
    (dict(w=torch.ones(4), blocksize=0), ValueError, ["blocksize", "power of two"]),
    (dict(w=torch.ones(4), quant_type="nf3"), ValueError, ["quant_type", "nf4", "fp4", "int4", "nf3"]),
    (dict(w=torch.ones(4), double_quant="yes"), TypeError, ["double_quant"]),
])
def test_bad_input(kwargs, error, words):
    with pytest.raises(error) as info:
        ql.quantize_4bit(**kwargs)
    for word in words:
        assert word in str(info.value)
