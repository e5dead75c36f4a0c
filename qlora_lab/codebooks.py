"""The codebooks of 4-bit and 8-bit block quantization, built from their definitions.

A codebook is a float32 tensor indexed by the stored code: entry i is the value (in units of the
block's absmax) that code i stands for. For NF4 the index order is also the sorted order; FP4 and
Int4 are listed in bit-pattern order, the top bit being the sign, as bitsandbytes stores them.
"""
import torch

# bitsandbytes' create_normal_map(offset=0.9677083): the probability of the outermost quantile.
# A reading often given is the mean of 1 - 1/(2*15) and 1 - 1/(2*16) = 0.96770833...; bitsandbytes
# uses the constant below, and the last digits matter at the 1e-7 level.
NF4_OFFSET = 0.9677083


def normal_float_codebook(bits: int = 4, offset: float = NF4_OFFSET) -> torch.Tensor:
    """The k-bit NormalFloat code (QLoRA, Dettmers et al. 2023, section 3): 2**bits sorted float32
    values in [-1, 1] with an exact zero.

    Standard normal quantiles at probabilities evenly spaced from 0.5 to `offset`:
    2**(bits-1) of them for the positive half, 2**(bits-1) - 1 for the negative half, and one zero
    shared by both halves (this asymmetry is what buys the exact zero). The values are divided by
    the largest, so the code spans [-1, 1]. `offset` in (0.5, 1) is the probability whose quantile
    becomes 1.0; it keeps the outermost value finite.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8, got {bits!r}")
    if not isinstance(offset, (int, float)) or not 0.5 < offset < 1.0:
        raise ValueError(f"offset must be a probability in (0.5, 1), got {offset!r}")
    half = 2 ** (bits - 1)
    # Probabilities in float32 (as bitsandbytes' torch.linspace makes them), quantiles in float64.
    p_pos = torch.linspace(offset, 0.5, half + 1, dtype=torch.float32)[:-1].double()
    p_neg = torch.linspace(offset, 0.5, half, dtype=torch.float32)[:-1].double()
    positive = torch.special.ndtri(p_pos)
    negative = -torch.special.ndtri(p_neg)
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)])
    values = values.sort().values.float()
    return values / values.max()


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values: normal_float_codebook(4), sorted, exact zero at index 7; equal to
    bitsandbytes' get_4bit_type("nf4") to within 1e-7."""
    return normal_float_codebook(4, NF4_OFFSET)


def fp4_codebook() -> torch.Tensor:
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, its own bias), 16 float32 values in
    bit-pattern order, divided by the largest magnitude (12).

    For the three bits below the sign, e (2 bits) then m (1 bit): e = 0 is subnormal, m * 1/16;
    otherwise 2**(4 - e) * (1 + m/2), so 0b001 -> 0.0625, 0b010 -> 8, 0b100 -> 4, 0b110 -> 2.
    Codes 0 and 8 (sign bit set) both hold 0.0, stored as +0.0 as in bitsandbytes' table. This is
    not the OCP MX E2M1 grid {0, 0.5, ..., 6}.
    """
    magnitudes = []
    for bits3 in range(8):
        e, m = bits3 >> 1, bits3 & 1
        magnitudes.append(m / 16 if e == 0 else 2.0 ** (4 - e) * (1 + m / 2))
    values = torch.tensor(magnitudes + [-v for v in magnitudes], dtype=torch.float32)
    values[8] = 0.0  # the "-0" code, stored as +0.0
    return values / values.abs().max()


def int4_codebook() -> torch.Tensor:
    """The symmetric Int4 code in bitsandbytes' bit-pattern order: codes 0..7 are 7/7 .. 0/7,
    codes 8..15 are -0/7 .. -7/7 (15 distinct levels; code 8, a second zero stored as +0.0, is
    never produced by quantize_4bit)."""
    levels = [7 - i for i in range(8)] + [-(i - 8) for i in range(8, 16)]
    return torch.tensor(levels, dtype=torch.float32) / 7


def dynamic_codebook() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (create_dynamic_map(signed=True)): 256 sorted
    float32 values in [-0.99297, 1], used by double quantization for the absmax constants.

    One sign bit; the next run of zero bits sets a decimal exponent 10**-6 .. 10**0 and the rest
    is a linear fraction: exponent level i (0..6) holds 2**i values at the midpoints of
    linspace(0.1, 1, 2**i + 1) times 10**(i - 6), for each sign; plus 0 and 1.0.
    (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep Learning".)
    """
    total_bits, exponent_bits = 8, 7
    values = []
    for i in range(exponent_bits):
        count = 2 ** (i + total_bits - 1 - exponent_bits) + 1
        edges = torch.linspace(0.1, 1, count, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(exponent_bits - 1) + i)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    assert len(values) == 2**total_bits
    return torch.tensor(sorted(values), dtype=torch.float32)


def largest_gap(code: torch.Tensor) -> float:
    """The largest distance between neighbouring values of a codebook (any order)."""
    return float(code.sort().values.diff().max())


def codebook(quant_type: str) -> torch.Tensor:
    """The 16-entry codebook of a 4-bit quant_type: "nf4", "fp4" or "int4"."""
    builders = {"nf4": nf4_codebook, "fp4": fp4_codebook, "int4": int4_codebook}
    if quant_type not in builders:
        raise ValueError(f"quant_type must be one of 'nf4', 'fp4', 'int4', got {quant_type!r}")
    return builders[quant_type]()


def expected_quantile_offset(bits: int) -> float:
    """The often-quoted reading of the offset for k bits: the mean of 1 - 1/(2*(2**k - 1)) and
    1 - 1/(2*2**k) (0.96770833 for k = 4; bitsandbytes uses 0.9677083)."""
    return (1 - 1 / (2 * (2**bits - 1)) + 1 - 1 / (2 * 2**bits)) / 2


__all__ = [
    "NF4_OFFSET", "normal_float_codebook", "nf4_codebook", "fp4_codebook", "int4_codebook",
    "dynamic_codebook", "largest_gap", "codebook", "expected_quantile_offset",
]
