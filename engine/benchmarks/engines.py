"""The engines `bench latency` / `bench throughput` drive (offline.py): `RandomEngine`, the
runtime over random weights stepped on the caller's thread (also bench/test_components.py), and
`ApiEngine`, a checkpoint through the public Python API, one thread per request."""

from __future__ import annotations

import random
import threading
import time

from fastllava.benchmarks import stats


class RandomEngine:
    """A runtime engine over random weights (config: a REAL_CONFIGS key, None for the tiny
    config), stepped on the caller's thread. Also used by bench/test_components.py."""

    def __init__(self, config: str | None, *, device: str | None = None, dtype: str | None = None,
                 backend: str = "auto", max_len: int, max_seqs: int = 1, seed: int = 0,
                 tensor_parallel_size: int = 1, kv_cache_dtype: str = "auto"):
        """kv_cache_dtype: RuntimeConfig.kv_cache_dtype ("fp8": KV pages in float8_e4m3fn)."""
        from fastllava.benchmarks.random_runtime import RandomRuntime
        from fastllava.runtime.config import RuntimeConfig

        device, self.dtype = self.placement(config, device, dtype)
        self.name = f"{config}, random weights" if config else "tiny random (--tiny)"
        self.runtime = RandomRuntime(config or "tiny", device, self.dtype, backend=backend,
                                     seed=seed, tensor_parallel_size=tensor_parallel_size)
        self.config, self.model = self.runtime.config, self.runtime.model
        self.vocab, self.device, self.max_len = self.config.text.vocab_size, device, max_len
        rc = RuntimeConfig(max_num_seqs=min(max_seqs, 256), max_context=max_len,
                           kv_cache_tokens=None if device == "cuda" else max_len * max_seqs,
                           kv_cache_dtype=kv_cache_dtype)
        self.max_batch = rc.max_num_seqs
        self.engine, _ = self.runtime.build(rc)

    @staticmethod
    def placement(config: str | None, device: str | None, dtype: str | None):
        """(device, torch dtype) of a run; refuses an unknown config or real shapes on a CPU."""
        import torch

        from fastllava.weights.random import REAL_CONFIGS

        if config is not None and config not in REAL_CONFIGS:
            raise ValueError(f"--config {config!r}: known {', '.join(sorted(REAL_CONFIGS))}")
        device = device or ("cuda" if torch.cuda.is_available() and config else "cpu")
        if device == "cpu" and config is not None:
            raise ValueError(f"random {config} weights need a GPU (none here, or --device cpu): "
                             "pass --tiny for the CPU plumbing run, or --model")
        return device, getattr(torch, dtype) if dtype else (
            torch.bfloat16 if device == "cuda" else torch.float32)

    def close(self) -> None:
        """Free the model and KV pool (before a peer model is built); idempotent."""
        import torch

        if self.model is None:
            return
        self.runtime.close()   # the engine, and any tensor-parallel workers
        self.engine = self.model = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def run(self, prompts: list[list[int]], output_len: int, bar=None) -> list[stats.Trace]:
        """All prompts added at once; per sequence the time of each generated token. bar: a
        progress_bar, advanced per finished request."""
        import torch

        from fastllava.runtime.sequence import SamplingParams, Sequence

        sched, runner = self.engine.scheduler, self.engine.runner
        params = SamplingParams(max_tokens=output_len, temperature=0.0, stop_ids=())
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        seqs = [Sequence(p, params, self.max_len) for p in prompts]
        traces = {s.seq_id: stats.Trace(time.perf_counter()) for s in seqs}
        for s in seqs:
            sched.add(s)
        live = {s.seq_id: s for s in seqs}
        while live:
            batch = sched.schedule()
            if batch is None:
                raise RuntimeError(f"the scheduler stalled with {len(live)} requests left")
            finished = sched.update(batch, runner.run(batch))
            sync()
            now = time.perf_counter()
            for s in batch.seqs:
                t = traces[s.seq_id]
                t.events += [now] * (s.num_generated - len(t.events))
            for s in finished:
                runner.release(s)
                traces[s.seq_id].end, traces[s.seq_id].tokens = now, s.num_generated
                live.pop(s.seq_id, None)
                if bar is not None:
                    bar.update(1)
        return list(traces.values())

    def prompts(self, rng: random.Random, n: int, length: int) -> list[list[int]]:
        return [[rng.randrange(self.vocab) for _ in range(length)] for _ in range(n)]


class ApiEngine:
    """A checkpoint through the public API; each request on its own thread, a generated image."""

    def __init__(self, args, kv_cache_dtype: str = "auto"):
        from fastllava.api import LLaVA
        from fastllava.benchmarks.workload import generated_image

        self.llava = LLaVA.from_pretrained(args.model, args.device, args.dtype,
                                           backend=args.backend, progress=True,
                                           tensor_parallel_size=args.tensor_parallel_size,
                                           kv_cache_dtype=kv_cache_dtype)
        self.name, self.dtype, self.max_batch = args.model, self.llava.dtype, None
        self.image = generated_image(random.Random(args.seed), 672, 672, "jpeg")

    def close(self) -> None:
        self.llava.close()   # stops the runtime's engine thread

    def prompts(self, rng: random.Random, n: int, length: int) -> list[str]:
        words = "describe the image in detail what is shown where why how".split()
        return [" ".join(rng.choice(words) for _ in range(max(1, length // 2))) for _ in range(n)]

    def run(self, prompts: list[str], output_len: int, bar=None) -> list[stats.Trace]:
        traces = [stats.Trace(0.0) for _ in prompts]

        def one(i: int) -> None:
            t = traces[i]
            t.submit = time.perf_counter()
            req = {"image_url": self.image, "prompt": prompts[i], "max_tokens": output_len}
            try:
                for ev in self.llava.stream_detailed(req, every_token=True):
                    t.events += [time.perf_counter()] * (ev["completion_tokens"] - len(t.events))
                    t.tokens = ev["completion_tokens"]
                t.end = time.perf_counter()
            except Exception as exc:  # noqa: BLE001 - reported per request
                t.error = f"{type(exc).__name__}: {exc}"[:200]
            if bar is not None:
                bar.update(1)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return traces
