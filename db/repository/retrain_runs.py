"""The `retrain_runs` table: every retraining attempt and its decision."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from db.models import (
    RetrainDecision,
    RetrainRun,
    utc_now,
)
from db.repository.base import (
    json_document,
)


def record_retrain_run(
    *,
    session: Session,
    started_at: dt.datetime,
    decision: RetrainDecision,
    reason: str | None = None,
    finished_at: dt.datetime | None = None,
    challenger_version: str | None = None,
    champion_version: str | None = None,
    data_fingerprint: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    reviewed_items: int = 0,
    churn: Mapping[str, Any] | None = None,
) -> int:
    """Record one retraining attempt and its decision; return its id.

    `reviewed_items`: the human labels its training set took; `churn`: the label churn it
    measured on an archive sample (`training.churn.Churn.to_json`).
    """
    run = RetrainRun(
        started_at=started_at,
        finished_at=finished_at if finished_at is not None else utc_now(),
        challenger_version=challenger_version,
        champion_version=champion_version,
        data_fingerprint=data_fingerprint,
        metrics=json_document(dict(metrics or {}), "metrics"),
        decision=decision,
        reason=reason,
        reviewed_items=reviewed_items,
        churn=json_document(dict(churn or {}), "churn"),
    )
    session.add(run)
    session.flush()
    return run.id
