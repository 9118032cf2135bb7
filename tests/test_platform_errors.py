"""Bad input to the platform, from tables: every case is answered 4xx with a message that says what
was wrong (checked by a fragment of it), nothing is stored for a refused upload, and the server
never answers 500 nor dies (its log is checked for tracebacks and 500s at the end)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import fastapi  # noqa: F401
import multipart  # noqa: F401
import openai

from minipeft.checkpoint import read_config  # noqa: E402
from minipeft.templates import TEMPLATE_FILE, get_template, load_template  # noqa: E402
from minipeft.tokenizer import load_tokenizer  # noqa: E402
from platform_fixtures import base_dir, data_file, server, trained  # noqa: E402,F401
from platform_server import KEY, multipart  # noqa: E402

GOOD = b'{"instruction": "Say hi.", "output": "hi"}\n'
BAD_UPLOADS = [  # (name, content, status, fragment of the message)
    ("text", b"hello world\n", 400, "bad.jsonl:1:1: invalid JSON"),
    ("binary", bytes(range(256)) * 4, 400, "not UTF-8"),
    ("json-array", b'[{"instruction": "a", "output": "b"}]\n', 400, "expected a JSON object"),
    ("pretty-printed", b'{\n "instruction": "a",\n "output": "b"\n}\n', 400, "pretty-printed JSON?"),
    ("missing-output", b'{"instruction": "a"}\n', 400, "bad.jsonl:1: output"),
    ("empty", b"", 400, "the file is empty"),
    ("csv", b"instruction,output\nSay hi.,hi\n", 400, "bad.jsonl:2:1"),
    ("one-bad-line", GOOD + b'{"instruction": "a", "output": ""}\n' + GOOD, 400, "bad.jsonl:2: output"),
    ("too-big", GOOD * (1100 * 1024 // len(GOOD)), 413, "limit"),
]


@pytest.mark.parametrize("name,content,status,fragment", BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_upload_is_refused_with_its_problems(server, name, content, status, fragment):
    code, answer = server.upload("bad.jsonl", content)
    assert code == status and fragment in answer["error"]["message"], answer
    names = [f["filename"] for f in server.ok("GET", "/api/v1/files?page_size=100")["data"]]
    assert "bad.jsonl" not in names
    assert not list((server.data_dir / "files").glob(".*")), "no partial upload is left behind"


def test_upload_form_errors_and_names_that_look_like_paths(server):
    raw, kind = multipart({"purpose": "fine-tune"}, {})
    assert _refused(server.call("POST", "/api/v1/files", raw=raw, headers={"Content-Type": kind}), 400, "'file'")
    assert _refused(server.upload("a.jsonl", GOOD, purpose="batch"), 400, "purpose 'batch'")
    assert _refused(server.call("POST", "/api/v1/files", raw=b"--x\r\nbroken", headers={
        "Content-Type": "multipart/form-data; boundary=x"}), 400, "")
    code, stored = server.upload("../../escape.jsonl", GOOD)
    assert code == 200 and stored["filename"] == "escape.jsonl"
    assert (server.data_dir / "files" / f"{stored['id']}.jsonl").read_bytes() == GOOD
    assert not list(server.data_dir.parent.rglob("escape.jsonl"))
    assert server.ok("DELETE", f"/api/v1/files/{stored['id']}")["deleted"]
    assert not (server.data_dir / "files" / f"{stored['id']}.jsonl").exists()


def test_an_upload_with_typo_warnings_is_stored_and_says_them(server):
    code, stored = server.upload("typo.jsonl", GOOD + b'{"instruction": "a", "output": "b", "sytem": "x"}\n')
    assert code == 200 and stored["lines"] == 2, stored
    assert any("typo.jsonl:2: sytem" in w and "'system'" in w for w in stored["warnings"]), stored
    assert server.ok("DELETE", f"/api/v1/files/{stored['id']}")["deleted"]


def _refused(call, status, fragment):
    code, answer = call
    assert code == status, (code, answer)
    assert fragment in answer["error"]["message"], answer
    return True


def _context_filling_words(base: Path) -> tuple[int, int]:
    """(n, prompt tokens) with "apple" x n as the user turn to the base model landing 30-60 tokens
    short of the context: room for max_tokens < 64, not for 64."""
    tok = load_tokenizer(base)
    template = load_template(base) if (base / TEMPLATE_FILE).is_file() else get_template("plain")
    context = read_config(base).max_position_embeddings

    def tokens(n: int) -> int:
        return len(template.render_prompt([{"role": "user", "content": " ".join(["apple"] * n)}], tok))
    per_word = tokens(2) - tokens(1)
    n = (context - 40 - tokens(1)) // per_word + 1
    assert context - 64 < tokens(n) < context - 1
    return n, context


def chat(**fields):
    return {"model": "bot", "messages": [{"role": "user", "content": "hi"}], **fields}


BAD_REQUESTS = [  # (id, method, path, JSON body or raw bytes, status, fragment); {file}, {model}, {job} filled in
    ("job-malformed-json", "POST", "/api/v1/fine-tunes", b'{"model": "tiny",', 400, "malformed JSON body"),
    ("job-not-an-object", "POST", "/api/v1/fine-tunes", b"[1, 2]", 400, "request body"),
    ("job-no-model", "POST", "/api/v1/fine-tunes", {"training_file_ids": ["{file}"]}, 400, "model: required"),
    ("job-no-files", "POST", "/api/v1/fine-tunes", {"model": "tiny"}, 400, "training_file_ids: required"),
    ("job-unknown-model", "POST", "/api/v1/fine-tunes", {"model": "gpt-9", "training_file_ids": ["{file}"]}, 404,
     "model 'gpt-9' not found"),
    ("job-unknown-file", "POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": ["file-x"]}, 404,
     "file 'file-x' not found"),
    ("job-training-type", "POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": ["{file}"],
                                                        "training_type": "dpo"}, 400, "training_type"),
    ("hp-type", "POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": ["{file}"],
                                               "hyper_parameters": {"n_epochs": "three"}}, 400,
     "hyper_parameters.n_epochs: Input should be a valid integer (got 'three')"),
    ("hp-range", "POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": ["{file}"],
                                                "hyper_parameters": {"learning_rate": 5}}, 400,
     "learning_rate=5.0 (expected in (0, 1))"),
    ("hp-cap", "POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": ["{file}"],
                                              "hyper_parameters": {"n_epochs": 1000}}, 400, "n_epochs"),
    ("hp-unknown", "POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": ["{file}"],
                                                  "hyper_parameters": {"lerning_rate": 0.1}}, 400, "lerning_rate"),
    ("hp-context", "POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": ["{file}"],
                                                  "hyper_parameters": {"max_length": 10 ** 6}}, 400, "context"),
    ("hp-template", "POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": ["{file}"],
                                                   "hyper_parameters": {"template": "chatgpt"}}, 400,
     "unknown chat template 'chatgpt'"),
    ("continue-rank", "POST", "/api/v1/fine-tunes", {"model": "{model}", "training_file_ids": ["{file}"],
                                                     "hyper_parameters": {"lora_rank": 8, "lora_alpha": 16}}, 400,
     "lora_rank=8 (the model has 4); lora_alpha=16.0 (the model has 8.0)"),
    ("continue-rslora", "POST", "/api/v1/fine-tunes", {"model": "{model}", "training_file_ids": ["{file}"],
                                                       "hyper_parameters": {"use_rslora": True}}, 400,
     "use_rslora=True (the model has False)"),
    ("hp-packing-prefix", "POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": ["{file}"],
                                                         "training_type": "prefix",
                                                         "hyper_parameters": {"packing": True}}, 400, "packing"),
    ("hp-other-method", "POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": ["{file}"],
                                                       "training_type": "prefix",
                                                       "hyper_parameters": {"lora_rank": 8, "n_epochs": 1}}, 400,
     "hyper_parameters: lora_rank is a LoRA setting (method 'lora' or 'qlora'); this job's method is 'prefix', "
     "which would ignore it (training_type 'prefix')"),
    ("hp-packing-type", "POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": ["{file}"],
                                                       "hyper_parameters": {"packing": "yes"}}, 400,
     "hyper_parameters.packing: Input should be a valid boolean"),
    ("continue-method", "POST", "/api/v1/fine-tunes", {"model": "{model}", "training_file_ids": ["{file}"],
                                                       "training_type": "sft"}, 400, "is a LORA adapter"),
    ("job-missing", "GET", "/api/v1/fine-tunes/ft-nope", None, 404, "fine-tune job 'ft-nope' not found"),
    ("job-status-filter", "GET", "/api/v1/fine-tunes?status=DONE", None, 400, "status"),
    ("logs-offset", "GET", "/api/v1/fine-tunes/{job}/logs?offset=-1", None, 400, "offset"),
    ("logs-line", "GET", "/api/v1/fine-tunes/{job}/logs?line=abc", None, 400, "line"),
    ("cancel-finished", "POST", "/api/v1/fine-tunes/{job}/cancel", None, 409, "is SUCCEEDED"),
    ("publish-missing", "POST", "/api/v1/fine-tunes/{job}/checkpoints/checkpoint-999/publish", None, 404,
     "checkpoint 'checkpoint-999' not found"),
    ("file-missing", "DELETE", "/api/v1/files/file-nope", None, 404, "file 'file-nope' not found"),
    ("deploy-unknown", "POST", "/api/v1/deployments", {"model": "nope"}, 404, "fine-tuned model 'nope' not found"),
    ("deploy-taken", "POST", "/api/v1/deployments", {"model": "{model}", "name": "bot"}, 409, "'bot' is taken"),
    ("deploy-base-name", "POST", "/api/v1/deployments", {"model": "{model}", "name": "tiny"}, 409, "taken"),
    ("deploy-bad-name", "POST", "/api/v1/deployments", {"model": "{model}", "name": "../x"}, 400, "name '../x'"),
    ("deploy-empty-name", "POST", "/api/v1/deployments", {"model": "{model}", "name": ""}, 400,
     "name '': expected 1-128 letters"),  # was taken as "no name given": a 409 about the model's own name
    ("undeploy-missing", "DELETE", "/api/v1/deployments/nope", None, 404, "deployment 'nope' not found"),
    ("chat-malformed", "POST", "/v1/chat/completions", b'{"model": "bot", "messages": [', 400, "malformed JSON"),
    ("chat-no-messages", "POST", "/v1/chat/completions", {"model": "bot"}, 400, "messages: required"),
    ("chat-empty-messages", "POST", "/v1/chat/completions", chat(messages=[]), 400, "messages"),
    ("chat-unknown-model", "POST", "/v1/chat/completions", chat(model="gpt-4"), 404, "model 'gpt-4' not found"),
    ("chat-max-tokens-limit", "POST", "/v1/chat/completions", chat(max_tokens=100000), 400,
     "max_tokens=100000 is over this server's limit of 64"),
    ("chat-max-tokens-zero", "POST", "/v1/chat/completions", chat(max_tokens=0), 400, "max_tokens"),
    ("chat-temperature", "POST", "/v1/chat/completions", chat(temperature=-1), 400, "temperature"),
    ("chat-top-p", "POST", "/v1/chat/completions", chat(top_p=1.5), 400, "top_p"),
    ("chat-role", "POST", "/v1/chat/completions", chat(messages=[{"role": "robot", "content": "x"}]), 400, "role"),
    ("chat-content-type", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 3}]), 400,
     "content"),
    ("chat-image-part", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages.0: Value error, content.0: part type 'image_url' is not supported"),
    ("chat-text-part-without-text", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400, "content.0.text: required"),
    ("chat-user-null", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": None}]), 400,
     "content: required in a user turn"),
    ("completion-frequency-penalty", "POST", "/v1/completions", {"model": "bot", "prompt": "a",
                                                                 "frequency_penalty": -2.5}, 400,
     "frequency_penalty: Input should be greater than or equal to -2"),
    ("chat-penalty-range", "POST", "/v1/chat/completions", chat(presence_penalty=3), 400, "presence_penalty"),
    ("chat-ends-with-assistant", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), 400,
     "must end with a user turn"),
    ("chat-seed", "POST", "/v1/chat/completions", chat(seed=2 ** 70), 400, "seed"),
    # an unpaired surrogate (JSON's "\ud83d" alone) was a 500 from sentencepiece's C++ cast
    ("chat-surrogate", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "a\ud83d"}]),
     400, "content holds an unpaired surrogate '\\ud83d' at character 1"),
    ("completion-surrogate", "POST", "/v1/completions", {"model": "bot", "prompt": "x\udc00"}, 400,
     "prompt: the text holds an unpaired surrogate '\\udc00' at character 1"),
    ("chat-system-only", "POST", "/v1/chat/completions", chat(messages=[{"role": "system", "content": "s"}]), 400,
     "must end with a user turn; this conversation holds no turn after the system one"),
    # types are strict, as in the fine-tune API: true was taken as max_tokens 1, "yes" as stream
    ("completion-max-tokens-bool", "POST", "/v1/completions", {"model": "bot", "prompt": "a", "max_tokens": True},
     400, "max_tokens: Input should be a valid integer"),
    ("completion-max-tokens-string", "POST", "/v1/completions", {"model": "bot", "prompt": "a", "max_tokens": "5"},
     400, "max_tokens: Input should be a valid integer"),
    ("chat-stream-string", "POST", "/v1/chat/completions", chat(stream="yes"), 400,
     "stream: Input should be a valid boolean"),
    ("chat-nan", "POST", "/v1/chat/completions", b'{"model": "bot", "messages": [], "temperature": NaN}', 400,
     "temperature"),
    ("hp-nan", "POST", "/api/v1/fine-tunes", b'{"model": "tiny", "training_file_ids": [], '
     b'"hyper_parameters": {"lora_alpha": Infinity}}', 400, "lora_alpha"),
    ("chat-n", "POST", "/v1/chat/completions", chat(n=2), 400, "n:"),
    ("chat-stop", "POST", "/v1/chat/completions", chat(stop=["\n", ""]), 400,
     'stop: expected a string or a list of up to 4 non-empty strings, got ["\\n", ""]'),
    ("chat-tools", "POST", "/v1/chat/completions", chat(tools=[]), 400, "unsupported field(s) ['tools']"),
    ("completion-no-prompt", "POST", "/v1/completions", {"model": "bot"}, 400, "prompt: required"),
    ("completion-prompt-type", "POST", "/v1/completions", {"model": "bot", "prompt": 42}, 400, "prompt"),
    ("unknown-route", "GET", "/v2/anything", None, 404, "no route GET /v2/anything"),
    ("wrong-method", "PUT", "/v1/models", None, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_4xx_and_says_why(server, trained, case):
    _, method, path, body, status, fragment = case
    fill = {"{file}": trained["file"], "{model}": trained["model"], "{job}": trained["job"]}
    if isinstance(body, dict):
        text = json.dumps(body)
        for key, value in fill.items():
            text = text.replace(key, value)
        body = text.encode()
    for key, value in fill.items():
        path = path.replace(key, value)
    assert _refused(server.call(method, path, raw=body, headers={"Content-Type": "application/json"}),
                    status, fragment)


def test_prompts_too_long_for_the_context(server, base_dir):
    n, context = _context_filling_words(base_dir)
    words = " ".join(["apple"] * n)
    asked = {"model": "tiny", "messages": [{"role": "user", "content": words}], "max_tokens": 64}
    assert _refused(server.call("POST", "/v1/chat/completions", asked), 400,
                    f"exceeds the model's context of {context} tokens")
    flood = {"model": "tiny", "prompt": " ".join(["apple"] * (2 * context))}
    code, answer = server.call("POST", "/v1/completions", flood)
    assert _refused((code, answer), 400, "fills the model's context") and answer["error"]["param"] == "prompt"


def test_oversized_and_chunked_bodies_are_refused_before_reading(server):
    assert _refused(server.call("POST", "/v1/chat/completions", raw=b"{}", headers={
        "Content-Length": str(5 << 20), "Content-Type": "application/json"}), 413, "over this endpoint's limit")
    huge = chat(messages=[{"role": "user", "content": "x" * (2 << 20)}])
    assert _refused(server.call("POST", "/v1/chat/completions", huge), 413, "limit")
    # http.client sends an iterable body chunked (Transfer-Encoding: chunked, no Content-Length)
    assert _refused(server.call("POST", "/v1/chat/completions", raw=iter([b"{}"]), headers={
        "Content-Type": "application/json"}), 411, "Content-Length")


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"])
def test_every_endpoint_needs_the_api_key(server, header):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/api/v1/files"),
                         ("POST", "/api/v1/files"), ("POST", "/api/v1/fine-tunes"), ("GET", "/docs"),
                         ("GET", "/no/such/route")]:
        headers = {"Authorization": header} if header else {}
        assert _refused(server.call(method, path, raw=b"", headers=headers, key=None), 401, "API key")


def test_the_auth_scheme_is_case_insensitive(server):
    assert server.call("GET", "/v1/models", headers={"Authorization": f"bearer {KEY}"}, key=None)[0] == 200


def test_openai_client_sees_the_errors(server, trained):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="not found") as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"  # OpenAI's code, which clients test for
    with pytest.raises(openai.BadRequestError, match="over this server's limit"):
        client.chat.completions.create(model="bot", messages=[{"role": "user", "content": "hi"}], max_tokens=10 ** 4)


def test_the_server_never_answered_500_and_is_alive(server):
    """Runs last in this module: everything above went through the same server."""
    assert server.proc.poll() is None
    assert server.call("GET", "/v1/models")[0] == 200
    log = server.log.read_text(errors="replace")
    assert '" 500' not in log and "Traceback" not in log, log[-3000:]


def test_a_publish_over_the_leftover_of_one_cut_short_keeps_none_of_it(tmp_path, base_dir):
    """A crash mid-publish (before the copy was staged) can leave the model's folder half-copied: the
    next publish replaces it whole, nothing of it stays, and no staging folder is left beside it."""
    from minipeft.platform.models import _copy_atomic

    source = tmp_path / "adapter"
    source.mkdir()
    (source / "adapter_model.safetensors").write_bytes(b"weights")
    dest = tmp_path / "models" / "bot"
    dest.mkdir(parents=True)
    (dest / "adapter_model.safetensors").write_bytes(b"half")
    (dest / "stale.bin").write_bytes(b"from another copy")
    _copy_atomic(source, dest, "chatml", base_dir)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["adapter_model.safetensors", TEMPLATE_FILE, *(p.name for p in _tokenizer_files(base_dir, tmp_path))])
    assert (dest / "adapter_model.safetensors").read_bytes() == b"weights"
    assert load_template(dest) == get_template("chatml")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bot"]


def _tokenizer_files(base_dir, tmp_path):
    out = tmp_path / "tokenizer"
    load_tokenizer(base_dir).save_pretrained(out)
    return list(out.iterdir())


def test_a_job_whose_eval_perplexity_overflowed_is_still_served(tmp_path):
    """A perplexity past float64 (exp of a loss above ~709 nats) is written as null: Python's json
    wrote Infinity, which the API's JSON responses refuse (a 500 for the job and its metrics)."""
    from fastapi.responses import JSONResponse

    from minipeft.platform.jobs import job_view
    from minipeft.platform.store import Store
    from minipeft.trainer import MetricsLog, read_metrics

    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=0)
    log.write({"step": 1, "eval_loss": 800.0, "eval_perplexity": float("inf"), "grad": [float("nan"), 1.0]})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "eval_loss": 800.0, "eval_perplexity": None,
                                                         "grad": [None, 1.0]}]
    job = {"id": "ft-x", "status": "SUCCEEDED", "config": {"output_dir": str(tmp_path), "test_ratio": 0.1,
                                                           "method": "lora", "learning_rate": 1e-3}}
    body = json.loads(JSONResponse(job_view(job, detail=True)).body)
    assert body["metrics"][0]["eval_perplexity"] is None

    store = Store(tmp_path / "db.sqlite")
    store.insert("jobs", {"id": "ft-y", "status": "SUCCEEDED", "config": {"eval": {"perplexity": float("inf")}}})
    assert store.get("jobs", "ft-y")["config"] == {"eval": {"perplexity": None}}
    store.close()


def test_a_continuation_compares_target_modules_as_a_set(tmp_path):
    """PEFT writes target_modules from a set, in any order: the same modules in another order continue,
    other modules are refused, naming both."""
    from minipeft.lora import LoraConfig
    from minipeft.platform.errors import ApiError
    from minipeft.platform.models import Source, continuation

    LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "q_proj"]).save(tmp_path)
    source = Source("tiny", tmp_path, {"name": "bot", "adapter_dir": str(tmp_path), "method": "lora"})
    assert continuation(source, "lora", {"target_modules": ["q_proj", "v_proj"]})["lora_rank"] == 4
    with pytest.raises(ApiError, match=r"target_modules=\['q_proj'\] \(the model has \['v_proj', 'q_proj'\]\)"):
        continuation(source, "lora", {"target_modules": ["q_proj"]})


def test_a_continuation_of_a_reduction_factor_adapter_inherits_no_bottleneck_size(tmp_path):
    """Its saved bottleneck_size is null: inherited as such, the job refused None as a size."""
    from minipeft.adapter import AdapterConfig
    from minipeft.platform.models import Source, continuation

    AdapterConfig(reduction_factor=8).save(tmp_path)
    source = Source("tiny", tmp_path, {"name": "bot", "adapter_dir": str(tmp_path), "method": "adapter"})
    assert continuation(source, "adapter", {}) == {"init_adapter": str(tmp_path), "adapter_placement": "houlsby"}
