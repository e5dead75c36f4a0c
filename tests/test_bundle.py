import json
import subprocess
import sys

import pytest

from qlora_lab import bundle, data
from qlora_lab import finetune as ft

TINY = dict(steps=3, batch_size=2, num_layers=2, save_every=3, max_length=64, n_train=8, lr=1e-3, warmup_steps=0)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("ship")
    run = ft.train(ft.FinetuneConfig(**TINY), root / "run", progress=False)
    config = ft.FinetuneConfig(**TINY)
    path = bundle.save_bundle(run["model"], run["tokenizer"], config, root / "bundle", n_reference=3)
    return path, run, config


@pytest.mark.slow
def test_bundle_holds_everything(shipped):
    path, _, _ = shipped
    assert (path / "adapter" / "adapter_config.json").is_file()
    assert (path / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((path / bundle.QUANT_FILE).read_text())["quant_type"] == "nf4"
    assert json.loads((path / "run_config.json").read_text())["num_layers"] == 2
    assert (path / "tokenizer" / "tokenizer_config.json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".bundle")]  # no temp folder left


@pytest.mark.slow
def test_existing_bundle_is_not_overwritten(shipped):
    path, run, config = shipped
    with pytest.raises(FileExistsError, match="overwrite"):
        bundle.save_bundle(run["model"], run["tokenizer"], config, path)


@pytest.mark.slow
def test_fresh_process_reproduces_greedy_outputs(shipped):
    path, _, _ = shipped
    code = ("import json, sys; from qlora_lab import bundle; "
            f"print(json.dumps(bundle.check_reproduction({str(path)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 3 and result["n_equal"] == 3, result["mismatches"]


@pytest.mark.slow
def test_merge_comparison(shipped):
    path, _, _ = shipped
    result = bundle.merge_comparison(path, data.load_split("heldout")[:2])
    assert set(result) == {"quantized", "merged_quantized", "merged_original"}
    for name in ("merged_quantized", "merged_original"):
        assert 0.0 < result[name]["max_abs_logit_diff"] < 50.0
        assert 0.0 <= result[name]["same_answers"] <= 1.0


def test_incomplete_bundle_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete bundle"):
        bundle.load_bundle(tmp_path)
