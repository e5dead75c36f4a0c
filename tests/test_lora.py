"""LoRALinear, LoRALinear4bit, add_lora and merge_lora on small layers and a tiny random Llama."""
import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import qlora_lab as ql
from qlora_lab.lora import Dequantize4bitLinear, count_parameters, find_target_modules, lora_layers, weight_bytes


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def randomize_b(model_or_layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in [model_or_layer, *model_or_layer.modules()]:
        if isinstance(m, (ql.LoRALinear, ql.LoRALinear4bit)):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_fresh_adapter_is_a_no_op_and_init_matches_peft():
    torch.manual_seed(0)
    lin = nn.Linear(48, 32)
    layer = ql.LoRALinear(lin, r=8, alpha=16)
    x = torch.randn(5, 48)
    assert torch.equal(layer(x), lin(x))
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt(5)) on fan_in 48
    a = layer.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


@pytest.mark.parametrize("kwargs, word", [
    (dict(r=0), "r"), (dict(r=-2), "r"), (dict(r=2.0), "r"), (dict(alpha=0), "alpha"), (dict(alpha=-1), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
])
def test_bad_hyperparameters_are_errors(kwargs, word):
    lin = nn.Linear(8, 8)
    for cls in (ql.LoRALinear, ql.LoRALinear4bit):
        with pytest.raises(ValueError, match=word):
            cls.from_linear(lin, **{"r": 4, "alpha": 8, **kwargs})


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="linear"):
        ql.LoRALinear4bit.from_linear(nn.Conv1d(4, 4, 1))


def test_lora_output_is_base_plus_scaled_low_rank():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    layer = ql.LoRALinear(lin, r=4, alpha=12)
    randomize_b(layer)
    x = torch.randn(3, 40)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer(x), lin(x) + 3.0 * (x @ a.T @ b.T), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_layer_uses_the_dequantized_weight(quant_type, double_quant):
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True)
    layer = ql.LoRALinear4bit.from_linear(lin, r=4, alpha=8, quant_type=quant_type, double_quant=double_quant)
    randomize_b(layer)
    q = ql.quantize_4bit(lin.weight, quant_type=quant_type, double_quant=double_quant)
    assert torch.equal(layer.weight_4bit.packed, q.packed)
    x = torch.randn(2, 3, 128)
    expected = x @ q.dequantize().T + lin.bias + layer.adapter_delta(x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # the base is frozen and not a parameter: only A and B train
    assert {n for n, p in layer.named_parameters()} == {"lora_A.weight", "lora_B.weight"}


def test_gradcheck_float64_input_and_adapters():
    torch.manual_seed(0)
    lin = nn.Linear(24, 12)
    layer = ql.LoRALinear4bit.from_linear(lin, r=3, alpha=6, compute_dtype=torch.float64).double()
    randomize_b(layer)
    assert layer.weight_4bit.absmax.dtype == torch.uint8  # .double() left the 4-bit weight alone
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)

    def f(x, a, b):
        base = Dequantize4bitLinear.apply(x, layer.weight_4bit, layer.bias.double())
        return base + layer.scaling * (x @ a.T @ b.T)

    assert torch.autograd.gradcheck(f, (x, a, b))
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


def test_gradient_reaches_input_and_adapters_not_base():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    layer = ql.LoRALinear4bit.from_linear(lin, r=4, alpha=8)
    randomize_b(layer)
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 32)
    layer(x).backward(g)
    w = layer.weight_4bit.dequantize()
    expected = g @ w + layer.scaling * (g @ layer.lora_B.weight @ layer.lora_A.weight)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None


def test_forward_saves_input_and_packed_weight_not_a_dequantized_copy():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128, bias=False)
    layer = ql.LoRALinear4bit.from_linear(lin, r=4, alpha=8)
    x = torch.randn(3, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    w_shape = torch.Size([128, 256])
    assert not any(t.shape == w_shape for t in saved), [tuple(t.shape) for t in saved]
    assert any(t.data_ptr() == layer.weight_4bit.packed.data_ptr() for t in saved)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes < w_shape.numel() * 4 / 4  # far below one fp32 weight copy
    y.sum().backward()
    assert x.grad is not None


def test_compute_dtype_casts_base_matmul_and_returns_input_dtype():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    layer = ql.LoRALinear4bit.from_linear(lin, r=4, alpha=8, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = (x.bfloat16() @ layer.weight_4bit.dequantize(torch.bfloat16).T).float()
    torch.testing.assert_close(y, expected)
    with pytest.raises(TypeError, match="compute_dtype"):
        ql.LoRALinear4bit.from_linear(lin, compute_dtype=torch.int8)


def test_dropout_acts_on_the_adapter_path_only():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    layer = ql.LoRALinear(lin, r=4, alpha=8, dropout=0.5)
    randomize_b(layer)
    x = torch.randn(200, 64)
    layer.train()
    delta_train = layer(x) - lin(x)
    layer.eval()
    delta_eval = layer(x) - lin(x)
    assert not torch.allclose(delta_train, delta_eval)
    torch.testing.assert_close(delta_eval, layer.adapter_delta(x))


def test_add_lora_targets_block_linears_not_lm_head():
    model = tiny_llama()
    ql.add_lora(model, r=4, alpha=8)
    layers = lora_layers(model)
    suffixes = {n.split(".")[-1] for n in layers}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(layers) == 7 * 2
    assert isinstance(model.lm_head, nn.Linear) and not model.lm_head.weight.requires_grad
    trainable, _ = count_parameters(model)
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in layers.values())
    assert all(("lora_A" in n or "lora_B" in n) for n, p in model.named_parameters() if p.requires_grad)
    assert all(isinstance(m, ql.LoRALinear4bit) and m.weight_4bit.double_quant for m in layers.values())


def test_add_lora_with_names_and_unknown_name_lists_available():
    model = tiny_llama()
    assert len(find_target_modules(model, ["q_proj", "v_proj"])) == 4
    with pytest.raises(ValueError, match=r"\['qq_proj'\].*available: \['down_proj'.*'v_proj'\]"):
        ql.add_lora(model, target_modules=["q_proj", "qq_proj"])
    with pytest.raises(ValueError, match="quantize"):
        ql.add_lora(model, quantize="nf5")
    ql.add_lora(model, r=2, alpha=4, target_modules=["q_proj", "v_proj"], quantize=None)
    assert len(lora_layers(model)) == 4
    assert all(isinstance(m, ql.LoRALinear) for m in lora_layers(model).values())
    with pytest.raises(ValueError, match="already has LoRA"):
        ql.add_lora(model)


def test_add_lora_fresh_4bit_model_equals_dequantized_base():
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 7))
    ql.add_lora(model, r=4, alpha=8, quantize=None)
    ref = model(ids).logits
    model = tiny_llama()
    ql.add_lora(model, r=4, alpha=8, quantize="nf4")
    out = model(ids).logits
    assert 0 < (out - ref).abs().max() < 0.5  # 4-bit changes the logits a little, not a lot
    merged = ql.merge_lora(model)  # fresh adapter: merged = dequantized base
    assert not lora_layers(merged)
    torch.testing.assert_close(merged(ids).logits, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_lora_matches_unmerged_model(quantize):
    model = tiny_llama()
    ql.add_lora(model, r=4, alpha=8, quantize=quantize)
    randomize_b(model)
    ids = torch.randint(0, 96, (2, 7))
    before = model(ids).logits
    ql.merge_lora(model, dtype=torch.float32)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no LoRA layers"):
        ql.merge_lora(model)


def test_merge_single_layer_to_16_bit():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    layer = ql.LoRALinear4bit.from_linear(lin, r=4, alpha=8)
    randomize_b(layer)
    merged = ql.merge_lora(layer, dtype=torch.bfloat16)
    assert merged.weight.dtype == torch.bfloat16
    expected = layer.weight_4bit.dequantize() + layer.delta_weight()
    torch.testing.assert_close(merged.weight.float(), expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(TypeError, match="dtype"):
        ql.merge_lora(layer, dtype=torch.int8)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 96, (2, 9))
    grads = []
    for reentrant in (None, False, True):  # None: no checkpointing
        model = tiny_llama()
        ql.add_lora(model, r=4, alpha=8)
        randomize_b(model)
        model.train()
        if reentrant is not None:
            if reentrant:  # the embedding is frozen: its output must require grad for reentrant checkpoints
                model.enable_input_require_grads()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 28
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-5, atol=1e-6)
            assert grads[0][name].abs().sum() > 0, name


def test_weight_bytes_counts_the_4bit_storage():
    model = tiny_llama()
    full = sum(weight_bytes(model).values())  # fresh model: every parameter trainable
    ql.add_lora(model, r=4, alpha=8, double_quant=False)
    wb = weight_bytes(model)
    layers = lora_layers(model)
    linear_fp32 = sum(m.in_features * m.out_features * 4 for m in layers.values())
    packed = sum(m.weight_4bit.nbytes for m in layers.values())
    assert wb["base"] == full - linear_fp32 + packed
    assert wb["adapters"] == sum(4 * (m.in_features + m.out_features) * 4 for m in layers.values())


def test_module_to_moves_but_never_recasts_the_4bit_weight():
    layer = ql.LoRALinear4bit.from_linear(nn.Linear(64, 32), r=4, alpha=8, double_quant=True)
    before = layer.weight_4bit
    layer.half()
    assert layer.lora_A.weight.dtype == torch.float16
    assert layer.weight_4bit.absmax2.dtype == torch.float32 and layer.weight_4bit is before


def test_plots_return_figures():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from qlora_lab.lora import adapter_param_count, plot_adapter_params, plot_gradient_path, plot_weight_memory

    assert adapter_param_count(576, 1536, 8) == 8 * (576 + 1536)
    with pytest.raises(ValueError, match="r"):
        adapter_param_count(576, 1536, 0)
    for fig in (plot_adapter_params(576, 1536, r=8), plot_gradient_path(),
                plot_weight_memory({"fp32": {"base": 100, "adapters": 0}, "NF4": {"base": 30, "adapters": 5}})):
        assert isinstance(fig, matplotlib.figure.Figure) and fig.axes
        plt.close(fig)
