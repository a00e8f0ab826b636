"""Issue 3's fault acceptance: processes killed with SIGKILL, Redis restarted from its append-only
file, PostgreSQL connections terminated mid-write, and an image that kills every process that
decodes it. Each job must still complete with exactly one result per (image, model version) and
balanced counts.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Chunk, ChunkStatus
from emolabel.settings import ScanSettings, WorkerSettings
from tests.integration.conftest import (
    SettingsFactory,
    Workers,
    assert_balanced,
    build_archive,
    child_pids,
    cli_scan,
    ledger,
    results_per_image,
    wait_for,
    wait_for_job,
    worker_log,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Redis hands an unacknowledged chunk of a dead worker to another after this many seconds.
VISIBILITY_TIMEOUT = 20
TASK_TIME_LIMIT = 15


def fault_settings(make_settings: SettingsFactory, chunk_size: int, **worker: object):
    return make_settings(
        scan=ScanSettings(chunk_size=chunk_size),
        worker=WorkerSettings(
            concurrency=1,
            decode_threads=2,
            batch_size=16,
            task_time_limit=TASK_TIME_LIMIT,
            visibility_timeout=VISIBILITY_TIMEOUT,
            **worker,
        ),
    )


def chunk_in_progress(sessions: sessionmaker[Session], job_id: int) -> Chunk | None:
    """A chunk a worker has started (its delivery is counted) and not finished."""
    with sessions() as session:
        return session.scalars(
            select(Chunk).where(
                Chunk.job_id == job_id,
                Chunk.deliveries > 0,
                Chunk.status != ChunkStatus.DONE,
            )
        ).first()


def test_killed_children_and_a_killed_worker_lose_and_repeat_nothing(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
) -> None:
    archive = build_archive(tmp_path / "archive", 48)
    settings = fault_settings(make_settings, chunk_size=6)
    job_id = cli_scan(settings, str(archive.root))
    started = time.monotonic()
    local = workers.start(settings)

    # The first chunk of a fresh pool process loads the model: seconds in the middle of a chunk.
    first = wait_for(lambda: chunk_in_progress(sessions, job_id), timeout=60, interval=0.02)
    [child] = child_pids(local.pid)
    os.kill(child, signal.SIGKILL)
    print(f"{time.monotonic() - started:.1f}s killed child {child} in chunk {first.chunk_index}")

    # Rejected on worker loss, the chunk comes straight back to a new pool process, which splits
    # it (a process died in it) and goes on; kill the whole worker while it works on another one.
    def another_chunk_started() -> Chunk | None:
        chunk = chunk_in_progress(sessions, job_id)
        return chunk if chunk is not None and chunk.chunk_index != first.chunk_index else None

    second = wait_for(another_chunk_started, timeout=60, interval=0.02)
    workers.kill(local)
    killed_at = time.monotonic()
    print(f"{killed_at - started:.1f}s killed worker in chunk {second.chunk_index}")
    assert chunk_in_progress(sessions, job_id) is not None

    workers.start(settings)
    balance = wait_for_job(sessions, job_id, settings, timeout=VISIBILITY_TIMEOUT + 150)
    print(f"{time.monotonic() - killed_at:.1f}s from worker kill to done")
    print(worker_log(settings, 200))

    assert_balanced(balance)
    assert balance.labeled == len(archive.generated) == balance.enqueued
    assert results_per_image(sessions) == dict.fromkeys(archive.generated, 1)
    assert {row.state for row in ledger(sessions, job_id).values()} == {"labeled"}
