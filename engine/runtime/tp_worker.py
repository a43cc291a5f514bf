"""A tensor-parallel worker process (ranks 1..N-1): load this rank's shard, then run every step
rank 0 announces, until told to stop or its parent goes away.

Started by `TPDriver` as `python -m fastllava.runtime.tp_worker RANK ARGS_JSON`: a fresh
interpreter, as the spawn start method gives (never fork: CUDA and the engine thread do not
survive a fork). It holds no scheduler, no tokenizer use and no vision tower work:
rank 0 sends each step's ids, positions, KV slots, block tables and image features
(runtime/tp_step.py); the worker runs embed + decoder + lm_head with its shard and its KV heads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time

import torch

log = logging.getLogger("fastllava.tp")


@dataclasses.dataclass(frozen=True)
class WorkerArgs:
    model: str           # checkpoint folder or hub id
    revision: str | None
    device: str          # rank 0's device; on CUDA rank r takes the r-th GPU after it
    dtype: str           # e.g. "torch.bfloat16"
    backend: str
    world: int
    store_port: int
    timeout_s: float
    parent_pid: int
    random_config: str | None = None   # bench: random weights of this REAL_CONFIGS name or "tiny"
    random_seed: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def _watch_parent(parent_pid: int) -> None:
    """Exit when the API process is gone (killed with no chance to stop us): no orphan stays."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


def _device(args: WorkerArgs, rank: int) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", (device.index or 0) + rank)
        torch.cuda.set_device(device)
    return device


def _load_shard(args: WorkerArgs, device: torch.device, dtype: torch.dtype, tp):
    if args.random_config is None:
        from fastllava.loading import load_checkpoint

        return load_checkpoint(args.model, device=device, dtype=dtype, revision=args.revision,
                               tp=tp).model
    from fastllava.weights.random import REAL_CONFIGS, TINY_CONFIG, llava_config, random_model

    config = TINY_CONFIG if args.random_config == "tiny" else REAL_CONFIGS[args.random_config]
    return random_model(llava_config(config), device, dtype, seed=args.random_seed, tp=tp)


def worker_main(rank: int, args: WorkerArgs) -> None:
    # Imported here: the driver imports this module for WorkerArgs alone.
    import torch.distributed as dist

    from fastllava.kernels.kv_quant import FP8_KV_DTYPE
    from fastllava.kernels.ops import get_ops
    from fastllava.kv_cache import KVCache
    from fastllava.models.parallel import TensorParallel, TensorParallelError, local_text_config
    from fastllava.runtime import tp_step
    from fastllava.runtime.memory_plan import CudaMemory
    from fastllava.runtime.tp_comm import TPComm
    from fastllava.runtime.tp_graphs import TPDecodeGraphs
    from fastllava.runtime.tp_memory import PoolParams, measure_own

    threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    device = _device(args, rank)
    if device.type == "cpu":  # the ranks share the host's cores: do not oversubscribe them
        torch.set_num_threads(max(1, torch.get_num_threads() // args.world))
    dtype = getattr(torch, args.dtype.removeprefix("torch."))
    store = dist.TCPStore("127.0.0.1", args.store_port, args.world, is_master=False)
    comm = TPComm(store, rank, args.world, device, args.timeout_s)
    tp = TensorParallel(rank, args.world, comm)
    try:
        model = _load_shard(args, device, dtype, tp)
        ops = get_ops(args.backend, device.type)
        ok = True
    except TensorParallelError:   # rank 0 meets the same refusal and reports it
        ok = False
    except Exception as e:
        log.error("tensor-parallel rank %d could not load its shard: %s: %s", rank,
                  type(e).__name__, e)
        ok = False
    if not comm.agree(ok, idle=True) or not ok:
        return
    text = local_text_config(model.config.text, args.world)
    kv = graphs = None

    def new_kv(num_pages: int, page_size: int, fp8: bool) -> KVCache:
        """Own heads, rank 0's page count and page dtype (fp8: kv_cache_dtype "fp8")."""
        return KVCache(text.num_hidden_layers, num_pages, page_size, text.num_key_value_heads,
                       text.head_dim, FP8_KV_DTYPE if fp8 else dtype, device, model.kv_scales)

    def next_step(kv: KVCache) -> None:
        """Run the step rank 0 sends next (the dummy steps of the memory measurement)."""
        h = comm.broadcast_header(tp_step.header(0))
        if int(h[0]) != tp_step.OP_STEP:
            raise SystemExit(0)   # rank 0 gave up measuring (its error is its own) and stops us
        tp_step.run(model, ops, tp_step.receive(comm, h, device, dtype), kv)

    with torch.inference_mode():
        while True:
            h = comm.broadcast_header(tp_step.header(0), idle=True)
            op = int(h[0])
            if op == tp_step.OP_STOP:
                return
            if op == tp_step.OP_STEP:
                tp_step.run(model, ops, tp_step.receive(comm, h, device, dtype), kv)
            elif op == tp_step.OP_DECODE:
                graphs.follow(int(h[1]))
            elif op == tp_step.OP_SETUP:   # the KV pool rank 0 planned: same pages, own heads
                kv = new_kv(int(h[1]), int(h[2]), bool(h[3]))
                comm.agree(True)
            elif op == tp_step.OP_GRAPHS:
                graphs = TPDecodeGraphs(model, ops, kv, int(h[1]), int(h[2]), comm,
                                        capture=bool(h[3]))
            elif op == tp_step.OP_MEASURE:
                pool = PoolParams.from_tensor(comm.broadcast_header(PoolParams.zeros()))
                measure_own(comm, CudaMemory(device),
                            lambda: new_kv(int(h[1]), pool.page_size, bool(h[3])),
                            next_step, bool(h[2]), pool)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.WARNING, format=f"tp-rank{sys.argv[1]} %(levelname)s %(message)s")
    worker_main(int(sys.argv[1]), WorkerArgs(**json.loads(sys.argv[2])))
