"""Checkers for notebook 01 (blockwise quantization)."""
import torch

from . import Feedback, not_attempted, wrong_type

# Exercise 1: absmax int8 codes of these values (one scale for all).
INT8_VALUES = [0.1, -0.5, 2.0, 0.3, -1.27]
# Exercise 2: bytes of a 4096 x 4096 matrix in 4 bits, one float32 absmax per 64 values.
BYTES_SHAPE, BYTES_BLOCKSIZE = (4096, 4096), 64
# Exercise 3: these 4-bit codes packed in bitsandbytes' layout.
PACK_CODES = [3, 12, 7, 9]


def int8_truth() -> list[int]:
    x = torch.tensor(INT8_VALUES)
    return torch.round(x * (127 / x.abs().max())).int().tolist()


def check_int8_codes(answer) -> Feedback:
    """The absmax int8 codes of INT8_VALUES, as a list of ints."""
    if answer is None:
        return not_attempted("`answer` (a list of 5 ints: round(x * 127 / absmax))")
    try:
        got = [int(v) for v in answer]
    except (TypeError, ValueError):
        return Feedback(False, f"Give a list of 5 ints, got {answer!r}.")
    truth = int8_truth()
    if got == truth:
        return Feedback(True, f"{truth}: absmax is 2.0, so the scale is 127 / 2.0 = 63.5 and 2.0 -> 127.")
    if len(got) != len(truth):
        return Feedback(False, f"Expected {len(truth)} codes, got {len(got)}.")
    x = torch.tensor(INT8_VALUES)
    if got == torch.round(x * (128 / x.abs().max())).int().tolist():
        return Feedback(False, "You scaled by 128 / absmax; int8 absmax uses 127 so that +absmax and "
                               "-absmax both fit (the range is symmetric, -127 .. 127).")
    if got == torch.trunc(x * (127 / x.abs().max())).int().tolist():
        return Feedback(False, "You truncated; round to the nearest integer instead (e.g. 0.1 * 63.5 = 6.35 -> 6, "
                               "but -0.5 * 63.5 = -31.75 -> -32).")
    i = next(k for k in range(len(truth)) if got[k] != truth[k])
    return Feedback(False, f"Code {i} (x = {INT8_VALUES[i]}) should be {truth[i]}, you have {got[i]} "
                           f"(off by {got[i] - truth[i]:+d}). Scale = 127 / max|x|.")


def bytes_truth() -> int:
    n = BYTES_SHAPE[0] * BYTES_SHAPE[1]
    return n // 2 + 4 * (n // BYTES_BLOCKSIZE)


def check_nbytes(answer) -> Feedback:
    """Bytes of a 4096 x 4096 matrix stored as 4-bit codes plus one float32 absmax per 64 values."""
    if answer is None:
        return not_attempted("`answer` (an int: bytes of codes plus constants)")
    if (wrong := wrong_type(answer, (int, float), "a number of bytes")) is not None:
        return wrong
    n = BYTES_SHAPE[0] * BYTES_SHAPE[1]
    truth = bytes_truth()
    if answer == truth:
        return Feedback(True, f"{truth:,} bytes: {n // 2:,} for the codes (two per byte) and "
                              f"{4 * (n // 64):,} for the constants, 4.5 bits per weight.")
    if answer == n // 2:
        return Feedback(False, f"{answer:,} counts the codes only; add one 4-byte absmax per {BYTES_BLOCKSIZE} values.")
    if answer == n + 4 * (n // 64):
        return Feedback(False, "Each byte holds two 4-bit codes: the codes take n / 2 bytes, not n.")
    if answer == n // 2 + n // 64:
        return Feedback(False, "The constants are float32: 4 bytes each, not 1.")
    if answer == truth * 8:
        return Feedback(False, "That is bits; divide by 8 for bytes.")
    return Feedback(False, f"{answer:,} is off by {answer - truth:+,} bytes. Codes: n / 2 bytes; constants: 4 bytes "
                           f"per block of {BYTES_BLOCKSIZE}.")


def pack_truth() -> list[int]:
    codes = PACK_CODES
    return [(codes[i] << 4) | codes[i + 1] for i in range(0, len(codes), 2)]


def check_packing(answer) -> Feedback:
    """PACK_CODES packed two per byte, even index in the high nibble, as a list of ints."""
    if answer is None:
        return not_attempted("`answer` (a list of byte values, ints 0..255)")
    try:
        got = [int(v) for v in answer]
    except (TypeError, ValueError):
        return Feedback(False, f"Give a list of ints, got {answer!r}.")
    truth = pack_truth()
    if got == truth:
        return Feedback(True, f"{[hex(b) for b in truth]}: 3 and 12 share byte 0 (0x3C), 7 and 9 byte 1 (0x79).")
    swapped = [((b & 15) << 4) | (b >> 4) for b in truth]
    if got == swapped:
        return Feedback(False, "The nibbles are swapped: the even-index code goes in the HIGH nibble (code << 4).")
    if got == [PACK_CODES[i] * 10 + PACK_CODES[i + 1] for i in range(0, len(PACK_CODES), 2)]:
        return Feedback(False, "Shift, don't write digits side by side: a nibble is 4 bits, so the high code is worth x16.")
    if len(got) != len(truth):
        return Feedback(False, f"{len(PACK_CODES)} codes need {len(truth)} bytes (two per byte).")
    return Feedback(False, f"Expected {len(truth)} bytes; byte 0 should be (3 << 4) | 12. You have {got}.")
