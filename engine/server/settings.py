"""Server configuration: one frozen dataclass; `fastllava serve` flags map onto it 1:1.

Every limit here is enforced by the HTTP layer (see safety.py) and documented in the README
serving section. Sizes are bytes, times seconds.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from fastllava.runtime.config import RuntimeConfig

# Default fal endpoint ids by checkpoint kind (the product's two LLaVA endpoints).
DEFAULT_ENDPOINTS = {"next": "fal-ai/llava-next", "llava": "fal-ai/llavav15-13b"}


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    model: str                                  # local checkpoint folder or hub id
    host: str = "127.0.0.1"
    port: int = 8000
    endpoint_id: str | None = None              # "owner/alias"; None → by checkpoint kind
    api_keys: tuple[str, ...] = ()              # empty → no auth
    cors_origins: tuple[str, ...] = ()          # browser origins allowed to call ("*" = any)
    queue_url: str | None = None                # sqlite:///path | redis://host:port/db
    data_dir: str = "./fastllava-data"          # default sqlite file lives here
    retention_s: float = 3600.0                 # completed results kept this long
    public_url: str | None = None               # base of the URLs returned by submit
    tls_cert: str | None = None
    tls_key: str | None = None
    webhook_secret: str | None = None           # HMAC-SHA256 key for webhook signatures
    allow_private_image_hosts: bool = False
    refuse_private_webhook_hosts: bool = False  # webhooks may call back into the own network
    webhook_concurrency: int = 8                # webhook deliveries attempted at once
    max_body_bytes: int = 32 * 1024 * 1024      # whole request body (413 above)
    max_image_bytes: int = 20 * 1024 * 1024     # download / decoded data URI
    max_image_pixels: int = 40_000_000          # width * height, checked before decoding
    max_image_aspect_ratio: float = 50.0        # long side / short side, checked before decoding
    max_prompt_chars: int = 16384               # prompt (OpenAI: all message text together)
    max_tokens_limit: int = 4096                # largest max_tokens accepted
    image_timeout_s: float = 15.0               # whole image fetch
    default_chat_max_tokens: int = 512          # OpenAI requests without max_tokens
    sse_ping_s: float = 15.0                    # status-stream keep-alive comment interval
    max_stop_chars: int = 1024                  # longest OpenAI stop string (400 above)
    max_images_per_request: int = 4             # OpenAI: image parts in one chat (400 above)
    header_timeout_s: float = 10.0              # request line + headers, per request
    body_timeout_s: float = 60.0                # whole request body (408 above)
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None             # "fp8"; None → the checkpoint's own (if any)
    backend: str = "auto"
    tensor_parallel_size: int = 1               # ranks the decoder is split over (README)
    queue_concurrency: int = 16                 # queued jobs run at once (they share batches)
    image_fetch_concurrency: int = 32           # queued jobs loading their image before a slot
    stats_interval_s: float = 10.0              # stats log line every N s while busy; 0 = off
    metrics_open: bool = False                  # /metrics answers without an API key
    runtime: RuntimeConfig = RuntimeConfig()    # batching, KV pool, caches, CUDA graphs

    def __post_init__(self):
        for name in ("tensor_parallel_size", "queue_concurrency", "image_fetch_concurrency", "webhook_concurrency",
                     "max_body_bytes", "max_image_bytes", "max_image_pixels", "max_prompt_chars",
                     "max_tokens_limit", "image_timeout_s", "retention_s", "sse_ping_s",
                     "default_chat_max_tokens", "max_stop_chars", "max_images_per_request",
                     "header_timeout_s",
                     "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.stats_interval_s < float("inf"):
            raise ValueError("stats_interval_s must be >= 0 (0 = off), got "
                             f"{self.stats_interval_s!r}")
        if not self.max_image_aspect_ratio >= 1:
            raise ValueError(f"max_image_aspect_ratio must be >= 1, "
                             f"got {self.max_image_aspect_ratio!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.endpoint_id is not None:
            check_endpoint_id(self.endpoint_id)
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ValueError(f"public_url must start with http:// or https://, got {self.public_url!r}")
        if any(not k for k in self.api_keys):
            raise ValueError("an API key must not be empty")
        for i, k in enumerate(self.api_keys):  # else it could never arrive in a header
            if k != k.strip() or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or
                                     0xD800 <= ord(c) < 0xE000 for c in k):
                # The key itself is a secret: the message names its position only.
                raise ValueError(f"API key {i + 1} of {len(self.api_keys)} must not start or end "
                                 "with whitespace nor hold control characters or bytes that are "
                                 "not UTF-8")

    @property
    def resolved_queue_url(self) -> str:
        """queue_url, or an SQLite file under data_dir (created on first use)."""
        if self.queue_url:
            return self.queue_url
        path = Path(self.data_dir).expanduser().resolve() / "jobs.sqlite3"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"data dir {str(path.parent)!r} cannot be created: "
                             f"{e.strerror or e}") from None
        return f"sqlite:///{path}"


def check_endpoint_id(endpoint_id: str) -> str:
    parts = endpoint_id.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise ValueError(f"endpoint id must be 'owner/alias' (e.g. fal-ai/llava-next), "
                         f"got {endpoint_id!r}")
    return endpoint_id


def api_keys_from_env(flag_keys: list[str] | None) -> tuple[str, ...]:
    """--api-key values plus FASTLLAVA_API_KEYS (comma-separated), deduplicated, in order."""
    env = [k.strip() for k in os.environ.get("FASTLLAVA_API_KEYS", "").split(",") if k.strip()]
    return tuple(dict.fromkeys([*(flag_keys or []), *env]))
