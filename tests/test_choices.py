"""`n` samples of one prompt (LLaVA.generate_choices): one prefill shared through the prefix
cache, per-choice seeds from `choice_seeds`, and each choice exactly the single request with its
seed (batch invariance)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastllava import LLaVA
from fastllava.evaluation import choice_seeds


@pytest.fixture(scope="module")
def llava(tiny_next):
    return LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.RandomState(4).randint(0, 256, (90, 70, 3), dtype=np.uint8)
                    ).save(path)
    return str(path)


def test_choice_seeds():
    assert choice_seeds(None, 3) == [None, None, None]
    seeds = choice_seeds(5, 4)
    assert seeds[0] == 5 and len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert choice_seeds(5, 4) == seeds and choice_seeds(6, 4)[1:] != seeds[1:]
    assert choice_seeds(5, 2) == seeds[:2]    # a choice's seed does not depend on n


def test_choices_share_the_prefill_and_equal_single_requests(llava, image):
    request = {"image_url": image, "prompt": "Describe it in detail.", "max_tokens": 10,
               "temperature": 1.0, "top_p": 0.9, "seed": 21}
    llava.reset_prefix_cache()
    before = llava.stats()
    choices = llava.generate_choices(request, 4, logprobs=1)
    after = llava.stats()
    assert len(choices) == 4 and len({c["output"] for c in choices}) > 1
    cached = [c["metrics"]["cached_prompt_tokens"] for c in choices]
    prompt = choices[0]["prompt_tokens"]
    page = llava.engine.scheduler.bm.page_size
    assert cached[0] == 0 and all(c == prompt // page * page for c in cached[1:]), cached
    # One vision-tower run: the image features are cached too.
    assert after["image_cache_misses"] - before["image_cache_misses"] == 1
    for seed, choice in zip(choice_seeds(21, 4), choices):
        *_, alone = llava.stream_detailed({**request, "seed": seed}, logprobs=1)
        assert (choice["output"], choice["completion_tokens"]) == (
            alone["output"], alone["completion_tokens"])
        # Tokens are batch-invariant; logits only to float rounding (a different batch shape).
        assert [e["token"] for e in choice["logprobs"]] == [e["token"] for e in alone["logprobs"]]
        assert [e["logprob"] for e in choice["logprobs"]] == pytest.approx(
            [e["logprob"] for e in alone["logprobs"]], abs=1e-5)


def test_greedy_choices_are_identical_and_bad_n(llava, image):
    request = {"image_url": image, "prompt": "Hi", "max_tokens": 5, "temperature": 0}
    outs = [c["output"] for c in llava.generate_choices(request, 3)]
    assert outs == [llava.generate(request)["output"]] * 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n"):
            llava.generate_choices(request, bad)
