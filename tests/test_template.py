"""Chat templates and prompt ids: parity with transformers' processor on the tiny checkpoints."""

from __future__ import annotations

import json

import jinja2
import pytest
from PIL import Image

import tiny
from fastllava.prompt_inputs import PromptMixin
from fastllava.text.prompt import build_input_ids
from fastllava.text.template import (BUILTIN_TEMPLATES, _compile, load_chat_template, render_prompt,
                                     template_family)
from fastllava.text.tokenizer import Tokenizer
from test_tokenizer import BACKENDS, FIXTURES, VARIANTS, make_variant

PROMPTS = ["What is shown in this image?", "", "  leading and trailing  ", "line one\nline two",
           "東京 😀 {{ not jinja }} {% raw %}", "<s> and </s> as text", "USER: ASSISTANT:"]
DOCUMENTED = {
    "vicuna": "USER: <image>\n{text} ASSISTANT:",
    "mistral": "[INST] <image>\n{text} [/INST]",
    "chatml": "<|im_start|>user\n<image>\n{text}<|im_end|>\n<|im_start|>assistant\n",
}


def _messages(prompt: str, image=None) -> list[dict]:
    image_part = {"type": "image", "image": image} if image is not None else {"type": "image"}
    return [{"role": "user", "content": [image_part, {"type": "text", "text": prompt}]}]


def _processor(path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_render_matches_transformers(request, fixture):
    path = request.getfixturevalue(fixture)
    proc, tok = _processor(path), Tokenizer.from_dir(path)
    template = load_chat_template(path)
    assert template == proc.chat_template
    for prompt in PROMPTS:
        expected = proc.apply_chat_template(_messages(prompt), add_generation_prompt=True)
        assert render_prompt(template, prompt, tok) == expected, prompt


def test_load_chat_template_sources(tmp_path, tiny_next):
    shipped = load_chat_template(tiny_next)
    assert shipped == tiny.VICUNA_TEMPLATE
    bare = make_variant(tiny_next, tmp_path / "bare", drop=("chat_template.jinja",))
    assert load_chat_template(bare) is None
    (bare / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert load_chat_template(bare) == "from json"
    cfg_only = make_variant(tiny_next, tmp_path / "cfg", {"chat_template": "from config"},
                            drop=("chat_template.jinja",))
    assert load_chat_template(cfg_only) == "from config"
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "main"}]
    listed = make_variant(tiny_next, tmp_path / "list", {"chat_template": named},
                          drop=("chat_template.jinja",))
    assert load_chat_template(listed) == "main"
    unnamed = make_variant(tiny_next, tmp_path / "nodefault", {"chat_template": named[:1]},
                           drop=("chat_template.jinja",))
    with pytest.raises(ValueError, match="default"):
        load_chat_template(unnamed)


@pytest.mark.parametrize("family", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates(tiny_chatml_next, family):
    """Documented strings, and transformers renders the builtin identically (same environment)."""
    proc, tok = _processor(tiny_chatml_next), Tokenizer.from_dir(tiny_chatml_next)
    for prompt in PROMPTS:
        rendered = render_prompt(BUILTIN_TEMPLATES[family], prompt, tok)
        assert rendered == DOCUMENTED[family].format(text=prompt)
        assert rendered == proc.apply_chat_template(
            _messages(prompt), chat_template=BUILTIN_TEMPLATES[family], add_generation_prompt=True)


def test_family_fallback(tmp_path, tiny_next, tiny_chatml_next):
    for src, family in ((tiny_next, "vicuna"), (tiny_chatml_next, "chatml")):
        bare = make_variant(src, tmp_path / family, drop=("chat_template.jinja",))
        tok = Tokenizer.from_dir(bare)
        assert load_chat_template(bare) is None
        assert template_family(tok, "llama") == family
        rendered = render_prompt(BUILTIN_TEMPLATES[template_family(tok, "llama")], "hi", tok)
        assert rendered == DOCUMENTED[family].format(text="hi")
    assert template_family(Tokenizer.from_dir(tiny_next), "mistral") == "mistral"
    assert template_family(Tokenizer.from_dir(tiny_chatml_next), "mistral") == "chatml"


FEATURES_TEMPLATE = (
    "{% set ns = namespace(n=0) %}"
    "{{ bos_token }}{% for message in messages %}"
    "  {% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "    {{ raise_exception('bad role ' + message['role']) }}\n"
    "  {% endif %}"
    "  {% for c in message['content'] %}{% set ns.n = ns.n + 1 %}"
    "    {% if c['type'] == 'image' %}<image>\n{% continue %}{% endif %}"
    "    {% generation %}{{ c['text'] | trim }}{% endgeneration %}"
    "    {% if ns.n > 5 %}{% break %}{% endif %}\n"
    "  {% endfor %}"
    "  {{ message | tojson }}|{{ dict(a=1, b='é<>') | tojson }}|{{ strftime_now('%Y') }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}[{{ eos_token }}|{{ pad_token }}|{{ unk_token }}]{% endif %}"
)


def test_template_features_match_transformers(tiny_next):
    """trim/lstrip blocks, loopcontrols, namespace, {% generation %}, tojson (no HTML escaping),
    strftime_now, dict and the special-token variables, as transformers renders them."""
    proc, tok = _processor(tiny_next), Tokenizer.from_dir(tiny_next)
    for prompt in PROMPTS:
        expected = proc.apply_chat_template(_messages(prompt), chat_template=FEATURES_TEMPLATE,
                                            add_generation_prompt=True)
        assert render_prompt(FEATURES_TEMPLATE, prompt, tok) == expected
    assert '"text": "東京' in render_prompt(FEATURES_TEMPLATE, "東京 <b>", tok)  # ensure_ascii off
    assert "é<>" in render_prompt(FEATURES_TEMPLATE, "x", tok)


def test_raise_exception_and_sandbox(tiny_next):
    tok = Tokenizer.from_dir(tiny_next)
    with pytest.raises(ValueError, match="template refused.*only system and user") as e:
        render_prompt("{{ raise_exception('only system and user') }}", "hi", tok)
    assert isinstance(e.value.__cause__, jinja2.TemplateError)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_prompt("{% set ns = namespace() %}{% set ns._x = 1 %}", "hi", tok)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_prompt("{{ messages.append(1) }}", "hi", tok)  # immutable sandbox
    before = _compile.cache_info().hits
    render_prompt(tiny.VICUNA_TEMPLATE, "a", tok)
    render_prompt(tiny.VICUNA_TEMPLATE, "b", tok)
    assert _compile.cache_info().hits >= before + 1  # compiled once, reused


# ---------------------------------------------------------------- prompt ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fixture", FIXTURES)
def test_prompt_ids_match_processor(request, fixture, backend):
    path = request.getfixturevalue(fixture)
    proc, tok = _processor(path), Tokenizer.from_dir(path, backend)
    template = load_chat_template(path)
    for prompt, size in zip(PROMPTS, [(100, 75), (56, 56), (200, 60), (75, 100), (30, 170)] * 2):
        image = Image.new("RGB", size, (120, 30, 200))
        text = proc.apply_chat_template(_messages(prompt), add_generation_prompt=True)
        expected = proc(images=image, text=text).input_ids[0]
        expected = [int(i) for i in expected]
        count = expected.count(tiny.IMAGE_TOKEN_ID)
        assert count > 1
        ids = build_input_ids(tok, render_prompt(template, prompt, tok), "<image>",
                              tiny.IMAGE_TOKEN_ID, count)
        assert ids == expected, (fixture, backend, prompt, size)


def test_prompt_ids_reject_wrong_image_count(tiny_next):
    tok = Tokenizer.from_dir(tiny_next)
    for rendered, found in (("USER: hi ASSISTANT:", 0), ("<image><image> hi", 2)):
        with pytest.raises(ValueError, match=f"exactly one '<image>', found {found}"):
            build_input_ids(tok, rendered, "<image>", tiny.IMAGE_TOKEN_ID, 5)
    with pytest.raises(ValueError, match="id 400"):
        build_input_ids(tok, "<image>\nhi", "<image>", 7, 5)


def test_prompt_ids_bos_in_template(tmp_path, tiny_next):
    """A template writing {{ bos_token }} gets no 2nd BOS, like apply_chat_template(tokenize=True)."""
    config, edit = VARIANTS["llama"]
    path = make_variant(tiny_next, tmp_path / "llama", config, edit)
    proc, tok = _processor(path), Tokenizer.from_dir(path)
    template = "{{ bos_token }}" + tiny.VICUNA_TEMPLATE
    image = Image.new("RGB", (100, 75))
    expected = proc.apply_chat_template(_messages("hi", image), chat_template=template,
                                        add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = [int(i) for i in expected["input_ids"][0]]
    assert expected[:2] != [1, 1] and expected[0] == 1
    ids = build_input_ids(tok, render_prompt(template, "hi", tok), "<image>", tiny.IMAGE_TOKEN_ID,
                          expected.count(tiny.IMAGE_TOKEN_ID))
    assert ids == expected


def _tokenizer_image_token(prompt, tokenizer, image_token_index):
    """haotian-liu/LLaVA llava/mm_utils.py logic, verbatim (the original checkpoints' reference)."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x)) for ele in sublist][:-1]

    input_ids, offset = [], 0
    if (len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0
            and prompt_chunks[0][0] == tokenizer.bos_token_id):
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


@pytest.mark.parametrize("variant", ["llama", "yi"])
def test_prompt_ids_original_checkpoint(tmp_path, tiny_next, variant):
    """No <image> token in the tokenizer: split, encode chunks, splice N copies of the given id."""
    from transformers import AutoTokenizer

    def drop_image(tj):
        VARIANTS[variant][1](tj)
        tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<image>"]

    path = make_variant(tiny_next, tmp_path / variant, VARIANTS[variant][0], drop_image)
    ref = AutoTokenizer.from_pretrained(path)
    for backend in BACKENDS:
        tok = Tokenizer.from_dir(path, backend)
        assert tok.token_id("<image>") is None
        for prompt in PROMPTS:
            rendered = render_prompt(tiny.VICUNA_TEMPLATE, prompt, tok)
            expected = _tokenizer_image_token(rendered, ref, -200)
            at = expected.index(-200)
            expected[at:at + 1] = [tiny.IMAGE_TOKEN_ID] * 7
            assert build_input_ids(tok, rendered, "<image>", tiny.IMAGE_TOKEN_ID, 7) == expected
        with pytest.raises(ValueError, match="no image_token_id"):
            build_input_ids(tok, rendered, "<image>", None, 7)


class _Chat(PromptMixin):
    """render_chat needs only a template and the tokenizer's special tokens."""

    def __init__(self, template: str):
        self.template = template
        self.tokenizer = type("Tok", (), dict.fromkeys(
            ("bos_token", "eos_token", "unk_token", "pad_token")))()


_TRIMMING = ("{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>"
             "{{ m['content'][0]['text'] | trim }}<</SYS>>{% else %}[{{ m['role'] }}] "
             "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template, system, user, expected", [
    # The template drops system messages: the text is folded into the user turn, also when the
    # user's own text happens to contain it.
    (BUILTIN_TEMPLATES["mistral"], "Be terse.", "Be terse. Why?",
     "[INST] Be terse.\n\nBe terse. Why? [/INST]"),
    # The template keeps (and trims) it: rendered once, not folded in again.
    (_TRIMMING, "  Be terse.  ", "Why?", "<<SYS>>Be terse.<</SYS>>[user] Why?"),
])
def test_system_text_is_kept_exactly_once(template, system, user, expected):
    chat = [{"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "text", "text": user}]}]
    assert _Chat(template).render_chat(chat) == expected
