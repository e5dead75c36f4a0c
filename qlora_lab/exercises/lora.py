"""Checkers for notebook 04 (the 4-bit LoRA layer)."""
import torch

from . import Feedback, not_attempted, wrong_type

# Exercise 1: trainable parameters of one adapter on SmolLM2's up_proj (in 576, out 1536).
PARAMS_IN, PARAMS_OUT, PARAMS_R = 576, 1536, 8

# Exercise 2: the merged weight.
MERGE_SHAPE, MERGE_R, MERGE_ALPHA = (12, 20), 4, 16  # (out, in)

# Exercise 3: bytes of the same up_proj weight stored as NF4 with double quantization.
BYTES_SHAPE = (PARAMS_OUT, PARAMS_IN)


def check_adapter_params(answer) -> Feedback:
    """How many trainable parameters does a rank-8 adapter add to a 576 -> 1536 Linear?"""
    if answer is None:
        return not_attempted("`answer` (an int: the number of trainable parameters)")
    if (wrong := wrong_type(answer, int, "a whole number of parameters")) is not None:
        return wrong
    r, i, o = PARAMS_R, PARAMS_IN, PARAMS_OUT
    truth = r * (i + o)
    if answer == truth:
        return Feedback(True, f"{truth:,}: A is {r} x {i} and B is {o} x {r}, {truth / (i * o):.2%} of the "
                              f"{i * o:,} weights of the frozen layer.")
    if answer == i * o:
        return Feedback(False, f"{answer:,} is the full weight matrix, which stays frozen. Count A (r x in) and "
                               f"B (out x r) only.")
    if answer in (r * i, r * o):
        which = "A (r x in)" if answer == r * i else "B (out x r)"
        return Feedback(False, f"{answer:,} counts only {which}; the adapter has both A and B.")
    if answer == r * i * o:
        return Feedback(False, f"{answer:,} multiplies all three numbers; A and B are two separate matrices, "
                               f"so their sizes add: r x in + out x r.")
    return Feedback(False, f"{answer:,} is off by {answer - truth:+,}. Trainable parameters = r x in + out x r.")


def merge_truth(w, a, b, alpha, r):
    return w + (alpha / r) * (b @ a)


def check_merge(answer) -> Feedback:
    """`answer(w, a, b, alpha, r)` must return the merged weight W + (alpha / r) B A."""
    if answer is None:
        return not_attempted("`answer` (a function merge(w, a, b, alpha, r) returning the merged weight)")
    if not callable(answer):
        return Feedback(False, f"`answer` must be a function, got {type(answer).__name__}.")
    g = torch.Generator().manual_seed(4)
    out_f, in_f = MERGE_SHAPE
    w = torch.randn(out_f, in_f, generator=g)
    a = torch.randn(MERGE_R, in_f, generator=g)
    b = torch.randn(out_f, MERGE_R, generator=g)
    try:
        got = answer(w.clone(), a.clone(), b.clone(), MERGE_ALPHA, MERGE_R)
    except Exception as err:  # show the learner's error instead of failing the cell
        return Feedback(False, f"Your function raised {type(err).__name__}: {err}. Shapes: W {tuple(w.shape)}, "
                               f"A {tuple(a.shape)}, B {tuple(b.shape)}; which product gives W's shape?")
    if not isinstance(got, torch.Tensor) or got.shape != w.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return Feedback(False, f"The merged weight must have W's shape {tuple(w.shape)}, got {shape}.")
    truth = merge_truth(w, a, b, MERGE_ALPHA, MERGE_R)
    if torch.allclose(got, truth, rtol=1e-5, atol=1e-5):
        return Feedback(True, "W + (alpha / r) B A: one matrix, so the merged layer costs nothing extra at inference.")
    for scale, hint in ((1.0, "the scale alpha / r is missing"), (MERGE_R / MERGE_ALPHA, "the scale is r / alpha, "
                        "upside down"), (MERGE_ALPHA, "the scale is alpha, not alpha / r")):
        if torch.allclose(got, w + scale * (b @ a), rtol=1e-5, atol=1e-5):
            return Feedback(False, f"Close: {hint}.")
    if torch.allclose(got, (MERGE_ALPHA / MERGE_R) * (b @ a), rtol=1e-5, atol=1e-5):
        return Feedback(False, "That is only the adapter's update; add the frozen W to it.")
    err = (got - truth).abs().max().item()
    return Feedback(False, f"Off by up to {err:.3g}. The merged weight is W + (alpha / r) * (B @ A).")


def weight_bytes_truth() -> int:
    from ..quantize import quantize_4bit

    return quantize_4bit(torch.zeros(BYTES_SHAPE) + 1.0, quant_type="nf4", double_quant=True).nbytes


def check_nf4_dq_bytes(answer) -> Feedback:
    """Bytes stored for a 1536 x 576 weight in NF4 with double quantization (blocks of 64, then 256)."""
    if answer is None:
        return not_attempted("`answer` (an int: bytes of codes and constants)")
    if (wrong := wrong_type(answer, int, "a whole number of bytes")) is not None:
        return wrong
    truth = weight_bytes_truth()
    n = BYTES_SHAPE[0] * BYTES_SHAPE[1]
    codes, blocks = n // 2, n // 64
    second = -(-blocks // 256)
    if answer == truth:
        return Feedback(True, f"{truth:,} bytes = {codes:,} (two 4-bit codes per byte) + {blocks:,} (one 8-bit "
                              f"constant per block of 64) + {second} x 4 (one float32 per 256 constants) + 4 "
                              f"(the offset): {truth * 8 / n:.3f} bits per weight.")
    if answer == codes + blocks * 4:
        return Feedback(False, f"{answer:,} is NF4 without double quantization (float32 constants). With DQ "
                               f"each block's constant is 1 byte, plus the second-level constants.")
    if answer == codes:
        return Feedback(False, f"{answer:,} counts only the 4-bit codes; the per-block constants are stored too.")
    if answer in (n, n * 4):
        return Feedback(False, f"{answer:,}: two 4-bit codes fit in one byte, so the codes take n / 2 bytes.")
    if answer in (codes + blocks, codes + blocks + second * 4):
        return Feedback(False, f"{answer:,} is close: count every stored piece, the 8-bit constants, the float32 "
                               f"constant per 256 of them, and the float32 offset (the mean subtracted).")
    return Feedback(False, f"{answer:,} is off by {answer - truth:+,}. Add codes (n / 2), 8-bit constants "
                           f"(n / 64), second-level float32 constants and the offset.")
