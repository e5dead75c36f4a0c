"""PagedAdamW vs torch.optim.AdamW on the bundled QLoRA model: step time and bytes moved at three
device budgets (all state fits, a quarter of it, one page).

    python bench/bench_paged.py [--layers 4] [--seq-len 64] [--steps 5]

Prints, per optimizer, the mean training-step time (forward + backward + update), the mean update
time alone, their ratios to torch.optim.AdamW measured in the same run, and the page traffic per step.
On CUDA it also times bitsandbytes' PagedAdamW32bit.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qlora_lab.paged import PagedAdamW  # noqa: E402
from qlora_lab.spike import build_spike_model, spike_batches  # noqa: E402

PAGE_BYTES = 64 * 1024
MIN_PAGED = 4096


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_optimizer(model, make_optimizer, batches, warmup):
    """Mean seconds per training step and per update, and the optimizer (for its stats)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in trainable]
    optimizer = make_optimizer(trainable)
    device = trainable[0].device
    step_times, update_times = [], []
    for i, ids in enumerate(batches):
        if i == warmup and hasattr(optimizer, "reset_stats"):
            optimizer.reset_stats()
        sync(device)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        sync(device)
        mid = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        end = time.perf_counter()
        if i >= warmup:
            step_times.append(end - start)
            update_times.append(end - mid)
    with torch.no_grad():
        for p, p0 in zip(trainable, initial):
            p.copy_(p0)
    return sum(step_times) / len(step_times), sum(update_times) / len(update_times), optimizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = build_spike_model(n_layers=args.layers, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = [ids.to(device) for ids in
               spike_batches([args.seq_len] * (args.warmup + args.steps), model.config.vocab_size)]
    probe = PagedAdamW(trainable, page_bytes=PAGE_BYTES, min_paged_numel=MIN_PAGED)
    n_pages = sum(m.n_pages for m in probe._moments.values())
    state_bytes = sum(2 * p.numel() * p.element_size() for p in trainable)
    del probe
    print(f"device {device.type}; {args.layers} layers, QLoRA r=64, {len(trainable)} LoRA tensors, "
          f"{state_bytes / 2**20:.2f} MiB of AdamW state; pages of {PAGE_BYTES // 1024} KiB, "
          f"{n_pages} pages; sequence {args.seq_len} tokens; {args.steps} timed steps")

    print(f"{'optimizer':58s} {'step ms':>8s} {'ratio':>6s} {'update ms':>9s} {'ratio':>6s} "
          f"{'faults/step':>11s} {'MiB to dev/step':>15s} {'MiB to host/step':>16s}", flush=True)
    base = None

    def report(name, make):
        nonlocal base
        step, update, opt = time_optimizer(model, make, batches, args.warmup)
        base = base or (step, update)
        traffic = ""
        if isinstance(opt, PagedAdamW):
            n, stats = args.steps, opt.stats
            traffic = (f"{stats['page_faults'] / n:11.0f} {stats['bytes_to_device'] / n / 2**20:15.2f} "
                       f"{stats['bytes_to_host'] / n / 2**20:16.2f}")
        print(f"{name:58s} {step * 1e3:8.1f} {step / base[0]:6.2f} {update * 1e3:9.2f} "
              f"{update / base[1]:6.2f} {traffic}", flush=True)

    report("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=2e-4))
    report("torch.optim.AdamW foreach=False", lambda ps: torch.optim.AdamW(ps, lr=2e-4, foreach=False))
    budgets = [("all fits", n_pages * PAGE_BYTES), ("1/4 of pages", max(1, n_pages // 4) * PAGE_BYTES),
               ("one page", PAGE_BYTES)]
    for label, budget in budgets:
        report(f"PagedAdamW, budget {label} ({budget / 2**20:.2f} MiB)",
               lambda ps: PagedAdamW(ps, lr=2e-4, device_budget_bytes=budget, page_bytes=PAGE_BYTES,
                                     min_paged_numel=MIN_PAGED))
    if device.type == "cuda":
        import bitsandbytes as bnb
        report("bitsandbytes PagedAdamW32bit", lambda ps: bnb.optim.PagedAdamW32bit(ps, lr=2e-4))
    print("ratios are against torch.optim.AdamW (default foreach) in this run; traffic is per timed step")


if __name__ == "__main__":
    main()
