"""Plots of the course. Each function returns a matplotlib Figure; each memory category keeps one
colour in every plot."""

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
