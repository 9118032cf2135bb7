"""OpenAI's `stop` strings: a reply ends just before the first occurrence of any of them, also when
one spans tokens or starts inside a token's text, and a stream never sends text of a stop string.

In process: Reply (minipeft.platform.openai_api) over every short substring of a text as the stop
string, against the definition (the text before its first occurrence; the tokens up to the one that
completes it), and the hold-back of StopText token by token. Over HTTP with the official client:
stop strings cut from the middle of the model's own greedy reply, streamed and not, and the 400s.
"""
from __future__ import annotations

import pytest

import fastapi  # noqa: F401
import openai

from minipeft.platform.inference import StopText, TextStream
from minipeft.platform.openai_api import Reply
from minipeft.tokenizer import load_tokenizer
from platform_fixtures import base_dir, server  # noqa: F401
from platform_server import KEY

# multi-character pieces, single characters, and characters split into byte-fallback tokens
TEXT = "Return the quick brown fox, café naïve 你好 asyncio.get_name(self)"


@pytest.fixture(scope="module")
def base_tok(base_dir):  # noqa: F811
    return load_tokenizer(base_dir)


def expected(tok, ids, stops):
    """(text, tokens generated) by the definition: the text before the first occurrence of any stop
    string, and the tokens up to and with the first one after which the decoded text holds one."""
    text = tok.decode(ids)
    starts = [text.find(s) for s in stops if s in text]
    if not starts:
        return text, len(ids)
    return text[:min(starts)], next(k for k in range(1, len(ids) + 1) if any(s in tok.decode(ids[:k]) for s in stops))


def run(tok, ids, stops, max_tokens=100):
    """(deltas, tokens generated, tokens left in the stream, finish_reason) of a Reply."""
    tokens = iter(ids)
    reply = Reply(tokens, tok, max_tokens, stops)
    deltas = list(reply)
    return deltas, reply.count, len(list(tokens)), reply.finish_reason


def test_reply_ends_before_the_first_stop_string_wherever_it_starts_and_ends(base_tok):
    ids = base_tok.encode(TEXT)
    assert base_tok.decode(ids) == TEXT and len(ids) < len(TEXT)  # some tokens have several characters
    cases = {TEXT[a:b] for a in range(len(TEXT)) for b in range(a + 1, min(a + 7, len(TEXT) + 1))}
    for stop in sorted(cases):
        deltas, count, left, finish = run(base_tok, ids, [stop])
        text, generated = expected(base_tok, ids, [stop])
        assert ("".join(deltas), count, finish) == (text, generated, "stop"), stop
        assert left == len(ids) - generated, f"{stop!r}: no token is generated after the one completing it"
        assert "" not in deltas and not any("\ufffd" in d for d in deltas), stop


@pytest.mark.parametrize("stops", [["xyz"], ["quick", "brown"], ["brown", "qu"], ["ck", "quick"], ["fox!", "ick b"],
                                   ["naïve?"], ["(self))", "Return"], [")", "e"], ["你好 x", "get_name(self)!"]])
def test_stop_text_holds_back_exactly_what_could_begin_a_stop_string(base_tok, stops):
    """Token by token, the text released is the text so far less its longest tail that begins a stop
    string; the first stop string found ends it; a reply without one is released whole."""
    ids = base_tok.encode(TEXT)
    text, stop, released = TextStream(base_tok), StopText(stops), ""
    for k in range(1, len(ids) + 1):
        released += stop.push(text.push(ids[k - 1]))
        if stop.stopped:
            break
        so_far = base_tok.decode(ids[:k])
        if so_far.endswith("\ufffd"):  # TextStream holds a split character itself
            continue
        held = so_far[len(released):]
        assert so_far.startswith(released) and (not held or any(s.startswith(held) for s in stops)), (k, held)
        assert not any(s.startswith(so_far[j:]) for s in stops for j in range(len(released))), (k, released)
    else:
        released += stop.push(text.finish()) + stop.finish()
    assert (released, k) == expected(base_tok, ids, stops)
    deltas, count, _, finish = run(base_tok, ids, stops, max_tokens=len(ids))
    assert ("".join(deltas), count) == (released, k)
    assert finish == ("stop" if any(s in TEXT for s in stops) else "length")


# --- over HTTP -----------------------------------------------------------------------------------
@pytest.fixture
def client(server):  # noqa: F811
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


MESSAGES = [{"role": "user", "content": "Tell me about the weather."}]


def ask(client, kind, **fields):
    """(text, completion tokens, finish_reason) of a greedy request, and its streamed deltas."""
    create = client.chat.completions.create if kind == "chat" else client.completions.create
    where = {"messages": MESSAGES} if kind == "chat" else {"prompt": "import os"}
    fields = {"model": "tiny", "temperature": 0, "max_tokens": 24, **where, **fields}
    whole = create(**fields)
    choice = whole.choices[0]
    answer = (choice.message.content if kind == "chat" else choice.text, whole.usage.completion_tokens,
              choice.finish_reason)
    chunks = list(create(**fields, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content if kind == "chat" else c.choices[0].text for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == answer[2] and chunks[-1].usage.completion_tokens == answer[1], fields
    return answer, [d for d in deltas if d]


def cut(pieces, first, start, end):
    """(stop, text before it, tokens generated) for the stop string from character `start` of piece
    `first` to `end` characters past its end (negative: before it); pieces are the tokens' texts."""
    text = "".join(pieces)
    a = sum(map(len, pieces[:first])) + start
    b = sum(map(len, pieces[:first + 1])) + end
    stop = text[a:b]
    assert 0 < a and b < len(text) and text.find(stop) == a, (pieces, first, stop)  # a real cut, mid-reply
    return stop, text[:a], next(k for k in range(len(pieces) + 1) if len("".join(pieces[:k])) >= b)


def middle_piece(pieces):
    """The first piece from a third of the way in with 3 or more visible characters that occurs once
    in the reply (so that stop strings cut around it occur there first) and has a piece after it."""
    return next(i for i in range(len(pieces) // 3, len(pieces) - 1) if len(pieces[i].strip()) >= 3
                and pieces[i + 1] and "".join(pieces).count(pieces[i]) == 1)


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_stop_strings_from_the_middle_of_the_models_reply(client, kind):
    (free, n, finish), pieces = ask(client, kind)
    assert finish == "length" and "".join(pieces) == free and len(pieces) == n, "one streamed delta per token"
    i = middle_piece(pieces)
    cases = [  # (stop as sent, text before it, tokens generated)
        cut(pieces, i, 0, 1),  # from a token's start to inside the next one
        cut(pieces, i, 1, 1),  # from inside a token to inside the next one
        cut(pieces, i, 1, -1),  # inside one token
        cut(pieces, i - 1, 0, len(pieces[i]) + len(pieces[i + 1])),  # over three tokens
    ]
    later = cut(pieces, i + 1, 0, 1)
    cases.append(([later[0], "\u2603 never", cases[1][0]], *cases[1][1:]))  # a list: its first occurrence wins
    for stop, text, generated in cases:
        (reply, count, finish), deltas = ask(client, kind, stop=stop)
        assert (reply, count, finish) == (text, generated, "stop"), stop
        assert not any(s in reply for s in ([stop] if isinstance(stop, str) else stop)), stop
        assert "".join(deltas) == reply, stop  # streamed: no text of the stop string, nor after it
    for none in (["\u2603", "\u2603\u2603"], []):  # none occurs (or none given): all of it
        (reply, count, finish), deltas = ask(client, kind, stop=none)
        assert (reply, count, finish, "".join(deltas)) == (free, n, "length", free), none


@pytest.mark.parametrize("stop,got", [(["a", "b", "c", "d", "e"], '["a", "b", "c", "d", "e"]'), ("", '""'),
                                      (["a", ""], '["a", ""]'), (3, "3"), (["a", 3], '["a", 3]'),
                                      ({"a": 1}, '{"a": 1}')])
def test_a_stop_of_another_shape_is_refused_naming_it(client, stop, got):
    for create, where in ((client.chat.completions.create, {"messages": MESSAGES}),
                          (client.completions.create, {"prompt": "a"})):
        with pytest.raises(openai.BadRequestError) as refused:
            create(model="tiny", max_tokens=2, stop=stop, **where)
        assert refused.value.param == "stop"
        assert refused.value.body["message"] == ("stop: expected a string or a list of up to 4 non-empty strings, "
                                                 f"got {got}")
