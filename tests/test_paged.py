"""PagedAdamW against torch.optim.AdamW: trajectories, state_dict round trips, the pool, bad input."""
import copy

import pytest
import torch

from qlora_lab import PagedAdamW

SHAPES = [(300, 200), (50,), (1000, 7), (64, 64)]  # two paged (>= 5000 elements), two resident
PAGE_BYTES = 8 * 4096  # 4096 float32 elements of m and 4096 of v per page
MIN_PAGED = 5000


def make_params(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def set_grads(*param_lists, generator):
    for ps in zip(*param_lists):
        grad = torch.randn(ps[0].shape, generator=generator)
        for p in ps:
            p.grad = grad.clone()


def max_rel_err(a, b):
    return max(((x - y).abs() / x.abs().clamp_min(1e-12)).max().item() for x, y in zip(a, b))


def paged(params, budget_pages, **kw):
    budget = None if budget_pages is None else budget_pages * PAGE_BYTES
    kw.setdefault("lr", 1e-2)
    kw.setdefault("weight_decay", 0.1)
    return PagedAdamW(params, device_budget_bytes=budget, page_bytes=PAGE_BYTES, min_paged_numel=MIN_PAGED,
                      **kw)


@pytest.mark.parametrize("budget_pages", [None, 100, 3, 1])
def test_trajectory_matches_torch_adamw(budget_pages):
    ref_params, params = make_params(), make_params()
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, foreach=False)
    opt = paged(params, budget_pages)
    g = torch.Generator().manual_seed(2)
    for _ in range(60):
        set_grads(ref_params, params, generator=g)
        ref.step()
        opt.step()
    assert max_rel_err(ref_params, params) <= 1e-6
    assert opt.is_paged(params[0]) and not opt.is_paged(params[1])
    if budget_pages is not None:
        assert opt.stats["peak_device_bytes"] <= budget_pages * PAGE_BYTES
    if budget_pages == 1:
        assert opt.stats["evictions"] == opt.stats["page_faults"] - 1
        assert opt.stats["page_hits"] == 0


def test_param_groups_and_betas_match():
    ref_params, params = make_params(), make_params()
    groups = lambda ps: [{"params": ps[:2], "lr": 3e-3, "betas": (0.8, 0.95)},
                         {"params": ps[2:], "weight_decay": 0.0, "eps": 1e-6}]
    ref = torch.optim.AdamW(groups(ref_params), lr=1e-2, foreach=False)
    opt = PagedAdamW(groups(params), lr=1e-2, device_budget_bytes=2 * PAGE_BYTES, page_bytes=PAGE_BYTES,
                     min_paged_numel=MIN_PAGED)
    g = torch.Generator().manual_seed(3)
    for i in range(50):
        set_grads(ref_params, params, generator=g)
        if i % 7 == 3:  # a parameter without a gradient is skipped (its step count stays put)
            ref_params[1].grad = params[1].grad = None
        ref.step()
        opt.step()
    assert max_rel_err(ref_params, params) <= 1e-6
    assert opt.state[params[1]]["step"].item() == ref.state[ref_params[1]]["step"].item() < 50


def test_closure_and_zero_grad():
    torch.manual_seed(0)
    w_ref = torch.nn.Parameter(torch.randn(200, 60))
    w = torch.nn.Parameter(w_ref.detach().clone())
    x = torch.randn(8, 200)
    ref = torch.optim.AdamW([w_ref], lr=1e-2, foreach=False)
    opt = PagedAdamW([w], lr=1e-2, device_budget_bytes=PAGE_BYTES, page_bytes=PAGE_BYTES, min_paged_numel=1)

    def closure_for(param, optimizer):
        def closure():
            optimizer.zero_grad()
            loss = (x @ param).square().mean()
            loss.backward()
            return loss
        return closure

    for _ in range(50):
        loss_ref = ref.step(closure_for(w_ref, ref))
        loss = opt.step(closure_for(w, opt))
        assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    assert max_rel_err([w_ref], [w]) <= 1e-6
    opt.zero_grad()
    assert w.grad is None


def run(opt, params, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        set_grads(params, generator=g)
        opt.step()


def test_state_dict_round_trip_is_exact():
    a, b = make_params(), make_params()
    opt_a = paged(a, 2)
    run(opt_a, a, 20, seed=4)
    saved = copy.deepcopy(opt_a.state_dict())
    for x, y in zip(a, b):
        y.data.copy_(x.data)
    opt_b = paged(b, 3)  # a different budget: pages are an implementation detail, not state
    opt_b.load_state_dict(copy.deepcopy(saved))
    sd_b = opt_b.state_dict()
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, sd_b["state"][index][key]), (index, key)
    run(opt_a, a, 30, seed=5)
    run(opt_b, b, 30, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_state_dict_loads_into_torch_adamw_and_back():
    ref_params, params = make_params(), make_params()
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, foreach=False)
    opt = paged(params, 1)
    g = torch.Generator().manual_seed(6)
    for _ in range(10):
        set_grads(ref_params, params, generator=g)
        ref.step()
        opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    for index, entry in ref.state_dict()["state"].items():
        for key in entry:
            assert torch.equal(entry[key], sd["state"][index][key].to(entry[key].device)), (index, key)

    # PagedAdamW -> AdamW, train on; AdamW -> PagedAdamW, train on; both stay on one trajectory.
    moved = make_params()
    for x, y in zip(moved, params):
        x.data.copy_(y.data)
    adamw = torch.optim.AdamW(moved, lr=1e-2, weight_decay=0.1, foreach=False)
    adamw.load_state_dict(copy.deepcopy(sd))
    back = make_params()
    for _ in range(10):
        set_grads(ref_params, moved, generator=g)
        ref.step()
        adamw.step()
    for x, y in zip(back, moved):
        x.data.copy_(y.data)
    opt_back = paged(back, 2)
    opt_back.load_state_dict(copy.deepcopy(adamw.state_dict()))
    for _ in range(10):
        set_grads(ref_params, back, generator=g)
        ref.step()
        opt_back.step()
    assert max_rel_err(ref_params, back) <= 1e-6


def test_loading_plain_adam_state_is_refused():
    params = make_params()
    adam = torch.optim.Adam(params, lr=1e-2)
    run(adam, params, 1, seed=0)
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        paged(make_params(), 1).load_state_dict(adam.state_dict())


def test_lru_eviction_and_counts():
    w = torch.nn.Parameter(torch.zeros(3 * 4096))  # exactly three pages
    opt = PagedAdamW([w], lr=1e-3, device_budget_bytes=2 * PAGE_BYTES, page_bytes=PAGE_BYTES,
                     min_paged_numel=1)
    w.grad = torch.ones_like(w)
    opt.step()  # pages 0, 1 fault; page 2 evicts page 0
    assert opt.stats["page_faults"] == 3 and opt.stats["evictions"] == 1
    assert opt.stats["bytes_to_device"] == 3 * PAGE_BYTES and opt.stats["bytes_to_host"] == PAGE_BYTES
    assert opt.pool_bytes == opt.stats["peak_device_bytes"] == 2 * PAGE_BYTES
    freed = opt.evict()  # all of the pool goes home: two dirty pages
    assert freed == 2 * PAGE_BYTES and opt.pool_bytes == 0
    assert opt.stats["bytes_to_host"] == 3 * PAGE_BYTES and opt.stats["evictions"] == 3
    # Host pages now hold every update: the state equals AdamW's after one step.
    ref_w = torch.nn.Parameter(torch.zeros(3 * 4096))
    ref = torch.optim.AdamW([ref_w], lr=1e-3, foreach=False)
    ref_w.grad = torch.ones_like(ref_w)
    ref.step()
    sd = opt.state_dict()
    assert torch.equal(sd["state"][0]["exp_avg"], ref.state[ref_w]["exp_avg"])
    assert torch.equal(w, ref_w)


def test_partial_last_page_moves_only_its_used_bytes():
    w = torch.nn.Parameter(torch.zeros(4096 + 10))
    opt = PagedAdamW([w], device_budget_bytes=None, page_bytes=PAGE_BYTES, min_paged_numel=1)
    w.grad = torch.ones_like(w)
    opt.step()
    assert opt.stats["bytes_to_device"] == PAGE_BYTES + 2 * 10 * 4


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(device_budget_bytes=100, page_bytes=4096), ValueError, "smaller than one page"),
    (dict(page_bytes=0), ValueError, "page_bytes"),
    (dict(page_bytes=-8), ValueError, "page_bytes"),
    (dict(page_bytes=4.0), ValueError, "page_bytes"),
    (dict(page_bytes=4), ValueError, "cannot hold one element"),
    (dict(device_budget_bytes=1.5e6), TypeError, "device_budget_bytes"),
    (dict(min_paged_numel=0), ValueError, "min_paged_numel"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(betas=(0.9, 1.0)), ValueError, "betas"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
])
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        PagedAdamW([torch.nn.Parameter(torch.zeros(10))], **{"min_paged_numel": 1, **kwargs})


def test_non_float_params_are_refused():
    with pytest.raises(TypeError, match="floating-point"):
        PagedAdamW([torch.zeros(10, dtype=torch.int64)])
    with pytest.raises(ValueError, match="amsgrad"):
        PagedAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "amsgrad": True}])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pool_is_on_gpu_and_host_pages_are_pinned():
    ref_params = [p.cuda() for p in make_params()]
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    ref_params = [torch.nn.Parameter(p) for p in ref_params]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, foreach=False)
    opt = paged(params, 1)
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        for x, y in zip(ref_params, params):
            grad = torch.randn(x.shape, generator=g).cuda()
            x.grad, y.grad = grad.clone(), grad.clone()
        ref.step()
        opt.step()
    assert max_rel_err(ref_params, params) <= 1e-6
    assert all(m.host.is_pinned() for m in opt._moments.values())
    assert all(buf.is_cuda for buf in opt._pool.values())
