"""Parity with transformers beyond one image: several images in one chat, and text-only turns.

The chat goes through transformers' own `apply_chat_template` + processor (which expands each
<image> by its own image's count; anyres per image for LLaVA-NeXT) and `generate`; the engine
gets the same chat through `LLaVA.generate(..., messages=...)`. Prompt ids, per-image token
counts and greedy tokens must be identical (fp32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from fastllava import LLaVA
from fastllava.messages import chat_messages
from fastllava.schema import parse_request

NEW_TOKENS = 16


def _image(path, h: int, w: int, seed: int) -> str:
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def _reference(path, messages: list[dict], image_paths: list[str]):
    """transformers' prompt ids and greedy tokens for `messages` (their image parts in order)."""
    model, processor = tiny.load_reference(path)
    template_messages = [{"role": m["role"], "content": [
        {"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
        for m in messages]
    text = processor.apply_chat_template(template_messages, add_generation_prompt=True)
    images = [Image.open(p).convert("RGB") for p in image_paths] or None
    inputs = processor(images=images, text=text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return inputs["input_ids"][0].tolist(), out[0, inputs["input_ids"].shape[1]:].tolist()


def _image_runs(ids: list[int], image_id: int) -> list[int]:
    """Lengths of the runs of image tokens, in order."""
    runs, prev = [], None
    for t in ids:
        if t == image_id:
            runs[-1:] = [runs[-1] + 1] if prev == image_id else runs[-1:] + [1]
        prev = t
    return runs


def _check(path, messages, image_paths):
    ref_ids, ref_new = _reference(path, messages, image_paths)
    llava = LLaVA.from_pretrained(path, device="cpu", dtype="float32")
    request = {"max_tokens": NEW_TOKENS, "temperature": 0}
    prepared = llava.prepare(llava._parse(request, chat_messages(messages)),
                             messages=chat_messages(messages))
    ours = [tiny.IMAGE_TOKEN_ID if t == prepared.image_token_id else t
            for t in prepared.input_ids]
    assert ours == ref_ids, f"prompt ids differ:\n ours {ours}\n ref  {ref_ids}"
    assert list(prepared.image_token_counts) == _image_runs(ref_ids, tiny.IMAGE_TOKEN_ID)
    new = llava.generate_ids(request, messages=messages)
    assert new == ref_new, f"greedy tokens differ:\n ours {new}\n ref  {ref_new}"
    return llava, prepared


def _two_images_between_text(a: str, b: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "Compare the first picture"},
        {"type": "image_url", "image_url": {"url": a}},
        {"type": "text", "text": "with the second one"},
        {"type": "image_url", "image_url": {"url": b}},
        {"type": "text", "text": "What differs?"}]}]


@pytest.mark.parametrize("fixture", ["tiny_next", "tiny_llava", "tiny_chatml_next"])
def test_two_images_each_where_its_part_stands(request, tmp_path, fixture):
    path = request.getfixturevalue(fixture)
    # Different sizes: on LLaVA-NeXT each image gets its own anyres grid and token count.
    a = _image(tmp_path / "a.png", 75, 100, seed=1)
    b = _image(tmp_path / "b.png", 160, 40, seed=2)
    llava, prepared = _check(path, _two_images_between_text(a, b), [a, b])
    assert len(prepared.images) == 2
    if fixture != "tiny_llava":
        assert prepared.image_token_counts[0] != prepared.image_token_counts[1]


def test_three_images_across_turns(tiny_next, tmp_path):
    imgs = [_image(tmp_path / f"{i}.png", 60 + 20 * i, 90 - 10 * i, seed=i) for i in range(3)]
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": imgs[0]}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A pattern."}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": imgs[1]}},
                                     {"type": "image_url", "image_url": {"url": imgs[2]}},
                                     {"type": "text", "text": "And these two?"}]}]
    _check(tiny_next, messages, imgs)


@pytest.mark.parametrize("fixture", ["tiny_next", "tiny_llava", "tiny_chatml_next"])
def test_text_only_chat(request, fixture):
    path = request.getfixturevalue(fixture)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]}]
    llava, prepared = _check(path, messages, [])
    assert prepared.images == () and prepared.num_image_tokens == 0


def test_text_only_request_without_image_url(tiny_next):
    """The Python API's one-turn form: no image_url is a text-only turn, the same as the chat."""
    llava = LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32")
    req = {"prompt": "Tell me a story.", "max_tokens": NEW_TOKENS, "temperature": 0}
    chat = [{"role": "user", "content": "Tell me a story."}]
    assert llava.generate_ids(req) == llava.generate_ids(
        {"max_tokens": NEW_TOKENS, "temperature": 0}, messages=chat)
    assert llava.prepare(parse_request(req, image_required=False)).images == ()
    with pytest.raises(ValueError, match="image_url"):  # the fal schema still requires it
        parse_request(req)


def test_repeated_image_is_cached_per_image(tiny_next, tmp_path):
    """The same picture twice in one chat: the tower runs once for it; a second chat with it
    (and another picture) hits the feature cache for it and reuses the shared prefix."""
    a = _image(tmp_path / "a.png", 75, 100, seed=1)
    b = _image(tmp_path / "b.png", 90, 60, seed=3)
    llava = LLaVA.from_pretrained(tiny_next, device="cpu", dtype="float32")
    encoded = []   # images per vision-tower run
    encode = llava.model.encode_images
    llava.model.encode_images = lambda ops, pixels, *a: encoded.append(len(pixels)) or encode(
        ops, pixels, *a)
    req = {"max_tokens": 4, "temperature": 0}
    first = llava.generate_ids(req, messages=_two_images_between_text(a, a))
    assert encoded == [1]
    hits, prefix_hits = llava.stats()["image_cache_hits"], llava.stats()["prefix_hit_tokens"]
    llava.generate_ids(req, messages=_two_images_between_text(a, b))
    assert encoded == [1, 1]                      # only b ran; a came from the feature cache
    assert llava.stats()["image_cache_hits"] > hits
    assert llava.stats()["prefix_hit_tokens"] > prefix_hits   # the text + first image prefix
    llava.reset_prefix_cache()
    assert llava.generate_ids(req, messages=_two_images_between_text(a, a)) == first


def test_original_tokenizer_splices_each_image(tiny_llava, tmp_path):
    """Original checkpoints (no <image> token): the prompt is split at every "<image>" and a run
    of sentinel ids spliced in per image (tokenizer_image_token). transformers, fed the same ids
    (sentinel → its image id) and both images' pixels, must give the same greedy tokens."""
    from fastllava.weights.layouts import convert_checkpoint
    from test_parity import _drop_image_token

    converted = convert_checkpoint(tiny_llava, "original", tmp_path / "orig", drop_vision=True)
    _drop_image_token(converted)
    a, b = _image(tmp_path / "a.png", 80, 80, seed=1), _image(tmp_path / "b.png", 80, 80, seed=2)
    messages = _two_images_between_text(a, b)
    llava = LLaVA.from_pretrained(converted, device="cpu", dtype="float32")
    prepared = llava.prepare(llava._parse({}, chat_messages(messages)),
                             messages=chat_messages(messages))
    assert prepared.image_token_counts == (16, 16)
    assert tiny.IMAGE_TOKEN_ID not in prepared.input_ids
    model, processor = tiny.load_reference(tiny_llava)
    pixels = processor.image_processor([Image.open(p).convert("RGB") for p in (a, b)],
                                       return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[tiny.IMAGE_TOKEN_ID if t == prepared.image_token_id else t
                         for t in prepared.input_ids]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=pixels, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert llava.generate_ids({"max_tokens": NEW_TOKENS, "temperature": 0},
                              messages=messages) == out[0, ids.shape[1]:].tolist()
