"""Log-probabilities against transformers (fp32, tiny checkpoints): the logprobs of generated
tokens (and their top alternatives) within 1e-4 of transformers' log-softmax, whatever the
temperature / top-p; `score` equal to transformers' summed log-probs of a continuation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from fastllava import LLaVA

ATOL = 1e-4
PROMPT = "What is in this image?"
TOP = 5


def _image(path, h: int, w: int, seed: int = 0) -> str:
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def _ref_inputs(processor, image_path: str, prompt: str):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=Image.open(image_path).convert("RGB"), text=text, return_tensors="pt")


def _ref_logprobs(model, inputs, ids: list[int]) -> torch.Tensor:
    """transformers' fp32 log-softmax at every position of prompt + ids: (len, V)."""
    full = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), **extra).logits
    return torch.log_softmax(logits[0].float(), dim=-1)


@pytest.fixture(scope="module")
def setup(tiny_next, tmp_path_factory):
    image = _image(tmp_path_factory.mktemp("img") / "a.png", 75, 100, seed=3)
    model, processor = tiny.load_reference(tiny_next)
    llava = LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32")
    return llava, model, processor, image


@pytest.mark.parametrize("temperature, top_p", [(0, 1.0), (1.3, 0.7)])
def test_generated_logprobs_match_log_softmax(setup, temperature, top_p):
    """Raw logprobs: the same values greedy or sampled (temperature and top-p only shape the
    draw), for the token actually produced and the top alternatives in order."""
    llava, model, processor, image = setup
    request = {"image_url": image, "prompt": PROMPT, "max_tokens": 12,
               "temperature": temperature, "top_p": top_p, "seed": 7}
    snaps = list(llava.stream_detailed(request, logprobs=TOP))
    last, entries = snaps[-1], snaps[-1]["logprobs"]
    for a, b in zip(snaps, snaps[1:]):   # cumulative, like "output"
        assert b["logprobs"][:len(a["logprobs"])] == a["logprobs"]
    ids = llava.generate_ids(request)
    visible = [t for t in ids if t not in llava.stop_ids]
    assert len(entries) == len(visible) == last["completion_tokens"] - (len(ids) - len(visible))
    inputs = _ref_inputs(processor, image, PROMPT)
    n = inputs["input_ids"].shape[1]
    ref = _ref_logprobs(model, inputs, ids)[n - 1:n - 1 + len(visible)]     # row i scores ids[i]
    for i, (entry, token) in enumerate(zip(entries, visible)):
        assert abs(entry["logprob"] - ref[i, token].item()) <= ATOL, (i, entry, ref[i, token])
        want = torch.sort(ref[i], descending=True, stable=True)
        want_tokens = [llava.tokenizer.decode([t], skip_special_tokens=False)
                       for t in want.indices[:TOP].tolist()]
        assert [t["token"] for t in entry["top_logprobs"]] == want_tokens
        got = torch.tensor([t["logprob"] for t in entry["top_logprobs"]])
        assert len(got) == TOP
        assert torch.allclose(got, want.values[:TOP], atol=ATOL, rtol=0), (got, want.values[:TOP])
        assert entry["token"] == llava.tokenizer.decode([token], skip_special_tokens=False)
        assert entry["bytes"] == list(entry["token"].encode())
        if temperature == 0:   # greedy: the chosen token is the top one
            assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]


def test_astream_logprobs_equal_stream_detailed(setup):
    import asyncio

    llava, _, _, image = setup
    request = {"image_url": image, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}

    async def run():
        return [s async for s in llava.astream(request, detailed=True, logprobs=2)]

    *_, want = llava.stream_detailed(request, logprobs=2)
    assert asyncio.run(run())[-1]["logprobs"] == want["logprobs"]


def test_no_logprobs_unless_asked(setup):
    llava, _, _, image = setup
    request = {"image_url": image, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    assert all("logprobs" not in s for s in llava.stream_detailed(request))
    *_, last = llava.stream_detailed(request, logprobs=0)
    zero = last["logprobs"]
    assert zero and all(e["top_logprobs"] == [] for e in zero)
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="logprobs"):
            llava.stream_detailed(request, logprobs=bad)


@pytest.mark.parametrize("continuation", ["a red square", " yes", "no"])
def test_score_equals_summed_log_softmax(setup, continuation):
    llava, model, processor, image = setup
    request = {"image_url": image, "prompt": PROMPT}
    got = llava.score(request, continuation)
    cont = llava.tokenizer.encode(continuation, add_special_tokens=False)
    assert got["tokens"] == cont
    inputs = _ref_inputs(processor, image, PROMPT)
    n = inputs["input_ids"].shape[1]
    assert got["prompt_tokens"] == n
    ref = _ref_logprobs(model, inputs, cont)
    per_token = [ref[n - 1 + i, t].item() for i, t in enumerate(cont)]
    assert got["token_logprobs"] == pytest.approx(per_token, abs=ATOL)
    assert got["logprob"] == pytest.approx(sum(per_token), abs=ATOL * len(cont))
    greedy = all(ref[n - 1 + i].argmax().item() == t for i, t in enumerate(cont))
    assert got["is_greedy"] == greedy


def test_score_of_the_greedy_answer_is_greedy_and_cache_safe(setup):
    """Scoring the model's own greedy answer: is_greedy, and the same values when the prompt and
    the continuation are already in the prefix cache (the continuation is always recomputed)."""
    llava, _, _, image = setup
    request = {"image_url": image, "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    ids = [t for t in llava.generate_ids(request) if t not in llava.stop_ids][:20]
    first = llava.score(request, ids)
    assert first["is_greedy"]
    again = llava.score(request, ids)
    assert again["token_logprobs"] == pytest.approx(first["token_logprobs"], abs=ATOL)
    assert llava.stats()["prefix_hit_tokens"] > 0
    with pytest.raises(ValueError, match="continuation"):
        llava.score(request, "")
    with pytest.raises(ValueError, match="continuation"):
        llava.score(request, [10**9])
    with pytest.raises(ValueError, match="1 to 1024 tokens"):
        llava.score(request, [5] * 1025)


def test_score_text_only_chat(setup):
    llava, model, processor, _ = setup
    messages = [{"role": "user", "content": "Name a color."}]
    got = llava.score({}, " red", messages=messages)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a color."}]}]
    text = processor.apply_chat_template(parts, add_generation_prompt=True)
    inputs = processor(text=text, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    ref = _ref_logprobs(model, inputs, got["tokens"])
    want = sum(ref[n - 1 + i, t].item() for i, t in enumerate(got["tokens"]))
    assert got["logprob"] == pytest.approx(want, abs=ATOL * len(got["tokens"]))
