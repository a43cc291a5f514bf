"""Untrusted request input, read into values the rest of the server can handle safely.

`read_json(request)` parses the body (in a worker thread: up to --max-body-bytes of JSON is
request-sized work); `is_request_id(id)` and `checked_webhook_url(url)` check a path segment and
a query parameter. What passes is bounded and valid Unicode, so validation, the tokenizer, the
job store, response headers and error bodies never meet:

- nesting deeper than MAX_JSON_DEPTH (json's recursive decoder raises RecursionError around
  1000 levels; no request of either protocol nests past 6);
- an integer over Python's int/str digit limit (4300 digits by default: json raises ValueError);
- a lone UTF-16 surrogate ("\\ud800" escapes, or raw bytes ED A0 80 that json decodes with
  surrogatepass) in any string or key: not Unicode text; UTF-8 encoding, the tokenizer and the
  response encoder all fail on it. Every such string is reported, at its location;
- a request id that is not 1-128 of [A-Za-z0-9_-] (the stores make uuid4 strings): ids are
  echoed in the x-fal-request-id header and in URLs, where %00 or non-Latin-1 text cannot go.
  Such an id is never looked up: the routes answer 404 as for any unknown id;
- a fal_webhook that is not an http(s) URL with a host.

The body and webhook problems are a 422 in FastAPI's shape {"detail": [{"loc", "msg", "type"}]}
(OpenAI routes turn it into a 400 with `param` naming the location; errors.error_response).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from fastllava.preprocess.addresses import is_host_name
from fastllava.schema import lone_surrogate_at

from .errors import ApiError

MAX_JSON_DEPTH = 64
# Separators (`,` `:`) a body may hold. json.loads holds the GIL for the whole parse, so a worker
# thread does not keep the event loop free: 16 M tiny values in a 32 MiB body parsed for ~2 s
# with every route stalled. A protocol body has a few dozen values; prompt text (16384 chars at
# most) may hold commas and colons too. 100k separators parse in ~15 ms; counting them (in C,
# two passes over the bytes) costs ~10 ms for 32 MiB.
MAX_JSON_SEPARATORS = 100_000
MAX_REPORTED = 20               # lone-surrogate locations listed in one 422
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_CONTAINERS = (dict, list)


def _invalid(problems: list[dict]) -> ApiError:
    """A 422; for the OpenAI routes, `param` and `code` come from the first problem."""
    first = problems[0]
    param = _openai_param(first["loc"][1:]) if first["type"] != "json_invalid" else None
    return ApiError(422, problems, "validation_error", param=param or None, code=first["type"])


def _openai_param(path: list) -> str:
    """A JSON location as OpenAI names parameters: messages[0].content[1].text."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _json_invalid(pos: int, error: str) -> ApiError:
    return _invalid([{"loc": ["body", pos], "msg": "JSON decode error", "type": "json_invalid",
                      "ctx": {"error": error}}])


def _path(node) -> list:
    out = []
    while node is not None:
        key, node = node
        out.append(key)
    return out[::-1]


def _scan(data: Any) -> list[dict]:
    """Depth and lone-surrogate problems of a parsed JSON value, as 422 detail items.

    Iterative (a stack of (container, path, depth)); a container holding only numbers, bools
    and nulls is passed over in C (set(map(type, ...))), so a body of millions of numbers costs
    a fraction of its json.loads."""
    problems: list[dict] = []

    def surrogate(where, index: int, what: str) -> None:
        if len(problems) < MAX_REPORTED:
            problems.append({"loc": ["body", *_path(where)], "type": "string_unicode",
                             "msg": f"{what} is not valid Unicode text: a lone UTF-16 surrogate "
                                    f"at index {index}"})

    if isinstance(data, str) and (i := lone_surrogate_at(data)) is not None:
        surrogate(None, i, "the body")
    stack = [(data, None, 1)] if isinstance(data, _CONTAINERS) else []
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return [{"loc": ["body", *_path(where)], "type": "json_invalid",
                     "msg": f"JSON nested deeper than {MAX_JSON_DEPTH} levels"}]
        if isinstance(value, dict):
            for key in value:
                if (i := lone_surrogate_at(key)) is not None:
                    surrogate((key, where), i, "a field name")
            children, kinds = value.items(), set(map(type, value.values()))
        else:
            children, kinds = enumerate(value), set(map(type, value))
        if kinds.isdisjoint((str, dict, list)):
            continue
        for key, child in children:
            if isinstance(child, str):
                if (i := lone_surrogate_at(child)) is not None:
                    surrogate((key, where), i, "the string")
            elif isinstance(child, _CONTAINERS):
                stack.append((child, (key, where), depth + 1))
    return problems


def parse_json(body: bytes) -> Any:
    """The body as a JSON value, or ApiError(422) naming the problem (see the module doc)."""
    if not body.strip():
        raise _invalid([{"loc": ["body"], "msg": "Field required", "type": "missing"}])
    if (separators := body.count(b",") + body.count(b":")) > MAX_JSON_SEPARATORS:
        raise _json_invalid(0, f"the body has {separators} ',' and ':' separators, over the "
                               f"limit of {MAX_JSON_SEPARATORS}: no request has that many values")
    try:
        data = json.loads(body)
    except RecursionError:
        raise _invalid([{"loc": ["body"], "type": "json_invalid",
                         "msg": f"JSON nested deeper than {MAX_JSON_DEPTH} levels"}]) from None
    except json.JSONDecodeError as e:
        raise _json_invalid(e.pos, str(e)) from None
    except UnicodeDecodeError as e:
        raise _json_invalid(e.start, f"the body is not valid {e.encoding} text") from None
    except ValueError:  # int(): a number past the interpreter's digit limit
        digits = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
        raise _json_invalid(0, f"a number has more than {digits} digits") from None
    problems = _scan(data)
    if problems:
        raise _invalid(problems)
    return data


async def read_json(request: Request) -> Any:
    return await run_in_threadpool(parse_json, await request.body())


def checked_webhook_url(url: str) -> str:
    """`url` (the fal_webhook query parameter) if it is an http(s) URL with a host; a 422
    otherwise, so that a job is not queued with a webhook that can never be delivered."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and is_host_name(parts.hostname or "") and (
            parts.port is None or parts.port > 0) and not _CONTROL.search(url)
    except ValueError:  # bad brackets or port
        ok = False
    if not ok:
        raise _invalid([{"loc": ["query", "fal_webhook"], "type": "url_parsing",
                         "msg": "must be an http(s) URL with a valid host name or address "
                                "(no spaces or control characters)"}])
    return url


def is_request_id(request_id: str) -> bool:
    """Whether `request_id` has the form of an id the stores hand out (see the module doc)."""
    return REQUEST_ID.fullmatch(request_id) is not None
