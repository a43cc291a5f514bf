"""Config parsing against the real checkpoints' (sparse) config.json shapes (llava-reference §1.1).

Hub sub-configs omit fields that take transformers' class defaults; getting one default wrong
builds a model of the wrong shape. The model is built on the meta device (no memory) and its
parameter count is checked against the published sizes.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastllava.config import ConfigError, load_config
from fastllava.models.llava import LlavaModel

CLIP_336 = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
            "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
            "patch_size": 14, "projection_dim": 768, "vocab_size": 32000}
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

LLAVA_15_13B = {
    "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-13b-v1.5", "hidden_size": 5120,
                    "intermediate_size": 13824, "max_position_embeddings": 4096,
                    "model_type": "llama", "num_attention_heads": 40, "num_hidden_layers": 40,
                    "num_key_value_heads": 40, "rms_norm_eps": 1e-05, "vocab_size": 32064},
    "vision_config": CLIP_336, "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "vocab_size": 32064}
NEXT_MISTRAL_7B = {
    "architectures": ["LlavaNextForConditionalGeneration"], "image_grid_pinpoints": PINPOINTS,
    "image_token_index": 32000, "model_type": "llava_next",
    "text_config": {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
                    "intermediate_size": 14336, "max_position_embeddings": 32768,
                    "model_type": "mistral", "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                    "rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32064},
    "vision_config": CLIP_336, "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default"}
NEXT_34B = {
    "architectures": ["LlavaNextForConditionalGeneration"], "image_grid_pinpoints": PINPOINTS,
    "image_token_index": 64000, "model_type": "llava_next",
    "text_config": {"_name_or_path": "NousResearch/Nous-Hermes-2-Yi-34B", "eos_token_id": 7,
                    "hidden_size": 7168, "intermediate_size": 20480,
                    "max_position_embeddings": 4096, "model_type": "llama",
                    "num_attention_heads": 56, "num_hidden_layers": 60,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 5000000.0,
                    "vocab_size": 64064},
    "vision_config": CLIP_336, "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default"}
ORIGINAL_34B = {
    "architectures": ["LlavaLlamaForCausalLM"], "hidden_size": 7168,
    "image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS,
    "intermediate_size": 20480, "max_position_embeddings": 4096, "mm_hidden_size": 1024,
    "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava",
    "num_attention_heads": 56, "num_hidden_layers": 60, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 5000000.0, "vocab_size": 64000}


def _load(tmp_path, config: dict, vision=None):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return load_config(tmp_path, vision)


def _params(config) -> tuple[float, float]:
    """(decoder + lm_head, vision tower + projector) parameter counts in billions."""
    with torch.device("meta"):
        model = LlavaModel(config)
    lm = sum(p.numel() for n, p in model.named_parameters()
             if n.startswith(("language_model", "lm_head")))
    total = sum(p.numel() for p in model.parameters())
    return lm / 1e9, (total - lm) / 1e9


@pytest.mark.parametrize("config, expect", [
    (LLAVA_15_13B, dict(kind="llava", hidden=5120, layers=40, heads=40, kv=40, inter=13824,
                        theta=1e4, eps=1e-5, vocab=32064, image=32000, lm_b=13.02)),
    (NEXT_MISTRAL_7B, dict(kind="next", hidden=4096, layers=32, heads=32, kv=8, inter=14336,
                           theta=1e6, eps=1e-5, vocab=32064, image=32000, lm_b=7.24)),
    (NEXT_34B, dict(kind="next", hidden=7168, layers=60, heads=56, kv=8, inter=20480,
                    theta=5e6, eps=1e-5, vocab=64064, image=64000, lm_b=34.39)),
    (ORIGINAL_34B, dict(kind="next", hidden=7168, layers=60, heads=56, kv=8, inter=20480,
                        theta=5e6, eps=1e-5, vocab=64000, image=None, lm_b=34.39)),
])
def test_real_checkpoint_configs(tmp_path, config, expect):
    c = _load(tmp_path, config)
    t = c.text
    got = dict(kind=c.kind, hidden=t.hidden_size, layers=t.num_hidden_layers,
               heads=t.num_attention_heads, kv=t.num_key_value_heads, inter=t.intermediate_size,
               theta=t.rope_theta, eps=t.rms_norm_eps, vocab=t.vocab_size, image=c.image_token_id)
    assert got == {k: v for k, v in expect.items() if k != "lm_b"}
    assert t.head_dim == 128
    assert c.vision.hidden_size == 1024 and c.vision.num_positions == 577
    assert c.num_vision_layers_run == 23 and c.tokens_per_tile == 576  # layer -2, CLS dropped
    if c.kind == "next":
        assert c.pinpoints == tuple(map(tuple, PINPOINTS))
    lm_b, vision_b = _params(c)
    assert abs(lm_b - expect["lm_b"]) < 0.01, lm_b
    # CLIP ViT-L/14 without its last layer (~0.29B) + the 2-layer projector
    assert 0.29 < vision_b < 0.35, vision_b


def test_llama_ignores_a_sliding_window_field(tmp_path):
    """LlamaConfig has no sliding window (transformers never reads the field for Llama)."""
    text = {**LLAVA_15_13B["text_config"], "sliding_window": 1024}
    assert _load(tmp_path, {**LLAVA_15_13B, "text_config": text}).text.hidden_size == 5120


def test_rope_parameters_layout_and_defaults(tmp_path):
    c = _load(tmp_path, {"model_type": "llava", "text_config": {
        "model_type": "llama", "rope_parameters": {"rope_theta": 123.0, "rope_type": "default"}}})
    assert c.text.rope_theta == 123.0
    both = {"model_type": "llama", "rope_parameters": {"rope_theta": 123.0, "rope_type": "default"},
            "rope_scaling": {"rope_theta": 456.0, "rope_type": "default"}}
    from transformers import LlamaConfig   # the legacy rope_scaling wins there

    expected = LlamaConfig.from_dict(both).rope_parameters["rope_theta"]
    assert _load(tmp_path, {"model_type": "llava", "text_config": both}).text.rope_theta == expected
    assert (c.text.hidden_size, c.text.num_hidden_layers, c.text.rms_norm_eps) == (4096, 32, 1e-6)
    assert c.vision.image_size == 336  # LlavaConfig's default tower: CLIP ViT-L/14-336


@pytest.mark.parametrize("patch, match", [
    ({"text_config": {"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2}}},
     "rope"),
    ({"text_config": {"model_type": "llama", "rope_parameters": {"rope_type": "llama3"}}},
     "rope_parameters rope_type 'llama3'"),
    ({"text_config": {"model_type": "llama", "rope_parameters": {"rope_type": "default"},
                      "rope_scaling": {"rope_type": "yarn", "factor": 4}}}, "rope_scaling"),
    ({"text_config": {"model_type": "mistral"}}, "sliding"),  # MistralConfig default: 4096
    ({"text_config": {"model_type": "gemma"}}, "gemma"),
    ({"vision_feature_select_strategy": "cls"}, "strategy"),
    ({"vision_config": dict(CLIP_336, model_type="dinov2")}, "dinov2"),
    ({"projector_hidden_act": "silu"}, "projector_hidden_act 'silu'"),
])
def test_unsupported_configs_are_named(tmp_path, patch, match):
    with pytest.raises(ConfigError, match=match):
        _load(tmp_path, {**LLAVA_15_13B, **patch})


def test_not_a_llava_config(tmp_path):
    with pytest.raises(ConfigError, match="not a LLaVA config"):
        _load(tmp_path, {"model_type": "bert"})


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("config, match", [
    # haotian-liu/LLaVA's own defaults for absent fields: a linear projector, "flat" merging
    (_without(ORIGINAL_34B, "mm_projector_type"), "mm_projector_type 'linear'"),
    (_without(ORIGINAL_34B, "mm_patch_merge_type"), "mm_patch_merge_type 'flat'"),
    # the LLaVA-NeXT fork's tiling modes, another text model, image start/end markers
    ({**ORIGINAL_34B, "image_aspect_ratio": "anyres_max_9"}, "image_aspect_ratio 'anyres_max_9'"),
    ({**ORIGINAL_34B, "model_type": "llava_qwen"}, "model_type 'llava_qwen'"),
    ({**ORIGINAL_34B, "mm_use_im_start_end": True}, "mm_use_im_start_end"),
])
def test_original_configs_outside_the_supported_set_are_named(tmp_path, config, match):
    with pytest.raises(ConfigError, match=match):
        _load(tmp_path, config)


@pytest.mark.parametrize("aspect, pad", [("pad", True), (None, False), ("square", False)])
def test_original_aspect_modes(tmp_path, aspect, pad):
    """process_images pads only for "pad": absent (or "square") is the plain resize + crop."""
    base = {k: v for k, v in ORIGINAL_34B.items() if k not in ("image_aspect_ratio",
                                                               "image_grid_pinpoints")}
    c = _load(tmp_path, base if aspect is None else {**base, "image_aspect_ratio": aspect})
    assert (c.kind, c.pad_to_square) == ("llava", pad)


def test_qwen2_text_config(tmp_path):
    """llava-next-72b/110b-hf: a Qwen2 decoder (q/k/v biases); its sliding window is off unless
    use_sliding_window says otherwise, and tensor parallelism of the biases is refused by name."""
    from fastllava.models.parallel import TensorParallel, TensorParallelError, shard_decoder

    qwen = {"model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568,
            "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
            "rope_theta": 1000000.0, "sliding_window": 4096, "vocab_size": 152064}
    c = _load(tmp_path, {**NEXT_34B, "text_config": qwen})
    assert (c.text.qkv_bias, c.text.head_dim, c.text.max_position_embeddings) == (True, 128, 32768)
    with torch.device("meta"):
        model = LlavaModel(c)
    assert model.language_model.layers[0].self_attn.qkv_proj.bias.shape == (8192 + 2 * 1024,)
    with pytest.raises(TensorParallelError, match="qwen2"):
        shard_decoder(model, TensorParallel(0, 2))
    with pytest.raises(ConfigError, match="use_sliding_window"):
        _load(tmp_path, {**NEXT_34B, "text_config": {**qwen, "use_sliding_window": True}})


@pytest.mark.parametrize("top, text", [(True, False), (False, True)])
def test_tied_embeddings_stay_tied(tmp_path, top, text):
    """LlavaConfig ties lm_head to the embeddings when either level says so; the tie survives
    tensor-parallel sharding and `to_empty` (which gives every parameter new storage)."""
    from fastllava.models.parallel import TensorParallel, shard_decoder

    tiny_text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 96,
                 "tie_word_embeddings": text}
    c = _load(tmp_path, {"model_type": "llava", "tie_word_embeddings": top,
                         "text_config": tiny_text})
    assert c.text.tie_word_embeddings
    for tp in (None, TensorParallel(1, 2)):
        with torch.device("meta"):
            model = LlavaModel(c)
            if tp is not None:
                shard_decoder(model, tp)
        model = model.to_empty(device="cpu")
        model.reset_buffers()
        assert model.lm_head.weight is model.language_model.embed_tokens.weight


def test_generation_config_fields_that_change_greedy_output_are_warned(tiny_llava, tmp_path):
    """transformers' generate() applies generation_config.json's logits processors (greedy
    included); fastllava applies none, so loading such a checkpoint says so, naming them.
    Sampling-only defaults (top_k, temperature) and off values are not warned about."""
    import shutil
    import warnings

    from fastllava import LLaVA
    from fastllava.config import unapplied_generation_fields

    folder = shutil.copytree(tiny_llava, tmp_path / "ckpt")
    gc = folder / "generation_config.json"
    d = json.loads(gc.read_text())
    d.update(top_k=5, temperature=0.7, do_sample=True, no_repeat_ngram_size=0, num_beams=1,
             repetition_penalty=1.0, suppress_tokens=[])
    gc.write_text(json.dumps(d))
    assert unapplied_generation_fields(folder) == {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        LLaVA.from_pretrained(folder, device="cpu", dtype="float32")
    assert not [w for w in seen if "generation_config" in str(w.message)], seen
    gc.write_text(json.dumps(dict(d, repetition_penalty=1.3, no_repeat_ngram_size=3)))
    assert unapplied_generation_fields(folder) == {"repetition_penalty": 1.3,
                                                   "no_repeat_ngram_size": 3}
    with pytest.warns(UserWarning, match="repetition_penalty.*no_repeat_ngram_size"):
        LLaVA.from_pretrained(folder, device="cpu", dtype="float32")
