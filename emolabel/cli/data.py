"""Commands on datasets and model files: sample-data, clean, train, evaluate, predict,
import-model, and `settings`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from emolabel.cli.app import (
    EXIT_PARTIAL,
    app,
    console,
    fail,
    progress_line,
    sessions_for,
    settings_from,
    split_names,
)
from training.runtime import load_keras

if TYPE_CHECKING:
    from core.settings import Settings
    from training.artifacts import Artifact
    from training.faces import FaceDetector
    from training.faces.labeling import PhotoFaces
    from training.metadata import Subject

SUBJECT_HELP = (
    "What one model input shows: image (the whole picture) or face (one face: served on "
    "detected face crops)."
)


def checked_subject(subject: str) -> Subject:
    if subject == "image":
        return "image"
    if subject == "face":
        return "face"
    fail(f"--subject {subject!r}: use image or face")


def face_detector(settings: Settings) -> FaceDetector:
    """The face detector a face model needs; one clear error (never a whole-image fallback)."""
    from core.errors import ModelError
    from training.faces import detector_config
    from training.faces.mtcnn import load_mtcnn

    try:
        return load_mtcnn(detector_config(settings.faces), backend=settings.keras_backend)
    except (ModelError, OSError, ValueError) as error:
        fail(f"the face detector cannot load, so a face model cannot label: {error}")


@app.command("sample-data")
def sample_data(
    out: Annotated[Path, typer.Argument(help="Folder to write <class>/<image> files into.")],
    classes: Annotated[str, typer.Option(help="Comma-separated class names.")] = "happy,sad",
    per_class: Annotated[int, typer.Option(min=1, help="Images per class.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed; the same seed draws the same files.")] = 0,
) -> None:
    """Draw a folder-per-class set of synthetic face images (nothing is downloaded)."""
    from training.sample_data import generate_sample_data

    try:
        summary = generate_sample_data(out, split_names(classes), per_class, seed)
    except ValueError as error:
        fail(str(error))
    console.print(f"wrote {summary.total_files} images to {out}", highlight=False)


@app.command()
def clean(
    data_dir: Annotated[Path, typer.Argument(help="Folder-per-class dataset.")],
    quarantine: Annotated[
        Path | None,
        typer.Option(help="Move bad files here (keeping relative paths); nothing is deleted."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Report files that are not usable images (by content), too small, or exact duplicates."""
    from training.clean import quarantine as move_to_quarantine
    from training.clean import scan_dataset
    from training.train import ensure_trainable

    settings = settings_from()
    ensure_trainable(data_dir)
    report = scan_dataset(data_dir, settings.limits)
    moved = move_to_quarantine(report, quarantine) if quarantine is not None else []
    if as_json:
        console.print_json(data=report.to_json() | {"moved": [[str(a), str(b)] for a, b in moved]})
        return
    table = Table(
        "file", "reason", "detail", title=f"{len(report.findings)} of {report.scanned} files"
    )
    for finding in report.findings:
        table.add_row(str(finding.path.relative_to(data_dir)), finding.reason.value, finding.detail)
    console.print(table)
    for reason, count in sorted(report.counts_by_reason().items()):
        console.print(f"{reason}: {count}", highlight=False)
    if moved:
        console.print(f"moved {len(moved)} files to {quarantine}", highlight=False)


@app.command()
def train(
    data_dir: Annotated[Path, typer.Argument(help="Folder-per-class dataset (>= 2 classes).")],
    epochs: Annotated[int | None, typer.Option(min=1, help="Maximum epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    image_size: Annotated[int | None, typer.Option(min=8, help="Input height and width.")] = None,
    color: Annotated[str | None, typer.Option(help="rgb or grayscale.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    patience: Annotated[int | None, typer.Option(min=1)] = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment")] = None,
    models_dir: Annotated[Path | None, typer.Option(help="Where artifacts go.")] = None,
    name: Annotated[str | None, typer.Option(help="Artifact family name.")] = None,
    subject: Annotated[str, typer.Option(help=SUBJECT_HELP)] = "image",
) -> None:
    """Clean, split 70/20/10, train the CNN, evaluate it on the test split, save an artifact."""
    from training.train import ensure_trainable, train_model

    checked_subject(subject)
    base = settings_from()
    chosen = {
        "epochs": epochs,
        "batch_size": batch_size,
        "image_size": image_size,
        "color_mode": color,
        "seed": seed,
        "learning_rate": learning_rate,
        "patience": patience,
        "augment": augment,
    }
    settings = settings_from(
        train=base.train.model_dump() | {k: v for k, v in chosen.items() if v is not None},
        limits=base.limits,
        models_dir=models_dir or base.models_dir,
        model_name=name or base.model_name,
        home=base.home,
    )
    ensure_trainable(data_dir)
    load_keras(settings.keras_backend)
    outcome = train_model(
        data_dir,
        settings.train,
        settings.limits,
        settings.models_dir,
        settings.model_name,
        progress=progress_line,
        subject=checked_subject(subject),
    )
    evaluation = outcome.evaluation
    console.print(evaluation.report, highlight=False)
    console.print(
        f"model {outcome.metadata.version}: test accuracy {evaluation.accuracy:.4f}, "
        f"macro F1 {evaluation.macro['f1']:.4f} on {evaluation.support} images "
        f"({outcome.seconds:.0f}s)\nartifact: {outcome.artifact_dir}",
        highlight=False,
    )
    from training.registry import register_trained

    with sessions_for(settings).begin() as session:
        _, activated = register_trained(session=session, directory=outcome.artifact_dir)
    version = outcome.metadata.version
    console.print(
        f"registered {version}: "
        + (
            "active (no model was)"
            if activated
            else f"candidate; `emolabel models promote {version}`"
        ),
        highlight=False,
    )


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="Artifact folder or version.")],
    data_dir: Annotated[Path, typer.Argument(help="Folder-per-class set to score the model on.")],
    out: Annotated[Path | None, typer.Option(help="Write metrics, matrix and plot here.")] = None,
    update_metadata: Annotated[
        bool, typer.Option(help="Also store the metrics in the artifact's metadata.")
    ] = False,
) -> None:
    """Score a model on every usable image of a folder-per-class set (class names must match)."""
    from training.artifacts import load_artifact
    from training.clean import scan_dataset
    from training.dataset import discover_classes, examples_from_report
    from training.evaluate import (
        evaluate_face_files,
        evaluate_files,
        floor_note,
        write_evaluation,
    )
    from training.metadata import write_metadata
    from training.train import ensure_trainable

    settings = settings_from()
    ensure_trainable(data_dir)
    load_keras(settings.keras_backend)
    artifact = load_artifact(model, settings.models_dir, settings.model_name)
    folder_classes = discover_classes(data_dir)
    known = artifact.metadata.class_names
    unknown = sorted(set(folder_classes) - set(known))
    if unknown:
        fail(f"{data_dir} has classes the model does not know: {', '.join(unknown)}")
    report = scan_dataset(data_dir, settings.limits)
    examples, _ = examples_from_report(report, folder_classes)
    paths = [example.path for example in examples]
    # Labels follow the model's class order, not the folder order.
    labels = [known.index(example.class_name) for example in examples]
    if artifact.metadata.subject == "face":
        # Each photo is scored by its largest face's label; photos without a face apart.
        detector = face_detector(settings)
        evaluation = evaluate_face_files(
            artifact, detector, paths, labels, settings.limits, settings.faces
        )
    else:
        evaluation = evaluate_files(artifact, paths, labels, settings.limits)
    target = out or artifact.path
    written = write_evaluation(evaluation, target, prefix="evaluation")
    if update_metadata:
        metadata = artifact.metadata.model_copy(
            update={"metrics": artifact.metadata.metrics | {"evaluation": evaluation.to_json()}}
        )
        write_metadata(artifact.path, metadata)
    console.print(evaluation.report, highlight=False)
    console.print(
        f"accuracy {evaluation.accuracy:.4f}, macro F1 {evaluation.macro['f1']:.4f} on "
        f"{evaluation.support} images; {len(report.findings)} files left out; wrote {written[0]}",
        highlight=False,
    )
    calibration = evaluation.calibration
    if calibration:
        console.print(
            f"expected calibration error {calibration['ece_before']:.4f} raw, "
            f"{calibration['ece_after']:.4f} calibrated "
            f"({floor_note(calibration, evaluation.support)})"
            + (
                f" (temperature {calibration['temperature']:.3f}); "
                f"{calibration['uncertain']} uncertain, accuracy of the rest "
                f"{_percent(calibration['precision_when_sure'])}"
                if calibration["calibrated"]
                else " (the model has no calibration: `emolabel calibrate MODEL DATA_DIR`)"
            )
            + f"; reliability diagram {target / 'evaluation_reliability.png'}",
            highlight=False,
        )
    if artifact.metadata.subject == "face":
        console.print(
            f"no_face: {len(evaluation.no_face)} photos without a face (not scored)",
            highlight=False,
        )
        for path in evaluation.no_face:
            console.print(f"no_face\t{path}", highlight=False)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


@app.command()
def calibrate(
    model: Annotated[str, typer.Argument(help="Artifact folder or version to calibrate.")],
    data_dir: Annotated[Path, typer.Argument(help="Folder-per-class labelled images.")],
    target_precision: Annotated[
        float | None,
        typer.Option(help="Precision each class threshold aims at (default: the setting)."),
    ] = None,
    holdout: Annotated[
        float, typer.Option(help="Share of the images kept out of the fit, to measure it.")
    ] = 0.3,
) -> None:
    """Fit a temperature and per-class thresholds on labelled images; write a calibrated copy.

    For imported models (trained ones are calibrated on their validation split). The copy is a
    new version in the same family: promote it with `emolabel models promote FOLDER`.
    """
    from training.artifacts import load_artifact
    from training.clean import scan_dataset
    from training.dataset import discover_classes, examples_from_report
    from training.evaluate import floor_note
    from training.recalibrate import recalibrate
    from training.train import ensure_trainable

    settings = settings_from()
    target = settings.train.target_precision if target_precision is None else target_precision
    if not 0 < target < 1:
        fail(f"--target-precision {target}: use a number between 0 and 1")
    if not 0 <= holdout < 1:
        fail(f"--holdout {holdout}: use a number from 0 to below 1")
    ensure_trainable(data_dir)
    load_keras(settings.keras_backend)
    artifact = load_artifact(model, settings.models_dir, settings.model_name)
    known = artifact.metadata.class_names
    folder_classes = discover_classes(data_dir)
    unknown = sorted(set(folder_classes) - set(known))
    if unknown:
        fail(f"{data_dir} has classes the model does not know: {', '.join(unknown)}")
    report = scan_dataset(data_dir, settings.limits)
    examples, _ = examples_from_report(report, folder_classes)
    done = recalibrate(
        artifact,
        [example.path for example in examples],
        [known.index(example.class_name) for example in examples],
        settings.limits,
        target_precision=target,
        holdout=holdout,
        seed=settings.train.seed,
        models_dir=settings.models_dir,
        fitted_on=f"{data_dir} ({len(examples)} images, {holdout:.0%} held out)",
    )
    calibration = done.calibration
    console.print(
        f"temperature {calibration.temperature:.4f} fitted on {calibration.samples} images; "
        f"ECE {calibration.ece_before:.4f} -> {calibration.ece_after:.4f} on them",
        highlight=False,
    )
    held = done.holdout
    if held.get("images"):
        console.print(
            f"held out {held['images']} images: ECE {held['ece_before']:.4f} raw, "
            f"{held['ece_after']:.4f} calibrated ({floor_note(held, held['images'])}); "
            f"accuracy {held['accuracy']:.4f} (unchanged "
            f"by calibration); {held['uncertain']} uncertain",
            highlight=False,
        )
    for name, threshold in calibration.thresholds.items():
        shown = "none reached: always uncertain" if threshold is None else f"{threshold:.4f}"
        console.print(f"threshold {name}: {shown}", highlight=False)
    console.print(
        f"wrote {done.directory}; promote it with `emolabel models promote {done.directory}`",
        highlight=False,
    )


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    model: Annotated[
        str | None, typer.Option(help="Artifact folder or version (default: latest).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image.")] = False,
    draw: Annotated[
        Path | None,
        typer.Option(
            help="Face models: write each photo with its face boxes and labels drawn here (a "
            "file for one image, a folder for several); the originals are never touched."
        ),
    ] = None,
) -> None:
    """Print label and confidence per image, preprocessing taken from the model's metadata.

    A face model (subject `face`) labels each face it finds: one line per face with its box, or
    `no_face` for a photo without one.
    """
    from training.artifacts import load_artifact

    settings = settings_from()
    load_keras(settings.keras_backend)
    artifact = load_artifact(model, settings.models_dir, settings.model_name)
    if artifact.metadata.subject == "face":
        rows = _predict_faces(artifact, images, settings, draw)
    else:
        if draw is not None:
            fail("--draw draws face boxes: this model's subject is image, not face")
        rows = _predict_images(artifact, images, settings)
    for row in rows:
        if as_json:
            print(json.dumps(row | {"model_version": artifact.metadata.version}))
        else:
            _print_row(row)
    if any("error" in row for row in rows):
        raise typer.Exit(EXIT_PARTIAL)


def _print_row(row: dict[str, Any]) -> None:
    image = row["image"]
    if "error" in row:
        console.print(f"{image}\t[red]{row['error']}[/]\t{row['detail']}", highlight=False)
    elif row.get("outcome") == "no_face":
        console.print(f"{image}\tno_face", highlight=False)
    elif "faces" in row:
        for face in row["faces"]:
            box = ",".join(str(value) for value in face["box"])
            doubt = f"\tuncertain (or {face['runner_up']})" if face.get("uncertain") else ""
            console.print(
                f"{image}\tface {face['index']}\t{box}\t{face['label']}\t"
                f"{face['confidence']:.4f}{doubt}",
                highlight=False,
            )
    else:
        doubt = f"\tuncertain (or {row['runner_up']})" if row.get("outcome") == "uncertain" else ""
        console.print(f"{image}\t{row['label']}\t{row['confidence']:.4f}{doubt}", highlight=False)


def _read_error(error: Exception) -> dict[str, str]:
    from core.errors import ImageError

    if isinstance(error, ImageError):
        return {"error": error.reason.value, "detail": str(error)}
    detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return {"error": "unreadable", "detail": detail}


def _predict_images(
    artifact: Artifact, images: list[Path], settings: Settings
) -> list[dict[str, Any]]:
    """A whole-image model: one label per image."""
    import numpy as np

    from core.errors import ImageError
    from training.inference import predict_scores, thresholds_of, to_predictions
    from training.preprocess import load_image_file

    rows: list[dict[str, Any]] = []
    loaded: list[tuple[int, Any]] = []
    for index, path in enumerate(images):
        rows.append({"image": str(path)})
        try:
            loaded.append((index, load_image_file(path, artifact.spec, settings.limits)))
        except (ImageError, OSError) as error:
            rows[index] |= _read_error(error)
    if loaded:
        scores = predict_scores(artifact, np.stack([pixels for _, pixels in loaded]))
        predictions = to_predictions(
            scores, artifact.metadata.class_names, thresholds_of(artifact.metadata)
        )
        for (index, _), result in zip(loaded, predictions, strict=True):
            rows[index] |= {
                "outcome": "uncertain" if result.uncertain else "labeled",
                "label": result.label,
                "confidence": round(result.confidence, 6),
                "runner_up": result.runner_up,
            }
            rows[index]["scores"] = {k: round(v, 6) for k, v in result.scores.items()}
    return rows


def _predict_faces(
    artifact: Artifact, images: list[Path], settings: Settings, draw: Path | None
) -> list[dict[str, Any]]:
    """A face model: detect, crop and classify every face; all photos' faces in shared batches."""
    from core.errors import ImageError
    from training.faces.labeling import DetectedFaces, classify_faces, find_faces
    from training.preprocess import read_image_file

    targets = _draw_targets(images, draw) if draw is not None else None
    detector = face_detector(settings)
    rows: list[dict[str, Any]] = []
    found: list[tuple[int, DetectedFaces]] = []
    for index, path in enumerate(images):
        rows.append({"image": str(path)})
        try:
            data = read_image_file(path, settings.limits)
            found.append(
                (index, find_faces(data, detector, artifact.spec, settings.faces, settings.limits))
            )
        except (ImageError, OSError) as error:
            rows[index] |= _read_error(error)
    results = classify_faces(artifact, [photo for _, photo in found])
    for (index, _), result in zip(found, results, strict=True):
        rows[index] |= result.to_json()
        if targets is not None:
            _draw(images[index], result, targets[index], settings)
    return rows


def _draw_targets(images: list[Path], draw: Path) -> list[Path]:
    """Where `--draw` writes each photo: `draw` itself for one image, else `draw/<name>.png`."""
    if len(images) == 1 and not draw.is_dir():
        targets = [draw]
    else:
        if draw.exists() and not draw.is_dir():
            fail(f"--draw {draw}: give a folder for several images")
        names: dict[str, int] = {}
        targets = []
        for path in images:
            count = names[path.stem] = names.get(path.stem, 0) + 1
            stem = path.stem if count == 1 else f"{path.stem}-{count}"
            targets.append(draw / f"{stem}.png")
    originals = {path.resolve() for path in images if path.exists()}
    for target in targets:
        if target.resolve() in originals:
            fail(f"--draw {target} is one of the input images; it is never overwritten")
        if target.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            fail(f"--draw {target}: use a .png, .jpg, .webp or .bmp file name")
    return targets


def _draw(source: Path, result: PhotoFaces, target: Path, settings: Settings) -> None:
    """Write the photo (at its detection size) with its faces drawn, atomically."""
    import cv2

    from training.faces.drawing import draw_faces
    from training.faces.scene import decode_for_faces
    from training.preprocess import read_image_file

    photo = decode_for_faces(
        read_image_file(source, settings.limits), settings.faces.detect_side, settings.limits
    )
    drawn = draw_faces(photo.detection, result)
    encoded, buffer = cv2.imencode(target.suffix.lower(), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
    if not encoded:
        fail(f"--draw {target}: the picture could not be encoded")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(buffer.tobytes())
    partial.replace(target)


@app.command("import-model")
def import_model_command(
    file: Annotated[Path, typer.Argument(help="A .keras or legacy .h5 Keras model.")],
    classes: Annotated[str, typer.Option(help="Class names in output order, comma-separated.")],
    color: Annotated[
        str | None, typer.Option(help="grayscale or rgb (checked against the model).")
    ] = None,
    scale: Annotated[
        str | None,
        typer.Option(
            help="Pixel multiplier such as 1/255 (default: 1 if the model rescales, else 1/255)."
        ),
    ] = None,
    offset: Annotated[float, typer.Option(help="Added after scaling (e.g. -1 for [-1, 1]).")] = 0.0,
    image_size: Annotated[
        int | None, typer.Option(help="Only for models of any input size.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Artifact family name.")] = None,
    subject: Annotated[str, typer.Option(help=SUBJECT_HELP)] = "image",
) -> None:
    """Wrap a third-party Keras classifier with metadata so it is served like ours."""
    from training.importing import import_model

    if color is not None and color not in ("rgb", "grayscale"):
        fail(f"--color {color!r}: use rgb or grayscale")
    chosen_subject = checked_subject(subject)
    settings = settings_from()
    load_keras(settings.keras_backend)
    directory = import_model(
        file,
        split_names(classes),
        settings.models_dir,
        name or settings.model_name,
        color_mode=color,  # type: ignore[arg-type]
        scale=scale,
        offset=offset,
        image_size=image_size,
        subject=chosen_subject,
    )
    console.print(f"imported {file} as {directory}", highlight=False)


@app.command("settings")
def show_settings(
    table: Annotated[
        bool, typer.Option("--table", help="Print the README's Markdown table.")
    ] = False,
) -> None:
    """Show the effective settings (or the table of every setting and its default)."""
    from core.redaction import mask_urls
    from core.settings import settings_table

    if table:
        print(settings_table())
        return
    # Secret settings dump as `**********`; URLs keep everything but their passwords.
    console.print_json(data=mask_urls(settings_from().model_dump(mode="json")))
