"""What the platform answers when a request is wrong: an HTTP status and a message that says what
was wrong and what was expected, in OpenAI's error shape so the `openai` client shows it as is:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

`code` is null but where OpenAI names the case, as "model_not_found" for an unknown model. The
types are OpenAI's where it has one: a 404 is an "invalid_request_error" too, as OpenAI answers an
unknown model or route; `param` names the request body's field that named the missing thing.
"""
from __future__ import annotations

from typing import Any, Optional

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 409: "conflict_error", 411: "invalid_request_error",
         413: "request_too_large", 422: "invalid_request_error", 500: "server_error",
         503: "service_unavailable", 507: "server_error"}
MODEL_NOT_FOUND = "model_not_found"  # OpenAI's code for a `model` that names nothing served
SHOWN = 80  # characters of a client's value an error message repeats


class ApiError(Exception):
    """A request the platform refuses: raised anywhere below a route, answered by app.py."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, detail: Any = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.detail, self.code = status, message, param, detail, code


def error_body(status: int, message: str, param: Optional[str] = None, detail: Any = None,
               code: Optional[str] = None, kind: Optional[str] = None) -> dict[str, Any]:
    """kind: the error type, the status's (TYPES) unless given (OpenAI's 401 under /v1: app.py)."""
    body: dict[str, Any] = {"message": message, "type": kind or TYPES.get(status, "invalid_request_error"),
                            "param": param, "code": code}
    if detail is not None:
        body["detail"] = detail
    return {"error": body}


def shown(value: Any) -> str:
    """A client's value for an error message: a string quoted (repr: control characters escaped),
    anything else as str(); cut to SHOWN characters with its length said, so a 100k-character id
    or a 500-digit max_tokens is not echoed back whole."""
    if isinstance(value, str):
        return repr(value) if len(value) <= SHOWN else f"{value[:SHOWN]!r}... ({len(value)} characters)"
    return cut(str(value))


def cut(text: str) -> str:
    """`text` whole if short, else its first SHOWN characters and its length."""
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


def not_found(kind: str, key: str, hint: str = "", code: Optional[str] = None,
              param: Optional[str] = None) -> ApiError:
    return ApiError(404, f"{kind} {shown(key)} not found" + (f"; {hint}" if hint else ""), param=param, code=code)
