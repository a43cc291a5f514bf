"""Runtime knobs, one frozen dataclass (the CLI and server map their flags 1:1 onto it)."""

from __future__ import annotations

import dataclasses

from fastllava.runtime.scheduler import SchedulerConfig

KV_CACHE_DTYPES = ("auto", "fp8")   # RuntimeConfig.kv_cache_dtype (pages: fastllava.kv_cache)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    page_size: int = 16                   # tokens per KV page
    max_context: int = 8192               # per request: prompt (image tokens included) + output
    kv_cache_tokens: int | None = None    # KV pool size; None: CUDA → gpu_memory_fraction of the
    #                                       GPU minus weights and activations; CPU → max_context
    gpu_memory_fraction: float = 0.90
    max_num_seqs: int = 64                # requests decoding at once (and the largest CUDA graph)
    max_num_batched_tokens: int = 4096    # tokens per step; longer prompts prefill in chunks
    # Prefill tokens in a step that also decodes: bounds the inter-token stall a new image prompt
    # causes. 512 tokens of 34B prefill is ~45 ms on an H100 (4096 take ~0.35 s), about two decode
    # steps; an idle engine still prefills up to max_num_batched_tokens at once.
    max_prefill_tokens_while_decoding: int = 512
    prefix_caching: bool = True           # reuse KV pages of identical image + prompt prefixes
    image_cache_rows: int = 32768         # LRU of projected image features, in image tokens
    cuda_graphs: bool = True              # decode from CUDA graphs (CUDA + compiled kernels only)
    # Schedule and pack step N+1 while step N runs on the device (its sampled ids are referenced
    # there as placeholders); stop decisions lag one step. Same tokens as the serial loop.
    overlap_scheduling: bool = True
    # "fp8": KV pages in float8_e4m3fn (half of bf16: ~2x the pages in the same memory), per-layer
    # scales (README "FP8"); "auto": the model dtype.
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        for name in ("page_size", "max_context", "max_num_seqs", "max_num_batched_tokens",
                     "max_prefill_tokens_while_decoding"):
            if getattr(self, name) < 1:
                raise ValueError(f"RuntimeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.page_size:
            raise ValueError(f"RuntimeConfig.kv_cache_tokens must hold at least one page "
                             f"({self.page_size} tokens), got {self.kv_cache_tokens}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("RuntimeConfig.gpu_memory_fraction must be in (0, 1], got "
                             f"{self.gpu_memory_fraction}")
        if self.image_cache_rows < 0:
            raise ValueError(f"RuntimeConfig.image_cache_rows must be >= 0, got "
                             f"{self.image_cache_rows}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"RuntimeConfig.kv_cache_dtype must be one of {KV_CACHE_DTYPES}, "
                             f"got {self.kv_cache_dtype!r}")
        self.scheduler_config()                                # its budget check

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens,
                               self.max_prefill_tokens_while_decoding)
