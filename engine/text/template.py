"""Chat templates: the checkpoint's own or the family's builtin, rendered as transformers does.

Rendering reproduces transformers' `apply_chat_template` (utils/chat_template_utils.py): a jinja2
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and loopcontrols; the globals
`raise_exception`, `strftime_now`, `dict`, `namespace`; a `tojson` filter that does not HTML-escape;
the `{% generation %}...{% endgeneration %}` tag (transformers' AssistantTracker; we only render its
body); and the named special tokens (bos_token, eos_token, unk_token, pad_token) as variables.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from fastllava.checkpoint_files import damaged, read_json, read_text

from .tokenizer import Tokenizer

# Same message format as the llava-hf templates: content is a list of {"type": "image"} /
# {"type": "text", "text": ...}. For one user turn with an image they render exactly the
# documented strings (llava-reference.md §5); further turns follow each family's convention.
_IMAGES = ("{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}"
           "{{ '<image>\n' }}{% endfor %}")
_TEXTS = ("{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
          "{{ c['text'] }}{% endfor %}")
BUILTIN_TEMPLATES: dict[str, str] = {
    # "USER: <image>\n{text} ASSISTANT:"; system text first; assistant turns end in eos (vicuna_v1)
    "vicuna": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}" + _TEXTS + "{{ ' ' }}"
        "{% else %}{{ message['role'].upper() + ': ' }}" + _IMAGES + _TEXTS +
        "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% else %}{{ ' ' }}{% endif %}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # "[INST] <image>\n{text} [/INST]"; assistant turns: " {answer}</s>"
    "mistral": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' }}" + _IMAGES + _TEXTS + "{{ ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' }}" + _TEXTS + "{{ eos_token or '' }}"
        "{% endif %}{% endfor %}"
    ),
    # "<|im_start|>user\n<image>\n{text}<|im_end|>\n<|im_start|>assistant\n"
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        + _IMAGES + _TEXTS + "{{ '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def load_chat_template(path) -> str | None:
    """The template a checkpoint ships, in transformers' lookup order, or None.

    chat_template.jinja, else chat_template.json {"chat_template": str}, else tokenizer_config.json
    "chat_template" (a string, or a list of {"name", "template"} from which "default" is taken).
    """
    folder = Path(path)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return _checked(read_text(jinja_file), jinja_file)
    for name in ("chat_template.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        template = read_json(file).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise ValueError(f"{file} has chat templates {sorted(map(str, named))} but none is "
                                 "named 'default'")
            template = named["default"]
        if template is not None:
            if not isinstance(template, str):
                raise ValueError(f"{file}: chat_template must be a string, "
                                 f"got {type(template).__name__}")
            return _checked(template, file)
    return None


def _checked(template: str, file: Path) -> str:
    """`template`, compiled once here so that a damaged one fails at load, naming its file."""
    import jinja2

    try:
        _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise damaged(file, f"chat template syntax error at line {e.lineno} ({e.message})"
                      ) from None
    return template


def template_family(tokenizer: Tokenizer, text_model_type: str) -> str:
    """Builtin template key for a checkpoint that ships no template."""
    if tokenizer.token_id("<|im_start|>") is not None:
        return "chatml"
    return "mistral" if text_model_type == "mistral" else "vicuna"


def render_prompt(template: str, prompt: str, tokenizer: Tokenizer, num_images: int = 1) -> str:
    """One user turn (`num_images` images, then `prompt`) rendered with
    add_generation_prompt=True; num_images=0 is a text-only turn."""
    images = [{"type": "image"}] * num_images
    messages = [{"role": "user", "content": [*images, {"type": "text", "text": prompt}]}]
    return render_messages(template, messages, tokenizer)


def render_messages(template: str, messages: list[dict], tokenizer: Tokenizer) -> str:
    """A whole chat rendered as transformers' apply_chat_template(add_generation_prompt=True).
    A template that refuses the chat (raise_exception, e.g. "roles must alternate") raises
    ValueError: that is the caller's input, not a bug."""
    import jinja2

    names = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
             "unk_token": tokenizer.unk_token, "pad_token": tokenizer.pad_token}
    variables = {k: v for k, v in names.items() if v is not None}
    # Image parts may carry their source (a URL, a PIL image): templates see only the part type,
    # as in transformers' {"type": "image"} placeholders.
    messages = [{**m, "content": [{"type": "image"} if p.get("type") == "image" else p
                                  for p in m["content"]]} for m in messages]
    try:
        return _compile(template).render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=True, **variables)
    except jinja2.exceptions.SecurityError:  # the template itself is hostile: not input's fault
        raise
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template refused these messages: {e}") from e


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}body{% endgeneration %}` renders body (transformers tracks its span)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class TemplateNamespace(jinja2.utils.Namespace):
        """jinja's namespace, refusing underscore names (no path to CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes, got {name!r}")

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)
