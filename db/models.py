"""The ledger and results store: eleven tables, the same schema on PostgreSQL and SQLite.

`images`
    One row per file ever seen, keyed by `uri` (unique, always valid UTF-8: a file name whose
    bytes are not UTF-8 is percent-encoded in the URI and its raw bytes are kept in `name_bytes`).
    `fingerprint` identifies the file version cheaply (`"<size>-<mtime_ns>"` for a local file, the
    ETag for an object store); `size_bytes`, `mtime_ns`, `content_sha256`, `width` and `height`
    are filled when known. `first_seen_at` / `updated_at` are UTC timestamps.

`jobs`
    One labeling run over a `source` (a folder or `s3://bucket/prefix`) with its `options` (JSON).
    `status` moves scanning -> queued -> running -> done (or failed / cancelled); `enqueued` is
    the number of images the producer put in the job's ledger; `model_version` is the model the
    job was started for; `error` says why a job failed. `next_chunk_index` hands out chunk
    numbers (the only place they come from); `producer` and `heartbeat_at` say who is scanning
    and when it was last alive. `unread` counts by reason the files the scan did not itemize:
    those of folder runs it knew to be settled (see `listings`); they count among the skipped.

`chunks`
    The messages of a job, keyed by (`job_id`, `chunk_index`): `size` URIs each. A chunk is
    recorded (`pending`) *before* it is published, so a message lost by the broker can be found
    and published again; `attempts` counts publications, `task_id` is the Celery task id.
    `deliveries` counts starts by a worker, `crashes` the starts that ended with the worker
    process dead. `done` once a worker committed its outcomes.

`job_items`
    The per-image ledger, keyed by (`job_id`, `image_id`): every image a job touches has exactly
    one row, in `chunk_index` (NULL when skipped while scanning), with `state` pending, labeled,
    uncertain (labeled below the class's calibrated threshold: a person should look), no_face
    (a face model found no face: neither a failure nor a label), failed or skipped, a
    short `reason` code for failed and skipped rows ('corrupt', 'too_many_pixels',
    'not_an_image', 'already_labeled', ...), a human `message`, and `attempts` (how many times a
    worker reported on it). Hence the counts of a job balance:
    enqueued = labeled + uncertain + no_face + failed + skipped + pending, where skipped
    includes the files the job counted in `jobs.unread` without a row each. The table has no
    foreign keys (migration 0008 took them off the scan's hot insert): only the scan adds rows,
    for images its transaction has just upserted and a job whose row it holds locked, and
    images and jobs are never deleted (`retention` deletes old jobs' ledger rows explicitly).

`listings`
    What a scan learned of a run of files in one folder (`core.storage.entries.Run`), keyed by
    the run's `key`: the listing's `digest` (names, sizes, times), the `model_version` that had
    labeled or settled every one of its files when that digest was read, and their `counts` by
    skip reason. A later scan by that model that lists the same digest counts the run's files
    into `jobs.unread` without reading them or writing a ledger row each: a nightly rescan of an
    unchanged archive writes almost nothing. A run read again is written again (or deleted when
    not settled), so a row always tells of the run's latest reading.

`results`
    One label per (`image_id`, `model_version`): `label`, its `confidence`, every class score in
    `scores` (JSON object {class: score}), the `fingerprint` of the image version that was
    labeled, the `job_id` that wrote it and `created_at`. A redelivered chunk writes nothing
    twice; an image whose fingerprint changed is labeled again in place.
    `face_count` says what the label is about: NULL for a whole-image model (the label is the
    photo's); for a face model, the number of faces found, the photo-level label being the
    largest face's (its box area; ties: higher detector score, then lower face index). A face
    model that found no face writes `face_count` 0 with `label` and `confidence` NULL and
    `scores` {}: the image is decided for that model version (a rescan skips it) but unlabeled.
    `uncertain` is true when the label is below its class's threshold (a face model: any face
    is), with the `runner_up` class and its `runner_up_confidence` kept beside the label.

`faces`
    One row per face a face model labeled, keyed by (`image_id`, `model_version`,
    `face_index`) and tied to its photo's `results` row (deleted with it): the box `x`, `y`,
    `width`, `height` in pixels of the original, EXIF-oriented image, the `detector_score`, the
    face's `label`, `confidence`, `scores`, `uncertain`, `runner_up` and its confidence, `job_id`
    and `created_at`. Written with the
    photo's results row in one transaction, and replaced whole whenever that row is rewritten,
    so an (image, model version) has exactly one set of faces.

`model_versions`
    The model registry, keyed by `version`: `name`, `artifact_path`, `class_names` (JSON list, in
    output index order), `metrics` (JSON), `status` candidate, active, retired or rejected (at
    most one active: a partial unique index enforces it), `created_at`, `promoted_at`, `notes`,
    and the SHA-256 of the model file and of its metadata (`model_sha256`, `metadata_sha256`),
    checked at every load.

`refused_messages`
    Chunk messages a worker refused because they disagree with the ledger (unknown job or
    chunk, other images than the chunk holds, malformed): the `reason` code, a `message`, and
    the job, chunk and task ids as far as the message gave them.

`retrain_runs`
    One row per retraining attempt: when it ran, the `challenger_version` and the
    `champion_version` it was compared with, the `data_fingerprint` of the training data, the
    evaluation `metrics` (JSON), the `decision` (promoted, rejected, held or failed) and its
    `reason`, the `reviewed_items` (human labels) the challenger trained on, and its label
    `churn` on an archive sample (JSON).

`reviews`
    One row per human verdict on a label: the `image_id` and `face_index` (NULL for a whole-image
    label), the `model_version` whose label was looked at and its `old_label`, the `new_label`
    (equal to the old one: accepted; else corrected), the `reviewer`, the `job_id` it was
    reviewed in, the image `fingerprint` the person saw and `created_at`. The latest verdict on
    an (image, face) is its human label: `export` shows it, retraining learns from it.

Timestamps are stored as UTC and read back timezone-aware on both databases. Statuses are
stored as plain strings with CHECK constraints, never as native enum types, so adding a value
is a small migration on either database.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Short identifiers (versions, labels, reason codes, fingerprints) share one generous length.
NAME_LENGTH = 128
REASON_LENGTH = 64

# SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid alias), never a BIGINT one.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# JSONB on PostgreSQL is indexable and queryable with the same `->>` as SQLite's JSON text.
JsonDocument = JSON().with_variant(JSONB(), "postgresql")


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}: pass a timezone-aware one")
        return value.astimezone(dt.UTC)

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def utc_now() -> dt.datetime:
    """The current time, timezone-aware UTC (the default of every timestamp column)."""
    return dt.datetime.now(dt.UTC)


class JobStatus(StrEnum):
    """Where a job is: scanning -> queued -> running -> done, or failed / cancelled."""

    SCANNING = "scanning"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ChunkStatus(StrEnum):
    """A chunk is recorded (pending), then published, then done once its outcomes committed."""

    PENDING = "pending"
    PUBLISHED = "published"
    DONE = "done"


class ItemState(StrEnum):
    """The one state of an image in a job's ledger."""

    PENDING = "pending"
    LABELED = "labeled"
    NO_FACE = "no_face"  # a face model found no face: decided, neither labeled nor failed
    # Labeled below its class's threshold (the artifact's calibration): a person should look.
    UNCERTAIN = "uncertain"
    FAILED = "failed"
    SKIPPED = "skipped"


class ModelStatus(StrEnum):
    """A registered model: candidate until promoted (active) or rejected; retired when replaced."""

    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"
    REJECTED = "rejected"


class RetrainDecision(StrEnum):
    """What a retraining run concluded."""

    PROMOTED = "promoted"
    REJECTED = "rejected"
    # Better on the frozen test split, but it would change more archive labels than allowed.
    HELD = "held"
    FAILED = "failed"


def _enum_values(enum_class: type[StrEnum]) -> list[str]:
    return [member.value for member in enum_class]


def status_type(enum_class: type[StrEnum], name: str) -> Enum:
    """A StrEnum stored as its value in a VARCHAR with a CHECK constraint named after `name`."""
    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        # Room to add values later without widening the column.
        length=16,
        values_callable=_enum_values,
        validate_strings=True,
    )


class Base(DeclarativeBase):
    """Declarative base whose metadata names every constraint predictably (for migrations)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dt.datetime: UtcDateTime(),
        dict[str, Any]: JsonDocument,
    }


class Image(Base):
    """A file seen in an archive (see the module docstring)."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    uri: Mapped[str] = mapped_column(Text, unique=True)
    name_bytes: Mapped[bytes | None] = mapped_column(LargeBinary)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    fingerprint: Mapped[str] = mapped_column(String(NAME_LENGTH))
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    first_seen_at: Mapped[dt.datetime] = mapped_column(default=utc_now, server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(
        default=utc_now, onupdate=utc_now, server_default=func.now()
    )


class Job(Base):
    """One labeling run over a source (see the module docstring)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(Text)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[JobStatus] = mapped_column(
        status_type(JobStatus, "job_status"), default=JobStatus.SCANNING
    )
    model_version: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[dt.datetime] = mapped_column(default=utc_now, server_default=func.now())
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    enqueued: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    # The next chunk number to hand out: every writer (scan, split, retry) takes its numbers
    # here, in its own transaction, so two writers can never give two chunks one number.
    next_chunk_index: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # Who is scanning (host:pid) and when it last said so; a scan whose heartbeat stops is
    # finished by the reconciler.
    producer: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    heartbeat_at: Mapped[dt.datetime | None]
    # `summary`: the counts by state and by (state, reason) of the job's ledger rows, kept when
    # the job finishes (so `status` of a huge finished job reads one row; cleared when it is
    # reopened) and by `emolabel prune`, which sets `pruned_at` and deletes the rows and chunks,
    # so the job still tells its story.
    pruned_at: Mapped[dt.datetime | None]
    summary: Mapped[dict[str, Any] | None]
    unread: Mapped[dict[str, Any] | None]


class Listing(Base):
    """A run of files a scan read, and whether a model had settled all of them (docstring)."""

    __tablename__ = "listings"

    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    digest: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[str] = mapped_column(String(NAME_LENGTH))
    files: Mapped[int] = mapped_column(Integer)
    counts: Mapped[dict[str, Any]]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utc_now, server_default=func.now())


class Chunk(Base):
    """One message of a job, recorded before it is published (see the module docstring)."""

    __tablename__ = "chunks"

    job_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    chunk_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    status: Mapped[ChunkStatus] = mapped_column(
        status_type(ChunkStatus, "chunk_status"), default=ChunkStatus.PENDING
    )
    published_at: Mapped[dt.datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # Times a worker started this chunk; more starts than finishes means a process died in it.
    deliveries: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # Deliveries that ended with the process holding this chunk dead (counted by the worker's
    # parent process, which outlives its child): only these count towards `poison`.
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    task_id: Mapped[str | None] = mapped_column(String(NAME_LENGTH))


class JobItem(Base):
    """The ledger row of one image in one job (see the module docstring)."""

    __tablename__ = "job_items"
    __table_args__ = (
        Index("ix_job_items_job_id_state", "job_id", "state"),
        # An image's rows in any job (the primary key leads with the job): migration 0007.
        Index("ix_job_items_image_id", "image_id"),
    )

    # No foreign keys (migration 0008): two checks per row were most of the server's work in a
    # scan. The scan alone inserts here, naming images its transaction just upserted and a job
    # whose row it holds locked; images and jobs are never deleted.
    job_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    image_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    chunk_index: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[ItemState] = mapped_column(
        status_type(ItemState, "item_state"), default=ItemState.PENDING
    )
    reason: Mapped[str | None] = mapped_column(String(REASON_LENGTH))
    message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    updated_at: Mapped[dt.datetime] = mapped_column(
        default=utc_now, onupdate=utc_now, server_default=func.now()
    )


class Result(Base):
    """The label of one image by one model version (see the module docstring)."""

    __tablename__ = "results"
    __table_args__ = (
        # A label exactly when the model labeled something: not for a face model's no_face.
        CheckConstraint(
            "(face_count = 0 AND label IS NULL AND confidence IS NULL)"
            " OR (label IS NOT NULL AND confidence IS NOT NULL"
            " AND (face_count IS NULL OR face_count > 0))",
            name="label_unless_no_face",
        ),
    )

    image_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    # Not a foreign key: a worker may write with a model that was never registered here.
    model_version: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True, index=True)
    label: Mapped[str | None] = mapped_column(String(NAME_LENGTH), index=True)
    confidence: Mapped[float | None] = mapped_column(Float)
    scores: Mapped[dict[str, Any]]
    fingerprint: Mapped[str] = mapped_column(String(NAME_LENGTH))
    job_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utc_now, server_default=func.now())
    # NULL: a whole-image model; otherwise the faces a face model found (0: no face).
    face_count: Mapped[int | None] = mapped_column(Integer)
    # Below its class's threshold (or, for a face model, any face is): job item `uncertain`.
    uncertain: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The second likeliest class and its score: what a reviewer most likely picks instead.
    runner_up: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    runner_up_confidence: Mapped[float | None] = mapped_column(Float)


class Face(Base):
    """One face a face model labeled in an image (see the module docstring)."""

    __tablename__ = "faces"
    __table_args__ = (
        # The faces belong to their photo's result: rewriting or deleting it takes them along.
        ForeignKeyConstraint(
            ["image_id", "model_version"],
            ["results.image_id", "results.model_version"],
            ondelete="CASCADE",
        ),
        CheckConstraint("width > 0 AND height > 0 AND x >= 0 AND y >= 0", name="box"),
    )

    image_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    model_version: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    face_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The box in pixels of the original image as its EXIF orientation shows it.
    x: Mapped[int] = mapped_column(Integer)
    y: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    detector_score: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(NAME_LENGTH))
    confidence: Mapped[float] = mapped_column(Float)
    scores: Mapped[dict[str, Any]]
    job_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utc_now, server_default=func.now())
    uncertain: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    runner_up: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    runner_up_confidence: Mapped[float | None] = mapped_column(Float)


class ModelVersion(Base):
    """A registered model artifact (see the module docstring)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        # At most one active model, enforced by the database as well as by the repository.
        Index(
            "uq_model_versions_one_active",
            "status",
            unique=True,
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
    )

    version: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    artifact_path: Mapped[str] = mapped_column(Text)
    class_names: Mapped[list[str]] = mapped_column(JsonDocument)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[ModelStatus] = mapped_column(
        status_type(ModelStatus, "model_status"), default=ModelStatus.CANDIDATE
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utc_now, server_default=func.now())
    promoted_at: Mapped[dt.datetime | None]
    notes: Mapped[str | None] = mapped_column(Text)
    # SHA-256 of model.keras and of metadata.json as registered; checked at every load.
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    metadata_sha256: Mapped[str | None] = mapped_column(String(64))


class RefusedMessage(Base):
    """A chunk message a worker refused because the ledger disagrees with it."""

    __tablename__ = "refused_messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int | None] = mapped_column(BigInteger)
    chunk_index: Mapped[int | None] = mapped_column(Integer)
    task_id: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    reason: Mapped[str] = mapped_column(String(REASON_LENGTH))
    message: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[dt.datetime] = mapped_column(default=utc_now, server_default=func.now())


class RetrainRun(Base):
    """One retraining attempt and its decision (see the module docstring)."""

    __tablename__ = "retrain_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    started_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]
    challenger_version: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    champion_version: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    data_fingerprint: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    decision: Mapped[RetrainDecision] = mapped_column(
        status_type(RetrainDecision, "retrain_decision")
    )
    reason: Mapped[str | None] = mapped_column(Text)
    # Human-reviewed items the challenger's training set took (train, validation and holdout).
    reviewed_items: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # Label churn on an archive sample, champion -> challenger: sample size, changed, and the
    # {from: {to: count}} table.
    churn: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Review(Base):
    """A person's verdict on one label: accepted (new = old) or corrected (see the docstring)."""

    __tablename__ = "reviews"
    __table_args__ = (Index("ix_reviews_image_id_face_index", "image_id", "face_index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("images.id", ondelete="CASCADE"))
    # NULL: the whole image's label; else the face (its index in the model version's faces).
    face_index: Mapped[int | None] = mapped_column(Integer)
    # The model version whose label was reviewed, and the label it gave.
    model_version: Mapped[str] = mapped_column(String(NAME_LENGTH))
    old_label: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    new_label: Mapped[str] = mapped_column(String(NAME_LENGTH))
    reviewer: Mapped[str] = mapped_column(String(NAME_LENGTH))
    job_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("jobs.id", ondelete="SET NULL")
    )
    # The image version (fingerprint) the person looked at: a changed file is not reused.
    fingerprint: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[dt.datetime] = mapped_column(default=utc_now, server_default=func.now())
