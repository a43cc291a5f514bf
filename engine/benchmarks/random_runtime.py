"""The runtime engine over random weights that the benchmarks time (bench/decode.py,
bench/ttft.py, `fastllava bench latency|throughput`): on one device, or with
tensor_parallel_size N > 1 split over N ranks (README "Tensor parallelism"), this process being
rank 0 and N - 1 worker processes building their own random shards."""

from __future__ import annotations

import functools

import torch


def random_config(name: str):
    """The LlavaConfig of a weights.random REAL_CONFIGS key, or of "tiny"."""
    from fastllava.weights.random import TINY_CONFIG, llava_config, real_config

    return llava_config(TINY_CONFIG) if name == "tiny" else real_config(name)


class RandomRuntime:
    """config: a REAL_CONFIGS key or "tiny". Loads .config and .model (rank 0's shard under
    tensor parallelism, the workers loading theirs meanwhile); build(rc) then makes .engine and
    .max_len (build_engine's cap). close() stops the engine and the workers."""

    def __init__(self, config: str, device, dtype: torch.dtype, *, backend: str = "auto",
                 quantization: str | None = None, tensor_parallel_size: int = 1, seed: int = 0):
        from fastllava.weights.random import random_model

        self.config, self.driver, self.engine, self.model = random_config(config), None, None, None
        self.device, self.dtype, self.backend = torch.device(device), dtype, backend
        if tensor_parallel_size > 1:
            from fastllava.runtime.tp_driver import TPDriver

            self.driver = TPDriver(tensor_parallel_size, "", revision=None, device=self.device,
                                   dtype=dtype, backend=backend, random_config=config,
                                   random_seed=seed)
        try:
            self.model = random_model(self.config, self.device, dtype, seed=seed,
                                      quantization=quantization,
                                      tp=self.driver and self.driver.tp)
        except BaseException:
            if self.driver is not None:
                self.driver.confirm_loaded(False)   # the workers stop with rank 0
            raise
        if self.driver is not None:
            self.driver.confirm_loaded(True)

    @property
    def tensor_parallel_size(self) -> int:
        return 1 if self.driver is None else self.driver.world

    def build(self, rc):
        """The engine over the model (RuntimeConfig rc) → (engine, max_len)."""
        from fastllava.kernels.ops import get_ops
        from fastllava.runtime.build import build_engine
        from fastllava.runtime.tp_driver import build_tp_engine

        build = build_engine if self.driver is None else functools.partial(
            build_tp_engine, driver=self.driver)
        try:
            self.engine, self.max_len = build(self.model, get_ops(self.backend, self.device.type),
                                              self.config.text, self.dtype, self.device, rc)
        except BaseException:
            self.close()
            raise
        return self.engine, self.max_len

    def close(self) -> None:
        """Stop the engine and the workers; idempotent."""
        if self.engine is not None:
            self.engine.shutdown()
        if self.driver is not None:
            self.driver.close()
        self.engine = self.model = None
