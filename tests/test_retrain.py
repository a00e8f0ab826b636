"""Retraining through a real worker: the gate rejects a shuffled-label challenger, promotes a
better one, `models rollback` restores the previous version, and a running worker switches to a
promoted model at its next chunk."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import ModelStatus, ModelVersion, Result, RetrainRun
from db.repository import active_model
from db.session import make_engine, make_sessionmaker, upgrade
from emolabel.embedded import ensure_redis, start_local_worker
from emolabel.registry import register_artifact
from emolabel.settings import Settings, TrainSettings
from tests.conftest import run_cli
from tests.services import wait_for
from training.sample_data import generate_sample_data
from training.train import train_model
from worker.celery_app import RETRAIN, make_celery, retrain_queue

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TRAIN = TrainSettings(epochs=20, batch_size=16, image_size=64, patience=20, seed=3)


def shuffled_copy(source: Path, target: Path, seed: int) -> Path:
    """The same images with their class folders shuffled: labels carry no signal."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    rng = random.Random(seed)
    for file in files:
        destination = target / rng.choice(classes)
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, destination / file.name)
    return target


@pytest.fixture()
def home() -> Iterator[Path]:
    # Short: the embedded Redis socket path must stay under 104 bytes.
    folder = Path(tempfile.mkdtemp(prefix="emo-rt-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_gate_rollback_and_hot_swap(
    home: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data = tmp_path / "faces"
    generate_sample_data(data, ["happy", "sad"], 60, seed=11, min_size=64, max_size=96)
    shuffled = shuffled_copy(data, tmp_path / "shuffled", seed=1)
    settings = Settings(
        home=home / "state",
        models_dir=home / "models",
        model_name="faces",
        train=TRAIN,
        retrain={"data_dir": data, "margin": 0.0, "max_recall_drop": 0.2},
        queue=f"rt-{home.name}",
    )
    settings.home.mkdir(parents=True)
    upgrade(settings.effective_database_url)
    sessions = make_sessionmaker(make_engine(settings.effective_database_url))
    # The first champion learned from shuffled labels: any real challenger should beat it.
    weak = train_model(shuffled, TRAIN.model_copy(update={"epochs": 2}), settings.limits,
                       settings.models_dir, "faces", progress=lambda _: None)  # fmt: skip
    with sessions.begin() as session:
        register_artifact(session=session, directory=weak.artifact_dir, activate=True)

    broker = ensure_redis(settings)
    request.addfinalizer(lambda: broker.stop())
    app = make_celery(settings)
    archive = tmp_path / "archive"
    generate_sample_data(archive / "a", ["happy", "sad"], 4, seed=21, min_size=64, max_size=80)
    with start_local_worker(settings, extra_env={"EMOLABEL_WORKER__CONCURRENCY": "1"}) as worker:
        # A worker that only labels: the retrain queue is consumed by a second, dedicated one.
        env = {"EMOLABEL_HOME": str(settings.home), "EMOLABEL_MODELS_DIR": str(settings.models_dir),
               "EMOLABEL_MODEL_NAME": "faces", "EMOLABEL_QUEUE": settings.queue}  # fmt: skip
        first = run_cli(["scan", str(archive / "a")], env=env)
        assert first.returncode == 0, first.stderr
        wait_for(
            lambda: results_by(sessions, weak.metadata.version) == 8, timeout=120, interval=0.5
        )

        # 1. A better challenger, through a real worker consuming the retrain queue.
        sent = app.send_task(RETRAIN, queue=retrain_queue(settings))
        retrainer = start_local_worker(
            settings.model_copy(update={"queue": retrain_queue(settings)}), name="retrain"
        )
        with retrainer:
            wait_for(lambda: runs(sessions) >= 1, timeout=600, interval=0.5)
            promoted_run = latest_run(sessions)
            assert promoted_run.decision == "promoted", promoted_run.reason
            assert promoted_run.champion_version == weak.metadata.version
            better = promoted_run.challenger_version
            with sessions() as session:
                assert active_model(session=session).version == better

            # 2. A challenger trained on shuffled labels is rejected, with the reason recorded.
            app.send_task(
                RETRAIN, kwargs={"data_dir": str(shuffled)}, queue=retrain_queue(settings)
            )
            wait_for(lambda: runs(sessions) >= 2, timeout=600, interval=0.5)
        rejected_run = latest_run(sessions)
        assert rejected_run.decision == "rejected"
        assert "does not beat" in rejected_run.reason or "recall" in rejected_run.reason
        with sessions() as session:
            assert active_model(session=session).version == better
            status = session.get(ModelVersion, rejected_run.challenger_version).status
            assert status == ModelStatus.REJECTED
        assert sent.id

        # 3. The running labeling worker picks the promoted model for its next chunk.
        generate_sample_data(archive / "b", ["happy", "sad"], 4, seed=22, min_size=64, max_size=80)
        second = run_cli(["scan", str(archive / "b")], env=env)
        assert second.returncode == 0, second.stderr
        wait_for(lambda: results_by(sessions, better) == 8, timeout=120, interval=0.5)
        assert worker.process.poll() is None, "the worker was not restarted"

        # 4. Rollback restores the previous version.
        rolled = run_cli(["models", "rollback"], env=env)
        assert rolled.returncode == 0, rolled.stderr
        with sessions() as session:
            assert active_model(session=session).version == weak.metadata.version
        listing = run_cli(["models", "list", "--json"], env=env)
        statuses = {
            row["version"]: row["status"] for row in map(json.loads, listing.stdout.splitlines())
        }
        assert statuses == {
            weak.metadata.version: "active",
            better: "retired",
            rejected_run.challenger_version: "rejected",
        }


def results_by(sessions, version: str) -> int:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return len(session.scalars(select(Result).where(Result.model_version == version)).all())


def runs(sessions) -> int:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return len(session.scalars(select(RetrainRun)).all())


def latest_run(sessions) -> RetrainRun:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return session.scalars(select(RetrainRun).order_by(RetrainRun.id.desc())).first()
