"""The first code cell of every notebook calls start_notebook()."""
import torch

from .device import compute_dtype, pick_device


def start_notebook(seed: int = 0) -> tuple[torch.device, torch.dtype]:
    """Seed torch, pick the device and compute dtype, print them and the doctor's one-line summary,
    and return (device, dtype)."""
    torch.manual_seed(seed)
    device = pick_device()
    dtype = compute_dtype(device)
    print(f"qlora_lab on {device.type}, compute dtype {str(dtype).removeprefix('torch.')}")
    print(_doctor_line())
    return device, dtype


def _doctor_line() -> str:
    """The doctor's summary; a broken environment must not stop the setup cell, so errors are shown."""
    from .doctor import summary

    try:
        return summary()
    except Exception as err:  # report, don't block the lesson
        return f"doctor: could not run ({type(err).__name__}: {err}); try python -m qlora_lab.doctor"
