"""The platform's HTTP application: the management API (routes.py) and the OpenAI-compatible one
(openai_api.py) behind one guard, with every error answered as JSON (errors.py).

The guard runs before routing: with an API key set, a request without "Authorization: Bearer
KEY" gets 401 (the scheme in any case, then one or more spaces or tabs, as RFC 6750 and common
servers take it). Under /v1 its body is OpenAI's: type "invalid_request_error", and code
"invalid_api_key" for a wrong key (null for none sent); the management API keeps type
"authentication_error" (errors.TYPES). A body larger than the limit (uploads: max_upload_bytes
plus the multipart envelope; everything else: max_body_bytes) gets 413 before it is read, and a
chunked body, whose size is unknown in advance, gets 411. Validation errors become 400 with each bad field named
("hyper_parameters.n_epochs: Input should be a valid integer (got 'three')"); malformed JSON says
where it broke, a wrong method which ones the path takes, and a client's value is repeated cut to
errors.SHOWN characters. The scheduler starts and stops with the application (lifespan).
"""
from __future__ import annotations

import hmac
import re
import traceback
from contextlib import asynccontextmanager
from typing import Any, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .errors import SHOWN, ApiError, error_body, shown
from .openai_api import openai_router
from .routes import management_router
from .state import Platform, Settings

MULTIPART_ENVELOPE = 64 * 1024
UPLOAD_PATH = "/api/v1/files"
# RFC 6750's `Bearer 1*SP token`, the scheme case-insensitive (RFC 9110), any run of spaces and tabs
# between, around the value too: a server strips them from a header value, a client may not.
BEARER = re.compile(r"[ \t]*bearer[ \t]+([^ \t]+)[ \t]*", re.IGNORECASE)
OPENAI_PREFIX = "/v1"
NO_KEY = "no API key: send the header 'Authorization: Bearer <key>'"
WRONG_KEY = "wrong API key: send the server's key in the header 'Authorization: Bearer <key>'"


class Guard:
    """ASGI middleware: API key and body-size checks, answered before the application runs."""

    def __init__(self, app: Any, settings: Settings):
        self.app, self.settings = app, settings

    def _problem(self, scope: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The refusal (error_body's arguments, its status and headers) of a request; None: none."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.settings.api_key
        if key is not None:
            found = BEARER.fullmatch(headers.get("authorization", ""))
            if found is None or not hmac.compare_digest(found[1].encode("utf-8", "surrogateescape"), key.encode()):
                return _unauthorized(scope["path"], wrong=found is not None)
        limit = self.settings.max_body_bytes
        if scope["path"] == UPLOAD_PATH:
            limit = self.settings.max_upload_bytes + MULTIPART_ENVELOPE
        length = headers.get("content-length")
        if length is None:
            if "transfer-encoding" in headers:
                return {"status": 411, "message": "send the request body with a Content-Length header (chunked "
                        "bodies are refused)"}
            return None
        if not length.isdigit():
            return {"status": 400, "message": f"Content-Length {length!r} is not a number of bytes"}
        if int(length) > limit:
            return {"status": 413, "message": f"request body of {length} bytes is over this endpoint's limit of "
                    f"{limit} bytes"}
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        problem = self._problem(scope) if scope["type"] == "http" else None
        if problem is None:
            await self.app(scope, receive, send)
            return
        headers = problem.pop("headers", {})
        await JSONResponse(error_body(**problem), status_code=problem["status"], headers=headers)(scope, receive, send)


def _unauthorized(path: str, wrong: bool) -> dict[str, Any]:
    """A 401's refusal. OpenAI answers a wrong key with type "invalid_request_error" and code
    "invalid_api_key" (a missing one: code null), and its clients read them, so /v1 answers so;
    the key is never echoed (OpenAI shows a masked one)."""
    answer: dict[str, Any] = {"status": 401, "message": WRONG_KEY if wrong else NO_KEY,
                              "headers": {"WWW-Authenticate": "Bearer"}}
    if path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/"):
        answer.update(kind="invalid_request_error", code="invalid_api_key" if wrong else None)
    return answer


def _got(value: Any) -> str:
    return "" if isinstance(value, (dict, list)) else f" (got {shown(value)})"


def _field(loc: tuple) -> str:
    """A field's dotted path; a key that is empty, unprintable or long is quoted (and cut), so the
    extra key "" is not reported as the whole body, nor a NUL or a 1,000-character key echoed raw."""
    keys = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
    return ".".join(str(k) if not isinstance(k, str) or (k.isprintable() and 0 < len(k) <= SHOWN) else shown(k)
                    for k in keys)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, Optional[str]]:
    """Pydantic's errors as one sentence naming each field, and the first field (OpenAI's `param`)."""
    parts, params = [], []
    for e in errors:
        if e["type"] == "json_invalid":  # loc: ("body", the character where the parser stopped)
            where = f" (at character {e['loc'][1]})" if len(e["loc"]) > 1 else ""
            return f"malformed JSON body: {e.get('ctx', {}).get('error', e['msg'])}{where}", None
        where = _field(e["loc"])
        if e["type"] == "missing":
            parts.append(f"{where or 'request body'}: required")
        else:
            parts.append(f"{where or 'request body'}: {e['msg']}{_got(e.get('input'))}")
        params.append(where or None)
    return "; ".join(parts), params[0] if params else None


def _allowed(request: Request) -> str:
    """The methods of every route at the request's path (Starlette's 405 names only the first
    route's: "DELETE /api/v1/files" was told it takes POST, and GET it takes too)."""
    routes = [r for r in request.app.state.routes if r.matches(request.scope)[0] != Match.NONE]
    return ", ".join(sorted({m for r in routes for m in r.methods}))


def _http_message(request: Request, e: StarletteHTTPException) -> str:
    """The routing's and body reading's errors, which Starlette words for no one in particular,
    said with the request's method and path, what the path allows, and why a body was unreadable."""
    path = request.url.path
    path = path if path.isprintable() and len(path) <= SHOWN else shown(path)
    if e.status_code == 404:
        return f"no route {request.method} {path}"
    if e.status_code == 405:
        return f"Method Not Allowed: {request.method} {path}; this path takes {_allowed(request)}"
    cause = e.__cause__
    if e.status_code == 400 and isinstance(cause, UnicodeDecodeError):  # FastAPI's "error parsing the body"
        return (f"the request body is not UTF-8: {cause.reason} at byte {cause.start}; send the JSON body "
                "encoded as UTF-8")
    if e.status_code == 400 and cause is not None:
        return f"the request body could not be read: {type(cause).__name__}: {cause}"
    return str(e.detail)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.status, e.message, e.param, e.detail, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = list(e.errors())
        if any(err["loc"] == ("body",) and isinstance(err.get("input"), bytes) for err in errors):
            # FastAPI parses a body as JSON only when its Content-Type says so; others arrive as bytes,
            # and pydantic's "should be a valid dictionary" about the user's own JSON object misleads.
            kind = request.headers.get("content-type")
            message = ("send the body as JSON with the header 'Content-Type: application/json' (this request has "
                       + (f"Content-Type {kind!r})" if kind else "no Content-Type)"))
            return JSONResponse(error_body(400, message), status_code=400)
        message, param = validation_message(errors)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        headers = dict(getattr(e, "headers", None) or {})
        if e.status_code == 405:
            headers["Allow"] = _allowed(request)
        return JSONResponse(error_body(e.status_code, _http_message(request, e)), status_code=e.status_code,
                            headers=headers or None)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):  # a bug, not the request's fault: say so, stay up
        traceback.print_exc()
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)


def create_app(settings: Settings) -> FastAPI:
    platform = Platform(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        platform.scheduler.start()
        yield
        platform.scheduler.stop()
        platform.close()

    app = FastAPI(title="minipeft platform", lifespan=lifespan)
    app.state.platform = platform
    routers = [management_router(platform), openai_router(platform)]
    app.state.routes = [route for router in routers for route in router.routes]  # their paths and methods: a 405's
    for router in routers:
        app.include_router(router)
    _add_error_handlers(app)
    app.add_middleware(Guard, settings=settings)
    return app
