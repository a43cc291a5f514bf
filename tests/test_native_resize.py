"""The compiled resample passes (native.py, resample_passes.c, native_resize.py): Pillow's bits,
several jobs of one source at once, and a clean fall-back to Pillow when they cannot be built.
The filter x size x window sweep through `resize_in_bands` is tests/test_bands.py (run with and
without the compiled passes)."""

from __future__ import annotations

import platform
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from fastllava.preprocess import native, native_resize
from fastllava.preprocess.bands import resize_in_bands
from fastllava.preprocess.tasks import run_tasks


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def lib():
    lib = native.passes()
    if lib is None:
        pytest.skip("the compiled resample passes did not build here (no C compiler?)")
    return lib


def run(group: native_resize.NativeResizes) -> list[np.ndarray]:
    while tasks := group.tasks():
        group.take(run_tasks(tasks))
    return group.results()


def test_builds_wherever_there_is_a_compiler():
    if shutil.which("cc") is None:
        pytest.skip("no cc on PATH")
    assert native.passes() is not None


def test_one_source_many_jobs_and_windows(lib):
    """anyres reads the source once for the grid and the base image; windows (a center crop)
    give exactly the window of the whole resize; odd sizes, all four-row remainders, upscales."""
    for n, ((w, h), jobs) in enumerate([
            ((1024, 768), [((504, 672), None), ((336, 336), None)]),
            ((4000, 3000), [((336, 448), (0, 56, 336, 336)), ((504, 672), (10, 3, 400, 600))]),
            ((37, 23), [((5, 7), None), ((61, 97), (1, 2, 58, 90)), ((22, 36), None)]),
            ((641, 3), [((2, 9), None)]), ((5, 641), [((9, 2), None)])]):
        img = noise(w, h, seed=n)
        for resample in (1, 2, 3, 4, 5):
            takeable = [j for j in jobs if native_resize.can_take(img, j[0], resample)]
            outs = run(native_resize.NativeResizes(lib, img, takeable, resample))
            for ((th, tw), window), out in zip(takeable, outs):
                want = np.asarray(img.resize((tw, th), resample))
                if window is not None:
                    top, left, rows, cols = window
                    want = want[top:top + rows, left:left + cols]
                assert out.shape == want.shape and np.array_equal(out, want), \
                    ((w, h), (th, tw), window, resample)


@pytest.mark.parametrize("isa", [["-mavx2"], ["-mno-avx2", "-mno-avx512f"]], ids=["avx2", "scalar"])
def test_other_instruction_sets(isa, tmp_path):
    """The AVX2 (two rows at a time) and scalar paths of hpass4, built here with those flags
    instead of -march=native, give Pillow's bits too."""
    if shutil.which("cc") is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs cc and an x86-64 CPU (the -mavx2 flag)")
    path = str(tmp_path / "passes.so")
    native.compile_to(["cc"], ["-O3", "-shared", "-fPIC", *isa], path)
    lib = native.load(path)
    img = noise(333, 251, seed=9)
    for resample in (1, 3, 5):
        jobs = [((97, 130), None), ((40, 60), (3, 5, 31, 50))]
        for ((th, tw), window), out in zip(jobs, run(native_resize.NativeResizes(lib, img, jobs, resample))):
            want = np.asarray(img.resize((tw, th), resample))
            if window is not None:
                top, left, rows, cols = window
                want = want[top:top + rows, left:left + cols]
            assert np.array_equal(out, want), (isa, resample, window)


def test_what_goes_where():
    img = noise(400, 300)
    assert native_resize.can_take(img, (100, 120), 3)
    assert not native_resize.can_take(img, (100, 120), 0)          # NEAREST: Pillow's index map
    assert not native_resize.can_take(img, (300, 120), 3)          # one pass only
    assert not native_resize.can_take(img.convert("L"), (100, 120), 3)
    tall = noise(300, 2400)
    assert not native_resize.can_take(tall, (200, 250), 3)         # Pillow 13 goes vertical first


def test_a_compiler_that_fails_means_pillow(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setenv("FASTLLAVA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.passes() is None and list(tmp_path.iterdir()) == []
    img = noise(900, 700)
    (out,), _ = resize_in_bands([(img, (336, 336))], 3)
    assert np.array_equal(out, np.asarray(img.resize((336, 336), 3)))
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.delenv("CC")
    monkeypatch.setenv("FASTLLAVA_NATIVE", "0")
    assert native.passes() is None


def test_built_once_per_machine(monkeypatch, tmp_path):
    """The shared object is cached under a name that hashes the source, compiler and CPU; a second
    process (here: a second load) asks the compiler only for its version."""
    if shutil.which("cc") is None:
        pytest.skip("no cc on PATH")
    monkeypatch.setenv("FASTLLAVA_CACHE_DIR", str(tmp_path))
    calls = []
    real = subprocess.run

    def counting(cmd, *a, **k):
        calls.append(cmd)
        return real(cmd, *a, **k)
    monkeypatch.setattr(native.subprocess, "run", counting)
    for expected in (2, 1):
        calls.clear()
        monkeypatch.setattr(native, "_loaded", [])
        assert native.passes() is not None
        assert len(calls) == expected, calls
    (built,) = tmp_path.iterdir()
    assert built.name.startswith("resample_passes-") and built.suffix == ".so"
