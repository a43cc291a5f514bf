"""`fastllava run`: answer one prompt about one image, streaming the text to stdout.

Everything that can fail fast does so before the weights load (minutes for 34B): the request is
validated with the fal schema and the image fetched and decoded. Then the model loads with a
progress bar on stderr and the answer streams to stdout as it is generated, ended by a newline
(also on Ctrl-C). A prompt (image tokens included) plus --max-tokens that does not fit
--max-context is refused by the API (RequestValidationError), never cut short. Exit codes and
error lines: see fastllava.cli.

This module imports no torch until the model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Iterable, TextIO

from fastllava.quant_config import QUANTIZATIONS
from fastllava.schema import GenerationRequest, RequestValidationError, parse_request

# fastllava.kernels.ops.BACKENDS (that module imports torch; a test keeps the two equal).
BACKENDS = ("auto", "torch", "triton", "reference")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationRequest)}


def add_run_command(commands) -> None:
    from fastllava import cli

    run = commands.add_parser(
        "run", help="answer one prompt about one image, streaming the text to stdout",
        description="Answer one prompt about one image; the text streams to stdout.")
    run.add_argument("--model", required=True,
                     help="checkpoint: a local folder or a hub id (e.g. llava-hf/llava-1.5-13b-hf)")
    run.add_argument("--image", required=True, metavar="URL_OR_PATH",
                     help="http(s) URL, data: URI, or a local image file")
    run.add_argument("--prompt", required=True, help="the question or instruction")
    run.add_argument("--max-tokens", type=int, metavar="N",
                     help=f"most tokens to generate (default {_DEFAULTS['max_tokens']})")
    run.add_argument("--temperature", type=float, metavar="T",
                     help=f"sampling temperature, 0 = greedy (default {_DEFAULTS['temperature']})")
    run.add_argument("--top-p", type=float, metavar="P",
                     help=f"nucleus sampling mass in (0, 1] (default {_DEFAULTS['top_p']})")
    run.add_argument("--seed", type=int, metavar="S", help="seed for reproducible sampling")
    run.add_argument("--device", metavar="D",
                     help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    run.add_argument("--dtype", type=cli._dtype, metavar="D",
                     help="float32|fp32, float16|fp16, bfloat16|bf16, or auto: bf16 on CUDA "
                          "and on CPUs with AMX / AVX512-BF16, else fp32 (default: bf16 on "
                          "CUDA, fp32 on CPU)")
    run.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                     help="fp8: decoder linear layers in FP8 e4m3, quantized while loading "
                          "(default: none, or the checkpoint's own FP8-dynamic quantization)")
    run.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                     help=cli.TP_HELP + " (default 1)")
    run.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="ops: auto = Triton kernels on CUDA, torch references on CPU; torch; "
                          "triton (on CPU: under the Triton interpreter, slow) (default: auto)")
    cli.add_runtime_flags(run)
    run.set_defaults(handler=run_command)


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The fal request dict; flags left out are omitted so the schema's defaults apply."""
    request: dict[str, Any] = {"image_url": args.image, "prompt": args.prompt}
    for flag, field in (("max_tokens", "max_tokens"), ("temperature", "temperature"),
                        ("top_p", "top_p"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            request[field] = value
    return request


def _fetch_image(src: str):
    """Seam for tests: fetch and decode --image (torch-free) with the API's default limits."""
    from fastllava.preprocess.image_io import ImageLimits, load_image

    return load_image(src, ImageLimits())


def _load_model(model: str, device: str | None, dtype: str | None, runtime, backend: str,
                quantization: str | None = None, tensor_parallel_size: int = 1):
    """Seam for tests: the one place the CLI touches the (torch-importing) API."""
    from fastllava.api import LLaVA

    return LLaVA.from_pretrained(model, device=device, dtype=dtype, backend=backend,
                                 progress=True, runtime=runtime, quantization=quantization,
                                 tensor_parallel_size=tensor_parallel_size)


def end_lines_after_interrupt(out: TextIO, answer_started: bool) -> None:
    """After Ctrl-C, end the line the shell prompt would otherwise start on: the partial answer
    on `out`, and the terminal line holding the echoed "^C" (on `out` when it is the terminal,
    else on stderr when that is)."""
    if answer_started or out.isatty():
        out.write("\n")
        out.flush()
    if not out.isatty() and sys.stderr.isatty():
        sys.stderr.write("\n")
        sys.stderr.flush()


def write_stream(snapshots: Iterable[dict[str, Any]], out: TextIO) -> str:
    """Write the new suffix of each cumulative snapshot["output"], then a newline (on Ctrl-C too).

    Returns the final text. Snapshots must extend each other (the stream contract); a snapshot
    that rewrites already-printed text is an engine bug and raises rather than corrupt stdout.
    """
    written = ""
    try:
        for snapshot in snapshots:
            text = snapshot["output"]
            if not text.startswith(written):
                raise RuntimeError(
                    "stream contract violated: snapshot does not extend the text already "
                    f"written; written={written[-40:]!r} (last 40 chars), "
                    f"snapshot={text[-80:]!r} (last 80 chars)")
            if len(text) > len(written):
                out.write(text[len(written):])
                out.flush()
                written = text
    except KeyboardInterrupt:
        end_lines_after_interrupt(out, answer_started=bool(written))
        raise
    out.write("\n")
    out.flush()
    return written


def run_command(args: argparse.Namespace) -> int:
    from fastllava.cli import runtime_from_args

    request = _request_from_args(args)
    req = parse_request(request)  # raises RequestValidationError (a ValueError) before loading
    runtime = runtime_from_args(args)
    if req.max_tokens >= runtime.max_context:  # the prompt needs at least one token
        raise RequestValidationError(
            "max_tokens", f"max_tokens ({req.max_tokens}) leaves no room for the prompt within "
            f"max_context ({runtime.max_context})", "context_length_exceeded", req.max_tokens)
    try:
        # A 404 or a slow image host is reported before minutes of weight loading.
        image = _fetch_image(args.image)
        tp = args.tensor_parallel_size
        llava = _load_model(args.model, args.device, args.dtype, runtime, args.backend,
                            args.quantization, *((tp,) if tp != 1 else ()))
    except KeyboardInterrupt:
        end_lines_after_interrupt(sys.stdout, answer_started=False)
        raise
    try:
        # The full context check (prompt tokens are known once tokenized) raises before generating.
        write_stream(llava.stream(request, image=image), sys.stdout)
    finally:
        if tp != 1:
            llava.close()   # stop the tensor-parallel workers before the process exits
    return 0
