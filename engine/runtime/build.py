"""Wire a loaded model into a running engine: size the KV pool, then build the block manager,
scheduler, model runner (with CUDA graphs where they apply) and the engine loop."""

from __future__ import annotations

import logging

import torch

from fastllava.config import TextConfig
from fastllava.kv_cache import KVCache
from fastllava.runtime.block_manager import BlockManager
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.cuda_graphs import DecodeGraphs
from fastllava.runtime.engine import Engine
from fastllava.runtime.image_cache import ImageFeatureCache
from fastllava.runtime.model_runner import ModelRunner
from fastllava.runtime.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger("fastllava.runtime")


def kv_cache_pages(text: TextConfig, rc: RuntimeConfig, dtype: torch.dtype, device) -> int:
    """The KV pool in pages: rc.kv_cache_tokens if given; on CPU max_context; on CUDA what is left
    of gpu_memory_fraction of the GPU after the weights (already loaded) and a working reserve
    for one step's activations and the image-feature cache."""
    per_page = KVCache.bytes_per_page(text.num_hidden_layers, rc.page_size,
                                      text.num_key_value_heads, text.head_dim, dtype)
    if rc.kv_cache_tokens is not None:
        return -(-rc.kv_cache_tokens // rc.page_size)
    if torch.device(device).type != "cuda":
        return -(-rc.max_context // rc.page_size)
    free, total = torch.cuda.mem_get_info(device)
    e = dtype.itemsize
    # One step's live activations (residual, norm out, qkv, attention out, gate_up, act) plus the
    # fp32 logits of every decoding row, with 2x slack for allocator fragmentation.
    step = rc.max_num_batched_tokens * (5 * text.hidden_size + 3 * text.intermediate_size) * e * 2
    step += rc.max_num_seqs * text.vocab_size * 4 * 2
    images = rc.image_cache_rows * text.hidden_size * e
    budget = free - (1 - rc.gpu_memory_fraction) * total - step - images - (512 << 20)
    pages = int(budget // per_page)
    need = -(-min(rc.max_context, text.max_position_embeddings) // rc.page_size)
    if pages < need:
        raise ValueError(f"not enough GPU memory for the KV cache: {max(pages, 0)} pages of "
                         f"{rc.page_size} tokens fit, one {rc.max_context}-token request needs "
                         f"{need}; lower max_context or image_cache_rows, or raise "
                         "gpu_memory_fraction")
    return pages


def build_engine(model, ops, text: TextConfig, dtype: torch.dtype, device,
                 rc: RuntimeConfig) -> tuple[Engine, int]:
    """(engine, max_len): max_len caps every request's prompt + output tokens."""
    num_pages = kv_cache_pages(text, rc, dtype, device)
    kv = KVCache(text.num_hidden_layers, num_pages, rc.page_size, text.num_key_value_heads,
                 text.head_dim, dtype, device)
    max_len = min(rc.max_context, text.max_position_embeddings, num_pages * rc.page_size)
    graphs = None
    if rc.cuda_graphs and torch.device(device).type == "cuda" and ops.name == "triton":
        # The torch reference ops sync with the host, so only the Triton kernels are captured.
        graphs = DecodeGraphs(model, ops, kv, rc.max_num_seqs, -(-max_len // rc.page_size))
        log.info("captured decode CUDA graphs for batch sizes %s", graphs.buckets)
    runner = ModelRunner(model, ops, kv, ImageFeatureCache(rc.image_cache_rows), graphs)
    scheduler = Scheduler(rc.scheduler_config(),
                          BlockManager(num_pages, rc.page_size, rc.prefix_caching))
    return Engine(scheduler, runner), max_len
