"""8-bit blockwise quantization with bitsandbytes' signed dynamic code, the second level of double
quantization (QLoRA, section 3): the first-level absmax constants, minus their mean, are cut into
blocks of 256, each block scaled by its own absmax and mapped to one of the 256 dynamic values.

Bit-exact with bitsandbytes 0.50's CPU kernel, which does not search the code per value: it
rounds the scaled value v in [-1, 1] to one of 65536 evenly spaced grid points,
i = trunc(((v + 1) * 0.5) * 65535 + 0.5), and looks up the code nearest to that grid point in a
precomputed table (grid point -> number of code midpoints below it). So a value within half a grid
step (1.5e-5) of a midpoint between two codes can go to the farther one; this module does the same.
"""
import torch

from .codebooks import dynamic_codebook

LUT_SIZE = 65536
_tables: dict = {}


def _cached(kind: str, device: torch.device) -> torch.Tensor:
    """The dynamic code ("code") or the grid-point lookup table ("lut") on `device`."""
    key = (kind, device)
    if key not in _tables:
        code = dynamic_codebook()
        if kind == "code":
            value = code
        else:
            midpoints = 0.5 * (code[:-1] + code[1:])
            grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
            value = torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)
        _tables[key] = value.to(device)
    return _tables[key]


def dynamic_code(device: torch.device) -> torch.Tensor:
    """The 256-entry dynamic code on `device` (cached)."""
    return _cached("code", device)


def quantize(x: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float tensor blockwise to 8 bits: returns (uint8 codes shaped like x, float32
    absmax per block). A block whose absmax is 0 gets code 0 throughout, as in bitsandbytes."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.zeros(nblocks * blocksize, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    blocks = padded.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    v = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    grid_index = (((v + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).int()  # truncation, as the C cast
    codes = _cached("lut", x.device)[grid_index]
    codes[absmax == 0] = 0
    return codes.view(-1)[:n].view(x.shape), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """Float32 values back from (codes, absmax): code value * block absmax."""
    n = codes.numel()
    nblocks = absmax.numel()
    values = torch.zeros(nblocks * blocksize, dtype=torch.float32, device=codes.device)
    torch.index_select(dynamic_code(codes.device), 0, codes.reshape(-1).int(), out=values[:n])
    values.view(nblocks, blocksize).mul_(absmax[:, None])
    return values[:n].view(codes.shape)
