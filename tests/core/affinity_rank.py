"""A rank for ``test_ranks.py``: waits (up to 20 s) for its CPU set to shrink to ``threads`` cores, then
writes the set it has to ``<config folder>/affinity<RANK>.json``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    config = Path(sys.argv[1])
    want = int(json.loads(config.read_text())["threads"])
    deadline = time.monotonic() + 20
    while len(os.sched_getaffinity(0)) > want and time.monotonic() < deadline:
        time.sleep(0.05)
    out = config.parent / f"affinity{os.environ['RANK']}.json"
    out.write_text(json.dumps(sorted(os.sched_getaffinity(0))))
