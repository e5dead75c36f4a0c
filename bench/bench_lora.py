"""Forward + backward of one QLoRA layer: qlora_lab's LoRALinear4bit against bitsandbytes'
Linear4bit with PEFT's LoRA on top, measured in the same run, printed as ratios (qlora_lab / bnb).

Shapes: SmolLM2-135M's (576x576, 576x1536, 1536x576) and a 7B-sized 4096x4096; batch 4 x 128 tokens,
NF4 with double quantization, r=16, fp32 compute on a CPU (the compute dtype of qlora_lab.device on a
GPU). The input requires a gradient, as in any layer but the first.

Time: median over repeats, the two layers interleaved. Peak memory: the most bytes allocated above
the starting point during one forward + backward (CUDA: torch.cuda.max_memory_allocated; CPU: the
running sum of the allocations the torch profiler records). Target: time ratio <= 1.1, memory <= 1.0.

Run: python bench/bench_lora.py [--repeats N] [--shapes 576x576,4096x4096]
"""
import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import qlora_lab as ql

SHAPES = ((576, 576), (576, 1536), (1536, 576), (4096, 4096))  # (in_features, out_features)


def make_layers(in_features: int, out_features: int, r: int, device, dtype):
    """The same Linear as qlora_lab's LoRALinear4bit and as bnb Linear4bit + PEFT LoRA."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    lin = nn.Linear(in_features, out_features, bias=False)
    ours = nn.Sequential(ql.LoRALinear4bit.from_linear(lin, r=r, alpha=2 * r, quant_type="nf4", double_quant=True,
                                                       compute_dtype=dtype)).to(device)
    base = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype,
                             compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                    quant_type="nf4")
    ref = get_peft_model(nn.Sequential(base.to(device)), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    with torch.no_grad():
        ref.base_model.model[0].lora_A.default.weight.copy_(ours[0].lora_A.weight)
    return ours, ref


def clear(layer, x):
    layer.zero_grad(set_to_none=True)
    x.grad = None


def step(layer, x):
    layer(x).sum().backward()


def seconds(layer, x) -> float:
    clear(layer, x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(layer, x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_bytes(layer, x) -> int:
    """Most bytes allocated above the start during one forward + backward (gradients cleared
    before the start, so both layers start from the same state)."""
    clear(layer, x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(layer, x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(layer, x)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per layer (median reported)")
    parser.add_argument("--shapes", default=",".join(f"{i}x{o}" for i, o in SHAPES),
                        help="comma-separated in_features x out_features")
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    device = ql.pick_device()
    dtype = ql.compute_dtype(device)
    warnings.filterwarnings("ignore")
    print(f"LoRALinear4bit vs bnb Linear4bit + PEFT LoRA: NF4+DQ, r={args.r}, batch 4 x 128 tokens, "
          f"{device.type}, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'in x out':>11} | {'qlora_lab ms':>12} {'bnb+peft ms':>12} {'time ratio':>10} | "
          f"{'qlora_lab MiB':>13} {'bnb+peft MiB':>12} {'mem ratio':>9}")
    for in_f, out_f in shapes:
        torch.manual_seed(0)
        ours, ref = make_layers(in_f, out_f, args.r, device, dtype)
        x = torch.randn(4, 128, in_f, device=device, dtype=dtype, requires_grad=True)
        for layer in (ours, ref):  # warm up
            clear(layer, x)
            step(layer, x)
        times = {"ours": [], "ref": []}
        for _ in range(args.repeats):
            times["ours"].append(seconds(ours, x))
            times["ref"].append(seconds(ref, x))
        t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["ref"])
        m_ours, m_ref = peak_bytes(ours, x), peak_bytes(ref, x)
        print(f"{in_f:>5}x{out_f:<5} | {t_ours * 1e3:12.2f} {t_ref * 1e3:12.2f} {t_ours / t_ref:10.2f} | "
              f"{m_ours / 2**20:13.2f} {m_ref / 2**20:12.2f} {m_ours / m_ref:9.2f}")


if __name__ == "__main__":
    main()
