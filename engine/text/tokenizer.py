"""Tokenizer for LLaVA checkpoints: ids identical to transformers 5's for the same folder.

Two backends behind one contract:
- "json": `tokenizer.json` through the `tokenizers` library, which is exactly what transformers 5
  runs for llava / llava_next checkpoints: it loads them as `TokenizersBackend` and takes
  tokenizer.json as it is. When tokenizer.json exists transformers even drops the
  add_bos_token / add_eos_token of tokenizer_config.json: BOS/EOS come from tokenizer.json's
  post-processor alone.
- "sentencepiece": `tokenizer.model` through `sentencepiece` (spm.py), plus the added/special tokens
  listed in tokenizer.json "added_tokens", tokenizer_config.json "added_tokens_decoder",
  added_tokens.json and the named special tokens. Metaspace / BOS / EOS / decode-strip settings are
  read from tokenizer.json when it ships (as plain JSON: no `tokenizers` needed), else from
  tokenizer_config.json with LlamaTokenizer's (transformers 5) defaults: add_bos_token true,
  add_eos_token false, add_prefix_space true, legacy false. legacy true means every text segment
  after an added token also gets a `▁` prefix.

Ids past the tokenizer's size (the model vocab is padded to a multiple of 64) decode to nothing, as
in transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

from fastllava.checkpoint_files import damaged, read_json, read_json_if_present, read_text

from .spm import AddedToken, SentencePieceBackend, load_sentencepiece

_NAMED = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    """Encode/decode for one checkpoint folder. Build with `Tokenizer.from_dir`."""

    def __init__(self, backend: str, impl, names: dict[str, str | None],
                 special_ids: frozenset[int], vocab_size: int,
                 prefix_ids: tuple[int, ...] = (), suffix_ids: tuple[int, ...] = ()):
        self.backend = backend
        self._impl = impl
        self.bos_token, self.eos_token = names.get("bos_token"), names.get("eos_token")
        self.unk_token, self.pad_token = names.get("unk_token"), names.get("pad_token")
        self.bos_id, self.eos_id, self.pad_id = (
            self.token_id(t) if t is not None else None
            for t in (self.bos_token, self.eos_token, self.pad_token))
        self.special_ids = special_ids
        self.vocab_size = vocab_size
        # sentencepiece backend only: what add_special_tokens puts around the text (BOS / EOS)
        self._prefix_ids, self._suffix_ids = list(prefix_ids), list(suffix_ids)

    @classmethod
    def from_dir(cls, path, backend: str = "auto") -> "Tokenizer":
        """Load from a checkpoint folder. backend: "auto" | "json" | "sentencepiece"."""
        folder = Path(path)
        if backend not in ("auto", "json", "sentencepiece"):
            raise ValueError(f"tokenizer backend {backend!r} is not one of "
                             "auto, json, sentencepiece")
        has_json = (folder / "tokenizer.json").is_file()
        if backend == "auto":
            if not has_json and not (folder / "tokenizer.model").is_file():
                raise ValueError(f"no tokenizer in {folder}: looked for tokenizer.json "
                                 "(tokenizers) and tokenizer.model (sentencepiece)")
            backend = "json" if has_json and _importable("tokenizers") else "sentencepiece"
        wanted = "tokenizer.json" if backend == "json" else "tokenizer.model"
        if not (folder / wanted).is_file():
            raise ValueError(f"no {wanted} in {folder} (the {backend!r} tokenizer backend "
                             "needs it)")
        config = read_json_if_present(folder / "tokenizer_config.json")
        special_map = read_json_if_present(folder / "special_tokens_map.json")
        names = {k: _content(config.get(k)) or _content(special_map.get(k)) for k in _NAMED}
        if backend == "json":
            # The other backend's files are checked too: which backend runs depends on the
            # machine (is `tokenizers` installed?), a damaged checkpoint must fail on every one.
            read_json_if_present(folder / "added_tokens.json")
            if (folder / "tokenizer.model").is_file():
                load_sentencepiece(folder / "tokenizer.model")
            return cls._from_json(folder, names)
        return cls._from_sentencepiece(folder, config, special_map, names)

    @classmethod
    def _from_json(cls, folder: Path, names: dict) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = folder / "tokenizer.json"
        text = read_text(path)
        try:
            tok = HFTokenizer.from_str(text)
        except Exception as e:  # the library raises a bare Exception for a file it cannot load
            tok, problem = None, (str(e).splitlines() or [type(e).__name__])[0]
        if tok is None:
            read_json(path)  # a JSON syntax error: the line:col message naming the file
            raise damaged(path, f"the tokenizers library cannot load it: {problem}")
        tok.no_truncation()  # a prompt is never silently cut; the engine checks lengths itself
        tok.no_padding()
        added = tok.get_added_tokens_decoder()
        special = frozenset(i for i, t in added.items() if t.special)
        return cls("json", tok, names, special, tok.get_vocab_size(with_added_tokens=True))

    @classmethod
    def _from_sentencepiece(cls, folder: Path, config: dict, special_map: dict,
                            names: dict) -> "Tokenizer":
        tj = read_json_if_present(folder / "tokenizer.json") or None
        scheme, strip, add_bos, add_eos = _spm_settings(config, tj)
        impl = SentencePieceBackend(folder / "tokenizer.model", scheme, strip)
        impl.set_added(_added_tokens(folder, config, tj))
        sp = impl.sp
        for name, sp_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                            ("unk_token", sp.unk_id())):
            if names[name] is None and sp_id >= 0:  # LlamaTokenizer defaults: the model's pieces
                names[name] = sp.id_to_piece(sp_id)
        # Named and additional special tokens and control pieces are split out of raw text too,
        # and are special (skipped by decode) even when listed as plain added tokens.
        extra = [t for t in names.values() if t is not None]
        for source in (config, special_map):
            for key in ("additional_special_tokens", "extra_special_tokens"):
                value = source.get(key) or []
                value = value.values() if isinstance(value, dict) else value
                extra += [_content(v) for v in value]
        extra += [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                  if sp.is_control(i) or sp.is_unknown(i)]
        by_content = {t.content: t for t in impl.added}
        for content in dict.fromkeys(extra):
            tid = impl.token_id(content) if content else None
            if tid is not None:
                base = by_content.get(content, AddedToken(content, tid))
                by_content[content] = dataclasses.replace(base, special=True)
        impl.set_added(list(by_content.values()))
        special = frozenset(t.id for t in impl.added if t.special)
        size = len({*range(impl.piece_size), *(t.id for t in impl.added)})
        if tj is not None:  # BOS/EOS exactly as tokenizer.json's post-processor adds them
            prefix, suffix = _template_ends(tj)
        else:
            bos, eos = (impl.token_id(names[k]) if names[k] else None
                        for k in ("bos_token", "eos_token"))
            prefix = [bos] if add_bos and bos is not None else []
            suffix = [eos] if add_eos and eos is not None else []
        return cls("sentencepiece", impl, names, special, size, tuple(prefix), tuple(suffix))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, as transformers' `tokenizer(text).input_ids`."""
        if self.backend == "json":
            return self._impl.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._impl.encode(text)
        return self._prefix_ids + ids + self._suffix_ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`, as transformers' `decode`; unknown ids (past the vocab) are dropped."""
        ids = [int(i) for i in ids]
        ids = [i for i in ids if 0 <= i < 2**32]  # tokenizers takes u32 and drops unknown ids
        if self.backend == "json":
            return self._impl.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._impl.decode(ids, self.special_ids if skip_special_tokens else frozenset())

    @functools.cached_property
    def byte_ids(self) -> frozenset[int]:
        """Ids of byte-fallback pieces (`<0x00>`..`<0xFF>`): runs of them spell multi-byte
        characters, and decode turns a run that is not valid UTF-8 into U+FFFD as a whole."""
        if self.backend == "json":
            vocab = self._impl.get_vocab(with_added_tokens=False)
            return frozenset(i for piece, i in vocab.items() if _BYTE_PIECE.fullmatch(piece))
        sp = self._impl.sp
        return frozenset(i for i in range(sp.get_piece_size()) if sp.is_byte(i))

    def token_id(self, token: str) -> int | None:
        """Id of an exact token string (added tokens included), or None."""
        if self.backend == "json":
            return self._impl.token_to_id(token)
        return self._impl.token_id(token)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _content(value) -> str | None:
    """A token given as a string or as a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_tokens(folder: Path, config: dict, tj: dict | None) -> list[AddedToken]:
    """Added tokens by id. First source wins: tokenizer.json, tokenizer_config.json
    "added_tokens_decoder", added_tokens.json (plain, non-special entries)."""
    by_id: dict[int, AddedToken] = {}
    flags = ("special", "lstrip", "rstrip", "single_word")
    for entry in (tj or {}).get("added_tokens", []):
        tid = int(entry["id"])
        by_id.setdefault(tid, AddedToken(entry["content"], tid,
                                         **{f: bool(entry.get(f, False)) for f in flags}))
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        entry = entry if isinstance(entry, dict) else {"content": str(entry)}
        tid = int(key)
        by_id.setdefault(tid, AddedToken(entry["content"], tid,
                                         **{f: bool(entry.get(f, f == "special")) for f in flags}))
    for content, tid in read_json_if_present(folder / "added_tokens.json").items():
        by_id.setdefault(int(tid), AddedToken(content, int(tid), special=False))
    return [by_id[i] for i in sorted(by_id)]


def _spm_settings(config: dict, tj: dict | None) -> tuple[str, int, bool, bool]:
    """(prepend scheme, leading spaces stripped by decode, add_bos, add_eos) for sentencepiece."""
    add_bos = bool(config.get("add_bos_token", True))
    add_eos = bool(config.get("add_eos_token", False))
    if tj is None:
        add_prefix_space = config.get("add_prefix_space")
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        legacy = bool(config.get("legacy", False))
        scheme = ("always" if legacy else "first") if add_prefix_space else "never"
        return scheme, int(add_prefix_space), add_bos, add_eos
    scheme = "never"
    for pre in _flatten(tj.get("pre_tokenizer"), "pretokenizers"):
        if pre.get("type") == "Metaspace":  # older files: add_prefix_space instead of a scheme
            scheme = pre.get("prepend_scheme") or (
                "always" if pre.get("add_prefix_space", True) else "never")
    for norm in _flatten(tj.get("normalizer"), "normalizers"):
        if norm.get("type") == "Prepend" and norm.get("prepend") == "\u2581":
            scheme = "prepend"
    strip = 0
    for dec in _flatten(tj.get("decoder"), "decoders"):
        if dec.get("type") == "Strip" and dec.get("content") == " ":
            strip += int(dec.get("start", 0))
        elif dec.get("type") == "Metaspace" and scheme != "never":
            strip += 1  # approximates the Metaspace decoder's first-token `▁` removal
    return scheme, strip, add_bos, add_eos


def _flatten(node: dict | None, key: str) -> list[dict]:
    """A tokenizer.json component and, for a `Sequence`, its members."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [n for child in node.get(key, []) for n in _flatten(child, key)]
    return [node]


def _template_ends(tj: dict) -> tuple[list[int], list[int]]:
    """Ids a tokenizer.json TemplateProcessing puts before and after a single sequence."""
    pp = next((p for p in _flatten(tj.get("post_processor"), "processors")
               if p.get("type") == "TemplateProcessing"), None)
    before: list[int] = []
    after: list[int] = []
    seen_sequence = False
    for item in (pp or {}).get("single", []):
        if "Sequence" in item:
            seen_sequence = True
        elif "SpecialToken" in item:
            token = pp.get("special_tokens", {}).get(item["SpecialToken"]["id"], {})
            (after if seen_sequence else before).extend(int(i) for i in token.get("ids", []))
    return before, after
