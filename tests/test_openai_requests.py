"""The OpenAI-compatible endpoints in process (FastAPI's TestClient, no server process, no training):
what a completion's text is, and how request fields the official API defines are taken."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastapi.testclient import TestClient

from minipeft import load_pretrained
from minipeft.generation import generate
from minipeft.platform.app import create_app
from minipeft.platform.state import Settings
from minipeft.tokenizer import load_tokenizer
from platform_fixtures import base_dir  # noqa: F401

LIMIT = 64  # the server's max_tokens


@pytest.fixture(scope="module")
def api(base_dir, tmp_path_factory):  # noqa: F811
    app = create_app(Settings(tmp_path_factory.mktemp("openai") / "data", {"tiny": base_dir}, max_tokens=LIMIT))
    with TestClient(app) as client:
        yield client


def continuation(base_dir, prompt: str, n: int) -> tuple[list[int], list[int]]:  # noqa: F811
    """(prompt ids, greedy reply ids) by generate(), the reference the endpoint must equal."""
    tok, model = load_tokenizer(base_dir), load_pretrained(base_dir).eval()
    ids = tok.encode(prompt, bos=True)
    out = generate(model, torch.tensor([ids]), n, eos_token_id=tok.eos_id)[0, len(ids):].tolist()
    return ids, out[:out.index(tok.eos_id)] if tok.eos_id in out else out


def test_a_completion_keeps_the_space_before_its_first_word(api, base_dir):  # noqa: F811
    """The reply was decoded on its own, and SentencePiece drops the leading space of a text's first
    piece: "The function returns the" + "value of" -> "...thevalue of". A completion continues the
    prompt, so prompt + text must be the text of prompt + reply tokens."""
    prompt, tok = "The function returns the", load_tokenizer(base_dir)
    ids, reply = continuation(base_dir, prompt, 6)
    expected = tok.decode(ids + reply)[len(tok.decode(ids)):]
    assert expected.startswith(" "), "the reply must begin with a word (a piece with the space) for this test"
    ask = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0}
    answer = api.post("/v1/completions", json=ask).json()
    assert answer["choices"][0]["text"] == expected, answer
    streamed = api.post("/v1/completions", json={**ask, "stream": True}).text
    assert streamed.endswith("data: [DONE]\n\n")
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected


def test_a_completion_prompt_gets_the_special_tokens_its_tokenizer_config_says(base_dir, tmp_path):  # noqa: F811
    """/v1/completions encodes the prompt as transformers' tokenizer does (vLLM's server too): bos only where
    tokenizer_config.json's add_bos_token says so. It always put bos first."""
    folder = tmp_path / "no-bos"
    shutil.copytree(base_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    prompt, tok = "The function returns the", load_tokenizer(folder)
    ids = tok.encode(prompt)
    assert ids[0] != tok.bos_id
    out = generate(load_pretrained(folder).eval(), torch.tensor([ids]), 4, eos_token_id=tok.eos_id)[0, len(ids):]
    app = create_app(Settings(tmp_path / "data", {"nobos": folder}, max_tokens=LIMIT))
    with TestClient(app) as client:
        answer = client.post("/v1/completions", json={"model": "nobos", "prompt": prompt, "max_tokens": 4,
                                                      "temperature": 0}).json()
        assert answer["usage"]["prompt_tokens"] == len(ids), answer
        assert answer["choices"][0]["text"] == tok.decode(ids + out.tolist())[len(tok.decode(ids)):]
        empty = client.post("/v1/completions", json={"model": "nobos", "prompt": "", "max_tokens": 4})
        assert empty.status_code == 400 and "adds no bos" in empty.json()["error"]["message"], empty.text


def test_a_chat_reply_does_not_begin_with_a_space(api):
    """A chat reply is a new text (the template encodes a reply with its dummy prefix): no context."""
    answer = api.post("/v1/chat/completions", json={"model": "tiny", "temperature": 0, "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "Hello"}]}).json()
    assert not answer["choices"][0]["message"]["content"].startswith(" "), answer


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_null_is_the_default_for_fields_this_server_does_not_implement(api, kind):
    """OpenAI's API takes null for any optional field, meaning its default, and clients that
    serialize every field send it (logprobs: null, tools: null, ...): that asks for nothing this
    server lacks. It was refused as an unsupported field; a value given still is."""
    path, where = (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}) if kind == "chat"
                   else ("/v1/completions", {"prompt": "import"}))
    ask = {"model": "tiny", "temperature": 0, "max_tokens": 3, **where}
    plain = api.post(path, json=ask)
    nulls = api.post(path, json={**ask, "logprobs": None, "tools": None, "logit_bias": None, "suffix": None})
    assert plain.status_code == nulls.status_code == 200, nulls.text
    assert nulls.json()["choices"] == plain.json()["choices"]
    refused = api.post(path, json={**ask, "logit_bias": {"5": 10}}).json()["error"]
    assert refused["param"] == "logit_bias" and "unsupported field(s) ['logit_bias']" in refused["message"]
    # false for logprobs and echo is their default too (what a client serializing every field sends)
    off = api.post(path, json={**ask, "logprobs": False, "echo": False})
    assert off.status_code == 200 and off.json()["choices"] == plain.json()["choices"], off.text
    assert api.post(path, json={**ask, "logprobs": True}).json()["error"]["param"] == "logprobs"


def test_top_p_0_is_greedy(api):
    """OpenAI's top_p takes 0..1; 0 keeps only the most likely token. It was refused (top_p > 0)."""
    ask = {"model": "tiny", "max_tokens": 6, "prompt": "import"}
    greedy = api.post("/v1/completions", json={**ask, "temperature": 0}).json()["choices"][0]["text"]
    for seed in (1, 2):
        answer = api.post("/v1/completions", json={**ask, "temperature": 1.5, "top_p": 0, "seed": seed})
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == greedy, answer.text


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_token_limit_over_the_servers_names_the_field_sent(api, field):
    """max_completion_tokens over the limit was reported as param "max_tokens", a field never sent."""
    answer = api.post("/v1/chat/completions", json={"model": "tiny", field: LIMIT + 1,
                                                    "messages": [{"role": "user", "content": "Hi"}]})
    error = answer.json()["error"]
    assert (answer.status_code, error["param"]) == (400, field)
    assert error["message"] == f"{field}={LIMIT + 1} is over this server's limit of {LIMIT}"


def test_a_reply_sent_back_as_the_clients_model_dump_is_taken(api):
    """The usual loop `messages.append(reply.choices[0].message.model_dump())` sends the client's null
    fields too (refusal, annotations, audio, function_call, tool_calls): each was refused as an extra
    input. Null is nothing, in a message as in the request; a value still is refused."""
    import openai

    client = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=api, max_retries=0)
    messages = [{"role": "user", "content": "Hi"}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
    sent_back = first.choices[0].message.model_dump()
    assert sent_back["tool_calls"] is None and sent_back["refusal"] is None
    messages += [sent_back, {"role": "user", "content": "More"}]
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="messages.1.tool_calls: Extra inputs are not permitted"):
        client.chat.completions.create(model="tiny", max_tokens=3, messages=[
            messages[0], {**sent_back, "tool_calls": []}, messages[2]])


def test_a_completion_continuing_split_characters_streams_them_whole(base_dir):  # noqa: F811
    """TextStream with a context (the prompt): at every cut of a text with byte-fallback characters
    that a prompt can end at (a whole character), the deltas add up to the continuation's text,
    none holding U+FFFD."""
    from minipeft.platform.inference import TextStream

    tok = load_tokenizer(base_dir)
    ids = tok.encode("ok 你好 naïve 世界 café")
    for k in range(1, len(ids)):
        head = tok.decode(ids[:k])
        if head.endswith("\ufffd"):
            continue  # a prompt is text: it never ends inside a character
        stream = TextStream(tok, ids[:k])
        deltas = [stream.push(i) for i in ids[k:]] + [stream.finish()]
        assert "".join(deltas) == tok.decode(ids)[len(head):], k
        assert not any("\ufffd" in d for d in deltas), (k, deltas)


@pytest.mark.parametrize("stream", [None, False])
def test_stream_options_without_stream_is_refused_as_openai_does(api, stream):
    """OpenAI answers 400 (param "stream_options") when stream_options comes without stream: true;
    it was taken and ignored, so a client asking for usage chunks silently got none."""
    ask = {"model": "tiny", "prompt": "import", "max_tokens": 2, "stream_options": {"include_usage": True}}
    answer = api.post("/v1/completions", json=ask if stream is None else {**ask, "stream": stream})
    error = answer.json()["error"]
    assert (answer.status_code, error["type"], error["param"]) == (400, "invalid_request_error", "stream_options")
    assert "only allowed when stream is true" in error["message"], error
    streamed = api.post("/v1/completions", json={**ask, "stream": True}).text  # with stream it is taken
    assert '"usage"' in streamed and streamed.endswith("data: [DONE]\n\n")


NOT_FOUND = [  # (method, path, body, param, code): every 404 the platform answers
    ("POST", "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "Hi"}]}, None,
     "model_not_found"),
    ("POST", "/v1/completions", {"model": "gpt-9", "prompt": "a"}, None, "model_not_found"),
    ("GET", "/v1/models/gpt-9", None, None, "model_not_found"),
    ("GET", "/api/v1/models/gpt-9", None, None, "model_not_found"),
    ("POST", "/api/v1/deployments", {"model": "gpt-9"}, "model", "model_not_found"),
    ("POST", "/api/v1/fine-tunes", {"model": "gpt-9", "training_file_ids": ["file-x"]}, "model", "model_not_found"),
    ("GET", "/api/v1/files/file-x", None, None, None),
    ("GET", "/api/v1/fine-tunes/ft-x", None, None, None),
    ("GET", "/api/v1/deployments/nope", None, None, None),
    ("GET", "/v2/anything", None, None, None),
]


@pytest.mark.parametrize("method,path,body,param,code", NOT_FOUND, ids=[f"{c[0]} {c[1]}" for c in NOT_FOUND])
def test_a_404_has_openais_type_and_code(api, method, path, body, param, code):
    """OpenAI answers an unknown model with type "invalid_request_error" and code "model_not_found"
    (and any other 404 with type "invalid_request_error"); the type was "not_found_error", and the
    management API's unknown models had no code."""
    answer = api.request(method, path, json=body)
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error
