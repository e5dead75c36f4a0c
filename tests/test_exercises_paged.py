"""The notebook 05 checkers: right answers pass, wrong ones say what is off, None is 'not attempted'."""
from qlora_lab.exercises import paged as ex


def test_page_count():
    assert not ex.check_page_count(None).attempted
    assert ex.check_page_count(15).ok
    assert "one short" in ex.check_page_count(14).message
    assert "m AND v" in ex.check_page_count(8).message
    assert not ex.check_page_count(3.0).ok
    assert "+5" in ex.check_page_count(20).message


def test_lru_counts():
    assert not ex.check_lru_counts(None).attempted
    assert ex.check_lru_counts({"page_faults": 6, "evictions": 4}).ok
    wrong = ex.check_lru_counts({"page_faults": 4, "evictions": 2})
    assert not wrong.ok and "page_faults is 4, off by -2" in wrong.message and "evictions is 2" in wrong.message
    assert not ex.check_lru_counts({"faults": 6}).ok


def _adamw(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))


def test_adamw_update():
    assert not ex.check_adamw_update(None).attempted
    assert ex.check_adamw_update(_adamw).ok
    assert "bias correction" in ex.check_adamw_update(ex._variant(bias_correction=False)).message
    assert "L2" in ex.check_adamw_update(ex._variant(decoupled=False)).message

    def double_lr(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
        _adamw(param, grad, exp_avg, exp_avg_sq, step, 2 * lr, beta1, beta2, eps, weight_decay)

    assert "Step 1 differs" in ex.check_adamw_update(double_lr).message

    def broken(*args, **kwargs):
        raise KeyError("m")

    assert "raised KeyError" in ex.check_adamw_update(broken).message
