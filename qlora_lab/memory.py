"""The memory stack of fine-tuning, estimated from a model's shape: weights, adapters, gradients,
optimizer state, activations and temporaries, in bytes.

The estimate counts the tensors a Llama-style decoder (Hugging Face LlamaForCausalLM, SDPA attention)
keeps for one training step; qlora_lab.measure_memory measures the same six categories on a real
step, and tests/test_memory.py checks the two against each other on the bundled model.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

CATEGORIES = ("weights", "adapters", "gradients", "optimizer", "activations", "temporaries")
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BLOCKSIZE = 64          # bitsandbytes' 4-bit block (QLoRA default)
DQ_BLOCKSIZE = 256      # double quantization: 256 absmax constants per second-level block
OPT8_BLOCKSIZE = 256    # bitsandbytes 8-bit optimizer: blockwise, one fp32 absmax per 256 values
OPT8_MIN_SIZE = 4096    # bitsandbytes keeps tensors smaller than this in 32-bit state
PAGED_MIN_SIZE = 100_000  # bitsandbytes pages only state tensors with >= 1e5 elements
GB = 1e9

# GPUs the plots and the planner draw as budget lines (bytes of device memory).
GPU_BUDGETS = {"T4 16 GB": 16 * 2**30, "24 GB": 24 * 2**30, "A100 40 GB": 40 * 2**30,
               "48 GB": 48 * 2**30, "80 GB": 80 * 2**30}

# The LLaMA-1 shapes (Touvron et al. 2023, Table 2; the released params.json files), as the
# fields of a Hugging Face LlamaConfig. FFN widths are those of the released checkpoints.
LLAMA_PRESETS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
    "33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                num_key_value_heads=52, vocab_size=32000, tie_word_embeddings=False),
    "65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=64, vocab_size=32000, tie_word_embeddings=False),
}


@dataclass
class MemoryStack:
    """Bytes per category of one training step; `stack["weights"]`, `stack.total`.

    pageable: bytes of optimizer state a paged optimizer may evict to host RAM (part of
    `optimizer`); `device_total` is what must stay on the device. `peak` (measured stacks only) is
    the highest live byte count seen during the step."""
    weights: int = 0
    adapters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    temporaries: int = 0
    pageable: int = 0
    label: str = ""
    notes: dict = field(default_factory=dict)
    peak: int | None = None
    allocator_peak: int | None = None

    def __getitem__(self, name: str) -> int:
        if name not in CATEGORIES:
            raise KeyError(f"unknown category {name!r}; categories: {', '.join(CATEGORIES)}")
        return getattr(self, name)

    def as_dict(self) -> dict:
        return {c: getattr(self, c) for c in CATEGORIES}

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    @property
    def device_total(self) -> int:
        """Bytes that stay on the device when a paged optimizer evicts all it may."""
        return self.total - self.pageable

    def fits(self, budget_bytes: int) -> bool:
        return self.device_total <= budget_bytes

    def table(self, unit: str = "GB") -> str:
        """The stack as a text table, in GB (1e9 bytes) or MB (1e6)."""
        scale = {"GB": 1e9, "MB": 1e6}.get(unit)
        if scale is None:
            raise ValueError(f"unit must be 'GB' or 'MB', got {unit!r}")
        rows = [f"{c:<12} {getattr(self, c) / scale:>12.3f} {unit}" for c in CATEGORIES]
        rows.append(f"{'total':<12} {self.total / scale:>12.3f} {unit}")
        if self.pageable:
            rows.append(f"{'  pageable':<12} {self.pageable / scale:>12.3f} {unit}  (paged optimizer state, may live in host RAM)")
            rows.append(f"{'  on device':<12} {self.device_total / scale:>12.3f} {unit}")
        title = f"{self.label}\n" if self.label else ""
        return title + "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


# --- the model's shape ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def linears(self) -> dict:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def n_params(self) -> int:
        per_layer = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden + self.hidden + head


def _config_fields(config) -> dict:
    if isinstance(config, str) and config.lower() in LLAMA_PRESETS:
        return dict(LLAMA_PRESETS[config.lower()])
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"config {str(config)!r} is neither a preset ({', '.join(LLAMA_PRESETS)}) "
                             "nor an existing config.json file")
        return json.loads(path.read_text())
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        d = config.to_dict()
        d.setdefault("head_dim", getattr(config, "head_dim", None))
        return d
    raise TypeError(f"config must be a Hugging Face config, a dict, a config.json path or one of "
                    f"{', '.join(LLAMA_PRESETS)}; got {type(config).__name__}")


def model_shape(config) -> Shape:
    """The Shape of a Llama-style model from its config (see estimate_memory for what it accepts)."""
    d = _config_fields(config)
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if d.get(k) is None]
    if missing:
        raise ValueError(f"config lacks the field(s) {', '.join(missing)} needed for the estimate")
    heads = d["num_attention_heads"]
    shape = Shape(hidden=d["hidden_size"], intermediate=d["intermediate_size"], layers=d["num_hidden_layers"],
                  heads=heads, kv_heads=d.get("num_key_value_heads") or heads,
                  head_dim=d.get("head_dim") or d["hidden_size"] // heads, vocab=d["vocab_size"],
                  tied=bool(d.get("tie_word_embeddings", False)))
    for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab"):
        value = getattr(shape, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config field for {name} must be a positive integer, got {value!r}")
    return shape


# --- the six terms ------------------------------------------------------------------------------------

def quantized_4bit_bytes(n: int, double_quant: bool = True, blocksize: int = BLOCKSIZE) -> int:
    """Bytes bitsandbytes stores for n weights in 4 bits (REFERENCE.md, bitsandbytes layout):
    packed codes ceil(n/2) bytes; absmax one fp32 per block of 64 -> 4*ceil(n/64);
    double quant: one uint8 per block, plus one fp32 per 256 constants and one fp32 offset."""
    blocks = math.ceil(n / blocksize)
    if double_quant:
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / DQ_BLOCKSIZE) + 4
    return math.ceil(n / 2) + 4 * blocks


def _optimizer_state_bytes(numel: int, optimizer: str) -> int:
    """State bytes per trainable tensor of `numel` elements.
    adamw, paged_adamw_32bit: two fp32 moments, 8 bytes/param (Loshchilov & Hutter; torch.optim.AdamW
    on fp32 parameters, bitsandbytes AdamW32bit) plus a 4-byte step counter.
    adamw_8bit, paged_adamw_8bit: two uint8 moments plus one fp32 absmax per 256 values each
    (Dettmers et al. 2022, 8-bit optimizers); tensors under 4096 elements stay 32-bit."""
    if optimizer.endswith("8bit") and numel >= OPT8_MIN_SIZE:
        return 2 * (numel + 4 * math.ceil(numel / OPT8_BLOCKSIZE))
    return 8 * numel + 4


def _normalise_targets(target_modules) -> tuple:
    if target_modules == "all-linear":
        return LINEAR_NAMES
    if isinstance(target_modules, str) or not isinstance(target_modules, (list, tuple, set)) or not target_modules:
        raise TypeError(f'target_modules must be "all-linear" or a non-empty list of {", ".join(LINEAR_NAMES)}; '
                        f"got {target_modules!r}")
    unknown = sorted(set(target_modules) - set(LINEAR_NAMES))
    if unknown:
        raise ValueError(f"target_modules {unknown} are not linear layers of a Llama block; "
                         f"accepted: {', '.join(LINEAR_NAMES)}")
    return tuple(n for n in LINEAR_NAMES if n in target_modules)


def _dtype_bytes(compute_dtype) -> int:
    name = str(compute_dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"compute_dtype must be one of {', '.join(DTYPE_BYTES)}, got {compute_dtype!r}")
    return DTYPE_BYTES[name]


def activation_bytes(shape: Shape, batch_size: int, seq_len: int, dtype_bytes: int, method: str,
                     r: int, targets: tuple, gradient_checkpointing: bool) -> int:
    """Bytes autograd saves for backward in one forward pass of a Llama decoder (HF, SDPA attention).

    Per layer and token, in elements of the compute dtype, counted from the ops' saved tensors
    (in the spirit of Korthikanti et al. 2022, "Reducing activation recomputation", whose GPT
    count is s*b*h*(34 + 5*a*s/h) bytes; SDPA keeps no a*s*s scores, so that term is absent here):
      2 RMSNorms: input and normalised output, 2h each (+1 for the rsqrt)   4h + 2
      attention: rotated q and k, v, the SDPA output and the o_proj input   3*q_dim + 2*kv_dim
                 plus the fp32 log-sum-exp per head                          heads (x 4 bytes)
      MLP: gate output, silu(gate), up output, their product                 4*intermediate
      LoRA: each adapter's A output                                          r per targeted linear
    With gradient checkpointing (every decoder layer), only each layer's input, h per token, is kept;
    one layer is recomputed at a time during backward (see temporaries_bytes).
    The head adds the final norm (2h) and the fp32 log-softmax of the loss (vocab x 4 bytes).
    """
    tokens = batch_size * seq_len
    h, i = shape.hidden, shape.intermediate
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    lora = r * len(targets) if method != "full" else 0
    if gradient_checkpointing:
        per_layer = h * dtype_bytes
    else:
        per_layer = (4 * h + 2 + 3 * q_dim + 2 * kv_dim + 4 * i + lora) * dtype_bytes + 4 * shape.heads
    head = 2 * h * dtype_bytes + 4 * shape.vocab
    return tokens * (shape.layers * per_layer + head)


def layer_activation_bytes(shape: Shape, batch_size: int, seq_len: int, dtype_bytes: int, method: str,
                           r: int, targets: tuple) -> int:
    """One decoder layer's saved activations (what checkpointing recomputes at a time)."""
    one = Shape(**{**shape.__dict__, "layers": 1})
    return activation_bytes(one, batch_size, seq_len, dtype_bytes, method, r, targets, False) - \
        batch_size * seq_len * (2 * shape.hidden * dtype_bytes + 4 * shape.vocab)


def temporaries_bytes(shape: Shape, batch_size: int, seq_len: int, dtype_bytes: int, method: str,
                      r: int, targets: tuple, gradient_checkpointing: bool, largest_trainable: int) -> int:
    """The largest transient allocation of the step, beyond the other five categories: the max of
    - the loss: logits (compute dtype) and an fp32 copy for the loss in the forward, and in the backward
      the gradient of the log-softmax and of the logits (fp32): tokens * vocab * (dtype + 2*4) bytes;
    - a layer's backward: gradients flowing through it, about 4*intermediate + 4*h per token
      (these are the paper's "LoRA input gradients"), plus, with checkpointing, the recomputed
      activations of that one layer;
    - the optimizer step: torch.optim.AdamW (single-tensor, its CPU default) holds two temporaries the
      size of the largest trainable tensor (sqrt of the second moment, then its division) in fp32;
      the foreach version (CUDA default) makes such temporaries per parameter group, not estimated;
    - full fine-tuning with a tied embedding: its two gradients (lm_head and embedding) are summed
      into a third buffer: 3 * vocab * h * dtype bytes.
    """
    tokens = batch_size * seq_len
    loss = tokens * shape.vocab * (dtype_bytes + 8) if dtype_bytes != 4 else tokens * shape.vocab * 8
    layer = tokens * (4 * shape.intermediate + 4 * shape.hidden) * dtype_bytes
    if gradient_checkpointing:
        layer += layer_activation_bytes(shape, batch_size, seq_len, dtype_bytes, method, r, targets)
    step = 2 * 4 * largest_trainable
    tied = 3 * shape.vocab * shape.hidden * dtype_bytes if (method == "full" and shape.tied) else 0
    return max(loss, layer, step, tied)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def estimate_memory(config, method: str = "qlora", batch_size: int = 1, seq_len: int = 512, r: int = 64,
                    target_modules="all-linear", optimizer: str = "paged_adamw_32bit",
                    gradient_checkpointing: bool = True, compute_dtype="bfloat16",
                    double_quant: bool = True) -> MemoryStack:
    """Estimate the memory stack of one training step, in bytes.

    config: a Hugging Face config (LlamaConfig etc.), a dict of its fields, a config.json path, or a
        key of LLAMA_PRESETS ("7b", "13b", "33b", "65b").
    method: "full" (every weight trains), "lora" (frozen 16-bit base + adapters), "qlora" (frozen
        NF4 base + adapters). target_modules: "all-linear" or names among LINEAR_NAMES; the lm_head and
        embeddings are never quantized or adapted.
    optimizer: "adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"; for paged ones,
        `pageable` says how much of the state may be evicted to host RAM.
    compute_dtype: "bfloat16", "float16" or "float32" (also torch dtypes): weights, adapters,
        gradients and activations are held in it.

    weights: full/lora: n_params * dtype bytes. qlora: each targeted linear in bitsandbytes' 4-bit
        storage (quantized_4bit_bytes), the rest (embeddings, norms, lm_head) in the compute dtype.
        A tied lm_head shares the embedding and counts once.
    adapters: r * (in + out) per targeted linear and layer (Hu et al. 2021, LoRA), compute dtype.
    gradients: one per trainable value, compute dtype.
    optimizer: _optimizer_state_bytes per trainable tensor.
    activations: activation_bytes; temporaries: temporaries_bytes.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("r", r)
    for name, flag in (("gradient_checkpointing", gradient_checkpointing), ("double_quant", double_quant)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    nbytes = _dtype_bytes(compute_dtype)
    shape = model_shape(config)
    targets = _normalise_targets(target_modules)
    linears = shape.linears()
    L = shape.layers

    if method == "qlora":
        quantized = L * sum(quantized_4bit_bytes(a * b, double_quant) for n, (a, b) in linears.items() if n in targets)
        rest = shape.n_params() - L * sum(a * b for n, (a, b) in linears.items() if n in targets)
        weights = quantized + rest * nbytes
    else:
        weights = shape.n_params() * nbytes

    if method == "full":
        trainable = [shape.vocab * shape.hidden] + [a * b for a, b in linears.values()] * L \
            + [shape.hidden] * (2 * L + 1) + ([] if shape.tied else [shape.vocab * shape.hidden])
        adapters = 0
    else:
        trainable = [n for name in targets for n in (r * linears[name][0], r * linears[name][1])] * L
        adapters = sum(trainable) * nbytes
    gradients = sum(trainable) * nbytes
    optimizer_bytes = sum(_optimizer_state_bytes(n, optimizer) for n in trainable)
    pageable = 0
    if optimizer.startswith("paged"):
        pageable = sum(_optimizer_state_bytes(n, optimizer) for n in trainable if n >= PAGED_MIN_SIZE)
    activations = activation_bytes(shape, batch_size, seq_len, nbytes, method, r, targets, gradient_checkpointing)
    temporaries = temporaries_bytes(shape, batch_size, seq_len, nbytes, method, r, targets,
                                    gradient_checkpointing, max(trainable))
    label = f"{method}, batch {batch_size}, seq {seq_len}" + (f", r={r}" if method != "full" else "") + \
        (", checkpointing" if gradient_checkpointing else "") + f", {optimizer}"
    return MemoryStack(weights=weights, adapters=adapters, gradients=gradients, optimizer=optimizer_bytes,
                       activations=activations, temporaries=temporaries, pageable=pageable, label=label,
                       notes={"n_params": shape.n_params(), "trainable_params": sum(trainable)})


# --- the command line: qlora-lab memory -----------------------------------------------------------------

def add_memory_command(subparsers) -> None:
    """Register `qlora-lab memory`: print the estimated stack as a table, optionally save the bar."""
    p = subparsers.add_parser("memory", help="estimate the memory stack of a fine-tuning step",
                              description="Estimate weights, adapters, gradients, optimizer state, "
                                          "activations and temporaries of one training step.")
    p.add_argument("--model", default="7b",
                   help=f"a preset ({', '.join(LLAMA_PRESETS)}), 'bundled' (SmolLM2-135M) or a config.json path")
    p.add_argument("--method", default="qlora", choices=METHODS)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--optimizer", default="paged_adamw_32bit", choices=OPTIMIZERS)
    p.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    p.add_argument("--no-double-quant", action="store_true", help="turn double quantization off")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_BYTES))
    p.add_argument("--plot", metavar="OUT.png", help="also save the stacked bar chart here")
    p.set_defaults(func=run_memory_command)


def bundled_config() -> dict:
    """The bundled SmolLM2-135M-Instruct's config fields, read from its cached config.json."""
    from .model import converted_model_dir

    return json.loads((converted_model_dir() / "config.json").read_text())


def run_memory_command(args) -> int:
    config = bundled_config() if args.model == "bundled" else args.model
    stack = estimate_memory(config, method=args.method, batch_size=args.batch_size, seq_len=args.seq_len,
                            r=args.r, optimizer=args.optimizer, gradient_checkpointing=not args.no_checkpointing,
                            compute_dtype=args.dtype, double_quant=not args.no_double_quant)
    stack.label = f"{args.model}: {stack.label}"
    print(stack.table("GB"))
    fitting = [name for name, limit in GPU_BUDGETS.items() if stack.fits(limit)]
    print("fits on: " + (", ".join(fitting) if fitting else "none of " + ", ".join(GPU_BUDGETS)))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        from .plots import memory_stack_bar

        memory_stack_bar([stack]).savefig(args.plot, dpi=120)
        print(f"saved {args.plot}")
    return 0
