"""The runtime through the public API: threads and asyncio share one engine, early stops cancel and
free pages, per-request metrics, context limits, a failing step, close(), seeded sampling.

Every test ends with the engine idle: no KV page in use, nothing running or waiting.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from PIL import Image

from concurrency import assert_idle, assert_same, run_threads
from fastllava import LLaVA
from fastllava.runtime.config import RuntimeConfig
from fastllava.schema import RequestValidationError, parse_request

LONG = 4000   # max_tokens of a request meant to be stopped early: seconds of steps on CPU


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("runtime_api_images")
    paths = []
    for i, (h, w) in enumerate([(48, 64), (64, 40), (90, 30)]):
        paths.append(str(folder / f"img{i}.png"))
        rng = np.random.RandomState(200 + i)
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def load(path, **runtime) -> LLaVA:
    return LLaVA.from_pretrained(path, device="cpu", dtype="float32", backend="torch",
                                 runtime=RuntimeConfig(**runtime))


@pytest.fixture(scope="module")
def llava(tiny_llava):
    model = load(tiny_llava)
    yield model
    model.close()


def req(image: str, i: int = 0, **kw) -> dict:
    return {"image_url": image, "prompt": f"Question {i}: what is shown here?", "temperature": 0,
            "max_tokens": 4 + (5 * i) % 13, **kw}


def wait_idle(llava: LLaVA, deadline_s: float = 10.0) -> None:
    """Poll until idle: astream's cancel does not block the event loop, so it lands a bit later."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and llava.stats()["kv_pages_used"] + llava.stats()["running"]:
        time.sleep(0.01)
    assert_idle(llava)


def assert_cumulative(snaps: list[dict]) -> None:
    assert snaps and snaps[-1]["partial"] is False, snaps[-1:]
    assert all(s["partial"] for s in snaps[:-1]), "a snapshot before the last was final"
    texts = [s["output"] for s in snaps]
    bad = [i for i, (a, b) in enumerate(zip(texts, texts[1:])) if not b.startswith(a)]
    assert not bad, \
        f"snapshot {bad[0] + 1} does not extend the one before: {texts[bad[0]:bad[0] + 2]}"


# ---- concurrency ---------------------------------------------------------------------------------

def test_threads_generate_and_stream_equal_sequential(llava, images):
    reqs = [req(images[i % 3], i) for i in range(12)]
    want = [llava.generate(r) for r in reqs]
    fns = [(lambda r=r: llava.generate(r)) if i % 2 else (lambda r=r: list(llava.stream(r)))
           for i, r in enumerate(reqs)]
    got = run_threads(fns)
    for snaps in got[::2]:
        assert_cumulative(snaps)
    finals = [g if i % 2 else g[-1] for i, g in enumerate(got)]
    assert_same(finals, want, "concurrent vs sequential")
    assert_idle(llava)


def test_agenerate_and_astream_equal_generate(llava, images):
    reqs = [req(images[i % 3], i) for i in range(6)]
    want = [llava.generate(r) for r in reqs]

    async def collect(r):
        return [s async for s in llava.astream(r)]

    async def main():
        return await asyncio.gather(*[llava.agenerate(r) for r in reqs[:3]],
                                    *[collect(r) for r in reqs[3:]])
    got = asyncio.run(main())
    for snaps in got[3:]:
        assert_cumulative(snaps)
    assert_same(got[:3] + [s[-1] for s in got[3:]], want, "asyncio vs generate")
    assert_idle(llava)


def test_astream_validates_eagerly(llava, images):
    with pytest.raises(RequestValidationError, match="prompt"):
        llava.astream({"image_url": images[0]})                    # no iteration needed
    with pytest.raises(RequestValidationError, match="max_tokens"):
        llava.astream(req(images[0], max_tokens=50), detailed=True, max_tokens_limit=10)


@pytest.mark.parametrize("how", ["break", "aclose"])
def test_stopping_an_astream_early_cancels_and_frees_pages(llava, images, how):
    steps = llava.stats()["steps"]

    async def main():
        if how == "break":   # the generator is dropped; asyncio's finalizer hook acloses it
            async for snap in llava.astream(req(images[1], max_tokens=LONG), every_token=True):
                assert snap["partial"] is True
                break
        else:
            stream = llava.astream(req(images[1], max_tokens=LONG), every_token=True)
            assert (await stream.__anext__())["partial"] is True
            assert llava.stats()["kv_pages_used"] > 0
            await stream.aclose()
        end = time.monotonic() + 10
        while time.monotonic() < end and llava.stats()["kv_pages_used"]:
            await asyncio.sleep(0.01)   # let the loop run the close
    asyncio.run(main())
    wait_idle(llava)
    assert llava.stats()["steps"] - steps < LONG - 1, "the request ran to the end: not cancelled"
    assert llava.generate(req(images[0]))["partial"] is False


@pytest.mark.parametrize("detailed", [False, True])
def test_closing_a_sync_stream_frees_pages_at_once(llava, images, detailed):
    r = req(images[0], max_tokens=LONG)   # its text starts within a few tokens
    stream = llava.stream_detailed(r, every_token=True) if detailed else llava.stream(r)
    next(stream)
    assert llava.stats()["kv_pages_used"] > 0
    stream.close()
    assert_idle(llava)           # no polling: close() returns once the pages are free


def test_stream_detailed_metrics(llava, images):
    *_, final = llava.stream_detailed(req(images[0], max_tokens=9))
    m = final["metrics"]
    for key in ("queue_s", "ttft_s", "e2e_s"):
        assert m[key] is not None and m[key] >= 0, (key, m)
    assert m["queue_s"] <= m["ttft_s"] <= m["e2e_s"], m
    assert final["completion_tokens"] > 1 and m["decode_tokens_per_s"] > 0, final
    assert (m["prompt_tokens"], m["completion_tokens"]) == \
        (final["prompt_tokens"], final["completion_tokens"]), final
    assert 0 <= m["cached_prompt_tokens"] < m["prompt_tokens"] and m["num_preemptions"] == 0, m
    assert final["finish_reason"] in ("stop", "length")


# ---- limits and failures -------------------------------------------------------------------------

def test_context_limit(tiny_llava, images):
    """prompt + max_tokens over the context is refused (vLLM's rule) on every entry point, with a
    message naming the three numbers, before any step runs; exactly filling it is fine, and
    clamp_max_tokens=True lowers max_tokens to the room instead."""
    small = load(tiny_llava, max_context=64)
    try:
        assert small.stats()["max_len"] == 64
        prompt = len(small.prepare(parse_request(req(images[0]))).input_ids)
        room = 64 - prompt
        assert 0 < room < 40, f"test setup: the prompt leaves {room} tokens of room"
        over = req(images[0], max_tokens=40)
        message = (rf"^max_tokens: prompt tokens \({prompt}, image included\) \+ max_tokens "
                   rf"\(40\) = {prompt + 40} exceeds max_context \(64\): lower max_tokens to at "
                   rf"most {room}$")
        calls = [lambda: small.generate(over), lambda: list(small.stream(over)),
                 lambda: list(small.stream_detailed(over)), lambda: small.generate_ids(over),
                 lambda: asyncio.run(small.agenerate(over))]
        for call in calls:
            with pytest.raises(RequestValidationError, match=message) as caught:
                call()
            assert (caught.value.field, caught.value.type) == ("max_tokens",
                                                               "context_length_exceeded")
        long = req(images[0], prompt="describe the small red car near the tree " * 8)
        with pytest.raises(RequestValidationError, match="the prompt alone fills the context"):
            small.generate(long)
        assert small.stats()["steps"] == 0, "a refused request reached the engine"
        assert_idle(small)

        *_, exact = small.stream_detailed(req(images[0], max_tokens=room))
        assert exact["prompt_tokens"] + exact["completion_tokens"] <= 64, exact
        *_, clamped = small.stream_detailed(over, clamp_max_tokens=True)
        assert clamped["finish_reason"] == "stop" or clamped["completion_tokens"] == room, clamped
        assert clamped["output"] == exact["output"], "clamped != the request at max_tokens=room"
        with pytest.raises(RequestValidationError, match="the prompt alone fills the context"):
            list(small.stream_detailed(long, clamp_max_tokens=True))
        assert_idle(small)
    finally:
        small.close()


def test_failing_step_fails_only_its_requests(tiny_llava, images, monkeypatch):
    """max_num_seqs=2: A and B decode while C waits; that step's forward raises; A and B get the
    error, C then runs normally, and nothing leaks."""
    llava = load(tiny_llava, max_num_seqs=2)
    try:
        want_c = llava.generate(req(images[2], 7))
        scheduler, model = llava.engine.scheduler, llava.engine.runner.model
        forward, failed = model.forward, []

        def flaky_forward(ops, embeds, ctx, kv):   # on the engine thread, inside a step
            if not failed and scheduler.waiting and not ctx.is_prefill:
                failed.append(len(ctx.logits_rows))
                raise RuntimeError("injected step failure")
            return forward(ops, embeds, ctx, kv)
        monkeypatch.setattr(model, "forward", flaky_forward)

        # every_token: a snapshot per token, so next() returns once A (B) is decoding. A and B
        # could run LONG tokens: C queues long before they could finish.
        a, b = (llava.stream_detailed(req(images[i], max_tokens=LONG), every_token=True)
                for i in (0, 1))
        next(a), next(b)
        box = {}
        c = threading.Thread(target=lambda: box.setdefault("c", llava.generate(req(images[2], 7))))
        c.start()
        for stream in (a, b):
            with pytest.raises(RuntimeError, match="injected step failure"):
                for _ in stream:
                    pass
        c.join(timeout=60)
        assert failed == [2], f"the failing step should have held A and B only: {failed}"
        assert box.get("c") == want_c, box
        assert llava.generate(req(images[2], 7)) == want_c
        assert_idle(llava)
    finally:
        llava.close()


def test_close_fails_pending_and_later_calls(tiny_llava, images):
    llava = load(tiny_llava)
    assert llava.generate(req(images[0]))["partial"] is False
    stream = llava.stream_detailed(req(images[0], max_tokens=LONG), every_token=True)
    next(stream)
    llava.close()
    with pytest.raises(RuntimeError, match="shut down"):
        for _ in stream:
            pass
    with pytest.raises(RuntimeError, match="shut down"):
        llava.generate(req(images[0]))
    with pytest.raises(RuntimeError, match="shut down"):
        next(llava.stream(req(images[0])))


# ---- sampling ------------------------------------------------------------------------------------

def test_seeded_sampling_reproducible_concurrently(llava, images):
    reqs = [req(images[i % 3], i, temperature=1.0, top_p=0.9 if i % 2 else 1.0, seed=50 + i,
                max_tokens=12) for i in range(8)]
    want = [llava.generate_ids(r) for r in reqs]
    got = run_threads([lambda r=r: llava.generate_ids(r) for r in reqs])
    assert_same(got, want, "seeded sampled ids, concurrent vs sequential")
    unseeded = dict(reqs[0], seed=None)
    outs = run_threads([lambda: tuple(llava.generate_ids(unseeded)) for _ in range(4)])
    assert len(set(outs)) > 1, f"4 unseeded requests sampled the same 12 tokens: {outs[0]}"
    assert_idle(llava)
