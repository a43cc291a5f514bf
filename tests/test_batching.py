"""Batch invariance (issue 4 acceptance): at temperature 0 in fp32, concurrent requests give
exactly the outputs each gives alone, through the public API and both backends.

"Alone" means one request at a time on an engine whose prefix and image caches were just
emptied (`reset_prefix_cache`), so it shares neither a batch nor a cache with anything. The
concurrent side releases every request from threads at one barrier, so they join the same steps.
Token ids (`generate_ids`) and texts (`stream_detailed`, whose final snapshot also brings the
request's metrics) must both match exactly. Seeded sampled requests must match too: the sampler's
noise depends on (seed, step, vocab index) only, never on the batch.

Stress variants (torch backend) must still equal "alone": chunked prefill (a 32-token budget, so
image prompts span several steps while others decode), preemption (a KV pool a few prompts deep),
and the prefix cache on vs off. After every test the engine holds no page and no request.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from concurrency import assert_idle, assert_same, run_threads
from fastllava import LLaVA
from fastllava.runtime.config import RuntimeConfig
from fastllava.schema import parse_request
from fastllava.text.detokenize import IncrementalDetokenizer

IMAGE_SIZES = [(48, 64), (64, 40), (30, 90), (100, 60), (56, 56)]   # (H, W): several anyres grids
WORDS = "red blue cat dog sky tree car house light dark".split()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("batching_images")
    paths = []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        rng = np.random.RandomState(100 + i)
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def engines(tiny_next, tiny_llava):
    """engines(checkpoint, backend="torch", **runtime) → a cached fp32 CPU LLaVA."""
    checkpoints = {"next": tiny_next, "llava": tiny_llava}
    built: dict[tuple, LLaVA] = {}

    def get(name: str, backend: str = "torch", **runtime) -> LLaVA:
        key = (name, backend, tuple(sorted(runtime.items())))
        if key not in built:
            built[key] = LLaVA.from_pretrained(checkpoints[name], device="cpu", dtype="float32",
                                               backend=backend, runtime=RuntimeConfig(**runtime))
        return built[key]
    yield get
    for llava in built.values():
        llava.close()


def workload(images: list[str], n: int, *, max_tokens=lambda i: 3 + (7 * i) % 20,
             sampled: bool = False) -> list[dict]:
    """n requests cycling through the images (so some share one), with prompts of varying length
    and mixed max_tokens; with sampled=True every other one samples (temperature, top_p, seed)."""
    reqs = []
    for i in range(n):
        prompt = f"Request {i}: describe " + " ".join(WORDS[(i + j) % len(WORDS)]
                                                      for j in range(i % 6))
        req = {"image_url": images[i % len(images)], "prompt": prompt, "temperature": 0,
               "max_tokens": max_tokens(i)}
        if sampled and i % 2:
            req.update(temperature=0.9, top_p=0.8 if i % 4 == 1 else 1.0, seed=1000 + i)
        reqs.append(req)
    return reqs


def final_snapshot(llava: LLaVA, req: dict) -> dict:
    out = None
    for out in llava.stream_detailed(req):
        pass
    return out


def alone(llava: LLaVA, reqs: list[dict], *, texts_from_ids: bool = False):
    """(ids, texts): each request's output with nothing else running and nothing cached.
    texts_from_ids=True detokenizes the ids the way the API's snapshots do (stop id dropped)
    instead of running every request a second time (the Triton interpreter is slow)."""
    ids, texts = [], []
    for req in reqs:
        llava.reset_prefix_cache()
        ids.append(llava.generate_ids(req))
        if texts_from_ids:
            detok = IncrementalDetokenizer(llava.tokenizer)
            for token in ids[-1]:
                if token not in llava.stop_ids:
                    detok.push(token)
            texts.append(detok.text())
        else:
            llava.reset_prefix_cache()
            texts.append(llava.generate(req)["output"])
    assert_idle(llava)
    return ids, texts


def concurrently(fn, reqs: list[dict]) -> list:
    """fn(req) for every request, each on its own thread, all released by one barrier."""
    return run_threads([lambda r=r: fn(r) for r in reqs])


def check_batch(llava: LLaVA, reqs: list[dict], want_ids, want_texts, what: str) -> list[dict]:
    """Two concurrent rounds (ids, then texts with metrics) against the alone results; returns
    the final snapshots of the text round. The second round runs over the prefix cache the first
    one left, so cached prefixes must give the same tokens as computed ones."""
    steps = llava.stats()["steps"]
    assert_same(concurrently(llava.generate_ids, reqs), want_ids, f"{what}: token ids")
    steps = llava.stats()["steps"] - steps
    tokens = sum(len(ids) for ids in want_ids)
    assert steps < tokens, f"{what}: {steps} steps for {tokens} tokens: no step was shared"
    finals = concurrently(lambda r: final_snapshot(llava, r), reqs)
    assert_same([f["output"] for f in finals], want_texts, f"{what}: texts")
    assert_same([f["completion_tokens"] for f in finals], [len(i) for i in want_ids],
                f"{what}: completion_tokens")
    assert_idle(llava)
    return finals


# ---- both backends -------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint", ["next", "llava"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_16_concurrent_requests_equal_each_alone(engines, images, checkpoint, sampled):
    llava = engines(checkpoint)
    reqs = workload(images, 16, sampled=sampled)
    want_ids, want_texts = alone(llava, reqs)
    finals = check_batch(llava, reqs, want_ids, want_texts, f"{checkpoint}/torch")
    assert any(f["metrics"]["cached_prompt_tokens"] for f in finals), \
        "the second round never hit the prefix cache: the cached path went untested"


@pytest.mark.interpreter
def test_triton_backend_concurrent_requests_equal_each_alone(engines, images):
    """6 requests (requests 0 and 5 share an image), one of them sampled, through the Triton
    kernels under the interpreter (slow: kept to a few tokens each)."""
    llava = engines("next", "triton")
    reqs = workload(images, 6, max_tokens=lambda i: (2, 5, 3, 6, 4, 2)[i])
    reqs[3].update(temperature=0.9, seed=77)
    want_ids, want_texts = alone(llava, reqs, texts_from_ids=True)
    check_batch(llava, reqs, want_ids, want_texts, "next/triton")


# ---- stress variants (torch) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(engines, images):
    """The 16-request greedy workload on tiny_next and its alone results (default runtime)."""
    reqs = workload(images, 16)
    return reqs, *alone(engines("next"), reqs)


def test_chunked_prefill_equals_alone(engines, reference, monkeypatch):
    reqs, want_ids, want_texts = reference
    llava = engines("next", max_num_batched_tokens=32, max_num_seqs=16)
    steps = []   # per step: [(seq is decoding, image tokens in its chunk, image done after it)]
    budgets = []  # tokens per step
    runner = llava.engine.runner
    launch = runner.launch      # both loops (the serial run() launches too)

    def spy(batch):
        steps.append([(seq.num_computed >= seq.prompt_len,
                       sum(max(0, min(s + n, im.end) - max(s, im.start)) for im in seq.images),
                       all(s + n >= im.end for im in seq.images))
                      for seq, s, n in zip(batch.seqs, batch.starts, batch.num_tokens)])
        budgets.append(sum(batch.num_tokens))
        return launch(batch)
    monkeypatch.setattr(runner, "launch", spy)
    check_batch(llava, reqs, want_ids, want_texts, "chunked prefill")
    assert max(budgets) <= 32, f"a step computed {max(budgets)} tokens over a 32-token budget"
    split_image = any(img and not done for step in steps for _, img, done in step)
    mixed = any(any(dec for dec, _, _ in step) and any(img for _, img, _ in step) for step in steps)
    assert split_image, "no image ended outside its chunk: prefill was never chunked mid-image"
    assert mixed, "no step mixed decodes with an image prefill chunk"


def test_preemption_equals_alone(engines, reference):
    reqs, want_ids, want_texts = reference
    llava = engines("next", kv_cache_tokens=256)         # 16 pages: about 3 requests' worth
    finals = check_batch(llava, reqs, want_ids, want_texts, "preemption")
    preemptions = [f["metrics"]["num_preemptions"] for f in finals]
    assert sum(preemptions) > 0, f"no request was preempted with a 16-page pool: {preemptions}"


def test_prefix_cache_off_equals_on(engines, reference):
    reqs, want_ids, want_texts = reference
    llava = engines("next", prefix_caching=False)
    finals = check_batch(llava, reqs, want_ids, want_texts, "prefix caching off")
    cached = [f["metrics"]["cached_prompt_tokens"] for f in finals]
    assert cached == [0] * len(reqs), f"prefix caching is off but prompts were cached: {cached}"
    assert llava.stats()["kv_pages_cached"] == 0


def test_serial_loop_equals_overlapped(engines, images):
    """The reference runs on the default (overlapped) loop; the serial loop, concurrently, with
    greedy and seeded requests, must give the same tokens and texts."""
    reqs = workload(images, 12, sampled=True)
    want_ids, want_texts = alone(engines("next"), reqs, texts_from_ids=True)
    llava = engines("next", overlap_scheduling=False)
    assert not llava.engine.overlap and engines("next").engine.overlap
    check_batch(llava, reqs, want_ids, want_texts, "serial loop")


def test_prefix_and_image_cache_hits(engines, images):
    llava = engines("next")
    S = llava.stats()["page_size"]
    req = {"image_url": images[1], "prompt": "What is in this picture?", "temperature": 0,
           "max_tokens": 6}
    other = dict(req, prompt="Tell me the colors, please.")
    llava.reset_prefix_cache()
    first, again = final_snapshot(llava, req), final_snapshot(llava, req)
    assert first["metrics"]["cached_prompt_tokens"] == 0
    cached = again["metrics"]["cached_prompt_tokens"]
    assert 0 < cached < again["prompt_tokens"] and cached % S == 0, \
        f"a repeated image + prompt ({again['prompt_tokens']} tokens) cached {cached} tokens"
    assert again["output"] == first["output"]

    # A different prompt after the same image: the cache covers the leading full pages it shares,
    # which must end inside the image, so the image's features come from the feature cache.
    a = llava.prepare(parse_request(req))
    b = llava.prepare(parse_request(other))
    shared = next(i for i, (x, y) in enumerate(zip(a.input_ids, b.input_ids)) if x != y)
    image_end = a.input_ids.index(a.image_token_id) + a.num_image_tokens
    assert (shared // S) * S < image_end, "test setup: the shared pages cover the whole image"
    hits = llava.stats()["image_cache_hits"]
    final_snapshot(llava, other)
    assert llava.stats()["image_cache_hits"] > hits, "a repeated image missed the feature cache"
    assert_idle(llava)
