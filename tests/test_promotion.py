"""Promotion is compare-and-set in the database, `emolabel train` registers its artifact, and a
queued retrain may only name a folder under the training roots.

The promote-during-a-retrain case calls the retraining's own steps in order (champion noted at
the start, a `models promote` made meanwhile, the gate's conclusion), so it never depends on
timing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import RetrainSettings
from db.models import ModelStatus, ModelVersion
from db.repository import active_model, promote_if_active, set_active_model
from tests.support.cli import run_cli
from training.gate import Decision
from training.registry import register_artifact, register_trained
from training.retrain import MAX_DATA_DIR, RefusedRetrain, conclude, queued_data_dir
from training.sample_data import generate_sample_data

CLASSES = ["happy", "sad"]


@pytest.fixture
def sessions(ledger_sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    return ledger_sessions


def artifact_folder(models_dir: Path, version: str) -> Path:
    """A real (tiny, untrained) artifact: registration checks the model file and its hashes."""
    import keras
    from keras import layers

    from training.artifacts import save_artifact
    from training.metadata import InputMetadata, ModelMetadata

    inputs = keras.Input(shape=(8, 8, 3), name="image")
    pooled = layers.GlobalAveragePooling2D()(layers.Rescaling(1.0 / 255)(inputs))
    model = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(pooled))
    metadata = ModelMetadata(
        name="faces",
        version=version,
        class_names=list(CLASSES),
        head="sigmoid",
        input=InputMetadata(height=8, width=8, color_mode="rgb", scaling_in_model=True),
        source="imported",
    )
    return save_artifact(model, metadata, models_dir / "faces" / version)


def statuses(sessions: sessionmaker[Session]) -> dict[str, ModelStatus]:
    with sessions() as session:
        return {row.version: row.status for row in session.scalars(select(ModelVersion))}


def test_a_promote_made_during_a_retrain_is_not_overwritten(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with sessions.begin() as session:
        register_artifact(
            session=session, directory=artifact_folder(tmp_path, "champion"), activate=True
        )
        register_artifact(
            session=session, directory=artifact_folder(tmp_path, "by-hand"), activate=False
        )
    # 1. The run starts and notes its champion.
    with sessions() as session:
        champion = active_model(session=session)
        assert champion is not None
        started_with = champion.version
    # 2. While it trains, an operator promotes another version.
    with sessions.begin() as session:
        set_active_model(session=session, version="by-hand")
    # 3. The gate says promote; the conclusion must leave the operator's choice standing.
    gate = Decision(True, "macro_f1 0.9 beats the champion's 0.5")
    with sessions.begin() as session:
        applied = conclude(
            session=session,
            challenger_dir=artifact_folder(tmp_path, "challenger"),
            challenger_version="challenger",
            champion_version=started_with,
            decision=gate,
        )
    assert not applied.promote
    assert "active model changed during this run (from champion to by-hand)" in applied.reason
    assert gate.reason in applied.reason
    assert statuses(sessions) == {
        "champion": ModelStatus.RETIRED,
        "by-hand": ModelStatus.ACTIVE,
        "challenger": ModelStatus.REJECTED,
    }


def test_a_retrain_with_an_unchanged_champion_promotes(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with sessions.begin() as session:
        register_artifact(
            session=session, directory=artifact_folder(tmp_path, "champion"), activate=True
        )
        applied = conclude(
            session=session,
            challenger_dir=artifact_folder(tmp_path, "challenger"),
            challenger_version="challenger",
            champion_version="champion",
            decision=Decision(True, "better"),
        )
    assert applied == Decision(True, "better")
    assert statuses(sessions) == {
        "champion": ModelStatus.RETIRED,
        "challenger": ModelStatus.ACTIVE,
    }


def test_compare_and_set_refuses_when_the_expected_champion_is_not_active(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with sessions.begin() as session:
        for version in ("a", "b", "c"):
            register_artifact(
                session=session, directory=artifact_folder(tmp_path, version), activate=False
            )
        # None expected: only while no model is active.
        assert promote_if_active(session=session, version="a", expected=None)
        assert not promote_if_active(session=session, version="b", expected=None)
        # A stale expectation changes nothing.
        assert not promote_if_active(session=session, version="c", expected="b")
        assert promote_if_active(session=session, version="b", expected="a")
    assert statuses(sessions) == {
        "a": ModelStatus.RETIRED,
        "b": ModelStatus.ACTIVE,
        "c": ModelStatus.CANDIDATE,
    }


def test_a_trained_model_is_the_champion_only_when_none_is_active(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with sessions.begin() as session:
        first, activated = register_trained(
            session=session, directory=artifact_folder(tmp_path, "first")
        )
        assert activated and first.version == "first"
        _, activated = register_trained(
            session=session, directory=artifact_folder(tmp_path, "second")
        )
        assert not activated
    assert statuses(sessions) == {"first": ModelStatus.ACTIVE, "second": ModelStatus.CANDIDATE}


# --- what a queued retrain may train on --------------------------------------------------------


def test_a_queued_data_dir_must_lie_under_the_training_roots(tmp_path: Path) -> None:
    root = tmp_path / "training"
    (root / "faces" / "happy").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "escape").symlink_to(elsewhere)
    (root / "a-file").write_text("not a folder")
    settings = RetrainSettings(allowed_roots=[root])

    assert queued_data_dir(None, settings) is None  # the configured data_dir
    assert queued_data_dir(str(root), settings) == root.resolve()
    assert queued_data_dir(str(root / "faces"), settings) == (root / "faces").resolve()
    refused = {
        "a number": 3,
        "a list": [str(root)],
        "empty": "",
        "too long": "/" + "a" * MAX_DATA_DIR,
        "NUL": f"{root}\x00/x",
        "relative": "training/faces",
        "dot-dot": f"{root}/faces/../../elsewhere",
        "dot-dot inside": f"{root}/faces/..",
        "outside": str(elsewhere),
        "a sibling with the root's prefix": f"{root}-other",
        "symlink out": str(root / "escape"),
        "not a folder": str(root / "a-file"),
        "root of the machine": "/",
    }
    for what, value in refused.items():
        with pytest.raises(RefusedRetrain):
            queued_data_dir(value, settings)
            pytest.fail(f"accepted {what}: {value!r}")


def test_the_training_roots_default_to_the_configured_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    settings = RetrainSettings(data_dir=data)
    assert queued_data_dir(str(data / "more"), settings) == (data / "more").resolve()
    with pytest.raises(RefusedRetrain, match="outside the training roots"):
        queued_data_dir(str(tmp_path), settings)
    with pytest.raises(RefusedRetrain, match="no training roots"):
        queued_data_dir(str(data), RetrainSettings())


# --- `emolabel train` then `emolabel retrain` --------------------------------------------------


@pytest.mark.slow
def test_train_then_retrain_compares_against_the_trained_model(tmp_path: Path) -> None:
    # A face model (trained on face crops, here the drawn sample faces): its challenger is one too.
    data = tmp_path / "faces"
    generate_sample_data(data, CLASSES, 12, seed=5, min_size=64, max_size=72)
    env = {
        "EMOLABEL_HOME": str(tmp_path / "home"),
        "EMOLABEL_MODELS_DIR": str(tmp_path / "models"),
        "EMOLABEL_MODEL_NAME": "faces",
        "EMOLABEL_TRAIN__EPOCHS": "1",
        "EMOLABEL_TRAIN__IMAGE_SIZE": "32",
        "EMOLABEL_TRAIN__BATCH_SIZE": "8",
        "EMOLABEL_RETRAIN__DATA_DIR": str(data),
    }
    trained = run_cli(["train", str(data), "--subject", "face"], env=env)
    assert trained.returncode == 0, trained.stderr
    match = re.search(r"registered (\S+): active", trained.stdout)
    assert match, trained.stdout
    version = match[1]

    retrained = run_cli(["retrain"], env=env)
    assert retrained.returncode == 0, retrained.stderr
    assert f"(champion {version})" in retrained.stdout, retrained.stdout
    assert "no champion to beat" not in retrained.stdout
    challenger = re.search(r"challenger (\S+) \(champion", retrained.stdout)
    assert challenger, retrained.stdout
    metadata = tmp_path / "models" / "faces" / challenger[1] / "metadata.json"
    assert json.loads(metadata.read_text())["subject"] == "face"
