"""A request inside the runtime: its tokens, how many are in the KV cache, its pages and metrics.

The sequence is the single source of truth; the scheduler and the model runner derive everything
(chunk sizes, positions, slot mapping, block tables) from it each step. No torch here.

Token layout: `token_ids` = prompt (image placeholders included) + generated tokens. KV exists for
`token_ids[:num_computed]`. Each step computes `token_ids[num_computed:num_computed + n]`; when a
step reaches the end of `token_ids`, its last row's logits give the next token. A preempted
sequence keeps its tokens and is recomputed from scratch (num_computed back to 0), so recompute
and continuous batching share one code path.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import time


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0                       # always set: the engine draws one when a request has none
    stop_ids: tuple[int, ...] = ()
    # Log-probabilities of the raw distribution (fp32 log-softmax of the logits, before
    # temperature and top-p): None = off; k >= 0 = each sampled token's, plus the k most likely.
    logprobs: int | None = None
    # Score prompt tokens from this index on (LLaVA.score): each one's log-probability given the
    # tokens before it; None = off. Those tokens are never taken from the prefix cache.
    prompt_logprobs_from: int | None = None


@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """The placeholder tokens [start, start + length) of one image in the prompt. `content_hash`
    identifies its pixels (and so its features): it stands in for those tokens in page hashes."""
    start: int
    length: int
    content_hash: bytes

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic) of one request's life, and what they add up to."""
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0     # prompt tokens whose KV came from the prefix cache
    completion_tokens: int = 0
    num_preemptions: int = 0

    def summary(self) -> dict:
        """{"queue_s", "ttft_s", "e2e_s", "decode_tokens_per_s", token counts} (None if unknown)."""
        def since(t, t0):
            return None if t is None or t0 is None else t - t0
        decode_s = since(self.finished, self.first_token)
        rate = None
        if decode_s and self.completion_tokens > 1:
            rate = (self.completion_tokens - 1) / decode_s
        return {"queue_s": since(self.first_scheduled, self.arrival),
                "ttft_s": since(self.first_token, self.arrival),
                "e2e_s": since(self.finished, self.arrival),
                "decode_tokens_per_s": rate,
                "prompt_tokens": self.prompt_tokens,
                "cached_prompt_tokens": self.cached_prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "num_preemptions": self.num_preemptions}


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_len: int,
                 images: tuple[ImageSpan, ...] = (), payload=None):
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if len(prompt_ids) >= max_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens (image included); at most "
                             f"{max_len - 1} fit with room for one generated token")
        self.seq_id = next(Sequence._ids)
        self.token_ids = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.params = params
        self.max_len = max_len                 # prompt + generated tokens never exceed this
        self.images = images
        self.payload = payload                 # what the model runner needs (pixels, features)
        self.status = Status.WAITING
        self.num_computed = 0
        self.block_table: list[int] = []
        self.num_page_resets = 0               # bumped when block_table is freed (device copies)
        self.finish_reason: str | None = None
        # Filled by the model runner only when params ask (SamplingParams.logprobs /
        # prompt_logprobs_from): per generated token (logprob, [(id, logprob), ...] top-k),
        # appended before its "token" event; prompt position → (logprob of the token there, the
        # most likely id there).
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.prompt_logprobs: dict[int, tuple[float, int]] = {}
        self.metrics = RequestMetrics(arrival=time.monotonic(), prompt_tokens=len(prompt_ids))

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.value}, len={len(self)}, "
                f"computed={self.num_computed}, pages={len(self.block_table)})")

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def max_cached_tokens(self) -> int:
        """Leading tokens the prefix cache may supply: all but the last (its logits are needed),
        and none from the first scored prompt position's predecessor on (their logits are)."""
        limit = len(self.token_ids) - 1
        if self.params.prompt_logprobs_from is not None:
            limit = min(limit, self.params.prompt_logprobs_from - 1)
        return max(limit, 0)

    # The properties below run per row per step: they read the fields directly (no nested
    # property or __len__ calls), which is most of their cost at batch 64.
    @property
    def is_decoding(self) -> bool:
        """One generated token left to compute: a decode step (paged decode, CUDA graphs)."""
        return (len(self.token_ids) - self.num_computed == 1
                and self.num_computed >= self.prompt_len)

    @property
    def is_capped(self) -> bool:
        """No token may follow the last one (max_tokens or max_len reached): with the overlapped
        loop, a sequence whose last token is still on the device is not scheduled again."""
        n = len(self.token_ids)
        return n - self.prompt_len >= self.params.max_tokens or n >= self.max_len

    def append(self, token: int) -> str | None:
        """Add a sampled token; return the finish reason if the sequence is now done."""
        self.token_ids.append(token)
        return self.set_token(len(self) - 1, token)

    def set_token(self, index: int, token: int) -> str | None:
        """Put the sampled `token` at `index` (a placeholder the overlapped loop appended while the
        token was on the device) and return the finish reason if the sequence ends there; tokens
        after it (the one-step lag's extra placeholder) are then dropped."""
        self.token_ids[index] = token
        if token in self.params.stop_ids:
            reason = "stop"
        elif index + 1 - self.prompt_len >= self.params.max_tokens or index + 1 >= self.max_len:
            reason = "length"
        else:
            reason = None
        if reason is not None:
            del self.token_ids[index + 1:]
        self.metrics.completion_tokens = index + 1 - self.prompt_len
        return reason
