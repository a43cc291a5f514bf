"""Prompt ids with each image placeholder expanded to its image's feature count.

Two conventions, chosen by whether the tokenizer knows the image token:
- llava-hf (`<image>` is an added token): the processor replaces the single `<image>` in the text by
  `num_image_tokens` copies and tokenizes the result; the model scatters image features into exactly
  those positions.
- original liuhaotian checkpoints (no `<image>` token): the repo's `tokenizer_image_token` splits
  the prompt on "<image>", tokenizes each chunk on its own (so each chunk gets BOS and its own
  leading `▁`), keeps BOS only on the first chunk and splices a sentinel between chunks; here the
  sentinel becomes `num_image_tokens` copies of the caller's `image_token_id`.

A rendered prompt that already starts with the BOS string (templates with `{{ bos_token }}`) is
tokenized without adding another BOS, as transformers' `apply_chat_template(tokenize=True)` does.
"""

from __future__ import annotations

from typing import Sequence

from .tokenizer import Tokenizer


def build_input_ids(tokenizer: Tokenizer, rendered: str, image_token: str,
                    image_token_id: int | None, num_image_tokens: int | Sequence[int]) -> list[int]:
    """Token ids of `rendered` with each `image_token` expanded, in order, to its image's count.

    `num_image_tokens`: one count per image (an int means exactly one image; an empty sequence a
    text-only prompt). The rendered prompt must hold exactly one `image_token` per image: a
    count mismatch (e.g. a literal "<image>" typed in the text) is refused, never guessed."""
    counts = [num_image_tokens] if isinstance(num_image_tokens, int) else list(num_image_tokens)
    found = rendered.count(image_token)
    if found != len(counts):
        want = "one" if len(counts) == 1 else len(counts)
        raise ValueError(f"the rendered prompt must contain exactly {want} {image_token!r}, "
                         f"found {found} (one per image): {rendered!r}")
    if any(n < 1 for n in counts):
        raise ValueError(f"num_image_tokens must be >= 1 per image, got {counts}")
    add_special = not (tokenizer.bos_token and rendered.startswith(tokenizer.bos_token))
    known_id = tokenizer.token_id(image_token)
    first, *rest = rendered.split(image_token)
    if known_id is not None:
        if image_token_id is not None and image_token_id != known_id:
            raise ValueError(f"image token {image_token!r} has id {known_id} in the tokenizer "
                             f"but the model config says {image_token_id}")
        expanded = first + "".join(image_token * n + chunk for n, chunk in zip(counts, rest))
        return tokenizer.encode(expanded, add_special_tokens=add_special)
    if image_token_id is None and counts:
        raise ValueError(f"the tokenizer has no {image_token!r} token and no image_token_id "
                         "was given")
    ids = tokenizer.encode(first, add_special_tokens=add_special)
    # tokenizer_image_token: when the first chunk starts with BOS, the later chunks drop theirs.
    drop_bos = bool(ids) and ids[0] == tokenizer.bos_id
    for n, chunk in zip(counts, rest):
        chunk_ids = tokenizer.encode(chunk, add_special_tokens=True)
        if drop_bos and chunk_ids[:1] == [tokenizer.bos_id]:
            chunk_ids = chunk_ids[1:]
        ids += [image_token_id] * n + chunk_ids
    return ids
