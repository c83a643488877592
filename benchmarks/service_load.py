"""Load test of the plan service on loopback: cached plan reads and new plans under concurrent clients.

    python benchmarks/service_load.py                       # starts its own server on a temporary DB
    python benchmarks/service_load.py --clients 50 --seconds 10 --new-plans 8
    python benchmarks/service_load.py --url http://127.0.0.1:8000   # an already running server (loopback only)

Two phases:

1. **cached reads**: one plan is made, then ``--clients`` concurrent clients (one connection each, no think
   time: a closed loop) read ``GET /v1/plans/{id}`` for ``--seconds``; every answer must be ``200`` with the
   right id. Goal: p99 under 50 ms at 50 clients.
2. **new plans**: ``--new-plans`` distinct plan requests (built-in ``gpt-tiny`` on a mixed preset, differing
   in global batch) are each POSTed by two clients at once (so every request is duplicated on purpose),
   answering ``429`` with a wait of ``Retry-After``; then polled to the end. Every request must end ``done``
   (none lost), the duplicates must get the same id, and every plan must have been solved once
   (``attempts == 1``: none duplicated).

Prints a table and writes ``benchmarks/results/service_load.json``. The load generator runs in this process
(asyncio + httpx), the server in another; both share this machine's cores, so the numbers are a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
MIXED = "a100x4-t4x4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _plan_body(global_batch: int) -> dict[str, Any]:
    return {
        "model": {"builtin": "gpt-tiny"},
        "batch": 1,
        "seq": 32,
        "cluster": MIXED,
        "global_batch": global_batch,
    }


async def _wait_done(client: httpx.AsyncClient, plan_id: str, timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body = (await client.get(f"/v1/plans/{plan_id}")).json()
        if body["status"] in ("done", "failed"):
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"plan {plan_id} still {body['status']} after {timeout_s} s")
        await asyncio.sleep(0.2)


class _RawConnection:
    """A minimal HTTP/1.1 keep-alive client for GETs (asyncio streams).

    httpx spends about as much CPU per request as the server does; on a 2-core machine shared by client
    and server that would measure the client. This reads status, ``Content-Length`` and body, nothing more.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()


async def cached_reads(url: str, plan_id: str, *, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds
    parsed = urlparse(url)
    path = f"/v1/plans/{plan_id}"
    marker = f'"id": "{plan_id}"'.encode()

    async def one_client() -> None:
        conn = _RawConnection(parsed.hostname or "127.0.0.1", parsed.port or 80)
        try:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                status, body = await conn.get(path)
                dt = time.perf_counter() - t0
                if status != 200 or marker not in body[:200]:
                    errors.append(f"{status}: {body[:200]!r}")
                latencies.append(dt)
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "phase": "cached plan reads",
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall,
        "p50_ms": _pct(latencies, 0.50) * 1e3,
        "p99_ms": _pct(latencies, 0.99) * 1e3,
        "max_ms": max(latencies) * 1e3 if latencies else float("nan"),
        "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else float("nan"),
    }


async def new_plans(url: str, *, count: int, first_batch: int) -> dict[str, Any]:
    """``count`` new requests, each sent twice concurrently; 429 is retried after Retry-After."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    ids: dict[int, set[str]] = {}

    async def submit(c: httpx.AsyncClient, gb: int) -> None:
        t0 = time.perf_counter()
        while True:
            r = await c.post("/v1/plans", json=_plan_body(gb))
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 429:
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                continue
            if r.status_code not in (200, 201, 202):
                raise RuntimeError(f"POST /v1/plans answered {r.status_code}: {r.text[:300]}")
            break
        plan_id = r.json()["id"]
        ids.setdefault(gb, set()).add(plan_id)
        await _wait_done(c, plan_id)
        latencies.append(time.perf_counter() - t0)

    batches = [first_batch * (i + 1) for i in range(count)]
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        await asyncio.gather(*(submit(c, gb) for gb in batches for _ in range(2)))
        wall = time.perf_counter() - t0
        finals = [(await c.get(f"/v1/plans/{next(iter(ids[gb]))}")).json() for gb in batches]
    lost = sum(f["status"] != "done" for f in finals)
    split = sum(len(ids[gb]) != 1 for gb in batches)
    resolved = sum(f["attempts"] != 1 for f in finals)
    return {
        "phase": "new plans (each sent twice)",
        "clients": 2 * count,
        "requests": 2 * count,
        "distinct_plans": len({i for s in ids.values() for i in s}),
        "not_done": lost,
        "duplicate_ids": split,
        "solved_more_than_once": resolved,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "wall_s": wall,
        "throughput_rps": count / wall,
        "p50_ms": _pct(latencies, 0.50) * 1e3,
        "p99_ms": _pct(latencies, 0.99) * 1e3,
        "max_ms": max(latencies) * 1e3,
        "mean_ms": statistics.fmean(latencies) * 1e3,
        "errors": lost + split + resolved,
    }


async def run(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        r = await c.post("/v1/plans", json=_plan_body(args.first_batch))
        r.raise_for_status()
        plan_id = r.json()["id"]
        done = await _wait_done(c, plan_id)
        if done["status"] != "done":
            raise RuntimeError(f"warm-up plan failed: {done['error']}")
        for _ in range(20):  # warm the response cache and the connection path
            await c.get(f"/v1/plans/{plan_id}")
    rows = [await cached_reads(url, plan_id, clients=args.clients, seconds=args.seconds)]
    if args.new_plans:
        rows.append(await new_plans(url, count=args.new_plans, first_batch=args.first_batch * 2))
    return rows


def _start_server(args: argparse.Namespace, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = dict(os.environ, DISTPLAN_QUEUE_LIMIT=str(args.queue_limit), DISTPLAN_DEFAULT_TIME_LIMIT_S="5")
    log = open(folder / "server.log", "wb")  # noqa: SIM115 (lives as long as the server)
    cmd = [
        sys.executable,
        "-m",
        "distplan.cli",
        "serve",
        "--port",
        str(port),
        "--db",
        str(folder / "db.sqlite"),
    ]
    cmd += ["--workers", str(args.workers), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(folder / 'server.log').read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become ready in 300 s")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", help="an already running server on loopback (default: start one)")
    ap.add_argument(
        "--clients", type=int, default=50, help="concurrent clients for cached reads (default 50)"
    )
    ap.add_argument(
        "--seconds", type=float, default=10.0, help="duration of the cached-read phase (default 10)"
    )
    ap.add_argument(
        "--new-plans", type=int, default=6, help="distinct new plan requests (default 6; 0 skips)"
    )
    ap.add_argument("--first-batch", type=int, default=8, help="global batch of the first plan (default 8)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of a started server (default 2)")
    ap.add_argument("--queue-limit", type=int, default=4, help="queue limit of a started server (default 4)")
    ap.add_argument("--out", type=Path, default=RESULTS / "service_load.json", help="JSON results file")
    args = ap.parse_args()
    if not 1 <= args.clients <= 500:
        ap.error(f"--clients must be between 1 and 500, got {args.clients}")
    if not 0 <= args.new_plans <= 64:
        ap.error(f"--new-plans must be between 0 and 64, got {args.new_plans}")

    proc = None
    with tempfile.TemporaryDirectory(prefix="distplan-load-") as tmp:
        if args.url:
            host = urlparse(args.url).hostname
            if host not in ("127.0.0.1", "localhost", "::1"):
                ap.error(f"--url must be a loopback address (this is a load test), got host {host!r}")
            url = args.url.rstrip("/")
        else:
            proc, url = _start_server(args, Path(tmp))
        try:
            rows = asyncio.run(run(url, args))
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()

    print(f"\nservice load on {platform.node()} ({os.cpu_count()} cores), {url}")
    head = f"{'phase':<30} {'clients':>7} {'requests':>9} {'errors':>6} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['phase']:<30} {r['clients']:>7} {r['requests']:>9} {r['errors']:>6} {r['throughput_rps']:>8.1f} "
            f"{r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['max_ms']:>9.1f}"
        )
    reads = rows[0]
    goal = reads["p99_ms"] < 50.0 and reads["errors"] == 0
    print(
        f"\ngoal (cached reads p99 < 50 ms at {reads['clients']} clients, no errors): {'MET' if goal else 'NOT MET'}"
    )
    if len(rows) > 1:
        n = rows[1]
        print(
            f"new plans: {n['distinct_plans']} distinct, not done {n['not_done']}, duplicate ids {n['duplicate_ids']}, "
            f"solved more than once {n['solved_more_than_once']}, answers {n['statuses']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"url": url, "cpu_count": os.cpu_count(), "goal_met": goal, "rows": rows, "argv": sys.argv[1:]},
            indent=1,
        )
    )
    print(f"wrote {args.out}")
    if not goal or any(r["errors"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
