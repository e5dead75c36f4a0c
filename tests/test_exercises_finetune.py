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
