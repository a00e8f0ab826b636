"""Retraining through real workers: the gate promotes a challenger over a champion that is wrong
by construction, a running worker switches to it at its next chunk, the gate rejects any
challenger against a champion that is right by construction, a retrain message naming a folder
outside the training roots is refused, and `models rollback` restores the previous version.

The champions' predictions are fixed by their weights, not learned, so every gate decision here
is certain on any machine and seed: the data is bright "happy" and dark "sad" images, the
"inverted" champion calls bright images sad and dark ones happy (recall 0 for every class, macro
F1 0: any challenger with a single right answer beats it, and no recall can fall), and the
"perfect" champion calls them right (macro F1 1: nothing can beat it).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from core.names import RETRAIN, retrain_queue
from core.settings import Settings, TrainSettings
from db.models import ModelStatus, ModelVersion, Result, RetrainRun
from db.repository import active_model
from db.session import make_engine, make_sessionmaker, upgrade
from emolabel.embedded import ensure_redis, start_local_worker
from tests.support.brightness import CLASSES, bright_and_dark, brightness_model
from tests.support.cli import run_cli
from tests.support.services import wait_for
from training.registry import register_artifact
from training.sample_data import generate_sample_data
from worker.celery_app import make_celery

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# The challengers' quality does not matter (the champions decide every gate): train briefly.
TRAIN = TrainSettings(epochs=2, batch_size=16, image_size=64, patience=2, seed=3)


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
    data = bright_and_dark(tmp_path / "training" / "faces", 30, seed=11)
    shuffled = shuffled_copy(data, tmp_path / "training" / "shuffled", seed=1)
    settings = Settings(
        home=home / "state",
        models_dir=home / "models",
        model_name="faces",
        train=TRAIN,
        retrain={
            "data_dir": data,
            "allowed_roots": [tmp_path / "training"],
            "margin": 0.0,
            "max_recall_drop": 0.2,
        },
        queue=f"rt-{home.name}",
    )
    settings.home.mkdir(parents=True)
    upgrade(settings.effective_database_url)
    sessions = make_sessionmaker(make_engine(settings.effective_database_url))
    inverted = brightness_model(settings, "0-inverted", inverted=True)
    perfect = brightness_model(settings, "0-perfect", inverted=False)
    with sessions.begin() as session:
        weak = register_artifact(session=session, directory=inverted, activate=True).version

    broker = ensure_redis(settings)
    request.addfinalizer(lambda: broker.stop())
    app = make_celery(settings)
    archive = tmp_path / "archive"
    generate_sample_data(archive / "a", CLASSES, 4, seed=21, min_size=64, max_size=80)
    with start_local_worker(settings, extra_env={"EMOLABEL_WORKER__CONCURRENCY": "1"}) as worker:
        # A worker that only labels: the retrain queue is consumed by a second, dedicated one.
        env = {"EMOLABEL_HOME": str(settings.home), "EMOLABEL_MODELS_DIR": str(settings.models_dir),
               "EMOLABEL_MODEL_NAME": "faces", "EMOLABEL_QUEUE": settings.queue}  # fmt: skip
        first = run_cli(["scan", str(archive / "a")], env=env)
        assert first.returncode == 0, first.stderr
        wait_for(lambda: results_by(sessions, weak) == 8, timeout=120, interval=0.5)

        # 1. Any challenger beats the inverted champion, through a real retrain worker.
        app.send_task(RETRAIN, queue=retrain_queue(settings))
        retrainer = start_local_worker(
            settings.model_copy(update={"queue": retrain_queue(settings)}), name="retrain"
        )
        with retrainer:
            wait_for(lambda: runs(sessions) >= 1, timeout=600, interval=0.5)
            promoted_run = latest_run(sessions)
            assert promoted_run.decision == "promoted", promoted_run.reason
            assert promoted_run.champion_version == weak
            better = promoted_run.challenger_version
            with sessions() as session:
                assert active_model(session=session).version == better

            # 2. The running labeling worker picks the promoted model for its next chunk.
            generate_sample_data(archive / "b", CLASSES, 4, seed=22, min_size=64, max_size=80)
            second = run_cli(["scan", str(archive / "b")], env=env)
            assert second.returncode == 0, second.stderr
            wait_for(lambda: results_by(sessions, better) == 8, timeout=120, interval=0.5)
            assert worker.process.poll() is None, "the worker was not restarted"

            # 3. A message naming a folder outside the training roots trains nothing.
            app.send_task(
                RETRAIN,
                kwargs={"data_dir": f"{tmp_path}/training/../archive"},
                queue=retrain_queue(settings),
            )
            wait_for(lambda: runs(sessions) >= 2, timeout=120, interval=0.5)
            refused_run = latest_run(sessions)
            assert refused_run.decision == "failed"
            assert refused_run.reason.startswith("refused: "), refused_run.reason
            assert refused_run.challenger_version is None

            # 4. Against the perfect champion, promoted by hand, any challenger is rejected.
            promoted = run_cli(["models", "promote", str(perfect)], env=env)
            assert promoted.returncode == 0, promoted.stderr
            app.send_task(
                RETRAIN, kwargs={"data_dir": str(shuffled)}, queue=retrain_queue(settings)
            )
            wait_for(lambda: runs(sessions) >= 3, timeout=600, interval=0.5)
        rejected_run = latest_run(sessions)
        assert rejected_run.decision == "rejected", rejected_run.reason
        assert rejected_run.champion_version == "0-perfect"
        assert "does not beat the champion's 1.0000" in rejected_run.reason
        with sessions() as session:
            assert active_model(session=session).version == "0-perfect"
            status = session.get(ModelVersion, rejected_run.challenger_version).status
            assert status == ModelStatus.REJECTED

        # 5. Rollback restores the previous version.
        rolled = run_cli(["models", "rollback"], env=env)
        assert rolled.returncode == 0, rolled.stderr
        with sessions() as session:
            assert active_model(session=session).version == better
        listing = run_cli(["models", "list", "--json"], env=env)
        statuses = {
            row["version"]: row["status"] for row in map(json.loads, listing.stdout.splitlines())
        }
        assert statuses == {
            weak: "retired",
            better: "active",
            "0-perfect": "retired",
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
