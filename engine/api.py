"""The public API: `LLaVA.from_pretrained(...)`, `generate(request)`, `stream(request)`.

Requests use the fal model schema {image_url, prompt, max_tokens=64, temperature=0.2, top_p=1}
(+ optional seed); results are {"output": str, "partial": bool}. Calls are serialised by a lock
for now: one request runs at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from fastllava.config import LlavaConfig, eos_token_ids
from fastllava.generate import SamplingParams, generate_tokens
from fastllava.kernels.ops import get_ops
from fastllava.kv_cache import PagedKVCache
from fastllava.loading import LoadedCheckpoint, load_checkpoint
from fastllava.preprocess.anyres import anyres_num_tokens
from fastllava.preprocess.image_io import ImageLimits, load_image
from fastllava.preprocess.processor import ProcessedImage, preprocess
from fastllava.schema import GenerationRequest, parse_request
from fastllava.text.detokenize import IncrementalDetokenizer
from fastllava.text.prompt import build_input_ids
from fastllava.text.template import render_messages, render_prompt

# Original checkpoints splice images at a sentinel id outside the vocabulary (the original repo's -200).
IMAGE_SENTINEL_ID = -200
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    """A request turned into model inputs (exposed for tests and the runtime)."""
    input_ids: list[int]
    image: ProcessedImage
    num_image_tokens: int
    image_token_id: int


def _plain(events: Iterator[dict]) -> Iterator[dict]:
    """Detailed snapshots → the public {"output", "partial"} ones; closing this closes `events`."""
    with contextlib.closing(events):
        for e in events:
            yield {"output": e["output"], "partial": e["partial"]}


def _resolve_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    elif dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return device, dtype


class LLaVA:
    def __init__(self, ckpt: LoadedCheckpoint, backend: str, page_size: int, max_context: int,
                 image_limits: ImageLimits):
        self.config: LlavaConfig = ckpt.config
        self.model = ckpt.model
        self.tokenizer = ckpt.tokenizer
        self.template = ckpt.template
        self.image_config = ckpt.image_config
        self.path: Path = ckpt.path
        self.image_limits = image_limits
        self.device = ckpt.device
        self.ops = get_ops(backend, self.device.type)
        self.dtype = ckpt.dtype
        self.stop_ids = eos_token_ids(ckpt.path)
        if not self.stop_ids and self.tokenizer.eos_id is not None:
            self.stop_ids = (self.tokenizer.eos_id,)
        t = self.config.text
        max_context = min(max_context, t.max_position_embeddings)
        self.cache = PagedKVCache(t.num_hidden_layers, -(-max_context // page_size), page_size,
                                  t.num_key_value_heads, t.head_dim, self.dtype, self.device)
        self._lock = threading.Lock()
        # The <image> placeholder id: the tokenizer's own token when it has one (llava-hf; it must
        # agree with config.json), else a sentinel spliced in by build_input_ids (original repo).
        tok_id = self.tokenizer.token_id("<image>")
        if tok_id is not None and self.config.image_token_id not in (None, tok_id):
            raise ValueError(f"config.json image_token_index is {self.config.image_token_id} but the "
                             f"tokenizer's <image> token is {tok_id}")
        self.image_token_id = IMAGE_SENTINEL_ID if tok_id is None else tok_id

    @classmethod
    def from_pretrained(cls, model: str | Path, device=None, dtype=None, *, progress: bool = False,
                        backend: str = "auto", revision: str | None = None, page_size: int = 16,
                        max_context: int = 8192,
                        image_limits: ImageLimits = ImageLimits()) -> LLaVA:
        """Load a LLaVA-1.5 / LLaVA-NeXT checkpoint from a local folder or a hub id.

        device None → CUDA when available, else CPU; dtype None → bf16 on CUDA, fp32 on CPU.
        progress=True shows a progress bar while the weights load. max_context caps the KV cache
        (prompt with image + generated tokens) at min(max_context, max_position_embeddings)."""
        device, dtype = _resolve_device_dtype(device, dtype)
        get_ops(backend, device.type)  # fail fast on a bad backend, before reading any weights
        ckpt = load_checkpoint(str(model), device=device, dtype=dtype, revision=revision,
                               progress=progress)
        return cls(ckpt, backend, page_size, max_context, image_limits)

    # ---- request → inputs -----------------------------------------------------------------------
    def num_image_tokens(self, image: ProcessedImage) -> int:
        c = self.config
        if c.kind == "llava":
            return c.tokens_per_tile
        return anyres_num_tokens(image.image_size, c.pinpoints, c.vision.image_size,
                                 c.vision.patch_size, c.tokens_per_tile)

    def prepare(self, request: GenerationRequest, rendered: str | None = None) -> PreparedPrompt:
        """Load and preprocess the image, render the prompt (or take `rendered`, a chat already
        rendered by `render_chat`) and expand its one <image> into the image's token count."""
        image = preprocess(load_image(request.image_url, self.image_limits), self.image_config)
        n = self.num_image_tokens(image)
        if rendered is None:
            rendered = render_prompt(self.template, request.prompt, self.tokenizer)
        ids = build_input_ids(self.tokenizer, rendered, "<image>", self.image_token_id, n)
        return PreparedPrompt(ids, image, n, self.image_token_id)

    def render_chat(self, messages: list[dict]) -> str:
        """A chat [{"role": "system"|"user"|"assistant", "content": [{"type": "image"} |
        {"type": "text", "text": str}, ...]}, ...] rendered with the checkpoint's template and a
        generation prompt. Templates that drop system messages (the mistral family) get the
        system text folded into the first user turn instead, so no instruction is lost silently."""
        rendered = render_messages(self.template, messages, self.tokenizer)
        system = [p["text"] for m in messages if m["role"] == "system"
                  for p in m["content"] if p["type"] == "text" and p["text"].strip()]
        if all(text in rendered for text in system):
            return rendered
        folded, prefix = [], "\n\n".join(system)
        for m in messages:
            if m["role"] == "system":
                continue
            if m["role"] == "user" and prefix:
                m = {"role": "user", "content": [{"type": "text", "text": prefix + "\n\n"},
                                                 *m["content"]]}
                prefix = ""
            folded.append(m)
        return render_messages(self.template, folded, self.tokenizer)

    @torch.inference_mode()
    def _prompt_embeds(self, p: PreparedPrompt) -> torch.Tensor:
        pixels = p.image.pixel_values.to(self.device)
        feats = self.model.encode_images(self.ops, [pixels], [p.image.image_size], [p.image.grid])[0]
        ids = torch.tensor(p.input_ids, dtype=torch.int64, device=self.device)
        return self.model.embed(ids, ids == p.image_token_id, feats)

    # ---- generation -----------------------------------------------------------------------------
    def _tokens(self, prepared: PreparedPrompt, request: GenerationRequest) -> Iterator[int]:
        params = SamplingParams(request.max_tokens, request.temperature, request.top_p,
                                request.seed, self.stop_ids)
        embeds = self._prompt_embeds(prepared)
        yield from generate_tokens(self.model, self.ops, self.cache, embeds, params)

    def generate_ids(self, request: Mapping[str, Any]) -> list[int]:
        """Generated token ids (the stop id, if reached, included)."""
        req = parse_request(request)
        prepared = self.prepare(req)
        with self._lock:
            return list(self._tokens(prepared, req))

    def generate(self, request: Mapping[str, Any]) -> dict:
        out = None
        for out in self.stream(request):
            pass
        return out

    def stream(self, request: Mapping[str, Any]) -> Iterator[dict]:
        """Cumulative snapshots {"output": text so far, "partial": True} ..., then the final
        {"output": text, "partial": False}. The request is validated before the first yield's
        work starts; closing the iterator early stops generation and frees its KV pages."""
        req = parse_request(request)
        return _plain(self._events(req, None, False))

    def stream_detailed(self, request: Mapping[str, Any], *, messages: list[dict] | None = None,
                        max_tokens_limit: int = 4096, max_prompt_chars: int = 16384,
                        every_token: bool = False) -> Iterator[dict]:
        """`stream` with counts: every snapshot also has "prompt_tokens" (image tokens included),
        "completion_tokens" (tokens generated so far, a stop id included) and "finish_reason"
        (None until the final snapshot, then "stop" for a stop id, "length" for max_tokens or a
        full KV cache). `messages` (see `render_chat`) replaces the single-turn prompt; the
        request's "prompt" is then validated only (pass the chat's text for the length limit).
        Validation is eager; the image is fetched at the first next(), outside the engine lock.
        every_token=True yields after every generated token, even when the text did not change
        (a byte-fallback run held back, or whitespace), so a caller that polls for cancellation
        between snapshots can stop at the next token."""
        req = parse_request(request, max_tokens_limit=max_tokens_limit,
                            max_prompt_chars=max_prompt_chars)
        return self._events(req, messages, every_token)

    def _events(self, req: GenerationRequest, messages: list[dict] | None,
                every_token: bool) -> Iterator[dict]:
        # Fetching and preprocessing the image happen before the lock: a slow image host does not
        # hold up the request that is generating.
        prepared = self.prepare(req, None if messages is None else self.render_chat(messages))
        counts = {"prompt_tokens": len(prepared.input_ids), "completion_tokens": 0}
        detok = IncrementalDetokenizer(self.tokenizer)
        text, finish = "", "length"
        with self._lock:
            for token in self._tokens(prepared, req):
                counts["completion_tokens"] += 1
                if token in self.stop_ids:
                    finish = "stop"
                    break
                new = detok.push(token)
                if new != text or every_token:
                    text = new
                    yield {"output": text, "partial": True, **counts, "finish_reason": None}
        yield {"output": detok.text(), "partial": False, **counts, "finish_reason": finish}
