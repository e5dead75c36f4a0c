"""The bundled task: rewrite a date written in words as the compact form YYYYMMDD.

"March 5, 2021" -> "20210305". The answer is fully determined by the question, so exact match is a
crisp score. The bundled SmolLM2-135M-Instruct knows month names and digits but rarely writes the
compact form exactly (it copies years wrongly, adds dashes or words); LoRA learns the format in a
few dozen steps.

The splits are generated from a seed (no download) and committed as JSONL under qlora_lab/data/:
one JSON object per line with the string fields "prompt" and "answer". Train and held-out dates are
disjoint. Prompts go through the model's chat template; the loss counts the answer tokens only.
"""
import json
import random
from datetime import date
from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "data"
SPLITS = ("train", "heldout")
SYSTEM_PROMPT = "You rewrite dates."
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
TEMPLATES = ("{month} {day}, {year}", "{day} {month} {year}", "{mon} {day} {year}", "{day} {mon}, {year}")
INSTRUCTION = "Write this date in the compact form YYYYMMDD: "
IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


def make_example(d: date, template: str) -> dict:
    """One example {"prompt", "answer"} for the date `d` written with `template`."""
    month = MONTHS[d.month - 1]
    text = template.format(month=month, mon=month[:3], day=d.day, year=d.year)
    return {"prompt": INSTRUCTION + text, "answer": f"{d.year:04d}{d.month:02d}{d.day:02d}"}


def generate_splits(seed: int = 0, n_train: int = 600, n_heldout: int = 60) -> dict[str, list[dict]]:
    """Deterministic train and held-out examples (disjoint dates, years 1900-2099)."""
    for name, n in (("n_train", n_train), ("n_heldout", n_heldout)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    rng = random.Random(seed)
    start, end = date(1900, 1, 1).toordinal(), date(2099, 12, 31).toordinal()
    ordinals = rng.sample(range(start, end + 1), n_train + n_heldout)
    examples = [make_example(date.fromordinal(o), rng.choice(TEMPLATES)) for o in ordinals]
    return {"train": examples[:n_train], "heldout": examples[n_train:]}


def write_splits(folder: Path = DATA_DIR, seed: int = 0) -> dict[str, Path]:
    """Write generate_splits(seed) as <split>.jsonl into `folder`; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, examples in generate_splits(seed).items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in examples))
        paths[split] = path
    return paths


def read_jsonl(path) -> list[dict]:
    """Read and validate a JSONL file of {"prompt": str, "answer": str} objects.

    Any malformed line (bad JSON, not an object, a missing, extra or non-string field, an empty
    answer) is a ValueError that names the file and the 1-based line number."""
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            where = f"{path}, line {number}"
            if not line.strip():
                raise ValueError(f"{where}: empty line (every line must be a JSON object)")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if set(obj) != {"prompt", "answer"}:
                raise ValueError(f"{where}: expected exactly the keys 'prompt' and 'answer', got {sorted(obj)}")
            for key in ("prompt", "answer"):
                if not isinstance(obj[key], str) or not obj[key].strip():
                    raise ValueError(f"{where}: {key!r} must be a non-empty string, got {obj[key]!r}")
            examples.append(obj)
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def load_split(split: str = "train") -> list[dict]:
    """The bundled split "train" or "heldout"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return read_jsonl(DATA_DIR / f"{split}.jsonl")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant turn's opening."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    return ids[0].tolist()


def encode_example(tokenizer, example: dict, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example: the chat prompt, then the answer and the end-of-turn token.
    labels are IGNORE_INDEX on the prompt, so the loss counts the answer tokens only. A sequence
    longer than `max_length` is a ValueError (truncating would cut the answer)."""
    prompt = prompt_ids(tokenizer, example["prompt"])
    answer = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
    answer = answer + tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = prompt + answer
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"example {example['prompt']!r} is {len(ids)} tokens, over max_length={max_length}")
    return ids, [IGNORE_INDEX] * len(prompt) + answer


def collate(tokenizer, examples: list[dict], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, attention_mask, labels (IGNORE_INDEX on prompt and padding)."""
    encoded = [encode_example(tokenizer, e, max_length) for e in examples]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def normalize(text: str) -> str:
    """What the scorer compares: the text with surrounding whitespace removed."""
    return text.strip()


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction equals the answer after normalize()."""
    return normalize(prediction) == normalize(answer)


def score(predictions: list[str], examples: list[dict]) -> float:
    """Exact-match accuracy in percent (0-100) of `predictions` against the examples' answers."""
    if len(predictions) != len(examples):
        raise ValueError(f"got {len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError("score needs at least one example")
    return 100.0 * sum(exact_match(p, e["answer"]) for p, e in zip(predictions, examples)) / len(examples)


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[dict], max_new_tokens: int = 12,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers of `model` to the examples' prompts (left-padded batches), decoded text."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers = []
    for start in range(0, len(examples), batch_size):
        prompts = [prompt_ids(tokenizer, e["prompt"]) for e in examples[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return answers


def evaluate_score(model, tokenizer, examples: list[dict], **kwargs) -> tuple[float, list[str]]:
    """(exact-match percent, predictions) of greedy generation on `examples`."""
    predictions = generate_answers(model, tokenizer, examples, **kwargs)
    return score(predictions, examples), predictions


if __name__ == "__main__":
    for split, path in write_splits().items():
        print(f"{split}: {path}")
