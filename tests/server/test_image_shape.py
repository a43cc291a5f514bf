"""Image shape limit through the real server: an image inside the pixel limit but with an
extreme aspect ratio is refused from its header (--max-image-aspect-ratio, 50 by default) on
every route: 422 image_too_large naming the ratio (OpenAI: 400), also for a queued job."""

from __future__ import annotations

import base64
import io
import time

from PIL import Image

EP = "fal-ai/llavav15-13b"


def _strip_uri(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (w, h), 128).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_extreme_aspect_ratio_is_refused_on_every_route(lenient_server):
    strip = _strip_uri(5000, 2)          # 10k pixels (limit 100k), 2500:1
    req = {"image_url": strip, "prompt": "hi", "max_tokens": 4}
    with lenient_server.client() as client:
        t0 = time.monotonic()
        r = client.post(f"/{EP}", json=req)
        assert r.status_code == 422, r.text
        (detail,) = r.json()["detail"]
        assert (detail["loc"], detail["type"]) == (["body", "image_url"], "image_too_large"), detail
        assert "5000x2, an aspect ratio of 2500.0:1, over the limit of 50:1" in detail["msg"]
        assert time.monotonic() - t0 < 2

        chat = client.post("/v1/chat/completions", json={"model": EP, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "image_url", "image_url": {"url": strip}}]}]})
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "image_too_large", \
            chat.text
        assert "aspect ratio of 2500.0:1" in chat.json()["error"]["message"]

        job_id = client.post(f"/queue/{EP}", json=req).json()["request_id"]
        deadline = time.monotonic() + 30
        while client.get(f"/{EP}/requests/{job_id}/status").json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = client.get(f"/{EP}/requests/{job_id}")
        assert result.status_code == 422 and "aspect ratio" in result.json()["detail"][0]["msg"]
