import math

from qlora_lab.exercises import evaluate as ex_eval
from qlora_lab.exercises import finetune as ex_ft


def test_loss_mask_checker():
    assert not ex_ft.check_loss_mask(None).attempted
    assert ex_ft.check_loss_mask(ex_ft.mask_truth()).ok
    fb = ex_ft.check_loss_mask(ex_ft.MASK_IDS)
    assert not fb.ok and "Nothing is masked" in fb.message
    assert "one label per token" in ex_ft.check_loss_mask([1, 2]).message


def test_warmup_checker():
    assert not ex_ft.check_warmup_lr(None).attempted
    assert ex_ft.check_warmup_lr(1e-3 * 3 / 6).ok
    fb = ex_ft.check_warmup_lr(1e-3 * 2 / 5)
    assert not fb.ok and "(step + 1)" in fb.message


def test_perplexity_checker():
    assert not ex_eval.check_perplexity(None).attempted
    assert ex_eval.check_perplexity(math.exp((20 + 90) / 40)).ok
    fb = ex_eval.check_perplexity(math.exp(2.5))
    assert not fb.ok and "token count" in fb.message


def test_adapter_bytes_checker():
    import torch

    from qlora_lab.lora import add_lora
    from qlora_lab.model import load_pretrained
    model = add_lora(load_pretrained(dtype=torch.float32), r=ex_eval.ADAPTER_R, alpha=16, quantize=None)
    real = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert ex_eval.check_adapter_bytes(real).ok  # the checker's truth is the real model's adapter size
    assert not ex_eval.check_adapter_bytes(None).attempted
    assert "4 bytes" in ex_eval.check_adapter_bytes(real // 4).message
    assert "30 of them" in ex_eval.check_adapter_bytes(real // 30).message
    assert "off by +1" in ex_eval.check_adapter_bytes(real + 1).message
    assert "Give an int" in ex_eval.check_adapter_bytes(9.8e6).message
