"""codecarbon's start without py-cpuinfo's one-second CPU probe (vltrain.energy.cpu_brand_from_proc;
issue 29 point 3: 1.3 s of a 2-node slurm-local run's time to first step)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from vltrain import energy

INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n"


def test_the_brand_is_the_model_name_line():
    assert energy.proc_cpu_brand(INTEL) == "Intel(R) Xeon(R) Platinum 8480+"
    assert energy.proc_cpu_brand(ARM) is None
    assert energy.proc_cpu_brand("model name\t: \n") is None


def test_without_a_model_name_py_cpuinfo_is_asked_as_before(tmp_path):
    import cpuinfo

    (tmp_path / "cpuinfo").write_text(ARM)
    probe = cpuinfo.get_cpu_info
    with energy.cpu_brand_from_proc(tmp_path / "cpuinfo"):
        assert cpuinfo.get_cpu_info is probe
    with energy.cpu_brand_from_proc(tmp_path / "missing"):
        assert cpuinfo.get_cpu_info is probe


@pytest.mark.slow
def test_the_node_tracker_starts_without_probing_the_cpu(tmp_path, monkeypatch):
    """A real offline tracker started and stopped: py-cpuinfo's probe is never run, codecarbon records
    the kernel's brand string as the CPU model, and the probe is py-cpuinfo's own again afterwards."""
    import cpuinfo
    from codecarbon.core.util import detect_cpu_model

    brand = energy.proc_cpu_brand(Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").exists() else None
    if brand is None:
        pytest.skip("no model name in /proc/cpuinfo here")
    probed = []
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: probed.append(1) or {"brand_raw": "probed"})
    detect_cpu_model.cache_clear()  # codecarbon caches the answer per process
    try:
        ne = energy.NodeEnergy(tmp_path, local_rank=0, node_rank=0, country="FRA", flush_every_s=60.0, tag="t")
        ne.start()
        ne.stop()
        assert probed == []
        assert cpuinfo.get_cpu_info() == {"brand_raw": "probed"}  # restored: the test's stand-in again
        with ne.path.open() as f:
            rows = list(csv.DictReader(f))
        assert rows and rows[-1]["cpu_model"] == brand
    finally:
        detect_cpu_model.cache_clear()
