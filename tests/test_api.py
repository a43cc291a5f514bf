"""The public API: request validation, bad inputs, streaming, sampling and thread safety.

Every bad input must give a clear error (a ValueError subclass naming the problem), never a crash
or a hang, and must leave the engine healthy: the next good request still works and no KV page is
leaked.
"""

from __future__ import annotations

import base64
import io
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from fastllava import LLaVA
from fastllava.preprocess.image_io import (ImageDecodeError, ImageFetchError, ImageLimits,
                                           ImageTooLargeError)
from fastllava.schema import RequestValidationError
from fastllava.weights.discover import CheckpointNotFoundError
from fastllava.weights.loader import WeightLoadError


@pytest.fixture(scope="module")
def llava(tiny_llava):
    return LLaVA.from_pretrained(tiny_llava, device="cpu", dtype="float32",
                                 image_limits=ImageLimits(timeout_s=2.0, max_pixels=4_000_000))


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.png"
    rng = np.random.RandomState(7)
    Image.fromarray(rng.randint(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


def greedy(image, prompt="Describe.", **kw):
    return {"image_url": image, "prompt": prompt, "temperature": 0, "max_tokens": 12, **kw}


def assert_healthy(llava, image_path):
    assert llava.stats()["kv_pages_used"] == 0, "KV pages leaked"
    assert llava.generate(greedy(image_path))["partial"] is False


@pytest.mark.parametrize("request_, field", [
    ({"image_url": None, "prompt": "hi"}, "image_url"),  # absent: a text-only turn
    ({"image_url": 3, "prompt": "hi"}, "image_url"),
    ({"image_url": "x.png"}, "prompt"),
    ({"image_url": "x.png", "prompt": ["hi"]}, "prompt"),
    ({"image_url": "x.png", "prompt": "hi", "max_tokens": "64"}, "max_tokens"),
    ({"image_url": "x.png", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"image_url": "x.png", "prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"image_url": "x.png", "prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"image_url": "x.png", "prompt": "hi", "seed": -1}, "seed"),
    ({"image_url": "x.png", "prompt": "hi", "top_k": 5}, "top_k"),
])
def test_invalid_requests_name_the_field(llava, request_, field):
    with pytest.raises(RequestValidationError) as e:
        llava.generate(request_)
    assert field in str(e.value)
    with pytest.raises(RequestValidationError):  # stream validates eagerly, before iteration
        llava.stream(request_)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _bomb_png() -> str:
    """A 1-bit 20000x20000 PNG: a few KB on disk, 400 megapixels once decoded."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("make_url, error", [
    (lambda tmp: f"http://127.0.0.1:{_closed_port()}/a.png", ImageFetchError),
    (lambda tmp: "data:image/png;base64," + base64.b64encode(b"not a png").decode(), ImageDecodeError),
    (lambda tmp: "data:image/png;base64,!!!", ImageDecodeError),
    (lambda tmp: str(tmp / "missing.png"), ImageFetchError),
    (lambda tmp: _bomb_png(), ImageTooLargeError),
    (lambda tmp: "ftp://example.com/a.png", ImageFetchError),
])
def test_bad_images_are_clear_errors_and_engine_stays_healthy(llava, image_path, tmp_path,
                                                              make_url, error):
    start = time.monotonic()
    with pytest.raises(error):
        llava.generate(greedy(make_url(tmp_path)))
    assert time.monotonic() - start < 10
    assert_healthy(llava, image_path)


def test_truncated_image_file(llava, image_path, tmp_path):
    data = open(image_path, "rb").read()
    bad = tmp_path / "truncated.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError):
        llava.generate(greedy(str(bad)))
    assert_healthy(llava, image_path)


def test_prompt_with_image_placeholder_is_rejected(llava, image_path):
    with pytest.raises(ValueError, match="<image>"):
        llava.generate(greedy(image_path, prompt="two images <image> here"))
    assert_healthy(llava, image_path)


def test_an_image_the_chat_does_not_use_is_refused_not_dropped(llava, image_path):
    """image_url (or a loaded `image`) goes only where a chat has an image part to take it;
    without one it is an error naming the field, never a silent text-only answer."""
    text_only = [{"role": "user", "content": "What is in this image?"}]
    with pytest.raises(RequestValidationError, match="image_url: is not used") as e:
        llava.stream({"image_url": image_path, "max_tokens": 2}, messages=text_only)  # eager
    assert e.value.field == "image_url"
    with pytest.raises(RequestValidationError, match="image: is not used"):
        next(llava.stream({"max_tokens": 2}, messages=text_only, image=Image.open(image_path)))
    sourced = [{"role": "user", "content": [{"type": "image", "image": image_path},
                                            {"type": "text", "text": "And this?"}]}]
    with pytest.raises(RequestValidationError, match="image_url: is not used"):
        llava.generate({"image_url": image_path, "max_tokens": 2}, messages=sourced)
    # An image part without a source takes image_url, as documented.
    placed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert llava.generate({"image_url": image_path, "max_tokens": 2},
                          messages=placed)["partial"] is False
    assert_healthy(llava, image_path)


def test_stream_snapshots_are_cumulative_and_final(llava, image_path):
    snaps = list(llava.stream(greedy(image_path, max_tokens=20)))
    assert snaps[-1]["partial"] is False and all(s["partial"] for s in snaps[:-1])
    texts = [s["output"] for s in snaps]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts
    assert snaps[-1] == llava.generate(greedy(image_path, max_tokens=20))


def test_closing_a_stream_early_frees_its_pages(llava, image_path):
    stream = llava.stream(greedy(image_path, max_tokens=40))
    next(stream)
    assert llava.stats()["kv_pages_used"] > 0
    stream.close()
    assert_healthy(llava, image_path)


def test_max_tokens_and_seeded_sampling(llava, image_path):
    ids = llava.generate_ids(greedy(image_path, max_tokens=5))
    assert 1 <= len(ids) <= 5
    sampled = dict(greedy(image_path, max_tokens=16), temperature=1.0, top_p=0.9, seed=1234)
    a, b = llava.generate_ids(sampled), llava.generate_ids(sampled)
    assert a == b, "the same seed must give the same tokens"
    others = {tuple(llava.generate_ids(dict(sampled, seed=s))) for s in range(5)}
    assert len(others) > 1, "different seeds never changed the sample"


def test_concurrent_calls_equal_sequential(llava, image_path):
    prompts = [f"Question {i}: what color?" for i in range(4)]
    expected = [llava.generate(greedy(image_path, p)) for p in prompts]
    results = [None] * len(prompts)

    def worker(i):
        results[i] = llava.generate(greedy(image_path, prompts[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == expected
    assert_healthy(llava, image_path)


def test_missing_checkpoint_folder():
    with pytest.raises(CheckpointNotFoundError, match="nope"):
        LLaVA.from_pretrained("/definitely/not/here/nope", device="cpu")


def test_missing_shard_file(tiny_next, tmp_path):
    broken = shutil.copytree(tiny_next, tmp_path / "broken")
    next(broken.glob("model-00003-of-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="model-00003"):
        LLaVA.from_pretrained(broken, device="cpu")


def test_missing_tokenizer_and_config(tiny_llava, tmp_path):
    no_tok = shutil.copytree(tiny_llava, tmp_path / "no_tok")
    for name in ("tokenizer.json", "tokenizer.model"):
        (no_tok / name).unlink()
    with pytest.raises(ValueError, match="tokenizer"):
        LLaVA.from_pretrained(no_tok, device="cpu")
    no_cfg = shutil.copytree(tiny_llava, tmp_path / "no_cfg")
    (no_cfg / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        LLaVA.from_pretrained(no_cfg, device="cpu")


def test_bad_device_dtype_backend(tiny_llava):
    with pytest.raises(ValueError, match="dtype"):
        LLaVA.from_pretrained(tiny_llava, device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="backend"):
        LLaVA.from_pretrained(tiny_llava, device="cpu", backend="cuda-magic")
    assert issubclass(WeightLoadError, ValueError)


def test_ignore_eos_runs_to_max_tokens_past_the_stop_id(llava, image_path, monkeypatch):
    """The checkpoint's stop id is made the first token this prompt generates (as if it were
    its eos): the request stops there, unless ignore_eos, which runs to max_tokens with the
    text of a run where that id stops nothing (a real eos, a special token, would be skipped
    in the text by the detokenizer)."""
    request = greedy(image_path, max_tokens=6)
    first = llava.generate_ids(dict(request, max_tokens=1))[0]
    monkeypatch.setattr(llava, "stop_ids", ())
    free = [s for s in llava.stream_detailed(request)][-1]
    monkeypatch.setattr(llava, "stop_ids", (first,))
    stopped = [s for s in llava.stream_detailed(request)][-1]
    assert (stopped["completion_tokens"], stopped["finish_reason"]) == (1, "stop"), stopped
    snaps = list(llava.stream_detailed(request, ignore_eos=True))
    last = snaps[-1]
    assert (last["completion_tokens"], last["finish_reason"]) == (6, "length"), last
    assert last["output"] == free["output"], (last, free)
    with pytest.raises(TypeError, match="ignore_eos"):
        next(llava.stream_detailed(request, ignore_eos="yes"))
    assert_healthy(llava, image_path)
