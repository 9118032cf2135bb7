"""The management API under /api/v1, after the Bailian platform's fine-tuning API:

    files         POST /files (multipart: file, purpose=fine-tune)   GET /files[?page_no=&page_size=]
                  GET|DELETE /files/{id}
    fine-tunes    POST /fine-tunes   GET /fine-tunes[?status=&page_no=&page_size=]   GET|DELETE /fine-tunes/{id}
                  POST /fine-tunes/{id}/cancel   GET /fine-tunes/{id}/logs?offset=&line=
                  GET /fine-tunes/{id}/checkpoints   POST /fine-tunes/{id}/checkpoints/{name}/publish
                  POST /fine-tunes/{id}/publish   (its final model again, after a failed publish: scheduler.py)
    models        GET /models[?page_no=&page_size=]   GET|DELETE /models/{name}   (base and fine-tuned
                  models; DELETE: a fine-tuned one nothing uses, state.py)
    deployments   POST /deployments {"model", "name"?}   GET /deployments[?page_no=&page_size=]
                  GET|DELETE /deployments/{name}

Lists answer {"object": "list", "data": [...]}; the lists of files, jobs, models and deployments
are paged as Bailian's: newest first, page page_no (from 1) of page_size (default 10, at most
100), with "page_no", "page_size" and "total" (of all pages) beside "data"; the base models, the
server's own (created_at 0), come last. Handlers are plain functions:
FastAPI runs them in its thread pool, so a slow one (a model loading for a deployment) blocks no
other request.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import FormParserError, MultiPartException

from . import jobs
from .errors import MODEL_NOT_FOUND, ApiError, not_found, shown
from .files import delete_file, save_upload
from .models import publish
from .scheduler import note, publish_again
from .state import Platform
from .store import Store


PAGE_SIZE, MAX_PAGE_SIZE = 10, 100  # Bailian's default and largest page_size
MAX_PAGE_NO = 10 ** 6  # past any list's end; keeps the row offset within SQLite's integers
UPLOAD_HOWTO = ("send one file as multipart/form-data field 'file' (and optionally purpose=fine-tune), as "
                "curl -F file=@train.jsonl does")


class DeploymentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1, max_length=300)
    name: Optional[str] = None


def listing(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": rows}


def page(page_no: int = Query(1, ge=1, le=MAX_PAGE_NO),
         page_size: int = Query(PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE)) -> tuple[int, int]:
    """The page a list request asks for (a dependency: its checks name the query parameter)."""
    return page_no, page_size


def paged(store: Store, table: str, asked: tuple[int, int], **where: Any) -> dict[str, Any]:
    """A listing of one page of `table`'s rows, newest first, with its place among all pages."""
    page_no, page_size = asked
    rows, total = store.page(table, (page_no - 1) * page_size, page_size, **where)
    return {**listing(rows), "page_no": page_no, "page_size": page_size, "total": total}


def _register_files(router: APIRouter, platform: Platform) -> None:
    @router.post("/files")
    async def upload_file(request: Request):
        form = await _read_form(request)
        try:
            upload, purpose = form.get("file"), form.get("purpose", "fine-tune")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "multipart field 'file' is required: the JSONL file to upload", param="file")
            if purpose != "fine-tune":
                raise ApiError(400, f"purpose {shown(str(purpose))}: only 'fine-tune' is supported", param="purpose")
            limit = platform.settings.max_upload_bytes
            return await run_in_threadpool(save_upload, platform.store, platform.data_dir, upload.filename or "",
                                           upload.file, limit)
        finally:
            await form.close()

    @router.get("/files")
    def list_files(asked: tuple[int, int] = Depends(page)):
        return paged(platform.store, "files", asked)

    @router.get("/files/{file_id}")
    def get_file(file_id: str):
        return _found(platform.store.get("files", file_id), not_found("file", file_id))

    @router.delete("/files/{file_id}")
    def remove_file(file_id: str):
        delete_file(platform.store, platform.data_dir, file_id)
        return {"id": file_id, "deleted": True}


async def _read_form(request: Request) -> FormData:
    """The upload's form; one that is not multipart/form-data, or that its parser refuses, is a 400
    that says what an upload is (Starlette's own words, "Too many files. Maximum number of files is
    1.", name neither the field nor the fix)."""
    kind = request.headers.get("content-type", "")
    if not kind.lower().startswith("multipart/form-data"):
        raise ApiError(400, f"{UPLOAD_HOWTO} (this request has " + (f"Content-Type {shown(kind)})" if kind else
                                                                      "no Content-Type)"), param="file")
    try:
        return await request.form(max_files=1, max_fields=4)
    except (HTTPException, MultiPartException) as e:
        reason, inner = e.detail if isinstance(e, HTTPException) else e.message, e
        while inner.__cause__ or inner.__context__:  # python-multipart's own reason, under Starlette's
            inner = inner.__cause__ or inner.__context__  # "Invalid multipart data."
        why = f" ({inner})" if isinstance(inner, FormParserError) else ""
        raise ApiError(400, f"malformed multipart upload: {reason}{why}; {UPLOAD_HOWTO}", param="file") from None


def _found(row: Optional[dict[str, Any]], error: ApiError) -> dict[str, Any]:
    if row is None:
        raise error
    return row


def _cancel(platform: Platform, job_id: str) -> dict[str, Any]:
    """Waiting jobs are canceled at once; a running one becomes CANCELING until its worker ends. One
    whose training has just ended may still finish SUCCEEDED: the cancel came too late (scheduler.py)."""
    store = platform.store
    job = jobs.get_job(store, job_id)
    if store.update("jobs", job_id, {"status": "CANCELED", "finished_at": int(time.time())},
                    when_status=("PENDING", "QUEUING")):
        note(platform.data_dir, job, f"canceled while {job['status']}: it never ran")
        return jobs.job_view(store.get("jobs", job_id))
    if store.update("jobs", job_id, {"status": "CANCELING"}, when_status=("RUNNING",)):
        return jobs.job_view(store.get("jobs", job_id))
    current = jobs.get_job(store, job_id)["status"]
    if current in ("CANCELING", "CANCELED"):
        return jobs.job_view(store.get("jobs", job_id))
    raise ApiError(409, f"job {job['id']} is {current}; only PENDING, QUEUING or RUNNING jobs can be canceled")


def _register_jobs(router: APIRouter, platform: Platform) -> None:
    store, data_dir = platform.store, platform.data_dir

    @router.post("/fine-tunes")
    def create(req: jobs.FineTuneRequest):
        return jobs.job_view(platform.create_job(req))

    @router.get("/fine-tunes")
    def list_jobs(status: Optional[str] = Query(None, pattern="^(" + "|".join(jobs.ACTIVE + jobs.FINISHED) + ")$"),
                  asked: tuple[int, int] = Depends(page)):
        found = paged(store, "jobs", asked, **({"status": status} if status else {}))
        return {**found, "data": [jobs.job_view(j) for j in found["data"]]}

    @router.get("/fine-tunes/{job_id}")
    def get(job_id: str):
        return jobs.job_view(jobs.get_job(store, job_id), detail=True)

    @router.post("/fine-tunes/{job_id}/cancel")
    def cancel(job_id: str):
        return _cancel(platform, job_id)

    @router.delete("/fine-tunes/{job_id}")
    def delete(job_id: str):
        jobs.delete_job(store, data_dir, jobs.get_job(store, job_id))
        return {"id": job_id, "deleted": True}

    @router.get("/fine-tunes/{job_id}/logs")
    def logs(job_id: str, offset: int = Query(0, ge=0), line: int = Query(1000, ge=1, le=10000)):
        return jobs.read_logs(data_dir, jobs.get_job(store, job_id), offset, line)

    @router.get("/fine-tunes/{job_id}/checkpoints")
    def checkpoints(job_id: str):
        return listing(jobs.checkpoints(store, jobs.get_job(store, job_id)))

    @router.post("/fine-tunes/{job_id}/checkpoints/{checkpoint}/publish")
    def publish_checkpoint(job_id: str, checkpoint: str):
        return publish(store, data_dir, jobs.get_job(store, job_id), checkpoint)

    @router.post("/fine-tunes/{job_id}/publish")
    def publish_final(job_id: str):
        return jobs.job_view(publish_again(store, data_dir, jobs.get_job(store, job_id)))


def _register_models(router: APIRouter, platform: Platform) -> None:
    store = platform.store

    def base_card(name: str) -> dict[str, Any]:
        return {"name": name, "base_model": name, "method": None, "job_id": None, "checkpoint": None,
                "created_at": 0}

    @router.get("/models")
    def list_models(asked: tuple[int, int] = Depends(page)):
        # The fine-tuned models' page, then as many base models as fit: they are the oldest.
        found = paged(store, "models", asked)
        page_no, page_size = asked
        start = max(0, (page_no - 1) * page_size - found["total"])
        bases = [base_card(n) for n in platform.bases][start:start + page_size - len(found["data"])]
        return {**found, "data": found["data"] + bases, "total": found["total"] + len(platform.bases)}

    @router.get("/models/{name}")
    def get_model(name: str):
        if name in platform.bases:
            return base_card(name)
        return _found(store.get("models", name), not_found("model", name, code=MODEL_NOT_FOUND))

    @router.delete("/models/{name}")
    def delete_model(name: str):
        platform.delete_model(name)
        return {"name": name, "deleted": True}

    @router.post("/deployments")
    def deploy(req: DeploymentRequest):
        return platform.deploy(req.model, req.name)

    @router.get("/deployments")
    def list_deployments(asked: tuple[int, int] = Depends(page)):
        return paged(store, "deployments", asked)

    @router.get("/deployments/{name}")
    def get_deployment(name: str):
        return _found(store.get("deployments", name), not_found("deployment", name))

    @router.delete("/deployments/{name}")
    def undeploy(name: str):
        platform.undeploy(name)
        return {"name": name, "deleted": True}


def management_router(platform: Platform) -> APIRouter:
    router = APIRouter(prefix="/api/v1")
    for register in (_register_files, _register_jobs, _register_models):
        register(router, platform)
    return router
