"""Input safety for the HTTP layer: the image policy, cheap up-front URL checks, error mapping.

The authoritative checks run where the bytes are read (fastllava.preprocess.image_io with the
`ImageLimits` built here): byte and pixel limits, the fetch deadline, and — unless
`allow_private_image_hosts` — the refusal of non-public addresses at connect time (every
redirect hop, DNS-rebinding safe). `precheck_image_url` repeats the cheap part at submit time so
a queued job that can only fail is refused with a 422 before it is queued.

Status codes (documented in the README):
    413 body over max_body_bytes                      (middleware, before parsing)
    422 fal validation / image errors                 {"detail": [{"loc", "msg", "type"}]}
    400 OpenAI validation / image errors              {"error": {"message", "type", "param", "code"}}
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any
from urllib.parse import urlsplit

from fastllava.preprocess.addresses import is_host_name
from fastllava.preprocess.image_io import (ImageError, ImageLimits, ImageTooLargeError,
                                           is_public_address)
from fastllava.schema import RequestValidationError, short_repr

from .settings import ServerSettings

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def image_limits(settings: ServerSettings) -> ImageLimits:
    """The ImageLimits every image load of this server uses (HTTP routes and the queue worker)."""
    return ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                       max_aspect_ratio=settings.max_image_aspect_ratio,
                       timeout_s=settings.image_timeout_s, allow_local_paths=False,
                       allow_private_hosts=settings.allow_private_image_hosts)


def precheck_image_url(url: Any, settings: ServerSettings, field: str = "image_url") -> None:
    """Raise RequestValidationError(type "image_url_refused" / "image_too_large") for sources the
    loader would refuse anyway: local paths and other schemes, hosts that are literally a
    non-public IP (any form the resolver reads without DNS) or "localhost" (names are resolved
    and checked at fetch time), data URIs whose
    payload is over max_image_bytes. Non-strings are left to the schema's own type check."""
    if not isinstance(url, str):
        return
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme == "data":
        payload = url.partition(",")[2]
        if len(payload) // 4 * 3 > settings.max_image_bytes + 2:
            raise RequestValidationError(
                field, f"data URI decodes to about {len(payload) // 4 * 3} bytes, over the limit "
                f"of {settings.max_image_bytes}", "image_too_large")
        return
    if scheme not in ("http", "https"):
        raise RequestValidationError(
            field, "must be an http(s):// URL or a data: URI (local paths and other schemes are "
            "not accepted over HTTP)", "image_url_refused")
    try:
        host = urlsplit(url).hostname or ""
    except ValueError as e:
        raise RequestValidationError(field, f"invalid URL: {e}", "image_url_refused") from e
    if not host:
        raise RequestValidationError(field, "URL has no host", "image_url_refused")
    if not is_host_name(host):
        raise RequestValidationError(field, f"URL host {short_repr(host)} is not a valid host name "
                                     "or address", "image_url_refused")
    if settings.allow_private_image_hosts:
        return
    literal = _literal_address(host)
    if host.lower() == "localhost" or host.lower().endswith(".localhost") or (
            literal is not None and not is_public_address(literal)):
        raise RequestValidationError(
            field, f"image host {host!r} is not a public address (loopback, private, link-local, "
            "multicast and reserved hosts are refused; see --allow-private-image-hosts)",
            "image_url_refused")


def _literal_address(host: str) -> str | None:
    """`host` as an IP address if it is one; also the short and numeric IPv4 forms the resolver
    reads without DNS ("127.1", "2130706433", "0x7f.1"), so they are refused here too."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except (OSError, ValueError):  # not an IPv4 number form (ValueError: an embedded NUL)
        return None


def classify(exc: BaseException) -> tuple[int, Any, str]:
    """(status code, fal detail, error_type) for an exception from validation or the engine.

    Validation and image errors are the client's (422 with FastAPI's detail list located at the
    field); other ValueErrors from the engine (prompt too long for the KV cache, a literal
    <image> in the prompt) are 400 bad_request; anything else is 500 internal_error, with a
    message that never carries a traceback."""
    if isinstance(exc, RequestValidationError):
        return 422, [exc.to_dict()], "validation_error"
    if isinstance(exc, ImageError):
        kind = "image_too_large" if isinstance(exc, ImageTooLargeError) else "image_load_error"
        return 422, [{"loc": ["body", "image_url"], "msg": str(exc), "type": kind}], kind
    if isinstance(exc, ValueError):
        return 400, str(exc), "bad_request"
    return 500, f"internal error ({type(exc).__name__}); see the server log", "internal_error"
