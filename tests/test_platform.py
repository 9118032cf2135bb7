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

import json
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
openai = pytest.importorskip("openai")

from minipeft.cli import main  # noqa: E402
from minipeft.generation import generate  # noqa: E402
from minipeft.job import load_trained  # noqa: E402
from minipeft.platform.inference import TextStream  # noqa: E402
from minipeft.templates import TEMPLATE_FILE, get_template, load_template  # noqa: E402
from minipeft.tokenizer import load_tokenizer  # noqa: E402
from platform_fixtures import HP, base_dir, data_file, server, trained  # noqa: E402,F401
from platform_server import KEY  # noqa: E402

PROMPTS = ["Repeat the word apple then river.", "Repeat the word music then stone."]


def reference(base, adapter, messages=None, prompt=None, max_tokens=16):
    """(text, token count, finish_reason) of greedy in-process generation: the answer the server
    must give. The template is the one saved beside the adapter (or the model), else plain."""
    model, tok = load_trained(str(base), adapter)
    folder = Path(adapter or base)
    template = load_template(folder) if (folder / TEMPLATE_FILE).is_file() else get_template("plain")
    stops = template.stop_token_ids(tok)
    ids = template.render_prompt(messages, tok) if messages is not None else tok.encode(prompt, bos=True)
    out = generate(model, torch.tensor([ids]), max_tokens, eos_token_id=stops)[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(out) if t in stops), None)
    reply = out if cut is None else out[:cut]
    return tok.decode(reply), len(reply), "length" if cut is None else "stop"


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
    names = [m["name"] for m in server.ok("GET", "/api/v1/models")["data"]]
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
                          "--hp", "max_length=128", "--hp", "lr_scheduler_type=cosine"]) == 0
    out = capsys.readouterr().out
    job = json.loads(out[out.index("{"):])
    assert job["hyper_parameters"] == {"n_epochs": 1, "max_length": 128, "lr_scheduler_type": "cosine"}
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
    found = {what: server.ok("GET", f"/api/v1/{what}")["data"] for what in ("files", "models", "deployments")}
    return {**found, "jobs": [j["id"] for j in server.ok("GET", "/api/v1/fine-tunes")["data"]]}


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
