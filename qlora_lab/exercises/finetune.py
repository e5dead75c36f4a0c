"""Checkers for notebook 06 (the QLoRA fine-tune)."""
from . import Feedback, not_attempted, wrong_type

# Exercise 1: the answer-only loss mask. A sequence of 10 tokens whose first 7 are the chat prompt.
MASK_PROMPT_LEN, MASK_SEQ_LEN, IGNORE = 7, 10, -100
MASK_IDS = [11, 12, 13, 14, 15, 16, 17, 21, 22, 2]

# Exercise 2: the learning rate of step index 2 (0-based) with lr 1e-3 and 5 warmup steps.
WARMUP_LR, WARMUP_STEPS, WARMUP_STEP = 1e-3, 5, 2


def mask_truth() -> list[int]:
    return [IGNORE] * MASK_PROMPT_LEN + MASK_IDS[MASK_PROMPT_LEN:]


def check_loss_mask(answer) -> Feedback:
    """The labels of MASK_IDS when the first MASK_PROMPT_LEN tokens are the prompt."""
    if answer is None:
        return not_attempted("`answer` (a list of 10 labels)")
    answer = list(answer)
    truth = mask_truth()
    if answer == truth:
        return Feedback(True, "Right: -100 on the 7 prompt tokens, the answer tokens (end-of-turn included) kept.")
    if len(answer) != len(truth):
        return Feedback(False, f"Give one label per token: {len(truth)} labels, got {len(answer)}.")
    if answer == MASK_IDS:
        return Feedback(False, "Nothing is masked: the loss would also train the model to write the prompt.")
    if answer == [IGNORE if i >= MASK_PROMPT_LEN else t for i, t in enumerate(MASK_IDS)]:
        return Feedback(False, "Inverted: the prompt must be -100 and the answer kept, not the other way round.")
    wrong = [i for i, (a, t) in enumerate(zip(answer, truth)) if a != t]
    return Feedback(False, f"Labels at positions {wrong} are off; positions 0-{MASK_PROMPT_LEN - 1} get -100, "
                           f"the rest keep their token ids.")


def check_warmup_lr(answer) -> Feedback:
    """finetune.lr_at for WARMUP_STEP with WARMUP_LR and WARMUP_STEPS."""
    from ..finetune import FinetuneConfig, lr_at
    if answer is None:
        return not_attempted("`answer` (a float: the learning rate)")
    truth = lr_at(FinetuneConfig(lr=WARMUP_LR, warmup_steps=WARMUP_STEPS), WARMUP_STEP)
    if (wrong := wrong_type(answer, (int, float), "a number")) is not None:
        return wrong
    if abs(answer - truth) <= 1e-12:
        return Feedback(True, f"{truth:.6g}: the rate climbs by lr/(warmup+1) per step, then stays at lr.")
    if abs(answer - WARMUP_LR * WARMUP_STEP / WARMUP_STEPS) <= 1e-12:
        return Feedback(False, f"{answer:.6g} counts steps from 0 and divides by warmup_steps; lr_at uses "
                               f"(step + 1) / (warmup_steps + 1), so step 0 already gets a small rate.")
    return Feedback(False, f"{answer:.6g} is off by {answer - truth:+.3g}; read lr_at in qlora_lab/finetune.py.")
