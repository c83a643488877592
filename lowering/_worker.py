"""One rank of a validation run (``python -m distplan.lowering._worker CONFIG``); started by
:func:`distplan.lowering.validate`, not by users.

It lowers the plan from the model's spec (built on ``meta``; the width-reduced copy on the CPU) with the
reproducible initialisation the parent's reference uses, runs the plan's steps through
:func:`distplan.lowering.lower` on the parent's batches (under ``PinnedRandom`` when the parent
found random ops) and writes the loss, the gradients, the updated parameters and the buffers of its stages
(by original FQN) to ``rank<R>.pt``. On any error it writes ``rank<R>.error.json``
and exits non-zero at once, so the parent can report it and stop the other ranks.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _install_fault(runner: Any, fault: dict[str, Any]) -> None:
    """Test hook: make this rank fail in the middle of a step (after its first microbatch's forward)."""
    calls = {"n": 0}
    step = int(fault.get("step", 0))
    per_step = runner.plan.num_microbatches * len(runner.stages)

    def hook(module: Any, args: Any) -> None:
        calls["n"] += 1
        if calls["n"] != step * per_step + 2:
            return
        mode = fault["mode"]
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "hang":
            time.sleep(3600)
        else:
            raise RuntimeError(f"injected fault on rank {runner.rank_info.rank}")

    for st in runner.stages:
        st.module.register_forward_pre_hook(hook)


def main(config_path: str) -> int:
    cfg = json.loads(Path(config_path).read_text())
    rank = int(os.environ["RANK"])
    out = Path(cfg["dir"])
    # On SIGUSR1 the parent gets every thread's Python stack (how it tells a hung rank from one waiting).
    stack_file = open(out / f"rank{rank}.stack", "w")  # noqa: SIM115 - open for the process's lifetime
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    try:
        import contextlib

        import torch

        from distplan.lowering.effects import PinnedRandom
        from distplan.lowering.runtime import lower
        from distplan.plan import Plan
        from distplan.tracer import resolve_model

        torch.manual_seed(cfg["seed"])
        plan = Plan.from_dict(cfg["plan"])
        over = cfg.get("config_overrides") or {}
        model: Any = cfg["model"]  # full width: lower() builds it on meta, this rank's tensors only
        if cfg["width_reduced"]:
            # A width-reduced copy is derived from the meta-built full model (never allocated here).
            full = resolve_model(
                cfg["model"],
                batch=plan.replica_microbatch(0),
                seq=cfg["seq"],
                device="meta",
                seed=cfg["seed"],
                config_overrides=over,
            )
            model = full.width_reduced(max_hidden=cfg["max_hidden"])
            assert model is not None  # the parent checked that the model can be reduced
        data = torch.load(out / "data.pt", weights_only=True)
        runner = lower(
            plan,
            model,
            seq=cfg["seq"],
            check_graph=False,  # the parent checked the structure hash before starting the ranks
            optimizer=cfg["optimizer"],
            lr=cfg["lr"],
            device="cpu",
            timeout_s=cfg["timeout_s"],
            seed=cfg["seed"],
            init="reproducible",  # the parent's reference starts from the same values
            config_overrides=over or None,
            output=cfg.get("output"),
            matmul_precision="fp32",  # numerics are compared with an fp32 single-device run
        )
        # Set up: the parent's step timeout counts from the moment every rank has written this.
        (out / f"rank{rank}.ready").touch()
        fault = cfg.get("fault")
        if fault and int(fault["rank"]) == rank:
            _install_fault(runner, fault)
        losses, grads, params, buffers = [], [], [], []
        for inputs, kwargs, target in data:
            with PinnedRandom() if cfg.get("pin_random") else contextlib.nullcontext():
                loss = runner.step(tuple(inputs), target, kwargs)
            grads.append({k: g.detach().clone() for k, g in runner.gradients().items()})
            runner.optimizer_step()
            params.append({k: p.clone() for k, p in runner.full_parameters().items()})
            buffers.append({k: b.detach().clone() for k, b in runner.stage_buffers().items()})
            losses.append(loss)
        info = runner.rank_info
        torch.save(
            {
                "rank": rank,
                "stages": list(info.stages),
                "replica": info.replica,
                "applied": runner.applied(),
                "losses": losses,
                "grads": grads,
                "params": params,
                "buffers": buffers,
            },
            out / f"rank{rank}.pt",
        )
        import torch.distributed as dist

        dist.destroy_process_group()
        return 0
    except BaseException as e:
        # Report the root cause: pipelining wraps a stage's error in "[Stage i] failed to run forward".
        root: BaseException = e
        while root.__cause__ is not None:
            root = root.__cause__
        message = str(root).strip()
        if root is not e:
            message += f" (in {str(e).strip().splitlines()[0]})"
        (out / f"rank{rank}.error.json").write_text(
            json.dumps(
                {
                    "rank": rank,
                    "type": type(root).__name__,
                    "message": message[:2000],
                    "traceback": traceback.format_exc()[-6000:],
                    "time": time.time(),
                }
            )
        )
        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()
        # Exit at once: a clean shutdown could block in a collective with a dead peer.
        os._exit(3)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
