"""Save and load LoRA adapters in PEFT's format, so PEFT loads what qlora_lab saves and back.

A folder holds three files:
- adapter_config.json: PEFT's LoraConfig fields only (peft_type "LORA", r, lora_alpha,
  lora_dropout, target_modules, ...) and base_model_name_or_path, so PEFT reads it as its own.
- adapter_model.safetensors: the A and B matrices under PEFT's key names,
  "base_model.model.<module name>.lora_A.weight" and "....lora_B.weight".
- qlora_lab_base.json: a fingerprint of the base model (model type, sizes, and the shape of each
  targeted layer) and how it was quantized, so that loading the adapter onto another base model
  fails with a clear message. PEFT does not read it; an adapter saved by PEFT has none.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .lora import LoRALinear4bit, add_lora, find_target_modules, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BASE_NAME = "qlora_lab_base.json"
PEFT_PREFIX = "base_model.model."
FINGERPRINT_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "vocab_size")


def base_fingerprint(model) -> dict:
    """What identifies a base model's architecture and sizes: the config fields in
    FINGERPRINT_FIELDS that it has, and "target_shapes": {module name suffix: [out, in]} of its
    LoRA layers (one entry per suffix, as every block of a decoder has the same shapes)."""
    config = getattr(model, "config", None)
    fp = {}
    for field in FINGERPRINT_FIELDS:
        value = getattr(config, field, None)
        if value is not None:
            fp[field] = value
    shapes = {}
    for name, layer in lora_layers(model).items():
        shapes.setdefault(name.split(".")[-1], [layer.out_features, layer.in_features])
    fp["target_shapes"] = shapes
    return fp


def save_adapter(model, path) -> Path:
    """Write `model`'s LoRA adapters to the folder `path` in PEFT's format; returns the folder."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save (add_lora puts them on)")
    settings = {(layer.r, layer.alpha, layer.dropout_p) for layer in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"all LoRA layers must share r, alpha and dropout to be saved as one adapter, got {settings}")
    (r, alpha, dropout), = settings
    quantized = [m for m in layers.values() if isinstance(m, LoRALinear4bit)]
    config = getattr(model, "config", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    base = {
        "fingerprint": base_fingerprint(model),
        "quantize": quantized[0].weight_4bit.quant_type if quantized else None,
        "double_quant": quantized[0].weight_4bit.double_quant if quantized else False,
    }
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
    (folder / BASE_NAME).write_text(json.dumps(base, indent=2) + "\n")
    return folder


def read_adapter_config(path) -> dict:
    """The adapter_config.json of the folder `path`, checked to be a LoRA adapter qlora_lab can load."""
    folder = Path(path)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"only LoRA adapters can be loaded; {config_file} has peft_type {config.get('peft_type')!r}")
    unsupported = {
        "use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
    }
    for key, plain in unsupported.items():
        if config.get(key, plain) not in (plain, None, {}, False):
            raise ValueError(f"{config_file}: {key}={config[key]!r} is not supported by qlora_lab "
                             f"(plain LoRA needs {key}={plain!r})")
    return config


def load_adapter(model, path, quantize: str | None = "nf4", double_quant: bool = True):
    """Load the adapter in the folder `path` (saved by save_adapter or by PEFT) into `model`, in
    place, and return the model.

    A model without LoRA layers gets them first with add_lora(r, lora_alpha, lora_dropout and
    target_modules from the adapter's config; `quantize` and `double_quant` for the base). A model
    that has them must match the adapter's layers and ranks. An adapter saved for another base
    model (its fingerprint differs) or with tensors of other shapes is a ValueError."""
    folder = Path(path)
    config = read_adapter_config(folder)
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
    base_file = folder / BASE_NAME
    if base_file.is_file():
        _check_fingerprint(model, json.loads(base_file.read_text())["fingerprint"], folder)
    if not lora_layers(model):
        targets = config["target_modules"]
        find_target_modules(model, targets)  # a clear error if the adapter targets layers this model lacks
        add_lora(model, r=config["r"], alpha=config["lora_alpha"], target_modules=targets, quantize=quantize,
                 double_quant=double_quant, dropout=config.get("lora_dropout") or 0.0)
    layers = lora_layers(model)
    tensors = load_file(str(weights_file))
    expected = {}
    for name, layer in layers.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"adapter {folder} does not fit this model's LoRA layers: "
                         f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    bad = [f"{k}: adapter {tuple(tensors[k].shape)} vs model {tuple(p.shape)}"
           for k, p in expected.items() if tensors[k].shape != p.shape]
    if bad:
        raise ValueError(f"adapter {folder} has tensors of other shapes than this model's LoRA layers "
                         f"(another base model or another r?): {bad[:3]}")
    for name, layer in layers.items():
        if layer.alpha != config["lora_alpha"]:
            raise ValueError(f"layer {name} has alpha={layer.alpha}, the adapter lora_alpha={config['lora_alpha']}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
    return model


def _check_fingerprint(model, saved: dict, folder: Path) -> None:
    here = base_fingerprint(model)
    diffs = [f"{k}: adapter {saved[k]!r} vs model {here[k]!r}"
             for k in FINGERPRINT_FIELDS if k in saved and k in here and saved[k] != here[k]]
    shapes = here["target_shapes"]
    if not shapes:  # no LoRA layers yet: compare with the Linear layers the adapter would target
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                shapes.setdefault(name.split(".")[-1], [m.out_features, m.in_features])
    for suffix, shape in saved.get("target_shapes", {}).items():
        mine = shapes.get(suffix)
        if mine is not None and list(mine) != list(shape):
            diffs.append(f"{suffix} shape: adapter {shape} vs model {mine}")
    if diffs:
        raise ValueError(f"adapter {folder} was saved for another base model; differences: {'; '.join(diffs)}")
