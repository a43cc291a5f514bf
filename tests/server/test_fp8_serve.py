"""`fastllava serve --quantization fp8` through the real server: the startup block says so, and
the answer is the in-process FP8 model's (greedy)."""

from __future__ import annotations

import base64
import io

from PIL import Image

from fastllava import LLaVA
from test_server_logs import startup_block

EP = "fal-ai/llavav15-13b"


def _image() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 120, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def assert_answers_like_in_process(server, tiny_llava, **fp8) -> None:
    """The served greedy answer equals the in-process model's built with the same fp8 option."""
    req = {"image_url": _image(), "prompt": "what is in this image", "max_tokens": 12,
           "temperature": 0}
    with server.client() as client:
        r = client.post(f"/{EP}", json=req)
    assert r.status_code == 200, r.text
    llava = LLaVA.from_pretrained(tiny_llava, device="cpu", dtype="float32", **fp8)
    try:
        expected = llava.generate(req)["output"]
    finally:
        llava.close()
    assert r.json()["output"] == expected, (r.json(), expected)


def test_serve_quantization_fp8(server_factory, tiny_llava):
    server = server_factory(tiny_llava, "--quantization", "fp8", "--log-level", "info")
    fields = startup_block(server.log_text())
    assert fields["dtype"] == "float32 (decoder linear layers fp8)", fields
    assert_answers_like_in_process(server, tiny_llava, quantization="fp8")


def test_serve_kv_cache_dtype_fp8(server_factory, tiny_llava):
    """--kv-cache-dtype fp8: the startup block names the fp8 pages (their bytes a quarter of the
    fp32 model's), and the answer is the in-process fp8-KV model's."""
    server = server_factory(tiny_llava, "--kv-cache-dtype", "fp8", "--kv-cache-tokens", "1024",
                            "--log-level", "info")
    fields = startup_block(server.log_text())
    assert fields["KV cache"].startswith("1024 tokens (64 pages of 16), "), fields
    assert fields["KV cache"].endswith(", fp8 e4m3 pages"), fields
    assert_answers_like_in_process(server, tiny_llava, kv_cache_dtype="fp8")
