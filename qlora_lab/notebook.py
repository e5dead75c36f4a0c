"""The first code cell of every notebook calls start_notebook()."""
import torch

from .device import compute_dtype, pick_device


def start_notebook(seed: int = 0) -> tuple[torch.device, torch.dtype]:
    """Seed torch, pick the device and compute dtype, print them, and return both."""
    torch.manual_seed(seed)
    device = pick_device()
    dtype = compute_dtype(device)
    print(f"qlora_lab on {device.type}, compute dtype {str(dtype).removeprefix('torch.')}")
    return device, dtype
