"""--cors-origin: browser pages on an allowed origin can call the server (preflight answered
before auth, request ids exposed); other origins get no CORS headers; without the flag, none."""

from __future__ import annotations

from serverkit import API_KEY

PROXY = "/api/fal/proxy"
PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type,x-fal-target-url"}


def test_allowed_origin_preflight_and_request(server_factory, tiny_llava, data_uri):
    server = server_factory(tiny_llava, "--cors-origin", "https://app.example",
                            "--api-key", API_KEY)
    with server.client() as c:
        pre = c.options(PROXY, headers={"Origin": "https://app.example", **PREFLIGHT})
        assert pre.status_code == 200, pre.text
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        allowed = pre.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "x-fal-target-url" in allowed

        target = "https://fal.run/fal-ai/llavav15-13b"
        r = c.post(PROXY, json={"image_url": data_uri, "prompt": "hi", "max_tokens": 3},
                   headers={"Origin": "https://app.example", "x-fal-target-url": target,
                            "Authorization": f"Key {API_KEY}"})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-fal-request-id" in r.headers["access-control-expose-headers"].lower()

        other = c.options(PROXY, headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert "access-control-allow-origin" not in other.headers


def test_no_cors_headers_without_the_flag(server_factory, tiny_llava):
    server = server_factory(tiny_llava)
    with server.client() as c:
        r = c.get("/health", headers={"Origin": "https://app.example"})
        assert r.status_code == 200
        assert "access-control-allow-origin" not in r.headers
