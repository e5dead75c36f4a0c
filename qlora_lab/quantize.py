"""Blockwise 4-bit quantization (NF4, FP4, Int4) with optional double quantization, stored in
bitsandbytes' layout and bit-exact with bitsandbytes' CPU path.

How a weight becomes 4 bits:
1. Flatten it and cut it into blocks of `blocksize` values; each block keeps its absmax (float32).
2. Scale each value into [-1, 1]: multiply a full block by 1/absmax, divide the last, partial block
   by its absmax (bitsandbytes does exactly this; the two differ in the last bit, which moves
   values sitting on a threshold).
3. Pick the code whose value is nearest: compare against the midpoints between neighbouring sorted
   code values; a value equal to a midpoint goes to the lower code.
4. Pack two codes per byte, the even-index element in the high nibble.
With double quantization the absmax constants are themselves quantized (see blockwise8.py).

The reference is bitsandbytes 0.50's CPU path. On CUDA the same torch ops run; bitsandbytes' CUDA
kernel uses its own decimal thresholds, so there a value within float rounding of a threshold may
get the neighbouring code (not checked here: no GPU was available).
"""
import sys
from dataclasses import dataclass, replace

import torch

from . import blockwise8
from .codebooks import codebook

QUANT_TYPES = ("nf4", "fp4", "int4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DQ_BLOCKSIZE = 256  # second-level block size of double quantization (QLoRA paper, bitsandbytes)


@dataclass(frozen=True)
class _Tables:
    """Per-(quant_type, device) lookup tables.

    code:   the 16 values, indexed by code.
    bounds: the midpoints between neighbouring sorted values (what a scaled weight is compared to).
    remap:  a byte of two sorted-order indices -> the byte of the two codes (FP4/Int4 only).
    pairs:  a byte -> its two float32 values, stored as one float64 so one gather fetches both.
    quads:  two bytes, read as one little-endian uint16 -> their four float32 values, stored as one
            complex128 (1 MiB): one gather per 4 weights, the fast dequantize path on the CPU.
    """

    code: torch.Tensor
    bounds: torch.Tensor
    remap: torch.Tensor
    pairs: torch.Tensor
    quads: torch.Tensor


_cache: dict = {}


def _tables(quant_type: str, device: torch.device) -> _Tables:
    key = (quant_type, device)
    if key not in _cache:
        code = codebook(quant_type)
        # Int4 holds zero twice (codes 7 and 8); leave code 8 out so zero always gets code 7.
        keep = torch.tensor([i for i in range(16) if not (quant_type == "int4" and i == 8)])
        # Stable sort: of two equal values (FP4's two zeros) the lower code comes first, as
        # bitsandbytes' argsort orders them on the CPU.
        sorted_values, pos = code[keep].sort(stable=True)
        order = torch.cat([keep[pos], torch.zeros(16 - len(keep), dtype=torch.long)])
        byte = torch.arange(256)
        hi, lo = byte >> 4, byte & 15
        two = torch.arange(65536)
        first, second = (two & 255, two >> 8) if sys.byteorder == "little" else (two >> 8, two & 255)
        quads = torch.stack([code[first >> 4], code[first & 15], code[second >> 4], code[second & 15]], 1)
        tables = _Tables(
            code=code,
            bounds=(sorted_values[:-1] + sorted_values[1:]) / 2,
            remap=((order[hi] << 4) | order[lo]).to(torch.uint8),
            pairs=torch.stack([code[hi], code[lo]], 1).contiguous().view(torch.float64)[:, 0],
            quads=quads.contiguous().view(torch.complex128)[:, 0],
        )
        _cache[key] = _Tables(*(t.to(device) for t in vars(tables).values()))
    return _cache[key]


@dataclass(frozen=True, eq=False)
class Quantized4bit:
    """A 4-bit quantized tensor.

    packed:   uint8, shape ((n + 1) // 2, 1); element 2i in the high nibble of byte i, 2i+1 in the low.
    absmax:   float32 per block of `blocksize` (ceil(n / blocksize),); with double quantization the
              uint8 codes of those constants.
    offset:   double quantization only: 0-d float32, the mean subtracted from the constants.
    absmax2:  double quantization only: float32 per block of 256 constants.
    shape, dtype: the original tensor's shape and dtype; quant_type: "nf4", "fp4" or "int4".
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    blocksize2: int = DQ_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def code(self) -> torch.Tensor:
        """The 16 values the 4-bit codes stand for, in units of the block's absmax."""
        return _tables(self.quant_type, self.device).code

    @property
    def nbytes(self) -> int:
        """Bytes of everything this tensor stores: codes, constants and, with double quantization,
        the offset and second-level constants. The fixed codebooks (64 bytes for 16 values, 1 KiB
        for the 8-bit dynamic code) belong to the format, not the tensor, and are not counted."""
        parts = [self.packed, self.absmax, self.offset, self.absmax2]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_param(self) -> float:
        """Stored bits per weight, constants included: nbytes * 8 / number of weights."""
        return self.nbytes * 8 / self.numel

    def absmax_float(self) -> torch.Tensor:
        """The float32 absmax of each block; with double quantization, dequantized first."""
        if not self.double_quant:
            return self.absmax
        return blockwise8.dequantize(self.absmax, self.absmax2, self.blocksize2) + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor back in `dtype` (default: the original dtype), shape `shape`. Each value is
        code value * block absmax in float32, then rounded to `dtype`, as bitsandbytes does."""
        dtype = self.dtype if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of torch.float32, torch.float16, torch.bfloat16, got {dtype}")
        n, bs = self.numel, self.blocksize
        values = _lookup(self.packed.view(-1), _tables(self.quant_type, self.device))
        absmax = self.absmax_float()
        full = n - n % bs
        if full:
            values[:full].view(-1, bs).mul_(absmax[: full // bs, None])
        if full < n:
            values[full:n].mul_(absmax[-1])
        if dtype != torch.float32:
            return values[:n].to(dtype).view(self.shape)
        if n < values.numel():
            values = values[:n].clone()  # drop the padding value
        return values.view(self.shape)

    def to(self, device) -> "Quantized4bit":
        """A copy on `device`."""
        move = lambda t: None if t is None else t.to(device, copy=True)  # noqa: E731
        return replace(self, packed=move(self.packed), absmax=move(self.absmax),
                       offset=move(self.offset), absmax2=move(self.absmax2))

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"Quantized4bit({self.quant_type}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"blocksize={self.blocksize}{dq}, {self.bits_per_param:.4f} bits/param)")


def _lookup(packed: torch.Tensor, tables: _Tables) -> torch.Tensor:
    """The code values of packed bytes, 2 per byte, as a new float32 vector. On the CPU, pairs of
    bytes index the 65536-entry table (one gather per 4 values); elsewhere each byte indexes the
    256-entry table."""
    nbytes = packed.numel()
    out = torch.empty(2 * nbytes, dtype=torch.float32, device=packed.device)
    even = nbytes - nbytes % 2 if packed.device.type == "cpu" else 0
    if even:
        index = packed[:even].view(torch.uint16).int()
        torch.index_select(tables.quads, 0, index, out=out[: 2 * even].view(torch.complex128))
    if even < nbytes:
        rest = out[2 * even:].view(torch.float64)
        torch.index_select(tables.pairs, 0, packed[even:].int(), out=rest)
    return out


def check_blocksize(blocksize, name: str = "blocksize") -> None:
    """A block size must be a power-of-two int >= 2."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two >= 2 (bitsandbytes accepts 32 ... 4096), got {blocksize!r}")


def check_weight(w, name: str = "w") -> None:
    """A weight to quantize: a non-empty float32/float16/bfloat16 tensor of finite values."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}); it needs at least one value")
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        nan = int(torch.isnan(w).sum())
        inf = int((~finite).sum()) - nan
        raise ValueError(f"{name} must hold finite values only; it has {nan} NaN and {inf} Inf")


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = False) -> Quantized4bit:
    """Quantize `w` blockwise to 4 bits: `quant_type` "nf4", "fp4" or "int4", one float32 absmax
    per `blocksize` values; with `double_quant`, those constants go to 8 bits in blocks of 256.

    For nf4 and fp4 the packed bytes and constants equal bitsandbytes.functional.quantize_4bit's
    (compress_statistics=double_quant) on the CPU. Runs on w's device with plain torch ops.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of 'nf4', 'fp4', 'int4', got {quant_type!r}")
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    check_weight(w)

    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    scaled = torch.empty(n + n % 2, dtype=torch.float32, device=w.device)
    if n % 2:
        scaled[n] = 0.0  # padding: the last byte's low nibble
    blocks = []
    if full:
        body = flat[:full].view(-1, blocksize)
        absmax = body.abs().amax(dim=1)
        recip = 1.0 / absmax.clamp(min=1e-38)
        torch.mul(body, recip[:, None], out=scaled[:full].view(-1, blocksize))
        blocks.append(absmax)
    if full < n:
        tail = flat[full:]
        # bitsandbytes stores the partial block's absmax clamped to >= 1e-38 (full blocks keep 0)
        tail_max = tail.abs().amax().clamp(min=1e-38)
        torch.div(tail, tail_max, out=scaled[full:n])
        blocks.append(tail_max[None])
    absmax = blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    tables = _tables(quant_type, w.device)
    idx = torch.bucketize(scaled, tables.bounds, out_int32=True).view(-1, 2)
    packed = (idx[:, 0] * 16 + idx[:, 1]).to(torch.uint8)
    if quant_type != "nf4":  # sorted-order indices -> the codes' bit patterns
        packed = torch.index_select(tables.remap, 0, packed.int())
    q = Quantized4bit(packed=packed[:, None], absmax=absmax, shape=w.shape, dtype=w.dtype,
                      quant_type=quant_type, blocksize=blocksize)
    return double_quantize(q) if double_quant else q


def double_quantize(q: Quantized4bit, blocksize2: int = DQ_BLOCKSIZE) -> Quantized4bit:
    """Double quantization of q's constants (QLoRA, section 3): subtract their mean (the offset,
    kept in float32), quantize the rest to 8 bits with the dynamic code in blocks of `blocksize2`
    (256 in QLoRA and bitsandbytes), one float32 absmax per block. The 4-bit codes are unchanged."""
    if q.double_quant:
        raise ValueError("q is already double-quantized")
    check_blocksize(blocksize2, "blocksize2")
    offset = q.absmax.mean()
    codes, absmax2 = blockwise8.quantize(q.absmax - offset, blocksize2)
    return replace(q, absmax=codes, offset=offset, absmax2=absmax2, blocksize2=blocksize2)


def quantize_with_code(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Round trip of x through any sorted codebook (e.g. a k-bit NormalFloat): blockwise absmax,
    nearest code value, back to float32. For comparing codes; quantize_4bit is the storage format."""
    check_weight(x, "x")
    check_blocksize(blocksize)
    values = code.to(x.device).sort().values
    flat = x.detach().reshape(-1).float()
    pad = -flat.numel() % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    index = torch.bucketize(blocks / absmax, (values[:-1] + values[1:]) / 2)
    return (values[index] * absmax).view(-1)[: flat.numel()].view(x.shape)


def absmax_quantize(x: torch.Tensor, bits: int = 8, blocksize: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax integer quantization, the idea before any codebook: each block (or the whole
    tensor when blocksize is None) is scaled by (2**(bits-1) - 1) / absmax and rounded, so codes are
    ints in [-(2**(bits-1) - 1), 2**(bits-1) - 1]. Returns (codes int32 like x, absmax per block)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int from 2 to 16, got {bits!r}")
    check_weight(x, "x")
    flat = x.detach().reshape(-1).float()
    size = flat.numel() if blocksize is None else blocksize
    if blocksize is not None:
        check_blocksize(blocksize)
    pad = -flat.numel() % size
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, size)
    absmax = blocks.abs().amax(dim=1)
    levels = 2 ** (bits - 1) - 1
    codes = torch.round(blocks * (levels / absmax.clamp(min=1e-38))[:, None]).int()
    return codes.view(-1)[: flat.numel()].view(x.shape), absmax


def absmax_dequantize(codes: torch.Tensor, absmax: torch.Tensor, bits: int = 8,
                      blocksize: int | None = None) -> torch.Tensor:
    """Float32 values back from absmax_quantize: code * absmax / (2**(bits-1) - 1), blockwise."""
    n = codes.numel()
    size = n if blocksize is None else blocksize
    block = torch.arange(n, device=codes.device) // size
    return (codes.reshape(-1).float() * (absmax[block] / (2 ** (bits - 1) - 1))).view(codes.shape)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes (uint8, 0..15) of bitsandbytes-layout packed bytes: high nibble first."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).view(-1)[:n]
