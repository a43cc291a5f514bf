"""Counter-based noise for the sampler's race: u[b, v] in (0, 1) from a hash of (seed, step, v).

A row's noise is a pure function of its own (seed, step) and the vocabulary index: not of the
batch, its order, or how often a step ran (runtime/sampler.py relies on that for batch invariance
and preemption), and integer ops plus one exact fp32 multiply give the same bits on CPU and CUDA.
The (B, V) hash runs in int32, in place: it is most of the sampler's ops and bytes.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFF_FFFF
# lowbias32-style mixer (xorshift-multiply, constants from skeeto/hash-prospector, 2-round variant
# by TheIronBorn). Both multipliers are < 2**31, so for x < 2**32 every product is < 2**63 and int64
# never overflows; masking to 32 bits after each multiply gives exactly uint32 wrap-around.
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97
_SEED_SALT, _INDEX_SALT = 0x9E3779B9, 0x85EBCA6B  # so that seed 0 / index 0 are not fixed points
# u = (m + 1) * fp32(1 / (2**24 + 1)) for the 24-bit integer m: the constant is exactly
# 2**-24 - 2**-48 in fp32 and m + 1 <= 2**24 is exact, so one correctly rounded fp32 multiply gives
# the same bits on every device; the largest value is exactly 1 - 2**-24 < 1, the smallest > 0.
_U_SCALE = 2.0**-24 - 2.0**-48
_SIGN32 = 0x8000_0000


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit mix of int64 values in [0, 2**32) (any shape) → same range."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 15)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) → int32 holding the same 32 bits (two's complement)."""
    return ((x ^ _SIGN32) - _SIGN32).to(torch.int32)


def _xor_shifted_(x: torch.Tensor, shift: int, tmp: torch.Tensor) -> None:
    """x ^= x >> shift on int32 holding uint32 bits, the shift logical: torch's is arithmetic, so
    the copies of the sign bit it shifts in are masked off. tmp: scratch of x's shape."""
    torch.bitwise_right_shift(x, shift, out=tmp)
    x.bitwise_xor_(tmp.bitwise_and_((1 << (32 - shift)) - 1))


def _mix32_int32_(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """`_mix32` in place on contiguous int32 holding the uint32 bits, with one scratch tensor:
    4 bytes per value instead of int64's 8 and no new tensor per op. int32 multiplies wrap mod
    2**32 on CPU and CUDA, which in two's complement is the uint32 product `_mix32` masks out of its
    int64 one; xor touches the same bits either way (tests compare both over edge and random values).
    x ^= x >> 16 only xors the high half-word into the low one: as int16 pairs (little-endian, as
    CPUs and CUDA GPUs are: low half first) that is one op writing 2 bytes per value, not three."""
    halves = x.view(torch.int16)
    halves[..., 0::2].bitwise_xor_(halves[..., 1::2])
    x.mul_(_MUL1)
    _xor_shifted_(x, 15, tmp)
    x.mul_(_MUL2)
    _xor_shifted_(x, 15, tmp)


def _row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B,) int64 seeds in [0, 2**63) and steps >= 0 → (B,) 32-bit keys in int64.

    Absorbs the seed's low and high words, then the step's high and low words, each through the
    bijective mixer: for a fixed seed, steps < 2**32 get distinct keys (the last absorption is a
    bijection of the step's low word), and a seed change in any bit (0 or 40 alike) changes the key.
    """
    k = _mix32((seeds & _MASK32) ^ _SEED_SALT)
    k = _mix32(k ^ ((seeds >> 32) & _MASK32))
    k = _mix32(k ^ ((steps >> 32) & _MASK32))
    return _mix32(k ^ (steps & _MASK32))


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """int64 integers m in [0, 2**24) → fp32 u ≈ (m + 1) / (2**24 + 1), strictly inside (0, 1)."""
    return (bits + 1).to(torch.float32) * _U_SCALE


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B,) int64 seeds, (B,) int64 steps → (B, V) fp32 in (0, 1), on seeds.device.

    u[b, v] is a pure function of (seeds[b], steps[b], v): 24 bits of mix32(key(seed, step) ^
    mix32(v ^ salt)), as `bits_to_uniform`. Integer math plus one exact-operand multiply:
    bit-identical on CPU and CUDA. The (B, V) work runs in place on two int32 tensors, and u takes
    the scratch one's memory: 8 bytes per value live, about 60 written.
    """
    index = torch.arange(vocab_size, dtype=torch.int32, device=seeds.device)
    index.bitwise_xor_(_INDEX_SALT - 2**32)  # the salt's 32 bits as an int32
    _mix32_int32_(index, torch.empty_like(index))  # (V,)
    B = seeds.shape[0]
    h = torch.empty(B, vocab_size, dtype=torch.int32, device=seeds.device)
    tmp = torch.empty_like(h)
    torch.bitwise_xor(_as_int32(_row_keys(seeds, steps))[:, None], index[None, :], out=h)
    _mix32_int32_(h, tmp)
    h.bitwise_right_shift_(8).bitwise_and_(0xFF_FFFF).add_(1)  # m + 1, m = the top 24 bits
    u = tmp.view(torch.float32)
    u.copy_(h)  # exact: m + 1 <= 2**24
    return u.mul_(_U_SCALE)
