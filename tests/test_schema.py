"""The fal request schema: accepted values, rejected values with pydantic's error types, order."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import types
from fractions import Fraction

import pytest

from fastllava.schema import (
    FIELDS,
    GenerationRequest,
    RequestValidationError,
    parse_request,
    validate_all,
)

BASE = {"image_url": "https://example.com/cat.png", "prompt": "What is in this image?"}


def req(**fields):
    return {**BASE, **fields}


def test_defaults_are_fal_defaults():
    r = parse_request(BASE)
    assert r == GenerationRequest(BASE["image_url"], BASE["prompt"], 64, 0.2, 1.0, None), r
    assert validate_all(BASE) == []


def test_values_are_normalized_and_kept():
    r = parse_request(req(max_tokens=7, temperature=1, top_p=Fraction(1, 2), seed=123,
                          prompt="  padded prompt \n"))
    assert (r.max_tokens, r.temperature, r.top_p, r.seed) == (7, 1.0, 0.5, 123), r
    assert type(r.temperature) is float and type(r.top_p) is float, r
    assert r.prompt == "  padded prompt \n", "the prompt is validated, not rewritten"
    assert parse_request(req(seed=None)).seed is None


def test_request_is_frozen():
    r = parse_request(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.max_tokens = 5  # type: ignore[misc]


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 1), ("max_tokens", 4096),
    ("temperature", 0), ("temperature", 0.0), ("temperature", 2), ("temperature", 2.0),
    ("top_p", 1), ("top_p", 1e-9), ("top_p", 0.9),
    ("seed", 0), ("seed", 2**63 - 1),
    ("image_url", "data:image/png;base64,iVBORw0KGgo="), ("image_url", "/tmp/cat.png"),
    ("prompt", "x" * 16384),
])
def test_boundary_values_accepted(field, value):
    r = parse_request(req(**{field: value}))
    assert getattr(r, field) == value, (field, value, r)


@pytest.mark.parametrize("field,value,type_,says", [
    ("image_url", "", "string_too_short", "non-empty"),
    ("image_url", "   ", "string_too_short", "non-empty"),
    ("image_url", 5, "string_type", "got int 5"),
    ("image_url", None, "string_type", "got null"),
    ("prompt", "", "string_too_short", "non-empty"),
    ("prompt", " \n\t", "string_too_short", "whitespace"),
    ("prompt", ["hi"], "string_type", "got list"),
    ("prompt", "x" * 16385, "string_too_long", "at most 16384 characters, got 16385"),
    ("prompt", "ok \ud800", "string_unicode", "lone UTF-16 surrogate at index 3"),  # tokenizer
    ("image_url", "\udfff", "string_unicode", "at index 0"),
    ("max_tokens", 0, "greater_than_equal", "must be an integer between 1 and 4096, got 0"),
    ("max_tokens", -3, "greater_than_equal", "got -3"),
    ("max_tokens", 4097, "less_than_equal", "between 1 and 4096, got 4097"),
    ("max_tokens", 64.0, "int_type", "got float 64.0"),
    ("max_tokens", 1.5, "int_type", "got float 1.5"),
    ("max_tokens", True, "int_type", "got bool True"),
    ("max_tokens", "64", "int_type", "got str '64'"),
    ("max_tokens", None, "int_type", "got null"),
    ("temperature", -0.1, "greater_than_equal", "[0, 2]"),
    ("temperature", 2.01, "less_than_equal", "got 2.01"),
    ("temperature", 10**400, "less_than_equal", "..."),  # huge int: no float overflow, elided
    pytest.param("seed", 10**5000, "less_than", "an integer of 16610 bits",  # past the digit
                 id="seed-10**5000"),                                        # limit of repr()
    ("temperature", math.nan, "finite_number", "got nan"),
    ("temperature", math.inf, "finite_number", "got inf"),
    ("temperature", False, "float_type", "got bool False"),
    ("temperature", "0.5", "float_type", "got str '0.5'"),
    ("temperature", None, "float_type", "got null"),
    ("top_p", 0, "greater_than", "(0, 1]"),
    ("top_p", 0.0, "greater_than", "got 0.0"),
    ("top_p", -1, "greater_than", "got -1"),
    ("top_p", 1.0000001, "less_than_equal", "(0, 1]"),
    ("top_p", -math.inf, "finite_number", "got -inf"),
    ("top_p", True, "float_type", "got bool"),
    ("seed", -1, "greater_than_equal", "got -1"),
    ("seed", 2**63, "less_than", "2**63"),
    ("seed", 1.0, "int_type", "got float 1.0"),
    ("seed", True, "int_type", "got bool"),
    ("seed", "7", "int_type", "got str"),
])
def test_invalid_value_names_field_and_type(field, value, type_, says):
    with pytest.raises(RequestValidationError) as info:
        parse_request(req(**{field: value}))
    e = info.value
    assert isinstance(e, ValueError)
    assert (e.field, e.type) == (field, type_), (str(e), e.type)
    assert str(e).startswith(f"{field}: "), str(e)
    assert says in str(e), str(e)
    assert len(str(e)) < 300, f"message not elided: {len(str(e))} chars"
    assert [(x.field, x.type) for x in validate_all(req(**{field: value}))] == [(field, type_)]


def test_caller_image_url_check_is_listed_with_the_other_problems():
    def refuse(url):
        raise RequestValidationError("image_url", f"refused {url}", "image_url_refused")

    errors = validate_all(req(prompt="", max_tokens=0, colour=1), check_image_url=refuse)
    assert [(e.field, e.type) for e in errors] == [
        ("colour", "extra_forbidden"), ("image_url", "image_url_refused"),
        ("prompt", "string_too_short"), ("max_tokens", "greater_than_equal")], errors
    assert validate_all(req(image_url=""), check_image_url=refuse)[0].type == "string_too_short"


@pytest.mark.parametrize("missing", ["image_url", "prompt"])
def test_missing_required_field(missing):
    data = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(RequestValidationError) as info:
        parse_request(data)
    assert (info.value.field, info.value.type) == (missing, "missing"), str(info.value)
    assert str(info.value).startswith(f"{missing}: field required"), str(info.value)


@pytest.mark.parametrize("body", [[BASE], "image_url=x", None, 3, b"{}"])
def test_body_must_be_a_mapping(body):
    with pytest.raises(RequestValidationError) as info:
        parse_request(body)
    e = info.value
    assert (e.field, e.type, e.loc) == ("body", "model_type", ("body",)), (str(e), e.loc)
    assert type(body).__name__ in str(e), str(e)
    assert [x.field for x in validate_all(body)] == ["body"]


def test_any_mapping_is_accepted():
    assert parse_request(types.MappingProxyType(BASE)).prompt == BASE["prompt"]


def test_unknown_fields_all_named_sorted():
    data = req(stream=True, n=2, Temperature=0.5)
    with pytest.raises(RequestValidationError) as info:
        parse_request(data)
    e = info.value
    assert (e.field, e.type) == ("Temperature", "extra_forbidden"), str(e)
    msg = str(e)
    assert "'Temperature', 'n', 'stream'" in msg, msg
    assert "accepted fields are image_url, prompt, max_tokens, temperature, top_p, seed" in msg, msg
    # validate_all: one error per field, FastAPI's shape, sorted.
    assert [x.to_dict() for x in validate_all(data)] == [
        {"loc": ["body", name], "msg": x.msg, "type": "extra_forbidden"}
        for name, x in zip(["Temperature", "n", "stream"], validate_all(data))]


def test_unknown_non_string_keys_do_not_crash_sorting():
    errors = validate_all({**BASE, 1: "a", "b": 2})
    assert [(x.field, x.type) for x in errors] == [("1", "extra_forbidden"),
                                                   ("b", "extra_forbidden")], errors


def test_first_error_follows_stable_field_order():
    bad = {"seed": -1, "top_p": 0, "temperature": 9, "max_tokens": 0, "prompt": "",
           "image_url": 1, "zzz": 0}
    order = ["zzz", "image_url", "prompt", "max_tokens", "temperature", "top_p", "seed"]
    assert [x.field for x in validate_all(bad)] == order
    # Fix one field at a time: the reported field walks through the order.
    fixes = {"zzz": None, **BASE, "max_tokens": 64, "temperature": 0.2, "top_p": 1.0, "seed": 1}
    data = dict(bad)
    for field in order:
        with pytest.raises(RequestValidationError) as info:
            parse_request(data)
        assert info.value.field == field, (field, str(info.value), data)
        if fixes[field] is None:
            del data[field]
        else:
            data[field] = fixes[field]
    assert parse_request(data).seed == 1


def test_custom_limits():
    with pytest.raises(RequestValidationError,
                       match=r"max_tokens: must be an integer between 1 and 10, got 11"):
        parse_request(req(max_tokens=11), max_tokens_limit=10)
    assert parse_request(req(max_tokens=10), max_tokens_limit=10).max_tokens == 10
    with pytest.raises(RequestValidationError,
                       match=r"prompt: must be at most 5 characters, got 6"):
        parse_request(req(prompt="abcdef"), max_prompt_chars=5)
    errors = validate_all(req(prompt="abcdef"), max_prompt_chars=5)
    assert [x.type for x in errors] == ["string_too_long"], errors


def test_max_new_tokens_alias_from_fal_llavav15():
    assert parse_request(req(max_new_tokens=9)).max_tokens == 9
    with pytest.raises(RequestValidationError) as info:  # the error uses the client's spelling
        parse_request(req(max_new_tokens=0))
    e = info.value
    assert (e.field, e.type) == ("max_new_tokens", "greater_than_equal"), str(e)
    with pytest.raises(RequestValidationError) as info:
        parse_request(req(max_new_tokens=9, max_tokens=9))
    assert info.value.field == "max_new_tokens" and "not both" in str(info.value), str(info.value)


def test_error_to_dict_and_loc():
    (e,) = validate_all(req(top_p=2))
    assert e.to_dict() == {"loc": ["body", "top_p"], "msg": "must be a number in (0, 1], got 2",
                           "type": "less_than_equal"}, e.to_dict()
    assert e.input == 2 and str(e) == "top_p: " + e.msg
    assert FIELDS == tuple(f.name for f in dataclasses.fields(GenerationRequest))


def test_matches_pydantic_vocabulary():
    """Same (loc, type) as an equivalent strict pydantic model, where pydantic is installed."""
    pydantic = pytest.importorskip("pydantic")
    from typing import Annotated, Optional

    from pydantic import ConfigDict, Field, StrictInt, StrictStr

    class Model(pydantic.BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
        image_url: Annotated[StrictStr, Field(min_length=1)]
        prompt: Annotated[StrictStr, Field(min_length=1, max_length=16384)]
        max_tokens: Annotated[StrictInt, Field(ge=1, le=4096)] = 64
        temperature: Annotated[float, Field(ge=0, le=2)] = 0.2
        top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
        seed: Annotated[Optional[StrictInt], Field(ge=0, lt=2**63)] = None

    cases = [
        [], {}, req(), req(extra=1, other=2), req(image_url="", prompt="x" * 16385),
        req(max_tokens=0, temperature=-1, top_p=0, seed=-1),
        req(max_tokens=5000, temperature=3, top_p=1.5, seed=2**63),
        req(max_tokens=64.0, temperature=True, top_p=None, seed=1.0),
        req(max_tokens=True, temperature=math.nan, top_p=math.inf, seed="1"),
        req(image_url=3, prompt=None, temperature="0.3"),
    ]
    for data in cases:
        try:
            Model.model_validate(data)
            theirs = set()
        except pydantic.ValidationError as exc:
            theirs = {(("body",) + tuple(e["loc"]), e["type"]) for e in exc.errors()}
        ours = {(e.loc, e.type) for e in validate_all(data)}
        assert ours == theirs, (data, sorted(ours), sorted(theirs))


def test_schema_and_cli_import_no_torch():
    code = ("import sys, fastllava.schema, fastllava.cli; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
