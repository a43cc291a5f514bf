"""End-to-end parity with transformers on tiny random checkpoints, in fp32.

For each checkpoint (and each tensor layout): the same prompt ids (image tokens included), logits
within LOGITS_ATOL at every generated step, and identical greedy tokens for >= 24 new tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from tolerances import LOGITS_ATOL
from fastllava import LLaVA
from fastllava.weights.layouts import convert_checkpoint

NEW_TOKENS = 24
PROMPT = "What is in this image? Describe it."


def _image(path, h: int, w: int, seed: int = 0) -> str:
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def _reference(ref_dir, image_path: str, prompt: str = PROMPT, dtype=torch.float32):
    """transformers' prompt ids, per-step logits and greedy tokens."""
    model, processor = tiny.load_reference(ref_dir, dtype)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_path).convert("RGB"), text=text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logits = torch.cat([l.float() for l in out.logits])  # (steps, V)
    return inputs["input_ids"][0].tolist(), logits, new, processor


def _ours(llava: LLaVA, image_path: str, prompt: str = PROMPT):
    recorded = []
    forward = llava.model.forward
    llava.model.forward = lambda *a, **k: recorded.append(forward(*a, **k)) or recorded[-1]
    try:
        request = {"image_url": image_path, "prompt": prompt, "max_tokens": NEW_TOKENS,
                   "temperature": 0}
        ids = llava.generate_ids(request)
        text = llava.generate(request)
    finally:
        del llava.model.forward
    return ids, torch.cat(recorded[: len(ids)]), text


def check_parity(engine_dir, ref_dir, image_path, prompt: str = PROMPT, backend: str = "torch",
                 dtype=torch.float32, atol: float = LOGITS_ATOL):
    ref_ids, ref_logits, ref_new, processor = _reference(ref_dir, image_path, prompt, dtype)
    llava = LLaVA.from_pretrained(engine_dir, device="cpu", dtype=dtype, backend=backend)
    from fastllava.schema import parse_request

    prepared = llava.prepare(parse_request({"image_url": image_path, "prompt": prompt}))
    ref_image_tokens = sum(1 for t in ref_ids if t == tiny.IMAGE_TOKEN_ID)
    assert prepared.num_image_tokens == ref_image_tokens
    ours_ids = [tiny.IMAGE_TOKEN_ID if t == prepared.image_token_id else t
                for t in prepared.input_ids]
    assert ours_ids == ref_ids, f"prompt ids differ:\n ours {ours_ids}\n ref  {ref_ids}"

    new, logits, text = _ours(llava, image_path, prompt)
    assert len(ref_new) >= NEW_TOKENS or ref_new[-1] in llava.stop_ids
    assert new == ref_new, f"greedy tokens differ:\n ours {new}\n ref  {ref_new}"
    diff = (logits - ref_logits).abs().max().item()
    assert diff <= atol, f"max |logits - ref| = {diff:.3g} > {atol}"
    expected = processor.tokenizer.decode(ref_new, skip_special_tokens=True)
    assert text == {"output": expected, "partial": False}
    return new


@pytest.mark.parametrize("size", [(75, 100), (40, 160), (170, 30), (120, 120)])
def test_next_gqa_sharded(tiny_next, tmp_path, size):
    img = _image(tmp_path / "img.png", *size, seed=sum(size))
    new = check_parity(tiny_next, tiny_next, img)
    assert len(new) >= NEW_TOKENS


def test_llava15_mha_single_file(tiny_llava, tmp_path):
    check_parity(tiny_llava, tiny_llava, _image(tmp_path / "img.jpg", 90, 60))


def test_siglip_chatml(tiny_siglip, tmp_path):
    check_parity(tiny_siglip, tiny_siglip, _image(tmp_path / "img.png", 64, 64))


def test_next_chatml_eos_list(tiny_chatml_next, tmp_path):
    check_parity(tiny_chatml_next, tiny_chatml_next, _image(tmp_path / "img.png", 100, 75),
                 prompt="Give one word. über 東京 😀")


@pytest.mark.parametrize("fixture", ["tiny_next", "tiny_llava"])
def test_bf16_keeps_transformers_rounding_points(request, tmp_path, fixture):
    """In bf16 every rounding point (RMSNorm before the weight multiply, cos/sin cast, eager
    attention's rounded scores, bf16 logits) matches transformers' eager run: the logits are
    bit-identical, not merely close. Through the references: the torch backend's fused SDPA keeps
    scores in fp32 (FlashAttention numerics, held to that bound in tests/kernels)."""
    path = request.getfixturevalue(fixture)
    check_parity(path, path, _image(tmp_path / "img.png", 75, 100), dtype=torch.bfloat16, atol=0.0,
                 backend="reference")


@pytest.mark.parametrize("layout", ["hf4", "hf5_modules", "original"])
def test_next_layouts(tiny_next, tmp_path, layout):
    converted = convert_checkpoint(tiny_next, layout, tmp_path / layout)
    check_parity(converted, tiny_next, _image(tmp_path / "img.png", 75, 100))


@pytest.mark.parametrize("layout", ["hf4", "original"])
def test_llava15_layouts(tiny_llava, tmp_path, layout):
    # v1.5 originals ship no CLIP weights: the tower comes from a separate folder.
    converted = convert_checkpoint(tiny_llava, layout, tmp_path / layout,
                                   drop_vision=(layout == "original"))
    # A square image: the original repo's "pad" mode is then the identity, so transformers (which
    # has no pad mode) is a valid reference.
    check_parity(converted, tiny_llava, _image(tmp_path / "img.png", 80, 80))


def _drop_image_token(folder):
    """Make the tokenizer look like an original liuhaotian one: no <image> token at all."""
    import json

    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<image>"]
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["added_tokens_decoder"] = {k: v for k, v in tc.get("added_tokens_decoder", {}).items()
                                  if v["content"] != "<image>"}
    tc.pop("image_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))


def test_original_tokenizer_without_image_token_splices_features(tiny_llava, tmp_path):
    """The original repo splits the prompt at "<image>", tokenizes the chunks and splices the
    image there. transformers, fed the same ids (sentinel → its image id), must agree."""
    converted = convert_checkpoint(tiny_llava, "original", tmp_path / "orig", drop_vision=True)
    _drop_image_token(converted)
    image_path = _image(tmp_path / "img.png", 80, 80)
    llava = LLaVA.from_pretrained(converted, device="cpu", dtype="float32")
    assert llava.tokenizer.token_id("<image>") is None
    from fastllava.schema import parse_request

    prepared = llava.prepare(parse_request({"image_url": image_path, "prompt": PROMPT}))
    assert prepared.input_ids.count(prepared.image_token_id) == prepared.num_image_tokens == 16
    assert tiny.IMAGE_TOKEN_ID not in prepared.input_ids

    model, processor = tiny.load_reference(tiny_llava)
    pixels = processor.image_processor(Image.open(image_path).convert("RGB"),
                                       return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[tiny.IMAGE_TOKEN_ID if t == prepared.image_token_id else t
                         for t in prepared.input_ids]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=pixels, max_new_tokens=NEW_TOKENS, do_sample=False)
    ref_new = out[0, ids.shape[1]:].tolist()
    new, _, _ = _ours(llava, image_path)
    assert new == ref_new


@pytest.mark.parametrize("spec", [
    # v1.6-mistral shape: Mistral text model (sliding_window null), [INST] template
    tiny.Spec(kind="next", text_model="mistral", template="mistral", rope_theta=1e6, seed=4),
    # several vision feature layers concatenated; CLIP keeping its CLS token ("full")
    tiny.Spec(kind="llava", feature_layer=(-2, -3), strategy="full", seed=5),
    tiny.Spec(kind="next", feature_layer=(-1, 0), seed=6),
    # head_dim set explicitly (12, not hidden / heads = 8) and a GQA ratio of 8
    tiny.Spec(kind="llava", num_heads=8, num_kv_heads=1, head_dim=12, seed=7),
    # projector_hidden_act other than the usual exact GELU (it was read as "gelu" whatever it said)
    tiny.Spec(kind="llava", llava_extra=(("projector_hidden_act", "quick_gelu"),), seed=11),
    # LlavaImageProcessor with do_pad: a square of the mean colour first (it was ignored)
    tiny.Spec(kind="llava", processor_extra=(("do_pad", True),), seed=12),
    # llava-next-72b/110b-hf shape: Qwen2 text model (q/k/v biases), chatml
    tiny.Spec(kind="next", text_model="qwen2", template="chatml", rope_theta=1e6, seed=8,
              perturb=True),
    # llava-interleave-qwen-7b-hf shape: SigLIP tower and processor (exact resize, no crop), Qwen2
    tiny.Spec(kind="llava", vision="siglip", text_model="qwen2", template="chatml", perturb=True,
              processor_extra=(("size", {"height": 56, "width": 56}),), seed=9),
    # tie_word_embeddings (llava-interleave-qwen-0.5b-hf): lm_head is the embedding table
    tiny.Spec(kind="next", perturb=True, llava_extra=(("tie_word_embeddings", True),), seed=13),
], ids=["mistral", "layers-full", "next-layers", "headdim-gqa8", "projector-act",
        "processor-do-pad", "qwen2", "interleave", "tied"])
def test_other_checkpoint_shapes(tmp_path, spec):
    path = tiny.build(spec, tmp_path / "ckpt")
    check_parity(path, path, _image(tmp_path / "img.png", 61, 97, seed=spec.seed))


def test_tied_config_with_a_stored_lm_head(tmp_path):
    """tie_word_embeddings, but the checkpoint stores its own (different) lm_head: transformers
    then does not tie (it warns) and runs the stored one; so must the engine."""
    import json

    from safetensors.torch import save_file

    spec = tiny.Spec(kind="llava", perturb=True, seed=14,
                     llava_extra=(("tie_word_embeddings", True),))
    path = tiny.build(spec, tmp_path / "ckpt")
    index = path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())
    assert not any("lm_head" in k for k in weight_map["weight_map"])
    torch.manual_seed(0)
    save_file({"language_model.lm_head.weight": torch.randn(tiny.MODEL_VOCAB, spec.hidden_size)},
              str(path / "lm_head.safetensors"), metadata={"format": "pt"})
    weight_map["weight_map"]["language_model.lm_head.weight"] = "lm_head.safetensors"
    index.write_text(json.dumps(weight_map))
    check_parity(path, path, _image(tmp_path / "img.png", 61, 97, seed=spec.seed))
