"""Seeded fuzz of every route of the platform, in process (FastAPI's TestClient, no scheduler, no
training): each route gets its valid request, then requests made from it by random mutations (a
field of the wrong JSON type, huge or non-finite numbers as raw JSON, a field missing or extra, a
body that is empty, not UTF-8, a JSON array or sent under another Content-Type, query and path
parameters of the wrong type or shaped like paths, multipart forms with no file, two files or odd
file names). Every answer must be 2xx (the mutation happened to be valid) or 4xx, never 5xx, as
JSON in OpenAI's error shape, and a refusal of a field's value must name that field. A failure
prints the route, the seed's case number and the mutation, so it replays."""
from __future__ import annotations

import copy
import json
import random
import re
from typing import Any, Iterator, Optional

import pytest
import torch

import fastapi  # noqa: F401
from fastapi.testclient import TestClient

from minipeft import load_pretrained
from minipeft.lora import LoraConfig
from minipeft.peft_model import get_peft_model
from minipeft.platform.app import create_app
from minipeft.platform.state import Settings
from minipeft.templates import get_template, save_template
from conftest import save_tiny_base

KEY = "k-fuzz"
SEED = 20240607
CASES = 110  # mutated requests per route (and its valid one): ~2,800 requests in all
ROWS = b"".join(json.dumps({"instruction": f"Say {w}.", "output": w}).encode() + b"\n"
                for w in "one two three four five six seven eight nine ten".split())
HUGE = "x" * 100_000
# JSON values of every type, and the strings and numbers most likely to break a handler.
VALUES = [None, True, False, 0, -1, -(2 ** 70), 2 ** 70, 1.5, -0.5, 1e308, "", "abc", HUGE, "a\x00b",
          "ü🙂\u202e", "../x", [], [None], ["a"], [1, 2], {}, {"a": 1}, [{}], json.loads("[" * 300 + "]" * 300)]
# Raw JSON number tokens Python's json would not write: out of float range, NaN (not JSON at all).
RAW = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1" + "0" * 500, "-0", "1E2", "0.0000001"]
# Whole bodies that are no JSON object.
BODIES = [b"", b"null", b"[]", b"1", b'"text"', b"{", b'{"model": ', b"\xff\xfe\x00{", b"{}garbage", b"{}",
          b'{"model": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"]  # nested past json's recursion limit
TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None,
         "application/json; charset=utf-16", "application/xml"]
BAD_IDS = ["..", "%2E%2E", "%2F", "a%2Fb", "..%2F..%2Fetc%2Fpasswd", "x" * 5000, "%00", "a%00b", "%20",
           "%C3%BC%F0%9F%99%82", "%FF%FE", "'", "%22", "null", "0", "-1", "%25", "a.b", "~"]
QUERY = ["abc", "-1", "0", "1e9", "1.5", "", "99999999999999999999999", "%00", "ü", "1000000000", "true",
         "NaN", "2", "100", "101"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """An application with one uploaded file, a finished job with one checkpoint, its published
    LoRA model and a deployment "dep" of it; max_tokens 2, so every reply is short."""
    root = tmp_path_factory.mktemp("fuzz")
    base = save_tiny_base(root / "base")
    torch.manual_seed(0)
    adapter = root / "adapter"
    get_peft_model(load_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    save_template(adapter, get_template("plain"))
    application = create_app(Settings(root / "data", {"tiny": base}, api_key=KEY, max_tokens=2))
    platform = application.state.platform
    client = TestClient(application, headers={"Authorization": f"Bearer {KEY}"}, raise_server_exceptions=False)
    file_id = client.post("/api/v1/files", files={"file": ("train.jsonl", ROWS)}).json()["id"]
    output = root / "data" / "jobs" / "ft-done" / "output"
    (output / "checkpoint-1").mkdir(parents=True)
    (output / "checkpoint-1" / "adapter").symlink_to(adapter, target_is_directory=True)
    platform.store.insert("jobs", {
        "id": "ft-done", "model": "tiny", "base_model": "tiny", "training_type": "efficient_sft",
        "hyper_parameters": {}, "training_file_ids": [file_id], "validation_file_ids": [], "status": "SUCCEEDED",
        "config": {"output_dir": str(output), "method": "lora", "test_ratio": 0.1, "template": "plain",
                   "model": str(base)}, "resumes": 0, "created_at": 1})
    platform.store.insert("models", {"name": "tiny-ft", "job_id": "ft-done", "base_model": "tiny",
                                     "weights_dir": str(base), "adapter_dir": str(adapter), "method": "lora",
                                     "checkpoint": None, "created_at": 1})
    assert client.post("/api/v1/deployments", json={"model": "tiny-ft", "name": "dep"}).status_code == 200
    yield {"client": client, "file": file_id, "job": "ft-done"}
    platform.close()


def chat(stream: bool) -> dict[str, Any]:
    body = {"model": "dep", "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 1, "temperature": 0.7, "top_p": 0.9, "seed": 1, "stop": ["zz"], "n": 1,
            "presence_penalty": 0.5, "frequency_penalty": 0.1, "stream": stream}
    return {**body, "stream_options": {"include_usage": True}} if stream else body


def completion(stream: bool) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hello", "max_tokens": 2, "temperature": 0, "stop": "zz", "stream": stream,
            "max_completion_tokens": None, "user": "u"}


def routes(w: dict[str, Any]) -> list[tuple[str, str, Optional[dict[str, Any]], dict[str, Any]]]:
    """(method, path, JSON body or None, query) of each route's valid request; {file}, {job}: the world's."""
    fine_tune = {"model": "tiny", "training_file_ids": [w["file"]], "validation_file_ids": [],
                 "training_type": "efficient_sft",
                 "hyper_parameters": {"n_epochs": 1, "batch_size": 2, "learning_rate": 0.001, "lora_rank": 4,
                                      "lora_alpha": 8.0, "split": 0.2, "max_length": 64, "seed": 1,
                                      "template": "plain", "packing": False}}
    page = {"page_no": 1, "page_size": 10}
    return [
        ("GET", "/api/v1/files", None, page), ("GET", "/api/v1/files/{file}", None, {}),
        ("DELETE", "/api/v1/files/{missing}", None, {}),
        ("POST", "/api/v1/fine-tunes", fine_tune, {}),
        ("GET", "/api/v1/fine-tunes", None, {**page, "status": "FAILED"}),
        ("GET", "/api/v1/fine-tunes/{job}", None, {}), ("GET", "/api/v1/fine-tunes/{job}/logs", None,
                                                        {"offset": 0, "line": 10}),
        ("POST", "/api/v1/fine-tunes/{job}/cancel", None, {}), ("DELETE", "/api/v1/fine-tunes/{missing}", None, {}),
        ("GET", "/api/v1/fine-tunes/{job}/checkpoints", None, {}),
        ("POST", "/api/v1/fine-tunes/{job}/checkpoints/checkpoint-1/publish", None, {}),
        ("POST", "/api/v1/fine-tunes/{job}/publish", None, {}),
        ("GET", "/api/v1/models", None, page), ("GET", "/api/v1/models/tiny-ft", None, {}),
        ("DELETE", "/api/v1/models/tiny-ft", None, {}),
        ("POST", "/api/v1/deployments", {"model": "tiny-ft", "name": "dep2"}, {}),
        ("GET", "/api/v1/deployments", None, page), ("GET", "/api/v1/deployments/dep", None, {}),
        ("DELETE", "/api/v1/deployments/{missing}", None, {}),
        ("GET", "/v1/models", None, {}), ("GET", "/v1/models/dep", None, {}), ("DELETE", "/v1/models/tiny", None, {}),
        ("POST", "/v1/chat/completions", chat(False), {}), ("POST", "/v1/chat/completions", chat(True), {}),
        ("POST", "/v1/completions", completion(False), {}), ("POST", "/v1/completions", completion(True), {}),
    ]


def _nodes(value: Any, at: tuple = ()) -> Iterator[tuple]:
    """Every place in a JSON value: the paths of its object members and list items."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield at + (key,)
        yield from _nodes(item, at + (key,))


def _parent(body: Any, path: tuple) -> Any:
    for key in path[:-1]:
        body = body[key]
    return body


def mutate_body(rng: random.Random, body: dict[str, Any]) -> tuple[bytes, Optional[str], str, Optional[tuple]]:
    """(raw body, Content-Type, what was done, the path of the field changed: its name must be in
    a refusal)."""
    body = copy.deepcopy(body)
    kind = rng.choice(["value", "value", "value", "raw", "missing", "extra", "body", "type", "twice"])
    places = list(_nodes(body))
    if kind == "body":
        raw = rng.choice(BODIES + [json.dumps([body]).encode(), json.dumps(body).encode("utf-16"),
                                   json.dumps(body, ensure_ascii=False).encode("latin-1", "replace") + b"\xe9"])
        return raw, "application/json", f"body {raw[:40]!r}", None
    if kind == "type":
        kind_ = rng.choice(TYPES)
        return json.dumps(body).encode(), kind_, f"Content-Type {kind_!r}", None
    path: Optional[tuple] = rng.choice(places) if places else None
    if kind in ("value", "twice") and path is not None:
        value = rng.choice(VALUES)
        _parent(body, path)[path[-1]] = value
        if kind == "twice" and (other := rng.choice(places)) and other[:len(path)] != path:
            try:
                _parent(body, other)[other[-1]] = rng.choice(VALUES)
                path = None  # two fields changed: either may be the one named
            except (KeyError, IndexError, TypeError):
                pass
        return json.dumps(body).encode(), "application/json", f"{path} = {str(value)[:40]!r}", path
    if kind == "raw" and path is not None:
        token = rng.choice(RAW)
        _parent(body, path)[path[-1]] = "@@RAW@@"
        return json.dumps(body).replace('"@@RAW@@"', token).encode(), "application/json", f"{path} = {token}", path
    if kind == "missing" and path is not None:
        parent = _parent(body, path)
        parent.pop(path[-1]) if isinstance(parent, dict) else parent.pop(path[-1])
        return json.dumps(body).encode(), "application/json", f"{path} missing", None
    where = rng.choice([()] + [p for p in places if isinstance(_parent(body, p + ("",)), dict)])
    name = rng.choice(["extra", "", "\x00", "ü🙂", "x" * 1000, "model"])
    target = _parent(body, where + ("",))
    target[name] = rng.choice(VALUES)
    return json.dumps(body).encode(), "application/json", f"extra {where + (name[:20],)}", None


def multipart(parts: list[tuple[str, Optional[bytes], bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of (field name, file name or None for a plain field, content)."""
    boundary = "fuzzb0undary"
    out = b""
    for name, filename, data in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        if filename is not None:
            head += b'; filename="' + filename + b'"\r\nContent-Type: application/octet-stream'
        out += head + b"\r\n\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


UPLOADS = [  # (what, parts) of multipart uploads
    ("valid", [("file", b"a.jsonl", ROWS), ("purpose", None, b"fine-tune")]),
    ("no file", [("purpose", None, b"fine-tune")]),
    ("file as a plain field", [("file", None, ROWS)]),
    ("two files", [("file", b"a.jsonl", ROWS), ("file", b"b.jsonl", ROWS)]),
    ("two fields", [("file", b"a.jsonl", ROWS), ("other", b"b.jsonl", ROWS)]),
    ("not UTF-8", [("file", b"a.jsonl", b"\xff\xfe\x00bad\n")]),
    ("empty file", [("file", b"a.jsonl", b"")]),
    ("huge file name", [("file", b"n" * 100_000 + b".jsonl", ROWS)]),
    ("file name not UTF-8", [("file", b"\xff\xfe.jsonl", ROWS)]),
    ("file name with NUL and path", [("file", b"../\x00a\x01.jsonl", ROWS)]),
    ("empty file name", [("file", b"", ROWS)]),
    ("unicode file name", [("file", "ü🙂.jsonl".encode(), ROWS)]),
    ("purpose other", [("file", b"a.jsonl", ROWS), ("purpose", None, b"batch")]),
    ("purpose a file", [("file", b"a.jsonl", ROWS), ("purpose", b"p", b"fine-tune")]),
    ("purpose not UTF-8", [("file", b"a.jsonl", ROWS), ("purpose", None, b"\xff")]),
    ("purpose huge", [("file", b"a.jsonl", ROWS), ("purpose", None, HUGE.encode())]),
    ("many fields", [("file", b"a.jsonl", ROWS)] + [(f"f{i}", None, b"x") for i in range(10)]),
]


def check(answer, what: str, field: Optional[tuple] = None) -> None:
    """The answer is 2xx or 4xx (503 only for a model that cannot be loaded), JSON (a stream: its
    events), errors in OpenAI's shape; a 400 about a field that was changed names it."""
    status = answer.status_code
    loading = status == 503 and "cannot be loaded" in answer.text  # the documented 503: the stored model broke
    assert status < 500 or loading, f"{what}: {status} {answer.text[:500]}"
    if status == 200 and answer.headers["content-type"].startswith("text/event-stream"):
        events = [e[len("data: "):] for e in answer.text.split("\n\n") if e]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), f"{what}: {answer.text[:500]}"
        return
    assert answer.headers["content-type"] == "application/json", f"{what}: {answer.headers['content-type']}"
    body = answer.json()
    if status < 400:
        return
    assert set(body) == {"error"}, f"{what}: {body}"
    error = body["error"]
    assert set(error) - {"detail"} == {"message", "type", "param", "code"}, f"{what}: {error}"
    message = error["message"]
    assert isinstance(message, str) and message and isinstance(error["type"], str), f"{what}: {error}"
    assert error["param"] is None or isinstance(error["param"], str), f"{what}: {error}"
    assert "Traceback" not in message and "internal error" not in message, f"{what}: {message}"
    assert len(message) < 2000, f"{what}: a message of {len(message)} characters: {message[:300]}"
    name = next((k for k in reversed(field or ()) if isinstance(k, str)), None)
    if status == 400 and name is not None:
        dotted = ".".join(map(str, field))  # or the field holding it, as `param` (messages: the prompt too long)
        named = name in message or (error["param"] and dotted.startswith(error["param"]))
        assert named, f"{what}: {name!r} not named in {message!r} (param {error['param']!r})"


def _path(template: str, world: dict[str, Any]) -> str:
    return template.format(file=world["file"], job=world["job"], missing="nothing-here")


class Failures(list):
    """Every bad answer of a run, reported together, one of each kind (alike but for the case and
    its mutation): one fix often covers many."""

    def check(self, answer, what: str, field: Optional[tuple] = None) -> None:
        try:
            check(answer, what, field)
        except AssertionError as e:
            self.append(str(e))

    def report(self) -> None:
        kinds = {re.sub(r"case \d+: .*?: ", "", f)[:120]: f for f in self}
        assert not self, f"{len(self)} bad answers, {len(kinds)} kinds:\n" + "\n".join(f[:400] for f in kinds.values())


def test_every_route_answers_mutated_requests_with_4xx_errors_in_openais_shape(world):
    client, rng, failures = world["client"], random.Random(SEED), Failures()
    as_json = {"Content-Type": "application/json"}
    for method, template, body, query in routes(world):
        route = f"{method} {template}"
        raw = None if body is None else json.dumps(body).encode()
        failures.check(client.request(method, _path(template, world), content=raw, params=query, headers=as_json),
                       f"{route} valid")
        for case in range(CASES):
            what = f"{route} case {case}: "
            params, path = dict(query), _path(template, world)
            if body is not None and rng.random() < 0.85:
                raw, kind, done, field = mutate_body(rng, body)
                what += done
                headers = {} if kind is None else {"Content-Type": kind}
                failures.check(client.request(method, path, content=raw, headers=headers), what, field)
                continue
            if params and rng.random() < 0.6:
                key = rng.choice(sorted(params) + ["other"])
                params[key] = rng.choice(QUERY)
                what += f"query {key}={params[key]!r}"
                query_string = "&".join(f"{k}={v}" for k, v in params.items())
                failures.check(client.request(method, f"{path}?{query_string}"), what)
                continue
            parts = path.split("/")
            # a segment after the prefix (/api/v1 or /v1): an id, a name or a fixed word of the route
            at = rng.choice([i for i in range(len(parts)) if i > (2 if parts[1] == "v1" else 3)] or [len(parts) - 1])
            parts[at] = rng.choice(BAD_IDS)
            what += f"path {'/'.join(parts)[:120]}"
            failures.check(client.request(method, "/".join(parts), content=raw, headers=as_json), what)
    failures.report()


def test_multipart_uploads_of_every_shape_are_answered_4xx_or_stored(world):
    client, rng, failures = world["client"], random.Random(SEED), Failures()
    for what, parts in UPLOADS:
        raw, kind = multipart(parts)
        answer = client.post("/api/v1/files", content=raw, headers={"Content-Type": kind})
        failures.check(answer, f"upload: {what}")
    for case in range(CASES):  # truncated and corrupted forms
        raw, kind = multipart(rng.choice(UPLOADS)[1])
        cut = rng.randrange(len(raw))
        raw = rng.choice([raw[:cut], raw[:cut] + b"\xff" + raw[cut + 1:], raw.replace(b"\r\n", b"\n", 1)])
        kind = rng.choice([kind, "multipart/form-data", "multipart/form-data; boundary=", "application/json",
                           "multipart/form-data; boundary=other", None])
        answer = client.post("/api/v1/files", content=raw, headers={} if kind is None else {"Content-Type": kind})
        failures.check(answer, f"upload case {case}: {kind} {raw[:60]!r}")
    failures.report()


# Regression cases of what the fuzz found: each answered 4xx already, but unclear or unbounded.

def _error(answer, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text[:500]
    return answer.json()["error"]


def test_a_huge_id_path_or_value_is_not_echoed_back_whole(world):
    """A 100k-character model name came back whole in the 404, a 5,000-character path in "no
    route", a 500-digit max_tokens in its refusal: messages of 100k characters."""
    client = world["client"]
    error = _error(client.post("/v1/chat/completions", json={**chat(False), "model": HUGE}), 404)
    assert "(100000 characters) not found" in error["message"] and len(error["message"]) < 400, error
    error = _error(client.get("/api/v1/files/" + "y" * 5000), 404)
    assert error["message"].startswith("file 'yyyy") and "(5000 characters)" in error["message"], error
    error = _error(client.get("/api/v1/" + "z" * 5000), 404)
    assert error["message"].startswith("no route GET '/api/v1/zzz") and len(error["message"]) < 200, error
    error = _error(client.post("/v1/completions", content=b'{"model": "tiny", "prompt": "a", "max_tokens": 1'
                               + b"0" * 500 + b"}", headers={"Content-Type": "application/json"}), 400)
    assert error["param"] == "max_tokens" and "(501 characters) is over this server's limit" in error["message"]
    error = _error(client.post("/v1/completions", json={**completion(False), "k" * 1000: 1}), 400)
    assert "(1000 characters)]: this server implements" in error["message"] and len(error["message"]) < 600


def test_an_extra_key_that_is_empty_unprintable_or_long_is_named_quoted(world):
    """The extra key "" was reported as "request body: Extra inputs are not permitted", as if the
    body were the extra; a NUL in a key went into the message raw."""
    client = world["client"]
    for key, named in (("", "'': Extra inputs"), ("a\x00b", "'a\\x00b': Extra inputs"),
                       ("x" * 1000, "'xxxx")):
        error = _error(client.post("/api/v1/deployments", json={"model": "tiny-ft", key: 1}), 400)
        assert error["message"].startswith(named) and len(error["message"]) < 300, error
    error = _error(client.post("/api/v1/fine-tunes", json={"model": "tiny", "training_file_ids": ["f"],
                                                           "hyper_parameters": {"": 1}}), 400)
    assert error["message"].startswith("hyper_parameters.'': Extra inputs"), error


def test_a_body_that_is_not_utf8_or_breaks_off_says_where(world):
    """A JSON body with a byte that is not UTF-8 got FastAPI's "There was an error parsing the
    body"; a malformed one did not say where it broke."""
    client = world["client"]
    error = _error(client.post("/api/v1/deployments", content=b'{"model": "tiny-ft\xe9"}',
                               headers={"Content-Type": "application/json"}), 400)
    assert error["message"].startswith("the request body is not UTF-8: invalid continuation byte at byte 18"), error
    error = _error(client.post("/v1/completions", content=b'{"model": ', headers={"Content-Type": "application/json"}),
                   400)
    assert error["message"] == "malformed JSON body: Expecting value (at character 10)", error


def test_a_wrong_method_is_told_every_method_of_the_path(world):
    """Starlette's 405 said "Method Not Allowed", its Allow header naming the first route's method
    only: DELETE /api/v1/files was told POST, and the path takes GET too."""
    answer = world["client"].delete("/api/v1/files")
    error = _error(answer, 405)
    assert error["message"] == "Method Not Allowed: DELETE /api/v1/files; this path takes GET, POST", error
    assert answer.headers["allow"] == "GET, POST"


@pytest.mark.parametrize("what,content_type,parts,fragment", [
    ("json", "application/json", None, "send one file as multipart/form-data field 'file'"),
    ("two files", None, [("file", b"a.jsonl", ROWS), ("file", b"b.jsonl", ROWS)],
     "malformed multipart upload: Too many files. Maximum number of files is 1.; send one file as"),
    ("huge file name", None, [("file", b"n" * 100_000, ROWS)],
     "malformed multipart upload: Invalid multipart data. (Maximum header size exceeded); send one file"),
    ("no boundary", "multipart/form-data", [("file", b"a.jsonl", ROWS)], "Missing boundary in multipart.; send"),
])
def test_a_malformed_upload_says_what_an_upload_is(world, what, content_type, parts, fragment):
    """Starlette's multipart errors ("Too many files. Maximum number of files is 1.", "Invalid
    multipart data.") named neither the field nor the fix, and a JSON body was told only that
    field 'file' was missing."""
    raw, kind = multipart(parts or [("file", b"a.jsonl", ROWS)])
    answer = world["client"].post("/api/v1/files", content=raw if parts else b'{"file": "x"}',
                                  headers={"Content-Type": content_type or kind})
    error = _error(answer, 400)
    assert fragment in error["message"] and error["param"] == "file", error


@pytest.mark.parametrize("content,said", [
    (1.5, "messages.0.content: Value error, expected a string, a list of text parts or null (got 1.5)"),
    ({"type": "text"}, 'messages.0.content: Value error, expected a string, a list of text parts or null (got {"type"'),
    ([None], 'messages.0.content: Value error, part 0: expected an object {"type": "text", "text": "..."} (got null)'),
    ([{"text": "hi"}], 'part 0: expected an object {"type": "text", "text": "..."} (got {"text": "hi"})'),
    ([{"type": "text", "text": 5}], 'part 0: expected an object {"type": "text", "text": "..."} (got {"type"'),
])
def test_a_message_content_of_a_wrong_shape_is_one_sentence(world, content, said):
    """The union's two members each reported: "messages.0.content.str: Input should be a valid
    string (got 1.5); messages.0.content.list[ContentPart]: Input should be a valid list"."""
    error = _error(world["client"].post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": content}]}), 400)
    assert said in error["message"] and ".str" not in error["message"] and "list[" not in error["message"], error
    assert error["param"] == "messages.0.content"
