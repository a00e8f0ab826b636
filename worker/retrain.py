"""One retraining run: train a challenger, score it and the champion on the frozen test split,
promote it only if it passes the gate, and record the run with its metrics and decision.

Called by the `emolabel.retrain` Celery task (beat schedules it nightly) and by
`emolabel retrain`. Runs are serialised by a lock file next to the artifacts.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db.models import ModelStatus, RetrainDecision
from db.repository import active_model, record_retrain_run, set_model_status
from emolabel.errors import ConfigError, EmolabelError
from emolabel.registry import register_artifact, registered_hashes
from emolabel.settings import Settings
from training.trust import artifact_under

logger = logging.getLogger(__name__)

FROZEN_FOLDER = "frozen_test"


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


def run_retrain(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    data_dir: Path | None = None,
    progress: Callable[[str], None] = logger.info,
) -> RetrainReport:
    """Train, gate, register and record; returns the decision (a failure is recorded too)."""
    from emolabel.runtime import load_keras

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
    from training.train import train_model

    outcome = train_model(
        source,
        settings.train,
        settings.limits,
        settings.models_dir,
        settings.model_name,
        progress=progress,
        frozen_test_dir=family / FROZEN_FOLDER,
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
    progress(("promoted: " if decision.promote else "rejected: ") + decision.reason)
    new_metric = metric_value(challenger, gate.metric)
    old_metric = metric_value(champion_evaluation, gate.metric) if champion_evaluation else None
    with sessions.begin() as session:
        register_artifact(
            session=session, directory=outcome.artifact_dir, activate=decision.promote
        )
        if not decision.promote:
            set_model_status(
                session=session, version=outcome.metadata.version, status=ModelStatus.REJECTED
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
    return RetrainReport(
        run_id,
        "promoted" if decision.promote else "rejected",
        decision.reason,
        outcome.metadata.version,
        champion_version,
        new_metric,
        old_metric,
    )
