"""Wire a loaded model into a running engine: plan the memory and size the KV pool, build the
block manager, scheduler, model runner (with CUDA graphs where they apply), warm every kernel
variant up, then the engine loop."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import logging
import time

import torch

from fastllava.config import TextConfig
from fastllava.kernels.kv_quant import triton_fp8_ok
from fastllava.kv_cache import KVCache
from fastllava.runtime.block_manager import BlockManager
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.cuda_graphs import DecodeGraphs
from fastllava.runtime.dummy_step import DummySteps, image_shapes, warm_up
from fastllava.runtime.engine import Engine
from fastllava.runtime.image_cache import ImageFeatureCache
from fastllava.runtime.memory_plan import (CudaMemory, MemoryPlan, fixed_plan, measure,
                                           plan_kv_pool)
from fastllava.runtime.model_runner import ModelRunner
from fastllava.runtime.scheduler import Scheduler
from fastllava.runtime.tp_memory import PoolParams

log = logging.getLogger("fastllava.runtime")


def memory_plan(steps: DummySteps, text: TextConfig, rc: RuntimeConfig, graphs: bool,
                tp=None) -> MemoryPlan:
    """rc.kv_cache_tokens if given; on CPU max_context (nothing is measured there); on CUDA the
    pool that gpu_memory_fraction leaves beside the measured worst-case step (memory_plan.py),
    under tensor parallelism (`tp`, the TPDriver) the smallest rank's (tp_memory.py)."""
    dtype, device = steps.dtype, steps.device
    # fp8 pages take half the bytes of bf16: the same memory holds twice the pages.
    page_bytes = KVCache.bytes_per_page(text.num_hidden_layers, rc.page_size,
                                        text.num_key_value_heads, text.head_dim, steps.kv_dtype)
    image_tokens = max(shape[3] for shape in image_shapes(steps.config))
    if rc.kv_cache_tokens is not None or device.type != "cuda":
        weights = sum(t.numel() * t.element_size()
                      for t in (*steps.model.parameters(), *steps.model.buffers()))
        source, tokens = (("kv_cache_tokens", rc.kv_cache_tokens) if rc.kv_cache_tokens
                          is not None else ("max_context", rc.max_context))
        return fixed_plan(source, tokens, page_bytes=page_bytes, page_size=rc.page_size,
                          weights=weights, image_tokens=image_tokens)
    mem = CudaMemory(device)
    decode = steps.decode_and_sample if graphs else None
    pool = PoolParams(fraction=rc.gpu_memory_fraction,
                      image_cache=rc.image_cache_rows * text.hidden_size * dtype.itemsize,
                      page_bytes=page_bytes, page_size=rc.page_size,
                      need_tokens=min(rc.max_context, text.max_position_embeddings),
                      image_tokens=image_tokens)
    if tp is not None:
        return tp.measured_plan(mem, steps, decode, pool)
    return plan_kv_pool(total=mem.total(), measured=measure(mem, steps.scratch_kv,
                                                            steps.worst_case, decode),
                        **dataclasses.asdict(pool))


def build_engine(model, ops, text: TextConfig, dtype: torch.dtype, device,
                 rc: RuntimeConfig, tp=None) -> tuple[Engine, int]:
    """(engine, max_len): max_len caps every request's prompt + output tokens. The memory plan
    is on engine.runner.memory_plan. Tensor parallelism (runtime/tp_driver.build_tp_engine):
    `tp` is the TPDriver, `model` its StepProxy and `text` the per-rank view (KVH/N heads).

    On CUDA the build runs with `device` as the current device: Triton launches and graph capture
    use the current device (and its streams), not the tensors', so a model on cuda:1 built from a
    thread whose current device is cuda:0 would launch its kernels on the wrong GPU."""
    device = torch.device(device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _build_engine(model, ops, text, dtype, device, rc, tp)


def _build_engine(model, ops, text: TextConfig, dtype: torch.dtype, device: torch.device,
                  rc: RuntimeConfig, tp) -> tuple[Engine, int]:
    check_kv_cache_dtype(rc.kv_cache_dtype, ops, device)
    steps = DummySteps(model, ops, rc, dtype, device, text)
    # Only compiled Triton kernels have variants to build: the torch ops and the CPU interpreter
    # compile nothing, so there the warm-up is skipped (and so are the graphs).
    compiled = device.type == "cuda" and ops.name == "triton"
    use_graphs = rc.cuda_graphs and compiled
    with torch.inference_mode():
        plan = memory_plan(steps, text, rc, use_graphs, tp)
    log.info(plan.summary())
    kv = KVCache(text.num_hidden_layers, plan.kv_pages, rc.page_size, text.num_key_value_heads,
                 text.head_dim, steps.kv_dtype, device, model.kv_scales)
    if model.kv_scales is not None:   # as vLLM: the user chooses the page dtype, not the checkpoint
        log.info("KV-cache scales: the checkpoint's calibrated per-layer ones" if rc.kv_cache_dtype
                 == "fp8" else "the checkpoint's calibrated fp8 KV-cache scales are not used: "
                 "the KV cache is in the model dtype (kv_cache_dtype 'fp8' would use them)")
    max_len = min(rc.max_context, text.max_position_embeddings, plan.kv_pages * rc.page_size)
    graphs, max_pages = None, -(-max_len // rc.page_size)
    if tp is not None:
        # Every rank decodes from its padded static buffers, captured when use_graphs.
        graphs = tp.decode_graphs(model, ops, kv, rc.max_num_seqs, max_pages, use_graphs)
    elif use_graphs:
        # The torch reference ops sync with the host, so only the Triton kernels are captured.
        graphs = DecodeGraphs(model, ops, kv, rc.max_num_seqs, max_pages)
    if graphs is not None and graphs.graphs:
        log.info("captured decode CUDA graphs for batch sizes %s", graphs.buckets)
    if compiled:
        start = time.perf_counter()
        with torch.inference_mode():
            warm_up(steps, kv, [] if graphs and graphs.graphs else sorted({1, rc.max_num_seqs}))
        torch.cuda.synchronize(device)
        log.info("warmed up every kernel variant in %.1f s", time.perf_counter() - start)
    runner = ModelRunner(model, ops, kv, ImageFeatureCache(rc.image_cache_rows), graphs,
                         memory_plan=plan, max_num_seqs=rc.max_num_seqs)
    scheduler = Scheduler(rc.scheduler_config(),
                          BlockManager(plan.kv_pages, rc.page_size, rc.prefix_caching))
    freeze_heap()
    return Engine(scheduler, runner, overlap=rc.overlap_scheduling), max_len


def check_kv_cache_dtype(kv_cache_dtype: str, ops, device: torch.device) -> None:
    """Every backend reads and writes fp8 pages; compiled Triton only on GPUs with fp8 types."""
    if kv_cache_dtype == "fp8" and ops.name == "triton" and not triton_fp8_ok(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"kv_cache_dtype 'fp8' with the Triton kernels needs a GPU with FP8 "
                         f"support (compute capability >= 8.9: L4, H100, H200); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use "
                         f"kv_cache_dtype 'auto' or backend 'torch'")


def freeze_heap() -> None:
    """Move every object alive after start-up (torch's and the model's Python objects, ~10^5-10^6
    of them) out of the cyclic GC's reach. Otherwise each full collection, triggered every few
    hundred steps by the step's short-lived objects, walks them all: measured ~150 µs per step on
    average at batch 1 (bench/host_overhead.py). vLLM and SGLang freeze after start-up too."""
    gc.collect()
    gc.freeze()
    # Hand them back before the interpreter tears down, or they are never collected and native
    # bindings (triton's nanobind) report them as leaked on stderr at exit.
    atexit.register(gc.unfreeze)
