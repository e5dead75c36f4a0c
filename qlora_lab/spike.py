"""The memory spike a paged optimizer absorbs, reproduced on the bundled model.

QLoRA's motivation for paged optimizers (Dettmers et al. 2023, section 3): with gradient checkpointing,
a mini-batch with a long sequence makes a short-lived spike of activation memory; if the optimizer's
state must stay on the GPU, that spike runs the device out of memory. Paged state is evicted to CPU RAM
for the spike and paged back for the update.

`DeviceCeiling` stands in for a GPU of a given size: it counts every byte of tensor storage the
training step creates on the device, plus the model's own bytes, and when the count passes the ceiling
it first asks the optimizer to give memory back (as the CUDA driver evicts unified memory) and then, if
that is not enough, raises DeviceOutOfMemoryError, as CUDA would. `run_spike` trains a QLoRA model
through a list of sequence lengths under such a ceiling and records a timeline.
"""
import time
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = 1 << 20


class DeviceOutOfMemoryError(RuntimeError):
    """A tensor did not fit under the device memory ceiling. `needed_bytes`: what would have been in
    use with it; `limit_bytes`: the ceiling."""

    def __init__(self, message: str, needed_bytes: int, limit_bytes: int):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.limit_bytes = limit_bytes


class DeviceCeiling(TorchDispatchMode):
    """Device memory accounting with a hard ceiling, for a `with` block.

    in use = `static_bytes` (tensors that existed before, e.g. the model) + the storage of every tensor
    an operation creates on `device` inside the block, until it is freed. Views and in-place results
    share their input's storage and are not counted again. The count is checked after each operation,
    as if the allocation had asked first: above `limit_bytes` (None: no limit), each `on_pressure(bytes)`
    callback may free memory (PagedAdamW.evict does); if still above, DeviceOutOfMemoryError.

    `peak_bytes` is the most bytes in use since the last `reset_peak()`; `peak_breakdown` splits that
    moment with `breakdown_fn(in_use_bytes) -> dict` when given.
    """

    def __init__(self, limit_bytes: int | None, static_bytes: int = 0, device: str | torch.device = "cpu",
                 on_pressure=(), breakdown_fn=None):
        super().__init__()
        if limit_bytes is not None and (not isinstance(limit_bytes, int) or limit_bytes <= 0):
            raise ValueError(f"limit_bytes must be a positive int or None, got {limit_bytes!r}")
        self.limit_bytes = limit_bytes
        self.static_bytes = static_bytes
        self.device_type = torch.device(device).type
        self.on_pressure = list(on_pressure)
        self.breakdown_fn = breakdown_fn
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage id -> (weak ref, bytes)
        self._counted = 0  # bytes in _live, some maybe freed already (an upper bound until _sweep)
        self.peak_bytes = 0
        self.peak_breakdown: dict[str, int] = {}
        self.pressure_freed_bytes = 0

    def _sweep(self) -> int:
        """Forget freed storages; returns the exact bytes in use."""
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self._counted -= self._live.pop(key)[1]
        return self.static_bytes + self._counted

    @property
    def in_use_bytes(self) -> int:
        return self._sweep()

    def reset_peak(self) -> None:
        self.peak_bytes = self._sweep()
        self.peak_breakdown = self.breakdown_fn(self.peak_bytes) if self.breakdown_fn else {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type == self.device_type}
        added = 0
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or (key in self._live and not self._live[key][0].expired()):
                continue
            if key in self._live:  # a freed storage's slot reused
                self._counted -= self._live.pop(key)[1]
            self._live[key] = (StorageWeakRef(storage), storage.nbytes())
            self._counted += storage.nbytes()
            added += storage.nbytes()
        if added:
            self._check(added)
        return out

    def _check(self, added: int) -> None:
        total = self.static_bytes + self._counted
        if total <= self.peak_bytes and (self.limit_bytes is None or total <= self.limit_bytes):
            return
        total = self._sweep()
        if self.limit_bytes is not None and total > self.limit_bytes:
            for relieve in self.on_pressure:
                self.pressure_freed_bytes += relieve(total - self.limit_bytes)
                total = self._sweep()
                if total <= self.limit_bytes:
                    break
            if total > self.limit_bytes:
                raise DeviceOutOfMemoryError(
                    f"device out of memory: tried to allocate {format_bytes(added)}; the ceiling is "
                    f"{format_bytes(self.limit_bytes)} and {format_bytes(total - added)} were already in use",
                    needed_bytes=total, limit_bytes=self.limit_bytes)
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak_breakdown = self.breakdown_fn(total) if self.breakdown_fn else {}


def format_bytes(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: '3.91 KiB', '96.00 MiB'."""
    for unit, size in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (shared storage counted once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def optimizer_device_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state on the device: PagedAdamW's pool and unpaged states, or all of a torch
    optimizer's state tensors except its CPU step counters."""
    if hasattr(optimizer, "device_bytes"):
        return optimizer.device_bytes
    return tensor_bytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step")


def model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen bytes, trainable bytes) of a model's parameters and buffers."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return tensor_bytes(frozen), tensor_bytes(trainable)


# ----- the bundled QLoRA model, cut short ---------------------------------------------------------
def build_spike_model(n_layers: int = 4, r: int = 64, alpha: int = 16, device: str | torch.device = "cpu"):
    """The bundled SmolLM2-135M with its first `n_layers` decoder layers, NF4 + double quant LoRA on
    every linear layer (r=64, alpha=16: the paper's recipe), gradient checkpointing on, in train mode.
    Returns (model, tokenizer)."""
    from .lora import add_lora
    from .model import load_base_model

    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
    model, tokenizer = load_base_model()
    model.model.layers = model.model.layers[:n_layers]
    model.config.num_hidden_layers = n_layers
    model = add_lora(model, r=r, alpha=alpha, target_modules="all-linear", quantize="nf4", double_quant=True)
    model.to(device)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model, tokenizer


def spike_batches(seq_lens, vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    """One (1, seq_len) batch of token ids per entry. Memory does not depend on which tokens, so they
    are drawn at random (seeded)."""
    g = torch.Generator().manual_seed(seed)
    for n in seq_lens:
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"every sequence length must be an int >= 2, got {n!r}")
    return [torch.randint(0, vocab_size, (1, n), generator=g) for n in seq_lens]


@dataclass
class StepRecord:
    """One training step under the ceiling. Bytes are device bytes; `breakdown` splits the peak."""
    step: int
    seq_len: int
    peak_bytes: int
    breakdown: dict
    optimizer_bytes_before: int  # optimizer state on the device when the step began
    optimizer_bytes_after: int
    evictions: int = 0
    page_faults: int = 0
    bytes_to_device: int = 0
    bytes_to_host: int = 0
    seconds: float = 0.0
    failed: bool = False
    needed_bytes: int = 0  # for a failed step: the bytes in use had the failing allocation succeeded


@dataclass
class SpikeRun:
    name: str
    ceiling_bytes: int | None
    steps: list = field(default_factory=list)
    error: str | None = None
    final_params: list = field(default_factory=list)  # the trainable parameters after the last step

    @property
    def completed(self) -> bool:
        return self.error is None

    @property
    def failed_step(self) -> int | None:
        return next((s.step for s in self.steps if s.failed), None)

    def total(self, key: str) -> int:
        return sum(getattr(s, key) for s in self.steps)


def run_spike(model, make_optimizer, batches, ceiling_bytes: int | None, name: str = "") -> SpikeRun:
    """Train `model` one step per batch (causal LM loss) under a DeviceCeiling; stop at the first
    DeviceOutOfMemoryError. The trainable parameters are restored afterwards, so runs can share a
    model. `make_optimizer(params)` builds the optimizer."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in trainable]
    optimizer = make_optimizer(trainable)
    frozen_bytes, adapter_bytes = model_bytes(model)
    paged = hasattr(optimizer, "stats")

    def breakdown(total):
        grads = tensor_bytes(p.grad for p in trainable)
        opt = optimizer_device_bytes(optimizer)
        return {"weights": frozen_bytes, "adapters": adapter_bytes, "gradients": grads, "optimizer": opt,
                "activations": total - frozen_bytes - adapter_bytes - grads - opt}

    pressure = [optimizer.evict] if paged else []
    device = trainable[0].device
    ceiling = DeviceCeiling(ceiling_bytes, frozen_bytes + adapter_bytes, device, on_pressure=pressure,
                            breakdown_fn=breakdown)
    run = SpikeRun(name or type(optimizer).__name__, ceiling_bytes)
    try:
        for step, ids in enumerate(batches):
            ids = ids.to(device)
            before = dict(optimizer.stats) if paged else {}
            record = StepRecord(step, ids.shape[1], 0, {}, optimizer_device_bytes(optimizer), 0)
            run.steps.append(record)
            start = time.perf_counter()
            with ceiling:
                ceiling.reset_peak()
                try:
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    del loss
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                except DeviceOutOfMemoryError as err:
                    record.failed, record.needed_bytes = True, err.needed_bytes
                    run.error = f"step {step} (sequence of {ids.shape[1]} tokens): {err}"
                    optimizer.zero_grad(set_to_none=True)
            record.seconds = time.perf_counter() - start
            record.peak_bytes, record.breakdown = ceiling.peak_bytes, dict(ceiling.peak_breakdown)
            record.optimizer_bytes_after = optimizer_device_bytes(optimizer)
            if paged:
                for key in ("evictions", "page_faults", "bytes_to_device", "bytes_to_host"):
                    setattr(record, key, optimizer.stats[key] - before[key])
            if record.failed:
                break
    finally:
        run.final_params = [p.detach().clone() for p in trainable]
        with torch.no_grad():
            for p, p0 in zip(trainable, initial):
                p.copy_(p0)
    return run


def long_batch_peak(model, seq_len: int) -> int:
    """Device bytes at the peak of one forward and backward on a `seq_len` batch with no optimizer
    state on the device: what a ceiling must hold for the spike alone."""
    (ids,) = spike_batches([seq_len], model.config.vocab_size, seed=1)
    device = next(model.parameters()).device
    ids = ids.to(device)
    ceiling = DeviceCeiling(None, sum(model_bytes(model)), device)
    with ceiling:
        model(input_ids=ids, labels=ids).loss.backward()
    peak = ceiling.peak_bytes
    model.zero_grad(set_to_none=True)
    return peak


def plot_spike_timeline(runs, ceiling_bytes: int | None = None):
    """Peak device memory per training step, stacked by category, one panel per run; the ceiling as
    a line, a failed step as a red cross, steps with evictions marked with how many pages left."""
    import matplotlib.pyplot as plt

    from .plots import CATEGORY_COLORS

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), sharey=True, squeeze=False)
    top = max([max(s.peak_bytes, s.needed_bytes) for r in runs for s in r.steps] + [ceiling_bytes or 0]) / MIB * 1.18
    for ax, run in zip(axes[0], runs):
        xs = [s.step for s in run.steps]
        bottom = [0.0] * len(xs)
        for cat, color in CATEGORY_COLORS.items():
            heights = [s.breakdown.get(cat, 0) / MIB for s in run.steps]
            if any(heights):
                ax.bar(xs, heights, bottom=bottom, color=color, label=cat, width=0.7)
                bottom = [b + h for b, h in zip(bottom, heights)]
        for s in run.steps:
            if s.failed:  # the allocation that did not fit, drawn above what was in use
                ax.bar(s.step, (s.needed_bytes - s.peak_bytes) / MIB, bottom=s.peak_bytes / MIB, width=0.7,
                       fill=False, hatch="//", edgecolor="red")
                ax.plot(s.step, s.needed_bytes / MIB, "x", color="red", markersize=14, mew=3)
                ax.annotate("out of memory", (s.step, s.needed_bytes / MIB), xytext=(0, 10),
                            textcoords="offset points", ha="center", color="red", fontsize=8)
            elif s.evictions:
                ax.annotate(f"{s.evictions} pages\nevicted", (s.step, s.peak_bytes / MIB), xytext=(0, 10),
                            textcoords="offset points", ha="center", color=CATEGORY_COLORS["optimizer"],
                            fontsize=7, fontweight="bold")
        if ceiling_bytes:
            ax.axhline(ceiling_bytes / MIB, color="black", ls="--", lw=1)
            ax.text(xs[0] - 0.4 if xs else 0, ceiling_bytes / MIB, " device ceiling", va="bottom", fontsize=8)
        status = "completed" if run.completed else f"failed at step {run.failed_step}"
        ax.set_title(f"{run.name}: {status}", fontsize=10)
        ax.set_xlabel("training step (sequence length in tokens)")
        ax.set_ylim(0, top)
        ax.set_xticks(xs, [f"{s.step}\n{s.seq_len}" for s in run.steps], fontsize=8)
    axes[0][0].set_ylabel("peak device memory (MiB)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig
