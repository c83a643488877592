"""``distplan.ranks.spawn_ranks``: real processes, pinned to cores of their own when asked."""

from __future__ import annotations

import json
import os
from pathlib import Path

from distplan.ranks import spawn_ranks


def _affinities(tmp_path: Path, world: int, pin: bool) -> list[list[int]]:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"threads": 1 if pin else len(os.sched_getaffinity(0))}))
    procs = spawn_ranks("tests.core.affinity_rank", config, world, tmp_path, pin=pin)
    for p in procs:
        assert p.wait(timeout=60) == 0, (tmp_path / "rank0.log").read_text()
    return [json.loads((tmp_path / f"affinity{r}.json").read_text()) for r in range(world)]


def test_pinned_ranks_get_a_core_each_and_unpinned_ranks_keep_every_core(tmp_path: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    world = min(2, len(cores))
    (tmp_path / "pinned").mkdir()
    pinned = _affinities(tmp_path / "pinned", world, pin=True)
    assert [len(a) for a in pinned] == [1] * world
    assert len({a[0] for a in pinned}) == world and all(a[0] in cores for a in pinned)
    (tmp_path / "free").mkdir()
    assert _affinities(tmp_path / "free", world, pin=False) == [cores] * world
