"""save_adapter / load_adapter in PEFT's format, both directions, on a tiny random Llama."""
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import qlora_lab as ql
from qlora_lab.lora import lora_layers


def tiny_llama(hidden=64, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
    return LlamaForCausalLM(cfg).eval()


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


IDS = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))


def test_save_writes_peft_files_and_round_trips(tmp_path):
    model = ql.add_lora(tiny_llama(), r=4, alpha=8, quantize="nf4")
    randomize_lora(model)
    ql.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert "base_model_name_or_path" in config
    assert "qlora_lab" not in config  # PEFT's file holds PEFT's fields only
    fp = json.loads((tmp_path / "qlora_lab_base.json").read_text())["fingerprint"]
    assert fp["hidden_size"] == 64 and fp["num_hidden_layers"] == 2 and fp["target_shapes"]["down_proj"] == [64, 128]
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 7 * 2

    fresh = ql.load_adapter(tiny_llama(), tmp_path, quantize="nf4")
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)


def test_peft_loads_what_qlora_lab_saved(tmp_path):
    model = ql.add_lora(tiny_llama(), r=4, alpha=8, quantize=None)
    randomize_lora(model)
    ql.save_adapter(model, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    unexpected = [str(w.message) for w in caught if "Unexpected keyword" in str(w.message)]
    assert all("['qlora_lab']" in m for m in unexpected), unexpected  # only our fingerprint key is skipped
    torch.testing.assert_close(peft_model(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tiny_llama()(IDS).logits, model(IDS).logits)  # the adapter does something


def test_qlora_lab_loads_what_peft_saved(tmp_path):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"]))
    randomize_lora(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    model = ql.load_adapter(tiny_llama(), tmp_path, quantize=None)
    assert len(lora_layers(model)) == 4
    assert all(m.r == 4 and m.scaling == 4.0 for m in lora_layers(model).values())
    torch.testing.assert_close(model(IDS).logits, peft_model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_adapter_for_another_base_model_is_a_clear_error(tmp_path):
    model = ql.add_lora(tiny_llama(hidden=64), r=4, alpha=8, quantize=None)
    ql.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="another base model.*hidden_size: adapter 64 vs model 32"):
        ql.load_adapter(tiny_llama(hidden=32), tmp_path)
    with pytest.raises(ValueError, match="num_hidden_layers: adapter 2 vs model 3"):
        ql.load_adapter(tiny_llama(layers=3), tmp_path)


def test_mismatched_shapes_are_a_clear_error(tmp_path):
    ql.save_adapter(ql.add_lora(tiny_llama(), r=4, alpha=8, quantize=None), tmp_path / "r4")
    other_rank = ql.add_lora(tiny_llama(), r=8, alpha=8, quantize=None)
    with pytest.raises(ValueError, match="other shapes.*adapter \\(4, 64\\) vs model \\(8, 64\\)"):
        ql.load_adapter(other_rank, tmp_path / "r4")
    # a PEFT adapter carries no fingerprint: the tensor shapes still catch another base model
    peft_model = get_peft_model(tiny_llama(hidden=32), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="other shapes"):
        ql.load_adapter(tiny_llama(hidden=64), tmp_path / "peft", quantize=None)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ql.load_adapter(tiny_llama(), tmp_path)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_rslora"):
        ql.load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="no LoRA layers"):
        ql.save_adapter(tiny_llama(), tmp_path / "x")
