"""Checkers for notebook 07 (evaluate and ship)."""
import math

from . import Feedback, not_attempted, wrong_type

# Exercise 1: perplexity of two examples with mean losses 2.0 and 3.0 nats over 10 and 30 tokens.
PPL_LOSSES, PPL_TOKENS = (2.0, 3.0), (10, 30)


def ppl_truth() -> float:
    total = sum(loss * n for loss, n in zip(PPL_LOSSES, PPL_TOKENS))
    return math.exp(total / sum(PPL_TOKENS))


def check_perplexity(answer) -> Feedback:
    """Token-weighted perplexity of the two examples."""
    if answer is None:
        return not_attempted("`answer` (a float: the perplexity)")
    if (wrong := wrong_type(answer, (int, float), "a number")) is not None:
        return wrong
    truth = ppl_truth()
    if math.isclose(answer, truth, rel_tol=1e-6):
        return Feedback(True, f"{truth:.4f}: exp of the mean loss per token, weighting each example by its tokens.")
    if math.isclose(answer, math.exp(sum(PPL_LOSSES) / 2), rel_tol=1e-6):
        return Feedback(False, "That averages the two examples equally; weight each by its token count.")
    if math.isclose(answer, sum(math.exp(x) for x in PPL_LOSSES) / 2, rel_tol=1e-6):
        return Feedback(False, "That averages the perplexities; average the losses first, then take exp.")
    return Feedback(False, f"{answer:.4f} is off by {answer - truth:+.4f}; perplexity = exp(total nats / total tokens).")


# Exercise 2: the size of the shipped adapter file's tensors, r=8 on all seven linear layers of each
# block of the bundled model, stored in float32.
ADAPTER_R, ADAPTER_BYTES_PER_VALUE = 8, 4


def adapter_bytes_truth() -> dict:
    """{"bytes": the adapter's tensor bytes, plus the values of the likely mistakes}."""
    from ..lora import adapter_param_count
    from ..memory import bundled_config, model_shape
    shape = model_shape(bundled_config())
    per_layer = {name: adapter_param_count(i, o, ADAPTER_R) for name, (i, o) in shape.linears().items()}
    values = shape.layers * sum(per_layer.values())
    attention = shape.layers * sum(v for k, v in per_layer.items() if k in ("q_proj", "k_proj", "v_proj", "o_proj"))
    return {"bytes": values * ADAPTER_BYTES_PER_VALUE, "values": values, "fp16": values * 2,
            "one_layer": sum(per_layer.values()) * ADAPTER_BYTES_PER_VALUE,
            "attention_only": attention * ADAPTER_BYTES_PER_VALUE, "layers": shape.layers}


def check_adapter_bytes(answer) -> Feedback:
    """Bytes of the LoRA tensors (A and B of every adapted layer) of the bundled model at r=8, float32."""
    if answer is None:
        return not_attempted("`answer` (an int: bytes)")
    if (wrong := wrong_type(answer, int, "an int number of bytes")) is not None:
        return wrong
    t = adapter_bytes_truth()
    if answer == t["bytes"]:
        return Feedback(True, f"{answer:,} bytes ({answer / 1e6:.2f} MB): r x (in + out) values per layer, 7 layers "
                              f"per block, {t['layers']} blocks, 4 bytes each. The 4-bit base is not in the bundle.")
    mistakes = {"values": "That is the number of values; each float32 value takes 4 bytes.",
                "fp16": "That counts 2 bytes per value; the adapter trains and is saved in float32 (4 bytes).",
                "one_layer": f"That is one block; the model has {t['layers']} of them.",
                "attention_only": "That covers q, k, v and o only; the run adapts the MLP's gate, up and down too."}
    for key, hint in mistakes.items():
        if answer == t[key]:
            return Feedback(False, hint)
    return Feedback(False, f"{answer:,} is off by {answer - t['bytes']:+,} bytes; an adapter on an (in -> out) layer "
                           f"holds A (r x in) and B (out x r).")
