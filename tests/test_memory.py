"""The estimator: the paper's claims, bitsandbytes' storage, config handling, bad input."""
import json

import pytest
import torch

from qlora_lab.memory import (CATEGORIES, GPU_BUDGETS, LLAMA_PRESETS, MemoryStack, estimate_memory, model_shape,
                              quantized_4bit_bytes)

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, head_dim=64)


def test_paper_65b_full_finetune_exceeds_780_gb():
    s = estimate_memory("65b", method="full", optimizer="adamw", gradient_checkpointing=False, seq_len=512)
    assert s.total > 780e9
    assert s.weights + s.gradients + s.optimizer > 780e9  # even before activations


def test_paper_65b_qlora_fits_48_gb():
    s = estimate_memory("65b", method="qlora", batch_size=1, seq_len=512, r=64, optimizer="paged_adamw_32bit",
                        gradient_checkpointing=True, double_quant=True)
    assert s.total < 48e9
    assert 0 < s.pageable <= s.optimizer and s.device_total == s.total - s.pageable
    assert s.fits(GPU_BUDGETS["48 GB"]) and not s.fits(GPU_BUDGETS["24 GB"])


def test_categories_and_total():
    s = estimate_memory("7b")
    assert set(s.as_dict()) == set(CATEGORIES)
    assert s.total == sum(s[c] for c in CATEGORIES)
    with pytest.raises(KeyError, match="categories"):
        s["bogus"]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(576, 1536), (192, 576), (100, 37)])
def test_quantized_bytes_equal_bitsandbytes_storage(shape, double_quant):
    import bitsandbytes.functional as F

    w = torch.randn(shape)
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=double_quant)
    stored = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if double_quant:
        stored += state.state2.absmax.numel() * 4 + state.offset.numel() * 4
    assert quantized_4bit_bytes(w.numel(), double_quant) == stored


def test_quantized_bytes_equal_qlora_lab_storage():
    from qlora_lab.quantize import quantize_4bit

    w = torch.randn(1536, 576)
    for dq in (False, True):
        assert quantized_4bit_bytes(w.numel(), dq) == quantize_4bit(w, double_quant=dq).nbytes


def test_parameter_count_matches_transformers_with_tied_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    small = {**SMOL, "num_hidden_layers": 2, "vocab_size": 1000}
    for tied in (True, False):
        cfg = LlamaConfig(**{**small, "tie_word_embeddings": tied})
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        unique = {id(p): p.numel() for p in model.parameters()}
        assert model_shape(cfg).n_params() == sum(unique.values())
    assert abs(model_shape(SMOL).n_params() - 134.5e6) < 0.1e6


def test_7b_preset_parameter_count():
    assert abs(model_shape("7b").n_params() - 6.74e9) < 0.01e9
    assert abs(model_shape("65b").n_params() - 65.3e9) < 0.1e9
    assert set(LLAMA_PRESETS) == {"7b", "13b", "33b", "65b"}


def test_config_json_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMOL))
    assert estimate_memory(path).total == estimate_memory(SMOL).total == estimate_memory(str(tmp_path)).total


def test_missing_field_is_named():
    broken = {k: v for k, v in SMOL.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match="intermediate_size"):
        estimate_memory(broken)


@pytest.mark.parametrize("kwargs, word", [
    ({"method": "prefix"}, "method"), ({"optimizer": "sgd"}, "optimizer"), ({"seq_len": -1}, "seq_len"),
    ({"batch_size": 0}, "batch_size"), ({"r": 2.5}, "r"), ({"compute_dtype": "int8"}, "compute_dtype"),
    ({"target_modules": ["qkv"]}, "target_modules"), ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
])
def test_bad_input_names_the_argument(kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        estimate_memory("7b", **kwargs)


def test_unknown_preset_or_path():
    with pytest.raises(ValueError, match="preset"):
        estimate_memory("70b")


def test_method_ordering_and_levers():
    full = estimate_memory("7b", method="full", optimizer="adamw")
    lora = estimate_memory("7b", method="lora", optimizer="adamw")
    qlora = estimate_memory("7b", method="qlora", optimizer="adamw")
    assert full.total > lora.total > qlora.total
    assert qlora.weights < lora.weights / 3
    no_ckpt = estimate_memory("7b", gradient_checkpointing=False)
    assert no_ckpt.activations > 10 * estimate_memory("7b").activations
    assert estimate_memory("7b", optimizer="adamw_8bit").optimizer < estimate_memory("7b", optimizer="adamw").optimizer / 3
    assert estimate_memory("7b", double_quant=False).weights > estimate_memory("7b").weights
    assert estimate_memory("7b", optimizer="adamw").pageable == 0


def test_memory_stack_table():
    s = MemoryStack(weights=2e9, optimizer=1e9, pageable=1e9, label="x")
    text = s.table("GB")
    assert "weights" in text and "on device" in text and "3.000 GB" in text
    with pytest.raises(ValueError, match="unit"):
        s.table("TB")


def test_plots_return_figures():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlora_lab.plots import CATEGORY_COLORS, memory_stack_bar

    fig = memory_stack_bar([estimate_memory("7b", method=m) for m in ("full", "lora", "qlora")])
    colors = {tuple(round(c, 3) for c in p.get_facecolor()[:3]) for p in fig.axes[0].patches if p.get_facecolor()[3] > 0}
    wanted = {tuple(round(c, 3) for c in matplotlib.colors.to_rgb(v)) for v in CATEGORY_COLORS.values()}
    assert wanted <= colors
    plt.close(fig)


def test_planner_plan():
    from qlora_lab.planner import describe, plan

    stack, fits = plan("65b", "qlora", 512, 1, 64, True, "paged_adamw_32bit")
    assert "48 GB" in fits and "T4 16 GB" not in fits
    assert "fits on" in describe(stack, fits)
    with pytest.raises(ValueError, match="model"):
        plan("3b")
