"""Tiny random LLaVA checkpoints built on the fly with transformers (llava-reference.md §8).

Nothing is downloaded: a sentencepiece BPE tokenizer is trained on a generated corpus, the
models are random, and every layout fastllava accepts is written from the same weights so that
parity tests can compare the engine on any layout with transformers on the hf5 one.

    spec = Spec(kind="next", vision="clip", template="vicuna")
    path = build(spec, tmp_dir)            # hf5 layout, the one transformers loads back
    orig = convert_checkpoint(path, "original", tmp_dir2)   # fastllava.weights.layouts
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

# Image / pad / chat-marker ids follow the 400 sentencepiece pieces; the model vocab is padded
# to 448 so lm_head can emit ids the tokenizer doesn't know (as the real checkpoints can).
SPM_VOCAB = 400
MODEL_VOCAB = 448
IMAGE_TOKEN_ID = 400
PAD_TOKEN_ID = 401
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]

VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ ' [/INST]' }}{% endif %}{% endfor %}"
)
TEMPLATES = {"vicuna": VICUNA_TEMPLATE, "chatml": CHATML_TEMPLATE, "mistral": MISTRAL_TEMPLATE}

_WORDS = (
    "the a an image picture photo shows cat dog red blue green small large sky tree house car "
    "what is in this describe detail person man woman child street water light dark two three "
    "USER ASSISTANT system answer question please color shape left right top bottom near far "
    "über café naïve 東京 猫 😀 ok yes no, . ! ? : ; ' \" ( ) 0 1 2 3 42 1999"
).split()


@dataclasses.dataclass(frozen=True)
class Spec:
    kind: str = "next"          # "llava" (1.5) | "next" (1.6 anyres)
    vision: str = "clip"        # "clip" | "siglip"
    template: str | None = "vicuna"  # key of TEMPLATES, or None to ship no chat template
    num_heads: int = 4
    num_kv_heads: int = 2       # 4 = MHA (LLaVA-1.5 style), 2 = GQA
    text_model: str = "llama"   # "llama" | "mistral" | "qwen2"
    rope_theta: float = 10000.0
    seed: int = 0
    feature_layer: int | tuple[int, ...] | None = None  # None: -2 (CLIP) / -1 (SigLIP)
    strategy: str | None = None                          # None: "default" (CLIP) / "full" (SigLIP)
    head_dim: int | None = None                          # None: hidden / heads
    hidden_size: int = 64       # text model width (benchmarks build larger ones, e.g. 512)
    intermediate_size: int = 128
    num_layers: int = 2
    image_size: int = 56        # vision tile side (LLaVA-1.5 only; 336 = the real 576 image tokens)
    # Extra config fields, as (name, value) pairs (the Spec stays hashable): of the text config,
    # of the vision config, of the top-level Llava(Next)Config, of the image processor.
    text_extra: tuple = ()
    vision_extra: tuple = ()
    llava_extra: tuple = ()
    processor_extra: tuple = ()
    # transformers initializes every bias to 0 and every norm weight to 1, so a bias or norm
    # weight the engine dropped would go unseen: True draws them at random too.
    perturb: bool = False


def corpus_lines(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def train_spm(out_dir: Path) -> Path:
    """A byte-fallback BPE sentencepiece model like Llama's (ids: unk 0, bos 1, eos 2)."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=SPM_VOCAB,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, normalization_rule_name="identity", minloglevel=2,
    )
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink()
    return out_dir / "tokenizer.model"


def hf_tokenizer(spm_path: Path, template: str | None):
    """The transformers (tokenizers-backed) LlamaTokenizer equal to the sentencepiece model."""
    import sentencepiece as spm
    from transformers import AddedToken, LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), legacy=False,
                         add_prefix_space=True)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    if template == "chatml":
        tok.add_tokens([AddedToken(t, special=True, normalized=False)
                        for t in ("<|im_start|>", "<|im_end|>")], special_tokens=True)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    assert tok.convert_tokens_to_ids("<pad>") == PAD_TOKEN_ID
    return tok


def _configs(spec: Spec):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig,
                              MistralConfig, Qwen2Config, SiglipVisionConfig)

    if spec.kind == "next" and spec.image_size != 56:
        raise ValueError("tiny LLaVA-NeXT checkpoints use 56 px tiles (PINPOINTS are in them)")
    if spec.vision == "clip":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, image_size=spec.image_size,
                                  patch_size=14, **dict(spec.vision_extra))
        layer, strategy = -2, "default"
    else:  # SigLIP: head_dim 12, no CLS, last layer's output, all tokens kept
        vision = SiglipVisionConfig(hidden_size=36, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=3, image_size=56, patch_size=14,
                                    **dict(spec.vision_extra))
        layer, strategy = -1, "full"
    layer = list(spec.feature_layer) if isinstance(spec.feature_layer, tuple) else (
        spec.feature_layer if spec.feature_layer is not None else layer)
    strategy = spec.strategy or strategy
    text_cls = {"mistral": MistralConfig, "qwen2": Qwen2Config}.get(spec.text_model, LlamaConfig)
    text = text_cls(**{**dict(
        vocab_size=MODEL_VOCAB, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, rms_norm_eps=1e-5,
        pad_token_id=PAD_TOKEN_ID, max_position_embeddings=4096,
        **({"head_dim": spec.head_dim} if spec.head_dim else {}),
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        **({"sliding_window": None} if spec.text_model == "mistral" else {})),
        **dict(spec.text_extra)})
    common = dict(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                  vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    if spec.kind == "llava":
        common["image_seq_length"] = (spec.image_size // 14) ** 2
    else:
        common["image_grid_pinpoints"] = PINPOINTS
    common.update(spec.llava_extra)
    return (LlavaConfig if spec.kind == "llava" else LlavaNextConfig)(**common)


def _processor(spec: Spec, tokenizer):
    from transformers import (CLIPImageProcessorPil, LlavaImageProcessorPil,
                              LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor,
                              SiglipImageProcessorPil)

    siglip = spec.vision == "siglip"
    kwargs = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if siglip else {}
    kwargs.update(size={"shortest_edge": spec.image_size},
                  crop_size={"height": spec.image_size, "width": spec.image_size})
    kwargs.update(spec.processor_extra)
    template = TEMPLATES[spec.template] if spec.template else None
    strategy = spec.strategy or ("full" if siglip else "default")
    if spec.kind == "llava":
        # do_pad (pad to a square of the mean colour first) is LlavaImageProcessor's; an exact
        # {"height", "width"} size without a crop is SiglipImageProcessor's (llava-interleave)
        if "height" in kwargs["size"]:
            kwargs.pop("crop_size")
            proc = SiglipImageProcessorPil(**kwargs)
        else:
            proc = (LlavaImageProcessorPil if "do_pad" in kwargs else CLIPImageProcessorPil)(**kwargs)
        return LlavaProcessor(image_processor=proc, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy=strategy,
                              num_additional_image_tokens=0 if siglip else 1,
                              chat_template=template)
    proc = LlavaNextImageProcessorPil(**{"image_grid_pinpoints": PINPOINTS, **kwargs})
    return LlavaNextProcessor(image_processor=proc, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy=strategy,
                              num_additional_image_tokens=0 if siglip else 1,
                              chat_template=template)


def build(spec: Spec, out_dir: Path, *, max_shard_size: str | None = "100KB") -> Path:
    """Write a tiny checkpoint in the layout transformers 5 saves (sharded unless told not to)."""
    import torch
    from transformers import (GenerationConfig, LlavaForConditionalGeneration,
                              LlavaNextForConditionalGeneration)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm_path = train_spm(out_dir / "_spm")
    tokenizer = hf_tokenizer(spm_path, spec.template)
    torch.manual_seed(spec.seed)
    config = _configs(spec)
    cls = LlavaForConditionalGeneration if spec.kind == "llava" else LlavaNextForConditionalGeneration
    model = cls(config).eval()
    if spec.perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
                elif "norm" in name:   # RMSNorm / LayerNorm weights (CLIP's pre_layrnorm too)
                    p.normal_(1.0, 0.2)
    eos = [2, tokenizer.convert_tokens_to_ids("<|im_end|>")] if spec.template == "chatml" else 2
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=eos,
                                               pad_token_id=PAD_TOKEN_ID)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    _processor(spec, tokenizer).save_pretrained(out_dir)
    shutil.copy(spm_path, out_dir / "tokenizer.model")
    shutil.rmtree(spm_path.parent)
    return out_dir


def load_reference(path: Path, dtype=None):
    """transformers' model (eager attention; fp32 unless told) and processor for a checkpoint."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype or torch.float32, attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(path)
