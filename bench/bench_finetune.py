"""Training throughput and peak memory of the fine-tune: qlora_lab backend vs bnb + PEFT, and vs a
full-precision (fp32 on the CPU, the compute dtype on CUDA) LoRA run of the same model.

Each run goes in its own process, so peak memory (CUDA max allocated, or the CPU's peak RSS) is
its own. Prints tokens per second (after one warm-up step) and the ratios.
    python bench/bench_finetune.py [--steps 8] [--num-layers N]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time

RUNS = ("qlora_lab", "bnb", "lora_fp")


def one(kind: str, steps: int, num_layers, batch_size: int) -> dict:
    from qlora_lab import finetune as ft
    config = ft.FinetuneConfig(backend="bnb" if kind == "bnb" else "qlora_lab", steps=steps, batch_size=batch_size,
                               num_layers=num_layers, save_every=steps, quantize=kind != "lora_fp")
    model = ft.build_model(config)
    times = []
    t = [time.perf_counter()]

    def tick(step, record):
        now = time.perf_counter()
        times.append((now - t[0], record["tokens"]))
        t[0] = now

    result = ft.train(config, tempfile.mkdtemp() + "/run", model=model, callback=tick, progress=False)
    timed = times[1:]  # the first step warms up
    seconds = sum(s for s, _ in timed)
    return {"kind": kind, "tokens_per_s": sum(n for _, n in timed) / seconds,
            "peak_bytes": result["log"][-1]["memory_bytes"], "final_loss": result["log"][-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--one", choices=RUNS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.num_layers, args.batch_size)))
        return
    rows = {}
    for kind in RUNS:
        cmd = [sys.executable, __file__, "--one", kind, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        if args.num_layers:
            cmd += ["--num-layers", str(args.num_layers)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'run':<10} {'tokens/s':>10} {'peak MiB':>10} {'final loss':>11}")
    for kind, r in rows.items():
        print(f"{kind:<10} {r['tokens_per_s']:>10.1f} {r['peak_bytes'] / 2**20:>10.1f} {r['final_loss']:>11.4f}")
    q, b, f = rows["qlora_lab"], rows["bnb"], rows["lora_fp"]
    print(f"qlora_lab / bnb+PEFT: throughput {q['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
          f"peak memory {q['peak_bytes'] / b['peak_bytes']:.2f}x (target: within 1.1x)")
    print(f"qlora_lab / full-precision LoRA: throughput {q['tokens_per_s'] / f['tokens_per_s']:.2f}x, "
          f"peak memory {q['peak_bytes'] / f['peak_bytes']:.2f}x")


if __name__ == "__main__":
    main()
