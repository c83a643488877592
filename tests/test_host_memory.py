"""distplan.host_memory: a CPU training step stops faulting its pages in once freed memory is kept.

Each case runs in a fresh interpreter: the setting is process-wide and its effect depends on the heap's
history, which a test process that has run other tests would not show.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

_PROBE = r"""
import json, resource
import torch
from distplan.host_memory import keep_freed_memory

torch.set_num_threads(1)
applied = keep_freed_memory()
torch.manual_seed(0)
widths = [256, 1024, 1024, 1024, 1024, 1024, 64]
layers = []
for a, b in zip(widths, widths[1:]):
    layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
model = torch.nn.Sequential(*layers[:-1])  # 18 MB of parameters: Adam's temporaries are MBs each
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x = torch.randn(4, 256)
faults = []
for step in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "faults": faults}))
"""


def _probe(env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop("DISTPLAN_KEEP_FREED_MEMORY", None)
    if env_value is not None:
        env["DISTPLAN_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_steps_stop_faulting_once_freed_memory_is_kept() -> None:
    kept = _probe(None)
    assert kept["applied"] is True and kept["again"] is True  # glibc (Linux), asked once, same answer
    # After the first steps have grown the heap, a step reuses it: the typical step faults no page in
    # again (a 4 KiB page each; the optimizer alone frees and asks again for ~18 MB per step). The heap
    # still grows now and then by a block (a free hole of the wrong size), hence the median.
    settled = kept["faults"][5:]
    assert statistics.median(settled) == 0, kept["faults"]

    off = _probe("0")
    assert off["applied"] is False and off["again"] is False
    # glibc's defaults hand the freed megabytes back to the kernel: the same steps fault them in again.
    assert statistics.median(off["faults"][5:]) > 256, off["faults"]
