"""The one settings object, read from `EMOLABEL_*` environment variables and an optional `.env`.

Nested groups use `__`: `EMOLABEL_TRAIN__EPOCHS=30`. Build it once in an entry point with
`Settings()` and pass it down; nothing reads the environment anywhere else. Tests construct it
directly: `Settings(home=tmp_path, train=TrainSettings(epochs=1))`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError

ColorMode = Literal["rgb", "grayscale"]

MiB = 1024 * 1024


class TrainSettings(BaseModel):
    """How `emolabel train` fits a model."""

    epochs: int = Field(30, ge=1, description="Maximum epochs; EarlyStopping may end sooner.")
    batch_size: int = Field(16, ge=1, le=4096, description="Images per training step.")
    image_size: int = Field(
        256, ge=8, le=2048, description="Model input height and width (pixels)."
    )
    color_mode: ColorMode = Field("rgb", description="`rgb` (3 channels) or `grayscale` (1).")
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="Adam learning rate.")
    patience: int = Field(
        6, ge=1, description="EarlyStopping patience on validation loss (epochs)."
    )
    seed: int = Field(1337, description="Seed for the split, shuffling, augmentation and weights.")
    # Measured on 1,000 sample faces: without augmentation the CNN's 3.7M-weight Dense layer
    # overfits (validation 0.83); with it, test accuracy 0.99 (see bench/RESULTS.md).
    augment: bool = Field(
        True, description="Augment the training split (flip, shift, rotation, zoom, light)."
    )
    split: tuple[float, float, float] = Field(
        (0.7, 0.2, 0.1), description="Train / validation / test fractions of the file list."
    )
    target_precision: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="Precision each class's threshold aims at on the validation split; a label "
        "below its class's threshold is stored as `uncertain`.",
    )
    cache_max_bytes: int = Field(
        2048 * MiB, ge=0, description="Keep decoded images in memory when the set fits in this."
    )

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(part <= 0 for part in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError("train/validation/test fractions must be positive and sum to 1")
        return value


class LimitSettings(BaseModel):
    """What an input file may be before we refuse it, checked before decoding.

    The byte and pixel limits bound the file; the last three bound what decoding it costs, so that
    a small file inside them cannot take gigabytes or minutes (see `training.preprocess`).
    """

    max_file_bytes: int = Field(64 * MiB, ge=1, description="Largest file read, in bytes.")
    max_pixels: int = Field(
        120_000_000,
        ge=1,
        description="Largest width x height decoded (a 20000x20000 bomb is 400M).",
    )
    min_side: int = Field(8, ge=1, description="Smallest width or height accepted (pixels).")
    # Encoders write 1 (baseline), 3 (one per component) or about 10 scans (libjpeg's and
    # Pillow's progressive script is 10, mozjpeg's ~10-12); hundreds are only ever written to make
    # a decoder redo the whole image hundreds of times.
    max_jpeg_scans: int = Field(
        64,
        ge=1,
        description="Most scans (SOS markers) a JPEG may have; each one is a pass over the image.",
    )
    # OpenCV needs ~8 bytes a pixel for 8-bit RGBA (its array and the binding's copy; composed in
    # place), so 1 GiB labels one at the default pixel limit and refuses 16-bit RGBA over ~57 Mpx;
    # a worker decodes `decode_threads` images at once. A progressive JPEG keeps every DCT
    # coefficient (2 bytes per sample) whatever scale it is decoded at.
    max_decode_bytes: int = Field(
        1024 * MiB,
        ge=1,
        description="Largest memory one image's decode may need, estimated from its header "
        "(pixels x bytes per pixel, plus a progressive JPEG's coefficients) before decoding.",
    )
    max_decode_work: int = Field(
        2_400_000_000,
        ge=1,
        description="Largest decode work of one image, in pixels x passes (a JPEG makes one pass "
        "per scan, other types one): 20 scans at the default pixel limit.",
    )


class FaceSettings(BaseModel):
    """How a face model finds the faces it labels (models whose metadata says `subject: face`)."""

    detect_side: int = Field(
        1280,
        ge=64,
        le=8192,
        description="Faces are looked for in the photo reduced to this longer side (pixels).",
    )
    min_face_size: int = Field(
        20,
        ge=12,
        le=4096,
        description="Smallest face looked for, in pixels of that reduced photo.",
    )
    min_score: float = Field(
        0.9, ge=0.0, lt=1.0, description="Detector probability a face needs to be labeled."
    )
    max_faces: int = Field(32, ge=1, le=1024, description="At most this many faces per photo.")
    margin: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Context around a face crop, as a fraction of the face's side on each side.",
    )

    @model_validator(mode="after")
    def _face_fits(self) -> FaceSettings:
        if self.min_face_size > self.detect_side:
            raise ValueError(
                f"faces.min_face_size ({self.min_face_size}) is larger than faces.detect_side "
                f"({self.detect_side}): no face could be found"
            )
        return self


Precision = Literal["float32", "bfloat16"]


class WorkerSettings(BaseModel):
    """How a Celery worker consumes chunks; delivery guarantees depend on these."""

    concurrency: int = Field(
        0,
        ge=0,
        le=256,
        description="Worker processes per `emolabel worker`; 0: one per GPU, else per CPU "
        "(at most one per 2 GiB of available memory).",
    )
    prefetch_multiplier: int = Field(
        1, ge=1, description="Messages reserved per process; 1 keeps chunks with idle workers."
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Images per model call.")
    decode_threads: int = Field(
        0,
        ge=0,
        le=64,
        description="Threads per process reading and decoding; 0: CPUs / processes, at least 2.",
    )
    model_threads: int = Field(
        0, ge=0, le=256, description="CPU threads per process for the model; 0: CPUs / processes."
    )
    precision: Precision = Field(
        "float32",
        description="Model arithmetic: bfloat16 is ~1.6x faster on CPUs with AMX or AVX512-BF16 "
        "(see README: labels can differ near the decision boundary).",
    )
    task_time_limit: int = Field(
        900, ge=10, description="Seconds a chunk may run before its process is replaced."
    )
    visibility_timeout: int = Field(
        3600,
        ge=20,
        description="Seconds before Redis redelivers an unacknowledged chunk (> task_time_limit).",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="Deliveries of one image before it is recorded as poison, and attempts at a "
        "chunk that raises something unexpected before its images are recorded internal_error.",
    )
    gpus: int = Field(
        0, ge=0, le=64, description="GPUs on this machine: one worker process per GPU, pinned."
    )
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="Folders workers may read (JSON list); empty: only the job's own source root.",
    )


class ScanSettings(BaseModel):
    """How the producer walks a source and publishes chunks."""

    chunk_size: int = Field(256, ge=1, le=10_000, description="Image URIs per queue message.")
    batch_files: int = Field(
        2048,
        ge=1,
        le=100_000,
        description="Files the producer puts in the ledger per transaction (at least a chunk): "
        "its chunks are recorded in one commit and marked published in another.",
    )
    chunk_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="A chunk also closes once its files add up to this many bytes (big photos).",
    )
    follow_symlinks: bool = Field(
        True, description="Resolve links inside the root (never outside it) to report them."
    )
    skip_settled: bool = Field(
        True,
        description="A rescan counts, without reading them or writing a ledger row each, the "
        "files of a folder whose listing (names, sizes, times) is unchanged since a scan found "
        "them all labeled by the same model (or no image); off: every file is read and itemized.",
    )
    overlap_writes: Literal["never", "auto", "always"] = Field(
        "never",
        description="Write a batch to the ledger in a second thread while the next is read "
        "(auto: on PostgreSQL only, where the server works while the walk goes on; on SQLite "
        "the two threads trading the GIL cost more than they overlap). Faster on PostgreSQL, "
        "but a batch's commit then trails the listing by a batch: a producer stopped or killed "
        "mid-scan may hold a write transaction or leave a listed batch unrecorded (a rescan "
        "finds it). never: each batch is committed and published before the next file is read.",
    )
    overlap_publish: Literal["never", "auto", "always"] = Field(
        "auto",
        description="Publish a batch's chunks and mark them published in a second thread "
        "while the next batch is recorded (auto: on PostgreSQL only, where the broker's round "
        "trips and the marks' commit then overlap the server's work on the next batch; on "
        "SQLite both threads would wait for the one write lock and the GIL). Every chunk is "
        "still committed before it is published; a producer killed mid-scan may leave a "
        "recorded batch unpublished (the reconciler publishes it).",
    )
    reader: Literal["inline", "process"] = Field(
        "process",
        description="Where a local folder is walked and its files' first bytes read: process, "
        "in a second process (`python -m producer.read_ahead`, started per scan) a batch or two "
        "ahead while the scan's own process writes the ledger and publishes, so the two use "
        "two cores; inline, in the scan's own process between the batches it writes (one "
        "process, one core). S3 buckets are always read inline (their reads wait on the network "
        "in threads already).",
    )


class RetrainSettings(BaseModel):
    """Nightly retraining and the gate a challenger must pass to replace the champion."""

    data_dir: Path | None = Field(
        None, description="Folder-per-class training data; unset: no scheduled retraining."
    )
    schedule: str = Field(
        "0 3 * * *", description="Cron (minute hour day month weekday, UTC) for Celery beat."
    )
    metric: Literal["macro_f1", "accuracy"] = Field(
        "macro_f1", description="Metric on the frozen test split that decides promotion."
    )
    margin: float = Field(
        0.0, ge=0, le=1, description="How much the challenger must beat the champion by."
    )
    max_recall_drop: float = Field(
        0.02, ge=0, le=1, description="Largest fall in any class's recall a promotion allows."
    )
    time_limit: int = Field(6 * 3600, ge=60, description="Seconds a retraining task may run.")
    use_reviews: bool = Field(
        True,
        description="Train on the data folder plus the labels people gave on the review page "
        "(never on unreviewed model output).",
    )
    churn_sample: int = Field(
        500,
        ge=0,
        description="Archive images both champion and challenger label before a promotion, to "
        "measure label churn; 0 turns it off.",
    )
    max_churn: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Largest share of the churn sample whose label may change; above it the "
        "challenger is `held` for a person to promote (1.0: never held).",
    )
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="Folders a retrain message's data_dir must lie under (JSON list); empty: "
        "data_dir itself. Any other folder is refused and nothing is trained.",
    )

    def training_roots(self) -> list[Path]:
        """The folders a queued retraining may train on: `allowed_roots`, else `data_dir`."""
        if self.allowed_roots:
            return list(self.allowed_roots)
        return [self.data_dir] if self.data_dir is not None else []

    @field_validator("schedule")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("schedule must be a cron line of five fields, e.g. '0 3 * * *'")
        return value


class ReconcileSettings(BaseModel):
    """The reconciler: finishes chunks that have no message and scans that have no producer."""

    interval: int = Field(
        300, ge=10, description="Seconds between reconciler runs (a beat task; also `reconcile`)."
    )
    stale_after: int = Field(
        600,
        ge=0,
        description="Seconds a chunk may be published with no message in Redis before it is sent "
        "again (or recorded and never published, once its scan ended).",
    )
    producer_timeout: int = Field(
        900,
        ge=10,
        description="Seconds without a heartbeat after which a scanning job's producer is gone: "
        "the reconciler publishes what it recorded and ends the scan with an error.",
    )


class S3Settings(BaseModel):
    """An S3-compatible object store for `s3://bucket/prefix` sources."""

    endpoint_url: str | None = Field(None, description="e.g. http://127.0.0.1:9000 for MinIO.")
    access_key: str | None = Field(None, description="Access key id (else the AWS chain).")
    secret_key: SecretStr | None = Field(None, description="Secret key (never printed).")
    region: str | None = Field(None, description="Region name, if the store needs one.")


class FlowerSettings(BaseModel):
    """The Flower dashboard of `emolabel flower`; it always asks for basic authentication."""

    address: str = Field(
        "127.0.0.1",
        description="Interface Flower listens on (0.0.0.0 only in a container or behind a proxy).",
    )
    port: int = Field(5555, ge=1, le=65535, description="Port Flower listens on.")
    user: str | None = Field(
        None,
        pattern=r"^[^:,\s]+$",
        description="Basic-auth user name; `emolabel flower` refuses to start without one.",
    )
    password: SecretStr | None = Field(
        None,
        description="Basic-auth password, 8 characters or more, no commas (never printed).",
    )
    max_tasks: int = Field(
        10_000, ge=100, description="Tasks Flower keeps in memory (the newest; older ones drop)."
    )

    @field_validator("password")
    @classmethod
    def _usable_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        secret = value.get_secret_value()
        # Flower splits its --basic-auth list on commas: a comma would cut the password.
        if "," in secret:
            raise ValueError("the Flower password must not contain a comma")
        if len(secret) < 8:
            raise ValueError("the Flower password must have 8 characters or more")
        return value


class ReviewSettings(BaseModel):
    """The review page of `emolabel review`: never open without a password or a token."""

    address: str = Field(
        "127.0.0.1", description="Interface the review page listens on (loopback by default)."
    )
    port: int = Field(8765, ge=1, le=65535, description="Port the review page listens on.")
    page_size: int = Field(60, ge=1, le=1000, description="Results per review page.")
    thumbnail_size: int = Field(
        256, ge=32, le=2048, description="Longest side of a thumbnail, in pixels."
    )
    facets_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="Seconds a job's class thresholds, counts, labels and versions are reused "
        "between page views (0: counted again on every view).",
    )


class XmpSettings(BaseModel):
    """`emolabel xmp`: labels written into XMP sidecars where photo tools look for them."""

    naming: Literal["append", "replace"] = Field(
        "append",
        description="Sidecar name: append (photo.jpg.xmp: digiKam, darktable) or replace "
        "(photo.xmp: Lightroom).",
    )
    keyword_root: str = Field(
        "emolabel",
        min_length=1,
        max_length=200,
        description="Root of the hierarchical keywords (emolabel|happy); may nest (AI|emotion).",
    )
    mirror: Path | None = Field(
        None,
        description="Write sidecars under this folder (the image's path below it) instead of "
        "beside the images; where S3 objects' sidecars go unless s3_beside.",
    )
    s3_beside: bool = Field(
        False,
        description="Write S3 objects' sidecars as objects next to them (needs write access).",
    )


class MetricsSettings(BaseModel):
    """The Prometheus endpoint that each worker serves from its main process."""

    address: str = Field(
        "127.0.0.1",
        description="Interface of the worker's /metrics (0.0.0.0 for a Prometheus elsewhere).",
    )
    port: int = Field(
        9808, ge=0, le=65535, description="Port of the worker's /metrics endpoint; 0 turns it off."
    )


class Settings(BaseSettings):
    """Every emolabel setting; see the README's table for the environment variable names."""

    model_config = SettingsConfigDict(
        env_prefix="EMOLABEL_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    home: Path = Field(
        Path(".emolabel"), description="State folder of the embedded default (SQLite, Redis)."
    )
    models_dir: Path = Field(Path("models"), description="Where model artifacts are written.")
    model_name: str = Field(
        "emotion",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Artifact family name under models_dir.",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; unset: SQLite at `<home>/emolabel.db`."
    )
    broker_url: str | None = Field(
        None,
        description="Redis URL (`rediss://` for TLS); unset: a local Redis the CLI starts in home.",
    )
    queue: str = Field("emolabel", pattern=r"^[A-Za-z0-9_.-]+$", description="Celery queue name.")
    keras_backend: Literal["tensorflow", "jax", "torch"] = Field(
        "tensorflow", description="Keras backend of workers and training (jax where TF has no GPU)."
    )
    train: TrainSettings = Field(default_factory=TrainSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    faces: FaceSettings = Field(default_factory=FaceSettings)
    scan: ScanSettings = Field(default_factory=ScanSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    flower: FlowerSettings = Field(default_factory=FlowerSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    xmp: XmpSettings = Field(default_factory=XmpSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    reconcile: ReconcileSettings = Field(default_factory=ReconcileSettings)

    @model_validator(mode="after")
    def _safe_combinations(self) -> Settings:
        if self.home.resolve() == self.models_dir.resolve():
            raise ValueError("home and models_dir must be different folders")
        if self.worker.visibility_timeout <= self.worker.task_time_limit:
            # Redis would hand a still-running chunk to a second worker.
            raise ValueError("worker.visibility_timeout must be longer than worker.task_time_limit")
        return self

    @property
    def embedded_broker(self) -> bool:
        """True when no broker is configured and the CLI runs its own Redis in `home`."""
        return self.broker_url is None

    @property
    def redis_socket(self) -> Path:
        return self.home.resolve() / "redis.sock"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or f"redis+socket://{self.redis_socket}"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home.resolve() / 'emolabel.db'}"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning a validation error into one `ConfigError` line."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'settings'}: {item['msg']}"
            for item in error.errors()
        )
        raise ConfigError(f"bad configuration: {problems}") from None


def iter_setting_rows(
    model: type[BaseModel] = Settings, prefix: str = "EMOLABEL_"
) -> Iterator[tuple[str, str, str]]:
    """Yield (environment variable, default, description) for every leaf setting, in order."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_setting_rows(annotation, f"{prefix}{name.upper()}__")
            continue
        default = field.get_default(call_default_factory=True)
        shown = "(unset)" if default is None else str(default)
        yield f"{prefix}{name.upper()}", shown, field.description or ""


def settings_table() -> str:
    """The README's settings table, generated so that it cannot drift from the code."""
    lines = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for variable, default, description in iter_setting_rows():
        cell = description.replace("|", "\\|")  # a literal `|` would end the cell
        lines.append(f"| `{variable}` | `{default}` | {cell} |")
    return "\n".join(lines)
