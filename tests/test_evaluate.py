import math

import pytest
import torch

from qlora_lab import data, evaluate
from qlora_lab.finetune import load_tokenizer
from qlora_lab.model import load_pretrained


@pytest.fixture(scope="module")
def small():
    return load_pretrained(2, dtype=torch.float32).eval(), load_tokenizer()


def test_batched_losses_match_one_at_a_time(small):
    model, tok = small
    examples = data.load_split("heldout")[:5]
    batched, counts = evaluate.example_losses(model, tok, examples, batch_size=5)
    single, _ = evaluate.example_losses(model, tok, examples, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-5)  # right padding leaks into no example's loss
    ids = torch.tensor([data.encode_example(tok, examples[0])[0]])
    with torch.no_grad():
        hf_loss = model(input_ids=ids, labels=ids).loss  # transformers' own shifted mean loss
    assert counts[0] == ids.shape[1] - 1
    assert math.isclose(evaluate.perplexity(model, tok, examples[:1]), math.exp(float(hf_loss)), rel_tol=1e-5)


@pytest.mark.slow
def test_perplexity_table_restores_weights_and_ranks_variants(small):
    model, tok = small
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = data.load_split("heldout")[:4]
    table = evaluate.perplexity_table(model, tok, examples)
    assert list(table) == list(evaluate.VARIANTS)
    assert all(math.isfinite(row["ppl"]) and row["ppl"] > 1 for row in table.values())
    assert table["NF4"]["ppl"] != table["fp32"]["ppl"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fp32_again = evaluate.example_losses(model, tok, examples)[0]
    assert torch.allclose(fp32_again, table["fp32"]["losses"])
    worst = evaluate.loss_changes(table, "Int4", examples, k=2)
    assert len(worst) == 2 and worst[0]["change"] >= worst[1]["change"]


def test_unknown_variant(small):
    model, tok = small
    with pytest.raises(ValueError, match="variants must be among"):
        evaluate.perplexity_table(model, tok, data.load_split("heldout")[:1], variants=("NF8",))
    with pytest.raises(ValueError, match="at least one example"):
        evaluate.example_losses(model, tok, [])
