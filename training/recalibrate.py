"""Fit an artifact's calibration on labelled images: at training time on the validation split,
or later on any folder-per-class set (`emolabel calibrate MODEL DATA_DIR`, for imported models).

Calibrating changes what a model serves (its confidences, which labels are uncertain), so a
calibrated copy is a new artifact version: the same `model.keras`, new metadata. Results written
before keep naming the version that wrote them.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.errors import DataError
from core.settings import LimitSettings
from training.artifacts import Artifact
from training.calibration import fit_calibration
from training.evaluate import calibration_report, load_labeled_images
from training.inference import predict_scores
from training.metadata import Calibration, new_version, write_metadata
from training.trust import MODEL_FILE


def raw_scores(
    artifact: Artifact,
    paths: Sequence[Path],
    labels: Sequence[int],
    limits: LimitSettings,
    batch_size: int = 64,
) -> tuple[NDArray[np.float32], NDArray[np.int64], list[dict[str, str]]]:
    """Uncalibrated scores of every loadable file, its label, and the files that failed."""
    images, kept, unusable = load_labeled_images(artifact, paths, labels, limits)
    scores = predict_scores(artifact, images, batch_size, calibrated=False)
    return scores, np.asarray(kept, dtype=np.int64), unusable


def calibrate_on_files(
    artifact: Artifact,
    paths: Sequence[Path],
    labels: Sequence[int],
    limits: LimitSettings,
    target_precision: float,
    fitted_on: str,
    batch_size: int = 64,
) -> Calibration:
    """Fit temperature and per-class thresholds on these labelled files."""
    scores, kept, _ = raw_scores(artifact, paths, labels, limits, batch_size)
    if len(kept) < 2:
        raise DataError(f"calibration needs at least 2 usable labelled images, {len(kept)} found")
    return fit_calibration(scores, kept, artifact.metadata.class_names, target_precision, fitted_on)


@dataclass(frozen=True)
class Recalibrated:
    """A calibrated copy of an artifact, and how it did on the images held out of the fit."""

    directory: Path
    calibration: Calibration
    holdout: dict[str, Any]


def holdout_split(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (fit, holdout): a seeded shuffle, `fraction` held out (at least one of each)."""
    order = np.random.default_rng(seed).permutation(count).tolist()
    held = min(max(1, round(count * fraction)), count - 1) if fraction > 0 else 0
    return sorted(order[held:]), sorted(order[:held])


def recalibrate(
    artifact: Artifact,
    paths: Sequence[Path],
    labels: Sequence[int],
    limits: LimitSettings,
    *,
    target_precision: float,
    holdout: float,
    seed: int,
    models_dir: Path,
    fitted_on: str,
    batch_size: int = 64,
) -> Recalibrated:
    """Fit on part of the labelled files, report on the rest, write a calibrated copy.

    The copy lands in `<models_dir>/<name>/<new version>`; a staging folder is renamed into
    place only when complete, as training does.
    """
    scores, kept, unusable = raw_scores(artifact, paths, labels, limits, batch_size)
    if len(kept) < 4:
        raise DataError(f"calibration needs at least 4 usable labelled images, {len(kept)} found")
    fit, held = holdout_split(len(kept), holdout, seed)
    metadata = artifact.metadata
    calibration = fit_calibration(
        scores[fit], kept[fit], metadata.class_names, target_precision, fitted_on
    )
    calibrated = metadata.model_copy(update={"calibration": calibration})
    report: dict[str, Any] = {"images": len(held), "unusable": len(unusable)}
    if held:
        _, measured = calibration_report(kept[held], scores[held], calibrated)
        report |= {key: value for key, value in measured.items() if "reliability" not in key}
        report["accuracy"] = float((scores[held].argmax(axis=1) == kept[held]).mean())
    version = new_version()
    family = models_dir / metadata.name
    staging = family / f".{version}.partial"
    staging.mkdir(parents=True, exist_ok=False)
    shutil.copy2(artifact.path / MODEL_FILE, staging / MODEL_FILE)
    write_metadata(
        staging,
        calibrated.model_copy(
            update={
                "version": version,
                "training": metadata.training
                | {"calibrated_from": metadata.version, "calibration_holdout": report},
            }
        ),
    )
    final = family / version
    staging.rename(final)
    return Recalibrated(final, calibration, report)
