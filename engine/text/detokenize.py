"""Streaming detokenization: cumulative text after each generated id, in O(window) per token.

Decoding one id at a time is wrong for sentencepiece-style tokenizers: a piece's leading space is
stripped when it starts the decoded text, and multi-byte characters arrive as several `<0xNN>` byte
tokens. The prefix-offset technique (vLLM / TGI) decodes a short window twice per step:

    prefix_text = decode(ids[prefix:read])    # text already emitted, re-decoded as context
    window_text = decode(ids[prefix:])        # the same plus the new tokens
    new = window_text[len(prefix_text):]

and emits `new` only when it is non-empty and does not end in U+FFFD (an incomplete UTF-8 sequence
still waiting for its last bytes); then prefix←read, read←len(ids). The window is the tokens of the
previous emission plus those pending, so a step costs O(tokens per character), not O(n).
A trailing run of byte-fallback tokens is held back until a non-byte token ends it: decode maps a
run that is not valid UTF-8 to U+FFFD as a whole, so bytes shown early (even ASCII) could be
rewritten later.
When the window's text does not extend its prefix (a decoder that rewrites earlier text), the step
falls back to one full decode. `text()` is always `tokenizer.decode(all ids)`.
"""

from __future__ import annotations

from .tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated ids one by one; each `push` returns the cumulative text so far."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._text = ""     # emitted so far: never ends inside an incomplete character
        self._prefix = 0    # start of the decode window
        self._read = 0      # ids[:read] are reflected in self._text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Append one id; return the cumulative text (held-back partial characters excluded)."""
        self.ids.append(int(token_id))
        if self._is_transparent(token_id):
            return self._text  # a byte run may still turn invalid: wait for a token that ends it
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        window_text = self._decode(self.ids[self._prefix:])
        if len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT):
            return self._text
        if window_text.startswith(prefix_text):
            self._text += window_text[len(prefix_text):]
        else:  # the window rewrote text it had already produced: trust a full decode once
            self._text = self._decode(self.ids)
        self._prefix, self._read = self._read, len(self.ids)
        return self._text

    def _is_transparent(self, token_id: int) -> bool:
        """Byte pieces, and ids that decode drops (past the vocab; skipped specials), which
        therefore don't end a byte run."""
        tok = self.tokenizer
        return (token_id in tok.byte_ids or not 0 <= token_id < tok.vocab_size
                or (self.skip_special_tokens and token_id in tok.special_ids))

    def text(self) -> str:
        """The final text, == tokenizer.decode(all ids) (flushes anything held back)."""
        return self._decode(self.ids)
