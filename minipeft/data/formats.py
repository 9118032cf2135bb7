"""The record formats a JSONL line may use, and their one normalized form.

Four spellings are read (the outline's section 3.1 and the two common exports):

    instruction    {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
    conversations  {"conversations": [{"role", "content"}, ...], "system"?}
    messages       {"messages": [{"role", "content"}, ...], "system"?}            (OpenAI, Bailian)
    sharegpt       {"conversations": [{"from": human|gpt|system, "value"}, ...], "system"?}  (LLaMA-Factory)

Each becomes `messages: list[{"role", "content"}]`: an optional system turn, then user and
assistant turns alternating, starting with user and ending with assistant (the reply the loss is
computed on). That is what the chat templates render. Join rules, stated once:
- the user turn of an instruction record is `instruction + "\\n\\n" + input` (just `instruction`
  when input is absent, null or whitespace), the Alpaca convention;
- history pairs come before it, in order; a system field becomes the first turn, in every
  format; a turn format with both a system field and a system turn is an error (which one?);
- an empty or whitespace system prompt means "no system prompt" in every format; an empty user
  or assistant turn is an error (an empty reply teaches the model to say nothing).
Unknown extra keys ("id", "category", ...) are kept in `Example.raw` and otherwise ignored; one that
reads as a typo of a known key ("sytem", "inptu": _closest) gets a warning, since what it holds is
lost (typo_warnings); a warning does not reject the line. A longer name that only contains a known
key ("conversation_id", "system_id", "output_len") is metadata, not a typo, and is not flagged. A
required field that is missing names such a near miss in its error, in a turn too ("rol", "contnet").
A format's key holding null next to another format's counts as absent (detect_format).
Content may not hold a special token's text ("<|im_end|>"): the tokenizer would encode it as the
control token itself, and a reply would teach the model to stop midway (special_token_issues).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .jsonl import json_type, strings

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
INSTRUCTION_JOIN = "\n\n"
FORMATS = {
    "instruction": '{"instruction", "output", optional "input", "system", "history"}',
    "conversations": '{"conversations": [{"role", "content"}, ...]}',
    "messages": '{"messages": [{"role", "content"}, ...]} (OpenAI / Bailian)',
    "sharegpt": '{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]} (ShareGPT)',
}
_KNOWN_KEYS = ("instruction", "input", "output", "system", "history", "conversations", "messages")
_FORMAT_KEYS = ("instruction", "conversations", "messages")  # the key that tells each format
TYPO_CHARS_PER_EDIT = 5  # a typo is within one edit per 5 characters of a known key (_closest)
Issue = tuple[Optional[str], str]  # (field, message) found in one record
Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One valid training example: where it came from and what it says."""
    source: str  # the file it was read from
    line: int  # 1-based line number in that file
    messages: list[Message]  # normalized: [system], user, assistant, ..., assistant
    raw: dict[str, Any]  # the record exactly as parsed
    format: str  # a key of FORMATS

    @property
    def text(self) -> str:
        """Every turn, one "role: content" per line."""
        return _as_text(self.messages)

    @property
    def prompt(self) -> str:
        """Every turn before the final reply, as in `text`: what the model sees."""
        return _as_text(self.messages[:-1])

    @property
    def question(self) -> str:
        """`prompt` without the system turn: what tells examples apart, as one system prompt is
        often shared by a whole file (near-duplicate tests compare this, dedup.question_key)."""
        return _as_text([m for m in self.messages[:-1] if m["role"] != "system"])

    @property
    def response(self) -> str:
        """The final assistant reply: what the model learns to write."""
        return self.messages[-1]["content"]


def _as_text(messages: list[Message]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def detect_format(record: dict[str, Any]) -> tuple[Optional[str], Optional[Issue]]:
    """The format of one record (a key of FORMATS), or why it has none. A format key holding null
    counts as absent next to another format's: a table exported with one column per key writes null
    in the columns a row does not use. Alone, it is still that format's, whose checks name it null."""
    found = ([k for k in _FORMAT_KEYS if record.get(k) is not None]
             or [k for k in _FORMAT_KEYS if k in record])
    if len(found) > 1:
        return None, (None, f"has both {' and '.join(map(repr, found))}; an example uses exactly one format")
    if not found:
        keys = ", ".join(map(repr, record)) or "none"
        expected = "; ".join(FORMATS.values())
        return None, (None, f"unknown format (keys: {keys}){_typo_hint(record)}; expected one of: {expected}")
    if found[0] == "conversations":
        return turn_spelling(record["conversations"]) or "conversations", None
    return found[0], None


def turn_spelling(turns: Any) -> Optional[str]:
    """How a "conversations" array is spelled: "sharegpt" or "conversations", told by the first
    object turn with a role key ("from" or "role"), else a text key ("value" or "content"): the role
    key decides, so {"role", "value"} is a role/content turn missing its content. None when no turn
    tells (an empty array, no object in it): the line shows no format (loader.read_file)."""
    for turn in turns if isinstance(turns, list) else ():
        if isinstance(turn, dict):
            for sharegpt, ours in (("from", "role"), ("value", "content")):
                if ours in turn or sharegpt in turn:
                    return "conversations" if ours in turn else "sharegpt"
    return None


def normalize(record: dict[str, Any], fmt: str) -> tuple[list[Message], list[Issue]]:
    """The record as normalized messages, or the issues that prevent it (then messages is [])."""
    if fmt == "instruction":
        return _from_instruction(record)
    key, role_key, content_key, roles = (("conversations", "from", "value", SHAREGPT_ROLES) if fmt == "sharegpt"
                                         else (fmt, "role", "content", {r: r for r in ROLES}))
    issues: list[Issue] = []
    system = _string(record, "system", issues, required=False)
    messages, found = _from_turns(record[key], key, role_key, content_key, roles)
    if issues + found:
        return [], issues + found
    if not system.strip():
        return messages, []
    if messages[0]["role"] == "system":
        return [], [("system", f"given twice: as this field and as the system turn {key}[0]; keep one")]
    return [{"role": "system", "content": system}] + messages, []


def _from_instruction(record: dict[str, Any]) -> tuple[list[Message], list[Issue]]:
    issues: list[Issue] = []
    instruction = _string(record, "instruction", issues, required=True)
    output = _string(record, "output", issues, required=True)
    extra = _string(record, "input", issues, required=False)
    system = _string(record, "system", issues, required=False)
    history = _history(record.get("history"), issues)
    if issues:
        return [], issues
    user = instruction + INSTRUCTION_JOIN + extra if extra.strip() else instruction
    head = [{"role": "system", "content": system}] if system.strip() else []
    return head + history + [{"role": "user", "content": user}, {"role": "assistant", "content": output}], []


def _string(record: dict[str, Any], name: str, issues: list[Issue], required: bool) -> str:
    value = record.get(name)
    if value is None:
        if required:
            said = "null" if name in record else "missing"
            issues.append((name, f"{said}; expected a non-empty string{_typo_hint(record, name)}"))
        return ""
    if not isinstance(value, str):
        # as the file spells it: true, not Python's True
        hint = (f" (write it as a string: {json.dumps(json.dumps(value))})" if json_type(value) in ("number", "boolean")
                else "")
        issues.append((name, f"expected a string, got {json_type(value)}{hint}"))
        return ""
    if required and not value.strip():
        issues.append((name, "empty; expected a non-empty string"))
    return value


def _history(history: Any, issues: list[Issue]) -> list[Message]:
    if history is None:
        return []
    if not isinstance(history, list):
        issues.append(("history", f"expected an array of [user, assistant] pairs, got {json_type(history)}"))
        return []
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            got = f"array of {len(pair)}" if isinstance(pair, list) else json_type(pair)
            issues.append((f"history[{i}]", f"expected a [user, assistant] pair of strings, got {got}"))
            continue
        for j, role in enumerate(("user", "assistant")):
            if not pair[j].strip():
                issues.append((f"history[{i}][{j}]", f"empty {role} turn; expected a non-empty string"))
            messages.append({"role": role, "content": pair[j]})
    return messages


def _from_turns(turns: Any, key: str, role_key: str, content_key: str,
                role_names: dict[str, str]) -> tuple[list[Message], list[Issue]]:
    """Read [{role_key, content_key}, ...], mapping the file's role names through `role_names`."""
    if not isinstance(turns, list):
        return [], [(key, f"expected an array of turns, got {json_type(turns)}")]
    if not turns:
        return [], [(key, "empty array; expected at least a user turn and an assistant turn")]
    messages, issues = [], []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            issues.append((where, f"expected an object {{{role_key!r}, {content_key!r}}}, got {json_type(turn)}"))
            continue
        role, content = turn.get(role_key), turn.get(content_key)
        # A key missing next to a near miss of it ("rol", "contnet") is named, as at the top level.
        typo = lambda name: _typo_hint(turn, name, (role_key, content_key))
        known = isinstance(role, str) and role in role_names
        if not known:
            said = "missing" if role is None else f"{role!r} is not a known role"
            hint = (typo(role_key) if role is None else f" (roles are lower case: {role.lower()!r})"
                    if isinstance(role, str) and role.lower() in role_names else "")
            issues.append((f"{where}.{role_key}", f"{said}; expected one of {', '.join(map(repr, role_names))}{hint}"))
        if not isinstance(content, str):
            hint = ("; join the text parts into one string" if isinstance(content, list)
                    else typo(content_key) if content is None else "")
            got = "missing" if content_key not in turn else f"got {json_type(content)}"
            issues.append((f"{where}.{content_key}", f"expected a string, {got}{hint}"))
        if known and isinstance(content, str):
            messages.append({"role": role_names[role], "content": content})
    issues = issues or _order_issues(messages, turns, key, role_key, content_key, role_names)
    if issues:
        return [], issues
    return [m for m in messages if m["role"] != "system" or m["content"].strip()], []


def _order_issues(messages: list[Message], turns: list[dict[str, Any]], key: str, role_key: str,
                  content_key: str, role_names: dict[str, str]) -> list[Issue]:
    """System first (optional), then user/assistant alternating from user, ending with assistant.
    Fields are named as in the file (`turns`), whose indices match `messages` one to one."""
    spelled = {ours: theirs for theirs, ours in role_names.items()}
    issues: list[Issue] = []
    for i, m in enumerate(messages):
        if m["role"] != "system" and not m["content"].strip():
            issues.append((f"{key}[{i}].{content_key}", f"empty {m['role']} turn; expected a non-empty string"))
    expected, previous = "user", None
    for i, m in enumerate(messages):
        said = repr(turns[i][role_key])
        if m["role"] == "system" and i > 0:
            return issues + [(f"{key}[{i}].{role_key}", f"{said} is only allowed as the first turn")]
        if m["role"] != "system" and m["role"] != expected:
            why = f"comes after {previous}" if previous else "starts the conversation"
            return issues + [(f"{key}[{i}].{role_key}", f"{said} {why}; expected {spelled[expected]!r}: user and "
                              "assistant turns alternate, starting with user (merge the two or add the missing one)")]
        if m["role"] != "system":
            expected, previous = ("assistant" if m["role"] == "user" else "user"), said
    if messages[-1]["role"] != "assistant":
        issues.append((key, f"ends with {turns[-1][role_key]!r}; the last turn must be the assistant's reply "
                       "(what the model learns)"))
    return issues


def special_token_issues(record: dict[str, Any], tokens: Sequence[str]) -> list[Issue]:
    """Each field of a known key whose text holds one of `tokens` (special tokens' text)."""
    return [(field, f"contains {token!r}, the text of a special token: the tokenizer encodes it as that "
             "control token, not as text (a reply would teach the model to stop there); reword or remove it")
            for key in _KNOWN_KEYS if key in record for field, text in strings(record[key], key)
            for token in tokens if token in text]


def typo_warnings(record: dict[str, Any]) -> list[Issue]:
    """Each unknown key that reads as a typo of a known one: what it holds would be ignored."""
    return [(key, f"unknown key, ignored: a typo for {known!r}?") for key in record
            if key not in _KNOWN_KEYS and (known := _closest(key, _KNOWN_KEYS))]


def _typo_hint(record: dict[str, Any], name: Optional[str] = None, known: Sequence[str] = _KNOWN_KEYS) -> str:
    """" (found 'ouput': a typo for 'output'?)" when a key of `record` not in `known` (the keys of a
    record, or those of a turn) is close to `name` (or to any known key)."""
    unknown = [k for k in record if k not in known]
    for target in [name] if name else known:
        close = _closest(target, unknown)
        if close:
            return f" (found {close!r}: a typo for {target!r}?)"
    return ""


def _closest(word: str, candidates: Sequence[str]) -> Optional[str]:
    """The candidate that `word` reads as a typo of, fewest edits first (ties: the first), or None:
    within one edit per TYPO_CHARS_PER_EDIT characters of the shorter of the two, at least one
    ("sytem" -> system, "inptu" -> input, "conversatons" -> conversations; not "conversation_id",
    3 edits from "conversations", nor "system_id" or "output_len", which only contain a known key)."""
    # Keys are case-sensitive, so "SYSTEM" is a typo of system; both sides are folded, as the
    # unknown key is `word` for typo_warnings but a candidate for _typo_hint ("OUTPUT" for output).
    scored = [(d, c) for c in candidates if (d := edit_distance(word.casefold(), c.casefold()))
              <= max(1, min(len(word), len(c)) // TYPO_CHARS_PER_EDIT)]
    return min(scored, key=lambda dc: dc[0])[1] if scored else None


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and swaps of two
    adjacent characters ("inptu" -> "input" is one), each costing 1."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]
