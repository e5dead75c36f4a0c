"""Measure the memory stack of one real training step, by tensor accounting.

Method (our own tracker; torch.distributed._tools.mem_tracker.MemTracker is not used because it
crashes on frozen parameters unless they are skipped):

- weights:     frozen parameters, buffers and frozen quantized storage (a Quantized4bit's packed
               codes and constants, a bitsandbytes Params4bit's quant_state), unique storages.
- adapters:    parameters with requires_grad=True of a model with a frozen base; when every
               parameter trains (full fine-tuning) they are weights.
- gradients:   the .grad tensors after backward.
- optimizer:   every tensor in optimizer.state after the step.
- activations: tensors autograd saves for backward, caught with torch.autograd.graph.saved_tensors_hooks
               during the forward; unique storages (a view counts once), parameters, buffers and
               quantized weights excluded.
- temporaries: the largest transient allocation of the step: a TorchDispatchMode sees every tensor
               an op creates, a weakref on its storage sees it freed; at each op,
               transient = live new bytes - live activations - live gradients; the maximum counts.

The step measured is a warm step: a first step on the first few tokens creates the optimizer
state (torch.optim creates it lazily), then gradients are set to None and the measured step runs,
so the optimizer state already exists, as in every step after the first. Both steps train the model.
On CUDA, torch.cuda.max_memory_allocated of the measured step is kept too (allocator_peak), with the
same attribution of the categories.
"""
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field, is_dataclass, fields

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .memory import MemoryStack

PHASES = ("forward", "backward", "optimizer")


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (s.device.type, s.device.index, s.data_ptr())


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _quantized_tensors(module: torch.nn.Module):
    """Frozen tensors a module stores outside its parameters and buffers: fields of dataclass
    attributes (qlora_lab's Quantized4bit) and bitsandbytes' quant_state of a Params4bit."""
    for value in vars(module).values():
        if is_dataclass(value) and not isinstance(value, type):
            for f in fields(value):
                t = getattr(value, f.name)
                if isinstance(t, torch.Tensor):
                    yield t
    for p in module.parameters(recurse=False):
        state = getattr(p, "quant_state", None)
        if state is not None:
            for t in (state.absmax, getattr(state, "offset", None),
                      getattr(getattr(state, "state2", None), "absmax", None)):
                if isinstance(t, torch.Tensor):
                    yield t


def _unique_bytes(tensors, exclude=()) -> tuple[int, set]:
    keys, total = set(exclude), 0
    mine = set()
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        k = _storage_key(t)
        if k in keys:
            continue
        keys.add(k)
        mine.add(k)
        total += _nbytes(t)
    return total, mine


def _optimizer_tensors(optimizer):
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


@dataclass
class Timeline:
    """Live bytes after each op of the measured step: phase names, byte counts and per-category
    series (weights+adapters+optimizer are the baseline present throughout)."""
    phase: list = field(default_factory=list)
    baseline: list = field(default_factory=list)
    activations: list = field(default_factory=list)
    gradients: list = field(default_factory=list)
    temporaries: list = field(default_factory=list)

    @property
    def total(self) -> list:
        return [b + a + g + t for b, a, g, t in
                zip(self.baseline, self.activations, self.gradients, self.temporaries)]


class _Tracker(TorchDispatchMode):
    """Counts bytes of storages created by ops, and which of them are saved activations or grads."""

    def __init__(self, known: set):
        super().__init__()
        self.known = known          # storages that existed before the step (weights, state, batch)
        self.live = {}              # key -> bytes, storages created during the step
        self.activation_keys, self.gradient_keys = set(), set()
        self.live_bytes = self.activation_bytes = self.gradient_bytes = 0
        self.phase = "forward"
        self.baseline = 0
        self.timeline = Timeline()
        self.max_transient = 0

    def _forget(self, key):
        n = self.live.pop(key, 0)
        self.live_bytes -= n
        if key in self.activation_keys:
            self.activation_keys.discard(key)
            self.activation_bytes -= n
        if key in self.gradient_keys:
            self.gradient_keys.discard(key)
            self.gradient_bytes -= n

    def mark(self, key, kind: str):
        """Tag a live storage as "activation" or "gradient"."""
        keys = self.activation_keys if kind == "activation" else self.gradient_keys
        if key in self.live and key not in keys:
            keys.add(key)
            if kind == "activation":
                self.activation_bytes += self.live[key]
            else:
                self.gradient_bytes += self.live[key]

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return
        s = t.untyped_storage()
        key = _storage_key(t)
        if key in self.known or key in self.live or s.nbytes() == 0:
            return
        self.live[key] = s.nbytes()
        self.live_bytes += s.nbytes()
        weakref.finalize(s, self._forget, key)

    def sample(self):
        act, grad = self.activation_bytes, self.gradient_bytes
        transient = self.live_bytes - act - grad
        self.max_transient = max(self.max_transient, transient)
        tl = self.timeline
        tl.phase.append(self.phase)
        tl.baseline.append(self.baseline)
        tl.activations.append(act)
        tl.gradients.append(grad)
        tl.temporaries.append(transient)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            self._track(t)
        self.sample()
        return out


def _default_loss(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.loss if hasattr(out, "loss") else out


def _first_tokens(batch, n: int = 8):
    if isinstance(batch, dict):
        return {k: (v[:, :n] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v) for k, v in batch.items()}
    return batch[:, :n]


def measure_memory(model: torch.nn.Module, batch, optimizer: torch.optim.Optimizer | None = None,
                   gradient_checkpointing: bool = False, loss_fn=None, label: str = "measured"):
    """Run one warm training step of `model` on `batch` and return (MemoryStack, Timeline), bytes.

    batch: a dict of tensors for a Hugging Face model (input_ids, labels, ...) or a tensor.
    optimizer: any torch optimizer over the trainable parameters (None: forward and backward only).
    gradient_checkpointing: enable it on a Hugging Face model for the step (reentrant checkpoints,
        with input gradients on so adapters behind a frozen embedding still get gradients), then
        switch it off again.
    loss_fn(model, batch) -> scalar loss; default: the model's output .loss (or the output itself).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(gradient_checkpointing, bool):
        raise TypeError(f"gradient_checkpointing must be True or False, got {gradient_checkpointing!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    loss_fn = loss_fn or _default_loss
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no parameter with requires_grad=True; nothing would train")
    was_training = model.training
    model.train()
    hook = None
    if gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise TypeError("gradient_checkpointing=True needs a Hugging Face model (gradient_checkpointing_enable)")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    try:
        if optimizer is not None:  # warm-up: create the optimizer state
            loss_fn(model, _first_tokens(batch)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for p in trainable:
            p.grad = None
        return _measure_step(model, batch, optimizer, loss_fn, label)
    finally:
        if hook is not None:
            hook.remove()
            model.gradient_checkpointing_disable()
        model.train(was_training)


def _measure_step(model, batch, optimizer, loss_fn, label):
    params = list(model.parameters())
    frozen_params = [p for p in params if not p.requires_grad]
    trained = [p for p in params if p.requires_grad]
    weights, weight_keys = _unique_bytes(
        frozen_params + (trained if not frozen_params else []) + list(model.buffers())
        + [t for m in model.modules() for t in _quantized_tensors(m)])
    adapters, adapter_keys = _unique_bytes(trained if frozen_params else [], weight_keys)
    frozen = weight_keys | adapter_keys
    optimizer_bytes, opt_keys = _unique_bytes(_optimizer_tensors(optimizer), frozen)
    batch_tensors = list(batch.values()) if isinstance(batch, dict) else [batch]
    _, batch_keys = _unique_bytes([t for t in batch_tensors if isinstance(t, torch.Tensor)], frozen | opt_keys)

    tracker = _Tracker(frozen | opt_keys | batch_keys)
    tracker.baseline = weights + adapters + optimizer_bytes
    saved = {}

    def pack(t):
        if t.numel() and not t.is_meta:
            key = _storage_key(t)
            if key not in frozen and key not in batch_keys:
                saved.setdefault(key, _nbytes(t))
                tracker.mark(key, "activation")
        return t

    def grad_hook(p):
        if p.grad is not None:
            tracker.mark(_storage_key(p.grad), "gradient")

    handles = [p.register_post_accumulate_grad_hook(grad_hook) for p in params if p.requires_grad]
    cuda = any(p.is_cuda for p in params)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_allocated = torch.cuda.memory_allocated()
    try:
        with tracker:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_fn(model, batch)
            activations = sum(saved.values())
            tracker.phase = "backward"
            loss.backward()
            del loss
            tracker.phase = "optimizer"
            gradients, _ = _unique_bytes([p.grad for p in params if p.grad is not None], frozen)
            if optimizer is not None:
                optimizer.step()
            tracker.sample()
    finally:
        for h in handles:
            h.remove()
    optimizer_after, _ = _unique_bytes(_optimizer_tensors(optimizer), frozen)
    stack = MemoryStack(weights=weights, adapters=adapters, gradients=gradients,
                        optimizer=max(optimizer_bytes, optimizer_after), activations=activations,
                        temporaries=tracker.max_transient, label=label)
    stack.peak = max(tracker.timeline.total)
    if cuda:
        stack.allocator_peak = torch.cuda.max_memory_allocated() - start_allocated + tracker.baseline
    return stack, tracker.timeline
