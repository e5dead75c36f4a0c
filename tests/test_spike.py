"""The device ceiling and the spike experiment: a tiny checkpointed LM for speed, then the real model."""
from types import SimpleNamespace

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qlora_lab import PagedAdamW
from qlora_lab.spike import (DeviceCeiling, DeviceOutOfMemoryError, long_batch_peak, model_bytes,
                             plot_spike_timeline, run_spike, spike_batches)


def test_ceiling_counts_new_storage_once_and_forgets_freed():
    ceiling = DeviceCeiling(None, static_bytes=100)
    with ceiling:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[10:20].view(2, 5)  # a view: no new storage
        a.add_(1)  # in place: no new storage
        b = a * 2  # 4000 more
        assert ceiling.in_use_bytes == 100 + 8000
        del b
        assert ceiling.in_use_bytes == 100 + 4000
    assert ceiling.peak_bytes == 100 + 8000
    del a, view
    assert ceiling.in_use_bytes == 100


def test_ceiling_raises_after_pressure_fails_and_not_when_it_helps():
    hoard = [torch.zeros(1000)]
    asked = []

    def give_back(nbytes):
        asked.append(nbytes)
        return 0

    ceiling = DeviceCeiling(6000, on_pressure=[give_back])
    with pytest.raises(DeviceOutOfMemoryError, match="tried to allocate 3.91 KiB; the ceiling is 5.86 KiB") as info, ceiling:
        keep = torch.zeros(1000)  # 4000: fits
        more = keep + 1  # 8000 > 6000
    assert asked == [2000] and info.value.needed_bytes == 8000

    def release(nbytes):
        hoard.clear()
        return 4000

    ceiling = DeviceCeiling(6000, on_pressure=[release])
    with ceiling:
        hoard[0] = torch.zeros(1000)
        keep = torch.zeros(1000)  # 8000 in use: pressure frees the hoard
    assert ceiling.peak_bytes == 4000 and ceiling.in_use_bytes == 4000
    del keep


@pytest.mark.parametrize("limit", [0, -5, 1.5])
def test_ceiling_bad_limit(limit):
    with pytest.raises(ValueError, match="limit_bytes"):
        DeviceCeiling(limit)


class TinyLM(torch.nn.Module):
    """A frozen embedding and head around three trainable checkpointed blocks: the shape of a QLoRA
    step (frozen big tensors, small trainable ones, vocabulary-sized logits)."""

    def __init__(self, vocab=2000, hidden=256, n_blocks=3):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.embed = torch.nn.Embedding(vocab, hidden).requires_grad_(False)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(n_blocks))
        self.head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = checkpoint(lambda x, b=block: torch.tanh(b(x)) + x, h, use_reentrant=False)
        logits = self.head(h)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss)


def paged_factory(params):
    return PagedAdamW(params, lr=1e-3, device_budget_bytes=None, page_bytes=64 * 1024, min_paged_numel=4096)


def adamw_factory(params):
    return torch.optim.AdamW(params, lr=1e-3, foreach=False)


def test_tiny_spike_adamw_fails_paged_completes_on_the_same_trajectory():
    torch.manual_seed(0)
    model = TinyLM()
    seq_lens = [16, 16, 1024, 16, 16]
    batches = spike_batches(seq_lens, model.config.vocab_size)
    state_bytes = 2 * model_bytes(model)[1]
    ceiling = long_batch_peak(model, max(seq_lens)) + state_bytes // 2
    adamw = run_spike(model, adamw_factory, batches, ceiling, "AdamW")
    paged = run_spike(model, paged_factory, batches, ceiling, "PagedAdamW")
    free = run_spike(model, adamw_factory, batches, None, "AdamW, no ceiling")

    assert not adamw.completed and adamw.failed_step == 2 and "device out of memory" in adamw.error
    assert adamw.steps[2].needed_bytes > ceiling
    assert paged.completed and free.completed
    assert all(s.peak_bytes <= ceiling for s in paged.steps)
    spike = paged.steps[2]
    assert spike.evictions > 0 and spike.page_faults == spike.evictions  # evicted, then paged back
    assert spike.breakdown["optimizer"] < spike.optimizer_bytes_before  # state left during the spike
    assert paged.steps[3].optimizer_bytes_after == paged.steps[1].optimizer_bytes_after
    assert all(s.evictions == 0 for i, s in enumerate(paged.steps) if i != 2)
    # Paging changed where the state lived, not the arithmetic.
    assert all(torch.equal(a, b) for a, b in zip(paged.final_params, free.final_params))
    # run_spike restored the model, so the three runs started from the same weights.
    fig = plot_spike_timeline([adamw, paged], ceiling)
    assert len(fig.axes) == 2


def test_spike_batches_bad_length():
    with pytest.raises(ValueError, match="sequence length"):
        spike_batches([16, 1], 100)


@pytest.mark.slow
def test_real_qlora_model_spike():
    from qlora_lab.spike import build_spike_model

    model, _ = build_spike_model(n_layers=2, r=64)
    seq_lens = [32, 256, 32]
    batches = spike_batches(seq_lens, model.config.vocab_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state_bytes = sum(2 * p.numel() * p.element_size() for p in trainable)
    ceiling = long_batch_peak(model, 256) + state_bytes // 2
    adamw = run_spike(model, adamw_factory, batches, ceiling, "AdamW")
    paged = run_spike(model, paged_factory, batches, ceiling, "PagedAdamW")
    assert adamw.failed_step == 1
    assert paged.completed and paged.steps[1].evictions > 0 and paged.steps[1].page_faults > 0
    assert all(s.peak_bytes <= ceiling for s in paged.steps)


def test_pressure_inside_the_update_keeps_adamw_exact():
    page_bytes = 8 * 4096
    w = torch.nn.Parameter(torch.randn(3 * 4096))
    w_ref = torch.nn.Parameter(w.detach().clone())
    opt = PagedAdamW([w], lr=1e-2, device_budget_bytes=3 * page_bytes, page_bytes=page_bytes, min_paged_numel=1)
    ref = torch.optim.AdamW([w_ref], lr=1e-2, foreach=False)
    ceiling = DeviceCeiling(int(2.5 * page_bytes), on_pressure=[opt.evict])  # the pool cannot fill up
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        grad = torch.randn(w.shape, generator=g)
        w.grad, w_ref.grad = grad.clone(), grad.clone()
        with ceiling:
            opt.step()
        ref.step()
    assert torch.equal(w, w_ref)
    assert ceiling.peak_bytes <= 2.5 * page_bytes and ceiling.pressure_freed_bytes > 0
    assert opt.stats["peak_device_bytes"] <= 3 * page_bytes
