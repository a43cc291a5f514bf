"""sentencepiece backend reproducing a Llama-style tokenizer.json (Metaspace + byte-fallback BPE).

transformers 5 tokenizes Llama-family checkpoints with the `tokenizers` library: added tokens are
split out first (leftmost-longest); each remaining segment gets the Metaspace treatment (spaces
become `▁`, a `▁` is prepended according to the prepend scheme) and is BPE-encoded. Decoding maps
pieces back (`▁` → space, `<0xNN>` runs → UTF-8), fuses, and strips leading spaces. This module does
the same with `sentencepiece` doing the BPE, so checkpoints that ship only `tokenizer.model`
(original liuhaotian LLaVA), or machines without `tokenizers`, get the same ids.

Prepend schemes (what happens at the start of each text segment between added tokens):
- "first":   `▁` before the segment that starts the input, unless it starts with a space already
             (legacy=False: text right after a special token gets no `▁`).
- "always":  the same for every segment (legacy=True Metaspace).
- "prepend": an unconditional `▁` on every segment (older conversions: a Prepend("▁") normalizer).
- "never":   no prefix (add_prefix_space=False).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from pathlib import Path

from fastllava.checkpoint_files import damaged

SPIECE = "\u2581"  # ▁, sentencepiece's escaped space
PREPEND_SCHEMES = ("first", "always", "prepend", "never")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclasses.dataclass(frozen=True)
class AddedToken:
    """A token matched in raw text before the model sees it (special or not)."""

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


def split_added(text: str, added: list[AddedToken], pattern: re.Pattern | None = None
                ) -> list[tuple[int, str] | AddedToken]:
    """Split `text` on added tokens, leftmost-longest, as `tokenizers`' AddedVocabulary does.

    Returns, in order, `(start_offset, segment)` for the text between tokens (empty segments
    dropped) and the matched `AddedToken`s. `lstrip`/`rstrip` tokens swallow adjacent whitespace; a
    `single_word` token only matches between non-word characters. `pattern` is
    `added_pattern(added)`, passed in to avoid rebuilding it.
    """
    if not added:
        return [(0, text)] if text else []
    by_content = {t.content: t for t in added}
    out: list[tuple[int, str] | AddedToken] = []
    prev_end = 0
    for m in (pattern or added_pattern(added)).finditer(text):
        tok = by_content[m.group()]
        start, end = m.span()
        if start < prev_end:  # inside whitespace an rstrip token already swallowed
            continue
        if tok.single_word and ((start > 0 and _is_word(text[start - 1]))
                                or (end < len(text) and _is_word(text[end]))):
            continue
        if tok.lstrip:
            while start > prev_end and text[start - 1].isspace():
                start -= 1
        if tok.rstrip:
            while end < len(text) and text[end].isspace():
                end += 1
        if start > prev_end:
            out.append((prev_end, text[prev_end:start]))
        out.append(tok)
        prev_end = end
    if prev_end < len(text):
        out.append((prev_end, text[prev_end:]))
    return out


def added_pattern(added: list[AddedToken]) -> re.Pattern:
    # Python's alternation takes the first alternative that matches at the leftmost position:
    # longest first gives leftmost-longest.
    contents = sorted({t.content for t in added}, key=len, reverse=True)
    return re.compile("|".join(re.escape(c) for c in contents))


def _is_word(ch: str) -> bool:
    # Rust regex `\w` (what `tokenizers` checks): alphabetic, marks, Nd, Nl, Pc, joiners. Python's
    # isalnum() would also count No (², ፵), which tokenizers does not.
    return (ch.isalpha() or unicodedata.category(ch) in ("Nd", "Nl", "Mn", "Mc", "Me", "Pc")
            or ch in "\u200c\u200d")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf: bytes) -> list[tuple[int, bytes, bytes]]:
    """Protobuf wire-format fields: (number, raw bytes incl. key, payload if length-delimited)."""
    fields, pos = [], 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        payload = b""
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            payload = buf[pos:pos + length]
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in sentencepiece model")
        if pos > len(buf):
            raise ValueError(f"protobuf field {number} runs past the end of the data (cut short)")
        fields.append((number, buf[start:pos], payload))
    return fields


def raw_segment_model(proto: bytes) -> bytes:
    """The same sentencepiece ModelProto with `add_dummy_prefix` and `remove_extra_whitespaces` off.

    ModelProto field 3 is NormalizerSpec; its fields 3 (add_dummy_prefix) and 4
    (remove_extra_whitespaces) are bools. With both off, sentencepiece encodes exactly the string
    it is given, so the prefix `▁` and whitespace runs are ours to decide (transformers makes the
    same edit with protobuf for legacy=False; this avoids the protobuf dependency).
    """
    fields = _fields(proto)
    out = b"".join(raw for number, raw, _ in fields if number != 3)
    old = [payload for number, _, payload in fields if number == 3]
    spec = b"".join(r for n, r, _ in _fields(old[0]) if n not in (3, 4)) if old else b""
    spec += bytes([3 << 3, 0, 4 << 3, 0])  # varint fields 3 and 4 = false
    return out + bytes([(3 << 3) | 2]) + _encode_varint(len(spec)) + spec


def load_sentencepiece(model_path: Path):
    """A SentencePieceProcessor for `model_path` in raw-segment form (`raw_segment_model`); a file
    that does not parse, or was cut short, is a CheckpointError naming it."""
    import sentencepiece

    path = Path(model_path)
    proto = path.read_bytes()
    try:
        # The trainer writes the pieces (field 1) first, then trainer_spec (2) and
        # normalizer_spec (3): a file cut between two pieces still parses, but lacks both.
        if {number for number, _, _ in _fields(proto)} & {2, 3}:
            return sentencepiece.SentencePieceProcessor(model_proto=raw_segment_model(proto))
        problem = "the file is empty" if not proto else \
            "no trainer or normalizer spec after the pieces: it was cut short"
    except (IndexError, ValueError, RuntimeError) as e:  # truncated varint, bad wire type, parse
        problem = "sentencepiece cannot parse it: " + (str(e).splitlines() or [type(e).__name__])[0]
    raise damaged(path, problem)


class SentencePieceBackend:
    """Encode/decode with a `tokenizer.model`; Metaspace rules and added tokens around it."""

    def __init__(self, model_path: Path, prepend_scheme: str, strip_left: int):
        if prepend_scheme not in PREPEND_SCHEMES:
            raise ValueError(f"prepend_scheme {prepend_scheme!r} is not one of {PREPEND_SCHEMES}")
        self.sp = load_sentencepiece(model_path)
        self.prepend_scheme = prepend_scheme
        self.strip_left = strip_left
        self.piece_size = self.sp.get_piece_size()
        self.set_added([])

    def set_added(self, added: list[AddedToken]) -> None:
        """Tokens split out of raw text first; they may shadow or extend past the model's pieces."""
        self.added = sorted(added, key=lambda t: t.id)
        self._added_ids = {t.content: t.id for t in self.added}
        self._pattern = added_pattern(self.added) if self.added else None
        size = max([self.piece_size] + [t.id + 1 for t in self.added])
        self.id_to_piece: list[str | None] = [None] * size
        self.id_to_piece[:self.piece_size] = map(self.sp.id_to_piece, range(self.piece_size))
        for tok in self.added:
            self.id_to_piece[tok.id] = tok.content

    def token_id(self, token: str) -> int | None:
        if token in self._added_ids:
            return self._added_ids[token]
        i = self.sp.piece_to_id(token)
        return i if 0 <= i < self.piece_size and self.id_to_piece[i] == token else None

    def encode(self, text: str) -> list[int]:
        """Ids for `text`, no BOS/EOS."""
        ids: list[int] = []
        for part in split_added(text, self.added, self._pattern):
            if isinstance(part, AddedToken):
                ids.append(part.id)
                continue
            offset, segment = part
            segment = segment.replace(" ", SPIECE)
            starts_spaced = segment.startswith(SPIECE)
            if (self.prepend_scheme == "prepend"
                    or (self.prepend_scheme == "always" and not starts_spaced)
                    or (self.prepend_scheme == "first" and offset == 0 and not starts_spaced)):
                segment = SPIECE + segment
            ids += self.sp.encode(segment)
        return ids

    def decode(self, ids, skip_ids: frozenset[int]) -> str:
        """The `tokenizers` decoder chain Replace(▁→' ') → ByteFallback → Fuse → Strip(left).

        Unknown ids (past the vocabulary, e.g. the padded lm_head rows) are dropped, as in
        `tokenizers`. ByteFallback decodes each run of `<0xNN>` pieces as UTF-8; a run that is not
        valid UTF-8 becomes one U+FFFD per byte (the whole run, not just the bad bytes).
        """
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            if i in skip_ids or not 0 <= i < len(self.id_to_piece):
                continue
            piece = self.id_to_piece[i]
            if piece is None:
                continue
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                run.append(int(m.group(1), 16))
                continue
            if run:
                parts.append(_decode_bytes(run))
                run = bytearray()
            parts.append(piece.replace(SPIECE, " "))
        if run:
            parts.append(_decode_bytes(run))
        text = "".join(parts)
        n = 0
        while n < self.strip_left and n < len(text) and text[n] == " ":
            n += 1
        return text[n:]


def _decode_bytes(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)
