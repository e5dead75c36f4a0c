"""Which device and compute dtype a notebook runs on."""
import torch


def pick_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bfloat16 on GPUs of compute capability >= 8.0, float16 below (a T4 has no native bf16),
    float32 on the CPU.

    The capability is checked instead of `torch.cuda.is_bf16_supported()`, which says True on a T4
    where bf16 is emulated and slow.
    """
    device = torch.device(device) if device is not None else pick_device()
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16
