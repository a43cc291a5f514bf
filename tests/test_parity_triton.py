"""The real model through the Triton kernels (interpreted on CPU) gives transformers' greedy output.

Same checks as test_parity.py — prompt ids, image-token count, logits within LOGITS_ATOL at every
step, identical greedy tokens and text — with backend="triton": every op of the vision tower,
projector and decoder (attention prefill + paged decode, KV write, RMSNorm, RoPE, SiLU, GELU) runs
as a Triton kernel.
"""

from __future__ import annotations

import pytest

from test_parity import NEW_TOKENS, _image, check_parity

pytestmark = pytest.mark.interpreter


def test_next_gqa_triton(tiny_next, tmp_path):
    new = check_parity(tiny_next, tiny_next, _image(tmp_path / "img.png", 75, 100, seed=3),
                       backend="triton")
    assert len(new) >= NEW_TOKENS


def test_llava15_mha_triton(tiny_llava, tmp_path):
    check_parity(tiny_llava, tiny_llava, _image(tmp_path / "img.jpg", 90, 60), backend="triton")


@pytest.mark.parametrize("fixture", ["tiny_siglip", "tiny_chatml_next"])
def test_other_towers_and_templates_triton(request, tmp_path, fixture):
    path = request.getfixturevalue(fixture)
    check_parity(path, path, _image(tmp_path / "img.png", 64, 80), backend="triton")
