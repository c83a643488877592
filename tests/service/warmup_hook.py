"""A ``DISTPLAN_WORKER_INIT`` hook for the warm-up tests: each worker waits, before it reports ready, until
the file named by ``DISTPLAN_TEST_RELEASE_FILE`` exists. The test decides when the warm-up ends, so what it
checks during the warm-up does not depend on how fast this machine loads torch."""

from __future__ import annotations

import os
import time
from pathlib import Path

# Never block a worker for ever if a test dies without releasing it.
_LIMIT_S = 240.0


def wait_for_release() -> None:
    """Block until the release file exists (or ``_LIMIT_S`` has passed)."""
    path = Path(os.environ["DISTPLAN_TEST_RELEASE_FILE"])
    deadline = time.monotonic() + _LIMIT_S
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
