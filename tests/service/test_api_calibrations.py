"""Uploading calibration files and planning with them, through the real server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from service_harness import wait_done

from distplan.calibration import Calibration, Curve, DeviceCalibration, LinkCalibration, OpTimes

# Multi-process: the real server runs uvicorn plus its worker processes.
pytestmark = pytest.mark.slow


def _calibration(kind: str = "cpu-epyc-2core") -> Calibration:
    sizes = (1e2, 1e5, 1e8)

    def times(rate: float, floor: float) -> OpTimes:
        c = Curve(sizes, tuple(floor + x / rate for x in sizes))
        return OpTimes(c, Curve(sizes, tuple(2 * floor + 2 * x / rate for x in sizes)))

    return Calibration(
        kind=kind,
        device=DeviceCalibration(
            ops={"elementwise": times(3e9, 5e-6), "norm": times(2e9, 6e-6), "view": times(1e12, 1e-6)},
            matmul={"fp32": times(4e10, 8e-6)},
            attention_kernel="flash",
            source="test upload",
        ),
        link=LinkCalibration(backend="gloo", scope="intra-host", p2p=Curve(sizes, (6e-5, 1e-4, 5e-2))),
    )


CLUSTER: dict[str, Any] = {
    "name": "lab",
    "hosts": [
        {
            "name": "box",
            "devices": [{"kind": "cpu-epyc-2core", "count": 2}],
            "link": {"bandwidth_gbyte_s": 5, "latency_us": 50},
        }
    ],
}


def test_upload_then_plan_with_the_calibration(client: httpx.Client) -> None:
    cal = _calibration()
    r = client.post("/v1/calibrations", json=cal.to_dict())
    assert r.status_code in (200, 201), r.text
    body = r.json()
    cid = body["id"]
    assert body["kind"] == "cpu-epyc-2core" and body["summary"]["matmul_fp32_tflops"] > 0
    assert Calibration.from_dict(body["calibration"]) == cal
    again = client.post("/v1/calibrations", json=cal.to_dict())
    assert again.status_code == 200 and again.json()["id"] == cid  # stored by content
    got = client.get(f"/v1/calibrations/{cid}")
    assert got.status_code == 200 and got.json()["calibration"] == body["calibration"]

    def plan(cluster: dict[str, Any]) -> dict[str, Any]:
        req = {"model": {"builtin": "gpt-tiny"}, "seq": 16, "cluster": cluster, "global_batch": 4}
        r = client.post("/v1/plans", json=req)
        assert r.status_code in (200, 201, 202), r.text
        done = wait_done(client, f"/v1/plans/{r.json()['id']}")
        assert done["status"] == "done", done
        return dict(done)

    plain = plan(CLUSTER)
    calibrated = plan({**CLUSTER, "calibrations": [cid]})
    assert calibrated["id"] != plain["id"]
    figures = calibrated["predictions"]["figures"]
    assert (
        figures["kind cpu-epyc-2core"].startswith("calibrated")
        and "test upload" in figures["kind cpu-epyc-2core"]
    )
    assert set(plain["predictions"]["figures"].values()) == {"datasheet"}
    kinds = calibrated["plan"]["request"]["cluster"]["kinds"]
    assert kinds[0]["calibration"] == cal.device.to_dict()  # type: ignore[union-attr]
    # Inline contents work as well as an id.
    inline = plan({**CLUSTER, "calibrations": [cal.to_dict()]})
    assert inline["id"] == calibrated["id"]


def test_bad_calibrations_are_422_naming_the_field(client: httpx.Client) -> None:
    bad = _calibration().to_dict()
    bad["device"]["matmul"]["fp32"]["fwd"]["sizes"] = [3, 2, 1]
    r = client.post("/v1/calibrations", json=bad)
    assert r.status_code == 422, r.text
    assert (
        "calibration.device.matmul.fp32.fwd.sizes[1]: sizes must increase strictly"
        in r.json()["error"]["message"]
    )
    r = client.get("/v1/calibrations/" + "ab" * 16)
    assert r.status_code == 404 and "POST it to /v1/calibrations" in r.json()["error"]["message"]
    req = {
        "model": {"builtin": "gpt-tiny"},
        "seq": 16,
        "global_batch": 4,
        "cluster": {**CLUSTER, "calibrations": ["cd" * 16]},
    }
    r = client.post("/v1/plans", json=req)
    assert r.status_code == 422 and "no uploaded calibration has id" in r.json()["error"]["message"], r.text
    other = _calibration("h100-sxm-80g").to_dict()
    r = client.post("/v1/plans", json={**req, "cluster": {**CLUSTER, "calibrations": [other]}})
    assert r.status_code == 422, r.text
    msg = r.json()["error"]["message"]
    assert "calibrations[0].kind: device kind 'h100-sxm-80g' is not used by cluster 'lab'" in msg
    r = client.post("/v1/plans", json={**req, "cluster": {**CLUSTER, "calibrations": ["../etc/passwd"]}})
    assert r.status_code == 422 and "is a file name" in r.json()["error"]["message"]
