"""How long an example is, and how much of it the loss sees.

With a tokenizer, the example is rendered by a chat template (minipeft/templates.py; "plain",
the base-model template, unless told otherwise) exactly as training renders it:

    length = len(input_ids),   supervised = #{t : labels[t] != -100}   (mode "assistant":
                                                                       every reply + its end token)

Without a tokenizer, characters of the turns' content are counted instead: length = all
characters, supervised = assistant characters. That approximation leaves out the template's
own text and tokens, so it reads a little high for the supervised share.

A tokenizer is anything with `encode(text, bos=False, eos=False) -> list[int]` plus the
`bos_id`/`eos_id` the plain template frames turns with: minipeft.tokenizer.Tokenizer, or a tiny
character-level class in the tests.
"""
from __future__ import annotations

from typing import Optional, Protocol

from ..templates import IGNORE_INDEX, ChatTemplate, get_template
from .formats import Message

DEFAULT_TEMPLATE = "plain"


class Encoder(Protocol):
    bos_id: Optional[int]
    eos_id: Optional[int]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


def measure(messages: list[Message], tokenizer: Optional[Encoder] = None,
            template: Optional[ChatTemplate] = None) -> tuple[int, int]:
    """(length, supervised) of one example: tokens of the rendered example, or characters."""
    if tokenizer is None:
        return (sum(len(m["content"]) for m in messages),
                sum(len(m["content"]) for m in messages if m["role"] == "assistant"))
    ids, labels = (template or get_template(DEFAULT_TEMPLATE)).render(messages, tokenizer)
    return len(ids), sum(label != IGNORE_INDEX for label in labels)
