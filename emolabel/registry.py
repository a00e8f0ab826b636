"""Which model labels: the database registry, seeded from the artifacts folder when it is empty.

Reads `metadata.json` as plain JSON, so the producer can ask without importing TensorFlow or
OpenCV. The worker loads whatever version is active when a chunk starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy.orm import Session

from db.models import ModelVersion
from db.repository import active_model, promote_if_active, register_model, set_active_model
from emolabel.errors import ConfigError, ModelError

METADATA_FILE = "metadata.json"


def latest_artifact(models_dir: Path, name: str) -> Path | None:
    """The newest complete artifact folder under `<models_dir>/<name>/`, if any."""
    family = models_dir / name
    versions = sorted(child for child in family.glob("*") if (child / METADATA_FILE).is_file())
    return versions[-1] if versions else None


def register_artifact(*, session: Session, directory: Path, activate: bool) -> ModelVersion:
    """Record an artifact folder in the registry (again is a no-op), optionally making it active."""
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
        version = str(metadata["version"])
        name = str(metadata["name"])
        class_names = [str(item) for item in metadata["class_names"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{directory}: unreadable model metadata ({error})") from None
    record = register_model(
        session=session,
        version=version,
        name=name,
        artifact_path=str(directory.resolve()),
        class_names=class_names,
        metrics=metadata.get("metrics", {}).get("test", {}),
    )
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
    return register_artifact(session=session, directory=directory, activate=True)
