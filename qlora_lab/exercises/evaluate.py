"""Checkers for notebook 07 (evaluate and ship)."""
import math

from . import Feedback, not_attempted

# Exercise 1: perplexity of two examples with mean losses 2.0 and 3.0 nats over 10 and 30 tokens.
PPL_LOSSES, PPL_TOKENS = (2.0, 3.0), (10, 30)


def ppl_truth() -> float:
    total = sum(loss * n for loss, n in zip(PPL_LOSSES, PPL_TOKENS))
    return math.exp(total / sum(PPL_TOKENS))


def check_perplexity(answer) -> Feedback:
    """Token-weighted perplexity of the two examples."""
    if answer is None:
        return not_attempted("`answer` (a float: the perplexity)")
    if not isinstance(answer, (int, float)) or isinstance(answer, bool):
        return Feedback(False, f"Give a number, got {answer!r}.")
    truth = ppl_truth()
    if math.isclose(answer, truth, rel_tol=1e-6):
        return Feedback(True, f"{truth:.4f}: exp of the mean loss per token, weighting each example by its tokens.")
    if math.isclose(answer, math.exp(sum(PPL_LOSSES) / 2), rel_tol=1e-6):
        return Feedback(False, "That averages the two examples equally; weight each by its token count.")
    if math.isclose(answer, sum(math.exp(x) for x in PPL_LOSSES) / 2, rel_tol=1e-6):
        return Feedback(False, "That averages the perplexities; average the losses first, then take exp.")
    return Feedback(False, f"{answer:.4f} is off by {answer - truth:+.4f}; perplexity = exp(total nats / total tokens).")
