import json

import pytest

from qlora_lab import data
from qlora_lab.finetune import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_generation_is_deterministic_and_splits_are_disjoint():
    a, b = data.generate_splits(seed=3), data.generate_splits(seed=3)
    assert a == b
    assert data.generate_splits(seed=4) != a
    train_answers = {e["answer"] for e in a["train"]}
    assert not train_answers & {e["answer"] for e in a["heldout"]}


def test_committed_splits_equal_the_generator():
    generated = data.generate_splits(seed=0)
    for split in data.SPLITS:
        assert data.load_split(split) == generated[split]


def test_answers_are_the_compact_date():
    e = data.make_example(__import__("datetime").date(2021, 3, 5), "{month} {day}, {year}")
    assert e == {"prompt": data.INSTRUCTION + "March 5, 2021", "answer": "20210305"}


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "p"}', "exactly the keys"),
    ('{"prompt": "p", "answer": 5}', "'answer' must be a non-empty string"),
    ('{"prompt": "p", "answer": "a", "x": 1}', "exactly the keys"),
    ("", "empty line"),
])
def test_loader_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl, line 2: .*{message}"):
        data.read_jsonl(path)


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_split("test")


def test_prompt_uses_chat_template_and_loss_covers_answer_only(tok):
    example = data.load_split("train")[0]
    ids, labels = data.encode_example(tok, example)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n" + data.SYSTEM_PROMPT)
    assert "<|im_start|>assistant\n" in text
    answer_ids = [i for i, l in zip(ids, labels) if l != data.IGNORE_INDEX]
    assert tok.decode(answer_ids) == example["answer"] + "<|im_end|>"
    assert labels[:len(ids) - len(answer_ids)] == [data.IGNORE_INDEX] * (len(ids) - len(answer_ids))


def test_collate_pads_without_loss(tok):
    examples = data.load_split("train")[:4]
    batch = data.collate(tok, examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == data.IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="max_length"):
        data.collate(tok, examples, max_length=10)


def test_score():
    ex = [{"prompt": "p", "answer": "20210305"}, {"prompt": "q", "answer": "19991231"}]
    assert data.score([" 20210305\n", "1999-12-31"], ex) == 50.0
    assert data.score(["20210305", "19991231"], ex) == 100.0
    with pytest.raises(ValueError, match="predictions"):
        data.score(["x"], ex)
