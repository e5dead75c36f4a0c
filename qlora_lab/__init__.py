"""qlora_lab: QLoRA rebuilt from the ground up, one module per idea.

Names are imported lazily, so `import qlora_lab` is quick and a notebook pays only for what it uses.
"""
import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "pick_device": "device",
    "compute_dtype": "device",
    "start_notebook": "notebook",
    "load_base_model": "model",
    "nf4_codebook": "codebooks",
    "fp4_codebook": "codebooks",
    "int4_codebook": "codebooks",
    "normal_float_codebook": "codebooks",
    "dynamic_codebook": "codebooks",
    "quantize_4bit": "quantize",
    "Quantized4bit": "quantize",
    "LoRALinear": "lora",
    "LoRALinear4bit": "lora",
    "add_lora": "lora",
    "merge_lora": "lora",
    "save_adapter": "adapters",
    "load_adapter": "adapters",
    "estimate_memory": "memory",
    "MemoryStack": "memory",
    "LLAMA_PRESETS": "memory",
    "measure_memory": "measure",
    "PagedAdamW": "paged",
    "FinetuneConfig": "finetune",
    "train": "finetune",
    "load_split": "data",
    "read_jsonl": "data",
    "save_bundle": "bundle",
    "load_bundle": "bundle",
    "perplexity_table": "evaluate",
    "DeviceCeiling": "spike",
    "DeviceOutOfMemoryError": "spike",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qlora_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"qlora_lab.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
