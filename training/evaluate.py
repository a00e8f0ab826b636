"""Accuracy, per-class and macro precision / recall / F1, a confusion matrix, and calibration
(expected calibration error before and after, a reliability diagram) on a split."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
)

from core.errors import DataError, ImageError
from core.reasons import Reason
from core.settings import FaceSettings, LimitSettings
from training.artifacts import Artifact
from training.calibration import (
    calibrate_scores,
    ece_noise_floor,
    expected_calibration_error,
    reliability,
)
from training.faces import FaceDetector
from training.faces.labeling import DetectedFaces, classify_faces, find_faces
from training.inference import predict_scores, thresholds_of, to_predictions
from training.metadata import ModelMetadata
from training.plots import plot_confusion_matrix, plot_reliability
from training.preprocess import load_image_file, read_image_file


@dataclass
class Evaluation:
    """Metrics of one model on one labelled set; `to_json` is what metadata and files store."""

    class_names: list[str]
    accuracy: float
    macro: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    report: str
    support: int
    unusable: list[dict[str, str]] = field(default_factory=list)
    # A face model's photos in which no face was found: neither scored nor counted as errors.
    no_face: list[str] = field(default_factory=list)
    # Expected calibration error before and after the model's calibration, the reliability
    # bins, and how the uncertain outcome splits the set (see `calibration_report`).
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "macro": self.macro,
            "per_class": self.per_class,
            "confusion_matrix": {"labels": self.class_names, "matrix": self.confusion},
            "support": self.support,
            "unusable": self.unusable,
            "no_face": self.no_face,
            "calibration": self.calibration,
        }


def score(
    true_labels: NDArray[np.int64], scores: NDArray[np.float32], class_names: Sequence[str]
) -> Evaluation:
    """Compare integer labels with (N, C) scores; every class appears in the report."""
    if len(true_labels) == 0:
        raise DataError("nothing to evaluate: the set has no usable images")
    predicted = np.argmax(scores, axis=1)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        true_labels, predicted, labels=labels, zero_division=0
    )
    macro = precision_recall_fscore_support(
        true_labels, predicted, labels=labels, average="macro", zero_division=0
    )
    return Evaluation(
        class_names=list(class_names),
        accuracy=float(accuracy_score(true_labels, predicted)),
        macro={"precision": float(macro[0]), "recall": float(macro[1]), "f1": float(macro[2])},
        per_class={
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        confusion=confusion_matrix(true_labels, predicted, labels=labels).tolist(),
        report=str(
            classification_report(
                true_labels,
                predicted,
                labels=labels,
                target_names=list(class_names),
                digits=4,
                zero_division=0,
            )
        ),
        support=len(true_labels),
    )


def calibration_report(
    true_labels: NDArray[np.int64],
    raw: NDArray[np.float32],
    metadata: ModelMetadata,
) -> tuple[NDArray[np.float32], dict[str, Any]]:
    """Calibrate raw scores as the artifact says; report ECE before and after, the reliability
    bins of both, and, for a calibrated model, how many labels are uncertain and how precise
    the others are (what the thresholds promise)."""
    calibrated = calibrate_scores(raw, metadata.calibration)
    report: dict[str, Any] = {
        "calibrated": metadata.calibration is not None,
        "ece_before": expected_calibration_error(raw, true_labels),
        "ece_after": expected_calibration_error(calibrated, true_labels),
        # What a perfectly calibrated model with the same confidences would show on this many
        # images: a change in ECE smaller than the floors' gap is noise.
        "ece_floor_before": ece_noise_floor(raw),
        "ece_floor_after": ece_noise_floor(calibrated),
        "reliability_before": reliability(raw, true_labels),
        "reliability_after": reliability(calibrated, true_labels),
    }
    if metadata.calibration is not None:
        report["temperature"] = metadata.calibration.temperature
        predictions = to_predictions(calibrated, metadata.class_names, thresholds_of(metadata))
        sure = [index for index, prediction in enumerate(predictions) if not prediction.uncertain]
        correct = calibrated.argmax(axis=1) == true_labels
        report["uncertain"] = len(predictions) - len(sure)
        report["coverage"] = len(sure) / len(predictions) if predictions else 0.0
        # Accuracy of the labels not marked uncertain: what a user who trusts them gets.
        report["precision_when_sure"] = float(correct[sure].mean()) if sure else None
    return calibrated, report


def floor_note(report: dict[str, Any], images: int) -> str:
    """How to read an ECE pair from `calibration_report`: the floors it cannot go below."""
    return (
        f"a perfectly calibrated model would show ~{report['ece_floor_before']:.4f} and "
        f"~{report['ece_floor_after']:.4f} on these {images} images"
    )


def load_labeled_images(
    artifact: Artifact, paths: Sequence[Path], labels: Sequence[int], limits: LimitSettings
) -> tuple[NDArray[np.uint8], list[int], list[dict[str, str]]]:
    """Decode every file as the model takes it: (images, their labels, the files that failed)."""
    images: list[NDArray[np.uint8]] = []
    kept: list[int] = []
    unusable: list[dict[str, str]] = []
    for path, label in zip(paths, labels, strict=True):
        try:
            images.append(load_image_file(path, artifact.spec, limits))
        except (ImageError, OSError) as error:
            unusable.append(_unusable(path, error))
            continue
        kept.append(label)
    if not images:
        raise DataError("nothing to evaluate: no image in the set could be loaded")
    return np.stack(images), kept, unusable


def _unusable(path: Path, error: ImageError | OSError) -> dict[str, str]:
    """A file the evaluation could not use, with its reason (a `Reason` value)."""
    reason = error.reason if isinstance(error, ImageError) else Reason.UNREADABLE
    return {"path": str(path), "reason": reason.value, "detail": str(error)}


def evaluate_files(
    artifact: Artifact,
    paths: Sequence[Path],
    labels: Sequence[int],
    limits: LimitSettings,
    batch_size: int = 64,
) -> Evaluation:
    """Predict every file and score it; a file that fails to load is listed, never dropped."""
    images, kept, unusable = load_labeled_images(artifact, paths, labels, limits)
    raw = predict_scores(artifact, images, batch_size, calibrated=False)
    true_labels = np.asarray(kept, dtype=np.int64)
    scores, calibration = calibration_report(true_labels, raw, artifact.metadata)
    evaluation = score(true_labels, scores, artifact.metadata.class_names)
    evaluation.unusable = unusable
    evaluation.calibration = calibration
    return evaluation


def evaluate_face_files(
    artifact: Artifact,
    detector: FaceDetector,
    paths: Sequence[Path],
    labels: Sequence[int],
    limits: LimitSettings,
    faces: FaceSettings,
    batch_size: int = 64,
) -> Evaluation:
    """Score a face model on photos: each photo by its photo-level label (its largest face's).

    A photo without a face is listed in `no_face`, apart: it is neither scored nor an error of
    the model; a photo that cannot be read is listed in `unusable`, as in `evaluate_files`.
    """
    detected: list[DetectedFaces] = []
    kept: list[int] = []
    unusable: list[dict[str, str]] = []
    no_face: list[str] = []
    for path, label in zip(paths, labels, strict=True):
        try:
            data = read_image_file(path, limits)
            photo = find_faces(data, detector, artifact.spec, faces, limits)
        except (ImageError, OSError) as error:
            unusable.append(_unusable(path, error))
            continue
        if not photo.faces:
            no_face.append(str(path))
            continue
        detected.append(photo)
        kept.append(label)
    if not detected:
        raise DataError(
            f"nothing to evaluate: no face found in any photo ({len(no_face)} without a face, "
            f"{len(unusable)} unusable)"
        )
    results = classify_faces(artifact, detected, batch_size, calibrated=False)
    # The photo's scores are its largest face's (face 0), so the photo-level label is their argmax.
    names = artifact.metadata.class_names
    raw = np.asarray(
        [[result.faces[0].scores[name] for name in names] for result in results], np.float32
    )
    true_labels = np.asarray(kept, dtype=np.int64)
    scores, calibration = calibration_report(true_labels, raw, artifact.metadata)
    evaluation = score(true_labels, scores, names)
    evaluation.unusable = unusable
    evaluation.no_face = no_face
    evaluation.calibration = calibration
    return evaluation


def write_evaluation(evaluation: Evaluation, directory: Path, prefix: str = "test") -> list[Path]:
    """Write `<prefix>_evaluation.json`, the confusion matrix (JSON and PNG) and the text report."""
    directory.mkdir(parents=True, exist_ok=True)
    metrics_path = directory / f"{prefix}_evaluation.json"
    metrics_path.write_text(json.dumps(evaluation.to_json(), indent=2) + "\n")
    matrix_path = directory / f"{prefix}_confusion_matrix.json"
    matrix_path.write_text(
        json.dumps({"labels": evaluation.class_names, "matrix": evaluation.confusion}) + "\n"
    )
    report_path = directory / f"{prefix}_classification_report.txt"
    report_path.write_text(evaluation.report)
    picture = plot_confusion_matrix(
        np.asarray(evaluation.confusion, dtype=np.int64),
        evaluation.class_names,
        directory / f"{prefix}_confusion_matrix.png",
        f"Confusion matrix ({prefix}, n={evaluation.support})",
    )
    written = [metrics_path, matrix_path, report_path, picture]
    if evaluation.calibration:
        before = evaluation.calibration["ece_before"]
        after = evaluation.calibration["ece_after"]
        written.append(
            plot_reliability(
                {
                    f"raw (ECE {before:.3f})": evaluation.calibration["reliability_before"],
                    f"calibrated (ECE {after:.3f})": evaluation.calibration["reliability_after"],
                },
                directory / f"{prefix}_reliability.png",
                f"Reliability ({prefix}, n={evaluation.support})",
            )
        )
    return written
