"""Fixtures shared by the platform's test modules: one base model, one data file, one server and
one trained + deployed model for the whole session (a training job is the slow part). Each module
imports these fixtures, which gives each its own fixture definition, so the objects themselves
are cached here: whichever module asks first builds them, the other reuses them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from minipeft.job import DEFAULT_MODEL
from platform_server import Server
from conftest import save_tiny_base

WORDS = "apple river stone cloud light tiger paper green music window".split()
# A few optimizer steps with a learning rate high enough that the adapter changes greedy replies.
HP = {"n_epochs": 2, "batch_size": 4, "learning_rate": 0.02, "max_length": 128, "logging_steps": 1,
      "save_strategy": "steps", "save_steps": 3, "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "split": 0.2}
_CACHE: dict[str, Any] = {}


def _once(name: str, make: Callable[[], Any]) -> Any:
    if name not in _CACHE:
        _CACHE[name] = make()
    return _CACHE[name]


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """The shipped base model when it exists, else a tiny random one."""
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL
    return _once("base", lambda: save_tiny_base(tmp_path_factory.mktemp("base") / "model"))


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    def make() -> Path:
        path = tmp_path_factory.mktemp("data") / "train.jsonl"
        rows = [{"instruction": f"Repeat the word {a} then {b}.", "output": f"{a} {b}"}
                for a in WORDS for b in WORDS if a != b][:20]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    return _once("data", make)


@pytest.fixture(scope="session")
def server(tmp_path_factory, base_dir):
    def make() -> Server:
        root = tmp_path_factory.mktemp("platform")
        return Server(root / "data", base_dir, root / "server.log").start()
    srv = _once("server", make)
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture(scope="session")
def trained(server, data_file) -> dict[str, str]:
    """upload -> LoRA job -> SUCCEEDED -> deployed as "bot"."""
    def make() -> dict[str, str]:
        status, uploaded = server.upload("train.jsonl", data_file.read_bytes())
        assert status == 200, uploaded
        job = server.ok("POST", "/api/v1/fine-tunes", {"model": "tiny", "training_file_ids": [uploaded["id"]],
                                                       "training_type": "efficient_sft", "hyper_parameters": HP})
        assert job["status"] == "PENDING"
        done = server.wait(job["id"], ("SUCCEEDED", "FAILED", "CANCELED"))
        assert done["status"] == "SUCCEEDED", server.logs(job["id"])
        server.ok("POST", "/api/v1/deployments", {"model": done["fine_tuned_model"], "name": "bot"})
        return {"file": uploaded["id"], "job": job["id"], "model": done["fine_tuned_model"]}
    return _once("trained", make)
