"""quantization="fp8": what is quantized, how it streams in, pre-quantized checkpoints
(compressed-tensors FP8-dynamic), the flags. Strict loading: tests/test_fp8_strict.py;
accuracy: tests/test_fp8_accuracy.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fp8_checkpoint as ck
from fastllava import LLaVA
from fastllava.models.layers import Fp8Linear
from fastllava.weights import convert_checkpoint, loader

PROMPT = {"prompt": "what is in this image", "max_tokens": 8, "temperature": 0}
NUM_DECODER_LINEARS = 2 * 4          # tiny: 2 layers x (qkv, o, gate_up, down)
LINEAR_KEYS_PER_LAYER = 7            # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "image.png"
    Image.new("RGB", (60, 40), (200, 10, 10)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def prequantized(tiny_next, tmp_path_factory):
    return ck.fp8_dynamic(tiny_next, tmp_path_factory.mktemp("fp8") / "ckpt")


def _load(path, **kwargs) -> LLaVA:
    return LLaVA.from_pretrained(path, device="cpu", dtype="float32", **kwargs)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _expected_fp8_rows(tensors: dict, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fused parameter → (FP8 weight, scales) the checkpoint's own tensors quantize to."""
    pre = f"language_model.model.layers.{layer}."
    parts = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "self_attn.o_proj": ["self_attn.o_proj"], "mlp.down_proj": ["mlp.down_proj"],
             "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"]}
    out = {}
    for fused, names in parts.items():
        q = [ck.quantize_channels(tensors[pre + n + ".weight"]) for n in names]
        out[fused] = torch.cat([w for w, _ in q]), torch.cat([s for _, s in q])
    return out


def test_dynamic_fp8_quantizes_decoder_linears_only(tiny_next):
    llava = _load(tiny_next, quantization="fp8")
    try:
        model, tensors = llava.model, ck.read_tensors(tiny_next)
        fp8 = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
        assert len(fp8) == NUM_DECODER_LINEARS and all(
            n.startswith("language_model.layers.") for n in fp8), sorted(fp8)
        kept = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        assert any(n.startswith("vision_tower.") for n in kept) and "lm_head" in kept
        assert "multi_modal_projector.linear_1" in kept
        others = {p.dtype for n, p in model.named_parameters()
                  if n.rsplit(".", 1)[0] not in fp8}
        assert others == {torch.float32}
        for layer in range(2):
            for fused, (w, s) in _expected_fp8_rows(tensors, layer).items():
                mod = fp8[f"language_model.layers.{layer}.{fused}"]
                assert torch.equal(_bits(mod.weight), _bits(w)), fused
                assert torch.equal(mod.weight_scale, s), fused
        # One byte per decoder weight (+ one fp32 scale per output channel), allocated as such.
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in fp8.values())
        assert nbytes == sum(t.numel() for k, t in tensors.items() if ck.DECODER_LINEAR.fullmatch(k))
        assert llava.quantization == "fp8"
        llava.generate({"image_url": _image_data(), **PROMPT})
    finally:
        llava.close()


def _image_data() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (0, 90, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_weights_are_quantized_one_checkpoint_tensor_at_a_time(tiny_next, monkeypatch):
    """Streaming: each floating decoder tensor is quantized alone, as it is read (never a fused
    or whole-model float copy): one call per checkpoint tensor, with that tensor's shape."""
    seen, quantize = [], loader.quantize_fp8_rows
    monkeypatch.setattr(loader, "quantize_fp8_rows",
                        lambda t: seen.append(tuple(t.shape)) or quantize(t))
    _load(tiny_next, quantization="fp8").close()
    tensors = ck.read_tensors(tiny_next)
    expected = sorted(tuple(t.shape) for k, t in tensors.items() if ck.DECODER_LINEAR.fullmatch(k))
    assert len(seen) == 2 * LINEAR_KEYS_PER_LAYER and sorted(seen) == expected


@pytest.mark.parametrize("layout", ["hf5", "hf4", "hf5_modules"])
def test_prequantized_checkpoint_loads_as_its_dynamic_twin(tiny_next, prequantized, image,
                                                           tmp_path, layout):
    """The FP8-dynamic checkpoint loads as FP8 without being asked (its config says so), holds
    exactly the stored FP8 bytes and scales, and generates what quantizing at load gives."""
    path = prequantized if layout == "hf5" else convert_checkpoint(prequantized, layout,
                                                                   tmp_path / layout)
    stored = ck.read_tensors(prequantized)
    pre, dyn = _load(path), _load(tiny_next, quantization="fp8")
    try:
        assert pre.quantization == "fp8"
        qkv = pre.model.language_model.layers[1].self_attn.qkv_proj
        k = stored["language_model.model.layers.1.self_attn.k_proj.weight"]
        assert torch.equal(_bits(qkv.weight[64:96]), _bits(k))
        assert torch.equal(qkv.weight_scale[64:96],
                           stored["language_model.model.layers.1.self_attn.k_proj.weight_scale"])
        for (name, a), b in zip(pre.model.named_parameters(), dyn.model.parameters()):
            assert torch.equal(_bits(a), _bits(b)), name
        request = {"image_url": image, **PROMPT}
        assert pre.generate_ids(request) == dyn.generate_ids(request)
    finally:
        pre.close()
        dyn.close()


def test_prequantized_bf16_scales_load_exactly(tiny_next, tmp_path):
    path = ck.fp8_dynamic(tiny_next, tmp_path / "ckpt", scale_dtype=torch.bfloat16)
    llava = _load(path, quantization="fp8")
    try:
        scale = llava.model.language_model.layers[0].mlp.down_proj.weight_scale
        stored = ck.read_tensors(path)["language_model.model.layers.0.mlp.down_proj.weight_scale"]
        assert scale.dtype == torch.float32 and torch.equal(scale, stored.float())
    finally:
        llava.close()


def test_cli_and_server_flags(monkeypatch, tmp_path):
    from fastllava import cli, cli_run

    class Model:
        def stream(self, request, image=None):
            return iter([])

    calls = []
    monkeypatch.setattr(cli_run, "_fetch_image", lambda src: None)
    monkeypatch.setattr(cli_run, "_load_model", lambda *a: calls.append(a) or Model())
    assert cli.main(["run", "--model", "m", "--image", "x.png", "--prompt", "hi",
                     "--quantization", "fp8"]) == 0
    assert calls[0][-1] == "fp8"
    parser = cli.build_parser()
    serve = parser.parse_args(["serve", "--model", "m", "--quantization", "fp8"])
    assert cli.settings_from_args(serve).quantization == "fp8"
    assert cli.settings_from_args(parser.parse_args(["serve", "--model", "m"])).quantization \
        is None
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", "m", "--quantization", "int8"])


def test_a_gpu_without_fp8_is_refused_before_loading(tiny_next, monkeypatch):
    from fastllava import loading

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(loading, "load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*A100 is 8.0"):
        loading.load_checkpoint(str(tiny_next), device=torch.device("cuda"), dtype=torch.bfloat16,
                                quantization="fp8")


def test_random_fp8_model_for_benchmarks(tiny_next):
    """weights/random.py (bench/decode.py --quantization fp8): FP8 weights drawn like the others
    (N(0, 0.02), then quantized per row), scales set with them, the rest untouched."""
    from fastllava.config import load_config
    from fastllava.weights.random import INIT_STD, random_model

    model = random_model(load_config(tiny_next), "cpu", torch.float32, quantization="fp8")
    fp8 = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == NUM_DECODER_LINEARS
    for m in fp8:
        w = m.weight.float() * m.weight_scale
        assert (m.weight_scale > 0).all() and abs(w.std().item() - INIT_STD) < 0.2 * INIT_STD
        assert m.weight.float().abs().amax(dim=1).eq(448).all()
    assert model.lm_head.weight.dtype == torch.float32


def test_chunked_quantization_changes_no_bit(tiny_next, monkeypatch):
    """Large tensors are quantized a chunk of rows at a time (bounded device temporaries); rows
    are independent, so 3-row chunks give exactly the one-chunk result."""
    whole = _load(tiny_next, quantization="fp8")
    monkeypatch.setattr(loader, "_QUANT_CHUNK_ELEMENTS", 3 * 128)
    chunked = _load(tiny_next, quantization="fp8")
    try:
        for (name, a), b in zip(whole.model.named_parameters(), chunked.model.parameters()):
            assert torch.equal(_bits(a), _bits(b)), name
    finally:
        whole.close()
        chunked.close()


@pytest.mark.gpu
def test_cuda_graphs_replay_the_fp8_decoder(tiny_next, image):
    """On an FP8 GPU (bf16 model, Triton kernels): decode steps replayed from CUDA graphs give the
    tokens the same engine gives without graphs (the per-token activation quantization is all
    on-device, no host sync)."""
    from fastllava.runtime.config import RuntimeConfig

    outs = []
    for graphs in (True, False):
        llava = LLaVA.from_pretrained(tiny_next, device="cuda", dtype="bfloat16",
                                      quantization="fp8",
                                      runtime=RuntimeConfig(kv_cache_tokens=8192,
                                                            cuda_graphs=graphs))
        try:
            assert (llava.engine.runner.graphs is not None) == graphs
            outs.append(llava.generate_ids({"image_url": image, **PROMPT}))
        finally:
            llava.close()
    assert outs[0] == outs[1] and len(outs[0]) > 0
