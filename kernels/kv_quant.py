"""FP8 (e4m3) KV-cache pages: the quantize-on-store and dequantize-on-load numerics.

A cache in torch.float8_e4m3fn holds per layer one fp32 scale for keys and one for values:

    store:  c = RNE_e4m3(clamp(x * (1 / scale), -448, 448))      (x in the model dtype, fp32 math)
    load:   x' = (fp32(c) * scale) → the model dtype

1 / scale is rounded to fp32 once on the host (`inv_scale`), and every product is one fp32
rounding, so the Triton kernels (kv_cache_write, rotary_write_kv, both attentions) and the torch
references here agree bit for bit. Values beyond ±448 · scale saturate instead of becoming NaN
(the GPU's `cvt.rn.satfinite` behaviour, and torch's). e4m3 has 3 mantissa bits:
|x' - x| <= 2^-4 |x| for |x| / scale in the normal range [2^-6, 448], and <= 2^-10 · scale below
it (subnormals).

`round_e4m3` rounds onto the e4m3 grid in fp32 integer arithmetic before the (then exact) cast:
the Triton 3.9 interpreter's fp32 → fp8e4nv cast drops the carry when rounding crosses a power of
two (125.2 → 64 instead of 128), so a plain `.to(tl.float8e4nv)` cannot be tested on CPU. On the
GPU the same code costs a few integer ops per element of a bandwidth-bound store.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                      # largest finite e4m3fn value


def is_fp8(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype == FP8_KV_DTYPE


def to_fp32(x: float) -> float:
    """x rounded to the nearest fp32 (struct, not a tensor: launchers call it every step)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def inv_scale(scale: float) -> float:
    """1 / scale rounded to fp32: the multiplier the store uses on host and device alike."""
    return to_fp32(1.0 / scale)


def check_scale(name: str, scale) -> None:
    """Scales are fp32 numbers (Triton passes a float argument as fp32): one that is not would be
    rounded differently by the kernels and the references."""
    if not isinstance(scale, float) or not 0.0 < scale < float("inf"):
        raise ValueError(f"{name} must be a positive finite float, got {scale!r}")
    try:
        exact = to_fp32(scale) == scale and inv_scale(scale) < float("inf")
    except OverflowError:       # struct refuses what fp32 cannot hold
        exact = False
    if not exact:
        raise ValueError(f"{name} {scale!r} is not an fp32 number with an fp32 reciprocal")


def check_scales(k_cache: torch.Tensor | None, k_scale, v_scale) -> None:
    """The launchers' scale check, for an fp8 cache only (other caches ignore the scales)."""
    if is_fp8(k_cache):
        check_scale("k_scale", k_scale)
        check_scale("v_scale", v_scale)


@triton.jit
def round_e4m3(x):
    """fp32 x → the nearest e4m3fn value (ties to even), saturated at ±448, still in fp32."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    bits = x.to(tl.int32, bitcast=True)
    # Normal range: keep 3 of fp32's 23 mantissa bits, round to nearest even; a carry out of the
    # mantissa moves the exponent up, as it should.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Below 2^-6: multiples of 2^-9. |x| * 512 < 8, so adding 1.5 * 2^23 rounds it to an integer
    # (ties to even) in fp32; the sign is put back from the bits (-0 stays -0, as torch casts it).
    ax = tl.abs(x)
    sub = ((ax * 512.0 + 12582912.0) - 12582912.0) * (1.0 / 512.0)
    sub = tl.where(bits < 0, -sub, sub)
    return tl.where(ax < 0.015625, sub, normal)


@triton.jit
def load_kv(ptrs, mask, scale, like, KV_FP8: tl.constexpr):
    """A tile of cached K or V in `like`'s dtype (the model dtype): from an fp8 cache the exact
    fp8 → fp32 cast, one fp32 product with the layer's scale, one rounding; else as stored."""
    c = tl.load(ptrs, mask=mask, other=0.0)
    if KV_FP8:  # one return: compiled Triton type-checks every return, even a dead branch's
        c = (c.to(tl.float32) * scale).to(like.dtype)
    return c


def quantize_kv_ref(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x (any float dtype) → float8_e4m3fn, as the kernels store it."""
    return (x.float() * inv_scale(scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def dequantize_kv_ref(c: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (c.float() * scale).to(dtype)


def load_kv_ref(cache_rows: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Rows read from a KV cache, in `dtype`: dequantized from fp8, else a plain cast."""
    if is_fp8(cache_rows):
        return dequantize_kv_ref(cache_rows, scale, dtype)
    return cache_rows.to(dtype)


def store_kv_ref(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Rows x as a cache of `cache_dtype` stores them: quantized to fp8, else a plain cast."""
    if cache_dtype == FP8_KV_DTYPE:
        return quantize_kv_ref(x, scale)
    return x.to(cache_dtype)


def triton_fp8_ok(device: torch.device) -> bool:
    """Compiled Triton has float8e4nv from sm_89 (Ada, Hopper) on; the interpreter always."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)

