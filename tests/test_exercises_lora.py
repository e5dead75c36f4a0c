"""The notebook 04 checkers: right answers pass, wrong ones say what is off, None is 'not attempted'."""
from qlora_lab.exercises import lora as ex


def test_adapter_params():
    assert not ex.check_adapter_params(None).attempted
    assert ex.check_adapter_params(8 * (576 + 1536)).ok
    assert "full weight matrix" in ex.check_adapter_params(576 * 1536).message
    assert "only A" in ex.check_adapter_params(8 * 576).message
    assert "+1" in ex.check_adapter_params(8 * (576 + 1536) + 1).message
    assert not ex.check_adapter_params(1.5).ok


def test_merge():
    assert not ex.check_merge(None).attempted
    assert ex.check_merge(lambda w, a, b, alpha, r: w + alpha / r * (b @ a)).ok
    assert "missing" in ex.check_merge(lambda w, a, b, alpha, r: w + b @ a).message
    assert "upside down" in ex.check_merge(lambda w, a, b, alpha, r: w + r / alpha * (b @ a)).message
    assert "raised" in ex.check_merge(lambda w, a, b, alpha, r: w + a @ b).message
    assert "add the frozen W" in ex.check_merge(lambda w, a, b, alpha, r: alpha / r * (b @ a)).message
    assert not ex.check_merge(3).ok


def test_nf4_dq_bytes():
    n = 1536 * 576
    truth = n // 2 + n // 64 + -(-(n // 64) // 256) * 4 + 4
    assert ex.weight_bytes_truth() == truth
    assert not ex.check_nf4_dq_bytes(None).attempted
    assert ex.check_nf4_dq_bytes(truth).ok
    assert "without double quantization" in ex.check_nf4_dq_bytes(n // 2 + n // 64 * 4).message
    assert "only the 4-bit codes" in ex.check_nf4_dq_bytes(n // 2).message
    assert "close" in ex.check_nf4_dq_bytes(n // 2 + n // 64).message
    assert "+10" in ex.check_nf4_dq_bytes(truth + 10).message
