"""fastllava.messages.chat_messages: the Python API's chat input, checked before any model work.

Every malformed chat is a RequestValidationError on `messages` (a ValueError naming the problem),
never another exception from deeper down (the tokenizer, a dict lookup)."""

from __future__ import annotations

import pytest

from fastllava.messages import chat_messages
from fastllava.schema import RequestValidationError


@pytest.mark.parametrize("role", [["user"], {"a": 1}, 3, None])
def test_a_role_that_is_not_a_string_is_named(role):
    with pytest.raises(RequestValidationError, match=r"messages\[0\]\.role") as e:
        chat_messages([{"role": role, "content": "hi"}])
    assert e.value.field == "messages"


@pytest.mark.parametrize("content, where", [
    ("a\ud800b", r"messages\[1\]\.content "),
    ([{"type": "text", "text": "ok"}, {"type": "text", "text": "\udfff"}],
     r"messages\[1\]\.content\[1\]\.text "),
])
def test_a_lone_surrogate_in_any_message_text_is_named(content, where):
    # Also when the request gives its own prompt: the messages' text is what gets tokenized.
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]
    with pytest.raises(RequestValidationError, match=where + "must be valid Unicode") as e:
        chat_messages(messages)
    assert (e.value.field, e.value.type) == ("messages", "string_unicode")


def test_valid_unicode_text_passes_unchanged():
    text = "naïve 東京 😀 \x00 tab\t"
    assert chat_messages([{"role": "user", "content": text}]) == [
        {"role": "user", "content": [{"type": "text", "text": text}]}]
