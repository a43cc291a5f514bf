"""The public API: `LLaVA.from_pretrained(...)`, `generate(request)`, `stream(request)`.

Requests use the fal model schema {image_url, prompt, max_tokens=64, temperature=0.2, top_p=1}
(+ optional seed); results are {"output": str, "partial": bool}. Every call may come from any
thread (or, with `agenerate` / `astream` from async_api.py, from an asyncio loop): requests go
to one engine thread that batches them continuously (fastllava.runtime), so concurrent calls
share steps. `LLaVA` gathers mixins: loading (pretrained.py), request → inputs
(prompt_inputs.py), scoring and n choices (evaluation.py), asyncio (async_api.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import queue
import secrets
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

from PIL import Image

from fastllava.config import LlavaConfig
from fastllava.async_api import AsyncMixin
from fastllava.evaluation import EvaluationMixin, check_logprobs
from fastllava.kernels.ops import get_ops
from fastllava.messages import chat_messages
from fastllava.loading import LoadedCheckpoint
from fastllava.preprocess import native
from fastllava.preprocess.image_io import ImageLimits
from fastllava.pretrained import PretrainedMixin
from fastllava.prompt_inputs import PreparedPrompt, PromptMixin
from fastllava.runtime.build import build_engine
from fastllava.runtime.config import RuntimeConfig
from fastllava.runtime.tp_driver import TPDriver, build_tp_engine
from fastllava.runtime.sequence import SamplingParams, Sequence
from fastllava.schema import GenerationRequest, RequestValidationError
from fastllava.snapshots import Snapshots


# Original checkpoints splice images at a sentinel id outside the vocabulary (the original repo's -200).
IMAGE_SENTINEL_ID = -200


def _plain(events: Iterator[dict]) -> Iterator[dict]:
    """Detailed snapshots → the public {"output", "partial"} ones; closing this closes `events`."""
    with contextlib.closing(events):
        for e in events:
            yield {"output": e["output"], "partial": e["partial"]}


class LLaVA(PretrainedMixin, PromptMixin, EvaluationMixin, AsyncMixin):
    def __init__(self, ckpt: LoadedCheckpoint, backend: str, runtime: RuntimeConfig,
                 image_limits: ImageLimits, tp: TPDriver | None = None):
        self.config: LlavaConfig = ckpt.config
        self.model = ckpt.model
        self.tokenizer = ckpt.tokenizer
        self.template = ckpt.template
        self.image_config = ckpt.image_config
        self.path: Path = ckpt.path
        # "pad" mode builds a square canvas of the long side: the pixel limit must bound that.
        self.image_limits = dataclasses.replace(image_limits, square_canvas=True) \
            if ckpt.image_config.pad_to_square else image_limits
        self.device = ckpt.device
        self.ops = get_ops(backend, self.device.type)
        self.dtype = ckpt.dtype
        self.quantization = ckpt.quantization
        self.stop_ids = ckpt.eos_ids
        if not self.stop_ids and self.tokenizer.eos_id is not None:
            self.stop_ids = (self.tokenizer.eos_id,)
        self.runtime = runtime
        self._tp = tp   # tensor parallelism: rank 0's driver of the worker processes
        self.tensor_parallel_size = 1 if tp is None else tp.world
        if self.device.type == "cpu":   # images are resized on the CPU: build (or load) the
            threading.Thread(target=native.passes, daemon=True).start()   # compiled passes now
        build = build_engine if tp is None else functools.partial(build_tp_engine, driver=tp)
        self.engine, self.max_len = build(self.model, self.ops, self.config.text, self.dtype,
                                          self.device, runtime)
        # The <image> placeholder id: the tokenizer's own token when it has one (llava-hf; it must
        # agree with config.json), else a sentinel spliced in by build_input_ids (original repo).
        tok_id = self.tokenizer.token_id("<image>")
        if tok_id is not None and self.config.image_token_id not in (None, tok_id):
            raise ValueError(f"config.json image_token_index is {self.config.image_token_id} but the "
                             f"tokenizer's <image> token is {tok_id}")
        self.image_token_id = IMAGE_SENTINEL_ID if tok_id is None else tok_id

    # ---- generation -----------------------------------------------------------------------------
    def check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse (RequestValidationError on max_tokens, type "context_length_exceeded") a request
        whose prompt, image tokens included, plus max_tokens does not fit the context: the answer
        would be cut short silently. vLLM refuses such requests too. The limit, `max_len`, is
        min(RuntimeConfig.max_context, the model's max_position_embeddings, the KV pool)."""
        if prompt_tokens + max_tokens <= self.max_len:
            return
        room = self.max_len - prompt_tokens
        advice = (f"lower max_tokens to at most {room}" if room > 0 else
                  "the prompt alone fills the context; shorten it or raise max_context")
        raise RequestValidationError(
            "max_tokens", f"prompt tokens ({prompt_tokens}, image included) + max_tokens "
            f"({max_tokens}) = {prompt_tokens + max_tokens} exceeds max_context ({self.max_len}): "
            f"{advice}", "context_length_exceeded", max_tokens)

    def _fitted(self, prepared: PreparedPrompt, req: GenerationRequest,
                clamp_max_tokens: bool) -> GenerationRequest:
        """`req`, with max_tokens lowered to the room the prompt leaves when clamp_max_tokens
        (a server default the client did not choose, as vLLM treats an unset max_tokens)."""
        room = self.max_len - len(prepared.input_ids)
        if clamp_max_tokens and 0 < room < req.max_tokens:
            return dataclasses.replace(req, max_tokens=room)
        return req

    def _sequence(self, prepared: PreparedPrompt, req: GenerationRequest,
                  sampling: Mapping[str, Any] | None = None) -> Sequence:
        """`sampling`: further SamplingParams fields (logprobs, prompt_logprobs_from; stop_ids
        () for a request that ignores the end-of-sequence ids)."""
        if self._tp is not None:
            self._tp.check()   # a dead tensor-parallel worker: refuse, naming it
        self.check_context(len(prepared.input_ids), req.max_tokens)
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        params = SamplingParams(req.max_tokens, req.temperature, req.top_p, seed,
                                **{"stop_ids": self.stop_ids, **(sampling or {})})
        return Sequence(prepared.input_ids, params, self.max_len, self._image_spans(prepared),
                        payload=prepared.images)

    def _stop_ids(self, sampling: Mapping[str, Any] | None) -> tuple[int, ...]:
        """The ids that end a request's text: the checkpoint's, unless `sampling` overrides."""
        return (sampling or {}).get("stop_ids", self.stop_ids)

    def _engine_events(self, prepared: PreparedPrompt, req: GenerationRequest,
                       sampling: Mapping[str, Any] | None = None
                       ) -> Iterator[tuple[str, object, object]]:
        """Submit the request; yield its ("token", id) events, then ("finish", reason), each with
        its RequestHandle. An error event raises. Closing early cancels the request and returns
        once its pages are free."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        handle = self.engine.submit(self._sequence(prepared, req, sampling),
                                    lambda kind, value: events.put((kind, value)))
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                yield kind, value, handle
                if kind != "token":
                    return
        finally:
            self.engine.cancel(handle)

    def generate_ids(self, request: Mapping[str, Any], *, messages: list[dict] | None = None
                     ) -> list[int]:
        """Generated token ids (the stop id, if reached, included)."""
        messages = chat_messages(messages)
        req = self._parse(request, messages)
        events = self._engine_events(self.prepare(req, messages=messages), req)
        return [value for kind, value, _ in events if kind == "token"]

    def generate(self, request: Mapping[str, Any], *, messages: list[dict] | None = None
                 ) -> dict:
        """The final snapshot of `stream`."""
        out = None
        for out in self.stream(request, messages=messages):
            pass
        return out

    def stream(self, request: Mapping[str, Any], *, image: Image.Image | None = None,
               messages: list[dict] | None = None) -> Iterator[dict]:
        """Cumulative snapshots {"output": text so far, "partial": True} ..., then the final
        {"output": text, "partial": False}. The request is validated before the first yield's
        work starts; closing the iterator early stops generation and frees its KV pages.
        `image`: the request's image already loaded (`fastllava.preprocess.image_io.load_image`),
        e.g. fetched before the weights were; request["image_url"] is then only validated.
        A prompt (image tokens included) + max_tokens over the context raises
        RequestValidationError (see `check_context`) at the first next().
        Without image_url the request is a text-only turn. `messages`: a whole chat instead of
        the one-turn prompt, with any number of images where their parts stand (see
        `fastllava.messages.chat_messages`); the request then holds only the sampling fields."""
        messages = chat_messages(messages)
        req = self._parse(request, messages)
        return _plain(self._events(req, messages, False, image=image))

    def stream_detailed(self, request: Mapping[str, Any], *, messages: list[dict] | None = None,
                        max_tokens_limit: int = 4096, max_prompt_chars: int = 16384,
                        every_token: bool = False, clamp_max_tokens: bool = False,
                        logprobs: int | None = None, ignore_eos: bool = False
                        ) -> Iterator[dict]:
        """`stream` with counts: every snapshot also has "prompt_tokens" (image tokens included),
        "completion_tokens" (tokens generated so far, a stop id included) and "finish_reason"
        (None until the final snapshot, then "stop" for a stop id, "length" for max_tokens or a
        full KV cache); the final snapshot also has "metrics" (queue_s, ttft_s, e2e_s,
        decode_tokens_per_s, prompt/cached/completion token counts, num_preemptions).
        `messages` (see `render_chat`) replaces the single-turn prompt; the request's "prompt" is
        then validated only (pass the chat's text for the length limit). Validation is eager; the
        image is fetched at the first next(), on the caller's thread.
        every_token=True yields after every generated token, even when the text did not change
        (a byte-fallback run held back, or whitespace), so a caller that polls for cancellation
        between snapshots can stop at the next token.
        A prompt + max_tokens over the context raises RequestValidationError (`check_context`);
        clamp_max_tokens=True lowers max_tokens to the room left instead (for a default the
        client did not choose: the OpenAI route's unset max_tokens).
        logprobs=k (0..MAX_TOP_LOGPROBS): snapshots carry "logprobs", one entry per token so far
        (cumulative; see fastllava.snapshots): the raw distribution's log-probabilities, before
        temperature and top-p, with the k most likely alternatives.
        ignore_eos=True: the checkpoint's end-of-sequence ids do not stop the request, which runs
        to max_tokens (or the context), as vLLM's and SGLang's ignore_eos (benchmark clients send
        it for fixed-length outputs); the text skips them, as special tokens."""
        if not isinstance(ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {ignore_eos!r}")
        sampling = {"logprobs": check_logprobs(logprobs)}
        if ignore_eos:
            sampling["stop_ids"] = ()
        messages = chat_messages(messages)
        req = self._parse(request, messages, max_tokens_limit=max_tokens_limit,
                          max_prompt_chars=max_prompt_chars)
        return self._events(req, messages, every_token, clamp_max_tokens=clamp_max_tokens,
                            sampling=sampling)

    def _events(self, req: GenerationRequest, messages: list[dict] | None, every_token: bool, *,
                image: Image.Image | None = None, clamp_max_tokens: bool = False,
                sampling: Mapping[str, Any] | None = None) -> Iterator[dict]:
        # Fetching and preprocessing the image happen on the caller's thread, so a slow image
        # host holds up nobody else; the engine thread only runs steps.
        prepared = self.prepare(req, image=image, messages=messages)
        req = self._fitted(prepared, req, clamp_max_tokens)
        yield from self.stream_prepared(req, prepared, every_token=every_token, sampling=sampling)

    def prepare_request(self, request: Mapping[str, Any], *, messages: list[dict] | None = None,
                        max_tokens_limit: int = 4096, max_prompt_chars: int = 16384,
                        clamp_max_tokens: bool = False
                        ) -> tuple[GenerationRequest, PreparedPrompt]:
        """`stream_detailed`'s validation and preparation (images fetched), for a caller that
        streams several choices of one prompt with `stream_prepared` (see `generate_choices`)."""
        messages = chat_messages(messages)
        req = self._parse(request, messages, max_tokens_limit=max_tokens_limit,
                          max_prompt_chars=max_prompt_chars)
        prepared = self.prepare(req, messages=messages)
        return self._fitted(prepared, req, clamp_max_tokens), prepared

    def stream_prepared(self, req: GenerationRequest, prepared: PreparedPrompt, *,
                        every_token: bool = False, sampling: Mapping[str, Any] | None = None
                        ) -> Iterator[dict]:
        """`stream_detailed`'s snapshots for a request already validated (`parse_request`) and
        prepared (`prepare`: image fetched and preprocessed), so a caller can load images in a
        pool of its own and give the engine only requests that are ready (the queue worker).
        The context check (`check_context`) runs when the request is submitted."""
        snapshots = Snapshots(self.tokenizer, self._stop_ids(sampling), len(prepared.input_ids),
                              every_token)
        with contextlib.closing(self._engine_events(prepared, req, sampling)) as events:
            for kind, value, handle in events:
                snapshot = snapshots.on_event(kind, value, handle)
                if snapshot is not None:
                    yield snapshot

    # ---- introspection ----------------------------------------------------------------------------
    def stats(self) -> dict:
        """KV pages in use, queue lengths, token and cache counters (a snapshot, any thread).

        The *_tokens counters only grow: prompt_tokens (prefilled), generation_tokens (sampled),
        prefix_query_tokens / prefix_hit_tokens (looked up / found in the prefix cache)."""
        scheduler, runner = self.engine.scheduler, self.engine.runner
        bm = scheduler.bm
        return {"kv_pages_total": bm.num_pages, "kv_pages_used": bm.num_used_pages,
                "kv_pages_cached": len(bm.free_cached), "page_size": bm.page_size,
                "running": len(scheduler.running), "waiting": len(scheduler.waiting),
                "steps": self.engine.num_steps, "image_cache_hits": runner.image_cache.hits,
                "image_cache_misses": runner.image_cache.misses, "max_len": self.max_len,
                "prompt_tokens": scheduler.num_prompt_tokens,
                "generation_tokens": scheduler.num_generation_tokens,
                "prefix_query_tokens": scheduler.num_prefix_query_tokens,
                "prefix_hit_tokens": scheduler.num_prefix_hit_tokens,
                "memory_plan": runner.memory_plan.as_dict() if runner.memory_plan else None}

    def reset_prefix_cache(self) -> None:
        """Empty the prefix (KV page) cache and the image-feature cache, e.g. between benchmark
        runs. Requests in flight are unaffected."""
        def reset():
            self.engine.scheduler.bm.reset_prefix_cache()
            self.engine.runner.image_cache.clear()
        self.engine.call(reset)

    def close(self) -> None:
        """Stop the engine thread (pending requests fail) and any tensor-parallel workers. The
        object is unusable afterwards."""
        self.engine.shutdown()
        if self._tp is not None:
            self._tp.close()
