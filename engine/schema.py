"""The fal LLaVA request schema: strict validation of one generation request.

Shared by the Python API, the CLI, the HTTP server and the scheduler, so it imports no torch.

Fields, types and defaults follow fal's model pages (fal-ai/llava-next, fal-ai/llavav15-13b):

    image_url    str, required    https/http URL, data: URI, or (API/CLI only) a local path
    prompt       str, required    non-empty after strip, at most `max_prompt_chars` characters
    max_tokens   int   = 64       1 <= n <= max_tokens_limit   (alias: max_new_tokens, below)
    temperature  float = 0.2      0 <= t <= 2; 0 means greedy
    top_p        float = 1.0      0 < p <= 1
    seed         int | None       0 <= seed < 2**63; makes sampling reproducible

Ranges. fal documents top_p as "0 to 1" on llava-next and temperature as "0 to 1" on
llavav15-13b (no temperature range on llava-next). We accept temperature up to 2 (OpenAI's range,
a superset of fal's). top_p = 0 is rejected although fal's "0 to 1" may include it: an empty
nucleus has no meaning (vLLM rejects it too).

The form of image_url is not checked here (any non-empty string): the image loader does that, and
the HTTP server must refuse local paths itself.

Strictness (stricter than pydantic's lax mode, on purpose): bool is not a number, a float is not
an int even when integral (64.0), strings are not coerced to numbers, NaN/inf are rejected, and
`null` is only accepted for `seed`, and strings must be Unicode text (no lone UTF-16 surrogate,
type "string_unicode").

Errors carry pydantic's machine vocabulary in `type` ("missing", "extra_forbidden", "int_type",
"greater_than_equal", ...) so the server can answer FastAPI's 422 shape:
`{"detail": [e.to_dict() for e in validate_all(body)]}`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = [
    "GenerationRequest",
    "RequestValidationError",
    "FIELDS",
    "lone_surrogate_at",
    "short_repr",
    "parse_request",
    "validate_all",
]

# Field order is the order errors are reported in (after "body" and unknown fields).
FIELDS = ("image_url", "prompt", "max_tokens", "temperature", "top_p", "seed")
# fal-ai/llavav15-13b names the token budget `max_new_tokens` (fal-ai/llava-next: `max_tokens`);
# accepting it lets clients of either endpoint talk to us unchanged.
ALIASES = {"max_new_tokens": "max_tokens"}
TEMPERATURE_MAX = 2.0
SEED_LIMIT = 2**63  # exclusive; seeds must fit a signed 64-bit generator seed
MAX_TOP_LOGPROBS = 20  # alternatives per token with logprobs (OpenAI's top_logprobs limit)


class RequestValidationError(ValueError):
    """One invalid field. `str(e)` is "<field>: <msg>"; `type` is pydantic's error type."""

    def __init__(self, field: str, msg: str, type: str, input: Any = None):
        self.field = field
        self.msg = msg
        self.type = type
        self.input = input
        super().__init__(f"{field}: {msg}")

    @property
    def loc(self) -> tuple[str, ...]:
        """FastAPI's location: ("body",) for the body itself, else ("body", field)."""
        return ("body",) if self.field == "body" else ("body", self.field)

    def to_dict(self) -> dict[str, Any]:
        """One item of FastAPI's 422 `detail` list: {"loc", "msg", "type"}."""
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request; build it with `parse_request`, which enforces the ranges."""

    image_url: str | None           # None: a text-only request (Python API, image_required=False)
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.2
    top_p: float = 1.0
    seed: int | None = None


def short_repr(value: Any) -> str:
    """repr of an offending input, elided past 60 characters (huge prompts, 10**400)."""
    try:
        text = repr(value)
    except ValueError:  # an int past the interpreter's int/str digit limit
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 60 else text[:57] + "..."


def _got(value: Any) -> str:
    """An offending input with its type, for type errors ("got str '64'")."""
    return "got null" if value is None else f"got {type(value).__name__} {short_repr(value)}"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def lone_surrogate_at(text: str) -> int | None:
    """Index of the first lone UTF-16 surrogate in `text` (not Unicode text: it cannot be
    encoded as UTF-8, so the tokenizer and the job store would fail on it), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def _check_str(name: str, value: Any, max_chars: int | None) -> str:
    if not isinstance(value, str):
        raise RequestValidationError(name, f"must be a string, {_got(value)}", "string_type", value)
    if (index := lone_surrogate_at(value)) is not None:
        raise RequestValidationError(
            name, f"must be valid Unicode text: a lone UTF-16 surrogate at index {index}",
            "string_unicode", value)
    if not value.strip():
        raise RequestValidationError(
            name, "must be a non-empty string (not only whitespace)", "string_too_short", value)
    if max_chars is not None and len(value) > max_chars:
        raise RequestValidationError(
            name, f"must be at most {max_chars} characters, got {len(value)}", "string_too_long",
            value)
    return value


def _check_int(name: str, value: Any, expect: str, low: int, high: int, *,
               high_inclusive: bool = True) -> int:
    """An int (not bool, not an integral float) in [low, high] (or [low, high))."""
    if not _is_int(value):
        raise RequestValidationError(name, f"{expect}, {_got(value)}", "int_type", value)
    got = f"{expect}, got {short_repr(value)}"
    if value < low:
        raise RequestValidationError(name, got, "greater_than_equal", value)
    if value > high or (value == high and not high_inclusive):
        raise RequestValidationError(
            name, got, "less_than_equal" if high_inclusive else "less_than", value)
    return int(value)


def _check_real(name: str, value: Any, low: float, high: float, *, low_inclusive: bool) -> float:
    """A finite real in [low, high] (or (low, high] when not low_inclusive), returned as float."""
    expect = f"must be a number in {'[' if low_inclusive else '('}{low:g}, {high:g}]"
    if not _is_real(value):
        raise RequestValidationError(name, f"{expect}, {_got(value)}", "float_type", value)
    got = f"{expect}, got {short_repr(value)}"
    # Compare before float(): a huge int (10**400) would overflow float() but compares exactly.
    if not _is_int(value) and not math.isfinite(value):
        raise RequestValidationError(name, got, "finite_number", value)
    if value < low or (value == low and not low_inclusive):
        raise RequestValidationError(
            name, got, "greater_than_equal" if low_inclusive else "greater_than", value)
    if value > high:
        raise RequestValidationError(name, got, "less_than_equal", value)
    return float(value)


def _check_seed(name: str, value: Any) -> int | None:
    if value is None:
        return None
    return _check_int(name, value, "must be null or an integer in [0, 2**63)", 0, SEED_LIMIT,
                      high_inclusive=False)


def _validate(data: Any, max_tokens_limit: int, max_prompt_chars: int,
              check_image_url: Callable[[str], None] | None = None, image_required: bool = True):
    """Every error in reporting order, and the validated values (meaningful only without errors)."""
    if not isinstance(data, Mapping):
        return [RequestValidationError(
            "body", f"must be a JSON object (mapping) with fields {', '.join(FIELDS)}; "
            f"got {type(data).__name__}", "model_type", data)], {}
    errors: list[RequestValidationError] = []
    accepted = ", ".join(FIELDS + tuple(ALIASES))
    for key in sorted((k for k in data if k not in FIELDS and k not in ALIASES), key=str):
        errors.append(RequestValidationError(
            str(key), f"unknown field; accepted fields are {accepted}", "extra_forbidden",
            data[key]))

    # Resolve aliases: an error names the field as the client spelled it.
    names = {field: field for field in FIELDS}
    for alias, canonical in ALIASES.items():
        if alias in data and canonical in data:
            errors.append(RequestValidationError(
                alias, f"give either {canonical} or {alias} (the same setting), not both",
                "extra_forbidden", data[alias]))
        elif alias in data:
            names[canonical] = alias

    def image_url(name: str, value: Any) -> str:
        url = _check_str(name, value, None)
        if check_image_url is not None:
            try:
                check_image_url(url)
            except RequestValidationError as e:  # the caller's policy, reported under `name`
                raise RequestValidationError(name, e.msg, e.type, value) from None
        return url

    checks = {
        "image_url": image_url,
        "prompt": lambda n, v: _check_str(n, v, max_prompt_chars),
        "max_tokens": lambda n, v: _check_int(
            n, v, f"must be an integer between 1 and {max_tokens_limit}", 1, max_tokens_limit),
        "temperature": lambda n, v: _check_real(n, v, 0.0, TEMPERATURE_MAX, low_inclusive=True),
        "top_p": lambda n, v: _check_real(n, v, 0.0, 1.0, low_inclusive=False),
        "seed": _check_seed,
    }
    values: dict[str, Any] = {}
    for field in FIELDS:
        name = names[field]
        if name not in data:
            if field == "prompt" or (field == "image_url" and image_required):
                errors.append(RequestValidationError(
                    name, "field required (a non-empty string)", "missing"))
            continue
        try:
            values[field] = checks[field](name, data[name])
        except RequestValidationError as e:
            errors.append(e)
    values.setdefault("image_url", None)
    return errors, values


def validate_all(data: Any, *, max_tokens_limit: int = 4096, max_prompt_chars: int = 16384,
                 check_image_url: Callable[[str], None] | None = None,
                 image_required: bool = True) -> list[RequestValidationError]:
    """Every problem with `data`, in reporting order (body, unknown fields sorted, then FIELDS).

    Empty when `data` is valid. Unknown fields give one error each (FastAPI's shape).
    `check_image_url(url)`: a caller's policy on the form of image_url (the HTTP server refuses
    local paths and private hosts), run on a well-formed image_url; its RequestValidationError is
    listed with the other fields' problems.
    """
    return _validate(data, max_tokens_limit, max_prompt_chars, check_image_url,
                     image_required)[0]


def parse_request(data: Mapping[str, Any], *, max_tokens_limit: int = 4096,
                  max_prompt_chars: int = 16384, image_required: bool = True
                  ) -> GenerationRequest:
    """Validate a fal-schema request dict and return it with defaults filled in.

    image_required=False (the Python API) accepts a request without image_url: a text-only
    turn, or one whose images come with its chat messages. The fal schema (the HTTP route, the
    queue worker) keeps it required.
    Raises RequestValidationError for the first problem in reporting order; when that is an
    unknown field, the one error names every unknown field (sorted) and `field` is the first.
    """
    errors, values = _validate(data, max_tokens_limit, max_prompt_chars,
                               image_required=image_required)
    if not errors:
        return GenerationRequest(**values)
    first = errors[0]
    unknown = [e.field for e in errors if e.type == "extra_forbidden" and e.field not in ALIASES]
    if first.type == "extra_forbidden" and len(unknown) > 1:
        names = ", ".join(map(repr, unknown))
        accepted = ", ".join(FIELDS + tuple(ALIASES))
        raise RequestValidationError(
            first.field, f"unknown field (all unknown fields: {names}); accepted fields are "
            f"{accepted}", "extra_forbidden", first.input)
    raise first
