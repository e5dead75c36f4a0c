"""Draw the README's key figures into docs/figures/ with the package's own functions.

    .venv/bin/python scripts/make_figures.py            # rewrites docs/figures/*.png
    .venv/bin/python scripts/make_figures.py --out DIR

Figures (each from the course package, so a change there shows up here on the next run):
- memory_wall_65b.png: the memory stack of one training step of LLaMA-65B, full fine-tuning vs LoRA
  vs QLoRA (qlora_lab.estimate_memory, qlora_lab.plots.memory_stack_bar).
- qlora_7b_to_65b.png: the QLoRA stack for 7B, 13B, 33B and 65B against common GPU sizes.
- nf4_codebook.png: the 16 NF4 values on the normal density (qlora_lab.nf4_codebook,
  qlora_lab.plots.plot_codebook_on_density), and NF4, FP4 and Int4 side by side.
- bits_per_param.png: what one 4-bit weight costs with and without double quantization, measured on
  a real quantized tensor (qlora_lab.quantize_4bit).

PNG metadata carries no software version, so a rerun with unchanged code rewrites identical files.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import qlora_lab as ql  # noqa: E402
from qlora_lab import plots  # noqa: E402
from qlora_lab.memory import GPU_BUDGETS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "figures"
SIZES = ("7b", "13b", "33b", "65b")
# One step, batch 1, 512 tokens, gradient checkpointing, bf16, the paper's r=64 on every linear layer.
STEP = dict(batch_size=1, seq_len=512, gradient_checkpointing=True, compute_dtype="bfloat16")
METHODS = {"full": dict(method="full", optimizer="adamw"),
           "LoRA": dict(method="lora", r=64, optimizer="adamw"),
           "QLoRA": dict(method="qlora", r=64, optimizer="paged_adamw_32bit", double_quant=True)}


def memory_wall_65b():
    stacks = {f"65B {name}": ql.estimate_memory(ql.LLAMA_PRESETS["65b"], **STEP, **kw) for name, kw in METHODS.items()}
    # Only the paper's target (one 48 GB GPU) and the largest common GPU, so the labels stay readable.
    budgets = {name: GPU_BUDGETS[name] for name in ("48 GB", "80 GB")}
    return plots.memory_stack_bar(stacks, budgets=budgets, title="LLaMA-65B, one training step (batch 1, 512 tokens)")


def qlora_7b_to_65b():
    stacks = {f"{size.upper()} QLoRA": ql.estimate_memory(ql.LLAMA_PRESETS[size], **STEP, **METHODS["QLoRA"])
              for size in SIZES}
    return plots.memory_stack_bar(stacks, title="QLoRA (NF4 + double quant, r=64, paged AdamW) by model size")


def nf4_codebook():
    fig = plots.plot_codebook_on_density(ql.nf4_codebook(), title="NF4: 16 values at the normal's quantiles")
    return fig


def three_codes():
    codes = {"NF4": ql.nf4_codebook(), "FP4 (bitsandbytes)": ql.fp4_codebook(), "Int4": ql.int4_codebook()}
    fig, ax = plt.subplots(figsize=(7, 2.4))
    for row, (name, code) in enumerate(codes.items()):
        values = code.float().sort().values
        ax.scatter(values, [row] * len(values), s=28, color="#4C72B0", zorder=3)
        ax.hlines(row, -1, 1, color="0.85", lw=1, zorder=1)
    ax.set_yticks(range(len(codes)), list(codes))
    ax.set(xlim=(-1.08, 1.08), ylim=(-0.6, len(codes) - 0.4), xlabel="code value (times the block's absmax)",
           title="three 4-bit codes: NF4 is dense near zero, where most weights are")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def bits_per_param():
    weight = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0))
    plain = ql.quantize_4bit(weight, quant_type="nf4", blocksize=64, double_quant=False)
    dq = ql.quantize_4bit(weight, quant_type="nf4", blocksize=64, double_quant=True)
    rows = {"NF4, fp32 absmax per 64": {"4-bit codes": 4.0, "constants": plain.bits_per_param - 4.0},
            "NF4 + double quant": {"4-bit codes": 4.0, "constants": 8 / 64,
                                   "second-level constants": dq.bits_per_param - 4.0 - 8 / 64}}
    return plots.plot_bits_per_param(rows)


FIGURES = {"memory_wall_65b.png": memory_wall_65b, "qlora_7b_to_65b.png": qlora_7b_to_65b,
           "nf4_codebook.png": nf4_codebook, "three_codes.png": three_codes, "bits_per_param.png": bits_per_param}


def make_figures(out: Path = DEFAULT_OUT) -> list[Path]:
    """Draw every figure into out; return the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in FIGURES.items():
        fig = draw()
        fig.savefig(out / name, dpi=110, metadata={"Software": None})
        plt.close(fig)
        written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNG files")
    args = parser.parse_args(argv)
    for path in make_figures(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
