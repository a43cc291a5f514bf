"""`LLaVA.from_pretrained`: the argument checks (quantization, KV-cache dtype, device and dtype,
backend) made before any weight is read, then the checkpoint loaded in this process or, with
tensor_parallel_size > 1, as rank 0 beside N-1 worker processes that load their own shards."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastllava.kernels.ops import get_ops
from fastllava.loading import load_checkpoint
from fastllava.preprocess.image_io import ImageLimits
from fastllava.quant_config import QUANTIZATIONS
from fastllava.runtime.build import check_kv_cache_dtype
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.tp_driver import TPDriver

if TYPE_CHECKING:
    from fastllava.api import LLaVA


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU multiplies bf16 in hardware: AMX-BF16 tiles or AVX512-BF16 dot products,
    the instructions oneDNN runs torch's bf16 matmuls on. Elsewhere a bf16 matmul is emulated
    (converted to fp32 and back) and slower than fp32. Read from the kernel's CPU flags (Linux);
    False where they cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"amx_bf16", "avx512_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def _resolve_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        # "cuda" means the caller's current GPU, now: pinned here, because an unindexed device
        # is re-read on every thread that uses it (image preprocessing in server threads, whose
        # current device is cuda:0) and tensor-parallel ranks count their GPUs from its index.
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif dtype == "auto":    # the fastest dtype the device computes natively
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        dtype = torch.bfloat16 if native else torch.float32
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    elif dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return device, dtype


class PretrainedMixin:
    """Mixed into `LLaVA`: `from_pretrained` and its tensor-parallel path, both ending in
    `cls(ckpt, backend, runtime, image_limits[, tp=driver])`."""

    @classmethod
    def from_pretrained(cls, model: str | Path, device=None, dtype=None, *, progress: bool = False,
                        backend: str = "auto", revision: str | None = None,
                        runtime: RuntimeConfig = RuntimeConfig(),
                        image_limits: ImageLimits = ImageLimits(),
                        quantization: str | None = None, tensor_parallel_size: int = 1,
                        kv_cache_dtype: str | None = None) -> LLaVA:
        """Load a LLaVA-1.5 / LLaVA-NeXT checkpoint from a local folder or a hub id.

        device None → CUDA when available, else CPU; dtype None → bf16 on CUDA, fp32 on CPU
        (token-exact with transformers in fp32); dtype "auto" → bf16 on CUDA and on CPUs that
        multiply bf16 natively (AMX / AVX512-BF16: several times faster prefill, half the
        memory, no longer token-exact with fp32), fp32 on other CPUs.
        progress=True shows a progress bar while the weights load. `runtime` sizes the KV pool,
        batching, caches and CUDA graphs (see RuntimeConfig); a request's prompt (image included)
        plus output is capped at min(max_context, max_position_embeddings, the KV pool).
        quantization="fp8" runs the decoder's linear layers in FP8 e4m3 (per-channel weight
        scales, per-token activation scales), quantizing a bf16/fp16/fp32 checkpoint as it
        loads; None keeps the model dtype unless the checkpoint is stored pre-quantized
        (compressed-tensors FP8-dynamic), which loads as FP8. FP8 output is close to, but no
        longer token-exact with, the unquantized model (README "FP8").
        kv_cache_dtype="fp8" stores the KV cache in FP8 e4m3 (half the bytes: about twice the
        cached tokens in the same memory), with the checkpoint's calibrated per-layer scales when
        it has them (a compressed-tensors kv_cache_scheme), else 1.0; None takes
        runtime.kv_cache_dtype ("auto": the model dtype, any checkpoint scales unused).
        Shorthand for runtime=RuntimeConfig(kv_cache_dtype=...).
        tensor_parallel_size=N > 1 splits the decoder over N ranks: this process is rank 0 and
        starts N-1 worker processes (README "Tensor parallelism"); `close()` stops them."""
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got "
                             f"{quantization!r}")
        if kv_cache_dtype is not None and kv_cache_dtype != runtime.kv_cache_dtype:
            if runtime.kv_cache_dtype != "auto":
                raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} contradicts "
                                 f"runtime.kv_cache_dtype {runtime.kv_cache_dtype!r}: set one")
            runtime = dataclasses.replace(runtime, kv_cache_dtype=kv_cache_dtype)  # validates
        device, dtype = _resolve_device_dtype(device, dtype)
        ops = get_ops(backend, device.type)  # fail fast on a bad backend, before reading weights
        check_kv_cache_dtype(runtime.kv_cache_dtype, ops, device)
        if tensor_parallel_size == 1:
            ckpt = load_checkpoint(str(model), device=device, dtype=dtype, revision=revision,
                                   progress=progress, quantization=quantization)
            return cls(ckpt, backend, runtime, image_limits)
        return cls._tensor_parallel(tensor_parallel_size, str(model), device, dtype, backend,
                                    revision, progress, runtime, image_limits, quantization)

    @classmethod
    def _tensor_parallel(cls, world, model, device, dtype, backend, revision, progress, runtime,
                         image_limits, quantization) -> LLaVA:
        if not isinstance(world, int) or world < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {world!r}")
        if device.type == "cuda" and (device.index or 0) + world > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {world} needs GPUs {device.index or 0}.."
                             f"{(device.index or 0) + world - 1} (one per rank, from {device}); "
                             f"{torch.cuda.device_count()} are visible")
        # The workers load their shards while rank 0 loads its own.
        driver = TPDriver(world, model, revision=revision, device=device, dtype=dtype,
                          backend=backend)
        try:
            ckpt = load_checkpoint(model, device=device, dtype=dtype, revision=revision,
                                   progress=progress, quantization=quantization, tp=driver.tp)
        except BaseException:
            driver.confirm_loaded(False)
            raise
        driver.confirm_loaded(True)
        try:
            return cls(ckpt, backend, runtime, image_limits, tp=driver)
        except BaseException:
            driver.close()
            raise
