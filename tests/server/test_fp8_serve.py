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


def test_serve_quantization_fp8(server_factory, tiny_llava):
    server = server_factory(tiny_llava, "--quantization", "fp8", "--log-level", "info")
    fields = startup_block(server.log_text())
    assert fields["dtype"] == "float32 (decoder linear layers fp8)", fields
    req = {"image_url": _image(), "prompt": "what is in this image", "max_tokens": 12,
           "temperature": 0}
    with server.client() as client:
        r = client.post(f"/{EP}", json=req)
    assert r.status_code == 200, r.text
    llava = LLaVA.from_pretrained(tiny_llava, device="cpu", dtype="float32", quantization="fp8")
    try:
        expected = llava.generate(req)["output"]
    finally:
        llava.close()
    assert r.json()["output"] == expected, (r.json(), expected)
