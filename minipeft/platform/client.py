"""A small HTTP client of the platform's management API, on the standard library only (urllib),
for the `minipeft job ...` commands. A refused request raises ValueError carrying the server's
message, so the command prints one clear line; proxies are bypassed (the server is yours)."""
from __future__ import annotations

import json
import mimetypes
import secrets
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional


class Client:
    def __init__(self, server: str, api_key: Optional[str] = None, timeout: float = 60.0):
        if urllib.parse.urlsplit(server).scheme not in ("http", "https"):  # urllib's own error names no flag
            raise ValueError(f"--server {server!r}: expected an http:// or https:// URL, e.g. http://127.0.0.1:8000")
        self.server, self.api_key, self.timeout = server.rstrip("/"), api_key, timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method: str, path: str, body: Any = None, query: Optional[dict[str, Any]] = None,
                data: Optional[bytes] = None, content_type: str = "application/json") -> Any:
        url = f"{self.server}{path}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        if body is not None:
            data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=data if data is not None else b"" if method == "POST" else None,
                                     headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            raise ValueError(f"{method} {path}: HTTP {e.code}: {_message(e.read())}") from None
        except urllib.error.URLError as e:
            raise ValueError(f"cannot reach {self.server} ({e.reason}); is `minipeft platform` running "
                             "there? (--server or MINIPEFT_SERVER)") from None

    def upload(self, path: Path) -> dict[str, Any]:
        """POST /api/v1/files as multipart/form-data (purpose=fine-tune)."""
        boundary = secrets.token_hex(16)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        name = path.name.replace('"', "%22").replace("\r", "").replace("\n", "")
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                f"Content-Type: {kind}\r\n\r\n").encode("utf-8")
        data = head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        return self.request("POST", "/api/v1/files", data=data,
                            content_type=f"multipart/form-data; boundary={boundary}")


def _message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:500]
