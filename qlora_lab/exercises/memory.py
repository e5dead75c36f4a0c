"""Checkers for notebook 00, the memory wall."""
from ..memory import estimate_memory, model_shape, quantized_4bit_bytes
from . import Feedback, not_attempted, wrong_type

N_7B = model_shape("7b").n_params()


def _close(answer, want, rel=0.01) -> bool:
    return abs(answer - want) <= rel * abs(want)


def check_full_finetune_bytes(answer) -> Feedback:
    """Weights + gradients + AdamW state of full 16-bit fine-tuning of LLaMA-7B, in bytes."""
    if answer is None:
        return not_attempted("`answer` with the bytes of weights + gradients + optimizer state")
    bad = wrong_type(answer, (int, float), "a number of bytes")
    if bad:
        return bad
    s = estimate_memory("7b", method="full", optimizer="adamw", compute_dtype="bfloat16")
    want = s.weights + s.gradients + s.optimizer
    if _close(answer, want):
        return Feedback(True, f"{answer / 1e9:.1f} GB: 2 + 2 + 8 = 12 bytes per parameter for {N_7B / 1e9:.2f}B parameters.")
    per_param = answer / N_7B
    hints = {2: "that is only the 16-bit weights; add gradients and the two AdamW moments",
             4: "weights and gradients only; AdamW keeps two fp32 moments per parameter (8 bytes)",
             8: "AdamW's moments are fp32 here: 4 bytes each, two of them",
             16: "you added an fp32 master copy; this exercise counts 16-bit weights, 16-bit gradients, two fp32 moments"}
    hint = next((h for k, h in hints.items() if abs(per_param - k) < 0.3), "count bytes per parameter: weights, gradients, two moments")
    return Feedback(False, f"{answer / 1e9:.1f} GB is {per_param:.1f} bytes/param; expected {want / 1e9:.1f} GB. Hint: {hint}.")


def check_nf4_bytes(answer) -> Feedback:
    """Bytes bitsandbytes stores for a 4096 x 4096 weight in NF4 with double quantization."""
    if answer is None:
        return not_attempted("`answer` with the bytes of a 4096 x 4096 NF4 + DQ weight")
    bad = wrong_type(answer, (int, float), "a number of bytes")
    if bad:
        return bad
    n = 4096 * 4096
    want = quantized_4bit_bytes(n, double_quant=True)
    if answer == want:
        return Feedback(True, f"{want:,} bytes = {want * 8 / n:.3f} bits per weight.")
    if answer == quantized_4bit_bytes(n, double_quant=False):
        return Feedback(False, f"{answer:,} bytes keeps fp32 absmax constants; with double quantization they are "
                               f"uint8, plus one fp32 per 256 of them and one fp32 offset. Expected {want:,}.")
    if answer == n // 2:
        return Feedback(False, f"{answer:,} bytes counts only the packed codes; add the block constants. Expected {want:,}.")
    return Feedback(False, f"{answer:,} bytes is off by {answer - want:+,} from {want:,}. Count: n/2 packed bytes, "
                           f"one uint8 per 64-block, one fp32 per 256 blocks, one fp32 offset.")
