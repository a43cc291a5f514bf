"""OpenAI chat fields the engine cannot honour are refused with a 400 naming the field, never
ignored (a 200 with other output than asked); their "off" values pass. parse_chat is called
directly: no server, no model."""

from __future__ import annotations

import pytest

from fastllava.server.chat import parse_chat
from fastllava.server.errors import ApiError
from fastllava.server.settings import ServerSettings

MODEL = "fal-ai/llava-next"
SETTINGS = ServerSettings(model="unused")


def _parse(**fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat(body, SETTINGS, [MODEL])


@pytest.mark.parametrize("field, value", [
    ("top_k", 1), ("top_k", 50), ("min_p", 0.1), ("repetition_penalty", 1.2),
    ("min_tokens", 10), ("stop_token_ids", [2]), ("best_of", 3),
    ("use_beam_search", True), ("guided_json", {"type": "object"}), ("guided_regex", "a+"),
    ("guided_choice", ["a", "b"]), ("guided_grammar", "root ::= 'a'"),
    ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
    ("frequency_penalty", 0.5), ("logit_bias", {"42": 5}),
])
def test_fields_the_engine_cannot_honour_are_a_400_naming_them(field, value):
    with pytest.raises(ApiError) as e:
        _parse(**{field: value})
    assert (e.value.status, e.value.param) == (400, field), (e.value.status, e.value.detail)
    assert field in str(e.value.detail)


@pytest.mark.parametrize("field, value", [
    ("top_k", -1), ("top_k", 0), ("min_p", 0), ("min_p", 0.0), ("repetition_penalty", 1.0),
    ("min_tokens", 0), ("stop_token_ids", []), ("best_of", 1),
    ("use_beam_search", False), ("modalities", ["text"]), ("guided_json", None),
    ("frequency_penalty", 0.0), ("presence_penalty", 0), ("tools", []), ("logit_bias", {}),
])
def test_their_off_values_pass(field, value):
    assert _parse(**{field: value}).request["prompt"] == "hi"


@pytest.mark.parametrize("value, want", [(None, False), (False, False), (True, True)])
def test_ignore_eos_is_a_boolean(value, want):
    assert _parse(ignore_eos=value).ignore_eos is want


@pytest.mark.parametrize("value", ["true", 1, 0, [True]])
def test_ignore_eos_of_another_type_is_a_400(value):
    with pytest.raises(ApiError) as e:
        _parse(ignore_eos=value)
    assert (e.value.status, e.value.param) == (400, "ignore_eos"), e.value.detail


@pytest.mark.parametrize("value", ["12", 0, -3, 2.5, True])
def test_a_malformed_max_tokens_beside_max_completion_tokens_is_a_400(value):
    with pytest.raises(ApiError) as e:
        _parse(max_completion_tokens=8, max_tokens=value)
    assert (e.value.status, e.value.param) == (400, "max_tokens"), e.value.detail


def test_max_completion_tokens_wins_and_is_named():
    chat = _parse(max_completion_tokens=8, max_tokens=3)
    assert (chat.request["max_tokens"], chat.budget) == (8, "max_completion_tokens")
    assert _parse(max_tokens=3).budget == "max_tokens"


@pytest.mark.parametrize("value", [0, 1, "false", [], {}])
def test_stream_of_another_type_is_a_400_even_when_falsy(value):
    with pytest.raises(ApiError) as e:
        _parse(stream=value)
    assert (e.value.status, e.value.param) == (400, "stream"), e.value.detail
