"""preprocess / anyres vs transformers 5.23's PIL processors: bit-identical pixels, same token counts.

References: the tiny checkpoints' own processors (CLIPImageProcessorPil / LlavaNextImageProcessorPil
at 56 px, reloaded by AutoProcessor), the same classes at the real 336 px / real pinpoints, and
hub-style preprocessor_config.json files loaded by both sides.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from fastllava.preprocess.anyres import (anyres_grid, anyres_num_tokens, select_best_resolution,
                                         unpad_window)
from fastllava.preprocess.processor import (CLIP_MEAN, CLIP_STD, NEXT_PINPOINTS, ImageProcessorConfig,
                                            image_key, normalize_table, preprocess, rgbx_pixels)
from fastllava.preprocess.identity import key_tasks
from pil_reference import expand2square, reference_preprocess

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (width, height): extremes, 1-pixel sides, odd sizes, exact tile multiples and near misses.
SIZES = [(1, 1), (1, 2), (2, 1), (1, 500), (500, 1), (3, 1000), (1000, 3), (1, 57), (57, 1), (7, 7),
         (13, 29), (29, 13), (55, 56), (56, 55), (56, 56), (57, 57), (111, 56), (56, 111), (112, 112),
         (113, 57), (168, 56), (56, 168), (75, 100), (100, 75), (101, 203), (203, 101), (250, 250),
         (333, 77), (77, 333), (640, 480), (480, 640), (299, 301), (37, 180), (180, 37)]
MODES = ["RGB", "L", "RGBA", "LA", "PA", "P", "P+index-trns", "P+alpha-trns", "png-P+trns",
         "RGB+key-trns", "L+key-trns", "1", "I;16", "I", "F", "CMYK", "YCbCr"]


def make_image(w: int, h: int, mode: str, seed: int = 0) -> Image.Image:
    """A noise image of the given kind; alpha spans 0 (fully transparent) to 255."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha.flat[0], alpha.flat[-1] = 0, 255
    if mode in ("RGB", "L", "1", "CMYK", "YCbCr", "I"):
        return rgb if mode == "RGB" else rgb.convert(mode)
    if mode in ("RGBA", "LA"):
        img = rgb.convert(mode[:-1])
        img.putalpha(Image.fromarray(alpha))
        return img
    if mode == "PA":
        img = rgb.quantize(24).convert("PA")
        img.putalpha(Image.fromarray(alpha))
        return img
    if mode == "P":
        return rgb.quantize(64)
    if mode.startswith("P+") or mode == "png-P+trns":
        img = rgb.quantize(16)
        img.info["transparency"] = 3 if mode == "P+index-trns" else bytes(range(0, 256, 16))
        if mode == "png-P+trns":  # what a real transparent palette PNG decodes to
            buf = io.BytesIO()
            img.save(buf, "PNG", transparency=img.info["transparency"])
            img = Image.open(io.BytesIO(buf.getvalue()))
            assert img.mode == "P" and "transparency" in img.info
        return img
    if mode in ("RGB+key-trns", "L+key-trns"):
        img = rgb if mode.startswith("RGB") else rgb.convert("L")
        img.info["transparency"] = img.getpixel((0, 0))
        return img
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.uniform(-20, 300, (h, w)).astype(np.float32))
    raise AssertionError(mode)


def assert_same(ours: torch.Tensor, ref: torch.Tensor, what: str):
    assert ours.dtype == ref.dtype == torch.float32, (what, ours.dtype, ref.dtype)
    assert ours.shape == ref.shape, (what, tuple(ours.shape), tuple(ref.shape))
    if not torch.equal(ours, ref):
        diff = (ours != ref).nonzero()
        i = tuple(diff[0].tolist())
        raise AssertionError(f"{what}: {len(diff)} of {ref.numel()} values differ; first at {i}: "
                             f"ours {ours[i].item()!r} vs transformers {ref[i].item()!r}")


@pytest.fixture(scope="module")
def ref_llava(tiny_llava):
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(tiny_llava)
    assert type(proc.image_processor).__name__ == "CLIPImageProcessorPil"  # the parity target
    return proc


@pytest.fixture(scope="module")
def ref_next(tiny_next):
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(tiny_next)
    assert type(proc.image_processor).__name__ == "LlavaNextImageProcessorPil"
    return proc


def test_config_from_tiny_checkpoints(tiny_llava, tiny_next):
    llava = ImageProcessorConfig.from_dir(tiny_llava)
    assert llava == ImageProcessorConfig(56, 56, 56, CLIP_MEAN, CLIP_STD), llava
    nxt = ImageProcessorConfig.from_dir(tiny_next)
    assert nxt.pinpoints == tuple(map(tuple, tiny.PINPOINTS)), nxt.pinpoints
    assert ImageProcessorConfig.from_dir(tiny_next, pinpoints=[[56, 56]]).pinpoints == ((56, 56),)


# --- pixel parity ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["pil", "torch"])
@pytest.mark.parametrize("kind", ["llava", "next"])
def test_pixels_sizes_and_tokens_match_transformers(kind, backend, ref_llava, ref_next, tiny_llava, tiny_next):
    proc = ref_llava if kind == "llava" else ref_next
    cfg = ImageProcessorConfig.from_dir(tiny_llava if kind == "llava" else tiny_next)
    grids_hit = set()
    for n, (w, h) in enumerate(SIZES):
        # every size in RGB + RGBA, and each mode on a rotating subset of sizes
        modes = {"RGB", "RGBA", MODES[n % len(MODES)], MODES[(n + 7) % len(MODES)]}
        for mode in sorted(modes):
            img = make_image(w, h, mode, seed=n)
            what = f"{kind} {w}x{h} {mode}"
            ref = proc(images=img, text="<image>", return_tensors="pt")
            ours = preprocess(img, cfg, backend=backend)
            num_tokens = int((ref["input_ids"] == proc.image_token_id).sum())
            if kind == "llava":
                assert_same(ours.pixel_values, ref["pixel_values"], what)
                assert ours.grid is None and num_tokens == 16, (what, ours.grid, num_tokens)
            else:
                assert_same(ours.pixel_values, ref["pixel_values"][0], what)
                assert tuple(ref["image_sizes"][0].tolist()) == ours.image_size == (h, w), what
                rows, cols = ours.grid
                assert ours.pixel_values.shape[0] == 1 + rows * cols, what
                assert ours.grid == anyres_grid((h, w), cfg.pinpoints, 56), what
                assert anyres_num_tokens((h, w), cfg.pinpoints, 56, 14, 16) == num_tokens, (what, num_tokens)
                grids_hit.add(select_best_resolution((h, w), cfg.pinpoints))
    if kind == "next":
        assert grids_hit == set(cfg.pinpoints), f"pinpoints never chosen: {set(cfg.pinpoints) - grids_hit}"


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_matches_transformers(mode, ref_llava, tiny_llava):
    cfg = ImageProcessorConfig.from_dir(tiny_llava)
    for w, h in [(13, 29), (100, 75), (1, 1)]:
        img = make_image(w, h, mode, seed=w)
        ref = ref_llava.image_processor(img, return_tensors="pt")["pixel_values"]
        for backend in ("pil", "torch"):
            assert_same(preprocess(img, cfg, backend=backend).pixel_values, ref, f"{w}x{h} {mode} {backend}")


# --- the device (torch) and CPU (Pillow + numpy) paths vs today's PIL pipeline ---------------

SWEEP_CONFIGS = {
    "llava": ImageProcessorConfig(56, 56, 56, CLIP_MEAN, CLIP_STD),
    "next": ImageProcessorConfig(56, 56, 56, CLIP_MEAN, CLIP_STD, pinpoints=tuple(map(tuple, tiny.PINPOINTS))),
    "next-edge40": ImageProcessorConfig(40, 56, 56, CLIP_MEAN, CLIP_STD, pinpoints=((56, 112), (112, 56))),
    "llava-edge64-crop48x56": ImageProcessorConfig(64, 48, 56, CLIP_MEAN, CLIP_STD),
    "pad": ImageProcessorConfig(56, 56, 56, CLIP_MEAN, CLIP_STD, pad_to_square=True),
    "no-crop-bilinear": ImageProcessorConfig(56, 56, 56, CLIP_MEAN, CLIP_STD, do_center_crop=False, resample=2),
    "lanczos-no-normalize": ImageProcessorConfig(56, 56, 56, CLIP_MEAN, CLIP_STD, resample=1, do_normalize=False),
    "nearest-next": ImageProcessorConfig(56, 56, 56, CLIP_MEAN, CLIP_STD, resample=0, pinpoints=((56, 112), (112, 56))),
}
# Beyond SIZES: extreme aspect ratios both ways, where the height shrinks far more than the width
# (Pillow's vertical-first order) and big downscales (wide filters).
EXTRA_SIZES = [(2000, 3), (3, 2000), (40, 900), (900, 40), (150, 151), (57, 300), (700, 500)]
# Photo-sized and larger images through the real 336 px configs: the CPU path cuts their resizes
# into bands on threads, and for a center crop resizes only the kept window (a Pillow box, used
# only where it gives the same coefficients): 4000x3000 takes the box, 1920x1080 does not.
LARGE_SIZES = [(4000, 3000), (3000, 4000), (1920, 1080), (1024, 768), (4032, 3024), (6000, 400), (500, 5000)]


@pytest.mark.parametrize("backend", ["pil", "torch"])
@pytest.mark.parametrize("name", sorted(SWEEP_CONFIGS))
def test_both_paths_match_todays_pil_path(name, backend):
    cfg = SWEEP_CONFIGS[name]
    for n, (w, h) in enumerate(SIZES + EXTRA_SIZES):
        for mode in sorted({"RGB", MODES[n % len(MODES)]}):
            img = make_image(w, h, mode, seed=n)
            ref, ours = reference_preprocess(img, cfg), preprocess(img, cfg, backend=backend)
            what = f"{name} {backend} {w}x{h} {mode}"
            assert_same(ours.pixel_values, ref.pixel_values, what)
            assert (ours.image_size, ours.grid) == (ref.image_size, ref.grid), what


@pytest.mark.parametrize("name", ["next-336", "llava-336", "llava-336-bilinear"])
def test_large_images_match_todays_pil_path(name):
    cfg = {"next-336": ImageProcessorConfig(336, 336, 336, CLIP_MEAN, CLIP_STD, pinpoints=NEXT_PINPOINTS),
           "llava-336": ImageProcessorConfig(336, 336, 336, CLIP_MEAN, CLIP_STD),
           "llava-336-bilinear": ImageProcessorConfig(336, 336, 336, CLIP_MEAN, CLIP_STD, resample=2)}[name]
    for n, (w, h) in enumerate(LARGE_SIZES):
        img = make_image(w, h, "RGB", seed=n)
        ref, ours = reference_preprocess(img, cfg), preprocess(img, cfg)
        assert_same(ours.pixel_values, ref.pixel_values, f"{name} {w}x{h}")
        assert (ours.image_size, ours.grid) == (ref.image_size, ref.grid), f"{name} {w}x{h}"


def test_real_geometry_torch_path_matches_todays_pil_path():
    nxt = ImageProcessorConfig(336, 336, 336, CLIP_MEAN, CLIP_STD, pinpoints=NEXT_PINPOINTS)
    clip = ImageProcessorConfig(336, 336, 336, CLIP_MEAN, CLIP_STD)
    for (w, h), mode in [((1024, 768), "RGB"), ((768, 1024), "RGBA"), ((1920, 1080), "P"), ((300, 300), "L")]:
        img = make_image(w, h, mode, seed=w)
        for cfg in (nxt, clip):
            ref = reference_preprocess(img, cfg)
            ours = preprocess(img, cfg, device="cpu", backend="torch")
            assert_same(ours.pixel_values, ref.pixel_values, f"{w}x{h} {mode} {cfg.pinpoints is not None}")


@pytest.mark.gpu
def test_cuda_path_matches_todays_pil_path():
    """The engine's GPU path: every step on the device (side stream), the same bits."""
    for name in ("next", "llava", "next-edge40", "pad", "nearest-next"):
        for n, (w, h) in enumerate([(1, 1), (101, 203), (3, 2000), (640, 480), (2000, 1500)]):
            img = make_image(w, h, MODES[n % len(MODES)], seed=n)
            cfg = SWEEP_CONFIGS[name]
            ours = preprocess(img, cfg, device="cuda")
            assert ours.pixel_values.device.type == "cuda" and ours.key == preprocess(img, cfg).key
            assert_same(ours.pixel_values.cpu(), reference_preprocess(img, cfg).pixel_values, f"cuda {name} {w}x{h}")


def test_backend_is_checked():
    with pytest.raises(ValueError, match="backend"):
        preprocess(make_image(4, 4, "RGB"), ImageProcessorConfig(56, 56, 56, CLIP_MEAN, CLIP_STD), backend="cv2")


# --- image identity (the prefix and feature caches' key) -------------------------------------

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_key_is_equal_for_equal_images_and_differs_for_any_change():
    cfg = SWEEP_CONFIGS["next"]
    img = make_image(97, 61, "RGB", seed=11)
    data = _png(img)
    key = preprocess(Image.open(io.BytesIO(data)), cfg).key
    assert len(key) == 16
    assert preprocess(Image.open(io.BytesIO(data)), cfg).key == key, "same file decoded twice"
    assert preprocess(Image.open(io.BytesIO(data)), cfg, backend="torch").key == key, "key depends on the path"
    # RGBA with alpha 255 everywhere composites to the same RGB: the tower sees the same input
    opaque = img.convert("RGBA")
    assert preprocess(opaque, cfg).key == key
    pixels = np.array(img)
    for n, (y, x, c) in enumerate([(0, 0, 0), (60, 96, 2), (30, 50, 1)]):
        changed = pixels.copy()
        changed[y, x, c] ^= 1 << (n % 8)            # one bit of one pixel
        assert preprocess(Image.fromarray(changed), cfg).key != key, (y, x, c)
    for other in (SWEEP_CONFIGS["llava"], SWEEP_CONFIGS["next-edge40"],
                  dataclasses.replace(cfg, rescale_factor=1 / 256)):
        assert preprocess(img, other).key != key, other


def test_rgbx_pixels_and_the_streamed_key_cover_every_pixel():
    """rgbx_pixels is the RGB pixels plus a zero pad byte; hashing the image in row slices (the CPU
    path) equals hashing that array (the torch path); the pad byte Pillow leaves (0 after a resize,
    255 after a decode) never reaches the key; a change in the last row changes it."""
    big = Image.fromarray(np.random.default_rng(6).integers(0, 256, (2100, 3000, 3), dtype=np.uint8))
    cfg = SWEEP_CONFIGS["llava"]
    for img in (big, make_image(7, 5, "RGB"), make_image(1, 1, "RGB"), make_image(1, 900, "RGB")):
        rgbx = rgbx_pixels(img)                       # big: several Pillow memory blocks
        assert np.array_equal(rgbx[..., :3], np.asarray(img)) and not rgbx[..., 3].any(), img.size
        assert image_key(img, cfg) == image_key(rgbx, cfg), img.size
    resized = big.resize((1500, 1050), 3)             # pad byte 0 inside Pillow
    decoded = Image.open(io.BytesIO(_png(resized)))   # pad byte 255
    assert image_key(decoded, cfg) == image_key(resized, cfg)
    last = np.array(resized)
    last[-1, -1, 2] ^= 1
    assert image_key(Image.fromarray(last), cfg) != image_key(resized, cfg)


def test_key_is_one_tree_however_its_chunks_are_split():
    """The key is BLAKE3 over fixed 1 MB row chunks' digests: the same for any number of tasks,
    from the image or its array; one bit flipped in any chunk (first, middle, last row) changes it."""
    img = Image.fromarray(np.random.default_rng(8).integers(0, 256, (1500, 1200, 3), dtype=np.uint8))
    cfg = SWEEP_CONFIGS["llava"]
    rgbx = rgbx_pixels(img)
    keys = set()
    for source in (img, rgbx):
        for parts in (1, 2, 7, 1000):
            tasks, finish = key_tasks(source, cfg, parts)
            keys.add(finish([t() for t in tasks]))
    assert keys == {image_key(img, cfg)}
    for row in (0, 700, 1499):
        flipped = np.array(img)
        flipped[row, 3, 0] ^= 1
        assert image_key(Image.fromarray(flipped), cfg) not in keys, row


def test_key_differs_for_the_same_bytes_at_another_size():
    flat = np.random.default_rng(5).integers(0, 256, 24 * 3, dtype=np.uint8)
    cfg = SWEEP_CONFIGS["llava"]
    keys = {preprocess(Image.fromarray(flat.reshape(h, w, 3)), cfg).key for w, h in [(6, 4), (4, 6), (8, 3), (24, 1)]}
    assert len(keys) == 4


def test_real_336_configs_match_transformers():
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil

    size, crop = {"shortest_edge": 336}, {"height": 336, "width": 336}
    ref_clip = CLIPImageProcessorPil(size=size, crop_size=crop)
    ref_next = LlavaNextImageProcessorPil(size=size, crop_size=crop)  # default = real pinpoints
    clip = ImageProcessorConfig(336, 336, 336, CLIP_MEAN, CLIP_STD)
    nxt = ImageProcessorConfig(336, 336, 336, CLIP_MEAN, CLIP_STD, pinpoints=NEXT_PINPOINTS)
    assert [list(p) for p in NEXT_PINPOINTS] == ref_next.image_grid_pinpoints
    cases = [((1024, 768), "RGB", (2, 2)), ((768, 1024), "RGBA", (2, 2)), ((300, 300), "P+alpha-trns", (1, 2)),
             ((1920, 1080), "L", (2, 2)), ((20, 700), "RGB", (3, 1)), ((337, 335), "LA", (1, 2))]
    for (w, h), mode, grid in cases:
        img = make_image(w, h, mode, seed=h)
        assert_same(preprocess(img, clip).pixel_values, ref_clip(img, return_tensors="pt")["pixel_values"],
                    f"clip-336 {w}x{h} {mode}")
        ours, ref = preprocess(img, nxt), ref_next(img, return_tensors="pt")
        assert_same(ours.pixel_values, ref["pixel_values"][0], f"next-336 {w}x{h} {mode}")
        assert ours.grid == grid and ours.pixel_values.shape == (1 + grid[0] * grid[1], 3, 336, 336), (
            w, h, ours.grid, tuple(ours.pixel_values.shape))


@pytest.mark.parametrize("edge, crop_h, crop_w", [(40, 56, 56), (64, 56, 56), (56, 48, 56), (50, 56, 44)])
def test_crop_and_resize_edge_cases_match_transformers(edge, crop_h, crop_w):
    """shortest_edge != crop: tiles really get resized, and crops larger than the image zero-pad."""
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil

    kwargs = dict(size={"shortest_edge": edge}, crop_size={"height": crop_h, "width": crop_w})
    ref_clip = CLIPImageProcessorPil(**kwargs)
    clip = ImageProcessorConfig(edge, crop_h, crop_w, CLIP_MEAN, CLIP_STD)
    cases = [(97, 61), (61, 97), (1, 300), (56, 56)]
    for w, h in cases:
        img = make_image(w, h, "RGBA", seed=w + h)
        assert_same(preprocess(img, clip).pixel_values, ref_clip(img, return_tensors="pt")["pixel_values"],
                    f"clip edge={edge} crop={crop_h}x{crop_w} {w}x{h}")
    if crop_h != crop_w:  # anyres tiles are crop_h squares; a non-square crop is a broken NeXT config
        return
    pins = [[p[0] * crop_h // 56, p[1] * crop_h // 56] for p in tiny.PINPOINTS]
    ref_next = LlavaNextImageProcessorPil(image_grid_pinpoints=pins, **kwargs)
    nxt = ImageProcessorConfig(edge, crop_h, crop_w, CLIP_MEAN, CLIP_STD, pinpoints=pins)
    for w, h in cases:
        img = make_image(w, h, "RGB", seed=w * h)
        assert_same(preprocess(img, nxt).pixel_values, ref_next(img, return_tensors="pt")["pixel_values"][0],
                    f"next edge={edge} crop={crop_h} {w}x{h}")


HUB_CONFIGS = {
    # llava-hf/llava-1.5-13b-hf (transformers 4 era)
    "llava15": ("CLIPImageProcessorPil", {
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD), "processor_class":
        "LlavaProcessor", "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}}),
    # llava-hf/llava-v1.6-*-hf
    "next": ("LlavaNextImageProcessorPil", {
        "aspect_ratio_setting": "anyres", "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_grid_pinpoints": [list(p) for p in NEXT_PINPOINTS], "image_mean": list(CLIP_MEAN),
        "image_processor_type": "LlavaNextImageProcessor", "image_std": list(CLIP_STD),
        "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 336}}),
    # openai/clip-vit-large-patch14-336 (the tower the original LLaVA-1.5 loads): int sizes
    "openai_clip": ("CLIPImageProcessorPil", {
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "resample": 3, "size": 336}),
    # LlavaImageProcessor with do_pad: a square of the mean colour before the resize
    "llava_do_pad": ("LlavaImageProcessorPil", {
        "crop_size": {"height": 336, "width": 336}, "do_pad": True, "image_mean": list(CLIP_MEAN),
        "image_processor_type": "LlavaImageProcessor", "image_std": list(CLIP_STD),
        "size": {"shortest_edge": 336}}),
    # SiglipImageProcessor as transformers 5 saves it (llava-interleave): an exact resize, no crop,
    # mean/std 0.5 by default
    "siglip": ("SiglipImageProcessorPil", {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_processor_type": "SiglipImageProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"height": 336, "width": 336}}),
    # a sparse file: everything else takes CLIPImageProcessor's defaults (224 px)
    "sparse": ("CLIPImageProcessorPil", {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_preprocessor_configs(name, tmp_path):
    import transformers

    cls_name, content = HUB_CONFIGS[name]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(content))
    ref = getattr(transformers, cls_name).from_pretrained(tmp_path)
    cfg = ImageProcessorConfig.from_dir(tmp_path)
    expected_edge = 224 if name == "sparse" else 336
    assert (cfg.shortest_edge, cfg.crop_h, cfg.crop_w) == (expected_edge,) * 3, cfg
    assert (cfg.pinpoints is not None) == (name == "next"), cfg.pinpoints
    for w, h in [(500, 333), (64, 200)]:
        img = make_image(w, h, "RGB", seed=w)
        ref_pv = ref(img, return_tensors="pt")["pixel_values"]
        assert_same(preprocess(img, cfg).pixel_values, ref_pv[0] if name == "next" else ref_pv, f"{name} {w}x{h}")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        ImageProcessorConfig.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 384}}))
    with pytest.raises(ValueError, match="unsupported size"):
        ImageProcessorConfig.from_dir(tmp_path)
    with pytest.raises(ValueError, match="multiples of the tile size"):
        ImageProcessorConfig(56, 56, 56, CLIP_MEAN, CLIP_STD, pinpoints=((56, 100),))
    with pytest.raises(ValueError, match="pad_to_square"):
        ImageProcessorConfig(56, 56, 56, CLIP_MEAN, CLIP_STD, pinpoints=((56, 112),), pad_to_square=True)
    with pytest.raises(ValueError, match="mode 'L'"):
        preprocess(make_image(5, 5, "L"), ImageProcessorConfig(56, 56, 56, CLIP_MEAN, CLIP_STD,
                                                               do_convert_rgb=False))


# --- the normalization table ----------------------------------------------------------------

@pytest.mark.parametrize("flags", [dict(), dict(do_rescale=False), dict(do_normalize=False),
                                   dict(image_mean=(0.5,) * 3, image_std=(0.5,) * 3),
                                   dict(rescale_factor=0.00392156862745098)])
def test_normalize_table_is_exact(flags):
    """Every (channel, value) through transformers' own rescale + normalize equals the table."""
    from transformers.image_transforms import normalize, rescale

    cfg = ImageProcessorConfig(56, 56, 56, flags.pop("image_mean", CLIP_MEAN),
                               flags.pop("image_std", CLIP_STD), **flags)
    x = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()  # CHW, every value
    if cfg.do_rescale:
        x = rescale(x, cfg.rescale_factor, input_data_format="channels_first")
    if cfg.do_normalize:
        x = normalize(x, cfg.image_mean, cfg.image_std, input_data_format="channels_first")
    ref = torch.from_numpy(np.asarray(x, dtype=np.float32))[:, 0, :]
    assert_same(normalize_table(cfg), ref, f"table {flags}")


# --- original-repo "pad" mode (no transformers equivalent) ------------------------------------

def _hand_normalize(chw: np.ndarray) -> torch.Tensor:
    x = (chw.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(CLIP_MEAN, np.float32)[:, None, None]
    std = np.array(CLIP_STD, np.float32)[:, None, None]
    return torch.from_numpy((x - mean) / std)


@pytest.mark.parametrize("w, h", [(5, 2), (2, 5), (4, 2), (3, 3)])
def test_pad_to_square_by_hand(w, h):
    img = make_image(w, h, "RGB", seed=3)
    side = max(w, h)
    cfg = ImageProcessorConfig(side, side, side, CLIP_MEAN, CLIP_STD, pad_to_square=True)
    assert cfg.pad_color == (122, 116, 104)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = (122, 116, 104)
    top, left = (side - h) // 2, (side - w) // 2  # odd leftover goes bottom/right
    canvas[top:top + h, left:left + w] = np.array(img)
    ours = preprocess(img, cfg)
    assert ours.image_size == (h, w) and ours.grid is None
    assert_same(ours.pixel_values[0], _hand_normalize(canvas.transpose(2, 0, 1)), f"pad {w}x{h}")


def test_pad_to_square_then_resize_matches_clip_on_the_padded_image():
    from transformers import CLIPImageProcessorPil

    img = make_image(300, 170, "RGBA", seed=5)  # alpha goes on white first, then the mean-colour pad
    cfg = ImageProcessorConfig(56, 56, 56, CLIP_MEAN, CLIP_STD, pad_to_square=True)
    white = Image.alpha_composite(Image.new("RGBA", img.size, (255,) * 4), img).convert("RGB")
    square = np.empty((300, 300, 3), np.uint8)
    square[:] = (122, 116, 104)
    square[65:235] = np.array(white)
    ref = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    ref_pv = ref(Image.fromarray(square), return_tensors="pt")["pixel_values"]
    assert_same(preprocess(img, cfg).pixel_values, ref_pv, "pad+resize")
    assert expand2square(white, (1, 2, 3)).getpixel((0, 0)) == (1, 2, 3)


# --- anyres geometry and token counts --------------------------------------------------------

@pytest.mark.parametrize("w, h, tokens", [(1024, 768, 2340), (768, 1024, 2352), (1920, 1080, 1948),
                                          (300, 300, 1176), (640, 480, 2340)])
def test_reference_worked_examples(w, h, tokens):
    assert anyres_num_tokens((h, w), NEXT_PINPOINTS, 336, 14, 576) == tokens


# (h, w) where unpad's int(round(x, 7)) and a plain int(x) (the original repo) disagree at 336 px.
ROUNDING_SIZES = [(47, 1128), (55, 176), (88, 55), (88, 99), (176, 110), (205, 656), (352, 748), (376, 893)]


def _random_sizes(n: int, seed: int):
    """(h, w) pairs: uniform, extreme aspect ratios both ways, and the rounding-sensitive ones."""
    rng = random.Random(seed)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(n)]
    sizes += [(rng.randint(1, 40), rng.randint(1, 3000)) for _ in range(n // 4)]
    return sizes + [(b, a) for a, b in sizes[-(n // 4):]] + ROUNDING_SIZES


def test_token_counts_match_processor_over_random_sizes(ref_next):
    proc = ref_next
    saved = proc.image_processor.image_grid_pinpoints, proc.patch_size
    try:
        proc.image_processor.image_grid_pinpoints = [list(p) for p in NEXT_PINPOINTS]
        proc.patch_size = 14
        for h, w in _random_sizes(3000, seed=1):
            ref = proc._get_number_of_features(h, w, 336, 336) - 1  # "default" drops CLS
            ours = anyres_num_tokens((h, w), NEXT_PINPOINTS, 336, 14, 576)
            assert ours == ref, (h, w, ours, ref)
    finally:
        proc.image_processor.image_grid_pinpoints, proc.patch_size = saved


def test_select_best_resolution_and_unpad_match_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    rng = random.Random(2)
    pin_sets = [NEXT_PINPOINTS, tuple(map(tuple, tiny.PINPOINTS))]
    pin_sets += [tuple((rng.randint(1, 6) * 336, rng.randint(1, 6) * 336) for _ in range(rng.randint(1, 8)))
                 for _ in range(20)]
    for n, (h, w) in enumerate(_random_sizes(1500, seed=3)):
        pins = pin_sets[0] if (h, w) in ROUNDING_SIZES else pin_sets[rng.randrange(len(pin_sets))]
        assert select_best_resolution((h, w), pins) == tuple(hf_select((h, w), [list(p) for p in pins])), (h, w, pins)
        rows, cols = rng.randint(1, 6) * 24, rng.randint(1, 6) * 24
        if (h, w) in ROUNDING_SIZES:  # the real feature grid, where the rounding matters
            rows, cols = (24 * g for g in anyres_grid((h, w), pins, 336))
        grid = torch.arange(rows * cols).view(1, rows, cols)
        window = unpad_window((h, w), rows, cols)
        ref = unpad_image(grid, [h, w])
        same = torch.equal(grid[:, window[0]:window[1], window[2]:window[3]], ref)
        assert same, f"(h, w)={(h, w)} grid {rows}x{cols}: ours {window}, transformers keeps {tuple(ref.shape[1:])}"
