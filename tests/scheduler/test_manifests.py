"""Manifests for real clusters (``distplan.presentation.manifests``): a scheduled two-host job as a Kubernetes
Indexed Job and as a Slurm batch script, parsed back and run with stand-ins for the engine's commands (the
right ``torchrun`` line runs on each pod or node), and through ``distplan schedule --emit``."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from scheduler_helpers import TINY, job, make_cluster

from distplan.cli import main
from distplan.lowering.launcher import host_commands, train_args
from distplan.presentation.manifests import RDZV, ManifestJob, dns_name, render_manifest
from distplan.scheduler import DistplanPolicy, GraphSource, JobSet, Scheduler

#: Eight layers: the planner pipelines it over two hosts of four devices (two stages, one per host).
DEEP = {"layers": 8, "hidden": 512, "heads": 8, "seq": 256, "vocab": 1000}


@pytest.fixture(scope="module")
def two_host_job():  # type: ignore[no-untyped-def]
    """A job on two whole hosts (a shape of 2 x 4 devices) and its manifest data."""
    cluster = make_cluster("two-hosts", per_host=4, hosts=2)
    s = Scheduler(cluster, DistplanPolicy(), graphs={"deep": GraphSource("synthetic", dict(DEEP)).load()})
    s.submit(job("wide.job_7", "deep", priority="high", min_devices=8, max_devices=8, global_batch=64))
    plan = s.plan("wide.job_7")
    hosts = host_commands(plan, args=train_args("gpt-tiny", steps=50, seq=16), endpoint=RDZV)
    assert len(hosts) == 2, plan.layout
    return ManifestJob.from_plan(
        plan, hosts, job_id="wide.job_7", priority="high", image="reg/distplan:1"
    ), hosts


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run(script: str, env: dict[str, str], stubs: Path) -> str:
    env = {**os.environ, **env, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_kubernetes_indexed_job_runs_each_hosts_line(two_host_job, tmp_path: Path) -> None:
    mj, hosts = two_host_job
    docs = list(yaml.safe_load_all(render_manifest(mj, "k8s")))
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [("v1", "Service"), ("batch/v1", "Job")]
    svc, jb = docs
    name = dns_name("wide.job_7")
    assert name == "distplan-wide-job-7" == svc["metadata"]["name"] == jb["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == {"job-name": name}
    spec = jb["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == name and pod["restartPolicy"] == "Never"
    assert pod["priorityClassName"] == "distplan-high"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == [h.host for h in hosts]
    (c,) = pod["containers"]
    assert c["image"] == "reg/distplan:1" and c["resources"]["limits"] == {"nvidia.com/gpu": 4}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == {"DISTPLAN_RDZV": f"{name}-0.{name}:29500"}
    assert c["command"][:2] == ["bash", "-c"]
    script = c["command"][2]
    # Pod i runs node rank i's line, with the rendezvous endpoint the Service names.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(stubs, "torchrun", 'printf "%s\\n" "$@"\n')
    for h in hosts:
        out = _run(script, {"JOB_COMPLETION_INDEX": str(h.node_rank), **env}, stubs)
        expected = shlex.split(h.command.replace(RDZV, env["DISTPLAN_RDZV"]))[1:]
        assert out.splitlines() == expected
        assert f"--host-index {h.host_index}" in h.command and f"--nproc-per-node {h.nproc}" in h.command
    bad = subprocess.run(
        ["bash", "-c", script],
        env={**os.environ, "JOB_COMPLETION_INDEX": "9"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "no host for pod index 9" in bad.stderr


def test_slurm_script_runs_each_nodes_line(two_host_job, tmp_path: Path) -> None:
    mj, hosts = two_host_job
    text = render_manifest(mj, "slurm")
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    directives = dict(
        line.removeprefix("#SBATCH --").split("=", 1)
        for line in text.splitlines()
        if line.startswith("#SBATCH --")
    )
    assert directives["nodes"] == "2" and directives["ntasks-per-node"] == "1"
    assert directives["gres"] == "gpu:4" and directives["nodelist"] == ",".join(h.host for h in hosts)
    assert directives["job-name"] == "distplan-wide-job-7"
    # Stand-ins: srun runs its command once per node, as that node; scontrol lists the allocation.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(stubs, "torchrun", 'echo "$SLURMD_NODENAME: $*"\n')
    _stub(stubs, "scontrol", "printf '%s\\n' " + " ".join(h.host for h in hosts) + "\n")
    nodes = " ".join(h.host for h in hosts)
    _stub(
        stubs,
        "srun",
        f'cmd="${{@: -1}}"\nfor n in {nodes}; do SLURMD_NODENAME=$n bash -c "$cmd"; done\n',
    )
    work = tmp_path / "work"
    work.mkdir()
    out = _run(
        text.replace(f"cd {mj.workdir}", f"cd {work}"), {"SLURM_JOB_NODELIST": "ignored"}, stubs
    ).splitlines()
    rdzv = f"{hosts[0].host}:29500"
    assert out == [f"{h.host}: " + " ".join(shlex.split(h.command.replace(RDZV, rdzv))[1:]) for h in hosts]


def test_manifest_data_is_checked() -> None:
    with pytest.raises(ValueError, match="format must be one of k8s, slurm"):
        render_manifest(None, "xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must rendezvous at"):
        ManifestJob("j", "high", "a100", (0,), "p", "l", (_host("h", "torchrun x"),))
    with pytest.raises(ValueError, match="cannot be a node name"):
        ManifestJob("j", "high", "a100", (0,), "p", "l", (_host("h; rm -rf /", f"torchrun {RDZV}"),))


def _host(name: str, command: str):  # type: ignore[no-untyped-def]
    from distplan.presentation.manifests import HostLaunch

    return HostLaunch(0, 0, name, 1, command)


def test_schedule_cli_emits_the_running_jobs(capsys, tmp_path: Path) -> None:
    js = JobSet(
        "emit-jobs",
        {"gpt-tiny": GraphSource("synthetic", dict(TINY))},
        (
            job("first", "gpt-tiny", max_devices=4, total_steps=3000),
            # Open-ended: no declared steps; it runs until the scheduler stops it.
            job("second", "gpt-tiny", priority="high", max_devices=2, total_steps=None, run_steps=2000),
            job("later", "gpt-tiny", arrival_s=100.0, total_steps=500),
        ),
    )
    path = tmp_path / "jobs.json"
    js.save(path)
    out_dir = tmp_path / "manifests"
    code = 0
    try:
        main(
            [
                "schedule",
                str(path),
                "--cluster",
                "a100x4-t4x4",
                "--json",
                "--emit",
                "k8s",
                "--emit-dir",
                str(out_dir),
            ]
        )
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    assert code == 0, err
    written = json.loads(out)["manifests"]
    # At time 0 the two jobs that arrived then run; the later one is not in the snapshot.
    assert sorted(Path(w).name for w in written) == ["distplan-first.yaml", "distplan-second.yaml"]
    for w in written:
        _svc, jb = yaml.safe_load_all(Path(w).read_text())
        script = jb["spec"]["template"]["spec"]["containers"][0]["command"][2]
        assert "--model gpt-tiny" in script and "--save /checkpoints/" in script and "--resume" not in script
        jid = Path(w).stem.removeprefix("distplan-")
        # Preemptible: a STOP file in the job's checkpoint folder makes every rank save and exit.
        assert f"--stop-file /checkpoints/{jid}/STOP" in script
        if jid == "first":
            assert "--steps 3000" in script and "--until-stopped" not in script
        else:
            assert "--until-stopped" in script, script
    for extra, message in (
        (["--emit", "xml", "--emit-dir", str(out_dir)], "--emit must be k8s or slurm"),
        (["--emit", "slurm"], "--emit and --emit-dir go together"),
    ):
        try:
            main(["schedule", str(path), "--cluster", "a100x4-t4x4", *extra])
        except SystemExit as e:
            assert e.code == 2
        assert message in capsys.readouterr().err
