"""Prompt ids with the image placeholder expanded to the image's feature count.

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

from .tokenizer import Tokenizer


def build_input_ids(tokenizer: Tokenizer, rendered: str, image_token: str,
                    image_token_id: int | None, num_image_tokens: int) -> list[int]:
    """Token ids of `rendered` with its one `image_token` expanded to `num_image_tokens` ids."""
    count = rendered.count(image_token)
    if count != 1:
        raise ValueError(f"the rendered prompt must contain exactly one {image_token!r}, "
                         f"found {count}: {rendered!r}")
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    add_special = not (tokenizer.bos_token and rendered.startswith(tokenizer.bos_token))
    known_id = tokenizer.token_id(image_token)
    if known_id is not None:
        if image_token_id is not None and image_token_id != known_id:
            raise ValueError(f"image token {image_token!r} has id {known_id} in the tokenizer "
                             f"but the model config says {image_token_id}")
        expanded = rendered.replace(image_token, image_token * num_image_tokens)
        return tokenizer.encode(expanded, add_special_tokens=add_special)
    if image_token_id is None:
        raise ValueError(f"the tokenizer has no {image_token!r} token and no image_token_id "
                         "was given")
    first, *rest = rendered.split(image_token)
    ids = tokenizer.encode(first, add_special_tokens=add_special)
    # tokenizer_image_token: when the first chunk starts with BOS, the later chunks drop theirs.
    drop_bos = bool(ids) and ids[0] == tokenizer.bos_id
    for chunk in rest:
        chunk_ids = tokenizer.encode(chunk, add_special_tokens=True)
        if drop_bos and chunk_ids[:1] == [tokenizer.bos_id]:
            chunk_ids = chunk_ids[1:]
        ids += [image_token_id] * num_image_tokens + chunk_ids
    return ids
