import json
import os
import subprocess
import sys

import pytest
import torch

from qlora_lab import finetune as ft

TINY = dict(steps=4, batch_size=2, num_layers=2, save_every=2, max_length=64, n_train=16, lr=1e-3, warmup_steps=1)


class Interrupt(Exception):
    pass


# Trains TINY in the run folder argv[1] and SIGKILLs itself once step 3 is done (checkpoint 2 written).
KILLED_AT_STEP_3 = """
import json, os, signal, sys
from qlora_lab import finetune as ft

def kill(step, record):
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)

ft.train(ft.FinetuneConfig(**json.loads(sys.argv[2])), sys.argv[1], callback=kill, progress=False)
"""


@pytest.fixture(scope="module")
def tok():
    return ft.load_tokenizer()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tok):
    return ft.train(ft.FinetuneConfig(**TINY), tmp_path_factory.mktemp("full") / "run", tokenizer=tok,
                    progress=False)


def test_lr_schedule_and_batches():
    cfg = ft.FinetuneConfig(lr=1.0, warmup_steps=3)
    assert [ft.lr_at(cfg, s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    first = ft.batch_indices(10, 4, 0, seed=1) + ft.batch_indices(10, 4, 4, seed=1) + ft.batch_indices(10, 2, 8, seed=1)
    assert sorted(first) == list(range(10))  # one epoch visits every example once
    assert ft.batch_indices(10, 4, 8, seed=1)[2:] == ft.batch_indices(10, 2, 10, seed=1)  # crosses into epoch 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="peft"), "backend must be one of"),
    (dict(steps=0), "steps must be a positive int"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(num_layers=0), "num_layers must be None or a positive int"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ft.FinetuneConfig(**kwargs)


@pytest.mark.slow
def test_loss_falls_and_checkpoints_are_complete(full_run):
    log = full_run["log"]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["loss"] < log[0]["loss"]
    assert all(r["memory_bytes"] > 0 and r["grad_norm"] > 0 for r in log)
    ckpts = sorted(p.name for p in (full_run["out"] / ft.CHECKPOINTS).iterdir())
    assert ckpts == ["step-000002", "step-000004"]  # no temporary folders left behind
    assert json.loads((full_run["out"] / ft.LOG_FILE).read_text()) == log


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_curve(tmp_path, tok, full_run):
    out = tmp_path / "run"

    def crash(step, record):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        ft.train(ft.FinetuneConfig(**TINY), out, tokenizer=tok, callback=crash, progress=False)
    assert ft.latest_checkpoint(out).name == "step-000002"
    (out / ft.CHECKPOINTS / "step-000003").mkdir()  # a half-written checkpoint has no state.json: ignored
    with pytest.raises(FileExistsError, match="resume"):
        ft.train(ft.FinetuneConfig(**TINY), out, tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="differ"):
        ft.train(ft.FinetuneConfig(**{**TINY, "lr": 2e-3}), out, resume=True, tokenizer=tok, progress=False)
    resumed = ft.train(ft.FinetuneConfig(**TINY), out, resume=True, tokenizer=tok, progress=False)
    assert ft.max_loss_difference(resumed["log"], full_run["log"]) <= 1e-6
    a = ft.adapter_params(resumed["model"])
    b = ft.adapter_params(full_run["model"])
    assert max(float((a[k] - b[k]).detach().abs().max()) for k in a) <= 1e-6


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_curve(tmp_path, tok, full_run):
    """A run hard-killed (SIGKILL) after step 3 resumes from checkpoint 2 to the uninterrupted curve."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    child = subprocess.run([sys.executable, "-c", KILLED_AT_STEP_3, str(out), json.dumps(TINY)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr
    assert sorted(p.name for p in (out / ft.CHECKPOINTS).iterdir()) == ["step-000002"]  # no temp folders
    assert not (out / ft.LOG_FILE).exists()
    ran = []
    resumed = ft.train(ft.FinetuneConfig(**TINY), out, resume=True, tokenizer=tok, progress=False,
                       callback=lambda step, record: ran.append(step))
    assert ran == [3, 4]  # continued from the checkpoint rather than starting over
    assert ft.max_loss_difference(resumed["log"], full_run["log"]) <= 1e-6
    a = ft.adapter_params(resumed["model"])
    b = ft.adapter_params(full_run["model"])
    assert max(float((a[k] - b[k]).detach().abs().max()) for k in a) <= 1e-6


@pytest.mark.slow
def test_backends_agree(tmp_path, tok, full_run):
    bnb = ft.train(ft.FinetuneConfig(**{**TINY, "backend": "bnb"}), tmp_path / "bnb", tokenizer=tok, progress=False)
    assert ft.max_loss_difference(bnb["log"], full_run["log"]) < 1e-4
    assert isinstance(bnb["optimizer"], torch.optim.AdamW)


def test_quantize_false_keeps_the_base_unquantized():
    from qlora_lab.lora import LoRALinear, LoRALinear4bit, lora_layers
    plain = lora_layers(ft.build_model(ft.FinetuneConfig(num_layers=1, quantize=False))).values()
    assert plain and all(type(layer) is LoRALinear for layer in plain)
    assert all(type(layer) is LoRALinear4bit for layer in lora_layers(ft.build_model(ft.FinetuneConfig(num_layers=1))).values())
    with pytest.raises(TypeError, match="quantize must be True or False"):
        ft.FinetuneConfig(quantize="nf4")


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    from qlora_lab.cli import main
    (tmp_path / "keep.txt").write_text("an earlier run")
    assert main(["finetune", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "an earlier run"


@pytest.mark.slow
def test_cli_runs_scores_and_ships(tmp_path, capsys):
    from qlora_lab.cli import main
    out = tmp_path / "run"
    assert main(["finetune", "--steps", "1", "--out", str(out), "--n-heldout", "2"]) == 0
    printed = capsys.readouterr().out
    assert "exact match before: 0.0% (2 examples)" in printed and "exact match after:" in printed
    assert ft.latest_checkpoint(out).name == "step-000001"
    assert (out / "bundle" / "adapter" / "adapter_config.json").is_file()
