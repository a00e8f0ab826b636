"""A smoke run of `python -m bench throughput` on tiny sets, so that the harness cannot rot.

Everything is real and end to end: generated crops and (reduced-size) photos, the benchmark
model, the spawned process for phases (a)-(c), the embedded Redis, a Celery worker process and
the SQLite ledger. Only the sizes are small; the numbers themselves mean nothing here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PHASES = ("notebook", "decode", "model", "model_layout", "emolabel")
SETS = {"crops-20": 20, "photos-3-800x600": 3}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("redis-server") is None, reason="redis-server is not installed"
    ),
]


@pytest.mark.timeout(1500)  # bounds a hang; a loaded machine once took 230 s
def test_the_harness_measures_all_four_figures_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "bench", "throughput",
        "--kind", "both", "--crops", "20", "--photos", "3", "--photo-size", "800x600",
        "--batch-size", "16", "--chunk-size", "8", "--notebook-images", "5",
        "--out", str(out), "--cache", str(tmp_path / "images"), "--timeout", "600",
        "--precision", "bfloat16", "--repeat", "2",
    ]  # fmt: skip
    environment = {
        **{name: value for name, value in os.environ.items() if not name.startswith("EMOLABEL_")},
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    done = subprocess.run(
        command,
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=1400,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = sorted(out.glob("throughput-*.json"))
    assert len(reports) == 1, done.stdout
    report = json.loads(reports[0].read_text())

    assert set(report["sets"]) == set(SETS)
    for name, images in SETS.items():
        phases = report["sets"][name]["phases"]
        for phase in PHASES:
            assert phases[phase]["images_per_s"] > 0, (name, phase, phases[phase])
        end_to_end = phases["emolabel"]
        assert end_to_end["labeled"] == images and end_to_end["failed"] == 0, end_to_end
        assert end_to_end["chunks"] == -(-images // 8)
        # Two rounds of (a)-(d); the table's figure is one of them, whole; the second round's
        # (d) relabeled every file (a forced rescan), not skipped them as already labeled.
        for phase in PHASES:
            rates = [repeat["images_per_s"] for repeat in phases[phase]["repeats"]]
            assert len(rates) == 2 and phases[phase]["images_per_s"] == min(rates), (phase, rates)
        assert len(report["sets"][name]["by_round"]) == 2
        assert end_to_end["relabel"] == (end_to_end["round"] == 2)
        # Where the machine's CPU went during (d): the parts cannot exceed what was busy.
        machine = end_to_end["machine_cpu_seconds"]
        assert machine["worker"] == end_to_end["worker_cpu_seconds"] > 0
        # /proc/stat counts in ticks (10 ms per CPU), per-process times more finely.
        assert machine["busy"] <= machine["cpu_seconds_available"] + 0.1
        assert machine["worker"] + machine["bench"] <= machine["busy"] + 0.1, machine
        # The pool processes' time outside tasks: their tasks fit in processes x the job's span.
        stages = end_to_end["worker_stages"]
        assert stages["outside_tasks_seconds"] >= -0.05, stages
        ratios = report["sets"][name]["ratios"]
        for key, denominator in (
            ("d_over_b", "decode"),
            ("d_over_c", "model"),
            ("d_over_c_layout", "model_layout"),
            ("d_over_a", "notebook"),
        ):
            expected = end_to_end["images_per_s"] / phases[denominator]["images_per_s"]
            # The harness rounds ratios to 3 decimals: a small one is off by up to 5e-4.
            assert ratios[key] == pytest.approx(expected, rel=1e-2, abs=5e-4), (name, key)
        memory = end_to_end["memory"]
        assert memory["main_vm_hwm_mib"] > 0 and memory["pool_vm_hwm_mib"], memory
        assert [point["percent"] for point in memory["checkpoints"]][-1] == 100
        assert phases["notebook"]["images"] == min(5, images)
        # (c') and (d) run in the layout the settings resolve to on this machine.
        worker = report["end_to_end"]["worker"]
        layout = phases["model_layout"]
        assert (layout["processes"], layout["threads"]) == (
            worker["concurrency"],
            worker["model_threads"],
        )
        assert len(memory["pool_vm_hwm_mib"]) == worker["concurrency"]
    # Each pool process sized its model threads from the pool it really runs in (its own log),
    # and serves the precision asked for: the setting reached the worker, not only (c).
    ready = report["end_to_end"]["warm_up"]["model_ready"]
    worker = report["end_to_end"]["worker"]
    assert [(process["model_threads"], process["precision"]) for process in ready] == [
        (worker["model_threads"], "bfloat16")
    ] * worker["concurrency"]
    assert report["runtime"]["model_precision"] == "bfloat16"

    # The worker is stopped while (a)-(c') run in each round, so it takes none of their CPU.
    paused = report["end_to_end"]["idle_worker_cpu_by_round"]
    assert len(paused) == 2 and all(row["worker_cpu_seconds"] <= 0.1 for row in paused), paused

    environment_report = report["environment"]
    for package in ("python", "numpy", "opencv", "keras", "tensorflow"):
        assert environment_report["versions"].get(package), package
    assert environment_report["cpu_count"] == os.cpu_count()
    # Figures from different hosts differ: the report names the CPU the numbers came from.
    assert environment_report["cpu_model"] and environment_report["cpu_model"] in done.stdout
    assert len(report["load_before"]) == 3 and len(report["load_after"]) == 3
    assert "(d)/(b)" in done.stdout and "wrote" in done.stdout
    # The run's home, Redis and database are gone; the generated sets stay cached.
    assert not list(out.glob("run-*"))
    assert (tmp_path / "images" / "crops-20.json").is_file()
