from qlora_lab.exercises.memory import N_7B, check_full_finetune_bytes, check_nf4_bytes
from qlora_lab.memory import estimate_memory, quantized_4bit_bytes


def test_full_finetune_checker():
    assert not check_full_finetune_bytes(None).attempted
    s = estimate_memory("7b", method="full", optimizer="adamw")
    assert check_full_finetune_bytes(s.weights + s.gradients + s.optimizer).ok
    wrong = check_full_finetune_bytes(16 * N_7B)
    assert not wrong.ok and "master copy" in wrong.message
    assert "16-bit weights" in check_full_finetune_bytes(2 * N_7B).message
    assert not check_full_finetune_bytes("12 GB").ok


def test_nf4_checker():
    assert not check_nf4_bytes(None).attempted
    n = 4096 * 4096
    assert check_nf4_bytes(quantized_4bit_bytes(n, True)).ok
    assert "fp32 absmax" in check_nf4_bytes(quantized_4bit_bytes(n, False)).message
    assert "packed codes" in check_nf4_bytes(n // 2).message
    assert "off by +1" in check_nf4_bytes(quantized_4bit_bytes(n, True) + 1).message
