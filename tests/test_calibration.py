"""Calibration: temperature scaling lowers the expected calibration error on real data without
changing a single predicted label; per-class thresholds keep the target precision on the set
they were fitted on; a model says `uncertain` only when it has thresholds."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from pydantic import ValidationError
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from core.settings import LimitSettings
from tests.support.cli import run_cli
from tests.support.tiny_model import TINY
from training.artifacts import load_artifact
from training.calibration import (
    apply_temperature,
    class_thresholds,
    ece_noise_floor,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    is_uncertain,
    reliability,
)
from training.evaluate import load_labeled_images
from training.inference import predict_scores, to_predictions
from training.metadata import Calibration, InputMetadata, ModelMetadata
from training.train import TrainOutcome, train_model

DIGITS = [str(digit) for digit in range(10)]


def digits_scores() -> tuple[NDArray[np.float64], ...]:
    """Real handwritten digits, a deliberately over-confident classifier (no regularisation,
    trained on a small part), its class probabilities on a validation and a test part."""
    images, labels = load_digits(return_X_y=True)
    rest_x, test_x, rest_y, test_y = train_test_split(
        images / 16.0, labels, test_size=0.3, random_state=0, stratify=labels
    )
    train_x, val_x, train_y, val_y = train_test_split(
        rest_x, rest_y, test_size=0.5, random_state=0, stratify=rest_y
    )
    model = LogisticRegression(C=1e4, max_iter=5000).fit(train_x[:300], train_y[:300])
    return model.predict_proba(val_x), val_y, model.predict_proba(test_x), test_y


def test_temperature_lowers_the_error_on_real_digits_and_keeps_every_label() -> None:
    val_scores, val_labels, test_scores, test_labels = digits_scores()
    calibration = fit_calibration(val_scores, val_labels, DIGITS, 0.95, "validation")
    # An unregularised model is over-confident: the fit softens it.
    assert calibration.temperature > 1.0
    calibrated = apply_temperature(test_scores, calibration.temperature)
    before = expected_calibration_error(test_scores, test_labels)
    after = expected_calibration_error(calibrated, test_labels)
    print(f"digits test split: ECE {before:.4f} before, {after:.4f} after calibration")
    assert after < before
    assert calibration.ece_after < calibration.ece_before
    # Accuracy unchanged: not one argmax moves.
    assert np.array_equal(calibrated.argmax(axis=1), test_scores.argmax(axis=1))
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0, rtol=1e-5)


def test_the_fitted_temperature_minimises_the_negative_log_likelihood_and_its_prior() -> None:
    val_scores, val_labels, _, _ = digits_scores()
    best = fit_temperature(val_scores, val_labels)

    def nll(temperature: float) -> float:
        picked = apply_temperature(val_scores, temperature)[np.arange(len(val_labels)), val_labels]
        return float(-np.mean(np.log(np.clip(picked, 1e-12, 1))))

    def posterior_loss(temperature: float) -> float:
        return nll(temperature) + math.log(temperature) ** 2 / (2 * len(val_labels))

    assert posterior_loss(best) <= min(posterior_loss(best * 0.8), posterior_loss(best * 1.25))
    # With mistakes in the split the likelihood decides: the plain NLL minimum is within 5%.
    grid = np.exp(np.linspace(math.log(best / 2), math.log(best * 2), 401))
    plain = float(grid[np.argmin([nll(t) for t in grid])])
    assert abs(math.log(best / plain)) < 0.05


def test_a_split_the_model_gets_all_right_does_not_drive_the_temperature_to_zero() -> None:
    # Every validation image right, with some confidence: the likelihood alone keeps falling as
    # T -> 0 (every score to 1.000); the prior stops the fit at a finite temperature.
    rng = np.random.default_rng(0)
    top = rng.uniform(0.6, 0.99, 200)
    scores = np.stack([top, 1 - top], axis=1)
    labels = np.zeros(200, dtype=np.int64)
    temperature = fit_temperature(scores, labels)
    assert 0.1 < temperature < 1.0
    assert apply_temperature(scores, temperature)[:, 0].min() < 0.999


def test_thresholds_reach_the_target_precision_on_the_set_they_were_fitted_on() -> None:
    val_scores, val_labels, _, _ = digits_scores()
    calibration = fit_calibration(val_scores, val_labels, DIGITS, 0.95, "validation")
    calibrated = apply_temperature(val_scores, calibration.temperature)
    predictions = to_predictions(calibrated, DIGITS, calibration.thresholds)
    for index, name in enumerate(DIGITS):
        sure = [
            label
            for prediction, label in zip(predictions, val_labels, strict=True)
            if prediction.label == name and not prediction.uncertain
        ]
        if calibration.thresholds[name] is None:
            assert not sure
        else:
            assert sure and np.mean(np.asarray(sure) == index) >= 0.95
    assert any(prediction.uncertain for prediction in predictions)


def test_thresholds_on_a_small_hand_made_set() -> None:
    # Class a: predicted 4 times, confidences 0.9 (right), 0.8 (right), 0.7 (wrong), 0.6 (right).
    scores = np.array(
        [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.4, 0.6]], np.float64
    )
    labels = np.array([0, 0, 1, 0, 1, 0])
    thresholds = class_thresholds(scores, labels, ["a", "b"], 0.95)
    # Only {0.9, 0.8} is 100% precise; adding 0.7 drops to 2/3.
    assert thresholds["a"] == pytest.approx(0.8)
    # Class b: 0.8 right, then 0.6 wrong (1/2): the threshold is 0.8.
    assert thresholds["b"] == pytest.approx(0.8)
    assert class_thresholds(scores, labels, ["a", "b"], 0.5)["a"] == pytest.approx(0.6)
    # A class that is never predicted has no threshold: every label of it is uncertain.
    assert class_thresholds(scores[:4], labels[:4], ["a", "b"], 0.95)["b"] is None
    assert is_uncertain("b", 0.99, {"a": 0.8, "b": None})
    assert is_uncertain("a", 0.79, {"a": 0.8, "b": None})
    assert not is_uncertain("a", 0.8, {"a": 0.8, "b": None})
    assert not is_uncertain("a", 0.01, None)


def test_predictions_keep_the_runner_up() -> None:
    scores = np.array([[0.1, 0.6, 0.3]], np.float32)
    (prediction,) = to_predictions(scores, ["x", "y", "z"], {"x": 0.5, "y": 0.7, "z": 0.5})
    assert (prediction.label, prediction.runner_up, prediction.uncertain) == ("y", "z", True)
    assert prediction.runner_up_confidence == pytest.approx(0.3)


def test_ece_and_reliability_of_a_perfectly_calibrated_set() -> None:
    # Confidence 0.75 on both classes, right 3 times out of 4: calibrated exactly.
    scores = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(scores, labels) == pytest.approx(0.0)
    (only_bin,) = reliability(scores, labels)
    assert only_bin["count"] == 4 and only_bin["accuracy"] == pytest.approx(0.75)


def test_a_model_sure_of_everything_has_no_noise_floor() -> None:
    assert ece_noise_floor(np.tile([[1.0, 0.0, 0.0]], (50, 1)), draws=20) == 0.0
    assert ece_noise_floor(np.zeros((0, 2))) == 0.0


def test_the_noise_floor_is_what_perfectly_calibrated_draws_show_and_shrinks_with_size() -> None:
    rng = np.random.default_rng(1)

    def scores(count: int) -> np.ndarray:
        top = rng.uniform(0.6, 1.0, count)
        return np.stack([top, 1.0 - top], axis=1)

    small, large = scores(100), scores(10_000)
    floor = ece_noise_floor(small, draws=400, seed=2)
    # The same thing by hand: labels drawn so that each confidence is exactly right.
    by_hand = np.mean(
        [
            expected_calibration_error(small, (rng.random(100) >= small[:, 0]).astype(np.int64))
            for _ in range(400)
        ]
    )
    assert floor == pytest.approx(by_hand, rel=0.15)
    assert floor > 3 * ece_noise_floor(large, draws=40, seed=2) > 0
    assert ece_noise_floor(small, draws=50, seed=7) == ece_noise_floor(small, draws=50, seed=7)


def test_metadata_refuses_thresholds_for_other_classes() -> None:
    calibration = Calibration(
        temperature=1.5,
        fitted_on="validation",
        samples=10,
        target_precision=0.95,
        thresholds={"happy": 0.9, "angry": 0.8},
        ece_before=0.2,
        ece_after=0.1,
    )
    with pytest.raises(ValidationError, match="thresholds"):
        ModelMetadata(
            name="m",
            version="v",
            class_names=["happy", "sad"],
            head="softmax",
            input=InputMetadata(height=8, width=8, color_mode="rgb"),
            calibration=calibration,
        )


# --- trained and imported models ----------------------------------------------------------------


def test_training_calibrates_on_validation_and_evaluate_reports_both_errors(
    sample_dir: Path, tmp_path: Path
) -> None:
    outcome = train_model(
        sample_dir, TINY.model_copy(update={"epochs": 2}), LimitSettings(), tmp_path / "m", "c",
        progress=lambda _: None,
    )  # fmt: skip
    calibration = outcome.metadata.calibration
    assert calibration is not None
    assert calibration.fitted_on.startswith("validation split")
    assert calibration.samples == sum(outcome.metadata.dataset["validation"].values())
    assert set(calibration.thresholds) == {"happy", "sad"}
    stored = json.loads((outcome.artifact_dir / "metadata.json").read_text())
    assert stored["calibration"]["temperature"] == calibration.temperature
    test = stored["metrics"]["test"]["calibration"]
    assert test["calibrated"] and {"ece_before", "ece_after", "uncertain"} <= set(test)
    assert (outcome.artifact_dir / "test_reliability.png").is_file()
    # Calibration never moves a label: raw and calibrated argmax agree on the test images.
    artifact = load_artifact(outcome.artifact_dir, tmp_path / "m", "c")
    paths = [example.path for example in outcome.split.test]
    images, _, _ = load_labeled_images(artifact, paths, [0] * len(paths), LimitSettings())
    raw = predict_scores(artifact, images, calibrated=False)
    calibrated = predict_scores(artifact, images)
    assert np.array_equal(raw.argmax(axis=1), calibrated.argmax(axis=1))
    assert not np.allclose(raw, calibrated) or calibration.temperature == pytest.approx(1.0)
    evaluated = run_cli(["evaluate", str(outcome.artifact_dir), str(sample_dir)])
    assert evaluated.returncode == 0, evaluated.stderr
    assert "expected calibration error" in evaluated.stdout and "calibrated" in evaluated.stdout
    assert "a perfectly calibrated model would show" in " ".join(evaluated.stdout.split())


def test_calibrate_writes_a_calibrated_copy_of_an_uncalibrated_model(
    tiny_model: TrainOutcome, sample_dir: Path, tmp_path: Path
) -> None:
    assert tiny_model.metadata.calibration is None
    models = tmp_path / "models"
    shutil.copytree(tiny_model.artifact_dir, models / "tiny" / tiny_model.metadata.version)
    env = {"EMOLABEL_MODELS_DIR": str(models), "EMOLABEL_HOME": str(tmp_path)}
    source = models / "tiny" / tiny_model.metadata.version
    result = run_cli(["calibrate", str(source), str(sample_dir)], env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "held out 18 images: ECE" in result.stdout
    assert "would show" in " ".join(result.stdout.split())
    copies = [path for path in (models / "tiny").iterdir() if path != source]
    assert len(copies) == 1
    metadata = json.loads((copies[0] / "metadata.json").read_text())
    assert metadata["calibration"]["samples"] == 42
    assert metadata["training"]["calibrated_from"] == tiny_model.metadata.version
    assert (copies[0] / "model.keras").read_bytes() == (source / "model.keras").read_bytes()
    # The original is untouched; a bad folder or option is a clear error.
    assert json.loads((source / "metadata.json").read_text())["calibration"] is None
    refused = run_cli(["calibrate", str(source), str(tmp_path / "nowhere")], env=env)
    assert refused.returncode != 0 and "no such folder" in refused.stdout + refused.stderr
    refused = run_cli(
        ["calibrate", str(source), str(sample_dir), "--target-precision", "1.5"], env=env
    )
    assert refused.returncode != 0 and "between 0 and 1" in refused.stdout + refused.stderr
