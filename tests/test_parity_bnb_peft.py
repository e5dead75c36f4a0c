"""qlora_lab's QLoRA model against the real stack: transformers + bitsandbytes 4-bit + PEFT LoRA."""
import pytest
import torch
from torch import nn

import qlora_lab as ql
from qlora_lab.lora import bnb_peft_model, compare_with_reference, copy_adapters_to_peft, lora_layers
from qlora_lab.model import converted_model_dir


def randomize_b(model, seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_one_layer_matches_bnb_linear4bit_with_peft_lora():
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lin = nn.Linear(576, 1536, bias=False)
    ours = nn.Sequential(ql.LoRALinear4bit.from_linear(lin, r=8, alpha=16, quant_type="nf4", double_quant=True))
    base = bnb.nn.Linear4bit(576, 1536, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                             quant_type="nf4")
    base.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                    quant_type="nf4")
    base = base.to("cpu")  # quantizes on the move, as transformers does
    ref = get_peft_model(nn.Sequential(base), LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    randomize_b(ours)
    with torch.no_grad():
        ref.base_model.model[0].lora_A.default.weight.copy_(ours[0].lora_A.weight)
        ref.base_model.model[0].lora_B.default.weight.copy_(ours[0].lora_B.weight)
    assert torch.equal(base.weight.data.view(-1), ours[0].weight_4bit.packed.view(-1))
    x = torch.randn(2, 5, 576)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), ref(xb)
    assert (ya - yb).abs().max() <= 1e-5
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[0].lora_A.weight.grad, ref.base_model.model[0].lora_A.default.weight.grad,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_smollm2_nf4_dq_matches_bitsandbytes_and_peft():
    model, tok = ql.load_base_model()
    ql.add_lora(model, r=16, alpha=32, target_modules="all-linear", quantize="nf4", double_quant=True)
    randomize_b(model)
    ref = bnb_peft_model(converted_model_dir(), r=16, alpha=32, quant_type="nf4", double_quant=True)
    copy_adapters_to_peft(model, ref)
    ours_layers = lora_layers(model)
    assert len(ours_layers) == 30 * 7
    q = ref.base_model.model.model.layers[3].mlp.down_proj.base_layer.weight
    assert torch.equal(q.data.view(-1), ours_layers["model.layers.3.mlp.down_proj"].weight_4bit.packed.view(-1))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    result = compare_with_reference(model, ref, ids)
    assert result["n_grads"] == 2 * 30 * 7
    assert result["max_abs_logits"] <= 1e-4, result
    assert result["max_rel_grad"] <= 1e-4, result


def test_reference_keeps_bitsandbytes_on_its_float32_path():
    """bitsandbytes' AVX512-BF16 CPU shortcut (eval mode) would repack the reference's weights and compute in bf16."""
    ref = bnb_peft_model(converted_model_dir(), r=4, alpha=8, num_hidden_layers=1).eval()
    with torch.no_grad():
        ref(torch.tensor([[1, 2, 3]]))
    layer = ref.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert not layer.support_avx512bf16_for_cpu
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
