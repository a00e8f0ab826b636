"""A calibrated model's doubtful labels, end to end on SQLite and PostgreSQL: a real worker stores
them as `uncertain` (with their runner-up), `status` and `export` count them apart, and
`scan --where uncertain` sends exactly those images again.

The model is the tiny model with thresholds placed by hand in the middle of a gap between its
own confidences on the archive, so which images are uncertain is known before the worker runs
and does not rest on how well a training run went.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import LimitSettings
from core.uris import path_to_uri
from db.models import Result
from tests.support.archives import generate_images
from tests.support.cli import cli, cli_scan
from tests.support.ledger import assert_balanced, ledger, wait_for_job
from tests.support.workers import SettingsFactory, Workers
from training.artifacts import load_artifact
from training.inference import predict_scores
from training.metadata import Calibration, new_version, write_metadata
from training.preprocess import load_image_file
from training.train import TrainOutcome

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = 32


def gap_threshold(confidences: list[float]) -> float:
    """A threshold in the middle of the widest gap between two confidences (images on both
    sides), so that a last-digit difference between two ways of predicting cannot move an image
    across it, whatever spread of confidences this machine's tiny model has."""
    ordered = sorted(confidences)
    low = max(range(len(ordered) - 1), key=lambda index: ordered[index + 1] - ordered[index])
    assert ordered[low + 1] - ordered[low] > 1e-3, ordered
    return (ordered[low] + ordered[low + 1]) / 2


def test_uncertain_labels_are_stored_counted_exported_and_sent_again(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tiny_model: TrainOutcome,
    tmp_path: Path,
) -> None:
    paths = generate_images(tmp_path / "archive", IMAGES)
    models = tmp_path / "models"
    source = tiny_model.artifact_dir
    raw = load_artifact(source, source.parent.parent, source.parent.name)
    images = np.stack([load_image_file(path, raw.spec, LimitSettings()) for path in paths])
    scores = predict_scores(raw, images, calibrated=False)
    threshold = gap_threshold(scores.max(axis=1).tolist())
    # Temperature 1 leaves the scores as they are; only the thresholds decide.
    version = new_version()
    weak = models / "weak" / version
    shutil.copytree(source, weak)
    write_metadata(
        weak,
        raw.metadata.model_copy(
            update={
                "name": "weak",
                "version": version,
                "calibration": Calibration(
                    temperature=1.0,
                    fitted_on="hand-placed thresholds (test)",
                    samples=IMAGES,
                    target_precision=0.95,
                    thresholds=dict.fromkeys(raw.metadata.class_names, threshold),
                    ece_before=0.0,
                    ece_after=0.0,
                ),
            }
        ),
    )
    doubtful = {
        path_to_uri(path)
        for path, row in zip(paths, scores, strict=True)
        if float(row.max()) < threshold
    }
    assert 0 < len(doubtful) < IMAGES

    settings = make_settings(models_dir=models, model_name="weak")
    workers.start(settings)
    job_id = cli_scan(settings, str(tmp_path / "archive"))
    balance = wait_for_job(sessions, job_id, settings)
    assert_balanced(balance)
    assert (balance.uncertain, balance.labeled) == (len(doubtful), IMAGES - len(doubtful))
    states = {uri: row.state for uri, row in ledger(sessions, job_id).items()}
    assert {uri for uri, state in states.items() if state == "uncertain"} == doubtful
    with sessions() as session:
        stored = session.execute(select(Result.uncertain, Result.label, Result.runner_up)).all()
    assert sum(row.uncertain for row in stored) == len(doubtful)
    # The runner-up is kept beside the label: the other class of a two-class model.
    assert all({row.label, row.runner_up} == {"happy", "sad"} for row in stored)

    status = cli(settings, "status", str(job_id)).stdout
    assert "uncertain" in status
    exported = [
        json.loads(line)
        for line in cli(settings, "export", "--job", str(job_id), "--format", "jsonl")
        .stdout.strip()
        .splitlines()
    ]
    assert len(exported) == IMAGES
    outcomes = {row["uri"]: row["outcome"] for row in exported}
    assert {uri for uri, outcome in outcomes.items() if outcome == "uncertain"} == doubtful
    assert all(row["runner_up"] in {"happy", "sad"} for row in exported)

    # `--where uncertain` sends exactly the doubtful images again, even to the same model.
    again = cli_scan(settings, str(tmp_path / "archive"), "--where", "uncertain")
    rescanned = wait_for_job(sessions, again, settings)
    assert_balanced(rescanned)
    rows = ledger(sessions, again)
    sent = {uri for uri, row in rows.items() if row.reason != "not_selected"}
    assert sent == doubtful
    assert rescanned.uncertain == len(doubtful) and rescanned.labeled == 0
