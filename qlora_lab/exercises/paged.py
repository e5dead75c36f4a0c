"""Checkers for notebook 05 (the paged optimizer)."""
import math

import torch

from . import Feedback, not_attempted, wrong_type

# Exercise 1: pages of one LoRA matrix.
PAGE_COUNT_SHAPE = (64, 576)  # lora_A of q_proj at r=64: 36,864 float32 elements
PAGE_COUNT_PAGE_BYTES = 20 * 1024

# Exercise 2: LRU on a parameter of three pages in a pool of two.
LRU_PAGES, LRU_BUDGET_PAGES, LRU_STEPS = 3, 2, 2


def page_count_truth() -> int:
    numel = math.prod(PAGE_COUNT_SHAPE)
    page_numel = PAGE_COUNT_PAGE_BYTES // (2 * 4)  # m and v, 4 bytes each
    return -(-numel // page_numel)


def check_page_count(answer) -> Feedback:
    """How many pages hold m and v of a float32 (64, 576) matrix, with page_bytes = 20 KiB?"""
    if answer is None:
        return not_attempted("`answer` (an int: the number of pages)")
    if (wrong := wrong_type(answer, int, "a whole number of pages")) is not None:
        return wrong
    truth = page_count_truth()
    numel = math.prod(PAGE_COUNT_SHAPE)
    one_moment = -(-numel * 4 // PAGE_COUNT_PAGE_BYTES)
    if answer == truth:
        return Feedback(True, f"{truth} pages: {PAGE_COUNT_PAGE_BYTES // 8} elements of m and of v per page, "
                              f"the last page only partly used.")
    if answer == truth - 1:
        return Feedback(False, f"{answer} is one short: {numel} elements do not divide into pages evenly, "
                               f"and the last, partial page counts too (round up).")
    if answer in (one_moment, one_moment - 1):
        return Feedback(False, f"{answer} pages would hold only one moment. A page holds m AND v of its "
                               f"elements: 8 bytes per element, not 4.")
    return Feedback(False, f"{answer} is off by {answer - truth:+d}. Elements per page = page_bytes / "
                           f"(2 moments x 4 bytes); pages = ceil(elements / elements per page).")


def lru_truth() -> dict:
    """Run the real PagedAdamW on the exercise's setting and return its counts."""
    from ..paged import PagedAdamW

    page_bytes = 8 * 1024
    w = torch.nn.Parameter(torch.zeros(LRU_PAGES * page_bytes // 8))
    opt = PagedAdamW([w], device_budget_bytes=LRU_BUDGET_PAGES * page_bytes, page_bytes=page_bytes,
                     min_paged_numel=1)
    for _ in range(LRU_STEPS):
        w.grad = torch.ones_like(w)
        opt.step()
    return {"page_faults": opt.stats["page_faults"], "evictions": opt.stats["evictions"]}


def check_lru_counts(answer) -> Feedback:
    """Page faults and evictions after 2 steps of a 3-page parameter in a 2-page pool (LRU)."""
    if answer is None:
        return not_attempted('`answer` (a dict: {"page_faults": ..., "evictions": ...})')
    if not isinstance(answer, dict) or set(answer) != {"page_faults", "evictions"}:
        return Feedback(False, 'Give a dict with exactly the keys "page_faults" and "evictions".')
    truth = lru_truth()
    if answer == truth:
        return Feedback(True, f"{truth['page_faults']} faults, {truth['evictions']} evictions: a cyclic scan "
                              f"longer than the pool misses every time under LRU.")
    hints = []
    if answer["page_faults"] != truth["page_faults"]:
        hints.append(f"page_faults is {answer['page_faults']}, off by "
                     f"{answer['page_faults'] - truth['page_faults']:+d}")
        if answer["page_faults"] < truth["page_faults"]:
            hints.append("in step 2, page 0 comes back first and evicts the least recently used page, "
                         "page 1, which is the very next page needed; then page 1 evicts page 2")
    if answer["evictions"] != truth["evictions"]:
        hints.append(f"evictions is {answer['evictions']}, off by {answer['evictions'] - truth['evictions']:+d}; "
                     f"every fault into a full pool evicts one page, and the pool starts empty")
    return Feedback(False, "; ".join(hints) + ".")


def _reference_trajectory(shape, steps, hyper, seed=0):
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) for _ in range(steps)]
    return p0, grads


def _run_update(fn, p0, grads, hyper):
    param, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    out = []
    for step, grad in enumerate(grads, start=1):
        fn(param, grad, m, v, step, **hyper)
        out.append(param.clone())
    return out


def _variant(bias_correction=True, decoupled=True):
    def update(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bc1 = 1 - beta1 ** step if bias_correction else 1.0
        bc2 = 1 - beta2 ** step if bias_correction else 1.0
        denom = (exp_avg_sq.sqrt() / bc2 ** 0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bc1)
    return update


def check_adamw_update(answer) -> Feedback:
    """`answer(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)` updates one
    page's slices in place; it must match torch.optim.AdamW over 5 steps within 1e-6 relative."""
    if answer is None:
        return not_attempted("`answer` (your update function)")
    if not callable(answer):
        return Feedback(False, f"`answer` must be a function, got {type(answer).__name__}.")
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    p0, grads = _reference_trajectory((4096,), 5, hyper)
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                            weight_decay=hyper["weight_decay"], foreach=False)
    truth = []
    for grad in grads:
        ref.grad = grad.clone()
        opt.step()
        truth.append(ref.detach().clone())
    try:
        mine = _run_update(answer, p0, grads, hyper)
    except Exception as err:  # a learner's code: report what it raised
        return Feedback(False, f"Your function raised {type(err).__name__}: {err}")
    for step, (a, b) in enumerate(zip(mine, truth), start=1):
        rel = ((a - b).abs() / b.abs().clamp_min(1e-12)).max().item()
        if not rel <= 1e-6:
            break
    else:
        return Feedback(True, "Matches torch.optim.AdamW for 5 steps (max relative error <= 1e-6).")
    for name, variant in [("no bias correction (divide m by 1 - beta1**step and v by 1 - beta2**step)",
                           _variant(bias_correction=False)),
                          ("weight decay added to the gradient (that is Adam with L2, not AdamW: decay the "
                           "parameter directly, param *= 1 - lr * weight_decay)", _variant(decoupled=False))]:
        if all(torch.allclose(x, y, rtol=1e-6, atol=0) for x, y in zip(mine, _run_update(variant, p0, grads, hyper))):
            return Feedback(False, f"Your update matches AdamW with {name}.")
    return Feedback(False, f"Step {step} differs from torch.optim.AdamW by up to {rel:.2e} relative. Check the "
                           f"order: decay the parameter, update m and v, then param -= lr / (1 - beta1**step) * "
                           f"m / (sqrt(v) / sqrt(1 - beta2**step) + eps).")
