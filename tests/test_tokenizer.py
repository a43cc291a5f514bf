"""Tokenizer and streaming detokenizer parity with transformers on the tiny checkpoints.

Both backends (tokenizer.json via `tokenizers`, tokenizer.model via `sentencepiece`) must give
transformers' ids and text, special tokens included, for the shipped configs and for Llama-like
(add_bos_token), Yi-like (add_bos_token false, legacy true) and config-only variants.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

import tiny
from fastllava.text.detokenize import IncrementalDetokenizer
from fastllava.text.tokenizer import Tokenizer

BACKENDS = ("json", "sentencepiece")
FIXTURES = ("tiny_next", "tiny_llava", "tiny_chatml_next")
_EXTRAS = ["<image>", "<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "\n\n",
           " ", "  ", "\t", "\r\n", "😀", "👍🏽", "東京", "猫", "é", "ü", "▁", "<image>\n", " <image>",
           "USER:", " ASSISTANT:", "<", ">", "|", "<0x41>", "<im", "²", "_", "x<pad>", "<pad>y"]


def random_texts(n: int, seed: int) -> list[str]:
    """Corpus words mixed with special tokens, whitespace runs, emoji, CJK, random code points."""
    rng = random.Random(seed)
    lines = tiny.corpus_lines(200, seed=seed + 100)
    out = ["", " ", "  leading spaces", "\nnewline first", "<image>", "<image><image>", "x<image>y",
           " <image> ", "<image>\nWhat is this?", "<|im_start|>user\n<image>\nhi<|im_end|>\n",
           "trailing  ", "a\x00b\x0bc", "²<pad> x", "٣<pad>", "a <pad> b", "x  <image>  y",
           "<|im_end|>  \n z"]
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 6)):
            r = rng.random()
            if r < 0.35:
                parts.append(rng.choice(lines)[:rng.randint(0, 40)])
            elif r < 0.65:
                parts.append(rng.choice(_EXTRAS))
            elif r < 0.8:
                parts.append(" " * rng.randint(1, 3))
            else:
                ranges = [(0x20, 0x7E), (0xA0, 0x2FFF), (0x4E00, 0x9FFF), (0x1F300, 0x1F64F)]
                parts.append("".join(chr(rng.randint(*rng.choice(ranges)))
                                     for _ in range(rng.randint(1, 4))))
        out.append("".join(parts))
    return out


def random_ids(n: int, seed: int) -> list[list[int]]:
    """Id lists over the whole padded model vocab (ids >= the tokenizer size included)."""
    rng = random.Random(seed)
    return [[rng.randrange(tiny.MODEL_VOCAB) for _ in range(rng.randint(0, 24))] for _ in range(n)]


def hf_tokenizer(path: Path, cls: str = "auto"):
    from transformers import AutoTokenizer, LlamaTokenizer

    return (AutoTokenizer if cls == "auto" else LlamaTokenizer).from_pretrained(path)


def make_variant(src: Path, dst: Path, config: dict | None = None, tokenizer_json=None,
                 drop: tuple[str, ...] = ()) -> Path:
    """Copy a checkpoint's small files (no weights), editing tokenizer_config / tokenizer.json."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name not in drop:
            shutil.copy(f, dst / f.name)
    if config is not None:
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg.update(config)
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if tokenizer_json is not None:
        tj = json.loads((dst / "tokenizer.json").read_text())
        tokenizer_json(tj)
        (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def added_tokens_decoder(ref) -> dict:
    """tokenizer_config.json "added_tokens_decoder" as transformers 4 wrote it."""
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in ref.added_tokens_decoder.items()}


def assert_same_ids(ours: Tokenizer, ref, texts, label: str):
    bad = [(t, ref(t).input_ids, ours.encode(t)) for t in texts
           if ours.encode(t) != ref(t).input_ids]
    assert not bad, f"{label}: {len(bad)}/{len(texts)} differ, first: {bad[:3]}"
    bad = [t for t in texts[:100] if ours.encode(t, add_special_tokens=False)
           != ref(t, add_special_tokens=False).input_ids]
    assert not bad, f"{label}: add_special_tokens=False differs on {bad[:3]}"


def assert_same_text(ours: Tokenizer, ref, id_lists, label: str):
    for skip in (True, False):
        bad = [(ids, ref.decode(ids, skip_special_tokens=skip), ours.decode(ids, skip))
               for ids in id_lists
               if ours.decode(ids, skip) != ref.decode(ids, skip_special_tokens=skip)]
        assert not bad, f"{label} skip={skip}: {len(bad)}/{len(id_lists)} differ, first: {bad[:3]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fixture", FIXTURES)
def test_encode_decode_match_transformers(request, fixture, backend):
    path = request.getfixturevalue(fixture)
    ref, ours = hf_tokenizer(path), Tokenizer.from_dir(path, backend)
    texts = random_texts(320, seed=FIXTURES.index(fixture))
    assert_same_ids(ours, ref, texts, f"{fixture}/{backend}")
    ids = random_ids(200, seed=1) + [ref(t).input_ids for t in texts[:100]]
    assert_same_text(ours, ref, ids, f"{fixture}/{backend}")
    assert ours.decode([tiny.MODEL_VOCAB - 1, 300, len(ref) + 5]) == ref.decode([300])


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_attributes(tiny_chatml_next, backend):
    ref, ours = hf_tokenizer(tiny_chatml_next), Tokenizer.from_dir(tiny_chatml_next, backend)
    assert ours.vocab_size == len(ref) == 404
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (ref.bos_token, ref.eos_token,
                                                                 ref.pad_token)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id,
                                                       ref.pad_token_id)
    assert ours.special_ids == {i for i, t in ref.added_tokens_decoder.items() if t.special}
    for token in ("<image>", "<|im_start|>", "<|im_end|>", "<pad>", "<s>", "▁photo", "<0x0A>"):
        assert ours.token_id(token) == ref.convert_tokens_to_ids(token), token
    assert ours.token_id("no-such-token") is None


def test_missing_files_raise(tmp_path, tiny_next):
    with pytest.raises(ValueError, match=r"tokenizer\.json.*tokenizer\.model") as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)
    only_spm = make_variant(tiny_next, tmp_path / "spm", drop=("tokenizer.json",))
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_dir(only_spm, "json")
    assert Tokenizer.from_dir(only_spm).backend == "sentencepiece"
    with pytest.raises(ValueError, match="backend"):
        Tokenizer.from_dir(tiny_next, "bpe")


def _template(bos: bool, eos: bool):
    """tokenizer.json post-processor adding <s> / </s> (what Llama checkpoints ship). transformers 5
    ignores tokenizer_config.json's add_bos_token/add_eos_token when tokenizer.json exists."""
    def edit(tj):
        single = ([{"SpecialToken": {"id": "<s>", "type_id": 0}}] if bos else []) + [
            {"Sequence": {"id": "A", "type_id": 0}}] + (
            [{"SpecialToken": {"id": "</s>", "type_id": 0}}] if eos else [])
        specials = {t: {"id": t, "ids": [i], "tokens": [t]} for t, i, on in
                    (("<s>", 1, bos), ("</s>", 2, eos)) if on}
        tj["post_processor"] = {"type": "TemplateProcessing", "single": single,
                                "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}],
                                "special_tokens": specials}
    return edit


def _always(tj):  # tokenizer.json written for legacy=True (Metaspace prepends to every segment)
    tj["pre_tokenizer"]["prepend_scheme"] = "always"


def _prepend_normalizer(tj):  # older conversions: Prepend("▁") normalizer, no pre-tokenizer
    _template(True, False)(tj)
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    tj["pre_tokenizer"] = None


def _strip_flags(tj):  # AddedToken lstrip / rstrip / single_word, matched around raw text
    flags = {"<image>": "lstrip", "<|im_end|>": "rstrip", "<pad>": "single_word"}
    for token in tj["added_tokens"]:
        if token["content"] in flags:
            token[flags[token["content"]]] = True


# name: (tokenizer_config.json updates, tokenizer.json edit), consistent as in real checkpoints
VARIANTS = {
    "llama": ({"add_bos_token": True, "add_eos_token": False, "legacy": False},
              _template(True, False)),
    "bos_eos": ({"add_bos_token": True, "add_eos_token": True}, _template(True, True)),
    "yi": ({"add_bos_token": False, "add_eos_token": False, "legacy": True}, _always),
    "prepend_normalizer": ({"add_bos_token": True, "legacy": True}, _prepend_normalizer),
    "strip_flags": ({"add_bos_token": False}, _strip_flags),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_match_transformers(tmp_path, tiny_chatml_next, variant):
    config, edit = VARIANTS[variant]
    path = make_variant(tiny_chatml_next, tmp_path / variant, config, edit)
    ref = hf_tokenizer(path)
    texts = random_texts(300, seed=7)
    if variant != "prepend_normalizer":  # LlamaTokenizer rebuilds Metaspace from `legacy`: same ids
        llama = hf_tokenizer(path, "llama")
        assert [llama(t).input_ids for t in texts] == [ref(t).input_ids for t in texts]
    assert (ref("hi").input_ids[0] == ref.bos_token_id) == config["add_bos_token"]
    assert (ref("hi").input_ids[-1] == ref.eos_token_id) == config.get("add_eos_token", False)
    for backend in BACKENDS:
        ours = Tokenizer.from_dir(path, backend)
        assert_same_ids(ours, ref, texts, f"{variant}/{backend}")
        assert_same_text(ours, ref, random_ids(150, seed=2), f"{variant}/{backend}")
    # No tokenizer.json: settings come from tokenizer_config.json alone (legacy, add_prefix_space,
    # add_bos_token), added tokens from "added_tokens_decoder" as transformers 4 saved them.
    if variant != "prepend_normalizer":
        bare = make_variant(path, tmp_path / f"{variant}_bare",
                            {"added_tokens_decoder": added_tokens_decoder(ref)},
                            drop=("tokenizer.json",))
        ours = Tokenizer.from_dir(bare)
        assert ours.backend == "sentencepiece"
        llama = hf_tokenizer(path, "llama")
        assert_same_ids(ours, llama, texts, f"{variant}/config-only")
        assert_same_text(ours, llama, random_ids(100, seed=4), f"{variant}/config-only")


def test_added_tokens_json_and_special_tokens_map(tmp_path, tiny_chatml_next):
    """transformers-4 era files: added_tokens.json + special_tokens_map.json, no tokenizer.json."""
    ref = hf_tokenizer(tiny_chatml_next)
    path = make_variant(tiny_chatml_next, tmp_path / "old", {"add_bos_token": False},
                        drop=("tokenizer.json",))
    (path / "added_tokens.json").write_text(json.dumps(
        {"<image>": 400, "<pad>": 401, "<|im_start|>": 402, "<|im_end|>": 403}))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": "<pad>",
         "additional_special_tokens": ["<image>", "<|im_start|>", "<|im_end|>"]}))
    ours = Tokenizer.from_dir(path)
    assert ours.special_ids == {i for i, t in ref.added_tokens_decoder.items() if t.special}
    assert_same_ids(ours, ref, random_texts(300, seed=11), "added_tokens.json")
    assert_same_text(ours, ref, random_ids(150, seed=3), "added_tokens.json")


# ---------------------------------------------------------------- streaming detokenization


def _stream(tokenizer, ids, skip=True):
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    return [detok.push(i) for i in ids], detok.text()


def _realistic_ids(tokenizer, seed: int, n: int = 150) -> list[list[int]]:
    """What a trained model emits: encodings of text pieces (multi-byte characters as complete
    byte-fallback runs) with special tokens between pieces."""
    rng = random.Random(seed)
    texts = random_texts(n * 3, seed=seed)
    out = []
    for k in range(n):
        ids = []
        for piece in texts[3 * k:3 * k + 3]:
            ids += tokenizer.encode(piece, add_special_tokens=False)
            if rng.random() < 0.3:
                ids.append(rng.choice(sorted(tokenizer.special_ids)))
        out.append(ids)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_incremental_detokenizer_realistic(tiny_chatml_next, backend):
    tok = Tokenizer.from_dir(tiny_chatml_next, backend)
    sequences = _realistic_ids(tok, seed=5)
    multibyte = sum(any(131 <= i <= 258 for i in ids) for ids in sequences)  # <0x80>..<0xFF>
    assert multibyte > 30, f"only {multibyte} sequences exercise byte-fallback runs"
    for ids in sequences:
        for skip in (True, False):
            snaps, final = _stream(tok, ids, skip)
            assert final == tok.decode(ids, skip)
            # a trailing byte run is held back until text() flushes it
            assert not ids or final.startswith(snaps[-1]), (ids, snaps[-1], final)
            for a, b in zip(snaps, snaps[1:]):
                assert b.startswith(a), (ids, a, b)
            assert not any("\ufffd" in s for s in snaps), (ids, snaps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_incremental_detokenizer_split_characters(tiny_chatml_next, backend):
    tok = Tokenizer.from_dir(tiny_chatml_next, backend)
    text = "東京 の 猫 😀 naïve 👍🏽"
    ids = tok.encode(text, add_special_tokens=False)
    assert sum(131 <= i <= 258 for i in ids) >= 8, ids  # split into byte tokens
    snaps, final = _stream(tok, ids)
    assert final == tok.decode(ids) == text and text.startswith(snaps[-1])
    assert all("\ufffd" not in s and text.startswith(s) for s in snaps), snaps


@pytest.mark.parametrize("backend", BACKENDS)
def test_incremental_detokenizer_arbitrary_ids(tiny_chatml_next, backend):
    """Random ids (invalid UTF-8 runs, ids past the vocab): snapshots stop extending only where the
    tokenizer itself rewrote text (ByteFallback turns a whole invalid byte run into U+FFFD)."""
    tok = Tokenizer.from_dir(tiny_chatml_next, backend)
    for ids in random_ids(300, seed=9):
        for skip in (True, False):
            snaps, final = _stream(tok, ids, skip)
            assert final == tok.decode(ids, skip)
            assert not any(s.endswith("\ufffd") for s in snaps), (ids, snaps)
            for k in range(len(ids) - 1):
                if not snaps[k + 1].startswith(snaps[k]):
                    now = tok.decode(ids[:k + 2], skip)
                    assert not now.startswith(snaps[k]), (ids[:k + 2], snaps[k], snaps[k + 1], now)


def test_incremental_detokenizer_window_is_short(tiny_chatml_next):
    """1k tokens: each push decodes a short window, not the whole sequence."""
    tok = Tokenizer.from_dir(tiny_chatml_next, "json")
    ids: list[int] = []
    for seq in _realistic_ids(tok, seed=3, n=100):  # whole sequences: no cut inside a character
        ids += seq
        if len(ids) >= 1000:
            break
    assert len(ids) >= 1000
    lengths = []
    decode = tok.decode
    tok.decode = lambda window, skip_special_tokens=True: (
        lengths.append(len(window)), decode(window, skip_special_tokens))[1]
    snaps, final = _stream(tok, ids)
    assert final == decode(ids) and final.startswith(snaps[-1])
    assert max(lengths[:-1]) <= 40 and sum(lengths) < 20 * len(ids), (max(lengths), sum(lengths))


@pytest.mark.parametrize("backend", BACKENDS)
def test_incremental_detokenizer_holds_byte_runs_until_they_end(tiny_chatml_next, backend):
    """<0x41> alone decodes to "A", but <0x41><0xF4> is invalid UTF-8 and decodes to "\ufffd\ufffd":
    showing "A" early would be rewritten later, so the run is held until a non-byte token."""
    tok = Tokenizer.from_dir(tiny_chatml_next, backend)
    a, bad = tok.token_id("<0x41>"), tok.token_id("<0xF4>")
    word = tok.encode(" cat", add_special_tokens=False)
    ids = [*word, a, tok.vocab_size + 3, bad, *word]  # an id past the vocab inside the run
    assert tok.decode([a]) == "A" and tok.decode([a, bad]) == "\ufffd\ufffd"
    snaps, final = _stream(tok, ids)
    assert all(y.startswith(x) for x, y in zip(snaps, snaps[1:])), snaps
    assert "A" not in "".join(snaps)
    assert final == tok.decode(ids) and final.startswith(snaps[-1])
