"""Plots of the course. Each function returns a matplotlib Figure; each memory category keeps one
colour in every plot."""

from matplotlib.ticker import LogFormatter

# The memory stack's categories, bottom of a stacked bar first, each with its colour.
CATEGORY_COLORS = {
    "weights": "#4C72B0",
    "adapters": "#DD8452",
    "gradients": "#C44E52",
    "optimizer": "#8172B3",
    "activations": "#55A868",
    "temporaries": "#937860",
}


# --- quantization plots (notebooks 01-03) ---------------------------------------------------------

def plot_blockwise_error(x, bits: int = 4, blocksize: int = 64, show: int = 256):
    """Notebook 01: the first `show` values of x against their absmax reconstruction with one scale
    for the whole tensor and with one scale per block, and the RMS error of both."""
    import matplotlib.pyplot as plt

    from .quantize import absmax_dequantize, absmax_quantize

    whole = absmax_dequantize(*absmax_quantize(x, bits), bits)
    block = absmax_dequantize(*absmax_quantize(x, bits, blocksize), bits, blocksize)
    rms = {"one scale": float((whole - x).pow(2).mean().sqrt()),
           f"blocks of {blocksize}": float((block - x).pow(2).mean().sqrt())}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    i = range(min(show, x.numel()))
    left.plot(i, x.reshape(-1)[: len(i)], ".", ms=3, color="black", label="original")
    left.plot(i, whole.reshape(-1)[: len(i)], "-", lw=1, label="one scale for the tensor")
    left.plot(i, block.reshape(-1)[: len(i)], "-", lw=1, label=f"one scale per {blocksize} values")
    left.set(xlabel="index", ylabel="value", title=f"{bits}-bit absmax quantization")
    left.legend(fontsize=8)
    right.bar(list(rms), list(rms.values()), color=["#C44E52", "#4C72B0"])
    right.set(ylabel="RMS error", title="error")
    right.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def plot_error_vs_blocksize(blocksizes, errors: dict):
    """Notebook 01: RMS error against block size, one line per label in `errors` (label -> list)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in errors.items():
        ax.plot(blocksizes, values, "o-", label=label)
    ax.set(xscale="log", xlabel="block size (values per absmax)", ylabel="RMS error",
           title="smaller blocks, smaller error")
    ax.set_xticks(blocksizes, [str(b) for b in blocksizes])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_codebook_on_density(code, title: str = "NF4 on the normal density"):
    """Notebook 02: the code values drawn on the standard normal density, scaled so the largest
    value sits at the quantile it came from."""
    import matplotlib.pyplot as plt
    import torch

    from .codebooks import NF4_OFFSET

    scale = float(torch.special.ndtri(torch.tensor(NF4_OFFSET, dtype=torch.float64)))
    grid = torch.linspace(-3.5, 3.5, 400)
    density = torch.exp(-grid**2 / 2) / (2 * torch.pi) ** 0.5
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(grid, density, color="black", lw=1)
    for v in (code.sort().values * scale).tolist():
        ax.axvline(v, color="#4C72B0", lw=1, alpha=0.8)
    ax.set(xlabel=f"value (code x {scale:.3f}, the quantile at the offset)", ylabel="density", title=title)
    fig.tight_layout()
    return fig


def plot_error_histograms(errors: dict, title: str):
    """Notebook 02: histograms of absolute quantization error, one per label (label -> tensor)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    top = max(float(e.abs().max()) for e in errors.values())
    for label, e in errors.items():
        e = e.abs().reshape(-1).float()
        ax.hist(e.numpy(), bins=60, range=(0, top), histtype="step", lw=1.5,
                label=f"{label}: mean {float(e.mean()):.2e}")
    ax.set(yscale="log", xlabel="|error|", ylabel="count", title=title)
    # Plain tick labels (1, 10, 100): the default 10^k labels go through mathtext, whose parser
    # failed inside a widget callback in the browser test.
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_bits_per_param(rows: dict):
    """Notebook 03: stacked bars of bits per parameter (label -> dict part -> bits)."""
    import matplotlib.pyplot as plt

    colors = {"4-bit codes": "#4C72B0", "constants": "#DD8452", "second-level constants": "#C44E52"}
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = list(rows)
    bottom = [0.0] * len(labels)
    for part, color in colors.items():
        values = [rows[label].get(part, 0.0) for label in labels]
        ax.barh(labels, values, left=bottom, color=color, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    for y, total in enumerate(bottom):
        ax.text(total + 0.02, y, f"{total:.3f}", va="center", fontsize=9)
    ax.set(xlabel="bits per parameter", xlim=(0, max(bottom) * 1.15), title="what a 4-bit weight costs")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


# --- memory plots (qlora_lab.memory, qlora_lab.measure) ---------------------------------------------

def memory_stack_bar(stacks, budgets=None, unit: str = "GB", title: str = "Memory stack of one training step"):
    """A stacked bar per MemoryStack (list, or dict label -> stack), with horizontal budget lines
    (default: qlora_lab.memory.GPU_BUDGETS). Paged optimizer state is hatched. Returns the Figure."""
    import matplotlib.pyplot as plt

    from .memory import CATEGORIES, GPU_BUDGETS

    scale = {"GB": 2**30, "MB": 2**20}.get(unit)
    if scale is None:
        raise ValueError(f"unit must be 'GB' or 'MB', got {unit!r}")
    items = list(stacks.items()) if isinstance(stacks, dict) else [(s.label, s) for s in stacks]
    if not items:
        raise ValueError("stacks must hold at least one MemoryStack")
    budgets = GPU_BUDGETS if budgets is None else budgets
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(items) + 2.5), 4.2))
    xs = range(len(items))
    bottoms = [0.0] * len(items)
    for cat in CATEGORIES:
        heights = [s[cat] / scale for _, s in items]
        ax.bar(xs, heights, bottom=bottoms, color=CATEGORY_COLORS[cat], label=cat, width=0.6)
        if cat == "optimizer":
            paged = [s.pageable / scale for _, s in items]
            ax.bar(xs, paged, bottom=bottoms, color="none", hatch="//", edgecolor="white", width=0.6,
                   label="pageable to host" if any(paged) else None)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    top = max(bottoms)
    for name, limit in budgets.items():
        value = limit / scale
        if value <= 1.6 * top:
            ax.axhline(value, color="0.3", linestyle="--", linewidth=0.8)
            ax.text(len(items) - 0.45, value, f" {name}", va="bottom", ha="right", fontsize=8, color="0.2")
    ax.set_xticks(list(xs), [label for label, _ in items], fontsize=8)
    ax.set_ylabel(f"memory ({'GiB' if unit == 'GB' else 'MiB'})")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def memory_timeline(timeline, unit: str = "MB", title: str = "Live memory during one training step"):
    """A stacked area of live bytes after each op of one step (qlora_lab.measure.Timeline): the
    baseline (weights, adapters, optimizer state), activations, gradients and temporaries, with the
    forward / backward / optimizer phases shaded. Returns the Figure."""
    import matplotlib.pyplot as plt

    scale = {"GB": 2**30, "MB": 2**20}.get(unit)
    if scale is None:
        raise ValueError(f"unit must be 'GB' or 'MB', got {unit!r}")
    n = len(timeline.phase)
    if n == 0:
        raise ValueError("the timeline is empty")
    fig, ax = plt.subplots(figsize=(8, 3.6))
    series = [[v / scale for v in timeline.baseline], [v / scale for v in timeline.activations],
              [v / scale for v in timeline.gradients], [v / scale for v in timeline.temporaries]]
    ax.stackplot(range(n), *series, colors=[CATEGORY_COLORS["weights"], CATEGORY_COLORS["activations"],
                                            CATEGORY_COLORS["gradients"], CATEGORY_COLORS["temporaries"]],
                 labels=["weights + adapters + optimizer", "activations", "gradients", "temporaries"])
    start = 0
    for i in range(1, n + 1):
        if i == n or timeline.phase[i] != timeline.phase[start]:
            ax.axvspan(start, i, color="0.9" if len(set(timeline.phase[:start + 1])) % 2 else "0.97", zorder=-1)
            ax.text((start + i) / 2, 0.98, timeline.phase[start], transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=8)
            start = i
    ax.set_xlabel("op index")
    ax.set_ylabel(f"live memory ({'MiB' if unit == 'MB' else 'GiB'})")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig
