import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_lab import data, evaluate
from qlora_lab.finetune import load_tokenizer
from qlora_lab.model import converted_model_dir


@pytest.fixture(scope="module")
def small():
    model = AutoModelForCausalLM.from_pretrained(converted_model_dir(), dtype=torch.float32, local_files_only=True,
                                                 num_hidden_layers=2)
    return model.eval(), load_tokenizer()


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
