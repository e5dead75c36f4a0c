"""Checkers for notebook 02 (the NF4 codebook)."""
import torch

from . import Feedback, not_attempted, wrong_type
from ..codebooks import NF4_OFFSET, nf4_codebook

# Exercise 2: the NF4 code of this value (in units of its block's absmax).
CODE_OF = 0.5


def check_positive_half(answer) -> Feedback:
    """The 8 positive NF4 values in increasing order, built from normal quantiles."""
    if answer is None:
        return not_attempted("`answer` (a tensor or list of the 8 positive NF4 values, increasing)")
    try:
        got = torch.as_tensor(answer, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        return Feedback(False, f"Give 8 numbers, got {answer!r}.")
    truth = nf4_codebook()[8:].double()
    if got.numel() != 8:
        return Feedback(False, f"The positive half has 8 values, you gave {got.numel()}.")
    if torch.allclose(got, truth, atol=1e-6):
        return Feedback(True, "The 8 positive values match bitsandbytes' table to 1e-6.")
    if torch.allclose(got.flip(0), truth, atol=1e-6):
        return Feedback(False, "Right values, reversed order: sort them increasing.")
    top = float(torch.special.ndtri(torch.tensor(NF4_OFFSET, dtype=torch.float64)))
    if torch.allclose(got / got.max(), truth, atol=1e-4) and abs(float(got.max()) - 1) > 1e-3:
        return Feedback(False, f"Not normalised: divide by the largest quantile ({top:.4f}) so the top value is 1.")
    i = int((got - truth).abs().argmax())
    return Feedback(False, f"Value {i} is {float(got[i]):.6f}, expected {float(truth[i]):.6f} "
                           f"(off by {float(got[i] - truth[i]):+.2e}). Use probabilities linspace(offset, 0.5, 9)[:-1].")


def code_truth() -> int:
    code = nf4_codebook()
    bounds = (code[:-1] + code[1:]) / 2
    return int(torch.bucketize(torch.tensor([CODE_OF]), bounds))


def check_code_of(answer) -> Feedback:
    """The 4-bit NF4 code (0..15) that CODE_OF maps to."""
    if answer is None:
        return not_attempted("`answer` (an int 0..15: the NF4 code of 0.5)")
    if (wrong := wrong_type(answer, int, "an int 0..15")) is not None:
        return wrong
    code = nf4_codebook()
    truth = code_truth()
    mid = float((code[truth] + code[truth + 1]) / 2)
    if answer == truth:
        return Feedback(True, f"Code {truth} ({float(code[truth]):.4f}): 0.5 is just below the threshold {mid:.4f} "
                              f"between {float(code[truth]):.4f} and {float(code[truth + 1]):.4f}.")
    if answer == truth + 1:
        return Feedback(False, f"Code {answer} ({float(code[answer]):.4f}) is the next value up; the threshold "
                               f"between the two is their midpoint {mid:.4f}, and 0.5 is below it.")
    return Feedback(False, f"Code {answer} stands for {float(code[answer]) if 0 <= answer < 16 else 'nothing'}; "
                           "find the value nearest 0.5 in nf4_codebook().")
