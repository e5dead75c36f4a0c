"""measure_memory: exact parameter-side accounting, activations without double counting, and the
estimate checked against a real step (tiny random Llama, and the bundled model: slow)."""
import pytest
import torch

from qlora_lab.measure import PHASES, measure_memory
from qlora_lab.memory import estimate_memory

TOL = {"weights": 0.10, "adapters": 0.10, "gradients": 0.10, "optimizer": 0.10,
       "activations": 0.25, "temporaries": 0.25}


def _tiny(tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, tie_word_embeddings=tied, head_dim=16)
    return LlamaForCausalLM(cfg)


def _check(measured, estimated):
    for cat, tol in TOL.items():
        m, e = measured[cat], estimated[cat]
        assert abs(e - m) <= tol * m + 1, f"{cat}: estimate {e} vs measured {m}"
    assert abs(estimated.total - measured.total) <= 0.15 * measured.total


def _run(model, method, seq, ckpt, r=8):
    from qlora_lab.lora import add_lora

    if method != "full":
        add_lora(model, r=r, alpha=2 * r, quantize="nf4" if method == "qlora" else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    measured, timeline = measure_memory(model, {"input_ids": ids, "labels": ids}, optimizer=opt,
                                        gradient_checkpointing=ckpt)
    estimated = estimate_memory(model.config, method=method, seq_len=seq, r=r, optimizer="adamw",
                                gradient_checkpointing=ckpt, compute_dtype="float32")
    return measured, estimated, timeline


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_tiny_model_parameter_side_is_exact(method):
    measured, estimated, timeline = _run(_tiny(), method, 64, False)
    assert 0 <= measured.weights - estimated.weights <= 4096  # rotary inv_freq buffers, shared 1 KiB lookup tables
    for cat in ("adapters", "gradients"):
        assert measured[cat] == estimated[cat], cat
    assert abs(measured.optimizer - estimated.optimizer) <= 4 * 300  # step counters aside
    assert set(timeline.phase) == set(PHASES)
    assert measured.peak >= measured.weights + measured.activations


def test_tiny_model_activations_with_and_without_checkpointing():
    off, est_off, _ = _run(_tiny(), "lora", 64, False)
    on, est_on, _ = _run(_tiny(), "lora", 64, True)
    assert on.activations < off.activations / 2
    for m, e in ((off, est_off), (on, est_on)):
        assert abs(e.activations - m.activations) <= 0.25 * m.activations


def test_views_count_once_and_parameters_are_not_activations():
    w = torch.nn.Parameter(torch.randn(256, 256))

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = w

        def forward(self, x):
            y = torch.tanh(x @ self.w)          # saves x? no: x has no grad; saves w (a parameter), tanh output
            return (y[:, :128] * y[:, 128:]).sum()  # both views of y's storage, saved once

    x = torch.randn(64, 256)
    stack, _ = measure_memory(Toy(), x, loss_fn=lambda m, b: m(b))
    assert stack.activations == 64 * 256 * 4  # only the tanh output, once
    assert stack.weights == 256 * 256 * 4 and stack.gradients == 256 * 256 * 4


def test_bad_input():
    with pytest.raises(TypeError, match="model"):
        measure_memory("gpt", torch.zeros(1))
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        measure_memory(frozen, torch.zeros(1, 2), loss_fn=lambda m, b: m(b).sum())
    with pytest.raises(TypeError, match="optimizer"):
        measure_memory(torch.nn.Linear(2, 2), torch.zeros(1, 2), optimizer="adamw")


@pytest.mark.slow
@pytest.mark.parametrize("method, seq, ckpt", [("lora", 128, False), ("qlora", 512, True), ("full", 128, False)])
def test_bundled_model_estimate_matches_measurement(method, seq, ckpt):
    from qlora_lab.model import load_base_model

    model, _ = load_base_model()
    measured, estimated, _ = _run(model, method, seq, ckpt)
    _check(measured, estimated)
