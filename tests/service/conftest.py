"""A real service for the tests: ``distplan serve`` in a subprocess on a free loopback port, driven by httpx.

One server is shared by the tests (starting one costs the workers' warm-up, ~10 s here);
:class:`ServerProcess` also lets a test stop it and start another on the same database.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from service_harness import ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("service")
    srv = ServerProcess(
        folder / "plans.db",
        folder / "server.log",
        workers=2,
        queue_limit=2,
        short_wait_s=5,
        max_body_bytes=2 * 2**20,
        max_graph_nodes=5000,
        default_time_limit_s=5,
        solver_time_cap_s=10,
    )
    srv.start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.stop()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
