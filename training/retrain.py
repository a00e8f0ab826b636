"""One retraining run: train a challenger, score it and the champion on the frozen test split,
promote it only if it passes the gate, and record the run with its metrics and decision.

Called by the `emolabel.retrain` Celery task (beat schedules it nightly; a dedicated worker,
`emolabel worker --retrain`, consumes its queue) and by `emolabel retrain`. Runs are serialised
by a lock file next to the artifacts.

Promotion is compare-and-set: the run notes the champion when it starts and promotes only while
that version is still the active one (`db.repository.promote_if_active`, decided by the
database). A `models promote` or `models rollback` made during the run wins; the run is recorded
as rejected, saying so.

A queued message names its training folder; `queued_data_dir` accepts only a folder under
`retrain.allowed_roots` (default: the configured `retrain.data_dir`), so whoever can write to
the broker cannot make a worker train on, and promote a model from, any folder it can read.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from core.errors import ConfigError, EmolabelError
from core.settings import RetrainSettings, Settings
from db.models import ModelStatus, RetrainDecision
from db.repository import active_model, promote_if_active, record_retrain_run, set_model_status
from training.registry import register_artifact, registered_hashes
from training.trust import artifact_under

if TYPE_CHECKING:
    from training.gate import Decision

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


@dataclass(frozen=True)
class RetrainReport:
    run_id: int
    decision: str
    reason: str
    challenger_version: str | None
    champion_version: str | None
    challenger_metric: float | None
    champion_metric: float | None

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
) -> RetrainReport:
    """Train, gate, register and record; returns the decision (a failure is recorded too)."""
    from training.runtime import load_keras

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
            return _train_and_gate(
                settings, sessions, source, family, started, champion_version, champion_path,
                progress,
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
) -> RetrainReport:
    from training.artifacts import load_artifact
    from training.evaluate import evaluate_files
    from training.gate import Decision, decide, metric_value
    from training.metadata import read_metadata
    from training.train import train_model

    # The challenger is a model for the same job as the champion: a face model's retraining
    # (on face crops) yields a face model, served detect -> crop -> classify like its champion.
    subject = read_metadata(Path(champion_path)).subject if champion_path else "image"
    outcome = train_model(
        source,
        settings.train,
        settings.limits,
        settings.models_dir,
        settings.model_name,
        progress=progress,
        frozen_test_dir=family / FROZEN_FOLDER,
        subject=subject,
    )
    challenger = outcome.evaluation
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
            decision=RetrainDecision.PROMOTED if decision.promote else RetrainDecision.REJECTED,
            reason=decision.reason,
            challenger_version=outcome.metadata.version,
            champion_version=champion_version,
            data_fingerprint=str(outcome.metadata.dataset.get("fingerprint", "")),
            metrics={
                "metric": gate.metric,
                "challenger": challenger.to_json(),
                "champion": champion_evaluation.to_json() if champion_evaluation else None,
            },
        )
    progress(("promoted: " if decision.promote else "rejected: ") + decision.reason)
    return RetrainReport(
        run_id,
        "promoted" if decision.promote else "rejected",
        decision.reason,
        outcome.metadata.version,
        champion_version,
        new_metric,
        old_metric,
    )


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
