"""An artifact's `metadata.json`: its schema, and reading and writing it.

This module imports neither Keras nor OpenCV, so `emolabel models show` and the registry read a
model's description in milliseconds; `training.artifacts` loads the model itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from core.errors import ModelError
from training.trust import (
    METADATA_FILE,
    MODEL_FILE,
    REGISTRY,
    ArtifactHashes,
    check_hash,
    file_sha256,
)

# Bumped whenever training/preprocess.py changes what a model sees; every artifact records it.
PREPROCESS_VERSION = 1
SCHEMA_VERSION = 1
# Every result row stores a class name in `results.label` (db.models.NAME_LENGTH characters).
MAX_CLASS_NAME = 128


def overlong_class_names(names: Sequence[str]) -> list[str]:
    """The names that do not fit `results.label` (empty ones included)."""
    return [name for name in names if not 0 < len(name) <= MAX_CLASS_NAME]


Head = Literal["sigmoid", "softmax"]
# What one model input shows: the whole picture, or one face (served detect -> crop -> classify).
Subject = Literal["image", "face"]


class InputMetadata(BaseModel):
    """The model's input, and how 0..255 pixels are mapped onto it outside the model."""

    height: int = Field(ge=1)
    width: int = Field(ge=1)
    color_mode: Literal["rgb", "grayscale"]
    pixel_scale: float = 1.0
    pixel_offset: float = 0.0
    scaling_in_model: bool = Field(
        True, description="True when the model rescales itself (a Rescaling layer)."
    )


class Calibration(BaseModel):
    """How raw scores become calibrated confidences, and when a label is `uncertain`.

    See training/calibration.py: `temperature` divides the log-probabilities; a label whose
    calibrated confidence is below `thresholds[label]` (None: the class never reached the target
    precision on the fitting set) is uncertain. `ece_before`/`ece_after` are measured on the set
    it was fitted on.
    """

    method: Literal["temperature"] = "temperature"
    temperature: float = Field(gt=0)
    fitted_on: str
    samples: int = Field(ge=1)
    target_precision: float = Field(gt=0, lt=1)
    thresholds: dict[str, float | None]
    ece_before: float = Field(ge=0)
    ece_after: float = Field(ge=0)


class ModelMetadata(BaseModel):
    """The contents of `metadata.json`."""

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    class_names: list[str] = Field(min_length=2)
    head: Head
    input: InputMetadata
    preprocess_version: int = PREPROCESS_VERSION
    source: Literal["trained", "imported"] = "trained"
    # Artifacts written before subjects existed were all served on whole images.
    subject: Subject = "image"
    created_at: str = Field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())
    training: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    # None: not calibrated (raw scores served, no label is ever uncertain).
    calibration: Calibration | None = None
    model_sha256: str = ""
    libraries: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _head_matches_classes(self) -> ModelMetadata:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class names must be unique")
        if overlong_class_names(self.class_names):
            raise ValueError(f"class names must be 1 to {MAX_CLASS_NAME} characters long")
        if self.head == "sigmoid" and len(self.class_names) != 2:
            raise ValueError("a sigmoid head serves exactly two classes")
        if self.calibration is not None and set(self.calibration.thresholds) != set(
            self.class_names
        ):
            raise ValueError("calibration thresholds must name exactly the model's classes")
        return self

    @property
    def output_width(self) -> int:
        return 1 if self.head == "sigmoid" else len(self.class_names)


def new_version() -> str:
    """A sortable, unique-enough version name: UTC time to the millisecond."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-%f")[:-3]


def library_versions() -> dict[str, str]:
    """Versions of what shaped the model, recorded so a result can be traced and reproduced."""
    versions = {"python": platform.python_version()}
    for package in (
        "keras",
        "tensorflow",
        "tensorflow-cpu",
        "jax",
        "numpy",
        "opencv-python-headless",
    ):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def write_metadata(directory: Path, metadata: ModelMetadata) -> None:
    """Write metadata.json atomically, with the model file's hash filled in."""
    model_file = directory / MODEL_FILE
    if model_file.exists():
        metadata = metadata.model_copy(update={"model_sha256": file_sha256(model_file)})
    temporary = directory / (METADATA_FILE + ".tmp")
    temporary.write_text(json.dumps(metadata.model_dump(mode="json"), indent=2) + "\n")
    temporary.replace(directory / METADATA_FILE)


def parse_metadata(path: Path, content: bytes) -> ModelMetadata:
    """Validate the bytes of `metadata.json` read from `path`; ModelError says what is wrong."""
    try:
        raw = json.loads(content)
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelError(f"{path}: unreadable metadata ({error})") from None
    try:
        return ModelMetadata.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ModelError(
            f"{path}: invalid metadata at {where or 'top level'}: {first['msg']}"
        ) from None


def read_metadata(directory: Path, expected: ArtifactHashes | None = None) -> ModelMetadata:
    """Parse `metadata.json`; with `expected` (the registry's hashes), refuse other bytes first."""
    path = directory / METADATA_FILE
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{directory}: no {METADATA_FILE}; not a model artifact") from None
    except OSError as error:
        raise ModelError(f"{path}: unreadable metadata ({error})") from None
    if expected is not None:
        # The bytes that are parsed are the bytes that were hashed.
        actual = hashlib.sha256(content).hexdigest()
        check_hash(path, actual, expected.metadata_sha256, REGISTRY)
    return parse_metadata(path, content)
