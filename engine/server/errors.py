"""Error bodies of the two protocols, and the exception the route handlers raise.

fal:    422 {"detail": [{"loc", "msg", "type"}, ...]}                    (FastAPI's own shape)
        other {"detail": "message", "error_type": "..."} + header X-Fal-Error-Type
OpenAI: {"error": {"message", "type", "param", "code"}}

Error bodies echo client text (field names, paths, ids): `encodable` escapes what UTF-8 cannot
carry (lone surrogates) so that an error answer can always be sent.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class ApiError(Exception):
    """An error answer. `detail` is a message, or FastAPI's 422 detail list."""

    def __init__(self, status: int, detail: Any, error_type: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail if isinstance(detail, str) else str(detail))
        self.status, self.detail, self.error_type = status, detail, error_type
        self.param, self.code, self.headers = param, code, headers or {}


def escape_unencodable(text: str) -> str:
    """`text`, with code points UTF-8 cannot encode (lone surrogates) written as \\udXXX."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def encodable(value: Any) -> Any:
    """A JSON-able error body with every string (keys too) passed through escape_unencodable."""
    if isinstance(value, str):
        return escape_unencodable(value)
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encodable(v) for v in value]
    return value


def fal_error_response(status: int, detail: Any, error_type: str,
                       headers: dict[str, str] | None = None) -> JSONResponse:
    """fal's error answer; a 422 detail list keeps FastAPI's exact body {"detail": [...]}."""
    headers = {**(headers or {}), "X-Fal-Error-Type": error_type}
    if status == 422 and isinstance(detail, list):
        return JSONResponse(encodable({"detail": detail}), status, headers=headers)
    return JSONResponse(encodable({"detail": detail, "error_type": error_type}), status,
                        headers=headers)


def openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def detail_message(detail: Any) -> str:
    """A 422 detail list as one line ("image_url: msg; prompt: msg"); strings unchanged."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            loc = [str(x) for x in item.get("loc", []) if x != "body"]
            why = (item.get("ctx") or {}).get("error")
            parts.append(f"{'.'.join(loc) + ': ' if loc else ''}{item.get('msg', '')}"
                         f"{f' ({why})' if why else ''}")
        return "; ".join(parts)
    return str(detail)


def openai_error_body(status: int, message: str, param: str | None = None,
                      code: str | None = None) -> dict:
    return {"error": {"message": message, "type": openai_type(status), "param": param,
                      "code": code}}


def openai_error_response(status: int, message: str, param: str | None = None,
                          code: str | None = None,
                          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(encodable(openai_error_body(status, message, param, code)), status,
                        headers=headers)


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_response(path: str, exc: ApiError) -> JSONResponse:
    """`exc` in the shape of the protocol that `path` belongs to."""
    if is_openai_path(path):  # OpenAI has no 422: validation errors are 400s there
        return openai_error_response(400 if exc.status == 422 else exc.status,
                                     detail_message(exc.detail), exc.param,
                                     exc.code or exc.error_type, exc.headers)
    return fal_error_response(exc.status, exc.detail, exc.error_type, exc.headers)
