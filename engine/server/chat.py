"""An OpenAI chat-completions body → the engine's chat and a fal-schema request.

Accepted: `model`, `messages` (roles system / developer / user / assistant; content a string or a
list of {"type": "text"} / {"type": "image_url", "image_url": {"url"} | str} parts; up to
ServerSettings.max_images_per_request images, each placed where its part stands, or none for a
text-only chat), `max_tokens`
/ `max_completion_tokens` (the latter wins; default ServerSettings.default_chat_max_tokens),
`temperature` (default 1, OpenAI's), `top_p`, `n` (1..MAX_CHOICES), `stop` (string or up to 4
strings, each at most ServerSettings.max_stop_chars long),
`seed`, `stream`, `stream_options.include_usage`, `logprobs` / `top_logprobs`, and vLLM's /
SGLang's `ignore_eos` (benchmark clients send it for fixed-length outputs). Features the
engine does not have (tools, JSON mode, penalties, logit_bias, and vLLM's sampling extensions
such as top_k, min_p: `_UNSUPPORTED`) are refused with a 400 naming the field
rather than silently ignored, unless set to their "off" value; other fields (user, metadata,
...) are ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastllava.schema import MAX_TOP_LOGPROBS, RequestValidationError, short_repr, validate_all

from .errors import ApiError, detail_message
from .safety import precheck_image_url
from .settings import ServerSettings

MAX_CHOICES = 16   # n: each choice is a request of its own in the engine
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# field → (values that mean "off", what it is). Besides OpenAI's own, the sampling extensions
# vLLM and SGLang accept (clients written for them send these through the openai SDK's
# extra_body): ignoring one would answer 200 with other output than asked (top_k 1 sampled at
# OpenAI's default temperature 1, min_tokens stopping at eos in a benchmark).
_UNSUPPORTED = {"tools": (([],), "tool calling"), "functions": (([],), "function calling"),
                "frequency_penalty": ((0,), "frequency penalty"),
                "presence_penalty": ((0,), "presence penalty"),
                "logit_bias": (({},), "logit bias"),
                "repetition_penalty": ((1,), "repetition penalty"),
                "top_k": ((-1, 0), "top-k sampling"), "min_p": ((0,), "min-p sampling"),
                "min_tokens": ((0,), "a minimum output length"),
                "stop_token_ids": (([],), "stop token ids"),
                "best_of": ((1,), "best-of sampling"),
                "use_beam_search": ((False,), "beam search"),
                "guided_json": ((), "guided decoding"), "guided_regex": ((), "guided decoding"),
                "guided_choice": ((), "guided decoding"),
                "guided_grammar": ((), "guided decoding"),
                "modalities": ((["text"],), "output modalities other than text"),
                "audio": ((), "audio output")}


@dataclasses.dataclass(frozen=True)
class Chat:
    model: str
    messages: list[dict]        # engine form, see LLaVA.render_chat
    request: dict               # fal schema without image_url: prompt (all text), sampling
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None = None     # top_logprobs when logprobs is true, else None
    n: int = 1                      # choices (samples of the one prompt)
    ignore_eos: bool = False        # the checkpoint's stop ids do not end the choices
    budget: str = "max_tokens"      # the field that set request["max_tokens"]


def _bad(message: str, param: str | None, code: str = "invalid_request_error") -> ApiError:
    return ApiError(400, message, code, param=param, code=code)


def _content(i: int, role: str, content: Any, images: list[str]) -> list[dict]:
    where = f"messages[{i}].content"
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of content parts, got "
                   f"{type(content).__name__}", where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise _bad(f"{where}[{j}].image_url.url must be a non-empty string", where)
            if role != "user":
                raise _bad(f"{where}[{j}]: images are only accepted in user messages", where)
            images.append(url)
            parts.append({"type": "image", "image": url})
        else:
            raise _bad(f"{where}[{j}]: unsupported content part (type {short_repr(kind)}); "
                       "accepted: 'text' with a string 'text', 'image_url'", where)
    return parts


def _messages(raw: Any, max_images: int) -> tuple[list[dict], list[str]]:
    if not isinstance(raw, list) or not raw:
        raise _bad("messages must be a non-empty list", "messages")
    messages, images = [], []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in _ROLES:
            raise _bad(f"messages[{i}].role must be one of {sorted(_ROLES)}, got "
                       f"{short_repr(role)} (tool messages are not supported)",
                       f"messages[{i}].role")
        messages.append({"role": _ROLES[role], "content": _content(i, role, m.get("content"),
                                                                   images)})
    if len(images) > max_images:
        raise _bad(f"a chat may hold at most {max_images} images (--max-images-per-request); "
                   f"got {len(images)}", "messages")
    if messages[-1]["role"] != "user":
        raise _bad("the last message must be a user message (continuing an assistant message "
                   "is not supported)", "messages")
    return messages, images


def _image_errors(images: list[str], settings: ServerSettings) -> list[RequestValidationError]:
    """The submit-time check of every image source (safety.precheck_image_url), in order."""
    errors = []
    for url in images:
        try:
            precheck_image_url(url, settings)
        except RequestValidationError as e:
            errors.append(e)
    return errors


def _logprobs(body: dict) -> int | None:
    """OpenAI's pair: logprobs (bool) turns them on, top_logprobs (0..20) needs it."""
    on, top = body.get("logprobs"), body.get("top_logprobs")
    if on is not None and not isinstance(on, bool):
        raise _bad("logprobs must be a boolean", "logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise _bad(f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}, got "
                       f"{short_repr(top)}", "top_logprobs")
        if not on:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if on else None


def _stop(value: Any, max_chars: int) -> list[str]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(
            isinstance(s, str) and s for s in stops):
        raise _bad("stop must be a non-empty string or a list of up to 4 non-empty strings", "stop")
    for i, s in enumerate(stops):
        if len(s) > max_chars:
            raise _bad(f"stop{'' if isinstance(value, str) else f'[{i}]'} is {len(s)} characters "
                       f"long, over the limit of {max_chars} (--max-stop-chars)", "stop")
    return stops


def parse_chat(body: Any, settings: ServerSettings, model_names: list[str]) -> Chat:
    """Validate `body`; raise ApiError (400, or 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise _bad(f"the body must be a JSON object, got {type(body).__name__}", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required (a string; see GET /v1/models)", "model")
    if model not in model_names:
        raise ApiError(404, f"the model {short_repr(model)} does not exist; this server serves "
                       f"{model_names[0]!r}", "model_not_found", param="model",
                       code="model_not_found")
    for field, (off, what) in _UNSUPPORTED.items():
        if body.get(field) not in (None, *off):
            raise _bad(f"{what} is not supported by this server ({field})", field)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad("response_format: only {'type': 'text'} is supported", "response_format")
    n = 1 if body.get("n") is None else body["n"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise _bad(f"n must be an integer between 1 and {MAX_CHOICES}, got {short_repr(n)}", "n")
    messages, images = _messages(body.get("messages"), settings.max_images_per_request)
    texts = [p["text"] for m in messages for p in m["content"] if p["type"] == "text"]
    budget = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    ignored = body.get("max_tokens") if budget != "max_tokens" else None
    if ignored is not None:  # max_completion_tokens wins; a malformed max_tokens is still an error
        not_int = isinstance(ignored, bool) or not isinstance(ignored, int)
        if not_int or ignored < 1:
            raise _bad(f"max_tokens must be a positive integer, got {short_repr(ignored)}",
                       "max_tokens", "int_type" if not_int else "greater_than_equal")
    request: dict[str, Any] = {  # the images travel in `messages`, each in its part
        "prompt": "\n".join(texts) if "".join(texts).strip() else "(image only)",
        "max_tokens": body.get(budget, min(settings.default_chat_max_tokens,
                                           settings.max_tokens_limit)),
        "temperature": 1.0 if body.get("temperature") is None else body["temperature"],
        "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
        "seed": body.get("seed"),
    }
    if request["max_tokens"] is None:
        request["max_tokens"] = min(settings.default_chat_max_tokens, settings.max_tokens_limit)
    errors = _image_errors(images, settings) + validate_all(
        request, max_tokens_limit=settings.max_tokens_limit,
        max_prompt_chars=settings.max_prompt_chars, image_required=False)
    if errors:
        # Name the OpenAI field in the message (the prompt is all message text together).
        names = {"image_url": "image_url", "prompt": "message text", "max_tokens": budget}
        detail = [dict(e.to_dict(), loc=["body", names.get(e.field, e.field)]) for e in errors]
        param = {"image_url": "messages", "prompt": "messages", "max_tokens": budget}.get(
            errors[0].field, errors[0].field)
        raise _bad(detail_message(detail), param, errors[0].type)
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos must be a boolean", "ignore_eos")
    return Chat(model, messages, request, _stop(body.get("stop"), settings.max_stop_chars), stream,
                bool(options.get("include_usage")) and stream, _logprobs(body), n,
                bool(ignore_eos), budget)
