"""Ship a fine-tune: a folder that holds everything needed to rebuild the model and reproduce it.

bundle/
  adapter/                  the LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)
  quantization_config.json  how the base was quantized for training (NF4, double quant, blocksize)
  tokenizer/                the tokenizer files
  run_config.json           the FinetuneConfig of the run
  reference_outputs.json    greedy answers to the first held-out prompts, made at save time

load_bundle() rebuilds base + adapter with qlora_lab's own layers; check_reproduction() regenerates
the reference outputs and compares them token for token. The bundle is written into a temporary folder
and renamed into place; an existing bundle is not replaced unless overwrite=True.
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch

from . import data
from .atomic import write_dir_atomically

QUANT_FILE = "quantization_config.json"
REFERENCE_FILE = "reference_outputs.json"
N_REFERENCE = 8


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_bundle(model, tokenizer, config, path, overwrite: bool = False, n_reference: int = N_REFERENCE) -> Path:
    """Write the bundle folder `path` for a trained model of either backend; returns the folder."""
    from .adapters import save_adapter

    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"bundle folder {final} exists; pass overwrite=True to replace it")

    def write(tmp: Path):
        if _is_peft(model):
            model.save_pretrained(tmp / "adapter")
        else:
            save_adapter(model, tmp / "adapter")
        quant = {"quant_type": "nf4" if config.quantize else None, "double_quant": bool(config.double_quant),
                 "blocksize": 64,
                 "compute_dtype": str(next(iter(model.parameters())).dtype).removeprefix("torch."),
                 "trained_with": config.backend}
        (tmp / QUANT_FILE).write_text(json.dumps(quant, indent=1))
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "run_config.json").write_text(json.dumps(asdict(config), indent=1))
        examples = data.load_split("heldout")[:n_reference]
        answers = data.generate_answers(model, tokenizer, examples)
        (tmp / REFERENCE_FILE).write_text(json.dumps(
            [{"prompt": e["prompt"], "output": a} for e, a in zip(examples, answers)], indent=1))

    return write_dir_atomically(final, write)


def load_bundle(path, quantize: bool = True, device: str | torch.device = "cpu"):
    """(model, tokenizer) rebuilt from the bundle: the bundled base model (its first
    run_config["num_layers"] blocks if the run used fewer) with the adapter on top, quantized as the
    bundle says (quantize=False: the adapter on the full-precision base instead)."""
    from transformers import AutoTokenizer

    from .adapters import load_adapter
    from .model import load_pretrained

    folder = Path(path)
    for needed in ("adapter", QUANT_FILE, "tokenizer", "run_config.json"):
        if not (folder / needed).exists():
            raise FileNotFoundError(f"{folder} is not a complete bundle: {needed} is missing")
    quant = json.loads((folder / QUANT_FILE).read_text())
    run = json.loads((folder / "run_config.json").read_text())
    model = load_pretrained(run.get("num_layers"), dtype=torch.float32)
    load_adapter(model, folder / "adapter", quantize=quant["quant_type"] if quantize else None,
                 double_quant=quant["double_quant"])
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True, trust_remote_code=False)
    model.to(device).eval()
    return model, tokenizer


def check_reproduction(path, model=None, tokenizer=None) -> dict:
    """Regenerate the bundle's reference outputs (greedy) and compare.
    Returns {"n", "n_equal", "mismatches": [(prompt, saved, now)]}."""
    folder = Path(path)
    if model is None:
        model, tokenizer = load_bundle(folder)
    saved = json.loads((folder / REFERENCE_FILE).read_text())
    now = data.generate_answers(model, tokenizer, [{"prompt": s["prompt"], "answer": s["output"]} for s in saved])
    mismatches = [(s["prompt"], s["output"], a) for s, a in zip(saved, now) if s["output"] != a]
    return {"n": len(saved), "n_equal": len(saved) - len(mismatches), "mismatches": mismatches}


@torch.no_grad()
def merge_comparison(path, examples: list[dict], merge_dtype: torch.dtype = torch.bfloat16) -> dict:
    """The deployment question: serve the 4-bit base + adapter as trained, or merge the adapter into
    16-bit weights? Compares, on `examples`, the quantized-base model (as trained) with
      - "merged_quantized": the adapter merged into the dequantized 4-bit base, in merge_dtype;
      - "merged_original": the adapter merged into the original full-precision base, in merge_dtype.
    Returns per variant the max |logit difference| over answer-prompt positions, the fraction of
    greedy answers that equal the quantized-base model's, and its exact-match score (percent)."""
    from .lora import merge_lora

    reference, tokenizer = load_bundle(path, quantize=True)
    batch = data.collate(tokenizer, examples)
    ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref_answers = data.generate_answers(reference, tokenizer, examples)
    results = {"quantized": {"score": data.score(ref_answers, examples)}}
    variants = {"merged_quantized": merge_lora(reference, dtype=merge_dtype),
                "merged_original": merge_lora(load_bundle(path, quantize=False)[0], dtype=merge_dtype)}
    mask = batch["attention_mask"].bool()
    for name, model in variants.items():
        model.to(merge_dtype)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        answers = data.generate_answers(model, tokenizer, examples)
        results[name] = {
            "max_abs_logit_diff": float((logits - ref_logits)[mask].abs().max()),
            "same_answers": sum(a == b for a, b in zip(answers, ref_answers)) / len(examples),
            "score": data.score(answers, examples),
        }
    return results
