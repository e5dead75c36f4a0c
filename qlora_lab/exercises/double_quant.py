"""Checkers for notebook 03 (double quantization)."""
from . import Feedback, not_attempted, wrong_type

# Exercise 1: bits per parameter at first-level block 128, second-level block 256.
BPP_BLOCKSIZE, BPP_BLOCKSIZE2 = 128, 256
# Exercise 2: gigabytes (1e9 bytes) DQ saves on a 33B-parameter model at blocksize 64.
SAVE_PARAMS = 33e9


def bpp_truth() -> float:
    return 4 + 8 / BPP_BLOCKSIZE + 32 / (BPP_BLOCKSIZE * BPP_BLOCKSIZE2)


def check_bits_per_param(answer) -> Feedback:
    """Bits per parameter of NF4 + DQ with blocksize 128 and 256 (no per-tensor offset)."""
    if answer is None:
        return not_attempted("`answer` (a float: bits per parameter)")
    if (wrong := wrong_type(answer, (int, float), "a number")) is not None:
        return wrong
    truth = bpp_truth()
    if abs(answer - truth) < 1e-4:
        return Feedback(True, f"{truth:.4f}: 4 for the code, 8/128 for the 8-bit constants, 32/(128*256) for the "
                              "second level.")
    if abs(answer - (4 + 32 / BPP_BLOCKSIZE)) < 1e-4:
        return Feedback(False, "That is without double quantization (float32 constants). With DQ each constant is 8 bits.")
    if abs(answer - (8 / BPP_BLOCKSIZE + 32 / (BPP_BLOCKSIZE * BPP_BLOCKSIZE2))) < 1e-4:
        return Feedback(False, "That is the constants only; add the 4 bits of the code itself.")
    if abs(answer - (4 + 8 / BPP_BLOCKSIZE + 32 / BPP_BLOCKSIZE2)) < 1e-4:
        return Feedback(False, "A second-level constant covers 256 first-level constants, i.e. 128 * 256 weights: "
                               "32 / (128 * 256), not 32 / 256.")
    return Feedback(False, f"{answer:.4f} is off by {answer - truth:+.4f}. Sum: 4 + 8/b1 + 32/(b1*b2).")


def saving_truth() -> float:
    saved_bits = 32 / 64 - (8 / 64 + 32 / (64 * 256))
    return SAVE_PARAMS * saved_bits / 8 / 1e9


def check_saving_gb(answer) -> Feedback:
    """Gigabytes (1e9 bytes) double quantization saves on a 33B model at blocksize 64."""
    if answer is None:
        return not_attempted("`answer` (a float: GB saved, 1 GB = 1e9 bytes)")
    if (wrong := wrong_type(answer, (int, float), "a number of GB")) is not None:
        return wrong
    truth = saving_truth()
    if abs(answer - truth) / truth < 0.01:
        return Feedback(True, f"{truth:.2f} GB: 0.373 bits x 33e9 parameters / 8 bits per byte.")
    if abs(answer - truth * 8) / (truth * 8) < 0.01:
        return Feedback(False, "That is gigabits; divide by 8 for gigabytes.")
    if abs(answer - truth * 1e9 / 2**30) / truth < 0.01:
        return Feedback(False, "That is GiB (2**30 bytes); the exercise asks for GB = 1e9 bytes.")
    if abs(answer - SAVE_PARAMS * 0.5 / 8 / 1e9) / truth < 0.02:
        return Feedback(False, "That is all the float32 constants (0.5 bits); DQ still keeps 0.127 bits of them.")
    return Feedback(False, f"{answer:.3f} GB is off by {answer - truth:+.3f}. Saved bits/param = 0.5 - 0.127.")
