"""`minipeft platform` (the server) and `minipeft job ...` (its client), the cloud console's flow:

    minipeft platform [--host 127.0.0.1] [--port 8000] [--data-dir DIR] [--api-key KEY]
                      [--base-model NAME=DIR ...] [--max-upload-mb N] [--max-tokens N] [--threads N]
                      [--device NAME] [--train-device NAME]
    minipeft job create --model NAME --training-file FILE|ID [...] [--validation-file FILE|ID]
                        [--training-type efficient_sft] [--hp n_epochs=3 --hp learning_rate=2e-4 ...]
    minipeft job list [--status S] [--page-no N] [--page-size N] | status ID | logs ID [--offset N]
                 [--lines N] | cancel ID
    minipeft job models [--page-no N] [--page-size N] | deployments [--page-no N] [--page-size N]
    minipeft job deploy MODEL|JOB_ID [--name NAME]
    minipeft job publish JOB_ID [--checkpoint checkpoint-N] | delete-model MODEL

The client commands take --server (default $MINIPEFT_SERVER, else http://127.0.0.1:8000) and
--api-key (default $MINIPEFT_API_KEY). A --training-file that names an existing path is
uploaded first; otherwise it is taken as the id of an uploaded file. A create the server refuses
deletes the files it uploaded, so failed attempts leave no orphans. --hp values are JSON when
they parse as JSON (3, 2e-4, true), strings otherwise (cosine).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import quote

from ..argtypes import at_least
from ..distributed import use_device
from ..files import existing_file
from ..job import DEFAULT_MODEL
from .client import Client

LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY = re.compile(r"[\x21-\x7e]+")  # visible ASCII
JOBS = "/api/v1/fine-tunes"


def default_bases() -> dict[str, Path]:
    """The shipped base models: every folder of models/ that holds a config.json."""
    root = DEFAULT_MODEL.parent
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()} if root.is_dir() else {}


def _base_model(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not (Path(folder) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR with DIR/config.json, got {text!r}")
    return name, Path(folder).resolve()


def _check_api_key(key: Optional[str]) -> None:
    """Refuse a key no request could carry: the guard compares the header as sent, HTTP clients send
    headers in ASCII (httpx, so the openai client, refuses others), and servers strip a value's outer
    whitespace. Such a key was accepted, and every request then got 401. An empty one (an exported
    but empty MINIPEFT_API_KEY) asked for an empty bearer token, which clients take for no key."""
    if key == "":
        raise ValueError("--api-key (or $MINIPEFT_API_KEY) is empty: give a key, or unset it to run without one")
    if key is not None and not API_KEY.fullmatch(key):
        raise ValueError("--api-key: use printable ASCII without spaces (letters, digits, punctuation), as clients "
                         "send it in the Authorization header")


def _serve(args: argparse.Namespace) -> int:
    _check_api_key(args.api_key)  # before anything starts
    try:  # the server's packages are an extra: `make demo`'s environment has the runtime ones only
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as e:
        raise ValueError(f"minipeft platform needs {e.name}: pip install -e '.[platform]'") from None
    from .state import MIB, Settings

    bases = {**default_bases(), **dict(args.base_model or [])}
    if not bases:
        raise ValueError("no base model: pass --base-model NAME=DIR (models/ holds none)")
    if args.host not in LOOPBACK and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can "
              "upload data, train and call models", file=sys.stderr)
    for flag, device in (("--train-device", args.train_device), ("--device", args.device)):
        try:  # a GPU the machine lacks is one line; serving's device, checked last, stays CUDA's current
            use_device(device)  # one in this process (the jobs train in worker processes)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    settings = Settings(Path(args.data_dir).resolve(), bases, args.api_key, args.max_upload_mb * MIB,
                        max_tokens=args.max_tokens, threads=args.threads, device=args.device,
                        train_device=args.train_device)
    app = create_app(settings)  # takes the data directory's lock, or refuses
    print(f"minipeft platform: base models {sorted(bases)}; data in {settings.data_dir}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _file_id(client: Client, given: str, flag: str, uploads: list[str]) -> str:
    """The file id `given` (the value of `flag`) stands for; a file is uploaded, and its new id
    appended to `uploads`. Anything else is an id if it looks like one, else an error that says
    what the path is: a directory, or missing."""
    if not Path(given).is_file() and given.startswith("file-"):
        return given
    path = existing_file(given, f"{flag} takes a JSONL file to upload, or the id of an uploaded file ('file-...')")
    uploaded = client.upload(path)
    uploads.append(uploaded["id"])
    print(f"uploaded {given} as {uploaded['id']} ({uploaded['lines']} lines, {uploaded['format']} format)")
    for warning in uploaded.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    return uploaded["id"]


def _hyper_parameters(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--hp {pair!r}: expected KEY=VALUE, e.g. n_epochs=3")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _job(args: argparse.Namespace) -> int:
    client = Client(args.server, args.api_key)
    if args.action == "create":
        _print(_create(client, args))
    elif args.action == "list":
        _list(client, JOBS, args, "jobs", lambda j: f"{j['id']}  {j['status']:<10} {j['training_type']:<14} "
              f"{j['model']}  {j['fine_tuned_model'] or ''}", status=args.status)
    elif args.action == "models":  # base models (method "base") come last: the server's own, the oldest
        _list(client, "/api/v1/models", args, "models", lambda m: f"{m['name']}  {m['method'] or 'base':<7} "
              f"{m['base_model']}  {m['job_id'] or ''}")
    elif args.action == "deployments":
        _list(client, "/api/v1/deployments", args, "deployments", lambda d: f"{d['name']}  {d['model']}")
    elif args.action == "status":
        _print(client.request("GET", f"{JOBS}/{args.id}"))
    elif args.action == "logs":
        page = client.request("GET", f"{JOBS}/{args.id}/logs", query={"offset": args.offset, "line": args.lines})
        print("\n".join(page["logs"]))
    elif args.action == "cancel":
        print(client.request("POST", f"{JOBS}/{args.id}/cancel")["status"])
    elif args.action == "publish":  # a checkpoint's model, or the final one again after a failed publish
        at = f"/checkpoints/{quote(args.checkpoint, safe='')}" if args.checkpoint else ""
        _print(client.request("POST", f"{JOBS}/{quote(args.id, safe='')}{at}/publish"))
    elif args.action == "delete-model":
        client.request("DELETE", f"/api/v1/models/{quote(args.model, safe='')}")
        print(f"deleted {args.model}")
    else:
        body = {"model": _model_of(client, args.model), "name": args.name}
        _print(client.request("POST", "/api/v1/deployments", body))
    return 0


def _list(client: Client, path: str, args: argparse.Namespace, noun: str, line: Callable[[dict[str, Any]], str],
          **query: Any) -> None:
    """Print one page of the paged list at `path`, a line per row, and on stderr how to get the next."""
    page = client.request("GET", path, query={**query, "page_no": args.page_no, "page_size": args.page_size})
    for row in page["data"]:
        print(line(row))
    if (page["page_no"] - 1) * page["page_size"] + len(page["data"]) < page["total"]:
        print(f"({len(page['data'])} of {page['total']} {noun}, newest first; --page-no {page['page_no'] + 1} "
              "for more)", file=sys.stderr)


def _create(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """Upload the paths among the data files, then create the job; if anything fails after an
    upload, the uploads are deleted again (the server checks the request only once it has ids)."""
    body = {"model": args.model, "training_type": args.training_type,
            "hyper_parameters": _hyper_parameters(args.hp or [])}  # a bad --hp fails before any upload
    same = {_same_file(f) for f in args.training_file} & {_same_file(f) for f in args.validation_file or []}
    if same:  # uploaded twice, they would be two ids the server cannot tell apart
        raise ValueError(f"{sorted(same)[0]} is given as both --training-file and --validation-file: the validation "
                         "data must be held out from training (leave --validation-file out to hold out --hp split=...)")
    uploads: list[str] = []
    try:
        body["training_file_ids"] = [_file_id(client, f, "--training-file", uploads) for f in args.training_file]
        body["validation_file_ids"] = [_file_id(client, f, "--validation-file", uploads)
                                       for f in args.validation_file or []]
        return client.request("POST", JOBS, body)
    except BaseException:  # Ctrl-C too
        for file_id in uploads:
            try:
                client.request("DELETE", f"/api/v1/files/{file_id}")
            except Exception as e:  # the server may be what failed: the first error is the one to report
                print(f"warning: could not delete the uploaded file {file_id}: {e}", file=sys.stderr)
        raise


def _same_file(given: str) -> str:
    """`given` as the file it names (so ./a.jsonl and a.jsonl compare equal), or as the id it is."""
    return str(Path(given).resolve()) if Path(given).is_file() else given


def _model_of(client: Client, given: str) -> str:
    """A fine-tuned model's name; a job id (ft-...) stands for the model that job produced."""
    if not given.startswith("ft-"):
        return given
    model = client.request("GET", f"{JOBS}/{given}")["fine_tuned_model"]
    if model is None:
        raise ValueError(f"job {given} has no fine-tuned model yet (see `minipeft job status {given}`)")
    return model


def _paging(parser: argparse.ArgumentParser, noun: str) -> None:
    parser.add_argument("--page-no", type=at_least(1), help=f"default: 1, the newest {noun}")
    parser.add_argument("--page-size", type=at_least(1), help="default: the server's (10; at most 100)")


def _register_job(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("job", help="create, watch, cancel, publish and deploy fine-tune jobs on a `minipeft platform`; "
                       "list and delete their models, list the deployments")
    p.add_argument("--server", default=os.environ.get("MINIPEFT_SERVER", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("MINIPEFT_API_KEY"))
    actions = p.add_subparsers(dest="action", required=True)
    c = actions.add_parser("create", help="upload data (if paths) and create a fine-tune job")
    c.add_argument("--model", required=True, help="base model name or fine-tuned model to continue")
    c.add_argument("--training-file", action="append", required=True, metavar="FILE|ID")
    c.add_argument("--validation-file", action="append", metavar="FILE|ID")
    c.add_argument("--training-type", default="efficient_sft",
                   choices=["sft", "efficient_sft", "qlora", "adapter", "prefix", "prompt"])
    c.add_argument("--hp", action="append", metavar="KEY=VALUE", help="a hyper-parameter (repeatable)")
    listing = actions.add_parser("list", help="list jobs, newest first, a page at a time")
    listing.add_argument("--status")
    _paging(listing, "jobs")
    lists = {"models": "list the models (fine-tuned ones newest first, then the base models), a page at a time",
             "deployments": "list the deployments, newest first, a page at a time"}
    for name, text in lists.items():
        _paging(actions.add_parser(name, help=text), name)
    actions.add_parser("status", help="a job's status, metrics and evaluation").add_argument("id")
    logs = actions.add_parser("logs", help="a job's log lines")
    logs.add_argument("id")
    logs.add_argument("--offset", type=int, default=0)
    logs.add_argument("--lines", type=int, default=1000)
    actions.add_parser("cancel", help="cancel a job").add_argument("id")
    d = actions.add_parser("deploy", help="deploy a fine-tuned model (or a job's) for /v1/chat/completions")
    d.add_argument("model", help="fine-tuned model name, or a job id")
    d.add_argument("--name", help="the name to call it by (default: the model's name)")
    pub = actions.add_parser("publish", help="publish a checkpoint of a job as a model, or its final model again "
                             "after a failed publish")
    pub.add_argument("id", help="the job id (ft-...)")
    pub.add_argument("--checkpoint", metavar="checkpoint-N", help="a checkpoint of the job (default: its final model)")
    actions.add_parser("delete-model", help="delete a fine-tuned model nothing uses (not deployed, not trained "
                       "from)").add_argument("model", help="the fine-tuned model's name")
    p.set_defaults(func=_job)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("platform", help="run the local fine-tuning platform (HTTP API + OpenAI-compatible serving)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default="platform_data", help="files, jobs, models and the SQLite state")
    p.add_argument("--api-key", default=os.environ.get("MINIPEFT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every request (default: $MINIPEFT_API_KEY)")
    p.add_argument("--base-model", action="append", type=_base_model, metavar="NAME=DIR",
                   help="serve and fine-tune this model as NAME (repeatable; models/* are added)")
    p.add_argument("--max-upload-mb", type=at_least(1), default=100)
    p.add_argument("--max-tokens", type=at_least(1), default=1024, help="the largest max_tokens a request may ask for")
    p.add_argument("--threads", type=at_least(1), help="CPU threads for serving and for the training worker each "
                   "(default: torch's; on a shared CPU, 1 avoids thread oversubscription)")
    p.add_argument("--device", default="auto", metavar="NAME",
                   help="where served models run: auto (default: a GPU when torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--train-device", default="auto", metavar="NAME",
                   help="where fine-tune jobs train (their device setting); e.g. --device cuda:0 --train-device cuda:1")
    p.set_defaults(func=_serve)
    _register_job(sub)
