"""The retraining half of the review loop: a run trains on people's labels and scores its
reviewed holdout, measures label churn on an archive sample and holds a promotion that churns
too much; `models diff` matches a comparison of two exports.

Nothing here rests on a training run's luck: the champion and the fixed challenger are
brightness models (`tests.support.brightness`) that disagree on every image by construction, and
the run that really trains is checked only for what it used and recorded, not for its quality.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import FaceSettings, LimitSettings, Settings, TrainSettings
from core.uris import path_to_uri, uri_to_path
from db import repository
from db.models import ModelStatus, ModelVersion, RetrainDecision, RetrainRun
from db.repository import ImageRow, JobItemRow, ResultRow, ReviewInput
from db.session import make_engine, make_sessionmaker, upgrade
from tests.support.brightness import bright_and_dark, brightness_model
from tests.support.cli import cli
from training.artifacts import load_artifact
from training.churn_sample import Labeler, archive_churn
from training.evaluate import evaluate_files
from training.faces import Face
from training.metadata import Subject
from training.registry import register_artifact
from training.retrain import run_retrain
from training.reviewed import ReviewedSplit
from training.train import TrainOutcome, prepare_data

TRAIN = TrainSettings(epochs=1, batch_size=16, image_size=32, patience=1, seed=3, augment=False)
SCORES = {"happy": 0.5, "sad": 0.5}


def settings_for(tmp_path: Path, data: Path, **retrain: object) -> Settings:
    return Settings(
        home=tmp_path / "home",
        models_dir=tmp_path / "models",
        model_name="faces",
        train=TRAIN,
        retrain={"data_dir": data, "churn_sample": 10, **retrain},
    )


def archive_labeled_by(
    sessions: sessionmaker[Session], root: Path, version: str, label: Callable[[Path], str]
) -> dict[str, int]:
    """Record a job over every file under `root` with `version`'s label for each: uri -> id."""
    files = sorted(path for path in root.rglob("*.png"))
    with sessions.begin() as session:
        ids = repository.upsert_images(
            session=session,
            rows=[ImageRow(uri=path_to_uri(path), fingerprint="1-1") for path in files],
        )
        job_id = repository.create_job(
            session=session, source=path_to_uri(root), model_version=version
        )
        repository.add_job_items(
            session=session,
            job_id=job_id,
            items=[JobItemRow(image_id, chunk_index=0) for image_id in ids.values()],
        )
        repository.record_outcomes(
            session=session,
            job_id=job_id,
            results=[
                ResultRow(ids[path_to_uri(path)], version, label(path), 0.9, SCORES)
                for path in files
            ],
            failures=[],
            chunk_index=0,
        )
    return dict(ids)


def true_class(path: Path) -> str:
    return path.parent.name


def wrong_class(path: Path) -> str:
    return "sad" if path.parent.name == "happy" else "happy"


def champion(settings: Settings, sessions: sessionmaker[Session]) -> str:
    """The inverted brightness model, registered active: wrong on every image."""
    folder = brightness_model(settings, "0-inverted", inverted=True)
    with sessions.begin() as session:
        return register_artifact(session=session, directory=folder, activate=True).version


def latest_run(sessions: sessionmaker[Session]) -> RetrainRun:
    with sessions() as session:
        run = session.scalars(select(RetrainRun).order_by(RetrainRun.id.desc())).first()
        assert run is not None
        return run


@pytest.mark.slow
def test_a_retraining_run_trains_on_reviews_and_scores_their_holdout(tmp_path: Path) -> None:
    data = bright_and_dark(tmp_path / "data", 15, seed=1)
    archive = bright_and_dark(tmp_path / "archive", 20, seed=2)
    settings = settings_for(tmp_path, data, allowed_roots=[tmp_path / "data"])
    settings.home.mkdir(parents=True)
    upgrade(settings.effective_database_url)
    sessions = make_sessionmaker(make_engine(settings.effective_database_url))
    weak = champion(settings, sessions)
    ids = archive_labeled_by(sessions, archive, weak, wrong_class)
    # A person corrects every label of the archive; one file changes after its review.
    with sessions.begin() as session:
        repository.record_reviews(
            session=session,
            reviews=[
                ReviewInput(image_id, weak, true_class(Path(uri_to_path(uri).decode())), "ann")
                for uri, image_id in ids.items()
            ],
        )
        repository.upsert_images(session=session, rows=[ImageRow(uri=min(ids), fingerprint="2")])

    report = run_retrain(settings, sessions)

    run = latest_run(sessions)
    assert run.reviewed_items == report.reviewed_items == 39  # 40 reviews, one stale
    reviewed = run.metrics["reviewed"]
    assert reviewed["skipped"] == {"stale": 1}
    assert reviewed["train"] + reviewed["validation"] + reviewed["holdout"] == 39
    holdout = run.metrics["reviewed_holdout"]
    assert holdout["items"] == reviewed["holdout"] > 0
    assert holdout["champion"]["accuracy"] == 0.0  # the inverted champion is wrong on each
    assert "accuracy" in holdout["challenger"]
    # The frozen test split holds only the data folder's images, never a reviewed one.
    frozen = json.loads((settings.models_dir / "faces" / "frozen_test" / "frozen_test.json")
                        .read_text())  # fmt: skip
    assert all(str(data) in row["source"] for row in frozen["items"])
    # The challenger's artifact says which reviews it took; the scratch files are gone.
    manifest = json.loads(
        (settings.models_dir / "faces" / run.challenger_version / "reviewed_manifest.json")
        .read_text()
    )  # fmt: skip
    assert len(manifest["train"]) + len(manifest["validation"]) == 39 - holdout["items"]
    assert not list((settings.models_dir / "faces").glob(".reviewed-*"))
    assert run.churn["sample"] + run.churn["left_out"] == 10
    assert run.decision in (RetrainDecision.PROMOTED, RetrainDecision.REJECTED)


def fixed_challenger(settings: Settings) -> Callable[..., TrainOutcome]:
    """A trainer whose challenger is the right brightness model, scored on the real split."""

    def train(
        data_dir: Path,
        train: TrainSettings,
        limits: LimitSettings,
        models_dir: Path,
        name: str,
        progress: Callable[[str], None] = print,
        frozen_test_dir: Path | None = None,
        subject: Subject = "image",
        reviewed: ReviewedSplit | None = None,
    ) -> TrainOutcome:
        data = prepare_data(data_dir, train, limits, progress, frozen_test_dir)
        folder = brightness_model(settings, "1-right", inverted=False)
        artifact = load_artifact(folder, models_dir, name)
        test = data.split.test
        evaluation = evaluate_files(
            artifact, [e.path for e in test], [e.label for e in test], limits
        )
        return TrainOutcome(folder, artifact.metadata, evaluation, [], data.split, 0.0)

    return train


def test_a_promotion_that_changes_too_many_labels_is_held(
    ledger_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    data = bright_and_dark(tmp_path / "data", 10, seed=1)
    archive = bright_and_dark(tmp_path / "archive", 10, seed=2)
    settings = settings_for(tmp_path, data, max_churn=0.0, use_reviews=False)
    weak = champion(settings, ledger_sessions)
    archive_labeled_by(ledger_sessions, archive, weak, wrong_class)

    report = run_retrain(settings, ledger_sessions, trainer=fixed_challenger(settings))

    assert report.decision == "held", report.reason
    run = latest_run(ledger_sessions)
    assert run.decision == RetrainDecision.HELD
    assert "10 of 10 sampled archive labels would change (100.0%)" in run.reason
    assert "emolabel models promote 1-right" in run.reason
    assert "beats the champion's 0.0000" in run.reason  # what the gate said
    # Every sampled label flips, from the champion's (wrong) class to the right one.
    churn = run.churn
    assert (churn["sample"], churn["changed"], churn["rate"]) == (10, 10, 1.0)
    assert sum(churn["table"]["happy"].values()) + sum(churn["table"]["sad"].values()) == 10
    assert set(churn["table"]["happy"]) <= {"sad"} and set(churn["table"]["sad"]) <= {"happy"}
    assert len(churn["changed_images"]) == 10
    with ledger_sessions() as session:
        statuses = {row.version: row.status for row in session.scalars(select(ModelVersion))}
    assert statuses == {weak: ModelStatus.ACTIVE, "1-right": ModelStatus.CANDIDATE}


def export_labels(settings: Settings, version: str, *options: str) -> dict[str, str]:
    done = cli(settings, "export", "--model-version", version, *options)
    return {row["uri"]: row["label"] for row in csv.DictReader(io.StringIO(done.stdout))}


def test_models_diff_matches_a_comparison_of_two_exports(tmp_path: Path) -> None:
    data = tmp_path / "data"
    archive = bright_and_dark(tmp_path / "archive", 6, seed=2)
    more = bright_and_dark(tmp_path / "more", 3, seed=3)
    settings = settings_for(tmp_path, data)
    settings.home.mkdir(parents=True)
    upgrade(settings.effective_database_url)
    sessions = make_sessionmaker(make_engine(settings.effective_database_url))

    def mixed(path: Path) -> str:  # right on even-numbered files, wrong on the others
        return true_class(path) if int(path.stem[-1]) % 2 == 0 else wrong_class(path)

    archive_labeled_by(sessions, archive, "A", true_class)
    archive_labeled_by(sessions, archive, "B", mixed)
    archive_labeled_by(sessions, more, "A", true_class)  # job 3: only A labeled these
    archive_labeled_by(sessions, more, "B", wrong_class)  # job 4
    with sessions.begin() as session:
        repository.record_retrain_run(
            session=session,
            started_at=dt.datetime.now(dt.UTC),
            decision=RetrainDecision.HELD,
            champion_version="A",
            challenger_version="B",
            churn={"sample": 5, "changed": 2, "rate": 0.4, "table": {}},
        )

    before, after = export_labels(settings, "A"), export_labels(settings, "B")
    both = sorted(set(before) & set(after))
    expected = Counter((before[uri], after[uri]) for uri in both)
    done = cli(settings, "models", "diff", "A", "B", "--json")
    report = json.loads(done.stdout)
    table = Counter(
        {(old, new): count for old, row in report["table"].items() for new, count in row.items()}
    )
    assert table == expected
    assert report["compared"] == len(both) == 18
    assert report["changed"] == sum(1 for uri in both if before[uri] != after[uri])
    assert len(report["changed_images"]) == report["changed"]
    assert report["retrain_sample"]["changed"] == 2

    # --job: only that job's images (job 4 is B's labeling of the "more" folder).
    job_before = export_labels(settings, "A", "--job", "4")
    job_after = export_labels(settings, "B", "--job", "4")
    job_report = json.loads(cli(settings, "models", "diff", "A", "B", "--job", "4",
                                "--json").stdout)  # fmt: skip
    assert job_report["compared"] == len(set(job_before) & set(job_after)) == 6
    assert job_report["changed"] == 6

    shown = " ".join(cli(settings, "models", "diff", "A", "B").stdout.split())  # unwrapped
    assert f"compared 18 images, {report['changed']} changed" in shown
    assert "retrain run 1" in shown and "2 of 5 changed (40.0%)" in shown


class CentreDetector:
    """Finds one face in the middle of any photo that is not a single flat colour."""

    def detect(self, rgb: NDArray[np.uint8]) -> list[Face]:
        if int(rgb.std()) == 0:
            return []
        height, width = rgb.shape[:2]
        return [Face((width / 4, height / 4, width / 2, height / 2), 0.99)]


def test_face_models_churn_on_photo_labels_and_no_face_counts_as_a_label(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, tmp_path / "data")
    photos = bright_and_dark(tmp_path / "archive", 3, seed=4)
    files = sorted(photos.rglob("*.png"))
    flat = np.full((80, 80, 3), 128, np.uint8)
    contents = [path.read_bytes() for path in files] + [encoded_png(flat), b"not an image"]
    labelers = [
        Labeler(
            load_artifact(
                brightness_model(settings, version, inverted=inverted, subject="face"),
                settings.models_dir,
                "faces",
            ),
            LimitSettings(),
            FaceSettings(),
            CentreDetector(),
        )
        for version, inverted in (("0-inverted", True), ("1-right", False))
    ]
    churn = archive_churn(*labelers, enumerate(contents, start=1))
    # Every face's label flips; the flat photo is no_face for both; the junk is left out.
    assert (churn.sample, churn.changed, churn.left_out) == (7, 6, 1)
    assert churn.table == {"happy": {"sad": 3}, "sad": {"happy": 3}, "no_face": {"no_face": 1}}
    assert churn.changed_images == [1, 2, 3, 4, 5, 6]


def encoded_png(rgb: NDArray[np.uint8]) -> bytes:
    ok, buffer = cv2.imencode(".png", rgb)
    assert ok
    return bytes(buffer)
