"""A serving workload: N requests of (image data URI, prompt, max_tokens), seeded.

Images: generated in memory at realistic sizes (a smooth gradient plus noise, so JPEG/PNG sizes
are those of photos, not of pure noise), or the files of `--images DIR`, sent as data URIs so
every server sees the same bytes without an image host. Prompts: a built-in set of LLaVA-style
questions, or a JSONL file (`{"prompt": ...}` per line, optional "max_tokens", "image").
max_tokens: `fixed:N`, `uniform:LO-HI` or `normal:MEAN,STD` (clamped to >= 1).
Arrivals: all at once (fixed concurrency), or a Poisson process at R requests/s.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import mimetypes
import random
from pathlib import Path

PROMPTS = (
    "What is shown in this image?",
    "Describe this image in detail.",
    "How many people are in the picture, and what are they doing?",
    "What colors dominate this scene?",
    "Is there any text in the image? If so, transcribe it.",
    "What might have happened just before this photo was taken?",
    "List the objects you can see, from left to right.",
    "Write a short caption for this image.",
)
DEFAULT_SIZES = ((336, 336), (672, 672), (1024, 768), (1280, 720))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


@dataclasses.dataclass(frozen=True)
class Request:
    image_url: str        # data URI
    prompt: str
    max_tokens: int


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        sizes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ValueError(f"--image-sizes: expected WxH[,WxH...], got {text!r}")
    return sizes  # type: ignore[return-value]


def max_tokens_sampler(text: str):
    """`fixed:N` | `uniform:LO-HI` | `normal:MEAN,STD` → rng → int >= 1."""
    kind, _, spec = text.partition(":")
    try:
        if kind == "fixed":
            n = int(spec)
            ok = n >= 1
            return (lambda rng: n) if ok else _bad(text)
        if kind == "uniform":
            lo, hi = (int(v) for v in spec.split("-"))
            return (lambda rng: rng.randint(lo, hi)) if 1 <= lo <= hi else _bad(text)
        if kind == "normal":
            mean, std = (float(v) for v in spec.split(","))
            return (lambda rng: max(1, round(rng.gauss(mean, std)))) if std >= 0 else _bad(text)
    except ValueError:
        pass
    return _bad(text)


def _bad(text: str):
    raise ValueError(f"--max-tokens: expected fixed:N, uniform:LO-HI or normal:MEAN,STD "
                     f"(N, LO >= 1), got {text!r}")


def generated_image(rng: random.Random, w: int, h: int, fmt: str) -> str:
    """A w x h photo-like image (gradient + noise) as a data URI."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(rng.randrange(1 << 31))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * g.uniform(80, 255, 3)
    pixels = np.clip(base + g.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG" if fmt == "jpeg" else "PNG", quality=90)
    return data_uri(buf.getvalue(), f"image/{fmt}")


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def folder_images(folder: Path) -> list[str]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    return [data_uri(p.read_bytes(), mimetypes.guess_type(p.name)[0] or "image/png")
            for p in files]


def read_prompts(path: Path) -> list[dict]:
    """JSONL: one object per line with "prompt" (str), optional "max_tokens", "image" (a path)."""
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompts {path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"--prompts {path}:{n}: expected an object with a string \"prompt\"")
        items.append(item)
    if not items:
        raise ValueError(f"--prompts {path}: no prompts")
    return items


def build(n: int, seed: int, *, sizes=DEFAULT_SIZES, image_format: str = "jpeg",
          images_dir: Path | None = None, prompts_file: Path | None = None,
          max_tokens: str = "uniform:32-128") -> list[Request]:
    """n requests; one image per distinct size (or each file of images_dir) reused round-robin,
    so the workload is cheap to build and images repeat as they do in real traffic."""
    rng = random.Random(seed)
    sample_max = max_tokens_sampler(max_tokens)
    images = (folder_images(images_dir) if images_dir else
              [generated_image(rng, w, h, image_format) for w, h in sizes])
    items = read_prompts(prompts_file) if prompts_file else [{"prompt": p} for p in PROMPTS]
    out = []
    for i in range(n):
        item = items[i % len(items)] if prompts_file else rng.choice(items)
        image = (data_uri(Path(item["image"]).read_bytes(),
                          mimetypes.guess_type(item["image"])[0] or "image/png")
                 if "image" in item else images[i % len(images)])
        out.append(Request(image, item["prompt"], int(item.get("max_tokens") or sample_max(rng))))
    return out


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Submit times (s after start) of n Poisson arrivals at `rate` requests/s."""
    rng, t, out = random.Random(seed + 1), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out
