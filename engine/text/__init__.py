"""Text side of fastllava: tokenizer, chat templates, prompt ids, streaming detokenization.

Identical to transformers by construction and by test (tests/test_tokenizer.py,
tests/test_template.py). The libraries (tokenizers, sentencepiece, jinja2) are imported only when
first used.
"""

from .detokenize import IncrementalDetokenizer
from .prompt import build_input_ids
from .template import BUILTIN_TEMPLATES, load_chat_template, render_prompt, template_family
from .tokenizer import Tokenizer

__all__ = ["BUILTIN_TEMPLATES", "IncrementalDetokenizer", "Tokenizer", "build_input_ids",
           "load_chat_template", "render_prompt", "template_family"]
