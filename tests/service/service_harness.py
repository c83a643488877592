"""Test harness: ``distplan serve`` in a subprocess on a free loopback port, driven by httpx."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

READY_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``distplan serve`` on 127.0.0.1 with a given database and ``DISTPLAN_*`` settings."""

    def __init__(
        self, db: Path, log: Path, *, workers: int = 2, env: dict[str, str] | None = None, **settings: Any
    ) -> None:
        self.db = db
        self.log = log
        self.workers = workers
        self.env = dict(env or {})
        self.settings = settings
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True) -> ServerProcess:
        self.port = free_port()
        env = dict(os.environ)
        env.update(self.env)
        env.update({f"DISTPLAN_{k.upper()}": str(v) for k, v in self.settings.items()})
        cmd = [
            sys.executable,
            "-m",
            "distplan.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--db",
            str(self.db),
            "--workers",
            str(self.workers),
            "--log-level",
            "warning",
        ]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        self.wait_up(ready=wait_ready)
        return self

    def wait_up(self, *, ready: bool = True, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        path = "/readyz" if ready else "/healthz"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; log:\n{self.log.read_text()[-4000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(self.url + path, timeout=2)
                # "ready" here means every worker is warm (the tests' timings assume it), not just one.
                if r.status_code == 200 and (not ready or r.json()["workers_ready"] == r.json()["workers"]):
                    return
            time.sleep(0.2)
        raise RuntimeError(
            f"server not {'ready' if ready else 'up'} in {timeout_s} s; log:\n{self.log.read_text()[-4000:]}"
        )

    def stop(self) -> int:
        """SIGTERM (graceful: uvicorn runs the app's shutdown), then wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


def wait_done(client: httpx.Client, url: str, *, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll a plan or validation URL until its status is ``done`` or ``failed``."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get(url)
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] in ("done", "failed"):
            return body
        assert time.monotonic() < deadline, f"{url} still {body['status']} after {timeout_s} s"
        time.sleep(0.2)
