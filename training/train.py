"""Train the CNN on a folder-per-class dataset and write a versioned, evaluated artifact.

The flow the notebooks followed, made repeatable: clean (bad files counted and listed), load the
class folders, split the FILE LIST 70/20/10 (seeded, stratified, duplicates on one side), fit with
EarlyStopping and a best-epoch checkpoint, plot loss/accuracy, evaluate on the test split, and save
`model.keras` + `metadata.json`. The artifact is built in a hidden staging folder and renamed into
place only when complete, so a crashed run never leaves a half artifact that `predict` would pick.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import DataError
from core.settings import LimitSettings, TrainSettings
from training.artifacts import MODEL_FILE, load_artifact
from training.clean import CleanReport, Finding, scan_dataset
from training.dataset import (
    DatasetSplit,
    Example,
    dataset_fingerprint,
    discover_classes,
    examples_from_report,
    split_examples,
    write_manifest,
)
from training.evaluate import Evaluation, evaluate_files, floor_note, write_evaluation
from training.frozen import MANIFEST as FROZEN_MANIFEST
from training.frozen import apply_frozen, freeze, load_frozen
from training.metadata import (
    InputMetadata,
    ModelMetadata,
    Subject,
    library_versions,
    new_version,
    write_metadata,
)
from training.model import compile_model, head_for, make_model
from training.preprocess import InputSpec
from training.recalibrate import calibrate_on_files

if TYPE_CHECKING:
    from training.reviewed import ReviewedSplit

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TrainOutcome:
    """What a training run produced."""

    artifact_dir: Path
    metadata: ModelMetadata
    evaluation: Evaluation
    findings: list[Finding]
    split: DatasetSplit
    seconds: float


@dataclass(frozen=True)
class PreparedData:
    """A cleaned, split dataset, ready to fit."""

    class_names: list[str]
    report: CleanReport
    findings: list[Finding]
    split: DatasetSplit
    fingerprint: str


def prepare_data(
    data_dir: Path,
    train: TrainSettings,
    limits: LimitSettings,
    progress: Progress,
    frozen_test_dir: Path | None = None,
) -> PreparedData:
    """Discover classes, clean, and split the file list; refuse what cannot be trained on.

    With `frozen_test_dir`, the test part is the frozen test split stored there (frozen from
    this split's test part the first time), and those images are kept out of training.
    """
    class_names = discover_classes(data_dir)
    progress(f"classes ({len(class_names)}): {', '.join(class_names)}")
    report = scan_dataset(data_dir, limits)
    examples, unassigned = examples_from_report(report, class_names)
    findings = [*report.findings, *unassigned]
    if findings:
        reasons = Counter(finding.reason.value for finding in findings)
        summary = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        progress(f"left out {len(findings)} of {report.scanned} files: {summary}")
    split = split_examples(examples, train.split, train.seed)
    if frozen_test_dir is not None:
        frozen = load_frozen(frozen_test_dir)
        if frozen is None:
            frozen = freeze(frozen_test_dir, split.test, class_names)
            progress(f"froze {len(frozen.items)} test images in {frozen_test_dir}")
        split = apply_frozen(split, frozen)
    progress(
        f"split {len(split.train)} train / {len(split.validation)} validation / "
        f"{len(split.test)} test images"
    )
    return PreparedData(class_names, report, findings, split, dataset_fingerprint(examples))


def _counts(examples: list[Example], class_names: list[str]) -> dict[str, int]:
    counted = Counter(example.class_name for example in examples)
    return {name: counted.get(name, 0) for name in class_names}


def _epoch_logger(progress: Progress, epochs: int) -> Any:
    import keras

    class EpochProgress(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.started = time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
            values = " ".join(f"{key}={value:.4f}" for key, value in sorted((logs or {}).items()))
            seconds = time.perf_counter() - self.started
            progress(f"epoch {epoch + 1}/{epochs} ({seconds:.1f}s): {values}")

    return EpochProgress()


def _callbacks(staging: Path, train: TrainSettings, progress: Progress) -> list[Any]:
    import keras

    callbacks: list[Any] = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=train.patience, restore_best_weights=True
        ),
        # The best epoch is the artifact: checkpoint straight into model.keras.
        keras.callbacks.ModelCheckpoint(
            staging / MODEL_FILE, monitor="val_loss", save_best_only=True
        ),
        keras.callbacks.CSVLogger(str(staging / "history.csv")),
        _epoch_logger(progress, train.epochs),
    ]
    if keras.backend.backend() == "tensorflow":
        # TensorBoard's writer needs TensorFlow; other backends skip the logs, not the run.
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(staging / "logs")))
    return callbacks


def train_model(
    data_dir: Path,
    train: TrainSettings,
    limits: LimitSettings,
    models_dir: Path,
    name: str,
    progress: Progress = logger.info,
    frozen_test_dir: Path | None = None,
    subject: Subject = "image",
    reviewed: ReviewedSplit | None = None,
) -> TrainOutcome:
    """Train, evaluate on the test split, and save a complete artifact; returns what it made.

    `subject` is what each training image shows (`face`: one face, so the model is served on
    detected face crops; `image`: the whole picture); it is recorded in the metadata.
    `reviewed`: people's labels (`training.reviewed`), whose train and validation parts join
    the data folder's; the test split stays the data folder's (or the frozen one).
    """
    import keras

    from training.batches import ImageBatches
    from training.plots import plot_history

    started = time.perf_counter()
    data = prepare_data(data_dir, train, limits, progress, frozen_test_dir)
    used = _reviewed_used(reviewed, data, progress)
    reviewed_train, reviewed_validation = _reviewed_examples(used)
    spec = InputSpec(train.image_size, train.image_size, train.color_mode)
    keras.utils.set_random_seed(train.seed)

    version = new_version()
    family = models_dir / name
    staging = family / f".{version}.partial"
    staging.mkdir(parents=True, exist_ok=False)
    if frozen_test_dir is None:
        write_manifest(data.split, data_dir, staging / "split_manifest.json")
    else:
        # The test images live in the frozen folder, outside the data root: record them apart.
        write_manifest(replace(data.split, test=[]), data_dir, staging / "split_manifest.json")
        shutil.copy2(frozen_test_dir / FROZEN_MANIFEST, staging / FROZEN_MANIFEST)
    if used is not None:
        _write_reviewed_manifest(used, staging / "reviewed_manifest.json")
    (staging / "data_report.json").write_text(
        json.dumps(
            data.report.to_json() | {"unassigned": [str(f.path) for f in data.findings]}, indent=2
        )
        + "\n"
    )

    def batches(examples: list[Example], *, training: bool) -> ImageBatches:
        return ImageBatches(
            [example.path for example in examples],
            [example.label for example in examples],
            spec,
            limits,
            batch_size=train.batch_size,
            shuffle=training,
            seed=train.seed,
            augmentation=training and train.augment,
            cache_max_bytes=train.cache_max_bytes,
        )

    progress("loading images")
    train_batches = batches([*data.split.train, *reviewed_train], training=True)
    validation_batches = batches([*data.split.validation, *reviewed_validation], training=False)

    num_classes = len(data.class_names)
    model = make_model(spec.shape, num_classes)
    compile_model(model, num_classes, train.learning_rate)
    history = model.fit(
        train_batches,
        validation_data=validation_batches,
        epochs=train.epochs,
        callbacks=_callbacks(staging, train, progress),
        verbose=0,
    ).history
    fit_seconds = time.perf_counter() - started

    plot_history(history, "loss", staging / "loss.png")
    plot_history(history, "accuracy", staging / "accuracy.png")

    best_epoch = int(min(range(len(history["val_loss"])), key=lambda i: history["val_loss"][i]))
    metadata = ModelMetadata(
        name=name,
        version=version,
        class_names=data.class_names,
        head=head_for(num_classes),
        subject=subject,
        input=InputMetadata(
            height=spec.height, width=spec.width, color_mode=spec.color_mode, scaling_in_model=True
        ),
        training={
            **train.model_dump(mode="json"),
            "epochs_run": len(history["loss"]),
            "best_epoch": best_epoch + 1,
            "fit_seconds": round(fit_seconds, 2),
            "history": {key: [float(v) for v in values] for key, values in history.items()},
        },
        dataset={
            "root": str(data_dir.resolve()),
            "fingerprint": data.fingerprint,
            "scanned_files": data.report.scanned,
            "left_out": len(data.findings),
            "left_out_by_reason": dict(Counter(finding.reason.value for finding in data.findings)),
            "train": _counts(data.split.train, data.class_names),
            "validation": _counts(data.split.validation, data.class_names),
            "test": _counts(data.split.test, data.class_names),
            "reviewed": used.summary() if used is not None else None,
        },
        metrics={"validation": {"loss": float(history["val_loss"][best_epoch])}},
        libraries=library_versions(),
    )
    write_metadata(staging, metadata)

    # Calibrate on the validation split (never the test split, which measures the result):
    # a temperature for the confidences, per-class thresholds for `uncertain`.
    artifact = load_artifact(staging, models_dir, name)
    validation = data.split.validation
    try:
        calibration = calibrate_on_files(
            artifact,
            [e.path for e in validation],
            [e.label for e in validation],
            limits,
            train.target_precision,
            f"validation split ({len(validation)} images)",
            train.batch_size,
        )
    except DataError as error:
        # Too small a validation split to fit on: served raw, never uncertain, and said so.
        progress(f"not calibrated: {error}")
    else:
        metadata = metadata.model_copy(update={"calibration": calibration})
        write_metadata(staging, metadata)
        progress(
            f"calibrated on validation: temperature {calibration.temperature:.3f}, "
            f"ECE {calibration.ece_before:.4f} -> {calibration.ece_after:.4f}"
        )

    # Evaluate the saved file, not the in-memory model: what we ship is what we measure.
    artifact = load_artifact(staging, models_dir, name)
    test = data.split.test
    evaluation = evaluate_files(
        artifact, [e.path for e in test], [e.label for e in test], limits, train.batch_size
    )
    write_evaluation(evaluation, staging, "test")
    metadata = metadata.model_copy(
        update={"metrics": metadata.metrics | {"test": evaluation.to_json()}}
    )
    write_metadata(staging, metadata)

    final = family / version
    staging.rename(final)
    seconds = time.perf_counter() - started
    progress(f"test accuracy {evaluation.accuracy:.4f}, macro F1 {evaluation.macro['f1']:.4f}")
    progress(
        f"test ECE {evaluation.calibration['ece_before']:.4f} before calibration, "
        f"{evaluation.calibration['ece_after']:.4f} after "
        f"({floor_note(evaluation.calibration, evaluation.support)}); "
        f"{evaluation.calibration.get('uncertain', 0)} of {evaluation.support} uncertain"
    )
    return TrainOutcome(final, metadata, evaluation, data.findings, data.split, seconds)


def _reviewed_used(
    reviewed: ReviewedSplit | None, data: PreparedData, progress: Progress
) -> ReviewedSplit | None:
    """The reviewed labels this run uses: none that copies a test image into training."""
    if reviewed is None:
        return None
    if reviewed.class_names != data.class_names:
        raise DataError(
            f"reviewed labels were written for classes {reviewed.class_names}, the data has "
            f"{data.class_names}"
        )
    used = reviewed.excluding({example.sha256 for example in data.split.test})
    progress(
        f"reviewed labels: {len(used.train)} train / {len(used.validation)} validation / "
        f"{len(used.holdout)} holdout"
    )
    return used


def _reviewed_examples(used: ReviewedSplit | None) -> tuple[list[Example], list[Example]]:
    if used is None:
        return [], []
    return [item.example for item in used.train], [item.example for item in used.validation]


def _write_reviewed_manifest(used: ReviewedSplit, path: Path) -> None:
    """Which reviews went into which part (the files themselves are per-run scratch)."""
    parts = {"train": used.train, "validation": used.validation, "holdout": used.holdout}
    rows = {
        part: [
            {"review_id": item.review_id, "image_id": item.image_id,
             "face_index": item.face_index, "class": item.example.class_name,
             "sha256": item.example.sha256}
            for item in files
        ]
        for part, files in parts.items()
    }  # fmt: skip
    document = {"class_names": used.class_names, "skipped": used.skipped, **rows}
    path.write_text(json.dumps(document, indent=2) + "\n")


def discard_partial(models_dir: Path, name: str) -> None:
    """Remove staging folders left by crashed runs (they hold nothing a user made)."""
    for partial in (models_dir / name).glob(".*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def ensure_trainable(data_dir: Path) -> None:
    """Fail early, in one line, on a path that cannot be a dataset."""
    if not data_dir.exists():
        raise DataError(f"{data_dir}: no such folder")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a folder")
