"""Random weights at the real LLaVA shapes, for benchmarks (architecture.md): a decode step reads
the same bytes and runs the same kernels whatever the weights hold, so a 13B / 34B benchmark
needs only the real config.json, not the 26 / 69 GB checkpoint.

    config = real_config("llava-1.5-13b")                  # fastllava.config.LlavaConfig
    model = random_model(config, "cuda", torch.bfloat16)   # LlavaModel, built on the device

`REAL_CONFIGS` holds config.json files in the llava-hf layout, as sparse as the hub's (missing
fields take transformers' class defaults, see fastllava.config); `real_config` parses them with
the project's own parser, so a benchmark runs exactly the model a checkpoint would give.

Init (`fill_random_`): Linear / Embedding / Conv weights ~ N(0, 0.02) (transformers'
initializer_range), biases 0, norm weights 1, other parameters (CLIP class embedding, NeXT
image_newline) ~ N(0, 0.02). Why this keeps activations finite in bf16 at the real widths: a
projection of a unit-RMS input (every branch starts with an RMSNorm / LayerNorm) has std
0.02 * sqrt(fan_in): 1.4 at hidden 5120, 1.7 at 7168, 2.4 for the 13824-wide down projection;
each layer adds O(1) to the residual, so after 60 layers it stays O(10), and the logits are
again 0.02 * sqrt(hidden) ~ 1.4-1.7. Nothing approaches bf16's range (3e38); the tests check
that a random model's logits are finite.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastllava.config import LlavaConfig, _from_hf
from fastllava.kernels.fp8_linear import FP8_DTYPE, quantize_fp8_rows

INIT_STD = 0.02

# CLIP ViT-L/14-336 as every llava-hf repo below writes it (vision_config of
# llava-hf/llava-1.5-13b-hf and llava-hf/llava-v1.6-34b-hf config.json, seen in their copies
# jamesdborin/llava-1.5-13b-hf-awq and mesolitica/llava-v1.6-34b-hf-awq; llava-reference.md §1.1).
# hidden_act (quick_gelu) and layer_norm_eps (1e-5) are absent: CLIPVisionConfig defaults.
_CLIP_L_336 = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
               "model_type": "clip_vision_model", "num_attention_heads": 16,
               "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}
_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _llava(text: dict, image_token: int = 32000) -> dict:
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": image_token, "projector_hidden_act": "gelu",
            "text_config": text, "vision_config": dict(_CLIP_L_336), "tie_word_embeddings": False,
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}


def _next(text: dict, image_token: int = 32000) -> dict:
    return {**_llava(text, image_token), "architectures": ["LlavaNextForConditionalGeneration"],
            "model_type": "llava_next", "image_grid_pinpoints": copy.deepcopy(_PINPOINTS),
            "use_image_newline_parameter": True}


# Vicuna-13B v1.5 (Llama-2-13B dims): llava-hf/llava-1.5-13b-hf config.json text_config (copy:
# jamesdborin/llava-1.5-13b-hf-awq, "_name_or_path": "llava-hf/llava-1.5-13b-hf"); the same
# text_config in llava-hf/llava-v1.6-vicuna-13b-hf (copy: mesolitica/llava-v1.6-vicuna-13b-hf-awq).
_VICUNA_13B = {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824,
               "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 40,
               "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32064}
# Vicuna-7B v1.5: hub text_config as sparse as llava-hf/llava-1.5-7b-hf's (hidden 4096, 32 layers,
# 32 heads, MLP 11008 are LlamaConfig defaults); llava-reference.md §1.1 table.
_VICUNA_7B = {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
              "vocab_size": 32064}
# Mistral-7B-Instruct-v0.2: llava-reference.md §1.1 (rope 1e6, 8 KV heads, sliding window null).
_MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
               "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
               "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
               "sliding_window": None, "vocab_size": 32064}
# Nous-Hermes-2-Yi-34B: llava-hf/llava-v1.6-34b-hf config.json text_config (copy:
# mesolitica/llava-v1.6-34b-hf-awq, "_name_or_path": "llava-hf/llava-v1.6-34b-hf").
_YI_34B = {"model_type": "llama", "hidden_size": 7168, "intermediate_size": 20480,
           "num_attention_heads": 56, "num_hidden_layers": 60, "num_key_value_heads": 8,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 5000000.0,
           "vocab_size": 64064, "eos_token_id": 7, "pad_token_id": 0}

REAL_CONFIGS: dict[str, dict] = {
    "llava-1.5-13b": _llava(_VICUNA_13B),
    "llava-v1.6-vicuna-7b": _next(_VICUNA_7B),
    "llava-v1.6-vicuna-13b": _next(_VICUNA_13B),
    "llava-v1.6-mistral-7b": _next(_MISTRAL_7B),
    "llava-v1.6-34b": _next(_YI_34B, image_token=64000),
}

# Not a checkpoint: a tiny llava-hf config (GQA 4/2, head dim 16, CLIP 3 layers at 56 px) for the
# benchmarks' --smoke runs on the CPU.
TINY_CONFIG: dict = {
    "model_type": "llava", "image_token_index": 400,
    "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "vocab_size": 448},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32,
                      "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                      "image_size": 56, "patch_size": 14}}


def llava_config(config_json: dict) -> LlavaConfig:
    """Parse a llava-hf config.json dict (model_type "llava" | "llava_next") as load_config does."""
    return _from_hf(copy.deepcopy(config_json))


def real_config(name: str) -> LlavaConfig:
    """The LlavaConfig fastllava builds from the named checkpoint's config.json."""
    if name not in REAL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(REAL_CONFIGS)}")
    return llava_config(REAL_CONFIGS[name])


def fill_random_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter of `module` in place, on its own device and in its own dtype (no
    host or fp32 copy): Linear / Embedding / Conv weights and loose parameters ~ N(0, INIT_STD),
    biases 0, weights of norm layers (class name ending in "Norm": RMSNorm, LayerNorm,
    LlamaRMSNorm) 1. Draws come from one torch.Generator seeded with `seed` on that device, in
    named_modules order, so the same module tree and seed give the same weights. FP8 weights
    (Fp8Linear) are drawn the same way in fp32, one tensor at a time, and quantized per row,
    which also sets their `weight_scale`."""
    gens: dict[torch.device, torch.Generator] = {}

    def gen(device: torch.device) -> torch.Generator:
        if device not in gens:
            gens[device] = torch.Generator(device=device).manual_seed(seed)
        return gens[device]

    with torch.no_grad():
        for mod in module.modules():
            is_norm = type(mod).__name__.endswith("Norm")
            for name, p in mod.named_parameters(recurse=False):
                if p.device.type == "meta":
                    raise ValueError(f"parameter {name!r} of {type(mod).__name__} is on the meta "
                                     "device: call to_empty(device=...) first")
                if name == "bias":
                    p.zero_()
                elif p.dtype == FP8_DTYPE:
                    w = torch.empty(p.shape, device=p.device).normal_(0.0, INIT_STD,
                                                                     generator=gen(p.device))
                    q, scale = quantize_fp8_rows(w)
                    p.copy_(q)
                    mod.weight_scale.copy_(scale)
                elif name == "weight_scale":
                    continue  # set with its FP8 weight
                elif is_norm and name == "weight":
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, INIT_STD, generator=gen(p.device))
    return module


def random_model(config: LlavaConfig, device, dtype: torch.dtype, seed: int = 0,
                 quantization: str | None = None, tp=None):
    """A LlavaModel with random weights, allocated once on `device` in `dtype` (built on the meta
    device, cast there for free, then `to_empty`), filled by `fill_random_`, non-checkpoint
    buffers (RoPE inv_freq) recomputed; eval mode, no grad. Peak memory = the model in dtype.
    quantization="fp8": the decoder's linear layers in FP8, as `LLaVA.from_pretrained` builds.
    tp (models/parallel.TensorParallel): only that rank's shard of the decoder."""
    from fastllava.models.layers import use_fp8_linears
    from fastllava.models.llava import LlavaModel
    from fastllava.models.parallel import shard_decoder

    with torch.device("meta"):
        model = LlavaModel(config)
        if tp is not None:
            shard_decoder(model, tp)
    model = model.to(dtype)
    if quantization == "fp8":
        use_fp8_linears(model.language_model)
    model = model.to_empty(device=device)
    fill_random_(model, seed)
    model.reset_buffers()
    return model.eval().requires_grad_(False)


def count_parameters(config: LlavaConfig) -> int:
    """Parameters of the model fastllava builds for `config`, counted on the meta device (nothing
    allocated). The tower holds only the layers it runs (feature layer -2 skips the last one)."""
    from fastllava.models.llava import LlavaModel

    with torch.device("meta"):
        model = LlavaModel(config)
    return sum(p.numel() for p in model.parameters())
