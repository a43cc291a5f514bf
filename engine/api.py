"""The public API: `LLaVA.from_pretrained(...)`, `generate(request)`, `stream(request)`.

Requests use the fal model schema {image_url, prompt, max_tokens=64, temperature=0.2, top_p=1}
(+ optional seed); results are {"output": str, "partial": bool}. Calls are serialised by a lock
for now: one request runs at a time.
"""

from __future__ import annotations

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
from fastllava.text.template import render_prompt

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

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        image = preprocess(load_image(request.image_url, self.image_limits), self.image_config)
        n = self.num_image_tokens(image)
        rendered = render_prompt(self.template, request.prompt, self.tokenizer)
        ids = build_input_ids(self.tokenizer, rendered, "<image>", self.image_token_id, n)
        return PreparedPrompt(ids, image, n, self.image_token_id)

    @torch.inference_mode()
    def _prompt_embeds(self, p: PreparedPrompt) -> torch.Tensor:
        pixels = p.image.pixel_values.to(self.device)
        feats = self.model.encode_images(self.ops, [pixels], [p.image.image_size], [p.image.grid])[0]
        ids = torch.tensor(p.input_ids, dtype=torch.int64, device=self.device)
        return self.model.embed(ids, ids == p.image_token_id, feats)

    # ---- generation -----------------------------------------------------------------------------
    def _tokens(self, request: GenerationRequest) -> Iterator[int]:
        prepared = self.prepare(request)
        params = SamplingParams(request.max_tokens, request.temperature, request.top_p,
                                request.seed, self.stop_ids)
        embeds = self._prompt_embeds(prepared)
        yield from generate_tokens(self.model, self.ops, self.cache, embeds, params)

    def generate_ids(self, request: Mapping[str, Any]) -> list[int]:
        """Generated token ids (the stop id, if reached, included)."""
        req = parse_request(request)
        with self._lock:
            return list(self._tokens(req))

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
        return self._stream(req)

    def _stream(self, req: GenerationRequest) -> Iterator[dict]:
        detok = IncrementalDetokenizer(self.tokenizer)
        text = ""
        with self._lock:
            for token in self._tokens(req):
                if token in self.stop_ids:
                    break
                new = detok.push(token)
                if new != text:
                    text = new
                    yield {"output": text, "partial": True}
        yield {"output": detok.text(), "partial": False}
