"""Train a tiny model on generated faces, then evaluate and predict with the saved artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.settings import LimitSettings
from tests.support.cli import run_cli
from tests.support.tiny_model import TINY
from training.dataset import read_manifest
from training.train import TrainOutcome, train_model

pytestmark = pytest.mark.slow


def test_artifact_is_complete_and_self_describing(
    tiny_model: TrainOutcome, sample_dir: Path
) -> None:
    directory = tiny_model.artifact_dir
    for name in [
        "model.keras",
        "metadata.json",
        "loss.png",
        "accuracy.png",
        "history.csv",
        "split_manifest.json",
        "test_evaluation.json",
        "test_confusion_matrix.json",
        "test_confusion_matrix.png",
        "test_classification_report.txt",
    ]:
        assert (directory / name).is_file(), name
    assert any((directory / "logs").rglob("*")), "TensorBoard logs"
    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["class_names"] == ["happy", "sad"]
    assert metadata["head"] == "sigmoid"
    assert metadata["input"] == {
        "height": 48,
        "width": 48,
        "color_mode": "rgb",
        "pixel_scale": 1.0,
        "pixel_offset": 0.0,
        "scaling_in_model": True,
    }
    assert metadata["training"]["seed"] == TINY.seed
    assert metadata["training"]["epochs_run"] >= 1
    assert len(metadata["dataset"]["fingerprint"]) == 64
    test = metadata["metrics"]["test"]
    assert 0.0 <= test["accuracy"] <= 1.0
    assert set(test["per_class"]) == {"happy", "sad"}
    assert sum(map(sum, test["confusion_matrix"]["matrix"])) == test["support"]
    assert "keras" in metadata["libraries"]
    split = read_manifest(directory / "split_manifest.json", sample_dir)
    assert test["support"] == len(split.test)
    assert not {e.sha256 for e in split.train} & {e.sha256 for e in split.test}
    assert not list(directory.parent.glob(".*.partial"))


def test_predict_and_evaluate_with_the_artifact(tiny_model: TrainOutcome, sample_dir: Path) -> None:
    images = sorted((sample_dir / "sad").iterdir())[:3]
    result = run_cli(
        ["predict", "--json", "--model", str(tiny_model.artifact_dir), *map(str, images)]
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["label"] in {"happy", "sad"}
        assert 0.5 <= row["confidence"] <= 1.0
        assert row["confidence"] == pytest.approx(max(row["scores"].values()), abs=1e-6)
        assert row["model_version"] == tiny_model.metadata.version
    evaluated = run_cli(["evaluate", str(tiny_model.artifact_dir), str(sample_dir)])
    assert evaluated.returncode == 0, evaluated.stderr
    assert "on 60 images" in evaluated.stdout
    assert (tiny_model.artifact_dir / "evaluation_confusion_matrix.png").is_file()


def test_predict_reports_a_bad_image_and_goes_on(
    tiny_model: TrainOutcome, tmp_path: Path, sample_dir: Path
) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    good = next((sample_dir / "happy").iterdir())
    result = run_cli(
        ["predict", "--json", "--model", str(tiny_model.artifact_dir), str(bad), str(good)]
    )
    assert result.returncode == 3
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["error"] == "not_an_image"
    assert rows[1]["label"] in {"happy", "sad"}


def test_training_survives_bad_files_and_lists_them(sample_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    (data / "happy" / "zero.jpg").write_bytes(b"")
    (data / "happy" / "notes.jpg").write_text("text, not a picture")
    original = next((data / "sad").glob("*.jpg")).read_bytes()
    (data / "sad" / "truncated.jpg").write_bytes(original[: len(original) // 3])
    (data / "sad" / "document.pdf").write_bytes(b"%PDF-1.4\n" + b"x" * 100)
    outcome = train_model(
        data, TINY.model_copy(update={"epochs": 1}), LimitSettings(), tmp_path / "m", "t",
        progress=lambda _: None,
    )  # fmt: skip
    listed = {finding.path.name: finding.reason.value for finding in outcome.findings}
    assert listed == {
        "zero.jpg": "empty",
        "notes.jpg": "not_an_image",
        "truncated.jpg": "corrupt",
        "document.pdf": "not_an_image",
    }
    metadata = outcome.metadata.dataset
    assert metadata["left_out"] == 4
    assert metadata["scanned_files"] == 64
    report = json.loads((outcome.artifact_dir / "data_report.json").read_text())
    assert len(report["findings"]) == 4
