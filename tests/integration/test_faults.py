"""Issue 3's fault acceptance: processes killed with SIGKILL, Redis restarted from its append-only
file, PostgreSQL connections terminated mid-write, and an image that kills every process that
decodes it. Each job must still complete with exactly one result per (image, model version) and
balanced counts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from core.settings import ScanSettings, Settings, WorkerSettings
from core.uris import path_to_uri
from db.models import Chunk, ChunkStatus, Image, JobItem
from tests.support.archives import build_archive, write_bytes
from tests.support.cli import cli_scan
from tests.support.faults import (
    BLOCKED,
    STOP_ON_OPEN,
    TERMINATE,
    VISIBILITY_TIMEOUT,
    OwnRedis,
    chunk_in_progress,
    fault_settings,
    process_state,
)
from tests.support.ledger import assert_balanced, ledger, results_per_image, wait_for_job
from tests.support.services import wait_for
from tests.support.workers import SettingsFactory, Workers, child_pids, worker_log, worker_log_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def assert_all_labeled_once(
    sessions: sessionmaker[Session], job_id: int, uris: list[str], settings: Settings
) -> None:
    balance = wait_for_job(sessions, job_id, settings, timeout=VISIBILITY_TIMEOUT + 120)
    assert_balanced(balance)
    assert balance.labeled == len(uris) == balance.enqueued
    assert results_per_image(sessions) == dict.fromkeys(uris, 1)


# --- (a) kill -9 ------------------------------------------------------------------------------


def test_killed_children_and_a_killed_worker_lose_and_repeat_nothing(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
) -> None:
    archive = build_archive(tmp_path / "archive", 48)
    settings = fault_settings(make_settings, chunk_size=6)
    job_id = cli_scan(settings, str(archive.root))
    local = workers.start(settings)

    # A fresh pool process loads the model inside its first chunk: seconds in mid-chunk.
    first = wait_for(lambda: chunk_in_progress(sessions, job_id), timeout=60, interval=0.02)
    [child] = child_pids(local.pid)
    os.kill(child, signal.SIGKILL)

    # Rejected on worker loss, that chunk goes back to the queue; its next delivery sees the
    # death and splits it. Meanwhile the new pool process starts the next chunk, loading the
    # model again: kill the whole worker there.
    second = wait_for(
        lambda: chunk_in_progress(sessions, job_id, besides=first.chunk_index),
        timeout=60,
        interval=0.02,
    )
    workers.kill(local)
    with sessions() as session:
        killed_in = session.get(Chunk, (job_id, second.chunk_index))
    assert killed_in is not None and killed_in.status != ChunkStatus.DONE

    # The killed worker's chunk is Redis' again after the visibility timeout.
    workers.start(settings)
    assert_all_labeled_once(sessions, job_id, archive.generated, settings)
    log = worker_log_text(settings)
    assert "WorkerLostError" in log
    assert "a process died in this chunk" in log  # both chunks were split on redelivery


# --- (b) Redis restarted from its append-only file ---------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_redis_restarted_from_its_append_only_file_mid_job_loses_nothing(
    own_redis: OwnRedis,  # first, so that it is torn down after the worker
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
) -> None:
    archive = build_archive(tmp_path / "archive", 40)
    settings = fault_settings(make_settings, chunk_size=5, broker_url=own_redis.url)
    job_id = cli_scan(settings, str(archive.root))
    local = workers.start(settings)

    # While the first chunk is being worked on (its message unacknowledged, seven more queued),
    # Redis dies without a chance to save and comes back from its append-only file.
    wait_for(lambda: chunk_in_progress(sessions, job_id), timeout=60, interval=0.02)
    own_redis.kill()
    time.sleep(1)  # long enough for the worker to notice the lost connection
    own_redis.start()

    assert_all_labeled_once(sessions, job_id, archive.generated, settings)
    assert local.process.poll() is None, "the worker should have reconnected, not exited"
    assert "Connection to broker lost" in worker_log_text(settings)


# --- (c) PostgreSQL connections terminated mid-write -------------------------------------------

RETRY = "transient error, retry"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgresql_connections_terminated_mid_write_retry_and_land_once(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
    database_url: str,
) -> None:
    archive = build_archive(tmp_path / "archive", 24)
    settings = fault_settings(make_settings, chunk_size=4)
    job_id = cli_scan(settings, str(archive.root))

    # Holding the results table locked catches the worker inside its write transaction: its
    # INSERT waits on the lock, and that is when its connection is terminated (three times).
    locker_engine = create_engine(database_url, poolclass=NullPool)
    try:
        with locker_engine.connect() as locker:
            locker.execute(text("LOCK TABLE results IN EXCLUSIVE MODE"))
            workers.start(settings)

            def activity(query: Any) -> int:
                # pg_stat_activity is read once per transaction unless the snapshot is dropped.
                locker.execute(text("SELECT pg_stat_clear_snapshot()"))
                return int(locker.execute(query).scalar() or 0)

            for terminations in range(1, 4):
                wait_for(
                    lambda: activity(BLOCKED),
                    timeout=60,
                    interval=0.05,
                    what="a worker waiting inside its write transaction",
                )
                assert activity(TERMINATE) > 0
                wait_for(
                    lambda: worker_log_text(settings).count(RETRY) >= terminations,  # noqa: B023
                    timeout=30,
                    what="the worker to schedule a retry",
                )
            locker.rollback()  # releases the lock
    finally:
        locker_engine.dispose()

    assert_all_labeled_once(sessions, job_id, archive.generated, settings)
    log = worker_log_text(settings)
    assert log.count(RETRY) >= 3, worker_log(settings)
    assert "a process died in this chunk" not in log  # a retry is not mistaken for a crash


# --- (d) an image that kills the process that decodes it --------------------------------------


class PoisonKiller(threading.Thread):
    """Plays the decoder crash: SIGKILLs every pool process that stopped itself opening the
    poison image, and notes which delivery of which chunk it was holding then.

    Deterministic: a pool process stops before it reads the image, so each delivery that tries
    to decode it dies, however fast the machine; deliveries that only split the chunk or record
    the verdict never open it and are left alone. Independent of how the worker counts deaths.
    """

    def __init__(
        self, sessions: sessionmaker[Session], job_id: int, image_id: int, worker_pid: int
    ) -> None:
        super().__init__(daemon=True)
        self.sessions = sessions
        self.job_id = job_id
        self.image_id = image_id
        self.worker_pid = worker_pid
        self.killed_in: list[tuple[int, int, ChunkStatus] | None] = []
        self.stopped = threading.Event()

    def holding_chunk(self) -> tuple[int, int, ChunkStatus] | None:
        """(chunk index, deliveries, status) of the chunk that holds the poison image now."""
        with self.sessions() as session:
            row = session.execute(
                select(Chunk.chunk_index, Chunk.deliveries, Chunk.status)
                .join(
                    JobItem,
                    (JobItem.job_id == Chunk.job_id) & (JobItem.chunk_index == Chunk.chunk_index),
                )
                .where(JobItem.job_id == self.job_id, JobItem.image_id == self.image_id)
            ).first()
        return None if row is None else (row[0], row[1], ChunkStatus(row[2]))

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            for child in child_pids(self.worker_pid):
                if process_state(child) != "T":
                    continue
                # Stopped inside the delivery: nothing of it is committed past the count.
                self.killed_in.append(self.holding_chunk())
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_image_that_kills_its_process_ends_as_poison_and_its_chunk_mates_are_labeled(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
) -> None:
    archive = build_archive(tmp_path / "archive", 15)
    # First in the walk, so in the first chunk. A small, valid image: were it ever decoded, it
    # would be labeled and the test would fail.
    poison = archive.root / "0-poison" / "poison.png"
    poison.parent.mkdir()
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[::7] = 200
    write_bytes(poison, cv2.imencode(".png", pixels)[1].tobytes())
    settings = make_settings(
        scan=ScanSettings(chunk_size=4),
        worker=WorkerSettings(concurrency=1, decode_threads=2, batch_size=16, max_attempts=3),
    )
    job_id = cli_scan(settings, str(archive.root))
    poison_uri = path_to_uri(poison)
    with sessions() as session:
        poison_id, first_chunk = session.execute(
            select(Image.id, JobItem.chunk_index)
            .join(JobItem, JobItem.image_id == Image.id)
            .where(JobItem.job_id == job_id, Image.uri == poison_uri)
        ).one()
        mates = set(
            session.scalars(
                select(Image.uri)
                .join(JobItem, JobItem.image_id == Image.id)
                .where(JobItem.job_id == job_id, JobItem.chunk_index == first_chunk)
            )
        ) - {poison_uri}
    assert len(mates) == 3

    python_path = os.pathsep.join(filter(None, [str(STOP_ON_OPEN), os.environ.get("PYTHONPATH")]))
    local = workers.start(
        settings, extra_env={"PYTHONPATH": python_path, "STOP_ON_OPEN": str(poison)}
    )
    killer = PoisonKiller(sessions, job_id, poison_id, local.pid)
    killer.start()
    try:
        balance = wait_for_job(sessions, job_id, settings, timeout=240)
    finally:
        killer.stopped.set()
        killer.join(timeout=10)

    rows = ledger(sessions, job_id)
    assert (rows[poison_uri].state, rows[poison_uri].reason) == ("failed", "poison")
    assert {rows[uri].state for uri in mates} == {"labeled"}
    assert_balanced(balance)
    assert balance.labeled == len(archive.generated) and balance.failed == 1
    assert results_per_image(sessions) == dict.fromkeys(archive.generated, 1)
    # Every kill hit a delivery of the poison image's chunk that was started and not finished,
    # each delivery once.
    assert all(
        seen is not None and seen[1] > 0 and seen[2] != ChunkStatus.DONE
        for seen in killer.killed_in
    ), killer.killed_in
    assert len(set(killer.killed_in)) == len(killer.killed_in), killer.killed_in
    # Chunk of 4, then 2, then the image alone until max_attempts deliveries: 2 + 2 kills.
    assert len(killer.killed_in) == 2 + settings.worker.max_attempts - 1, worker_log(settings)
