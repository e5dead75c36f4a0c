"""LoRA layers (Hu et al. 2021) and the QLoRA layer: a frozen 4-bit base weight with a trainable
low-rank adapter on top (Dettmers et al. 2023, eq. 5).

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

W (out x in) is frozen: a plain tensor in `LoRALinear`, a `Quantized4bit` in `LoRALinear4bit`.
A (r x in) starts Kaiming-uniform (a = sqrt(5), as PEFT and nn.Linear do), B (out x r) starts at
zero, so a fresh adapter leaves the layer's output unchanged. Only A and B train.

The 4-bit layer's matmul is a custom autograd function: the weight is dequantized in the forward
and dequantized again in the backward, so only the packed 4-bit codes (and their constants) are
kept between the two, never a 16/32-bit copy. The gradient goes to the input (so the adapters of
earlier layers learn) and never to the frozen base.

Module and parameter names follow PEFT (`lora_A`, `lora_B`, `lora_dropout`), so an adapter's state
dict maps one-to-one onto PEFT's key names (see adapters.py).
"""
import math
import re
from dataclasses import replace

import torch
from torch import nn
import torch.nn.functional as F

from .quantize import QUANT_TYPES, Quantized4bit, quantize_4bit

MERGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_hyper(r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r (the adapter rank) must be an int >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0 (the output is scaled by alpha / r), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def _check_linear(linear) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")


def _check_compute_dtype(compute_dtype) -> None:
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise TypeError("compute_dtype must be None (the input's dtype), torch.float32, torch.float16, "
                        f"torch.bfloat16 or torch.float64, got {compute_dtype!r}")


class _LoRAAdapter(nn.Module):
    """What both LoRA layers share: the adapter A, B, its dropout and scale alpha / r."""

    def _init_adapter(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                      device, dtype) -> None:
        _check_hyper(r, alpha, dropout)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout_p = r, alpha, float(dropout)
        self.scaling = alpha / r
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """A Kaiming-uniform (a = sqrt(5)), B zeros: the adapter starts as an exact no-op."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) * dropout(x) A^T B^T, computed in the adapter's dtype."""
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The adapter as a full (out x in) matrix, (alpha / r) * B A, in `dtype`."""
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        drop = f", dropout={self.dropout_p}" if self.dropout_p else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}{drop}"


class LoRALinear(_LoRAAdapter):
    """A frozen full-precision nn.Linear (`base_layer`) plus a trainable LoRA adapter."""

    def __init__(self, linear: nn.Linear, r: int = 16, alpha: float = 32, dropout: float = 0.0):
        super().__init__()
        _check_linear(linear)
        linear.requires_grad_(False)
        self.base_layer = linear
        w = linear.weight
        self._init_adapter(linear.in_features, linear.out_features, r, alpha, dropout, w.device, w.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 16, alpha: float = 32, dropout: float = 0.0):
        return cls(linear, r=r, alpha=alpha, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.adapter_delta(x).to(x.dtype)

    def merged(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear with W + (alpha / r) B A, in `dtype` (default: the base weight's)."""
        w = self.base_layer.weight
        return _merged_linear(w.float(), self.base_layer.bias, self, dtype or w.dtype)


class Dequantize4bitLinear(torch.autograd.Function):
    """y = x W^T + b with W given as a Quantized4bit; dequantized to x's dtype in the forward and
    again in the backward. Saves only the packed codes and the constants; returns a gradient for
    the input x only (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: Quantized4bit, bias: torch.Tensor | None):
        w = dequantize_to(q, x.dtype)
        out = F.linear(x, w, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(q.packed, q.absmax, q.offset, q.absmax2)
        ctx.meta = replace(q, packed=None, absmax=None, offset=None, absmax2=None)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            packed, absmax, offset, absmax2 = ctx.saved_tensors
            q = replace(ctx.meta, packed=packed, absmax=absmax, offset=offset, absmax2=absmax2)
            grad_x = grad_out.matmul(dequantize_to(q, grad_out.dtype))
        return grad_x, None, None


def dequantize_to(q: Quantized4bit, dtype: torch.dtype) -> torch.Tensor:
    """q dequantized to `dtype`; float64 (for gradcheck) goes through float32, which is exact."""
    if dtype == torch.float64:
        return q.dequantize(torch.float32).to(torch.float64)
    return q.dequantize(dtype)


class LoRALinear4bit(_LoRAAdapter):
    """A frozen 4-bit base weight (`weight_4bit`, a Quantized4bit) plus a trainable LoRA adapter.

    compute_dtype: the dtype the base matmul runs in (None: the input's dtype, float32 on a CPU
    model); the output comes back in the input's dtype. The adapter keeps the dtype of the Linear
    it was built from."""

    def __init__(self, weight_4bit: Quantized4bit, bias: torch.Tensor | None = None, r: int = 16,
                 alpha: float = 32, dropout: float = 0.0, compute_dtype: torch.dtype | None = None,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(weight_4bit, Quantized4bit):
            raise TypeError(f"weight_4bit must be a Quantized4bit, got {type(weight_4bit).__name__}")
        if len(weight_4bit.shape) != 2:
            raise ValueError(f"weight_4bit must hold a 2-d (out x in) weight, got shape {tuple(weight_4bit.shape)}")
        _check_compute_dtype(compute_dtype)
        out_features, in_features = weight_4bit.shape
        self.weight_4bit = weight_4bit
        self.compute_dtype = compute_dtype
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._init_adapter(in_features, out_features, r, alpha, dropout, weight_4bit.device, adapter_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                    quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, blocksize: int = 64) -> "LoRALinear4bit":
        """Quantize `linear`'s weight to 4 bits (`quant_type` "nf4", "fp4" or "int4", blocks of
        `blocksize`, optional double quantization) and put a LoRA adapter of rank r on top."""
        _check_linear(linear)
        _check_hyper(r, alpha, dropout)
        q = quantize_4bit(linear.weight.detach(), quant_type=quant_type, blocksize=blocksize,
                          double_quant=double_quant)
        return cls(q, linear.bias, r=r, alpha=alpha, dropout=dropout, compute_dtype=compute_dtype,
                   adapter_dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        base = Dequantize4bitLinear.apply(x.to(dtype), self.weight_4bit, self.bias).to(x.dtype)
        return base + self.adapter_delta(x).to(x.dtype)

    def merged(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear with dequant(W) + (alpha / r) B A, in `dtype` (default: the dtype
        the weight had before quantization)."""
        return _merged_linear(self.weight_4bit.dequantize(torch.float32), self.bias, self,
                              dtype or self.weight_4bit.dtype)

    def _apply(self, fn, recurse=True):
        # Module.to()/cuda() move parameters and buffers; the Quantized4bit is neither, so move it
        # here. Its dtypes never change (model.half() must not round the float32 constants).
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.weight_4bit.device)).device
        if device != self.weight_4bit.device:
            self.weight_4bit = self.weight_4bit.to(device)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_4bit={self.weight_4bit!r}"


def _merged_linear(w: torch.Tensor, bias, layer: _LoRAAdapter, dtype: torch.dtype) -> nn.Linear:
    if dtype not in MERGE_DTYPES:
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    out = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(w + layer.delta_weight(torch.float32))
        if bias is not None:
            out.bias.copy_(bias)
    out.requires_grad_(False)
    return out


LORA_LAYERS = (LoRALinear, LoRALinear4bit)


def lora_layers(model: nn.Module) -> dict[str, _LoRAAdapter]:
    """{module name: LoRA layer} of every LoRA layer in `model`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules add_lora can target: every Linear except the output layer
    (lm_head), which QLoRA and PEFT's "all-linear" leave alone."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not out_emb and name.split(".")[-1] != "lm_head"]


def find_target_modules(model: nn.Module, target_modules="all-linear") -> list[str]:
    """The module names `target_modules` selects, matched the way PEFT matches them:
    "all-linear" (every Linear of the blocks, not lm_head); a list of names, each matching a module
    whose full name equals it or ends in "." + it; or another string, a regular expression that
    must match the full name."""
    candidates = linear_layer_names(model)
    if not candidates:
        raise ValueError("the model has no nn.Linear layers to put LoRA adapters on")
    if target_modules == "all-linear":
        return candidates
    if isinstance(target_modules, str):
        chosen = [n for n in candidates if re.fullmatch(target_modules, n)]
        if not chosen:
            raise ValueError(f"target_modules regex {target_modules!r} matches no linear layer; "
                             f"available: {_available(candidates)}")
        return chosen
    if not isinstance(target_modules, (list, tuple, set)) or not target_modules or \
            not all(isinstance(t, str) for t in target_modules):
        raise TypeError('target_modules must be "all-linear", a regex string or a non-empty list of '
                        f"module names, got {target_modules!r}")
    unknown = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in candidates)]
    if unknown:
        raise ValueError(f"target_modules {sorted(unknown)} match no linear layer of the model; "
                         f"available: {_available(candidates)}")
    return [n for n in candidates if any(n == t or n.endswith("." + t) for t in target_modules)]


def _available(names: list[str]) -> list[str]:
    return sorted({n.split(".")[-1] for n in names})


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, target_modules="all-linear",
             quantize: str | None = "nf4", double_quant: bool = True, dropout: float = 0.0,
             blocksize: int = 64, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Put LoRA adapters on `model`'s linear layers, in place, and return it.

    Every parameter of the model is frozen; only the adapters' A and B train. `quantize` "nf4",
    "fp4" or "int4" replaces each targeted Linear by a LoRALinear4bit (QLoRA), None by a
    LoRALinear over the full-precision weight. Layers not targeted (lm_head, embeddings, norms)
    stay as they are. See find_target_modules for `target_modules`.
    """
    if quantize is not None and quantize not in QUANT_TYPES:
        raise ValueError(f"quantize must be None, 'nf4', 'fp4' or 'int4', got {quantize!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    _check_hyper(r, alpha, dropout)
    _check_compute_dtype(compute_dtype)
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; merge_lora them or start from a fresh model")
    names = find_target_modules(model, target_modules)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if quantize is None:
            layer = LoRALinear(linear, r=r, alpha=alpha, dropout=dropout)
        else:
            layer = LoRALinear4bit.from_linear(linear, r=r, alpha=alpha, dropout=dropout, quant_type=quantize,
                                               double_quant=double_quant, compute_dtype=compute_dtype,
                                               blocksize=blocksize)
        layer.train(linear.training)
        setattr(parent, child, layer)
    return model


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold each adapter into its base weight, W + (alpha / r) B A, replacing every LoRA layer by a
    plain nn.Linear in `dtype` (float32, float16 or bfloat16; default: the base weight's dtype
    before quantization). Works in place on a model and returns it; given a single LoRA layer,
    returns the merged nn.Linear."""
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise TypeError(f"dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    if isinstance(model, LORA_LAYERS):
        return model.merged(dtype)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge (add_lora puts them on)")
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.merged(dtype))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit base weight counts its weights (out x in)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.weight_4bit.numel for m in model.modules() if isinstance(m, LoRALinear4bit))
    return trainable, total


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model stores, measured from its tensors: "base" (frozen parameters, buffers and
    the 4-bit weights with their constants) and "adapters" (trainable parameters). Tensors shared
    between modules (tied embeddings) count once."""
    seen, base, adapters = set(), 0, 0

    def size(t):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.numel() == 0 or key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    for p in model.parameters():
        if p.requires_grad:
            adapters += size(p)
        else:
            base += size(p)
    for b in model.buffers():
        base += size(b)
    for m in model.modules():
        if isinstance(m, LoRALinear4bit):
            q = m.weight_4bit
            base += sum(size(t) for t in (q.packed, q.absmax, q.offset, q.absmax2) if t is not None)
    return {"base": base, "adapters": adapters}


# --- Checking against the real stack: bitsandbytes Linear4bit + PEFT LoRA ---------------------------

def peft_key(name: str) -> str:
    """A PEFT model's parameter name -> the same parameter's name in a qlora_lab model."""
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def keep_bnb_weights_unpacked(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes' CPU inference shortcut on `model`'s Linear4bit layers, in place.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in eval mode (for an
    input without grad) into a layout only its bfloat16 kernel reads; from then on the layer computes
    in bfloat16 and passes no gradient back to its input, even in train mode. Training and a
    comparison with float32 training need the plain dequantize-then-matmul path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_peft_model(model_dir, r: int = 16, alpha: float = 32, target_modules="all-linear",
                   quant_type: str = "nf4", double_quant: bool = True, compute_dtype=torch.float32,
                   **config_overrides):
    """The reference: the model in `model_dir` loaded by transformers with
    BitsAndBytesConfig(load_in_4bit) on the CPU, then PEFT LoRA on `target_modules`.
    `config_overrides` go to from_pretrained (e.g. num_hidden_layers=4 keeps the first 4 blocks)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.float32,
                                                device_map="cpu", local_files_only=True, trust_remote_code=False,
                                                **config_overrides)
    keep_bnb_weights_unpacked(base)
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules))


def copy_adapters_to_peft(model: nn.Module, peft_model: nn.Module) -> None:
    """Copy the A and B matrices of qlora_lab's `model` into the PEFT model (same layers)."""
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    theirs = {peft_key(n): p for n, p in peft_model.named_parameters() if "lora_" in n}
    if ours.keys() != theirs.keys():
        raise ValueError(f"the two models have different LoRA layers: {sorted(ours.keys() ^ theirs.keys())[:4]}")
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(ours[name])


def compare_with_reference(model: nn.Module, peft_model: nn.Module, input_ids: torch.Tensor) -> dict:
    """Run both models forward and backward (next-token loss on `input_ids`) and return
    {"max_abs_logits": max |logits - logits_ref|, "max_rel_grad": max over LoRA tensors of
    max |g - g_ref| / max |g_ref|, "n_grads": number of LoRA tensors compared}."""
    results = []
    for m in (model, peft_model):
        m.zero_grad(set_to_none=True)
        out = m(input_ids, labels=input_ids)
        out.loss.backward()
        grads = {peft_key(n): p.grad for n, p in m.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads))
    (logits, grads), (logits_ref, grads_ref) = results
    rel = [float((grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-30)) for n, g in grads_ref.items()]
    return {"max_abs_logits": float((logits - logits_ref).abs().max()), "max_rel_grad": max(rel),
            "n_grads": len(rel)}


# --- Plots for notebook 04 ----------------------------------------------------------------------------

def adapter_param_count(in_features: int, out_features: int, r: int) -> int:
    """Trainable parameters of one rank-r adapter on an (in -> out) Linear: r x in + out x r."""
    _check_hyper(r, 1, 0.0)
    return r * (in_features + out_features)


def plot_adapter_params(in_features: int = 576, out_features: int = 1536, r: int = 16, max_r: int = 128):
    """Trainable parameters of a LoRA adapter against its rank r, as a share of the frozen layer's
    in x out weights, with rank `r` marked. Returns a matplotlib Figure."""
    import matplotlib.pyplot as plt

    from .plots import CATEGORY_COLORS

    full = in_features * out_features
    ranks = list(range(1, max_r + 1))
    share = [100 * adapter_param_count(in_features, out_features, k) / full for k in ranks]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(ranks, share, color=CATEGORY_COLORS["adapters"])
    mine = adapter_param_count(in_features, out_features, r)
    ax.scatter([r], [100 * mine / full], color=CATEGORY_COLORS["adapters"], zorder=3)
    ax.annotate(f"r={r}: {mine:,} params ({100 * mine / full:.2f}%)", (r, 100 * mine / full),
                textcoords="offset points", xytext=(8, -12))
    ax.set_xlabel("rank r")
    ax.set_ylabel("trainable / frozen weights (%)")
    ax.set_title(f"LoRA on a {in_features} -> {out_features} layer ({full:,} frozen weights)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_gradient_path():
    """The forward and backward paths through a LoRALinear4bit, drawn as boxes and arrows.
    Returns a matplotlib Figure."""
    import matplotlib.pyplot as plt

    from .plots import CATEGORY_COLORS

    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 5)
    ax.axis("off")
    boxes = {  # name: (x, y, half width, text, colour)
        "x": (0.8, 2.5, 0.3, "x", "white"),
        "W": (4.2, 3.8, 1.55, "dequant(W)  (NF4, frozen)\nrecomputed in backward", CATEGORY_COLORS["weights"]),
        "A": (3.0, 1.2, 0.75, "A  (r x in)", CATEGORY_COLORS["adapters"]),
        "B": (5.4, 1.2, 0.8, "B  (out x r)", CATEGORY_COLORS["adapters"]),
        "sum": (7.6, 2.5, 0.3, "+", "white"),
        "y": (9.3, 2.5, 0.3, "y", "white"),
    }
    for x, y, _, text, color in boxes.values():
        ax.text(x, y, text, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round", fc=color, ec="black", alpha=0.85 if color != "white" else 1))

    def arrow(a, b, color="black", style="-|>", rad=0.0):
        (x0, y0, w0, *_), (x1, y1, w1, *_) = boxes[a], boxes[b]
        ax.annotate("", (x1 - w1, y1), (x0 + w0, y0),
                    arrowprops=dict(arrowstyle=style, color=color, connectionstyle=f"arc3,rad={rad}"))

    for a, b in (("x", "W"), ("x", "A"), ("A", "B"), ("W", "sum"), ("B", "sum"), ("sum", "y")):
        arrow(a, b)
    grad = CATEGORY_COLORS["gradients"]
    ax.annotate("", (1.2, 2.2), (7.3, 2.2), arrowprops=dict(arrowstyle="-|>", color=grad, ls="--"))
    ax.text(4.2, 2.45, "dL/dx = dL/dy (W + (alpha/r) B A): reaches earlier layers", color=grad,
            ha="center", fontsize=8)
    ax.text(4.2, 0.35, "dL/dA, dL/dB: the only gradients kept (W gets none)", color=grad, ha="center", fontsize=8)
    ax.set_title("LoRALinear4bit: forward (black) and backward (red)")
    fig.tight_layout()
    return fig


def plot_weight_memory(rows: dict):
    """A stacked bar per setting: {label: {"base": bytes, "adapters": bytes}} in MiB, coloured by
    memory category. Returns a matplotlib Figure."""
    import matplotlib.pyplot as plt

    from .plots import CATEGORY_COLORS

    labels = list(rows)
    base = [rows[k]["base"] / 2**20 for k in labels]
    adapters = [rows[k]["adapters"] / 2**20 for k in labels]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar(labels, base, color=CATEGORY_COLORS["weights"], label="weights (frozen base)")
    ax.bar(labels, adapters, bottom=base, color=CATEGORY_COLORS["adapters"], label="adapters")
    for i, (b, a) in enumerate(zip(base, adapters)):
        ax.text(i, b + a, f"{b + a:.0f} MiB", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("MiB (measured from the tensors)")
    ax.set_ylim(0, max(b + a for b, a in zip(base, adapters)) * 1.15)
    ax.set_title("SmolLM2-135M weights, LoRA r=16 on all linear layers")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig
