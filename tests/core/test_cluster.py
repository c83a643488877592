from pathlib import Path

import pytest

from distplan.cluster import Cluster
from distplan.errors import ProfileError
from distplan.profiles import device_kinds, list_presets, load_cluster


def test_catalogue_has_the_required_kinds() -> None:
    kinds = device_kinds()
    for name in (
        "h100-sxm-80g",
        "a100-sxm-80g",
        "a100-pcie-40g",
        "v100-sxm2-32g",
        "v100-pcie-16g",
        "t4-16g",
        "l4-24g",
        "rtx4090-24g",
        "mi300x-192g",
        "cpu-epyc-2core",
    ):
        assert name in kinds
    assert kinds["a100-sxm-80g"].flops("bf16") == pytest.approx(312e12)
    assert kinds["v100-sxm2-32g"].flops("bf16") == pytest.approx(15.7e12)  # no bf16 path: fp32 rate


@pytest.mark.parametrize("name", list_presets())
def test_presets_load_and_round_trip(name: str) -> None:
    c = load_cluster(name)
    assert c.num_devices == len(c.devices()) > 0
    assert Cluster.from_dict(c.to_dict()) == c


def test_mixed_64_is_64_devices_of_three_kinds() -> None:
    c = load_cluster("mixed-64")
    assert c.num_devices == 64
    assert set(c.kind_counts()) == {"h100-sxm-80g", "a100-sxm-80g", "v100-sxm2-32g"}
    assert c.link(0, 0).bandwidth_bytes_s == pytest.approx(450e9)
    assert c.link(0, 1).bandwidth_bytes_s == pytest.approx(100e9 / 8)


def test_malformed_profile_names_file_field_and_value(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(
        "name: bad\nhosts:\n  - name: a\n    devices: [{kind: a100-sxm-80g, count: 2}]\n"
        "    link: {bandwidth_gbyte_s: 300}\n  - name: b\n    devices: [{kind: t4-16g}]\n"
        "    link: {bandwidth_gbyte_s: 16}\nnetwork: {bandwidth_gbit_s: -5}\n"
    )
    with pytest.raises(
        ProfileError, match=r"bad.yaml: cluster.network.bandwidth_gbit_s: expected a positive number, got -5"
    ):
        load_cluster(f)
    f.write_text(
        "name: x\nhosts:\n  - name: a\n    devices: [{kind: b200, count: 2}]\n    link: {bandwidth_gbyte_s: 1}\n"
    )
    with pytest.raises(ProfileError, match=r"hosts\[0\].devices\[0\].kind: unknown device kind 'b200'"):
        load_cluster(f)
    f.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_cluster(f)
    with pytest.raises(ProfileError, match="unknown cluster preset 'nope'"):
        load_cluster("nope")


def test_inline_kind_and_empty_cluster() -> None:
    spec = {
        "name": "custom",
        "kinds": [
            {"name": "x1", "memory_gib": 8, "memory_bandwidth_gbyte_s": 100, "peak_tflops": {"fp32": 1}}
        ],
        "hosts": [{"name": "h", "devices": [{"kind": "x1", "count": 3}], "link": {"bandwidth_gbyte_s": 10}}],
    }
    c = load_cluster(spec)
    assert c.num_devices == 3 and c.kinds["x1"].memory_bytes == 8 * 2**30
    with pytest.raises(ProfileError, match="hosts: expected a list"):
        load_cluster({"name": "empty"} | {"hosts": None})
    with pytest.raises(ProfileError, match="memory_gib: expected a positive number, got 0"):
        load_cluster({**spec, "kinds": [{**spec["kinds"][0], "memory_gib": 0}]})
