"""Issue 18's sidecar acceptance through the real command line and a real worker: real photos
(scikit-image's) labeled by a face model, `emolabel xmp` writes sidecars, and exiftool reads the
keywords and the MWG face regions back. A sidecar that another tool wrote first (keywords, a
rating, a person's face region) keeps all of it through two relabels by two different models,
while ours reflect the last one only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.settings import ScanSettings, WorkerSettings
from tests.support.cli import cli, cli_scan
from tests.support.ledger import wait_for_job
from tests.support.photos import FER_CLASSES, import_fer, photo_file
from tests.support.workers import SettingsFactory, Workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXIFTOOL = shutil.which("exiftool")
FACE_WORKER = WorkerSettings(
    concurrency=1, decode_threads=2, batch_size=16, task_time_limit=240, visibility_timeout=300
)
# The second model: the same network with its classes renamed, so every label differs.
SHOUTED = FER_CLASSES.upper()


def read_tags(sidecar: Path) -> dict[str, Any]:
    done = subprocess.run(
        [EXIFTOOL or "exiftool", "-j", "-struct", "-G1", "-a", str(sidecar)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    (tags,) = json.loads(done.stdout)
    return dict(tags)


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


def regions(tags: dict[str, Any]) -> list[dict[str, Any]]:
    info = tags.get("XMP-mwg-rs:RegionInfo") or {}
    return as_list(info.get("RegionList"))


@pytest.mark.skipif(
    EXIFTOOL is None and os.environ.get("CI") != "true",  # in CI a missing exiftool fails
    reason="exiftool (Debian libimage-exiftool-perl) is not installed; scripts/setup installs it",
)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sidecars_carry_keywords_and_face_regions_and_keep_other_tools_data(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
) -> None:
    assert EXIFTOOL, "exiftool is not on PATH: scripts/setup installs libimage-exiftool-perl"
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut.png", "coffee.png"):
        shutil.copy(photo_file(name), photos / name)
    # Another tool's sidecar, written by exiftool before we ever label the photo.
    astronaut_xmp = photos / "astronaut.png.xmp"
    subprocess.run(
        [EXIFTOOL, "-q", "-o", str(astronaut_xmp), "-XMP-dc:Subject=Holiday",
         "-XMP-lr:HierarchicalSubject=Places|Rome", "-XMP-xmp:Rating=4",
         "-XMP-mwg-rs:RegionInfo={AppliedToDimensions={W=512,H=512,Unit=pixel},"
         "RegionList=[{Area={X=0.2,Y=0.2,W=0.1,H=0.1,Unit=normalized},Name=Anna,Type=Face}]}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip

    models = tmp_path / "models"
    env = {
        "EMOLABEL_MODELS_DIR": str(models),
        "EMOLABEL_MODEL_NAME": "fer",
        "EMOLABEL_HOME": str(tmp_path / "import-home"),
    }
    first_model = import_fer(tmp_path / "source", env)
    second_model = import_fer(tmp_path / "source", env, classes=SHOUTED)
    settings = make_settings(
        models_dir=models, model_name="fer", worker=FACE_WORKER, scan=ScanSettings(chunk_size=2)
    )
    workers.start(settings)

    def label_with(model: Path) -> int:
        cli(settings, "models", "promote", str(model))
        job_id = cli_scan(settings, str(photos))
        balance = wait_for_job(sessions, job_id, settings)
        assert balance.failed == 0 and balance.pending == 0
        return job_id

    # A dry run counts and writes nothing.
    first_job = label_with(first_model)
    before = astronaut_xmp.read_bytes()
    dry = cli(settings, "xmp", "--job", str(first_job), "--dry-run").stdout
    assert "would be created: 1, updated: 1" in dry, dry
    assert astronaut_xmp.read_bytes() == before and not (photos / "coffee.png.xmp").exists()

    done = cli(settings, "xmp", "--job", str(first_job)).stdout
    assert "created: 1, updated: 1, unchanged: 0, failed: 0" in done, done
    tags = read_tags(astronaut_xmp)
    assert {"Holiday", "happy"} <= set(as_list(tags["XMP-dc:Subject"]))
    assert {"Places|Rome", "emolabel|happy"} <= set(as_list(tags["XMP-lr:HierarchicalSubject"]))
    assert "emolabel/happy" in as_list(tags["XMP-digiKam:TagsList"])
    assert tags["XMP-xmp:Rating"] == 4
    found = regions(tags)
    assert [region.get("Name") for region in found].count("Anna") == 1
    (ours,) = [region for region in found if "Name" not in region]
    assert ours["Type"] == "Face" and ours["Description"].startswith("happy ")
    area = ours["Area"]
    assert area["Unit"] == "normalized" and 0 < area["W"] < 1 and 0 < area["H"] < 1
    # The astronaut's face is in the upper half of the photo, left of centre.
    assert 0.3 < area["X"] < 0.6 and 0.1 < area["Y"] < 0.5, area
    coffee = read_tags(photos / "coffee.png.xmp")
    assert as_list(coffee["XMP-lr:HierarchicalSubject"]) == ["emolabel|no face"]
    assert regions(coffee) == []

    # The same labels again: nothing to write.
    again = cli(settings, "xmp", "--job", str(first_job)).stdout
    assert "created: 0, updated: 0, unchanged: 2" in again, again

    # Relabeled by another model: ours follow it, everything else stays.
    second_job = label_with(second_model)
    cli(settings, "xmp", "--job", str(second_job))
    tags = read_tags(astronaut_xmp)
    subjects = set(as_list(tags["XMP-dc:Subject"]))
    assert "Holiday" in subjects and "HAPPY" in subjects and "happy" not in subjects
    hierarchical = set(as_list(tags["XMP-lr:HierarchicalSubject"]))
    assert hierarchical == {"Places|Rome", "emolabel|HAPPY"}
    assert tags["XMP-xmp:Rating"] == 4
    found = regions(tags)
    assert sorted(region.get("Name", "") for region in found) == ["", "Anna"]
    (ours,) = [region for region in found if "Name" not in region]
    assert ours["Description"].startswith("HAPPY ")
    assert tags["XMP-emolabel:ModelVersion"] == second_model.name
