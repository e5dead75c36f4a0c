"""A paged AdamW: Adam's two moments live in fixed-size pages in host memory and visit a bounded
device pool only for their parameter's update.

QLoRA (Dettmers et al. 2023, section 3) pages optimizer state with CUDA unified memory: bitsandbytes
allocates it with `cudaMallocManaged`, prefetches it before each parameter's update, and lets the
driver evict it to CPU RAM when a gradient-checkpointing spike needs the GPU. Only states of at least
1e5 elements are paged. This module makes that mechanism explicit, so a learner can watch it:

- a *page* holds the first and second moment (m, v) of `page_numel` consecutive elements of one
  parameter, `page_bytes` bytes at most; the host copy of every page is the source of truth;
- the *device pool* holds at most `device_budget_bytes // page_bytes` pages; a page is copied in
  (a page fault) before its slice is updated and the least recently used page is copied back out
  (an eviction) when the pool is full;
- `evict(nbytes)` frees pool memory on demand, which is what the CUDA driver does when another
  allocation needs the device (see qlora_lab.spike).

On CUDA the pool is GPU memory, the host pages are pinned, and copies are non_blocking. On the CPU the
pool is a separate set of buffers with the same algorithm and the same counts.

The update is torch.optim.AdamW's (its foreach=False path, same operations in the same order), applied
slice by slice, so trajectories match it; `state_dict()` uses AdamW's keys ('step', 'exp_avg',
'exp_avg_sq'), so either optimizer loads the other's checkpoint.
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch

STAT_NAMES = ("page_faults", "page_hits", "evictions", "bytes_to_device", "bytes_to_host", "peak_device_bytes")

# AdamW options that exist in torch.optim.AdamW's param groups; a loaded group must have these values.
_ADAMW_FIXED_OPTIONS = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False,
                        "decoupled_weight_decay": True}
# AdamW options that choose an implementation, not the math; accepted with any value and dropped.
_ADAMW_IMPLEMENTATION_OPTIONS = ("foreach", "fused")


@dataclass
class _PagedMoments:
    """The host pages of one parameter: `host[i, 0]` is m and `host[i, 1]` is v for elements
    [i * page_numel, (i + 1) * page_numel) of the flattened parameter (the last page zero-padded)."""
    key: int
    numel: int
    page_numel: int
    host: torch.Tensor  # (n_pages, 2, page_numel), the parameter's dtype

    @property
    def n_pages(self) -> int:
        return self.host.shape[0]

    def page_range(self, i: int) -> tuple[int, int]:
        start = i * self.page_numel
        return start, min(self.numel, start + self.page_numel)

    def page_nbytes(self, i: int) -> int:
        """Bytes one transfer of page i moves: its used part of m and of v."""
        start, stop = self.page_range(i)
        return 2 * (stop - start) * self.host.element_size()


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) whose large states are paged.

    Args:
        params: parameters or param groups, as for torch.optim.AdamW.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (same defaults).
        device_budget_bytes: the most bytes the device page pool may hold; at least one page.
            None: no limit (every page stays on the device once touched).
        page_bytes: bytes per page, m and v together (default 1 MiB).
        min_paged_numel: parameters with fewer elements keep m and v on the device, unpaged
            (bitsandbytes uses 1e5).

    `stats` counts page_faults (pages copied to the device), page_hits (pages found there),
    evictions (pages pushed out of the pool), bytes_to_device, bytes_to_host and peak_device_bytes
    (the most bytes the pool held).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, device_budget_bytes: int | None = None,
                 page_bytes: int = 1 << 20, min_paged_numel: int = 100_000):
        if isinstance(page_bytes, bool) or not isinstance(page_bytes, int) or page_bytes <= 0:
            raise ValueError(f"page_bytes must be a positive int (bytes per page), got {page_bytes!r}")
        if device_budget_bytes is not None:
            if isinstance(device_budget_bytes, bool) or not isinstance(device_budget_bytes, int):
                raise TypeError(f"device_budget_bytes must be an int number of bytes or None, "
                                f"got {type(device_budget_bytes).__name__}")
            if device_budget_bytes < page_bytes:
                raise ValueError(f"device_budget_bytes={device_budget_bytes} is smaller than one page "
                                 f"(page_bytes={page_bytes}); give a budget of at least page_bytes or None")
        if isinstance(min_paged_numel, bool) or not isinstance(min_paged_numel, int) or min_paged_numel < 1:
            raise ValueError(f"min_paged_numel must be an int >= 1, got {min_paged_numel!r}")
        self.page_bytes = page_bytes
        self.device_budget_bytes = device_budget_bytes
        self.min_paged_numel = min_paged_numel
        self._moments: dict[torch.Tensor, _PagedMoments] = {}
        self._moments_by_key: dict[int, _PagedMoments] = {}
        self._pool: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()  # LRU first
        self._dirty: set[tuple[int, int]] = set()
        self._pool_device: torch.device | None = None
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # ----- configuration -------------------------------------------------------------------------
    @property
    def max_pool_pages(self) -> int | None:
        """How many pages fit in the device budget (None: no limit)."""
        return None if self.device_budget_bytes is None else self.device_budget_bytes // self.page_bytes

    def add_param_group(self, param_group: dict) -> None:
        """Check the group's options and parameters, then allocate host pages for its large states."""
        for name in _ADAMW_FIXED_OPTIONS:
            if name in param_group:
                raise ValueError(f"PagedAdamW has no option {name!r}; it is plain AdamW")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group)
        for p in group["params"]:
            if not (p.is_floating_point()):
                raise TypeError(f"PagedAdamW updates floating-point parameters only; got a parameter of "
                                f"dtype {p.dtype} and shape {tuple(p.shape)}")
            if p.numel() >= self.min_paged_numel:
                self._allocate_pages(p)

    def _allocate_pages(self, p: torch.Tensor) -> None:
        page_numel = self.page_bytes // (2 * p.element_size())
        if page_numel < 1:
            raise ValueError(f"page_bytes={self.page_bytes} cannot hold one element of m and v for a "
                             f"{p.dtype} parameter ({2 * p.element_size()} bytes); use a larger page_bytes")
        if not p.is_contiguous():
            raise ValueError(f"paged parameters must be contiguous; got shape {tuple(p.shape)} with "
                             f"strides {p.stride()}")
        if self._pool_device is None:
            self._pool_device = p.device
        elif p.device != self._pool_device:
            raise ValueError(f"all paged parameters must share one device; got {p.device} and "
                             f"{self._pool_device}")
        n_pages = -(-p.numel() // page_numel)
        pin = p.device.type == "cuda"
        host = torch.zeros((n_pages, 2, page_numel), dtype=p.dtype, device="cpu", pin_memory=pin)
        moments = _PagedMoments(len(self._moments), p.numel(), page_numel, host)
        self._moments[p] = self._moments_by_key[moments.key] = moments

    def is_paged(self, p: torch.Tensor) -> bool:
        """Whether p's moments live in pages (else they stay on the device)."""
        return p in self._moments

    # ----- the page pool --------------------------------------------------------------------------
    @property
    def pool_bytes(self) -> int:
        """Bytes the device page pool holds now."""
        return len(self._pool) * self.page_bytes

    @property
    def resident_state_bytes(self) -> int:
        """Bytes of the unpaged (small) states, which stay on the device."""
        return sum(s[k].numel() * s[k].element_size() for s in self.state.values()
                   for k in ("exp_avg", "exp_avg_sq") if k in s)

    @property
    def device_bytes(self) -> int:
        """All optimizer bytes on the device now: the page pool plus the unpaged states."""
        return self.pool_bytes + self.resident_state_bytes

    def reset_stats(self) -> None:
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        self.stats["peak_device_bytes"] = self.pool_bytes

    def _view(self, buffer: torch.Tensor, moments: _PagedMoments) -> torch.Tensor:
        """A pool buffer (page_bytes of uint8) seen as one page: (2, page_numel) of the state dtype."""
        nbytes = 2 * moments.page_numel * moments.host.element_size()
        return buffer[:nbytes].view(moments.host.dtype).view(2, moments.page_numel)

    def _write_back(self, key: tuple[int, int], buffer: torch.Tensor) -> None:
        if key in self._dirty:
            moments = self._moments_by_key[key[0]]
            start, stop = moments.page_range(key[1])
            n = stop - start
            moments.host[key[1], :, :n].copy_(self._view(buffer, moments)[:, :n], non_blocking=True)
            self.stats["bytes_to_host"] += moments.page_nbytes(key[1])
            self._dirty.discard(key)

    def _page_in(self, moments: _PagedMoments, i: int) -> torch.Tensor:
        """Page i of `moments` on the device, copied in if absent; marks it most recently used."""
        key = (moments.key, i)
        if key in self._pool:
            self._pool.move_to_end(key)
            self.stats["page_hits"] += 1
            return self._view(self._pool[key], moments)
        limit = self.max_pool_pages
        if limit is not None and len(self._pool) >= limit:
            old_key, buffer = self._pool.popitem(last=False)
            self._write_back(old_key, buffer)
            self.stats["evictions"] += 1
        else:
            buffer = torch.empty(self.page_bytes, dtype=torch.uint8, device=self._pool_device)
        self._pool[key] = buffer
        self.stats["peak_device_bytes"] = max(self.stats["peak_device_bytes"], self.pool_bytes)
        start, stop = moments.page_range(i)
        n = stop - start
        page = self._view(buffer, moments)
        page[:, :n].copy_(moments.host[i, :, :n], non_blocking=True)
        self.stats["page_faults"] += 1
        self.stats["bytes_to_device"] += moments.page_nbytes(i)
        return page

    def evict(self, nbytes: int | None = None) -> int:
        """Push least-recently-used pages back to host and free their device memory until at least
        `nbytes` are freed (None: the whole pool). Returns the bytes of device memory freed."""
        freed = 0
        while self._pool and (nbytes is None or freed < nbytes):
            key, buffer = self._pool.popitem(last=False)
            self._write_back(key, buffer)
            self.stats["evictions"] += 1
            freed += self.page_bytes
        if self._pool_device is not None and self._pool_device.type == "cuda":
            torch.cuda.current_stream(self._pool_device).synchronize()
        return freed

    def _flush(self) -> None:
        """Copy every dirty pool page to host, keeping it in the pool, so the host pages are current."""
        for key, buffer in self._pool.items():
            self._write_back(key, buffer)
        if self._pool_device is not None and self._pool_device.type == "cuda":
            torch.cuda.current_stream(self._pool_device).synchronize()

    # ----- the update -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter with a gradient; returns closure()'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    # torch keeps `step` as a CPU float tensor (float64 only if that is the default dtype)
                    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    if p not in self._moments:
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # The same operations, in the same order, as torch.optim.adam._single_tensor_adam.
                state["step"] += 1
                step = state["step"].item()
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                step_size = lr / bias_correction1
                bias_correction2_sqrt = bias_correction2 ** 0.5
                if p in self._moments:
                    moments = self._moments[p]
                    flat_param, flat_grad = p.view(-1), p.grad.reshape(-1)
                    for i in range(moments.n_pages):
                        start, stop = moments.page_range(i)
                        page = self._page_in(moments, i)
                        _adamw_update(flat_param[start:stop], flat_grad[start:stop],
                                      page[0, :stop - start], page[1, :stop - start], lr, beta1, beta2,
                                      eps, weight_decay, step_size, bias_correction2_sqrt)
                        if (moments.key, i) in self._pool:  # evict() may have sent it home already
                            self._dirty.add((moments.key, i))
                else:
                    _adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], lr, beta1, beta2, eps,
                                  weight_decay, step_size, bias_correction2_sqrt)
        return loss

    # ----- checkpoints ----------------------------------------------------------------------------
    def _params_by_index(self) -> dict[int, torch.Tensor]:
        """Parameter index (as in a state_dict) -> parameter, in torch.optim.Optimizer's order."""
        return dict(enumerate(p for group in self.param_groups for p in group["params"]))

    def state_dict(self) -> dict:
        """torch.optim.AdamW's format: per parameter index 'step', 'exp_avg', 'exp_avg_sq'.

        Every tensor is a copy (torch.optim.AdamW hands out its live state instead), so the dict can be
        loaded into another optimizer while this one trains on. Paged moments are gathered from host
        (dirty pool pages are written back first, which counts in bytes_to_host) into CPU tensors of the
        parameter's shape and dtype."""
        self._flush()
        state_dict = super().state_dict()
        state_dict["state"] = {index: {k: v.clone() for k, v in entry.items()}
                               for index, entry in state_dict["state"].items()}
        for index, p in self._params_by_index().items():
            if p in self._moments and index in state_dict["state"]:
                moments = self._moments[p]
                for slot, name in enumerate(("exp_avg", "exp_avg_sq")):
                    flat = moments.host[:, slot, :].reshape(-1)[:moments.numel]
                    state_dict["state"][index][name] = flat.clone().view(p.shape)
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a PagedAdamW or torch.optim.AdamW state_dict; paged moments go straight to host pages."""
        params = self._params_by_index()
        state_dict = {"state": {k: dict(v) for k, v in state_dict["state"].items()},
                      "param_groups": [dict(g) for g in state_dict["param_groups"]]}
        for group in state_dict["param_groups"]:
            for name, value in _ADAMW_FIXED_OPTIONS.items():
                if group.pop(name, value) != value:
                    raise ValueError(f"cannot load a state_dict with {name}={not value}: PagedAdamW "
                                     f"is AdamW with {name}={value}")
            for name in _ADAMW_IMPLEMENTATION_OPTIONS:
                group.pop(name, None)
        paged = {}
        for index, entry in state_dict["state"].items():
            p = params.get(index)
            if p in self._moments:
                paged[index] = (entry.pop("exp_avg"), entry.pop("exp_avg_sq"))
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            _check_hyperparameters(group)
        self._pool.clear()  # pool contents are stale now; the host pages below are the truth
        self._dirty.clear()
        for index, (exp_avg, exp_avg_sq) in paged.items():
            p = params[index]
            moments = self._moments[p]
            if exp_avg.shape != p.shape or exp_avg_sq.shape != p.shape:
                raise ValueError(f"state for parameter {index} has shape {tuple(exp_avg.shape)}, "
                                 f"the parameter {tuple(p.shape)}")
            padded = torch.zeros(2, moments.n_pages * moments.page_numel, dtype=p.dtype)
            padded[0, :moments.numel] = exp_avg.reshape(-1)
            padded[1, :moments.numel] = exp_avg_sq.reshape(-1)
            moments.host.copy_(padded.view(2, moments.n_pages, moments.page_numel).transpose(0, 1))


def _adamw_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step_size,
                  bias_correction2_sqrt) -> None:
    """torch.optim.AdamW's element-wise update, in place, on one tensor or one page's slice."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _check_hyperparameters(group: dict) -> None:
    lr, eps, weight_decay, betas = group["lr"], group["eps"], group["weight_decay"], group["betas"]
    if isinstance(lr, torch.Tensor) or not lr >= 0.0:
        raise ValueError(f"lr must be a float >= 0, got {lr!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")


def plot_page_map(optimizer: PagedAdamW, title: str | None = None):
    """Where every page of a PagedAdamW is now: one row per paged parameter, one cell per page,
    coloured if it sits in the device pool, pale if only on host. Returns a matplotlib Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from .plots import CATEGORY_COLORS

    moments = list(optimizer._moments.values())
    if not moments:
        raise ValueError("this optimizer pages no parameter (all are below min_paged_numel)")
    width = max(m.n_pages for m in moments)
    grid = torch.full((len(moments), width), float("nan"))
    for row, m in enumerate(moments):
        for i in range(m.n_pages):
            grid[row, i] = 1.0 if (m.key, i) in optimizer._pool else 0.0
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.16 * len(moments)))
    ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", vmin=0, vmax=1,
              cmap=ListedColormap(["#e8e8e8", CATEGORY_COLORS["optimizer"]]))
    ax.set_xlabel("page index within the parameter")
    ax.set_ylabel(f"paged parameter ({len(moments)})")
    ax.set_yticks([])
    s = optimizer.stats
    ax.set_title(title or (f"pool {optimizer.pool_bytes / 2**20:.2f} MiB (coloured = on device); "
                           f"faults {s['page_faults']}, hits {s['page_hits']}, evictions {s['evictions']}"),
                 fontsize=9)
    fig.tight_layout()
    return fig
