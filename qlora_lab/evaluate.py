"""Quantization quality of the bundled model: perplexity under fp32, Int4, FP4, NF4 and NF4 + DQ.

Each 4-bit variant rounds every Linear weight of the decoder blocks (what QLoRA quantizes; the
embeddings, tied to the output head, stay float32) through qlora_lab.quantize_4bit at blocksize 64
and back, then runs the model in float32. The text is local: the held-out split of the bundled
task, each example as its full chat (system, question, answer), loss over every token after the
first. Note the bundled weights came from a Q4_1 GGUF file, so "fp32" here already sits on a
4-bit grid; every variant re-quantizes that grid.
"""
import math

import torch

from . import data

VARIANTS = {"fp32": None, "Int4": ("int4", False), "FP4": ("fp4", False), "NF4": ("nf4", False),
            "NF4+DQ": ("nf4", True)}
PAPER_TABLE2 = {"Int4": 34.34, "FP4": 31.07, "NF4+DQ": 27.41}  # mean PPL, QLoRA Table 2 (FP4 = E2M1)


def block_linears(model) -> dict[str, torch.nn.Linear]:
    """Every Linear of the decoder blocks (what QLoRA quantizes), keyed "<block>.<module name>"."""
    layers = model.model.layers
    return {f"{i}.{n}": m for i, layer in enumerate(layers) for n, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def example_losses(model, tokenizer, examples: list[dict], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token loss in nats, number of predicted tokens) of each example's full chat text,
    both shape (n,), float64. Examples run in right-padded batches; padding carries no loss."""
    if not examples:
        raise ValueError("example_losses needs at least one example")
    device = next(model.parameters()).device
    losses, counts = [], []
    for start in range(0, len(examples), batch_size):
        batch = data.collate(tokenizer, examples[start:start + batch_size])  # its labels mask the prompt: unused
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        keep = mask[:, 1:].to(nll.dtype)
        counts.append(keep.sum(1).double().cpu())
        losses.append(((nll * keep).sum(1).double() / keep.sum(1).double()).cpu())
    return torch.cat(losses), torch.cat(counts)


def _perplexity(losses: torch.Tensor, counts: torch.Tensor) -> float:
    return math.exp(float((losses * counts).sum() / counts.sum()))


def perplexity(model, tokenizer, examples: list[dict]) -> float:
    """exp(total loss / total predicted tokens) of the examples' full chat texts."""
    return _perplexity(*example_losses(model, tokenizer, examples))


@torch.no_grad()
def perplexity_table(model, tokenizer, examples: list[dict], variants=tuple(VARIANTS)) -> dict:
    """{variant: {"ppl": perplexity, "losses": per-example mean loss (nats)}} for the given variants
    of VARIANTS. The model's weights are restored afterwards."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants must be among {list(VARIANTS)}, got {unknown}")
    from .quantize import quantize_4bit

    linears = block_linears(model)
    original = {k: m.weight.detach().clone() for k, m in linears.items()}
    table = {}
    try:
        for name in variants:
            spec = VARIANTS[name]
            for k, m in linears.items():
                w = original[k]
                if spec is not None:
                    w = quantize_4bit(w, quant_type=spec[0], blocksize=64, double_quant=spec[1]).dequantize()
                m.weight.copy_(w.to(m.weight.dtype))
            losses, counts = example_losses(model, tokenizer, examples)
            table[name] = {"ppl": _perplexity(losses, counts), "losses": losses}
    finally:
        for k, m in linears.items():
            m.weight.copy_(original[k])
    return table


def loss_changes(table: dict, variant: str, examples: list[dict], k: int = 5) -> list[dict]:
    """The k examples whose loss `variant` raises most over fp32: prompt, fp32 loss, change (nats)."""
    delta = table[variant]["losses"] - table["fp32"]["losses"]
    order = torch.argsort(delta, descending=True)[:k]
    return [{"prompt": examples[i]["prompt"], "fp32_loss": float(table["fp32"]["losses"][i]),
             "change": float(delta[i])} for i in order.tolist()]


def plot_loss_changes(table: dict, variant: str = "NF4+DQ"):
    """Histogram of the per-example loss change (variant minus fp32, nats); returns a Figure."""
    import matplotlib.pyplot as plt
    delta = (table[variant]["losses"] - table["fp32"]["losses"]).numpy()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(delta, bins=30, color="tab:blue", alpha=0.8)
    ax.axvline(0, color="black", lw=1)
    ax.set_xlabel(f"loss change per example, {variant} - fp32 (nats)")
    ax.set_ylabel("examples")
    fig.tight_layout()
    return fig
