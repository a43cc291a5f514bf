"""The `fastllava` command line.

    fastllava run --model M --image URL_OR_PATH --prompt TEXT [--max-tokens N] [--temperature T]
                  [--top-p P] [--seed S] [--device D] [--dtype D] [--quantization fp8]
                  [--backend B]
    fastllava serve --model M [--host H] [--port P] [--api-key K ...] [--queue URL]
                  [--tls-cert PEM --tls-key PEM] ...   (fastllava serve --help lists all flags)

`run` (fastllava.cli_run) checks everything it can before loading the weights and streams the
answer to stdout. `serve` first checks that the `server` extra is installed.

Exit codes: 0 success; 2 bad input (usage, validation, missing checkpoint or image, a missing
server dependency: every error that is a ValueError), printed as one `error: <message>` line on
stderr; 1 an OS error (I/O, permissions) or a closed stdout pipe; 130 interrupted (Ctrl-C). Other
exceptions are bugs and keep their traceback.

This module imports no torch: `fastllava --help` and flag validation stay instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from fastllava import cli_run
from fastllava.quant_config import QUANTIZATIONS

# Spellings accepted by --dtype -> the names LLaVA.from_pretrained accepts.
DTYPES = {
    "float32": "float32", "fp32": "float32",
    "float16": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "auto": "auto",
}
# The third-party modules `fastllava serve` imports (the `server` extra); redis only for a Redis
# queue. Checked before anything loads, so a plain `pip install .` gets one clear line.
SERVER_MODULES = ("fastapi", "uvicorn", "httpx")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _dtype(text: str) -> str:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"invalid dtype {text!r}; accepted: {', '.join(DTYPES)}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastllava", description="fastllava: a from-scratch LLaVA inference engine.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cli_run.add_run_command(commands)
    _add_serve(commands)
    from fastllava.benchmarks.cli import add_bench_command
    add_bench_command(commands)  # `fastllava bench ...` (README "Benchmarks")
    return parser


def _add_serve(commands) -> None:
    from fastllava.server.settings import ServerSettings

    d = {f.name: f.default for f in dataclasses.fields(ServerSettings)}
    serve = commands.add_parser(
        "serve", help="serve one model over HTTP: fal queue/run API + OpenAI chat completions",
        description="Serve one model over HTTP (fal queue and run protocol, OpenAI "
                    "/v1/chat/completions, /health, /metrics). Each flag maps 1:1 onto "
                    "fastllava.server.settings.ServerSettings.")
    a = serve.add_argument
    a("--model", required=True, help="checkpoint: a local folder or a hub id")
    a("--host", default=d["host"], help=f"bind address (default {d['host']})")
    a("--port", type=int, default=d["port"], help=f"port (default {d['port']})")
    a("--endpoint-id", metavar="OWNER/ALIAS", help="fal endpoint id (default: fal-ai/llava-next "
      "for v1.6 checkpoints, fal-ai/llavav15-13b for 1.5)")
    a("--api-key", action="append", metavar="KEY", dest="api_keys",
      help="accepted key (repeatable; also env FASTLLAVA_API_KEYS, comma-separated); clients "
      "send 'Authorization: Key KEY' or 'Bearer KEY'. No keys: no auth")
    a("--cors-origin", action="append", metavar="ORIGIN", dest="cors_origins",
      help="let browser pages on ORIGIN call the server (repeatable; '*' for any), e.g. the JS "
      "fal client in proxy mode from another origin. Default: no CORS headers")
    a("--queue", metavar="URL", dest="queue_url", help="job store: sqlite:///path or "
      "redis://host:port/db (default: sqlite under --data-dir)")
    a("--data-dir", default=d["data_dir"], help=f"where the default SQLite queue lives "
      f"(default {d['data_dir']})")
    a("--retention-s", type=float, default=d["retention_s"], metavar="S",
      help=f"keep completed results this long (default {d['retention_s']:g})")
    a("--public-url", metavar="URL", help="base of the URLs returned by submit (default: the "
      "scheme and Host header of each request)")
    a("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    a("--tls-key", metavar="PEM", help="private key for --tls-cert")
    a("--webhook-secret", metavar="SECRET", help="HMAC-SHA256 key signing webhook bodies")
    a("--allow-private-image-hosts", action="store_true",
      help="allow image URLs on loopback/private/link-local hosts (refused by default)")
    a("--refuse-private-webhook-hosts", action="store_true",
      help="refuse fal_webhook URLs on loopback/private/link-local hosts (allowed by default: "
      "a self-hosted server often calls back into its own network)")
    a("--webhook-concurrency", type=int, default=d["webhook_concurrency"], metavar="N",
      help=f"webhook deliveries attempted at once (default {d['webhook_concurrency']})")
    for name, kind, help_ in (
            ("max_body_bytes", int, "largest request body (413 above)"),
            ("max_image_bytes", int, "largest image download / decoded data URI"),
            ("max_image_pixels", int, "largest width*height, checked before decoding"),
            ("max_image_aspect_ratio", float, "largest long side / short side of an image, "
             "checked before decoding"),
            ("max_prompt_chars", int, "longest prompt (OpenAI: all message text)"),
            ("max_tokens_limit", int, "largest max_tokens accepted"),
            ("image_timeout_s", float, "wall-time limit of one image fetch"),
            ("default_chat_max_tokens", int, "max_tokens of OpenAI requests that set none"),
            ("sse_ping_s", float, "keep-alive comment interval of status streams"),
            ("max_stop_chars", int, "longest OpenAI stop string (400 above)"),
            ("max_images_per_request", int, "most images in one OpenAI chat (400 above)"),
            ("header_timeout_s", float, "wall-time limit of a request's line and headers "
             "(the connection is closed)"),
            ("body_timeout_s", float, "wall-time limit of a request's whole body (408)")):
        a("--" + name.replace("_", "-"), type=kind, default=d[name], metavar="N",
          help=f"{help_} (default {d[name]})")
    a("--device", help="torch device (default: cuda if available)")
    a("--dtype", type=_dtype, help="float32|fp32, float16|fp16, bfloat16|bf16, or auto (bf16 on "
                                   "CUDA and on CPUs with AMX / AVX512-BF16, else float32)")
    a("--quantization", choices=QUANTIZATIONS, default=d["quantization"],
      help="fp8: decoder linear layers in FP8 e4m3, quantized while loading (default: none, "
      "or the checkpoint's own FP8-dynamic quantization)")
    a("--backend", default=d["backend"], choices=cli_run.BACKENDS,
      help=f"kernel backend (default {d['backend']})")
    a("--tensor-parallel-size", type=int, default=d["tensor_parallel_size"], metavar="N",
      help=TP_HELP + f" (default {d['tensor_parallel_size']})")
    a("--queue-concurrency", type=int, default=d["queue_concurrency"], metavar="N",
      help=f"queued jobs run at once, sharing batches (default {d['queue_concurrency']})")
    a("--stats-interval-s", type=float, default=d["stats_interval_s"], metavar="S",
      help=f"log a stats line (throughput, queue, KV use) every S seconds while busy; 0 = off "
      f"(default {d['stats_interval_s']:g})")
    a("--metrics-open", action="store_true",
      help="serve /metrics without an API key (for a Prometheus scraper); default: behind auth")
    a("--image-fetch-concurrency", type=int, default=d["image_fetch_concurrency"], metavar="N",
      help="queued jobs fetching and decoding their image at once, before they take one of the "
      f"--queue-concurrency slots (default {d['image_fetch_concurrency']})")
    add_runtime_flags(serve)
    a("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(handler=_serve)


_RUNTIME_HELP = {
    "page_size": "tokens per KV-cache page",
    "max_context": "most tokens per request: prompt (image included) + output",
    "kv_cache_tokens": "KV pool size in tokens (default: fill the GPU; max-context on CPU)",
    "gpu_memory_fraction": "share of GPU memory the engine may use",
    "max_num_seqs": "requests decoding at once",
    "max_num_batched_tokens": "tokens per step; longer prompts prefill in chunks",
    "max_prefill_tokens_while_decoding": "prefill tokens in a step that also decodes (bounds the stall)",
    "prefix_caching": "reuse the KV of repeated image + prompt prefixes",
    "image_cache_rows": "image-feature LRU size, in image tokens",
    "cuda_graphs": "decode from CUDA graphs on CUDA",
    "overlap_scheduling": "schedule and pack the next step while the device runs this one",
    "kv_cache_dtype": "KV-cache page dtype: auto (the model's) or fp8 (e4m3, half the bytes)",
}


TP_HELP = ("split the decoder over N processes/GPUs (tensor parallelism; N must divide the "
           "attention and KV head counts)")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RuntimeConfig field (booleans get --x / --no-x)."""
    from fastllava.runtime.config import KV_CACHE_DTYPES, RuntimeConfig

    group = parser.add_argument_group("runtime (fastllava.runtime.config.RuntimeConfig)")
    for f in dataclasses.fields(RuntimeConfig):
        flag, help_ = "--" + f.name.replace("_", "-"), _RUNTIME_HELP[f.name]
        if f.type in (bool, "bool"):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=f.default, help=f"{help_} (default: {f.default})")
            continue
        default = "" if f.default is None else f" (default: {f.default})"
        if f.name == "kv_cache_dtype":   # the one string field: a choice
            group.add_argument(flag, dest=f.name, choices=KV_CACHE_DTYPES, default=f.default,
                               help=help_ + default)
            continue
        kind = float if "float" in str(f.type) else int
        group.add_argument(flag, dest=f.name, type=kind, default=f.default, metavar="N",
                           help=help_ + default)


def runtime_from_args(args: argparse.Namespace):
    from fastllava.runtime.config import RuntimeConfig

    return RuntimeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RuntimeConfig)})


def settings_from_args(args: argparse.Namespace):
    """The ServerSettings of a parsed `serve` command line (flags map 1:1)."""
    from fastllava.server.settings import ServerSettings, api_keys_from_env

    names = {f.name for f in dataclasses.fields(ServerSettings)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["api_keys"] = api_keys_from_env(args.api_keys)
    values["cors_origins"] = tuple(args.cors_origins or ())
    values["runtime"] = runtime_from_args(args)
    return ServerSettings(**values)


def _serve(args: argparse.Namespace) -> int:
    from fastllava.server.serverlog import configure_logging
    from fastllava.server.stores import open_store

    settings = settings_from_args(args)  # ValueError → exit 2 before loading
    configure_logging(args.log_level)
    # The job store is opened and checked first (a bad --queue URL, an unreachable Redis, a
    # corrupt, read-only or full SQLite file: one `error:` line, exit 2), before torch is even
    # imported, let alone the weights loaded.
    store = open_store(settings.resolved_queue_url)
    closing = None
    try:
        import uvicorn

        from fastllava.api import LLaVA
        from fastllava.server.app import create_app
        from fastllava.server.connection import header_timeout_protocol
        from fastllava.server.safety import image_limits

        llava = LLaVA.from_pretrained(settings.model, device=settings.device, dtype=settings.dtype,
                                      quantization=settings.quantization,
                                      tensor_parallel_size=settings.tensor_parallel_size,
                                      backend=settings.backend, progress=True,
                                      runtime=settings.runtime,
                                      image_limits=image_limits(settings))
        closing = llava.close if settings.tensor_parallel_size > 1 else None
        app = create_app(settings, llava, store=store)  # its lifespan logs the startup block
        uvicorn.run(app, host=settings.host, port=settings.port, ssl_certfile=settings.tls_cert,
                    ssl_keyfile=settings.tls_key, log_level=args.log_level,
                    timeout_graceful_shutdown=10,
                    http=header_timeout_protocol(settings.header_timeout_s))
    finally:
        if closing is not None:   # stop the tensor-parallel workers before the process exits
            closing()
        store.close()
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastllava")
    except PackageNotFoundError:
        return "unknown"


def missing_server_modules(queue_url: str | None) -> list[str]:
    """The `server` extra's modules `fastllava serve` would import and cannot find."""
    import importlib.util

    names = list(SERVER_MODULES)
    if queue_url and queue_url.partition("://")[0].lower() in _REDIS_SCHEMES:
        names.append("redis")
    return [name for name in names if importlib.util.find_spec(name) is None]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split("\n")).strip() or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fastllava` and `python -m fastllava`; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors (argparse printed them)
        return exit_.code if isinstance(exit_.code, int) else 2
    args.argv = sys.argv[1:] if argv is None else list(argv)   # the run record's command
    try:
        if args.command == "serve":
            missing = missing_server_modules(args.queue_url)
            if missing:
                raise ValueError(f"fastllava serve needs {', '.join(missing)}, not installed: "
                                 'pip install "fastllava[server]"')
        return args.handler(args)
    except KeyboardInterrupt:
        sys.stdout.flush()
        return 130
    except ValueError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): silence the interpreter's final flush of stdout.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except OSError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
