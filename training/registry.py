"""Which model labels: the database registry, seeded from the artifacts folder when it is empty.

Reads `metadata.json` through `training.metadata` (no Keras, no OpenCV), so the command line
asks in milliseconds. The worker loads whatever version is active when a chunk starts.
Registering records the SHA-256 of `model.keras` and `metadata.json`, after checking that the
model names no code-carrying layer and matches the hash its metadata records; workers refuse
files that no longer match. A row registered before hashes were recorded has none, and workers
refuse it until an operator vouches for its files with `emolabel models trust VERSION`
(`trust_artifact`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy.orm import Session

from core.errors import ConfigError, ModelError
from db.models import ModelVersion
from db.repository import (
    active_model,
    get_model,
    promote_if_active,
    register_model,
    set_active_model,
    set_model_hashes,
)
from training.metadata import ModelMetadata, parse_metadata
from training.trust import (
    METADATA_FILE,
    MODEL_FILE,
    ArtifactHashes,
    artifact_under,
    check_hash,
    check_model_file,
    file_sha256,
)


def latest_artifact(models_dir: Path, name: str) -> Path | None:
    """The newest complete artifact folder under `<models_dir>/<name>/`, if any."""
    family = models_dir / name
    versions = sorted(child for child in family.glob("*") if (child / METADATA_FILE).is_file())
    return versions[-1] if versions else None


def verified_artifact(directory: Path) -> tuple[ModelMetadata, str, str]:
    """An artifact's metadata and the SHA-256 of its model and metadata files, once its model is
    known to carry no code and to match the hash its metadata records."""
    path = directory / METADATA_FILE
    try:
        content = path.read_bytes()
    except OSError as error:
        raise ModelError(f"{directory}: unreadable model metadata ({error})") from None
    metadata = parse_metadata(path, content)
    model_file = directory / MODEL_FILE
    check_model_file(model_file)
    model_sha256 = file_sha256(model_file)
    check_hash(model_file, model_sha256, metadata.model_sha256, METADATA_FILE)
    return metadata, model_sha256, hashlib.sha256(content).hexdigest()


def register_artifact(*, session: Session, directory: Path, activate: bool) -> ModelVersion:
    """Record an artifact folder and its hashes in the registry (again is a no-op), optionally
    making it active."""
    metadata, model_sha256, metadata_sha256 = verified_artifact(directory)
    version, name, class_names = metadata.version, metadata.name, metadata.class_names
    try:
        record = register_model(
            session=session,
            version=version,
            name=name,
            artifact_path=str(directory.resolve()),
            class_names=class_names,
            metrics=metadata.metrics.get("test", {}),
            model_sha256=model_sha256,
            metadata_sha256=metadata_sha256,
        )
    except ValueError as error:  # the version is registered with other files or classes
        raise ModelError(f"{directory}: {error}") from None
    if activate:
        record = set_active_model(session=session, version=version)
    return record


def register_trained(*, session: Session, directory: Path) -> tuple[ModelVersion, bool]:
    """Record a freshly trained artifact; it becomes the active model only when none is active
    (so `train` then `retrain` has a champion to beat). Returns the record and whether it was
    activated."""
    record = register_artifact(session=session, directory=directory, activate=False)
    activated = promote_if_active(session=session, version=record.version, expected=None)
    return record, activated


def ensure_active_model(*, session: Session, models_dir: Path, name: str) -> ModelVersion:
    """The active model; with none yet, register and activate the newest artifact."""
    current = active_model(session=session)
    if current is not None:
        return current
    directory = latest_artifact(models_dir, name)
    if directory is None:
        raise ConfigError(
            f"no model to label with: none is active and {models_dir / name} holds no artifact; "
            "run `emolabel train DATA_DIR` or `emolabel import-model`"
        )
    return register_artifact(
        session=session, directory=artifact_under(directory, models_dir), activate=True
    )


def registered_hashes(*, session: Session, version: str, artifact_path: str) -> ArtifactHashes:
    """The hashes the registry recorded for `version` at `artifact_path` (None where missing)."""
    row = get_model(session=session, version=version)
    if row is None or row.artifact_path != artifact_path:
        raise ModelError(f"model version {version} at {artifact_path} is not registered")
    return ArtifactHashes(row.model_sha256, row.metadata_sha256)


def trust_artifact(*, session: Session, version: str, models_dir: Path) -> ModelVersion:
    """Record the current hashes of a registered version's files: the operator vouches for them.

    The files must still be under `models_dir`, carry no code and agree with each other (the model
    hash in `metadata.json`); the class names must be the ones registered.
    """
    row = get_model(session=session, version=version)
    if row is None:
        raise ModelError(f"no model version {version!r} is registered")
    directory = artifact_under(Path(row.artifact_path), models_dir)
    metadata, model_sha256, metadata_sha256 = verified_artifact(directory)
    if metadata.version != version or metadata.class_names != row.class_names:
        raise ModelError(
            f"{directory}: metadata.json names version {metadata.version!r} with classes "
            f"{metadata.class_names}, the registry {version!r} with {row.class_names}"
        )
    return set_model_hashes(
        session=session,
        version=version,
        model_sha256=model_sha256,
        metadata_sha256=metadata_sha256,
    )
