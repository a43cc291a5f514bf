"""What evaluation harnesses and OpenAI's `n` / `logprobs` need beyond one answer: log-likelihood
scoring of a continuation (`LLaVA.score`), n samples of one prompt (`LLaVA.generate_choices`), and
the shared logprobs check and per-choice seed derivation (also used by the server's OpenAI route).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
from typing import Any, Iterator, Mapping

from fastllava.messages import chat_messages
from fastllava.schema import MAX_TOP_LOGPROBS, RequestValidationError

# Each scored token is one more fp32 logits row (vocabulary wide) in its prefill step, beyond the
# memory plan's rows: 1024 rows of a 64k vocabulary are 256 MiB (plus the log-softmax's copy).
MAX_SCORED_TOKENS = 1024


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """Per-choice seeds of an n-choice request: choice 0 keeps the request's seed (so n = 1 is
    unchanged), choice i > 0 gets blake2b(seed, i) reduced to [0, 2**63): a seeded request
    gives the same n choices every time, and they differ from each other. None stays None
    (every choice draws its own seed)."""
    if seed is None:
        return [None] * n
    return [seed] + [int.from_bytes(hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=8)
                                    .digest(), "little") >> 1 for i in range(1, n)]


def check_logprobs(k: Any) -> int | None:
    """None (off) or the number of alternatives per token, 0..MAX_TOP_LOGPROBS."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS:
        raise RequestValidationError("logprobs", f"must be null or an integer between 0 and "
                                     f"{MAX_TOP_LOGPROBS}, got {k!r}", "int_type", k)
    return k


class EvaluationMixin:
    """`LLaVA`'s scoring and n-choice methods (built on its prepare / stream_prepared)."""

    def score(self, request: Mapping[str, Any], continuation: str | list[int], *,
              messages: list[dict] | None = None) -> dict:
        """The log-likelihood of `continuation` after the request's prompt (for evaluation
        harnesses: multiple choice by log-likelihood, perplexity).

        The prompt is built as for `generate` (one turn, or `messages`; images included, the
        generation prompt of the template appended); `continuation` is tokenized on its own
        (no BOS; a list of ids is taken as is) and appended. Returns {"logprob": the sum,
        "token_logprobs": per continuation token, "tokens": its ids, "is_greedy": every token
        was the most likely one, "prompt_tokens"}; log-probabilities of the raw distribution in
        fp32 (sampling fields of the request do not matter). The prompt's own prefix may come
        from the prefix cache; the continuation (1..MAX_SCORED_TOKENS tokens) is always
        computed."""
        messages = chat_messages(messages)
        req = dataclasses.replace(self._parse(request, messages), max_tokens=1, temperature=0.0)
        if isinstance(continuation, str):
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
        elif isinstance(continuation, list) and all(
                isinstance(t, int) and not isinstance(t, bool)
                and 0 <= t < self.config.text.vocab_size for t in continuation):
            cont = list(continuation)
        else:
            raise RequestValidationError("continuation", "must be a string or a list of token "
                                         "ids in the vocabulary", "value_error")
        if not 0 < len(cont) <= MAX_SCORED_TOKENS:
            raise RequestValidationError(
                "continuation", f"must have 1 to {MAX_SCORED_TOKENS} tokens, got {len(cont)}",
                "value_error")
        prepared = self.prepare(req, messages=messages)
        first = len(prepared.input_ids)
        full = dataclasses.replace(prepared, input_ids=prepared.input_ids + cont)
        handle = None
        for _, _, handle in self._engine_events(full, req, {"prompt_logprobs_from": first}):
            pass
        scored = [handle.seq.prompt_logprobs[p] for p in range(first, first + len(cont))]
        values = [v for v, _ in scored]
        return {"logprob": sum(values), "token_logprobs": values, "tokens": cont,
                "is_greedy": all(best == t for (_, best), t in zip(scored, cont)),
                "prompt_tokens": first}

    def generate_choices(self, request: Mapping[str, Any], n: int, *,
                         messages: list[dict] | None = None, logprobs: int | None = None
                         ) -> list[dict]:
        """n samples of one prompt: the final `stream_detailed` snapshot of each, in order.
        The images are loaded once and the prompt prefilled once: choice 0 runs first, and the
        others start once its prompt is in the KV cache, from the prefix cache (only its last
        partial page is recomputed). Seeds: `choice_seeds`."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RequestValidationError("n", f"must be an integer >= 1, got {n!r}", "int_type", n)
        sampling = {"logprobs": check_logprobs(logprobs)}
        req, prepared = self.prepare_request(request, messages=messages)
        reqs = [dataclasses.replace(req, seed=s) for s in choice_seeds(req.seed, n)]

        def drain(events: Iterator[dict], last: dict | None = None) -> dict:
            with contextlib.closing(events):
                for last in events:
                    pass
            return last

        first_events = self.stream_prepared(reqs[0], prepared, sampling=sampling)
        with contextlib.closing(first_events):
            first = next(first_events)     # choice 0's prompt pages are committed now
            with concurrent.futures.ThreadPoolExecutor(max(n - 1, 1)) as pool:
                rest = [pool.submit(drain, self.stream_prepared(r, prepared, sampling=sampling))
                        for r in reqs[1:]]
                return [drain(first_events, first), *(f.result() for f in rest)]
