"""One retraining run: train a challenger, score it and the champion on the frozen test split,
promote it only if it passes the gate, and record the run with its metrics and decision.

Called by the `emolabel.retrain` Celery task (beat schedules it nightly; a dedicated worker,
`emolabel worker --retrain`, consumes its queue) and by `emolabel retrain`. Runs are serialised
by a lock file next to the artifacts.

Promotion is compare-and-set: the run notes the champion when it starts and promotes only while
that version is still the active one (`db.repository.promote_if_active`, decided by the
database). A `models promote` or `models rollback` made during the run wins; the run is recorded
as rejected, saying so.

People's labels train the next model (`retrain.use_reviews`): every usable human label (the
latest verdict per image or face, `db.repository.human_labels`; never a model's own output) is
written into a per-run scratch folder under the family folder, cropped as served for a face
model (`training.reviewed`), and split train / validation / holdout by a stable hash of its
image id. Train and validation join the data folder's; the frozen test split stays exactly as it
is, so the gate compares like with like; the reviewed holdout is scored for both challenger and
champion and recorded in the run's metrics (`reviewed_holdout`), with how many reviewed items it
used (`reviewed_items`).

Before a promotion takes effect the run measures label churn (`retrain.churn_sample`): a seeded
sample of the images the champion labeled is read again (confined to each image's job root, as a
worker reads it) and labeled by both models (`training.churn_sample`); the table, the rate and
the changed images are recorded in `retrain_runs.churn`. A promotion whose churn rate is over
`retrain.max_churn` is `held` (`gate.hold_for_churn`): the challenger stays a candidate that a
person promotes with `emolabel models promote VERSION`.

A queued message names its training folder; `queued_data_dir` accepts only a folder under
`retrain.allowed_roots` (default: the configured `retrain.data_dir`), so whoever can write to
the broker cannot make a worker train on, and promote a model from, any folder it can read.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from core.errors import ConfigError, EmolabelError, ImageError
from core.reasons import Reason
from core.settings import LimitSettings, RetrainSettings, Settings, TrainSettings
from db.models import ModelStatus, RetrainDecision
from db.repository import (
    HumanLabel,
    active_model,
    archive_images,
    human_labels,
    labeled_image_ids,
    promote_if_active,
    record_retrain_run,
    set_model_status,
)
from training.registry import register_artifact, registered_hashes
from training.trust import artifact_under

if TYPE_CHECKING:
    from core.storage.reader import Reader
    from training.artifacts import Artifact
    from training.churn import Churn
    from training.gate import Decision
    from training.metadata import Subject
    from training.reviewed import ReviewedFile, ReviewedSplit
    from training.train import TrainOutcome

logger = logging.getLogger(__name__)

FROZEN_FOLDER = "frozen_test"
# Longest data_dir a queued message may carry (PATH_MAX on Linux).
MAX_DATA_DIR = 4096


class RefusedRetrain(ConfigError):
    """A queued retraining whose arguments are not acceptable; nothing was trained."""


def queued_data_dir(value: object, settings: RetrainSettings) -> Path | None:
    """The training folder a queued retrain message may use, checked strictly; None: the
    configured `data_dir`.

    Refuses (`RefusedRetrain`) anything but an absolute path string of at most `MAX_DATA_DIR`
    bytes, without NUL or `..` segments, naming an existing folder whose real path (symbolic
    links resolved) lies inside one of `settings.training_roots()`.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise RefusedRetrain(f"data_dir must be a string, got {type(value).__name__}")
    if not value or len(value.encode("utf-8", "surrogateescape")) > MAX_DATA_DIR:
        raise RefusedRetrain(f"data_dir must be 1 to {MAX_DATA_DIR} bytes long")
    if "\x00" in value:
        raise RefusedRetrain("data_dir holds a NUL character")
    path = Path(value)
    if not path.is_absolute():
        raise RefusedRetrain(f"data_dir must be an absolute path, got {value!r}")
    if ".." in path.parts:
        raise RefusedRetrain(f"data_dir must not contain '..' segments: {value!r}")
    roots = [Path(os.path.realpath(root)) for root in settings.training_roots()]
    if not roots:
        raise RefusedRetrain(
            "no training roots are configured (EMOLABEL_RETRAIN__ALLOWED_ROOTS or "
            "EMOLABEL_RETRAIN__DATA_DIR): a queued retrain may not name its own data_dir"
        )
    real = Path(os.path.realpath(path))
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise RefusedRetrain(
            f"data_dir {value!r} is outside the training roots "
            f"({', '.join(str(root) for root in roots)}); set EMOLABEL_RETRAIN__ALLOWED_ROOTS"
        )
    if not real.is_dir():
        raise RefusedRetrain(f"data_dir {value!r} is not a folder")
    return real


class Trainer(Protocol):
    """What trains the challenger: `training.train.train_model` (a seam for tests that need a
    challenger fixed by construction)."""

    def __call__(
        self,
        data_dir: Path,
        train: TrainSettings,
        limits: LimitSettings,
        models_dir: Path,
        name: str,
        progress: Callable[[str], None] = ...,
        frozen_test_dir: Path | None = None,
        subject: Subject = "image",
        reviewed: ReviewedSplit | None = None,
    ) -> TrainOutcome: ...


@dataclass(frozen=True)
class RetrainReport:
    run_id: int
    decision: str
    reason: str
    challenger_version: str | None
    champion_version: str | None
    challenger_metric: float | None
    champion_metric: float | None
    reviewed_items: int = 0
    churn_rate: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another retraining run holds {path}") from None
        yield


def record_refusal(sessions: sessionmaker[Session], error: RefusedRetrain) -> None:
    """Record a refused retrain message as a failed run, so `models` history shows it."""
    with sessions.begin() as session:
        record_retrain_run(
            session=session,
            started_at=dt.datetime.now(dt.UTC),
            decision=RetrainDecision.FAILED,
            reason=f"refused: {error}",
        )


def run_retrain(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    data_dir: Path | None = None,
    progress: Callable[[str], None] = logger.info,
    trainer: Trainer | None = None,
) -> RetrainReport:
    """Train, gate, register and record; returns the decision (a failure is recorded too)."""
    from training.runtime import load_keras
    from training.train import train_model

    source = data_dir or settings.retrain.data_dir
    if source is None:
        raise ConfigError("no training data: set EMOLABEL_RETRAIN__DATA_DIR or pass DATA_DIR")
    family = settings.models_dir / settings.model_name
    started = dt.datetime.now(dt.UTC)
    with _exclusive(family / ".retrain.lock"):
        load_keras(settings.keras_backend)
        with sessions.begin() as session:
            champion = active_model(session=session)
            champion_version = champion.version if champion else None
            champion_path = champion.artifact_path if champion else None
        try:
            # The reviewed files are scratch: made for this run, gone after it.
            with tempfile.TemporaryDirectory(prefix=".reviewed-", dir=family) as scratch:
                return _train_and_gate(
                    settings, sessions, source, family, started, champion_version,
                    champion_path, progress, trainer or train_model, Path(scratch),
                )  # fmt: skip
        except EmolabelError as error:
            with sessions.begin() as session:
                record_retrain_run(
                    session=session,
                    started_at=started,
                    decision=RetrainDecision.FAILED,
                    reason=str(error),
                    champion_version=champion_version,
                )
            raise


def _train_and_gate(
    settings: Settings,
    sessions: sessionmaker[Session],
    source: Path,
    family: Path,
    started: dt.datetime,
    champion_version: str | None,
    champion_path: str | None,
    progress: Callable[[str], None],
    trainer: Trainer,
    scratch: Path,
) -> RetrainReport:
    from training.artifacts import load_artifact
    from training.evaluate import evaluate_files
    from training.gate import Decision, decide, hold_for_churn, metric_value
    from training.metadata import read_metadata

    # The challenger is a model for the same job as the champion: a face model's retraining
    # (on face crops) yields a face model, served detect -> crop -> classify like its champion.
    subject = read_metadata(Path(champion_path)).subject if champion_path else "image"
    reviewed = (
        _reviewed_split(settings, sessions, source, subject, scratch, progress)
        if settings.retrain.use_reviews
        else None
    )
    outcome = trainer(
        source,
        settings.train,
        settings.limits,
        settings.models_dir,
        settings.model_name,
        progress=progress,
        frozen_test_dir=family / FROZEN_FOLDER,
        subject=subject,
        reviewed=reviewed,
    )
    # What training used: no reviewed copy of a frozen test image (as `train_model` left out).
    used = reviewed.excluding({e.sha256 for e in outcome.split.test}) if reviewed else None
    challenger = outcome.evaluation
    challenger_artifact = load_artifact(
        outcome.artifact_dir, settings.models_dir, settings.model_name
    )
    artifact: Artifact | None = None
    champion_evaluation = None
    classes_differ = False
    if champion_path is not None and champion_version is not None:
        # The champion is loaded as a worker loads it: under the models folder, hashes checked.
        with sessions() as session:
            expected = registered_hashes(
                session=session, version=champion_version, artifact_path=champion_path
            )
        directory = artifact_under(Path(champion_path), settings.models_dir)
        artifact = load_artifact(
            directory, settings.models_dir, settings.model_name, expected=expected
        )
        names = artifact.metadata.class_names
        test = outcome.split.test
        classes_differ = names != challenger.class_names
        if not classes_differ:
            champion_evaluation = evaluate_files(
                artifact,
                [example.path for example in test],
                [names.index(example.class_name) for example in test],
                settings.limits,
            )
    holdout = _score_holdout(
        used, challenger_artifact, None if classes_differ else artifact, settings.limits
    )
    churn = None
    if artifact is not None and champion_version is not None:
        churn = _measure_churn(
            settings, sessions, champion_version, artifact, challenger_artifact, progress
        )
    gate = settings.retrain
    if classes_differ:
        decision = Decision(
            False,
            "the champion's classes differ from the data's; promote by hand with "
            "`emolabel models promote`",
        )
    else:
        decision = decide(
            challenger,
            champion_evaluation,
            metric=gate.metric,
            margin=gate.margin,
            max_recall_drop=gate.max_recall_drop,
        )
    decision = hold_for_churn(
        decision, churn, max_churn=gate.max_churn, challenger_version=outcome.metadata.version
    )
    new_metric = metric_value(challenger, gate.metric)
    old_metric = metric_value(champion_evaluation, gate.metric) if champion_evaluation else None
    with sessions.begin() as session:
        decision = conclude(
            session=session,
            challenger_dir=outcome.artifact_dir,
            challenger_version=outcome.metadata.version,
            champion_version=champion_version,
            decision=decision,
        )
        run_id = record_retrain_run(
            session=session,
            started_at=started,
            decision=_recorded(decision),
            reason=decision.reason,
            challenger_version=outcome.metadata.version,
            champion_version=champion_version,
            data_fingerprint=str(outcome.metadata.dataset.get("fingerprint", "")),
            metrics={
                "metric": gate.metric,
                "challenger": challenger.to_json(),
                "champion": champion_evaluation.to_json() if champion_evaluation else None,
                "reviewed": used.summary() if used else None,
                "reviewed_holdout": holdout,
            },
            reviewed_items=used.used if used else 0,
            churn=churn.to_json() if churn else None,
        )
    progress(f"{_recorded(decision).value}: {decision.reason}")
    return RetrainReport(
        run_id,
        _recorded(decision).value,
        decision.reason,
        outcome.metadata.version,
        champion_version,
        new_metric,
        old_metric,
        used.used if used else 0,
        churn.rate if churn else None,
    )


def _recorded(decision: Decision) -> RetrainDecision:
    if decision.promote:
        return RetrainDecision.PROMOTED
    return RetrainDecision.HELD if decision.held else RetrainDecision.REJECTED


def _reader(settings: Settings) -> Reader:
    """A worker's reader: files confined to their job's root (and the allowed roots), limits."""
    from core.storage.reader import Reader

    return Reader(
        max_file_bytes=settings.limits.max_file_bytes,
        allowed_roots=[os.fsencode(root) for root in settings.worker.allowed_roots],
        s3=settings.s3,
    )


def _reviewed_split(
    settings: Settings,
    sessions: sessionmaker[Session],
    source: Path,
    subject: Subject,
    folder: Path,
    progress: Callable[[str], None],
) -> ReviewedSplit | None:
    """People's labels written under `folder` and split; None when there are none."""
    from training.dataset import discover_classes
    from training.preprocess import InputSpec
    from training.reviewed import materialize, split_reviewed

    with sessions() as session:
        labels = human_labels(session=session)
        listed = archive_images(session=session, image_ids=[item.image_id for item in labels])
        roots = {image.image_id: image.source for image in listed}
    if not labels:
        return None
    reader = _reader(settings)

    def read(label: HumanLabel) -> bytes:
        root = roots.get(label.image_id)
        if root is None:
            raise ImageError(Reason.OUTSIDE_ROOT, "no job lists this image: no root to read under")
        return reader.read(label.uri, root)

    class_names = discover_classes(source)
    train = settings.train
    files, skipped = materialize(
        labels,
        class_names,
        folder,
        read,
        subject=subject,
        spec=InputSpec(train.image_size, train.image_size, train.color_mode),
        faces=settings.faces,
        limits=settings.limits,
    )
    progress(
        f"reviewed labels: {len(files)} of {len(labels)} usable"
        + "".join(f", {count} {reason}" for reason, count in sorted(skipped.items()))
    )
    return split_reviewed(files, class_names, train.split, train.seed, skipped)


def _score_holdout(
    used: ReviewedSplit | None,
    challenger: Artifact,
    champion: Artifact | None,
    limits: LimitSettings,
) -> dict[str, Any] | None:
    """Both models scored on the reviewed holdout (people's labels neither trained on)."""
    from training.evaluate import evaluate_files

    if used is None or not used.holdout:
        return None

    def scored(artifact: Artifact, files: list[ReviewedFile]) -> dict[str, Any]:
        names = artifact.metadata.class_names
        return evaluate_files(
            artifact,
            [item.example.path for item in files],
            [names.index(item.example.class_name) for item in files],
            limits,
        ).to_json()

    return {
        "items": len(used.holdout),
        "challenger": scored(challenger, used.holdout),
        "champion": scored(champion, used.holdout) if champion is not None else None,
    }


def _measure_churn(
    settings: Settings,
    sessions: sessionmaker[Session],
    champion_version: str,
    champion: Artifact,
    challenger: Artifact,
    progress: Callable[[str], None],
) -> Churn | None:
    """Both models on a seeded sample of the images the champion labeled; None when the
    sample is turned off (`retrain.churn_sample` 0)."""
    from training.churn import sample_ids
    from training.churn_sample import Labeler, archive_churn

    size = settings.retrain.churn_sample
    if size <= 0:
        return None
    with sessions() as session:
        labeled = labeled_image_ids(session=session, model_version=champion_version)
        images = archive_images(
            session=session, image_ids=sample_ids(labeled, size, settings.train.seed)
        )
    unlisted = min(size, len(labeled)) - len(images)
    detector = None
    if images and "face" in (champion.metadata.subject, challenger.metadata.subject):
        from training.faces import detector_config
        from training.faces.mtcnn import load_mtcnn

        detector = load_mtcnn(detector_config(settings.faces), backend=settings.keras_backend)
    reader = _reader(settings)
    unreadable = 0

    def photos() -> Iterator[tuple[int, bytes]]:
        nonlocal unreadable
        for image in images:
            try:
                yield image.image_id, reader.read(image.uri, image.source)
            except ImageError as error:
                logger.info("churn sample: image %d left out: %s", image.image_id, error)
                unreadable += 1

    def labeler(artifact: Artifact) -> Labeler:
        return Labeler(artifact, settings.limits, settings.faces, detector)

    churn = archive_churn(labeler(champion), labeler(challenger), photos(), progress=progress)
    # Reading happens lazily inside `archive_churn`: count its failures once it is done.
    return replace(churn, left_out=churn.left_out + unreadable + unlisted)


def conclude(
    *,
    session: Session,
    challenger_dir: Path,
    challenger_version: str,
    champion_version: str | None,
    decision: Decision,
) -> Decision:
    """Register the challenger and apply the gate's decision; returns the decision as applied.

    A promotion is a compare-and-set against `champion_version`, the champion when the run
    started: when another version was promoted (or rolled back to) meanwhile, that choice stands
    and the challenger is rejected, with the reason saying why.
    """
    from training.gate import Decision

    register_artifact(session=session, directory=challenger_dir, activate=False)
    if decision.held:
        # Left a candidate: a person looks at the churn and promotes it, or not.
        return decision
    if decision.promote:
        if promote_if_active(
            session=session, version=challenger_version, expected=champion_version
        ):
            return decision
        current = active_model(session=session)
        decision = Decision(
            False,
            f"the active model changed during this run (from {champion_version or 'none'} to "
            f"{current.version if current else 'none'}): that promotion or rollback stands; the "
            f"gate had said: {decision.reason}",
        )
    set_model_status(session=session, version=challenger_version, status=ModelStatus.REJECTED)
    return decision
