"""Estimate vs measured memory stack of the bundled SmolLM2-135M: full / lora / qlora x seq 128 / 512
x gradient checkpointing off / on, one warm training step each, float32 on the CPU (AdamW).

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_memory.py [--seq 128 512] [--methods full lora qlora]
Prints every category's estimate, measurement and ratio (estimate / measured)."""
import argparse
import time

import torch

from qlora_lab.measure import measure_memory
from qlora_lab.memory import CATEGORIES, estimate_memory
from qlora_lab.model import load_base_model

R = 8


def measured_and_estimated(method: str, seq_len: int, checkpointing: bool, r: int = R):
    """(measured MemoryStack, estimated MemoryStack, seconds) of one configuration, batch 1."""
    from qlora_lab.lora import add_lora

    model, _ = load_base_model()
    if method != "full":
        add_lora(model, r=r, alpha=2 * r, quantize="nf4" if method == "qlora" else None, double_quant=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    measured, _ = measure_memory(model, {"input_ids": ids, "labels": ids}, optimizer=optimizer,
                                 gradient_checkpointing=checkpointing)
    seconds = time.perf_counter() - start
    estimated = estimate_memory(model.config, method=method, batch_size=1, seq_len=seq_len, r=r,
                                optimizer="adamw", gradient_checkpointing=checkpointing,
                                compute_dtype="float32", double_quant=True)
    return measured, estimated, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--methods", nargs="+", default=["full", "lora", "qlora"])
    args = parser.parse_args()
    print(f"{'config':<26}" + "".join(f"{c:>22}" for c in CATEGORIES + ("total",)))
    print(f"{'':<26}" + "".join(f"{'est/meas MB (ratio)':>22}" for _ in CATEGORIES + ("total",)))
    for method in args.methods:
        for seq_len in args.seq:
            for checkpointing in (False, True):
                m, e, seconds = measured_and_estimated(method, seq_len, checkpointing)
                cells = []
                for c in CATEGORIES + ("total",):
                    mv, ev = (m.total, e.total) if c == "total" else (m[c], e[c])
                    ratio = f"{ev / mv:.2f}" if mv else "-"
                    cells.append(f"{ev / 1e6:.1f}/{mv / 1e6:.1f} ({ratio})")
                name = f"{method} s={seq_len} ckpt={'on' if checkpointing else 'off'}"
                print(f"{name:<26}" + "".join(f"{x:>22}" for x in cells) + f"   [{seconds:.0f} s, peak {m.peak / 1e6:.0f} MB]",
                      flush=True)


if __name__ == "__main__":
    main()
