"""A plan, graph and timeline built by hand (no planner): a GPT-shaped graph on the mixed preset.

The report tests use it so they check the page against known data (every stage, every device) without
depending on what the solver chooses.
"""

from __future__ import annotations

from distplan.graph import OpGraph, OpNode, TensorMeta, make_graph
from distplan.plan import GraphRef, Plan, PlanRequest, Predictions, SolverReport, Stage, build_rank_map
from distplan.profiles import load_cluster
from distplan.timeline import Timeline, TimelineEvent

LAYERS = 12


def gpt_like_graph(layers: int = LAYERS) -> OpGraph:
    """``input -> wte -> h.0 .. h.{L-1} (attn, mlp, residuals) -> ln_f -> lm_head``."""
    act = (TensorMeta((1, 1024, 768), "float32", 1024 * 768 * 4),)
    nodes = [OpNode("input_ids", "placeholder", "input_ids", "", (), act)]
    nodes.append(
        OpNode(
            "wte",
            "call_function",
            "aten.embedding",
            "transformer.wte",
            ("input_ids",),
            act,
            10,
            0,
            0,
            1 << 20,
        )
    )
    prev = "wte"
    for i in range(layers):
        m = f"transformer.h.{i}"
        for sub, flops, pb in (("ln_1", 1, 0), ("attn", 400, 1 << 22), ("ln_2", 1, 0), ("mlp", 800, 1 << 23)):
            name = f"h{i}_{sub}"
            nodes.append(
                OpNode(name, "call_function", "aten.op", f"{m}.{sub}", (prev,), act, flops, 2 * flops, 0, pb)
            )
            prev = name
    nodes.append(OpNode("ln_f", "call_function", "aten.layer_norm", "transformer.ln_f", (prev,), act, 1, 2))
    nodes.append(
        OpNode("lm_head", "call_function", "aten.mm", "lm_head", ("ln_f",), act, 600, 1200, 0, 1 << 20)
    )
    return make_graph("gpt-like", nodes, outputs=("lm_head",), num_params=10_000_000)


def handmade_plan(graph: OpGraph | None = None) -> Plan:
    """Three stages on ``a100x8-v100x8``: two on A100 pairs, one on a V100 pair (dp 2); devices 4-7 and
    10-15 unused."""
    g = graph or gpt_like_graph()
    c = load_cluster("a100x8-v100x8")
    n = len(g.nodes)
    cuts = [0, 22, 42, n]
    devs = [(0, 1), (2, 3), (8, 9)]
    stages = []
    for i in range(3):
        kind = c.devices()[devs[i][0]].kind
        mods = tuple(dict.fromkeys(x.module for x in g.nodes[cuts[i] : cuts[i + 1]] if x.module))
        stages.append(
            Stage(
                i,
                cuts[i],
                cuts[i + 1],
                devs[i],
                kind,
                dp=2,
                start_node=g.nodes[cuts[i]].name,
                modules=mods,
                fwd_time_s=0.010 + 0.002 * i,
                bwd_time_s=0.020 + 0.004 * i,
                send_time_s=0.001 if i < 2 else 0.0,
                allreduce_time_s=0.004,
                memory_bytes=(20 + 5 * i) * 2**30,
                param_bytes=2**28,
            )
        )
    req = PlanRequest(c, global_batch=16)
    ranks = build_rank_map(c, [s.devices for s in stages])
    mem = {d: s.memory_bytes for s in stages for d in s.devices}
    plan = Plan(
        req,
        GraphRef.of(g),
        tuple(stages),
        4,
        4,
        "1f1b",
        ranks,
        predictions=Predictions(0.25, 64.0, 0.3, mem),
        solver=SolverReport(
            "cp-sat", "OPTIMAL", 0.25, 0.25, 0.0, 1.2, ("hand-made plan for the report tests",)
        ),
        baselines={"equal_layers": 0.5, "param_balanced": 0.4, "homogeneous_dp": 0.3, "data_parallel": None},
    )
    plan.check(g)
    return plan


def handmade_timeline(plan: Plan) -> Timeline:
    """A GPipe-style iteration (all forwards, then all backwards) from the stages' times: enough structure
    for the drawing, with sends, an all-reduce and an optimizer step."""
    events: list[TimelineEvent] = []
    m = plan.num_microbatches
    fwd_done: dict[tuple[int, int], float] = {}
    for s in plan.stages:
        t = 0.0
        for mb in range(m):
            start = max(t, fwd_done.get((s.index - 1, mb), 0.0))
            end = start + s.fwd_time_s
            for d in s.devices:
                events.append(TimelineEvent(d, s.index, "fwd", mb, start, end))
                if s.send_time_s:
                    events.append(TimelineEvent(d, s.index, "send", mb, end, end + s.send_time_s))
            fwd_done[(s.index, mb)] = end + s.send_time_s
            t = end
    bwd_done: dict[tuple[int, int], float] = {}
    last_fwd = max(fwd_done.values())
    finish = 0.0
    for s in reversed(plan.stages):
        t = last_fwd
        for mb in range(m):
            start = max(t, bwd_done.get((s.index + 1, mb), 0.0))
            end = start + s.bwd_time_s
            for d in s.devices:
                events.append(TimelineEvent(d, s.index, "bwd", mb, start, end))
            bwd_done[(s.index, mb)] = end
            t = end
        for d in s.devices:
            events.append(TimelineEvent(d, s.index, "allreduce", -1, t, t + s.allreduce_time_s))
            events.append(
                TimelineEvent(
                    d, s.index, "optimizer", -1, t + s.allreduce_time_s, t + s.allreduce_time_s + 0.002
                )
            )
        finish = max(finish, t + s.allreduce_time_s + 0.002)
    devices = tuple(d for s in plan.stages for d in s.devices)
    labels = tuple(f"d{d} stage {s.index}" for s in plan.stages for d in s.devices)
    events.sort(key=lambda e: (e.device, e.start_s))
    return Timeline(tuple(events), devices, labels, finish, 0.3)
