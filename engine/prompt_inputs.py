"""Request → model inputs for `LLaVA`: the images loaded and preprocessed, the prompt rendered
(one turn, or a chat with `render_chat`) and each <image> expanded into its image's token count
(`PreparedPrompt`), and each image's placeholder span for the caches."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Mapping

from PIL import Image

from fastllava.preprocess.anyres import anyres_num_tokens
from fastllava.preprocess.image_io import load_image
from fastllava.preprocess.processor import ProcessedImage, preprocess
from fastllava.runtime.sequence import ImageSpan
from fastllava.schema import GenerationRequest, RequestValidationError, parse_request
from fastllava.text.prompt import build_input_ids
from fastllava.text.template import render_messages, render_prompt


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    """A request turned into model inputs (exposed for tests and the runtime): the prompt ids with
    each image's placeholder expanded to its own token count, in prompt order."""
    input_ids: list[int]
    images: tuple[ProcessedImage, ...]
    image_token_counts: tuple[int, ...]
    image_token_id: int

    @property
    def image(self) -> ProcessedImage | None:
        """The first image (None for a text-only prompt)."""
        return self.images[0] if self.images else None

    @property
    def num_image_tokens(self) -> int:
        """Image tokens of all images together."""
        return sum(self.image_token_counts)


class PromptMixin:
    """Mixed into `LLaVA`: uses its config, tokenizer, template, image_config, image_limits,
    device and image_token_id."""

    def num_image_tokens(self, image: ProcessedImage) -> int:
        c = self.config
        if c.kind == "llava":
            return c.tokens_per_tile
        return anyres_num_tokens(image.image_size, c.pinpoints, c.vision.image_size,
                                 c.vision.patch_size, c.tokens_per_tile)

    def prepare(self, request: GenerationRequest, rendered: str | None = None,
                image: Image.Image | None = None, *,
                messages: list[dict] | None = None) -> PreparedPrompt:
        """Load and preprocess the images, render the prompt and expand each <image> into its
        image's token count.

        Without `messages`: one user turn, `request.prompt` after the request's image (or
        `image`, that image already loaded), or text alone when the request has no image_url.
        With `messages` (see `render_chat`): the chat's image parts, in order, each carrying its
        source ({"type": "image", "image": URL, path or PIL image}); parts without a source take
        request.image_url (the one-image form). `rendered`: the chat already rendered."""
        if messages is None:
            sources = [image if image is not None else request.image_url] \
                if image is not None or request.image_url is not None else []
            if rendered is None:
                rendered = render_prompt(self.template, request.prompt, self.tokenizer,
                                         len(sources))
        else:
            sources = [p.get("image", request.image_url) for m in messages
                       for p in m["content"] if p["type"] == "image"]
            if image is not None:
                if not sources:   # nowhere to put it: refused rather than dropped silently
                    raise RequestValidationError("image", "is not used: these messages have no "
                                                 "image part", "extra_forbidden")
                sources[0] = image
            if any(src is None for src in sources):
                raise RequestValidationError("image_url", "an image part has no source and the "
                                             "request has no image_url", "missing")
            if rendered is None:
                rendered = self.render_chat(messages)
        loaded = [src if isinstance(src, Image.Image) else load_image(src, self.image_limits)
                  for src in sources]
        images = tuple(preprocess(im, self.image_config, self.device) for im in loaded)
        counts = tuple(self.num_image_tokens(im) for im in images)
        ids = build_input_ids(self.tokenizer, rendered, "<image>", self.image_token_id, counts)
        return PreparedPrompt(ids, images, counts, self.image_token_id)

    def render_chat(self, messages: list[dict]) -> str:
        """A chat [{"role": "system"|"user"|"assistant", "content": [{"type": "image"} |
        {"type": "text", "text": str}, ...]}, ...] rendered with the checkpoint's template and a
        generation prompt. Templates that drop system messages (the mistral family) get the
        system text folded into the first user turn instead, so no instruction is lost silently."""
        rendered = render_messages(self.template, messages, self.tokenizer)
        system = [p["text"] for m in messages if m["role"] == "system"
                  for p in m["content"] if p["type"] == "text" and p["text"].strip()]
        if not system:
            return rendered
        # Whether the template keeps system text is asked with a marker in its place, not by
        # looking for the text itself: that may also stand in a user turn (then a dropped system
        # message went unnoticed), and a template may trim it (then it was folded in twice).
        marker = f"fastllava-system-{uuid.uuid4().hex}"
        probe = [{**m, "content": [{"type": "text", "text": marker}]} if m["role"] == "system"
                 else m for m in messages]
        if marker in render_messages(self.template, probe, self.tokenizer):
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

    @staticmethod
    def _parse(request: Mapping[str, Any], messages: list[dict] | None, **limits
               ) -> GenerationRequest:
        """parse_request for the Python API: image_url optional (a text-only turn, or a chat
        whose images come with its messages); a chat's text stands in for a missing prompt."""
        if messages is not None and isinstance(request, Mapping) and "prompt" not in request:
            text = "\n".join(p["text"] for m in messages for p in m["content"]
                             if p["type"] == "text")
            request = {**request, "prompt": text if text.strip() else "(image only)"}
        req = parse_request(request, image_required=False, **limits)
        if messages is not None and req.image_url is not None and not any(
                p["type"] == "image" and "image" not in p for m in messages
                for p in m["content"]):
            # Only an image part without a source takes image_url: else the image would be
            # dropped silently and the model would answer about a picture it never saw.
            raise RequestValidationError(
                "image_url", "is not used by these messages: no image part without a source "
                "takes it; put {'type': 'image'} where the image goes, or give the image as a "
                "part of its own", "extra_forbidden", req.image_url)
        return req

    @staticmethod
    def _image_spans(prepared: PreparedPrompt) -> tuple[ImageSpan, ...]:
        """Each image's run of placeholder tokens, in prompt order (its key names it in the
        prefix and image-feature caches, so a repeated image is cached per image)."""
        ids, spans, start = prepared.input_ids, [], 0
        for image, n in zip(prepared.images, prepared.image_token_counts):
            start = ids.index(prepared.image_token_id, start)
            if ids[start:start + n] != [prepared.image_token_id] * n:
                raise ValueError("the image placeholder tokens are not contiguous in the prompt")
            spans.append(ImageSpan(start, n, image.key))
            start += n
        if prepared.image_token_id in ids[start:]:
            raise ValueError("the prompt has more image placeholder tokens than its images")
        return tuple(spans)
