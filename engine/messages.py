"""Chat messages for the Python API → the engine's form (what `LLaVA.render_chat` renders).

Accepted (OpenAI's chat shape, plus transformers' image parts):

    [{"role": "system" | "developer" | "user" | "assistant",
      "content": "text" | [{"type": "text", "text": str},
                           {"type": "image_url", "image_url": {"url": src} | src},
                           {"type": "image", "image": src} | {"type": "image", "url": src}]}]

`src`: an http(s) URL, a data: URI, a local path or a PIL image. Engine form: content is always a
list of {"type": "text", "text"} / {"type": "image", "image": src} parts, in the order given, so
each image is placed where its part stands. An image part without a source ({"type": "image"})
takes the request's image_url (the one-image form the server used before); an image_url that no
such part takes is refused (RequestValidationError on image_url), never dropped. No torch here.
"""

from __future__ import annotations

from typing import Any

from fastllava.schema import RequestValidationError, lone_surrogate_at, short_repr

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _bad(msg: str, value: Any = None) -> RequestValidationError:
    return RequestValidationError("messages", msg, "value_error", value)


def _image_source(part: dict) -> Any:
    if part["type"] == "image_url":
        ref = part.get("image_url")
        return ref.get("url") if isinstance(ref, dict) else ref
    return part.get("image", part.get("url"))


def _text(where: str, text: str) -> dict:
    # Checked here, not only in the prompt: a request that gives its own "prompt" validates that
    # one, and the tokenizer would meet this text with a TypeError.
    if (index := lone_surrogate_at(text)) is not None:
        raise RequestValidationError(
            "messages", f"{where} must be valid Unicode text: a lone UTF-16 surrogate at index "
            f"{index}", "string_unicode", short_repr(text))
    return {"type": "text", "text": text}


def _part(where: str, part: Any) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return _text(f"{where}.text", part["text"])
    if kind in ("image", "image_url"):
        src = _image_source(part)
        if src is None and kind == "image":
            return {"type": "image"}
        if isinstance(src, str) and src or hasattr(src, "convert"):  # a PIL image
            return {"type": "image", "image": src}
        raise _bad(f"{where}: an image part needs a non-empty URL or path, or a PIL image",
                   short_repr(src))
    raise _bad(f"{where}: unsupported content part (type {short_repr(kind)}); accepted: 'text', "
               "'image_url', 'image'", short_repr(part))


def chat_messages(messages: Any) -> list[dict] | None:
    """`messages` in the engine's form (None stays None); RequestValidationError on `messages`
    naming the first bad message or part."""
    if messages is None:
        return None
    if not isinstance(messages, list) or not messages:
        raise _bad("must be a non-empty list of {'role', 'content'} messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ROLES:  # a list or dict role is unhashable
            raise _bad(f"messages[{i}].role must be one of {sorted(ROLES)}, got "
                       f"{short_repr(role)}")
        content = m.get("content")
        if isinstance(content, str):
            parts = [_text(f"messages[{i}].content", content)]
        elif isinstance(content, list):
            parts = [_part(f"messages[{i}].content[{j}]", p) for j, p in enumerate(content)]
        else:
            raise _bad(f"messages[{i}].content must be a string or a list of parts")
        if role != "user" and any(p["type"] == "image" for p in parts):
            raise _bad(f"messages[{i}]: images are only accepted in user messages")
        out.append({"role": ROLES[role], "content": parts})
    return out
