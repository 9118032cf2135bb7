"""Test helpers for the platform: `minipeft platform` in a subprocess on a free 127.0.0.1 port, and
raw HTTP calls to it (http.client, so a test controls every byte and header it sends)."""
from __future__ import annotations

import http.client
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

KEY = "test-key-0123"
HOST = "127.0.0.1"  # the tests never send traffic anywhere else


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request."""
    boundary = secrets.token_hex(12)
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Server:
    """The platform server; start() again after stop() serves the same data directory."""

    def __init__(self, data_dir: Path, base_dir: Path, log: Path):
        self.data_dir, self.base_dir, self.log = data_dir, base_dir, log
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 120) -> "Server":
        self.port = free_port()
        cmd = [sys.executable, "-m", "minipeft", "platform", "--host", HOST, "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--api-key", KEY, "--base-model", f"tiny={self.base_dir}",
               "--max-tokens", "64", "--max-upload-mb", "1", "--threads", "1"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if self.call("GET", "/v1/models")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the server did not start in {timeout}s:\n{self.log.read_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(60)

    def call(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None,
             headers: Optional[dict[str, str]] = None, key: Optional[str] = KEY) -> tuple[int, Any]:
        """(status, parsed JSON body) of one request."""
        sent = {"Authorization": f"Bearer {key}"} if key else {}
        if body is not None:
            raw, sent["Content-Type"] = json.dumps(body).encode(), "application/json"
        conn = http.client.HTTPConnection(HOST, self.port, timeout=120)
        try:
            conn.request(method, path, body=raw, headers={**sent, **(headers or {})})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        return response.status, json.loads(data) if data else None

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, answer = self.call(method, path, body, **kw)
        assert status == 200, (method, path, status, answer)
        return answer

    def upload(self, name: str, data: bytes, purpose: str = "fine-tune") -> tuple[int, Any]:
        raw, kind = multipart({"purpose": purpose}, {"file": (name, data)})
        return self.call("POST", "/api/v1/files", raw=raw, headers={"Content-Type": kind})

    def until(self, job_id: str, check: Callable[[], Any], what: str, timeout: float = 240) -> Any:
        """check()'s first true value, polled; on timeout the error shows the job's log."""
        deadline = time.monotonic() + timeout
        while not (value := check()):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: no {what} after {timeout}s; log:\n{self.logs(job_id)[-4000:]}")
            time.sleep(0.2)
        return value

    def wait(self, job_id: str, statuses: tuple[str, ...], timeout: float = 240) -> dict[str, Any]:
        def job() -> Optional[dict[str, Any]]:
            found = self.ok("GET", f"/api/v1/fine-tunes/{job_id}")
            return found if found["status"] in statuses else None
        return self.until(job_id, job, f"status in {statuses}", timeout)

    def logs(self, job_id: str) -> str:
        return "\n".join(self.ok("GET", f"/api/v1/fine-tunes/{job_id}/logs")["logs"])
