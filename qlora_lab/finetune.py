"""The QLoRA fine-tune of the bundled model on the bundled task, with two interchangeable backends.

- "qlora_lab": the package's own LoRALinear4bit layers (NF4 + double quant) and PagedAdamW.
- "bnb": transformers' BitsAndBytesConfig 4-bit NF4 + DQ, PEFT LoRA, and bitsandbytes'
  PagedAdamW32bit on CUDA (torch.optim.AdamW on the CPU, where bnb has no paged optimizer).

Both start from the same adapter initialisation (init_adapters, seeded), see the same batches in the
same order and use the same schedule (constant lr after a linear warmup, max grad norm 0.3 as in the
paper), so their loss curves agree to float rounding.

Checkpoints (every `save_every` steps) hold the adapter, the optimizer state, the RNG states, the
data position, the step and the loss log. Each is written into a temporary folder and renamed into
place, so a crash never leaves a half-written checkpoint; a resumed run continues exactly where the
checkpoint left it.
"""
import json
import math
import os
import random
import resource
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import data
from .atomic import write_dir_atomically
from .device import compute_dtype as pick_compute_dtype

BACKENDS = ("qlora_lab", "bnb")
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "run_config.json"
LOG_FILE = "loss_log.json"


@dataclass
class FinetuneConfig:
    """Settings of one run. Sizes in examples and tokens, lr per step."""
    backend: str = "qlora_lab"
    steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 5
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    r: int = 8
    alpha: float = 16.0
    target_modules: str | list = "all-linear"
    quantize: bool = True  # False: LoRA on the unquantized base (16-bit LoRA), to compare with QLoRA
    double_quant: bool = True
    max_length: int = 64
    seed: int = 0
    save_every: int = 20
    gradient_checkpointing: bool = False
    num_layers: int | None = None  # keep only the first N decoder blocks (tests); None: all
    n_train: int | None = None  # use only the first N training examples; None: all
    device: str | None = None  # None: CUDA when present, else CPU

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("steps", "batch_size", "grad_accum", "r", "max_length", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        for name in ("lr", "max_grad_norm", "alpha"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("quantize", "double_quant", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("num_layers", "n_train"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")


def lr_at(config: FinetuneConfig, step: int) -> float:
    """Learning rate of the 0-based optimizer `step`: linear warmup over warmup_steps, then constant."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    return config.lr


def batch_indices(n_examples: int, batch_size: int, position: int, seed: int) -> list[int]:
    """Indices of the `batch_size` examples starting at data `position` (examples consumed so far),
    walking through one seeded permutation per epoch. A pure function of its arguments, so a resumed
    run needs only the position."""
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(position, n_examples)
        order = list(range(n_examples))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        take = min(batch_size - len(out), n_examples - offset)
        out += order[offset:offset + take]
        position += take
    return out


# ----- models -----------------------------------------------------------------------------------

def _device(config: FinetuneConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer():
    from transformers import AutoTokenizer

    from .model import converted_model_dir
    return AutoTokenizer.from_pretrained(converted_model_dir(), local_files_only=True, trust_remote_code=False)


def build_model(config: FinetuneConfig):
    """The base (NF4 when config.quantize, else in the compute dtype) with LoRA adapters for
    config.backend, on config's device, adapters initialised by init_adapters(seed). Returns the
    model (the PEFT model for "bnb")."""
    from .model import load_pretrained

    device = _device(config)
    cdtype = pick_compute_dtype(device)
    if config.backend == "qlora_lab":
        from .lora import add_lora
        model = load_pretrained(config.num_layers, dtype=torch.float32)
        if cdtype != torch.float32:
            model.to(cdtype)
        add_lora(model, r=config.r, alpha=config.alpha, target_modules=config.target_modules,
                 quantize="nf4" if config.quantize else None, double_quant=config.double_quant,
                 compute_dtype=cdtype if config.quantize else None)
        model.to(device)
        for p in model.parameters():  # adapters train in float32, as PEFT keeps them
            if p.requires_grad:
                p.data = p.data.float()
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import BitsAndBytesConfig
        quant = {} if not config.quantize else {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=cdtype)}
        base = load_pretrained(config.num_layers, dtype=cdtype,
                               device_map={"": str(device) if device.type == "cpu" else device.index or 0}, **quant)
        from .lora import keep_bnb_weights_unpacked
        keep_bnb_weights_unpacked(base)
        lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=0.0,
                          target_modules=config.target_modules, task_type="CAUSAL_LM")
        model = get_peft_model(base, lora)
    init_adapters(model, config.seed)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def adapter_params(model) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA tensors under PEFT's saved key names
    ("base_model.model.<module>.lora_A.weight"), the same for both backends."""
    from .lora import peft_key
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = peft_key(name)
            out[key if key.startswith("base_model.model.") else "base_model.model." + key] = p
    if not out:
        raise ValueError("the model has no trainable parameters")
    return dict(sorted(out.items()))


@torch.no_grad()
def init_adapters(model, seed: int) -> None:
    """Seeded LoRA init shared by both backends: A uniform in +-1/sqrt(in_features) (PEFT's
    kaiming_uniform(a=sqrt(5)) bound), B zero, drawn in sorted key order."""
    gen = torch.Generator().manual_seed(seed)
    for key, p in adapter_params(model).items():
        if ".lora_A." in key:
            bound = 1.0 / math.sqrt(p.shape[1])
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
        else:
            p.zero_()


def build_optimizer(model, config: FinetuneConfig):
    """PagedAdamW (qlora_lab), bnb PagedAdamW32bit (bnb on CUDA) or torch AdamW (bnb on CPU)."""
    params = list(adapter_params(model).values())
    kwargs = dict(lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    if config.backend == "qlora_lab":
        from .paged import PagedAdamW
        return PagedAdamW(params, **kwargs)
    if _device(config).type == "cuda":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW32bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


# ----- RNG and checkpoints ----------------------------------------------------------------------

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, model, optimizer, log: list[dict], config: FinetuneConfig) -> Path:
    """Write checkpoints/step-NNNNNN atomically: adapter.safetensors, optimizer.pt, rng.pt, state.json."""
    def write(tmp: Path):
        tensors = {k: p.detach().cpu().contiguous() for k, p in adapter_params(model).items()}
        save_file(tensors, str(tmp / "adapter.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        state = {"step": step, "data_position": step * config.batch_size * config.grad_accum,
                 "log": log, "config": asdict(config)}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    return write_dir_atomically(Path(out) / CHECKPOINTS / f"step-{step:06d}", write)


def latest_checkpoint(out) -> Path | None:
    """The complete checkpoint of the highest step in `out`, or None."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore adapter, optimizer and RNG states from `path`; returns the saved state.json."""
    tensors = load_file(str(path / "adapter.safetensors"))
    params = adapter_params(model)
    if tensors.keys() != params.keys():
        raise ValueError(f"checkpoint {path} holds other adapter tensors than the model "
                         f"(e.g. {sorted(tensors.keys() ^ params.keys())[:2]})")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())


def measured_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: torch.cuda.max_memory_allocated on CUDA, peak process RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


# ----- training ---------------------------------------------------------------------------------

def _prepare_out(out: Path, resume: bool, overwrite: bool, config: FinetuneConfig) -> None:
    if out.exists() and any(out.iterdir()):
        if resume:
            saved = out / CONFIG_FILE
            if saved.is_file():
                before = json.loads(saved.read_text())
                now = asdict(config)
                diff = {k: (before.get(k), v) for k, v in now.items() if k != "steps" and before.get(k) != v}
                if diff:
                    raise ValueError(f"--resume with settings that differ from the run in {out}: "
                                     f"{ {k: f'{a!r} -> {b!r}' for k, (a, b) in diff.items()} }; resume with "
                                     f"the same settings, use another folder, or overwrite=True (--overwrite) "
                                     f"to start afresh")
            return
        if not overwrite:
            raise FileExistsError(f"output folder {out} exists and is not empty; pass resume=True (--resume) "
                                  f"to continue that run or overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def train(config: FinetuneConfig, out, resume: bool = False, overwrite: bool = False, model=None,
          tokenizer=None, callback=None, progress: bool = True) -> dict:
    """Run (or resume) the fine-tune; returns {"model", "tokenizer", "optimizer", "log", "out"}.

    out: the run folder (checkpoints, run_config.json, loss_log.json). An existing non-empty folder
        needs resume=True (continue from its latest checkpoint) or overwrite=True (start afresh).
    model, tokenizer: prebuilt ones (from build_model / load_tokenizer) to skip loading.
    callback(step, record): called after each step (1-based) once any checkpoint is written.
    The log holds per step: step, loss (mean over answer tokens), lr, grad_norm (before clipping),
    memory_bytes (measured_memory_bytes) and tokens (answer + prompt tokens seen).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    _prepare_out(out, resume, overwrite, config)
    (out / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=1))
    device = _device(config)
    tokenizer = tokenizer or load_tokenizer()
    model = model or build_model(config)
    optimizer = build_optimizer(model, config)
    examples = data.load_split("train")[:config.n_train]
    params = list(adapter_params(model).values())
    log: list[dict] = []
    start = 0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        start, log = state["step"], state["log"]
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
    model.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"finetune ({config.backend})",
               disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step)
        total_loss, tokens = 0.0, 0
        for micro in range(config.grad_accum):
            position = (step * config.grad_accum + micro) * config.batch_size
            idx = batch_indices(len(examples), config.batch_size, position, config.seed)
            batch = {k: v.to(device) for k, v in data.collate(tokenizer, [examples[i] for i in idx],
                                                                config.max_length).items()}
            loss = model(**batch).loss / config.grad_accum
            loss.backward()
            total_loss += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "loss": total_loss, "lr": lr_at(config, step), "grad_norm": grad_norm,
                  "memory_bytes": measured_memory_bytes(device), "tokens": tokens}
        log.append(record)
        bar.set_postfix(loss=f"{total_loss:.4f}")
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            save_checkpoint(out, step + 1, model, optimizer, log, config)
        if callback is not None:
            callback(step + 1, record)
    bar.close()
    _write_json_atomic(out / LOG_FILE, log)
    model.eval()
    return {"model": model, "tokenizer": tokenizer, "optimizer": optimizer, "log": log, "out": out}


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def losses(log: list[dict]) -> list[float]:
    return [r["loss"] for r in log]


def max_loss_difference(log_a: list[dict], log_b: list[dict]) -> float:
    """max |loss_a - loss_b| over the steps both logs have (same length required)."""
    if len(log_a) != len(log_b):
        raise ValueError(f"the logs have {len(log_a)} and {len(log_b)} steps")
    return max(abs(a - b) for a, b in zip(losses(log_a), losses(log_b)))


def plot_loss(log: list[dict], other: list[dict] | None = None, labels=("run", "other")):
    """Loss per step (and a second run's beside it); returns a matplotlib Figure."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["step"] for r in log], losses(log), marker=".", label=labels[0])
    if other:
        ax.plot([r["step"] for r in other], losses(other), linestyle="--", label=labels[1])
    ax.set_xlabel("step")
    ax.set_ylabel("loss on answer tokens (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


# ----- command line -----------------------------------------------------------------------------

def add_finetune_command(subparsers) -> None:
    """Register `qlora-lab finetune`."""
    p = subparsers.add_parser("finetune", help="QLoRA fine-tune of the bundled model on the bundled task",
                              description="Fine-tune the bundled SmolLM2-135M-Instruct on the bundled date task, "
                                          "print the held-out exact-match score before and after, save a bundle.")
    d = FinetuneConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, bundle/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out and start afresh")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--r", type=int, default=d.r)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--n-heldout", type=int, default=None, help="score on the first N held-out examples")
    p.set_defaults(func=_run_finetune_command)


def _run_finetune_command(args) -> int:
    config = FinetuneConfig(backend=args.backend, steps=args.steps, batch_size=args.batch_size,
                            grad_accum=args.grad_accum, lr=args.lr, r=args.r, alpha=2.0 * args.r,
                            save_every=args.save_every, seed=args.seed,
                            gradient_checkpointing=args.gradient_checkpointing)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise FileExistsError(f"output folder {out} exists and is not empty; pass --resume to continue "
                              f"that run or --overwrite to replace it")
    heldout = data.load_split("heldout")[:args.n_heldout]
    tokenizer = load_tokenizer()
    model = build_model(config)
    before, _ = data.evaluate_score(model, tokenizer, heldout)  # B = 0: the 4-bit base model's score
    print(f"held-out exact match before: {before:.1f}% ({len(heldout)} examples)")
    result = train(config, args.out, resume=args.resume, overwrite=args.overwrite, model=model, tokenizer=tokenizer)
    after, _ = data.evaluate_score(result["model"], tokenizer, heldout)
    print(f"held-out exact match after:  {after:.1f}% ({after - before:+.1f} points)")
    from .bundle import save_bundle
    path = save_bundle(result["model"], tokenizer, config, Path(args.out) / "bundle")
    print(f"bundle saved to {path}")
    return 0
