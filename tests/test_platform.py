"""The local platform end to end over real HTTP on 127.0.0.1, the way a learner uses the cloud one:
upload -> fine-tune job -> SUCCEEDED -> deploy -> chat through the official `openai` client.

The reference for every answer is in-process generation (minipeft.generation.generate, greedy)
with the same base model and adapter: equal text, token for token. Also: streaming = non-streaming,
100 concurrent requests to two models while a job trains (each answer equal to its model's
reference, so adapters are never mixed up between requests), cancel, a failing job, a restart
after a crash (SIGKILL) and after a clean stop, and the `minipeft job` client commands.
Bad inputs are in tests/test_platform_errors.py. The base model is the shipped one when it exists,
else a tiny random one (hidden 64, 2 layers) built here.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastapi  # noqa: F401
import multipart  # noqa: F401
import openai

from minipeft.cli import main  # noqa: E402
from minipeft.data import load_jsonl  # noqa: E402
from minipeft.demo import TASKS_FILE  # noqa: E402
from minipeft.generation import generate  # noqa: E402
from minipeft.job import REPO, load_trained  # noqa: E402
from minipeft.platform import cli as platform_cli, routes, scheduler  # noqa: E402
from minipeft.platform.inference import TextStream  # noqa: E402
from minipeft.platform.state import lock_data_dir  # noqa: E402
from minipeft.platform.store import Store  # noqa: E402
from minipeft.templates import TEMPLATE_FILE, get_template, load_template  # noqa: E402
from minipeft.tokenizer import load_tokenizer  # noqa: E402
from minipeft.train_config import TrainConfig  # noqa: E402
from platform_fixtures import HP, base_dir, data_file, server, trained  # noqa: E402,F401
from platform_server import HOST, KEY  # noqa: E402

PROMPTS = ["Repeat the word apple then river.", "Repeat the word music then stone."]


def reference(base, adapter, messages=None, prompt=None, max_tokens=16, **penalties):
    """(text, token count, finish_reason) of greedy in-process generation: the answer the server
    must give. The template is the one saved beside the adapter (or the model), else plain;
    penalties: generate()'s presence_penalty and frequency_penalty."""
    model, tok = load_trained(str(base), adapter)
    folder = Path(adapter or base)
    template = load_template(folder) if (folder / TEMPLATE_FILE).is_file() else get_template("plain")
    stops = template.stop_token_ids(tok)
    ids = template.render_prompt(messages, tok) if messages is not None else tok.encode(prompt, bos=True)
    out = generate(model, torch.tensor([ids]), max_tokens, eos_token_id=stops, **penalties)[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(out) if t in stops), None)
    reply = out if cut is None else out[:cut]
    # A completion continues its prompt: its text is what the reply adds to the prompt's (its first
    # word's space included, which decoding the reply alone drops); a chat reply starts a new text.
    text = tok.decode(reply) if messages is not None else tok.decode(ids + reply)[len(tok.decode(ids)):]
    return text, len(reply), "length" if cut is None else "stop"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_trained_job_reports_metrics_logs_checkpoints_and_evaluation(server, trained):
    job = server.ok("GET", f"/api/v1/fine-tunes/{trained['job']}")
    assert job["status"] == "SUCCEEDED" and job["fine_tuned_model"] == trained["model"]
    steps = [row["step"] for row in job["metrics"] if "loss" in row]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2  # logging_steps=1: every step
    assert job["evaluation"]["task"] in ("generation", "classification") and job["evaluation"]["metrics"]["loss"] > 0
    assert job["effective_hyper_parameters"]["lora_rank"] == HP["lora_rank"]
    logs = server.logs(trained["job"])
    assert "step=1" in logs and "evaluation (" in logs and "succeeded" in logs and "\r" not in logs
    page = server.ok("GET", f"/api/v1/fine-tunes/{trained['job']}/logs?offset=1&line=2")
    assert page["logs"] == logs.splitlines()[1:3]
    checkpoints = server.ok("GET", f"/api/v1/fine-tunes/{trained['job']}/checkpoints")["data"]
    assert checkpoints and all(c["checkpoint"] == f"checkpoint-{c['step']}" for c in checkpoints)
    model = server.ok("POST", f"/api/v1/fine-tunes/{trained['job']}/checkpoints/{checkpoints[0]['checkpoint']}/publish")
    assert model["checkpoint"] == checkpoints[0]["checkpoint"]
    names = [m["name"] for m in server.ok("GET", "/api/v1/models?page_size=100")["data"]]
    assert {"tiny", trained["model"], model["name"]} <= set(names)


def test_chat_through_openai_client_equals_in_process_generation(server, trained, base_dir, client):
    adapter = server.ok("GET", f"/api/v1/models/{trained['model']}")["adapter_dir"]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    answer = client.chat.completions.create(model="bot", messages=messages, temperature=0, max_tokens=16)
    text, n, finish = reference(base_dir, adapter, messages=messages)
    assert answer.choices[0].message.content == text
    assert (answer.usage.completion_tokens, answer.choices[0].finish_reason) == (n, finish)
    assert answer.usage.prompt_tokens == len(load_template(adapter).render_prompt(messages, load_tokenizer(adapter)))
    chunks = list(client.chat.completions.create(model="bot", messages=messages, temperature=0, max_tokens=16,
                                                   stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == finish
    base_text = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16)
    assert base_text.choices[0].message.content == reference(base_dir, None, messages=messages)[0]
    completion = client.completions.create(model="bot", prompt="Repeat the word", max_tokens=8, temperature=0)
    assert completion.choices[0].text == reference(base_dir, adapter, prompt="Repeat the word", max_tokens=8)[0]
    streamed = client.completions.create(model="bot", prompt="Repeat the word", max_tokens=8, temperature=0,
                                           stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    assert {m.id for m in client.models.list().data} >= {"tiny", "bot"}


@pytest.mark.parametrize("penalties", [{"presence_penalty": 2}, {"frequency_penalty": 0.7},
                                       {"presence_penalty": -1, "frequency_penalty": 1.5}])
def test_penalties_are_the_ones_generate_applies(base_dir, client, penalties):
    """Greedy replies with presence / frequency penalties equal generate()'s with the same ones, and
    differ from the replies without (the base model repeats itself: the penalties matter)."""
    messages = [{"role": "user", "content": PROMPTS[0]}]
    chat = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=40, **penalties)
    expected = reference(base_dir, None, messages=messages, max_tokens=40, **penalties)
    choice = chat.choices[0]
    assert (choice.message.content, chat.usage.completion_tokens, choice.finish_reason) == expected
    assert expected[0] != reference(base_dir, None, messages=messages, max_tokens=40)[0]
    completion = client.completions.create(model="tiny", prompt="Repeat the word", temperature=0, max_tokens=40,
                                           **penalties)
    expected = reference(base_dir, None, prompt="Repeat the word", max_tokens=40, **penalties)
    assert completion.choices[0].text == expected[0]
    assert expected[0] != reference(base_dir, None, prompt="Repeat the word", max_tokens=40)[0]


def test_sampling_is_repeatable_with_a_seed(trained, client):
    ask = dict(model="bot", messages=[{"role": "user", "content": PROMPTS[1]}], temperature=1.0, top_p=0.9,
               max_tokens=12, seed=7)
    first, second = (client.chat.completions.create(**ask).choices[0].message.content for _ in range(2))
    assert first == second


def _timed_chat(server, model, prompt):
    t0 = time.perf_counter()
    status, answer = server.call("POST", "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 8})
    text = answer["choices"][0]["message"]["content"] if status == 200 else answer
    return status, text, time.perf_counter() - t0


def test_load_while_a_job_trains_then_cancel(server, trained, base_dir):
    """100 chat requests from 8 threads, alternating base and deployment, while a continued job
    trains: no error, and every answer is its own model's (the adapter switch is per request)."""
    adapter = server.ok("GET", f"/api/v1/models/{trained['model']}")["adapter_dir"]
    expected = {(m, p): reference(base_dir, adapter if m == "bot" else None,
                                  messages=[{"role": "user", "content": p}], max_tokens=8)[0]
                for m in ("bot", "tiny") for p in PROMPTS}
    assert all(expected["bot", p] != expected["tiny", p] for p in PROMPTS), "the adapter must change the replies"
    job = server.ok("POST", "/api/v1/fine-tunes", {  # continues the fine-tuned model: LoRA settings inherited
        "model": trained["model"], "training_file_ids": [trained["file"]],
        "hyper_parameters": {"n_epochs": 100, "batch_size": 4, "max_length": 128, "logging_steps": 1}})
    server.wait(job["id"], ("RUNNING",))
    trained_steps = len(server.until(job["id"], lambda: server.ok("GET", f"/api/v1/fine-tunes/{job['id']}")["metrics"],
                                     "metrics"))
    cases = [(("bot", "tiny")[i % 2], PROMPTS[(i // 2) % 2]) for i in range(100)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda case: _timed_chat(server, *case), cases))
    errors = [(case, r[:2]) for case, r in zip(cases, results) if r[0] != 200 or r[1] != expected[case]]
    latencies = sorted(r[2] for r in results)
    print(f"\n100 chat requests, 8 threads, during training: p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p95 {latencies[94] * 1000:.0f} ms")
    assert not errors, errors[:5]
    running = server.ok("GET", f"/api/v1/fine-tunes/{job['id']}")
    assert running["status"] == "RUNNING" and len(running["metrics"]) > trained_steps, "it trained during the load"
    assert server.ok("POST", f"/api/v1/fine-tunes/{job['id']}/cancel")["status"] in ("CANCELING", "CANCELED")
    server.wait(job["id"], ("CANCELED",), timeout=60)
    assert "canceled" in server.logs(job["id"])
    assert server.ok("DELETE", f"/api/v1/fine-tunes/{job['id']}")["deleted"]
    assert server.call("GET", f"/api/v1/fine-tunes/{job['id']}")[0] == 404


def test_a_crashing_job_is_failed_with_the_error_in_its_logs(server, trained):
    job = server.ok("POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": [trained["file"]],
                                                   "hyper_parameters": {"max_length": 8, "n_epochs": 1}})
    failed = server.wait(job["id"], ("FAILED",))
    assert "no example fits max_length=8" in failed["error"]
    logs = server.logs(job["id"])
    assert "Traceback" in logs and "no example fits max_length=8" in logs


def test_undeploy_leaves_the_other_deployments_of_the_model(server, trained):
    ask = {"max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": PROMPTS[0]}]}
    answer = server.ok("POST", "/v1/chat/completions", {"model": "bot", **ask})["choices"][0]["message"]
    server.ok("POST", "/api/v1/deployments", {"model": trained["model"], "name": "bot-2"})
    assert server.ok("POST", "/v1/chat/completions", {"model": "bot-2", **ask})["choices"][0]["message"] == answer
    assert server.ok("DELETE", "/api/v1/deployments/bot-2")["deleted"]
    assert _refused(server.call("POST", "/v1/chat/completions", {"model": "bot-2", **ask}), 404)
    assert server.ok("POST", "/v1/chat/completions", {"model": "bot", **ask})["choices"][0]["message"] == answer


def _refused(call, status):
    return call[0] == status and "error" in call[1]


def test_text_stream_never_splits_a_character(base_dir):
    tok = load_tokenizer(base_dir)
    ids = tok.encode("naïve 你好, café ok")
    stream = TextStream(tok)
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == tok.decode(ids) and not any("\ufffd" in d for d in deltas)


def test_job_commands_talk_to_the_server(server, trained, data_file, capsys):
    common = ["job", "--server", server.url, "--api-key", KEY]
    assert main(common + ["create", "--model", "tiny", "--training-file", str(data_file), "--hp", "n_epochs=1",
                          "--hp", "max_length=128", "--hp", "lr_scheduler_type=cosine", "--hp", "packing=true",
                          "--hp", "use_rslora=true", "--hp", "gradient_accumulation_steps=2"]) == 0
    out = capsys.readouterr().out
    job = json.loads(out[out.index("{"):])
    given = {"n_epochs": 1, "max_length": 128, "lr_scheduler_type": "cosine", "packing": True, "use_rslora": True,
             "gradient_accumulation_steps": 2}
    assert job["hyper_parameters"] == given
    assert job["effective_hyper_parameters"].items() >= given.items(), "the trainer's config carries them"
    assert main(common + ["cancel", job["id"]]) == 0
    assert capsys.readouterr().out.strip() in ("CANCELED", "CANCELING")
    assert main(common + ["list"]) == 0 and job["id"] in capsys.readouterr().out
    assert main(common + ["status", trained["job"]]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "SUCCEEDED"
    assert main(common + ["logs", trained["job"], "--lines", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(common + ["deploy", trained["job"], "--name", "cli-bot"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == trained["model"]
    assert main(common + ["status", "ft-nope"]) == 2
    assert "404" in capsys.readouterr().err


def _snapshot(server):
    """Everything but job statuses (which a restart changes on purpose)."""
    found = {what: server.ok("GET", f"/api/v1/{what}")["data"] for what in ("files?page_size=100", "models",
                                                                             "deployments")}
    return {**found, "jobs": [j["id"] for j in server.ok("GET", "/api/v1/fine-tunes?page_size=100")["data"]]}


def _create(server, file_id, training_type, **hyper_parameters):
    return server.ok("POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": [file_id],
                                                    "training_type": training_type,
                                                    "hyper_parameters": {"max_length": 128, **hyper_parameters}})


def test_restart_loses_nothing_and_resumes_the_interrupted_job(server, trained):
    long = _create(server, trained["file"], "efficient_sft", n_epochs=100, save_strategy="steps", save_steps=1)
    queued = _create(server, trained["file"], "sft", n_epochs=1)
    path = f"/api/v1/fine-tunes/{long['id']}"
    server.until(long["id"], lambda: server.ok("GET", f"{path}/checkpoints")["data"], "checkpoint")
    before = _snapshot(server)
    server.stop(signal.SIGKILL)  # a crash: nothing gets to clean up
    server.start()
    assert _snapshot(server) == before
    assert server.ok("GET", f"/api/v1/fine-tunes/{queued['id']}")["status"] == "QUEUING"
    assert server.ok("GET", path)["resumes"] == 1
    assert "re-queued, it will resume from checkpoint-" in server.logs(long["id"])
    server.until(long["id"], lambda: "resuming from checkpoint-" in server.logs(long["id"]), "resumption")
    server.stop(signal.SIGTERM)  # a clean stop (uvicorn's shutdown, then the lifespan's) re-queues it too
    assert "the server stopped; re-queued" in (server.data_dir / "jobs" / long["id"] / "logs.txt").read_text()
    server.start()
    assert server.ok("GET", path)["resumes"] == 2
    server.ok("POST", f"{path}/cancel")
    full = server.wait(queued["id"], ("SUCCEEDED",))["fine_tuned_model"]
    steps = [r["step"] for r in server.ok("GET", path)["metrics"] if "loss" in r]
    assert steps == sorted(set(steps)), "a resumed run logs each step once"
    server.ok("POST", "/api/v1/deployments", {"model": full, "name": "full-bot"})
    messages = [{"role": "user", "content": PROMPTS[0]}]
    for name, model in (("bot", trained["model"]), ("full-bot", full)):  # deployed before the restarts, and after
        card = server.ok("GET", f"/api/v1/models/{model}")
        chat = server.ok("POST", "/v1/chat/completions", {"model": name, "max_tokens": 8, "temperature": 0,
                                                          "messages": messages})
        expected = reference(card["weights_dir"], card["adapter_dir"], messages=messages, max_tokens=8)[0]
        assert chat["choices"][0]["message"]["content"] == expected


def _turns(reply_to, messages):
    """(text, prompt tokens) of the server's greedy reply, via the openai client."""
    answer = reply_to.chat.completions.create(model="bot", messages=messages, temperature=0, max_tokens=8)
    return answer.choices[0].message.content, answer.usage.prompt_tokens


def test_message_shapes_of_openai_clients(server, trained, base_dir, client):
    """Text parts, role "developer", an assistant's null content, zero penalties: each is answered as
    its plain equivalent, the reference's greedy reply to the normalized turns on the same prompt."""
    adapter = server.ok("GET", f"/api/v1/models/{trained['model']}")["adapter_dir"]
    template, tok = load_template(adapter), load_tokenizer(adapter)
    user = {"role": "user", "content": PROMPTS[0]}
    cases = [  # (as sent, as the template gets it)
        ([{"role": "user", "content": [{"type": "text", "text": PROMPTS[0][:11]},
                                       {"type": "text", "text": PROMPTS[0][11:]}]}], [user]),
        ([{"role": "developer", "content": "Answer briefly."}, user],
         [{"role": "system", "content": "Answer briefly."}, user]),
        ([{"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": None}, user],
         [{"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": ""}, user]),
    ]
    for sent, turns in cases:
        expected = reference(base_dir, adapter, messages=turns, max_tokens=8)[0]
        assert _turns(client, sent) == (expected, len(template.render_prompt(turns, tok))), sent
    plain = client.chat.completions.create(model="bot", messages=[user], temperature=0, max_tokens=8)
    zero = client.chat.completions.create(model="bot", messages=[user], temperature=0, max_tokens=8,
                                          presence_penalty=0, frequency_penalty=0)
    assert zero.choices[0].message.content == plain.choices[0].message.content
    nulls = client.chat.completions.create(model="bot", messages=[{**user, "name": "ana"}], temperature=0,
                                           max_tokens=8, top_p=None, presence_penalty=None, frequency_penalty=None,
                                           seed=None, stop=None)
    assert nulls.choices[0].message.content == plain.choices[0].message.content
    assert client.chat.completions.create(model="bot", messages=[user], temperature=None, max_tokens=2).choices
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' not found") as missing:
        client.chat.completions.create(model="gpt-4o", messages=[user])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"


def test_a_failed_job_create_deletes_what_it_uploaded(server, data_file, capsys, tmp_path):
    """`job create` uploads its paths before the server checks the request: a refusal deletes them."""
    files = lambda: [f["id"] for f in server.ok("GET", "/api/v1/files?page_size=100")["data"]]  # noqa: E731
    before = files()
    held_out = tmp_path / "validation.jsonl"  # another file: one file as both is refused before any upload
    held_out.write_bytes(data_file.read_bytes())
    common = ["job", "--server", server.url, "--api-key", KEY, "create", "--training-file", str(data_file),
              "--validation-file", str(held_out)]
    for refused, error in ((["--model", "gpt-9"], "model 'gpt-9' not found"),
                           (["--model", "tiny", "--hp", "n_epochs=1000"], "n_epochs"),
                           (["--model", "tiny", "--hp", "epochs"], "expected KEY=VALUE")):
        assert main(common + refused) == 2
        assert error in capsys.readouterr().err
        assert files() == before, refused


def test_job_create_reports_its_own_error_when_the_cleanup_fails_too(tmp_path, capsys):
    """The server went away after the uploads: the create's error is raised, the failed deletes warned of."""
    calls = []

    class Gone:
        def upload(self, path):
            calls.append(("upload", path.name))
            return {"id": f"file-{len(calls)}", "lines": 1, "format": "instruction"}

        def request(self, method, path, body=None, query=None):
            calls.append((method, path))
            raise ValueError(f"cannot reach the server ({method} {path})")

    data, held_out = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    for path in (data, held_out):
        path.write_text('{"instruction": "a", "output": "b"}\n')
    args = SimpleNamespace(model="tiny", training_type="efficient_sft", hp=[], training_file=[str(data)],
                           validation_file=[str(held_out)])
    with pytest.raises(ValueError, match="POST /api/v1/fine-tunes"):
        platform_cli._create(Gone(), args)
    assert [c[0] for c in calls] == ["upload", "upload", "POST", "DELETE", "DELETE"]
    err = capsys.readouterr().err
    assert "could not delete the uploaded file file-1" in err and "file-2" in err


def _running_job(data_dir):
    """A store whose job ft-live is RUNNING, as a live server's would be."""
    store = Store(data_dir / "platform.db")
    output = data_dir / "jobs" / "ft-live" / "output"
    output.mkdir(parents=True)
    store.insert("jobs", {"id": "ft-live", "model": "tiny", "base_model": "tiny", "training_type": "efficient_sft",
                          "hyper_parameters": {}, "training_file_ids": [], "validation_file_ids": [],
                          "config": {"output_dir": str(output), "method": "lora", "test_ratio": 0.1},
                          "status": "RUNNING", "resumes": 0, "created_at": 0})
    return store


@pytest.mark.parametrize("waiting", ["PENDING", "QUEUING"])
def test_a_job_canceled_before_it_ran_says_so_in_its_log(tmp_path, waiting):
    data_dir = tmp_path / "data"
    store = _running_job(data_dir)
    store.update("jobs", "ft-live", {"status": waiting})
    view = routes._cancel(SimpleNamespace(store=store, data_dir=data_dir), "ft-live")
    assert view["status"] == "CANCELED"
    assert f"canceled while {waiting}: it never ran" in (data_dir / "jobs" / "ft-live" / "logs.txt").read_text()


def test_a_second_server_on_a_data_dir_in_use_exits_and_touches_nothing(tmp_path, base_dir):
    """The first server holds the data directory (here: its lock, taken in this process); a second
    one, whose port is taken too, must exit naming the directory before it recovers any job."""
    data_dir = tmp_path / "data"
    store = _running_job(data_dir)
    lock = lock_data_dir(data_dir)
    try:
        with socket.socket() as taken:
            taken.bind((HOST, 0))
            taken.listen()
            cmd = [sys.executable, "-m", "minipeft", "platform", "--host", HOST, "--port",
                   str(taken.getsockname()[1]), "--data-dir", str(data_dir), "--base-model", f"tiny={base_dir}"]
            second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        lock.close()
    assert second.returncode == 2, second.stderr
    assert f"minipeft platform: error: data directory {data_dir} is in use by another minipeft platform server " \
           f"(pid {os.getpid()}" in second.stderr and "Traceback" not in second.stderr
    job = store.get("jobs", "ft-live")
    assert (job["status"], job["resumes"]) == ("RUNNING", 0)
    assert not (data_dir / "jobs" / "ft-live" / "logs.txt").exists()
    lock_data_dir(data_dir).close()  # given up: the next server can take it


def test_a_data_dir_that_cannot_be_written_or_locked_is_named(tmp_path, monkeypatch):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("")
    with pytest.raises(ValueError, match=f"data directory {in_the_way / 'data'} cannot be written"):
        lock_data_dir(in_the_way / "data")  # its parent is a file (as a read-only mount: an OSError)

    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)  # NFS without lockd
    with pytest.raises(ValueError, match=f"data directory {tmp_path} cannot be locked .*local filesystem"):
        lock_data_dir(tmp_path)


@pytest.mark.parametrize("publishing", ["succeeds", "fails"])
def test_a_cancel_landing_while_the_model_is_published_is_too_late(tmp_path, monkeypatch, publishing):
    """The worker has exited with a result; a cancel arrives while the scheduler publishes the model
    (injected into publish, so the order is certain). The job must still end, as SUCCEEDED (or
    FAILED), not stay CANCELING; the log says what happened, and says "succeeded" only if it did."""
    store = _running_job(tmp_path)
    (tmp_path / "jobs" / "ft-live" / "result.json").write_text(json.dumps({"train": {}, "eval": {}}))
    answered = []

    def publish_with_a_cancel(store_, data_dir, job, checkpoint=None):
        answered.append(routes._cancel(SimpleNamespace(store=store), job["id"])["status"])
        if publishing == "fails":
            raise OSError("disk full")
        return {"name": "tiny-ft-live"}
    monkeypatch.setattr(scheduler, "publish", publish_with_a_cancel)
    queue = scheduler.Scheduler(store, tmp_path)
    queue._proc, queue._job_id = subprocess.Popen(["true"]), "ft-live"
    queue._proc.wait()
    queue._tick()
    assert answered == ["CANCELING"]
    job = store.get("jobs", "ft-live")
    log = (tmp_path / "jobs" / "ft-live" / "logs.txt").read_text()
    assert "a cancel came after the training had ended and was not applied" in log and job["finished_at"]
    if publishing == "succeeds":
        assert (job["status"], job["fine_tuned_model"]) == ("SUCCEEDED", "tiny-ft-live")
        assert "succeeded: fine-tuned model tiny-ft-live" in log
    else:
        assert job["status"] == "FAILED" and "disk full" in job["error"] and "succeeded" not in log


def test_default_template_is_the_trainers_and_the_fine_tune_stops_replying(server, client):
    """With no template given, a job trains with TrainConfig's default (plain, as `minipeft train` and
    the demo do), the published model records it, and its deployment serves with it: on the bundled
    json_extract task, held-out replies end at the template's stop token (finish_reason "stop").
    The former default, chatml (chosen because the tokenizer has <|im_end|>, a token the shipped base
    model never learned to emit), gave replies that all ran to max_tokens."""
    task = json.loads(TASKS_FILE.read_text())["json_extract"]
    status, uploaded = server.upload("json_extract.jsonl", (REPO / task["train"]).read_bytes())
    assert status == 200, uploaded
    job = server.ok("POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": [uploaded["id"]],
                                                   "hyper_parameters": {"n_epochs": 2, "batch_size": 4,
                                                                        "learning_rate": 5e-3, "max_length": 128,
                                                                        "save_strategy": "no"}})
    assert job["effective_hyper_parameters"]["template"] == TrainConfig().template == "plain"
    done = server.wait(job["id"], ("SUCCEEDED", "FAILED"))
    assert done["status"] == "SUCCEEDED", server.logs(job["id"])
    adapter = server.ok("GET", f"/api/v1/models/{done['fine_tuned_model']}")["adapter_dir"]
    assert load_template(adapter).name == "plain"  # recorded with the model, so serving uses it
    server.ok("POST", "/api/v1/deployments", {"model": done["fine_tuned_model"], "name": "json-bot"})
    finishes = [client.chat.completions.create(model="json-bot", messages=e.messages[:-1], temperature=0,
                                               max_tokens=64).choices[0].finish_reason
                for e in load_jsonl(REPO / task["test"])[:10]]
    assert finishes.count("stop") >= 9, finishes  # 10 of 10 here; one spare for other rounding


@pytest.mark.parametrize("outcome", ["failed", "succeeded"])
def test_a_cancel_landing_after_the_worker_ended_keeps_its_outcome(tmp_path, monkeypatch, outcome):
    """The worker has exited (its result written) and a cancel lands before the scheduler reads it.
    A failed job used to end CANCELED with no error: the failure was lost."""
    store = _running_job(tmp_path)
    result = {"error": "cannot split 16 examples"} if outcome == "failed" else {"train": {}, "eval": {}}
    (tmp_path / "jobs" / "ft-live" / "result.json").write_text(json.dumps(result))
    monkeypatch.setattr(scheduler, "publish", lambda *args: {"name": "tiny-ft-live"})
    queue = scheduler.Scheduler(store, tmp_path)
    queue._proc, queue._job_id = subprocess.Popen(["true" if outcome == "succeeded" else "false"]), "ft-live"
    queue._proc.wait()
    assert routes._cancel(SimpleNamespace(store=store), "ft-live")["status"] == "CANCELING"
    queue._tick()
    job = store.get("jobs", "ft-live")
    assert job["status"] == outcome.upper() and job["finished_at"]
    assert job["error"] == ("cannot split 16 examples" if outcome == "failed" else None)
    assert "a cancel came after the training had ended and was not applied" in \
        (tmp_path / "jobs" / "ft-live" / "logs.txt").read_text()
