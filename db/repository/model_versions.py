"""The `model_versions` table, the model registry: candidates, the one active model (a partial
unique index allows only one), retired and rejected versions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import (
    Table,
    select,
    update,
)
from sqlalchemy.orm import Session, aliased

from db.models import (
    NAME_LENGTH,
    ModelStatus,
    ModelVersion,
    utc_now,
)
from db.repository.base import (
    NotFoundError,
    check_text,
    dialect_insert,
    json_document,
)


def register_model(
    *,
    session: Session,
    version: str,
    name: str,
    artifact_path: str,
    class_names: Sequence[str],
    metrics: Mapping[str, Any] | None = None,
    notes: str | None = None,
    model_sha256: str | None = None,
    metadata_sha256: str | None = None,
) -> ModelVersion:
    """Register a model version as a candidate; registering the same artifact again is a no-op.

    The hashes of `model.keras` and `metadata.json` are stored with a new row. Registering again
    with other hashes is refused; a row without hashes keeps none (`set_model_hashes` is the
    explicit way to record them).
    """
    check_text(version, "version", max_length=NAME_LENGTH)
    check_text(name, "name", max_length=NAME_LENGTH)
    check_text(artifact_path, "artifact_path")
    classes = list(class_names)
    if not classes or len(set(classes)) != len(classes) or not all(classes):
        raise ValueError(f"class_names must be distinct non-empty names, got {classes}")
    statement = dialect_insert(session, cast(Table, ModelVersion.__table__)).values(
        version=version,
        name=name,
        artifact_path=artifact_path,
        class_names=classes,
        metrics=json_document(dict(metrics or {}), "metrics"),
        status=ModelStatus.CANDIDATE,
        created_at=utc_now(),
        notes=notes,
        model_sha256=model_sha256,
        metadata_sha256=metadata_sha256,
    )
    # Two workers may register the version they both loaded at the same moment.
    session.execute(statement.on_conflict_do_nothing(index_elements=["version"]))
    model = session.scalars(
        select(ModelVersion).where(ModelVersion.version == version),
        execution_options={"populate_existing": True},
    ).one()
    if model.class_names != classes or model.artifact_path != artifact_path:
        raise ValueError(
            f"model version {version} is already registered with {model.artifact_path} and"
            f" classes {model.class_names}: give the new artifact a new version"
        )
    recorded = (model.model_sha256, model.metadata_sha256)
    if None not in recorded and recorded != (model_sha256, metadata_sha256):
        raise ValueError(
            f"model version {version} is already registered with other files (model.keras or"
            " metadata.json changed since): give the new artifact a new version"
        )
    return model


def set_model_hashes(
    *, session: Session, version: str, model_sha256: str, metadata_sha256: str
) -> ModelVersion:
    """Record the SHA-256 of a version's `model.keras` and `metadata.json` (an operator's act)."""
    for value, what in ((model_sha256, "model_sha256"), (metadata_sha256, "metadata_sha256")):
        if len(value) != 64 or value.strip("0123456789abcdef"):
            raise ValueError(f"{what} must be 64 lowercase hex digits, got {value!r}")
    model = session.get(ModelVersion, version)
    if model is None:
        raise NotFoundError(f"no model version {version!r} is registered")
    model.model_sha256, model.metadata_sha256 = model_sha256, metadata_sha256
    session.flush()
    return model


def set_active_model(*, session: Session, version: str) -> ModelVersion:
    """Promote `version` to the one active model, retiring the previous one."""
    model = session.scalars(
        select(ModelVersion).where(ModelVersion.version == version).with_for_update()
    ).one_or_none()
    if model is None:
        raise NotFoundError(f"no model version {version!r} is registered")
    if model.status is ModelStatus.ACTIVE:
        return model
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.status == ModelStatus.ACTIVE)
        .values(status=ModelStatus.RETIRED)
    )
    # Retire first: the partial unique index refuses two active rows even for a moment.
    session.flush()
    model.status = ModelStatus.ACTIVE
    model.promoted_at = utc_now()
    session.flush()
    return model


def promote_if_active(*, session: Session, version: str, expected: str | None) -> bool:
    """Compare and set: make `version` active only while `expected` is still the active model
    (None: while no model is active). False, changing nothing, when another promotion or a
    rollback came first.

    The comparison is the database's, in the same statement as the change: the row of `expected`
    is retired only `WHERE` it is still active (or the new one activated only `WHERE NOT EXISTS`
    an active row), so a promotion committed between a read and this write is never overwritten.
    """
    model = session.get(ModelVersion, version)
    if model is None:
        raise NotFoundError(f"no model version {version!r} is registered")
    if expected is not None:
        retired = session.execute(
            update(ModelVersion)
            .where(ModelVersion.version == expected, ModelVersion.status == ModelStatus.ACTIVE)
            .values(status=ModelStatus.RETIRED)
            .execution_options(synchronize_session=False)
        )
        if _rowcount(retired) != 1:
            return False
        # Retired before the new one is activated: the partial unique index allows one active.
        promoted = session.execute(
            update(ModelVersion)
            .where(ModelVersion.version == version)
            .values(status=ModelStatus.ACTIVE, promoted_at=utc_now())
            .execution_options(synchronize_session=False)
        )
    else:
        active = aliased(ModelVersion)
        promoted = session.execute(
            update(ModelVersion)
            .where(
                ModelVersion.version == version,
                ~select(active.version).where(active.status == ModelStatus.ACTIVE).exists(),
            )
            .values(status=ModelStatus.ACTIVE, promoted_at=utc_now())
            .execution_options(synchronize_session=False)
        )
    session.expire_all()
    return _rowcount(promoted) == 1


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0))


def set_model_status(*, session: Session, version: str, status: ModelStatus) -> ModelVersion:
    """Reject or retire a model version (promotion goes through `set_active_model`)."""
    if status is ModelStatus.ACTIVE:
        raise ValueError("use set_active_model to promote a model, so only one is active")
    model = session.get(ModelVersion, version)
    if model is None:
        raise NotFoundError(f"no model version {version!r} is registered")
    model.status = status
    session.flush()
    return model


def active_model(*, session: Session) -> ModelVersion | None:
    """The active model version, or None before the first promotion."""
    query = select(ModelVersion).where(ModelVersion.status == ModelStatus.ACTIVE)
    return session.scalars(query).one_or_none()


def list_models(
    *, session: Session, name: str | None = None, status: ModelStatus | None = None
) -> list[ModelVersion]:
    """Registered model versions, oldest first."""
    query = select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.version)
    if name is not None:
        query = query.where(ModelVersion.name == name)
    if status is not None:
        query = query.where(ModelVersion.status == status)
    return list(session.scalars(query))


def get_model(*, session: Session, version: str) -> ModelVersion | None:
    """The registered model version `version`, or None."""
    return session.get(ModelVersion, version)


def previous_active_model(*, session: Session) -> ModelVersion | None:
    """The retired version that was promoted most recently (the one a rollback restores)."""
    query = (
        select(ModelVersion)
        .where(
            ModelVersion.status == ModelStatus.RETIRED,
            ModelVersion.promoted_at.is_not(None),
        )
        .order_by(ModelVersion.promoted_at.desc())
        .limit(1)
    )
    return session.scalars(query).first()
