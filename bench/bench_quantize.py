"""Quantize and dequantize time of qlora_lab vs bitsandbytes' CPU kernels on one 4096x4096 float32
matrix, NF4 and FP4 (blocksize 64), median of several runs, printed as ratios (ours / theirs;
below 1 means qlora_lab is faster). Targets: quantize <= 1.0, dequantize <= 1.5.

Run: python bench/bench_quantize.py [--repeats 9] [--threads N]
Timings on a shared machine are noisy; the two libraries are timed interleaved, in one run.
"""
import argparse
import statistics
import time

import bitsandbytes.functional as bnbF
import torch

import qlora_lab as ql


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="runs per measurement (median taken)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(4096, 4096)
    print(f"4096x4096 float32, blocksize 64, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print(f"{'':14}{'qlora_lab ms':>14}{'bnb ms':>10}{'ratio':>8}")
    for quant_type in ("nf4", "fp4"):
        packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        q = ql.quantize_4bit(w, quant_type, 64)
        assert torch.equal(q.packed, packed) and torch.equal(q.dequantize(), bnbF.dequantize_4bit(packed, state))
        rows = {
            "quantize": (lambda: ql.quantize_4bit(w, quant_type, 64),
                         lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type)),
            "dequantize": (q.dequantize, lambda: bnbF.dequantize_4bit(packed, state)),
        }
        for what, (ours, theirs) in rows.items():
            t_theirs = median_seconds(theirs, args.repeats)
            t_ours = median_seconds(ours, args.repeats)
            print(f"{quant_type} {what:<10}{t_ours * 1e3:>14.1f}{t_theirs * 1e3:>10.1f}{t_ours / t_theirs:>8.2f}")


if __name__ == "__main__":
    main()
