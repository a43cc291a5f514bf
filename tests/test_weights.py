"""fastllava.weights: layouts, discovery and the strict streaming loader on tiny checkpoints.

The expected parameter values are built here from the hf5 files transformers wrote, by an
independent little renaming + torch.cat (not through keymaps.py), and compared bit for bit after
loading every layout convert_checkpoint can write.
"""

from __future__ import annotations

import json
import pathlib
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastllava.weights import (LAYOUTS, CheckpointNotFoundError, UnknownKeyError, WeightLoadError,
                               canonical_name, convert_checkpoint, detect_layout,
                               list_safetensors, load_weights)
from fastllava.weights import loader as loader_mod

FIXTURES = ("tiny_next", "tiny_llava", "tiny_siglip")


# ---------------------------------------------------------------- a model following the contract
class Fused(nn.Module):
    """Rows of several projections stacked: shard j = rows [sum(sizes[:j]), sum(sizes[:j+1]))."""

    def __init__(self, in_features: int, output_sizes: tuple[int, ...], bias: bool):
        super().__init__()
        self.output_sizes = tuple(output_sizes)
        self.weight = nn.Parameter(torch.empty(sum(output_sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(output_sizes))) if bias else None


def _module(**children) -> nn.Module:
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


class TinyLlava(nn.Module):
    """Parameters only, named as the engine's model names them (see the loader's contract)."""

    def __init__(self, config: dict):
        super().__init__()
        vc, tc = config["vision_config"], config["text_config"]
        siglip = vc["model_type"].startswith("siglip")
        dv, iv, p = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
        num_patches = (vc["image_size"] // p) ** 2
        layer = config["vision_feature_layer"]
        self.num_vision_layers = vc["num_hidden_layers"] + 1 + layer if layer < 0 else layer
        emb = _module(patch_embedding=nn.Conv2d(3, dv, p, p, bias=siglip),
                      position_embedding=nn.Embedding(num_patches + (0 if siglip else 1), dv))
        if not siglip:
            emb.class_embedding = nn.Parameter(torch.empty(dv))
        vlayers = nn.ModuleList(_module(
            layer_norm1=nn.LayerNorm(dv), layer_norm2=nn.LayerNorm(dv),
            self_attn=_module(qkv_proj=Fused(dv, (dv, dv, dv), True), out_proj=nn.Linear(dv, dv)),
            mlp=_module(fc1=nn.Linear(dv, iv), fc2=nn.Linear(iv, dv)),
        ) for _ in range(self.num_vision_layers))
        self.vision_tower = _module(embeddings=emb, layers=vlayers)
        if not siglip:
            self.vision_tower.pre_layrnorm = nn.LayerNorm(dv)
        h, i, v = tc["hidden_size"], tc["intermediate_size"], tc["vocab_size"]
        nh, nkv = tc["num_attention_heads"], tc["num_key_value_heads"]
        hd = tc.get("head_dim") or h // nh
        self.multi_modal_projector = _module(linear_1=nn.Linear(dv, h), linear_2=nn.Linear(h, h))
        if config["model_type"] == "llava_next":
            self.image_newline = nn.Parameter(torch.empty(h))
        norm = lambda: _module(weight=nn.Parameter(torch.empty(h)))  # noqa: E731 (RMSNorm weight)
        self.language_model = _module(
            embed_tokens=nn.Embedding(v, h), norm=norm(),
            layers=nn.ModuleList(_module(
                input_layernorm=norm(), post_attention_layernorm=norm(),
                self_attn=_module(qkv_proj=Fused(h, (nh * hd, nkv * hd, nkv * hd), False),
                                  o_proj=nn.Linear(nh * hd, h, bias=False)),
                mlp=_module(gate_up_proj=Fused(h, (i, i), False),
                            down_proj=nn.Linear(i, h, bias=False)),
            ) for _ in range(tc["num_hidden_layers"])))
        self.lm_head = nn.Linear(h, v, bias=False)

    def is_unused_weight(self, name: str) -> bool:
        parts = name.split(".")
        if name.startswith("vision_tower.layers."):
            return int(parts[2]) >= self.num_vision_layers
        return name.startswith(("vision_tower.post_layernorm.", "vision_tower.head."))


def make_model(ckpt: pathlib.Path, dtype=torch.float32, device="cpu") -> TinyLlava:
    """Allocated on meta then to_empty (as the engine does), filled with NaN to expose gaps."""
    with torch.device("meta"):
        model = TinyLlava(json.loads((ckpt / "config.json").read_text()))
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model


def expected_params(hf5: pathlib.Path) -> dict[str, torch.Tensor]:
    """Canonical name → tensor from the hf5 files, renamed and fused independently of keymaps."""
    raw = {}
    for file in sorted(hf5.glob("*.safetensors")):
        raw.update(load_file(file))
    out = {}
    for key, t in raw.items():
        if key.startswith("language_model.model."):
            key = "language_model." + key[len("language_model.model."):]
        elif key == "language_model.lm_head.weight":
            key = "lm_head.weight"
        out[key.replace("vision_tower.encoder.layers.", "vision_tower.layers.")] = t
    for name in list(out):
        for fused, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")),
                             ("gate_up_proj", ("gate_proj", "up_proj"))):
            if f".{parts[0]}." in name:
                out[name.replace(parts[0], fused)] = torch.cat(
                    [out.pop(name.replace(parts[0], part)) for part in parts])
    return out


def assert_loaded_exactly(model: TinyLlava, hf5: pathlib.Path, dtype=torch.float32) -> None:
    expected = expected_params(hf5)
    got = dict(model.named_parameters())
    extra = sorted(n for n in expected if n not in got)
    assert all(model.is_unused_weight(n) for n in extra), extra
    assert sorted(set(got) - set(expected)) == [], "model params absent from the checkpoint"
    bad = [n for n, p in got.items() if not torch.equal(p, expected[n].to(dtype))]
    assert not bad, f"{len(bad)} params differ, e.g. {bad[:5]}"


# ---------------------------------------------------------------- every layout loads identically
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fixture", FIXTURES)
def test_every_layout_loads_identical_tensors(request, tmp_path, fixture, layout):
    src = request.getfixturevalue(fixture)
    shard = fixture != "tiny_llava"  # tiny_llava: single model.safetensors; others sharded
    dst = convert_checkpoint(src, layout, tmp_path / layout, shard=shard)
    names = list_safetensors(dst)
    assert ((dst / "model.safetensors.index.json").is_file()) == shard
    assert detect_layout(names) == layout
    model = make_model(src)
    load_weights(model, [(dst, layout, "")], dtype=torch.float32, device="cpu")
    assert_loaded_exactly(model, src)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_source_fixture_loads_as_hf5(request, fixture):
    src = request.getfixturevalue(fixture)
    assert detect_layout(list_safetensors(src)) == "hf5"
    model = make_model(src)
    load_weights(model, [(src, "hf5", "")], dtype=torch.float32, device="cpu")
    assert_loaded_exactly(model, src)


def test_fused_slices_are_the_source_projections(tiny_next, tmp_path):
    dst = convert_checkpoint(tiny_next, "original", tmp_path / "o")
    model = make_model(tiny_next)
    load_weights(model, [(dst, "original", "")], dtype=torch.float32, device="cpu")
    raw = {}
    for f in tiny_next.glob("*.safetensors"):
        raw.update(load_file(f))
    lm = "language_model.model.layers.1."
    qkv = model.language_model.layers[1].self_attn.qkv_proj.weight  # q 64 rows, k 32, v 32 (GQA)
    assert model.language_model.layers[1].self_attn.qkv_proj.output_sizes == (64, 32, 32)
    assert torch.equal(qkv[:64], raw[lm + "self_attn.q_proj.weight"])
    assert torch.equal(qkv[64:96], raw[lm + "self_attn.k_proj.weight"])
    assert torch.equal(qkv[96:], raw[lm + "self_attn.v_proj.weight"])
    gate_up = model.language_model.layers[1].mlp.gate_up_proj.weight
    assert torch.equal(gate_up[:128], raw[lm + "mlp.gate_proj.weight"])
    assert torch.equal(gate_up[128:], raw[lm + "mlp.up_proj.weight"])
    vb = model.vision_tower.layers[0].self_attn.qkv_proj.bias
    assert torch.equal(vb[32:64], raw["vision_tower.encoder.layers.0.self_attn.k_proj.bias"])


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_siglip"])
def test_v15_original_with_separate_clip_folder(request, tmp_path, fixture):
    src = request.getfixturevalue(fixture)
    dst = convert_checkpoint(src, "original", tmp_path / "llava", drop_vision=True)
    config = json.loads((dst / "config.json").read_text())
    vision = pathlib.Path(config["mm_vision_tower"])
    assert vision == (tmp_path / "llava-vision").resolve()
    assert not any(k.startswith("model.vision_tower") for k in list_safetensors(dst))
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["model_type"] == "llava"
    assert (config["image_aspect_ratio"], config["mm_projector_type"]) == ("pad", "mlp2x_gelu")
    vconfig = json.loads((vision / "config.json").read_text())
    assert vconfig["model_type"] == ("siglip" if fixture == "tiny_siglip" else "clip")
    assert (vision / "preprocessor_config.json").is_file()
    vnames = list_safetensors(vision)
    assert detect_layout(vnames) == "clip"
    assert {"logit_scale", "text_model.final_layer_norm.weight"} <= set(vnames)
    model = make_model(src)
    load_weights(model, [(dst, "original", ""), (vision, "clip", "vision_tower.")],
                 dtype=torch.float32, device="cpu")
    assert_loaded_exactly(model, src)
    # Without the tower source the vision parameters are reported, by name.
    with pytest.raises(WeightLoadError, match=r"never assigned[\s\S]*vision_tower.layers.0"):
        load_weights(make_model(src), [(dst, "original", "")], dtype=torch.float32, device="cpu")


def test_v16_original_config_and_config_only_tower_folder(tiny_next, tmp_path):
    dst = convert_checkpoint(tiny_next, "original", tmp_path / "v16")
    config = json.loads((dst / "config.json").read_text())
    src_config = json.loads((tiny_next / "config.json").read_text())
    assert config["image_aspect_ratio"] == "anyres"
    assert config["mm_patch_merge_type"] == "spatial_unpad"
    assert config["image_grid_pinpoints"] == src_config["image_grid_pinpoints"]
    assert (config["mm_vision_select_layer"], config["mm_vision_select_feature"]) == (-2, "patch")
    assert config["mm_hidden_size"] == 32 and config["num_key_value_heads"] == 2
    assert config["rope_theta"] == 10000.0 and "text_config" not in config
    for name in ("tokenizer.json", "tokenizer.model", "chat_template.jinja",
                 "generation_config.json", "processor_config.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (tiny_next / name).read_bytes(), name
    vision = pathlib.Path(config["mm_vision_tower"])
    assert json.loads((vision / "config.json").read_text())["vision_config"]["hidden_size"] == 32
    with pytest.raises(CheckpointNotFoundError, match="no \\*.safetensors"):
        list_safetensors(vision)  # the tower's weights are inside the v1.6 checkpoint
    # Loading the tower twice (from the checkpoint and a CLIP folder) is refused.
    v15 = convert_checkpoint(tiny_next, "original", tmp_path / "v15", drop_vision=True)
    v15_vision = pathlib.Path(json.loads((v15 / "config.json").read_text())["mm_vision_tower"])
    with pytest.raises(WeightLoadError,
                       match=r"assigned twice \(37\)[\s\S]*embeddings.class_embedding"):
        load_weights(make_model(tiny_next), [(dst, "original", ""),
                                             (v15_vision, "clip", "vision_tower.")],
                     dtype=torch.float32, device="cpu")


# ---------------------------------------------------------------- key maps
def test_canonical_names():
    cases = {
        ("language_model.model.layers.3.self_attn.k_proj.weight", "hf4"):
            ("language_model.layers.3.self_attn.qkv_proj.weight", 1),
        ("model.layers.0.mlp.up_proj.weight", "original"):
            ("language_model.layers.0.mlp.gate_up_proj.weight", 1),
        ("model.layers.0.mlp.down_proj.weight", "original"):
            ("language_model.layers.0.mlp.down_proj.weight", None),
        ("model.mm_projector.2.bias", "original"): ("multi_modal_projector.linear_2.bias", None),
        ("model.vision_tower.vision_tower.vision_model.encoder.layers.23.self_attn.v_proj.bias",
         "original"): ("vision_tower.layers.23.self_attn.qkv_proj.bias", 2),
        ("vision_tower.vision_model.pre_layrnorm.weight", "hf4"):
            ("vision_tower.pre_layrnorm.weight", None),
        ("model.image_newline", "hf5_modules"): ("image_newline", None),
        ("lm_head.weight", "hf5_modules"): ("lm_head.weight", None),
        ("language_model.lm_head.weight", "hf5"): ("lm_head.weight", None),
        ("vision_model.embeddings.patch_embedding.weight", "clip"):
            ("embeddings.patch_embedding.weight", None),
        ("vision_model.encoder.layers.5.self_attn.q_proj.weight", "clip"):
            ("layers.5.self_attn.qkv_proj.weight", 0),
    }
    for (key, layout), want in cases.items():
        assert canonical_name(key, layout) == want, (key, layout)
    ignored = [("model.layers.0.self_attn.rotary_emb.inv_freq", "original"),
               ("model.language_model.rotary_emb.inv_freq", "hf5_modules"),
               ("vision_tower.post_layernorm.weight", "hf5"),
               ("vision_tower.vision_model.embeddings.position_ids", "hf4"),
               ("vision_tower.head.attention.in_proj_weight", "hf5"),
               ("model.vision_tower.vision_tower.vision_model.post_layernorm.bias", "original"),
               ("text_model.encoder.layers.0.mlp.fc1.weight", "clip"), ("logit_scale", "clip"),
               ("visual_projection.weight", "clip"), ("vision_model.head.probe", "clip")]
    for key, layout in ignored:
        assert canonical_name(key, layout) is None, (key, layout)
    with pytest.raises(UnknownKeyError, match="vision_tower.embeddings.class_embedding.*hf4"):
        canonical_name("vision_tower.embeddings.class_embedding", "hf4")
    with pytest.raises(ValueError, match="unknown checkpoint layout 'hf3'"):
        canonical_name("lm_head.weight", "hf3")


def test_detect_layout_errors():
    lm_only = ["language_model.model.norm.weight", "language_model.lm_head.weight"]
    assert detect_layout(lm_only) == "hf4"  # hf4 and hf5 agree on every key: either is right
    with pytest.raises(ValueError, match="no tensors"):
        detect_layout([])
    with pytest.raises(ValueError, match=r"unknown checkpoint layout.*'foo.weight'"):
        detect_layout(["foo.weight", "bar.bias"])
    with pytest.raises(ValueError, match=r"closest is 'original'.*'mystery.weight'"):
        detect_layout(["model.embed_tokens.weight", "model.norm.weight", "mystery.weight"])
    mixed = ["language_model.model.norm.weight", "vision_tower.vision_model.pre_layrnorm.weight",
             "vision_tower.pre_layrnorm.bias"]  # hf4 and hf5 tower keys in one checkpoint
    with pytest.raises(ValueError, match="fit no single layout"):
        detect_layout(mixed)


# ---------------------------------------------------------------- strictness: errors name the thing
@pytest.fixture
def single_file(tiny_llava, tmp_path):
    """A writable single-file hf5 copy of tiny_llava and a function editing its tensors."""
    dst = convert_checkpoint(tiny_llava, "hf5", tmp_path / "ckpt", shard=False)

    def edit(fn):
        tensors = load_file(dst / "model.safetensors")
        fn(tensors)
        save_file(tensors, dst / "model.safetensors")
        return dst

    return dst, edit


def _load(ckpt, src, layout="hf5", **kw):
    load_weights(make_model(src, **kw), [(ckpt, layout, "")], dtype=kw.get("dtype", torch.float32),
                 device="cpu")


def test_missing_tensor_is_named(single_file, tiny_llava):
    ckpt, edit = single_file
    edit(lambda t: t.pop("language_model.model.norm.weight"))
    with pytest.raises(WeightLoadError,
                       match=r"never assigned \(1\):\n    language_model.norm.weight$"):
        _load(ckpt, tiny_llava)


def test_missing_fused_shard_is_named(single_file, tiny_llava):
    ckpt, edit = single_file
    edit(lambda t: t.pop("language_model.model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"never assigned \(1\):\n    "
                       r"language_model.layers.1.self_attn.qkv_proj.weight\[k_proj\]$"):
        _load(ckpt, tiny_llava)


def test_unexpected_tensors_are_named(single_file, tiny_llava):
    ckpt, edit = single_file

    def add(t):
        t["language_model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)  # no such bias
        t["vision_tower.mystery.weight"] = torch.zeros(3)                            # no rule
    edit(add)
    with pytest.raises(WeightLoadError) as info:
        _load(ckpt, tiny_llava)
    msg = str(info.value)
    assert "unexpected checkpoint tensors (2)" in msg, msg
    assert "'language_model.model.layers.0.self_attn.q_proj.bias' (model.safetensors) → " \
           "language_model.layers.0.self_attn.qkv_proj.bias: the model has no such parameter" in msg
    assert "'vision_tower.mystery.weight' (model.safetensors): no rule of layout 'hf5'" in msg
    assert "never assigned" not in msg, msg


def test_mis_shaped_tensor_is_named(single_file, tiny_llava):
    ckpt, edit = single_file
    edit(lambda t: t.update({
        "multi_modal_projector.linear_1.weight": torch.zeros(64, 31),
        "language_model.model.layers.0.mlp.up_proj.weight": torch.zeros(127, 64)}))
    with pytest.raises(WeightLoadError) as info:
        _load(ckpt, tiny_llava)
    msg = str(info.value)
    assert "'multi_modal_projector.linear_1.weight' (model.safetensors) → " \
           "multi_modal_projector.linear_1.weight: expected [64, 32], got [64, 31]" in msg, msg
    assert "language_model.layers.0.mlp.gate_up_proj.weight[up_proj]: expected [128, 64], " \
           "got [127, 64]" in msg, msg
    assert "never assigned" not in msg, msg  # a mis-shaped tensor is reported once


def test_pre_fused_tensor_fills_every_shard(single_file, tiny_llava):
    ckpt, edit = single_file
    pre = "language_model.model.layers.0.self_attn."

    def fuse(t):
        t[pre + "qkv_proj.weight"] = torch.cat([t.pop(pre + p + "_proj.weight") for p in "qkv"])
    edit(fuse)
    model = make_model(tiny_llava)
    load_weights(model, [(ckpt, "hf5", "")], dtype=torch.float32, device="cpu")
    assert_loaded_exactly(model, tiny_llava)
    edit(lambda t: t.update({pre + "k_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(WeightLoadError, match=r"assigned twice \(1\):\n    language_model.layers.0."
                       r"self_attn.qkv_proj.weight\[k_proj\] from"):
        _load(ckpt, tiny_llava)


def test_unused_vision_layers_need_is_unused_weight(tiny_llava):
    model = make_model(tiny_llava)
    model.is_unused_weight = None  # a model without the hook must take every checkpoint tensor
    with pytest.raises(WeightLoadError, match=r"'vision_tower.encoder.layers.2.mlp.fc1.bias'.*"
                       r"vision_tower.layers.2.mlp.fc1.bias: the model has no such parameter"):
        load_weights(model, [(tiny_llava, "hf5", "")], dtype=torch.float32, device="cpu")


def test_dtype_and_device_mismatches_are_refused(tiny_llava):
    with pytest.raises(WeightLoadError) as info:
        load_weights(make_model(tiny_llava), [(tiny_llava, "hf5", "")], dtype=torch.float16,
                     device="cpu")
    msg = str(info.value)
    assert "dtype / device mismatches (48):\n    vision_tower.embeddings.class_embedding is " \
           "torch.float32, but loading in torch.float16" in msg, msg
    assert "never assigned" not in msg, msg  # each parameter is reported once
    with torch.device("meta"):  # never materialised: copy_ into meta would silently do nothing
        model = TinyLlava(json.loads((tiny_llava / "config.json").read_text()))
    with pytest.raises(WeightLoadError, match=r"\(48\):\n    vision_tower.embeddings."
                                              r"class_embedding is on meta, but loading to cpu"):
        load_weights(model, [(tiny_llava, "hf5", "")], dtype=torch.float32, device="cpu")


def test_index_naming_missing_shard_file(tiny_next, tmp_path):
    dst = convert_checkpoint(tiny_next, "hf4", tmp_path / "ckpt")
    (dst / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"names shard file\(s\) "
                                                      r"\['model-00002-of-00003.safetensors'\]"):
        list_safetensors(dst)
    with pytest.raises(CheckpointNotFoundError, match="model-00002-of-00003"):
        load_weights(make_model(tiny_next), [(dst, "hf4", "")], dtype=torch.float32, device="cpu")


def test_index_naming_tensor_absent_from_its_shard(tiny_next, tmp_path):
    dst = convert_checkpoint(tiny_next, "hf5", tmp_path / "ckpt")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    wrong = next(f for f in sorted(set(wm.values())) if f != wm["image_newline"])
    wm["image_newline"] = wrong
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    # A damaged index is found by discovery, before any model or weight is touched.
    with pytest.raises(CheckpointNotFoundError, match=rf"model.safetensors.index.json: it lists "
                       rf"tensor 'image_newline' in {wrong}, which does not hold it"):
        load_weights(make_model(tiny_next), [(dst, "hf5", "")], dtype=torch.float32, device="cpu")


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointNotFoundError, match=rf"no \*.safetensors weights in {tmp_path}; "
                       r"found \['pytorch_model.bin'\]: .bin/.pt \(pickle\) checkpoints are not "
                       r"supported"):
        list_safetensors(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        list_safetensors(tmp_path / "nope")


def test_list_safetensors_without_index(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "part-1.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "part-2.safetensors")
    assert list_safetensors(tmp_path) == {"a": tmp_path / "part-1.safetensors",
                                          "b": tmp_path / "part-2.safetensors"}
    save_file({"a": torch.zeros(2)}, tmp_path / "part-3.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="'a' is in both part-1.safetensors and "
                                                      "part-3.safetensors"):
        list_safetensors(tmp_path)


# ---------------------------------------------------------------- dtype, streaming, progress
def test_fp32_checkpoint_into_fp16_params(tiny_next, tmp_path):
    dst = convert_checkpoint(tiny_next, "hf5_modules", tmp_path / "m")
    model = make_model(tiny_next, dtype=torch.float16)
    load_weights(model, [(dst, "hf5_modules", "")], dtype=torch.float16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert_loaded_exactly(model, tiny_next, dtype=torch.float16)


@pytest.mark.gpu
def test_fp32_checkpoint_onto_cuda_bf16(tiny_next):
    """Host → device with the cast done on the device; "cuda" matches params on cuda:0."""
    model = make_model(tiny_next, dtype=torch.bfloat16, device="cuda")
    load_weights(model, [(tiny_next, "hf5", "")], dtype=torch.bfloat16, device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert_loaded_exactly(model.cpu(), tiny_next, dtype=torch.bfloat16)


def test_streams_one_tensor_at_a_time(tiny_next, tmp_path, monkeypatch):
    """Every tensor comes from safe_open().get_tensor, and none is alive when the next is read."""
    real_safe_open = loader_mod.safe_open
    alive: list[weakref.ref] = []
    overlaps: list[tuple[str, int]] = []
    reads: list[str] = []

    class Spy:
        def __init__(self, *args, **kwargs):
            self._f = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def get_tensor(self, key):
            live = sum(r() is not None for r in alive)
            if live:
                overlaps.append((key, live))
            t = self._inner.get_tensor(key)
            alive.append(weakref.ref(t))
            reads.append(key)
            return t

    monkeypatch.setattr(loader_mod, "safe_open", Spy)
    dst = convert_checkpoint(tiny_next, "original", tmp_path / "o")
    calls: list[tuple[int, int]] = []
    model = make_model(tiny_next)
    load_weights(model, [(dst, "original", "")], dtype=torch.float32, device="cpu",
                 progress=lambda done, total: calls.append((done, total)))
    assert not overlaps, f"tensors still alive when reading the next: {overlaps[:5]}"
    loaded = [k for k in list_safetensors(dst) if canonical_name(k, "original") is not None
              and not model.is_unused_weight(canonical_name(k, "original")[0])]
    assert sorted(reads) == sorted(loaded)
    assert calls == [(i + 1, len(loaded)) for i in range(len(loaded))]
    assert_loaded_exactly(model, tiny_next)
