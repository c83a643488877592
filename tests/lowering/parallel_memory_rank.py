"""One process (a world of one gloo rank) that lowers each plan it is given and measures one step's memory
with ``distplan.lowering.memory.measure_step_memory``; prints one JSON line per plan. Used by
``test_parallel_memory.py``: ``python parallel_memory_rank.py CONFIG.json``.

CONFIG: ``{"model": spec, "seq": int, "config_overrides": {...}, "plans": [plan dicts]}``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path


def main(path: str) -> int:
    cfg = json.loads(Path(path).read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    import torch
    import torch.distributed as dist

    from distplan.lowering import lower
    from distplan.lowering.memory import measure_step_memory
    from distplan.plan import Plan

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=300))
    for d in cfg["plans"]:
        plan = Plan.from_dict(d)
        runner = lower(
            plan,
            cfg["model"],
            seq=cfg["seq"],
            config_overrides=cfg.get("config_overrides") or None,
            check_graph=False,
            device="cpu",
            optimizer="sgd",
        )
        batch = runner.source.sample(plan.request.global_batch, seed=1)
        m = measure_step_memory(runner, batch.args, batch.target, batch.kwargs)
        print(json.dumps({"recompute": plan.stages[0].recompute, **m.to_dict()}), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
