"""Chat templates: a conversation -> token ids + labels that supervise exactly the assistant's words.

    render(messages) -> input_ids (T,), labels (T,)    labels[t] = input_ids[t] if trained on, else -100

Labels follow Hugging Face's convention: aligned with input_ids, the loss shifts them (logits[t]
predicts labels[t+1]); -100 is cross_entropy's ignore_index. A conversation renders as a list of
segments, each the ids of one piece of text or one special token, concatenated: a label boundary
is a segment boundary, exact by construction (no offset-mapping guesswork). A reply segment is an
assistant turn's content plus its end-of-turn token, which is always supervised with it: a model
that never sees that token as a target never learns to stop.

Modes: "assistant" trains on every reply, "last" on the final reply only, "all" on every token.
`render_prompt(messages[:-1])` renders the same segments up to the final reply, so the prompt a
server sends is exactly the prefix the model was trained on (tests/test_templates.py checks).

Formats ({..} is text; <..> a single special id; each text is encoded as noted):
- chatml, Qwen2-Instruct's template (and the Bailian platform's format):
      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n
      <|im_start|>assistant\\n{assistant}<|im_end|>\\n ...
  Reply: {assistant}<|im_end|>; the "\\n" after it opens the next prompt, as in LLaMA-Factory and
  TRL's {% generation %} blocks. Qwen2 inserts the system turn "You are a helpful assistant."
  when a conversation has none; `default_system` does the same (None: no system turn). Texts
  follow special tokens, so they are encoded without SentencePiece's dummy "▁": the ids then
  equal `transformers`' tokenization of the string Qwen2's Jinja template renders (tested).
- llama2, Meta's reference `chat_completion` (llama/generation.py), turn by turn:
      <s> enc("[INST] {user} [/INST]") enc("{assistant} ") </s>
  with the system prompt folded into the first user turn as "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}"
  and user/assistant stripped, as Meta does. Each text keeps the dummy "▁" (Meta encodes each
  turn separately), which stands for the space between "[/INST]" and the reply. Reply:
  enc("{assistant} ") </s>. There is no default system prompt (Meta's code has none).
- plain, for base models without chat tokens, one bos, turns separated by eos:
      <s> enc("{system}\\n\\nUser: {user}\\nAssistant:") enc("{assistant}") </s> enc("User: {user}\\nAssistant:") ...
  The reply's dummy "▁" is the space after "Assistant:". Reply: enc("{assistant}") </s>.
For llama2 and plain, splitting a turn's text at the space before the reply gives the same ids
as encoding the turn whole: SentencePiece never merges across a "▁" word boundary
(split_by_whitespace, on in LLaMA's tokenizer and in train_tokenizer's).

A message cannot forge a turn. chatml encodes every text with split_special_tokens=True: a message
holding "<|im_end|>\n<|im_start|>system\n..." stays that text (transformers' apply_chat_template
+ tokenize would read the tokens). llama2 and plain frame turns with <s> and </s>, control tokens
that SentencePiece never reads from text, so they encode text as it is (a tokenizer needs only
`encode(text, bos, eos)` for them: minipeft.data.measure's Encoder).

Templates serialize as {"name": ..., fields...}; `save_template`/`load_template` keep the one in
use in chat_template.json beside an adapter.
"""
from __future__ import annotations

import abc
import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Optional, Sequence, Union

from .batching import IGNORE_INDEX
from .files import json_bytes, read_json, write_atomic
from .tokenizer import Tokenizer

MODES = ("assistant", "last", "all")
TRUNCATIONS = ("drop", "right")
TEMPLATE_FILE = "chat_template.json"
Message = dict[str, str]
Segment = tuple[list[int], bool]  # (ids, is a reply: assistant content + end-of-turn token)
Turn = tuple[str, Optional[str]]  # (user, assistant); assistant None: the generation prompt


class Rendered(NamedTuple):
    input_ids: list[int]
    labels: list[int]


class TooLongError(ValueError):
    """A conversation does not fit max_length under the chosen truncation policy."""


def _split(messages: Sequence[Message], final: str) -> tuple[Optional[str], list[Turn]]:
    """[system], user, assistant, ..., `final` -> (system, [(user, assistant), ...])."""
    if not messages:
        raise ValueError("messages is empty; expected [system], user, assistant, ...")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: expected {{'role': ..., 'content': str}}, got {m!r}")
    system = messages[0]["content"] if messages[0].get("role") == "system" else None
    body = messages[1:] if system is not None else messages
    for i, m in enumerate(body):
        expected = ("user", "assistant")[i % 2]
        if m.get("role") != expected:
            index = i + (system is not None)
            raise ValueError(f"messages[{index}]: expected role {expected!r} (an optional system turn, then "
                             f"user and assistant alternating), got {m.get('role')!r}")
    if not body or body[-1]["role"] != final:
        if body:
            role = body[-1]["role"]
            last = f"ends with {'an' if role == 'assistant' else 'a'} {role!r} turn"
        else:
            last = "holds no turn after the system one"
        raise ValueError(f"messages[{len(messages) - 1}]: a conversation must end with "
                         f"{'an' if final[0] == 'a' else 'a'} {final} turn; this conversation {last}")
    contents = [m["content"] for m in body] + ([None] if final == "user" else [])
    return system, list(zip(contents[::2], contents[1::2]))


def _special_id(tok: Tokenizer, piece: str, template: str) -> int:
    try:
        return tok.token_to_id(piece)
    except KeyError:
        raise ValueError(f"the {template} template needs {piece!r} as one token of the vocabulary "
                         "(train_tokenizer adds the ChatML tokens by default)") from None


def _bos_eos(tok: Tokenizer, template: str) -> tuple[int, int]:
    if tok.bos_id is None or tok.eos_id is None:
        raise ValueError(f"the {template} template needs bos and eos tokens; this tokenizer has "
                         f"bos_id={tok.bos_id}, eos_id={tok.eos_id}")
    return tok.bos_id, tok.eos_id


class ChatTemplate(abc.ABC):
    """A conversation format. Subclasses are dataclasses: their fields are what to_dict saves."""

    name: ClassVar[str]

    @abc.abstractmethod
    def segments(self, system: Optional[str], turns: list[Turn], tok: Tokenizer) -> list[Segment]:
        """The conversation as (ids, is_reply) segments, concatenated by render."""

    @abc.abstractmethod
    def stop_token_ids(self, tok: Tokenizer) -> list[int]:
        """Ids that end a reply, for generation: the end-of-turn token, then eos if different."""

    def render(self, messages: Sequence[Message], tokenizer: Tokenizer, mode: str = "assistant",
               max_length: Optional[int] = None, truncation: str = "drop") -> Rendered:
        """A conversation ending with an assistant turn -> (input_ids, labels), equal lengths.

        max_length: "drop" raises TooLongError for a longer conversation (the caller skips and
        counts it); "right" keeps the first max_length tokens, which may cut the final reply and
        its end-of-turn token, and raises TooLongError if no supervised token is left.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        segments = self.segments(*_split(messages, final="assistant"), tokenizer)
        replies = sum(is_reply for _, is_reply in segments)
        ids: list[int] = []
        labels: list[int] = []
        seen = 0
        for seg, is_reply in segments:
            seen += is_reply
            trained = mode == "all" or (is_reply and (mode == "assistant" or seen == replies))
            ids += seg
            labels += seg if trained else [IGNORE_INDEX] * len(seg)
        return _truncate(ids, labels, max_length, truncation)

    def render_prompt(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
        """A conversation ending with a user turn -> the ids a model continues with its reply."""
        segments = self.segments(*_split(messages, final="user"), tokenizer)
        return [i for seg, _ in segments for i in seg]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def _truncate(ids: list[int], labels: list[int], max_length: Optional[int], truncation: str) -> Rendered:
    if max_length is None or len(ids) <= max_length:
        return Rendered(ids, labels)
    if truncation == "drop":
        raise TooLongError(f"conversation renders to {len(ids)} tokens > max_length {max_length} "
                           "(truncation='drop': skip it, or raise max_length)")
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise TooLongError(f"no supervised token left in the first {max_length} tokens (truncation='right')")
    return Rendered(ids, labels)


@dataclass(frozen=True)
class ChatML(ChatTemplate):
    name: ClassVar[str] = "chatml"
    default_system: Optional[str] = "You are a helpful assistant."  # Qwen2's; None: no system turn

    def segments(self, system: Optional[str], turns: list[Turn], tok: Tokenizer) -> list[Segment]:
        start, end = _special_id(tok, "<|im_start|>", self.name), _special_id(tok, "<|im_end|>", self.name)

        def text(s: str) -> list[int]:  # every text here follows a special token: no dummy "▁"
            return tok.encode(s, add_dummy_prefix=False, split_special_tokens=True)

        def block(role: str, content: str) -> list[int]:
            return [start] + text(f"{role}\n{content}") + [end] + text("\n")

        system = self.default_system if system is None else system
        out: list[Segment] = [] if system is None else [(block("system", system), False)]
        for user, assistant in turns:
            out.append((block("user", user) + [start] + text("assistant\n"), False))
            if assistant is not None:
                out += [(text(assistant) + [end], True), (text("\n"), False)]
        return out

    def stop_token_ids(self, tok: Tokenizer) -> list[int]:
        end = _special_id(tok, "<|im_end|>", self.name)
        return [end] + ([tok.eos_id] if tok.eos_id not in (None, end) else [])


@dataclass(frozen=True)
class Llama2(ChatTemplate):
    name: ClassVar[str] = "llama2"

    def segments(self, system: Optional[str], turns: list[Turn], tok: Tokenizer) -> list[Segment]:
        bos, eos = _bos_eos(tok, self.name)
        out: list[Segment] = []
        for i, (user, assistant) in enumerate(turns):
            if i == 0 and system is not None:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            out.append(([bos] + tok.encode(f"[INST] {user.strip()} [/INST]"), False))
            if assistant is not None:
                out.append((tok.encode(f"{assistant.strip()} ") + [eos], True))
        return out

    def stop_token_ids(self, tok: Tokenizer) -> list[int]:
        return [_bos_eos(tok, self.name)[1]]


@dataclass(frozen=True)
class Plain(ChatTemplate):
    name: ClassVar[str] = "plain"

    def segments(self, system: Optional[str], turns: list[Turn], tok: Tokenizer) -> list[Segment]:
        bos, eos = _bos_eos(tok, self.name)
        out: list[Segment] = []
        for i, (user, assistant) in enumerate(turns):
            head = f"{system}\n\n" if i == 0 and system is not None else ""
            out.append(([bos] * (i == 0) + tok.encode(f"{head}User: {user}\nAssistant:"), False))
            if assistant is not None:
                out.append((tok.encode(assistant) + [eos], True))
        return out

    def stop_token_ids(self, tok: Tokenizer) -> list[int]:
        return [_bos_eos(tok, self.name)[1]]


TEMPLATES: dict[str, type[ChatTemplate]] = {t.name: t for t in (ChatML, Llama2, Plain)}


def get_template(name: str, **fields: Any) -> ChatTemplate:
    """A template by name ("chatml", "llama2", "plain"), with optional fields (chatml: default_system)."""
    if name not in TEMPLATES:
        close = difflib.get_close_matches(str(name), TEMPLATES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown chat template {name!r}; known templates: {sorted(TEMPLATES)}{hint}")
    cls = TEMPLATES[name]
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in fields.items():
        if key not in known:
            raise ValueError(f"chat template {name!r} has no field {key!r}; its fields: {sorted(known)}")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"chat template {name!r}: field {key!r} must be a string or null, got {value!r}")
    return cls(**fields)


def from_dict(d: dict[str, Any]) -> ChatTemplate:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise ValueError(f'a chat template is a JSON object {{"name": "chatml" | ..., fields...}}, got {d!r}')
    fields = {k: v for k, v in d.items() if k != "name"}
    return get_template(d["name"], **fields)


def save_template(directory: Union[str, os.PathLike], template: ChatTemplate) -> None:
    """Write directory/chat_template.json (atomically)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / TEMPLATE_FILE, json_bytes(template.to_dict()))


def load_template(directory: Union[str, os.PathLike]) -> ChatTemplate:
    """Read directory/chat_template.json; errors name the file."""
    file = Path(directory) / TEMPLATE_FILE
    d = read_json(file, "save_template writes it beside the adapter")
    try:
        return from_dict(d)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
