"""Issue 14's fault acceptance, broker and process side: each test runs real Redis, a real ledger
(PostgreSQL, or SQLite where stated) and real Celery worker processes, and ends with every image
in exactly one state and one result per (image, model version).

- Redis at `maxmemory` while a chunk retries: the retry's publish is refused (OOM), Celery
  rejects the message without requeue once memory is free again and the chunk has no message
  anywhere; the reconciler sends it again from the ledger.
- SIGTERM (a warm shutdown) mid-chunk: the worker finishes its chunk, exits cleanly and counts
  no crash; a new worker finishes the job.
- Two producers scanning the same folder at once: two jobs, each balanced, with chunk numbers of
  their own; no message refused; one result per image.

Nothing races a timer: a worker is caught inside its write by a table lock the test holds, a
pool process or a producer stops itself (SIGSTOP) when it opens a file the test names, and every
wait is on ledger, broker or process state, bounded. The workers keep the default task time
limit (not test_faults' 15 s): no chunk here is meant to die, and a short hard limit kills a
first chunk that loads the model slowly on a loaded machine, or a pool process held stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from core.broker import redis_task_ids, task_ids_in_broker
from core.settings import ReconcileSettings, ScanSettings, Settings
from core.uris import path_to_uri
from db.models import Chunk, ChunkStatus, Image, Job, JobItem, JobStatus, RefusedMessage
from emolabel.embedded import worker_environment
from tests.support.archives import build_archive, encode, noise, write_bytes
from tests.support.cli import cli, cli_scan
from tests.support.faults import (
    BLOCKED,
    STOP_ON_OPEN,
    TERMINATE,
    OwnRedis,
    chunk_in_progress,
    process_state,
)
from tests.support.ledger import assert_balanced, counts, ledger, results_per_image, wait_for_job
from tests.support.paths import REPO
from tests.support.services import wait_for
from tests.support.workers import SettingsFactory, Workers, child_pids, worker_log, worker_log_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# What the pool process logs when the retry's publish meets a full Redis.
REFUSED_RETRY = "reject requeue=False: Command # 1"
OUT_OF_MEMORY = "command not allowed when used memory > 'maxmemory'"


def chunks_of(sessions: sessionmaker[Session], job_id: int) -> list[Chunk]:
    with sessions() as session:
        return list(
            session.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.chunk_index))
        )


def stopping_on_open(path: str) -> dict[str, str]:
    """Environment for a process that stops itself (SIGSTOP) when it opens `path`."""
    python_path = os.pathsep.join(filter(None, [str(STOP_ON_OPEN), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": python_path, "STOP_ON_OPEN": path}


# --- (a) Redis at maxmemory while a chunk retries ---------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A private redis-server with `noeviction` (as a worker requires), torn down last."""
    server = OwnRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Filler:
    """Fills a Redis past its `maxmemory` with junk keys (every write that needs memory is
    refused, as `noeviction` does when full), and frees it again.

    Megabytes over the limit, not a limit just above what is used: the few bytes a connection's
    buffers come and go by must not let a write through.
    """

    JUNK_KEYS = 32
    JUNK_BYTES = 256 * 1024  # 8 MiB in all; the limit is set 4 MiB under what is then used

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def fill(self) -> None:
        for number in range(self.JUNK_KEYS):
            self.client.set(f"junk:{number}", os.urandom(self.JUNK_BYTES))
        used = int(self.client.info("memory")["used_memory"])
        self.client.config_set("maxmemory", used - self.JUNK_KEYS * self.JUNK_BYTES // 2)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            self.client.lpush("junk:probe", "a message")

    def free(self) -> None:
        self.client.delete(*(f"junk:{number}" for number in range(self.JUNK_KEYS)))
        self.client.lpush("junk:probe", "a message")  # writes go through again
        self.client.delete("junk:probe")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_retry_refused_by_a_full_redis_is_sent_again_by_the_reconciler(
    own_redis: OwnRedis,  # first, so that it is torn down after the worker
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
    database_url: str,
) -> None:
    # One chunk: with nothing else queued, the worker fetches no other message while Redis is
    # full (a fetch would lose that message too, at a moment no test can choose).
    archive = build_archive(tmp_path / "archive", 8)
    settings = make_settings(
        scan=ScanSettings(chunk_size=8),
        broker_url=own_redis.url,
        reconcile=ReconcileSettings(stale_after=0),
    )
    job_id = cli_scan(settings, str(archive.root))
    [chunk] = chunks_of(sessions, job_id)
    assert chunk.task_id is not None
    client = redis.Redis.from_url(own_redis.url, socket_timeout=10)
    filler = Filler(client)

    def in_redis() -> bool:
        return chunk.task_id in task_ids_in_broker(client, settings.queue)

    # Holding the results table locked catches the worker inside its write transaction; its
    # connection is then terminated (a transient database error: the task retries). Redis is
    # full by then, so the retry's publish is refused and the task raises Reject(requeue=False).
    # Carrying that out (removing the message from the unacknowledged hash) is the worker's
    # parent process's part. With Redis still full the removal is refused too, the parent exits
    # ("Unrecoverable error") and the message stays unacknowledged, so nothing is lost; the
    # message is lost when memory came free in between, which in production is a window of
    # milliseconds. The test holds that window open: the parent is stopped (SIGSTOP) before the
    # child's retry and resumed only once the child has logged the refused publish and the
    # junk is gone.
    locker_engine = create_engine(database_url, poolclass=NullPool)
    try:
        with locker_engine.connect() as locker:
            locker.execute(text("LOCK TABLE results IN EXCLUSIVE MODE"))
            local = workers.start(settings)

            def activity(query: Any) -> int:
                locker.execute(text("SELECT pg_stat_clear_snapshot()"))
                return int(locker.execute(query).scalar() or 0)

            wait_for(
                lambda: activity(BLOCKED),
                timeout=120,
                interval=0.05,
                what="the worker waiting inside its write transaction",
            )
            assert in_redis(), "the chunk's message should be unacknowledged while it runs"
            filler.fill()
            os.kill(local.pid, signal.SIGSTOP)
            try:
                assert activity(TERMINATE) > 0
                locker.rollback()
                wait_for(
                    lambda: REFUSED_RETRY in worker_log_text(settings),
                    timeout=60,
                    what="the retry's publish to be refused",
                )
                assert in_redis(), "only the parent process rejects the message"
                filler.free()
            finally:
                os.kill(local.pid, signal.SIGCONT)
    finally:
        locker_engine.dispose()

    # The message is gone: neither queued nor unacknowledged (the retry never went out, and
    # the original was rejected without requeue), and the chunk is not done.
    wait_for(lambda: not in_redis(), timeout=60, what="the chunk's message to leave Redis")
    log = worker_log_text(settings)
    assert "transient error, retry" in log, worker_log(settings)
    assert OUT_OF_MEMORY in log
    assert "Unrecoverable error" not in log
    assert not in_redis()
    assert client.llen(settings.queue) == 0
    with sessions() as session:
        lost = session.get(Chunk, (job_id, chunk.chunk_index))
        assert lost is not None
        assert lost.status is ChunkStatus.PUBLISHED and lost.deliveries == 1
    assert counts(sessions, job_id).pending == len(archive.generated)

    done = cli(settings, "reconcile")
    assert "chunks sent again: 1" in done.stdout, done.stdout
    balance = wait_for_job(sessions, job_id, settings, timeout=120)
    assert_balanced(balance)
    assert balance.labeled == balance.enqueued == len(archive.generated)
    assert results_per_image(sessions) == dict.fromkeys(archive.generated, 1)
    assert local.process.poll() is None, "the worker should have lived through the full Redis"
    with sessions() as session:
        resent = session.get(Chunk, (job_id, chunk.chunk_index))
        assert resent is not None and resent.crashes == 0 and resent.task_id != chunk.task_id


# --- (b) SIGTERM mid-chunk --------------------------------------------------------------------


def test_a_warm_shutdown_mid_chunk_finishes_the_chunk_and_counts_no_crash(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
) -> None:
    archive = build_archive(tmp_path / "archive", 24)
    # First in the walk, so in the first chunk: the pool process stops itself when it opens
    # this image, inside the chunk, however fast the machine.
    holder = archive.root / "0-first" / "hold.png"
    holder.parent.mkdir()
    write_bytes(holder, encode(noise(), "PNG"))
    images = [*archive.generated, path_to_uri(holder)]
    settings = make_settings(scan=ScanSettings(chunk_size=6))
    job_id = cli_scan(settings, str(archive.root))
    with sessions() as session:
        held_index = session.scalar(
            select(JobItem.chunk_index)
            .join(Image, Image.id == JobItem.image_id)
            .where(JobItem.job_id == job_id, Image.uri == path_to_uri(holder))
        )
    local = workers.start(settings, extra_env=stopping_on_open(str(holder)))

    [child] = wait_for(
        lambda: [pid for pid in child_pids(local.pid) if process_state(pid) == "T"],
        timeout=120,
        interval=0.02,
        what="the pool process to stop at the image",
    )
    try:
        in_progress = chunk_in_progress(sessions, job_id)
        assert in_progress is not None and in_progress.chunk_index == held_index
        os.kill(local.pid, signal.SIGTERM)
        wait_for(
            lambda: "Warm shutdown" in worker_log_text(settings),
            timeout=30,
            what="the worker to begin its warm shutdown",
        )
    finally:
        os.kill(child, signal.SIGCONT)
    assert local.process.wait(timeout=90) == 0, worker_log(settings)

    # The stopping worker finished the chunk it held, in that one delivery.
    with sessions() as session:
        held = session.get(Chunk, (job_id, held_index))
        assert held is not None
        assert (held.status, held.deliveries, held.crashes) == (ChunkStatus.DONE, 1, 0)
    assert ledger(sessions, job_id)[path_to_uri(holder)].state == "labeled"
    # ...and acknowledged it before exiting: no message of it is left to deliver again.
    assert held.task_id not in redis_task_ids(settings.effective_broker_url, settings.queue)()

    workers.start(settings)
    balance = wait_for_job(sessions, job_id, settings, timeout=120)
    assert_balanced(balance)
    assert balance.labeled == balance.enqueued == len(images)
    assert results_per_image(sessions) == dict.fromkeys(images, 1)
    assert {chunk.chunk_index: chunk.crashes for chunk in chunks_of(sessions, job_id)} == {
        chunk.chunk_index: 0 for chunk in chunks_of(sessions, job_id)
    }
    assert all(row.reason != "poison" for row in ledger(sessions, job_id).values())
    assert "counted against the chunk" not in worker_log_text(settings)


# --- (c) two producers at once ----------------------------------------------------------------


def start_scan(settings: Settings, root: Path, extra_env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "emolabel", "scan", str(root)],
        env={**worker_environment(settings), "TF_CPP_MIN_LOG_LEVEL": "3", **extra_env},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def assert_chunks_match_ledger(sessions: sessionmaker[Session], job_id: int) -> None:
    """Each chunk number of the job is its own: the ledger rows in it are as many as it says."""
    with sessions() as session:
        sizes = dict(
            session.execute(
                select(Chunk.chunk_index, Chunk.size).where(Chunk.job_id == job_id)
            ).all()
        )
        members = Counter(
            session.scalars(
                select(JobItem.chunk_index).where(
                    JobItem.job_id == job_id, JobItem.chunk_index.is_not(None)
                )
            )
        )
    assert sizes == dict(members), (sizes, members)


def test_two_producers_scanning_the_same_folder_at_once(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
) -> None:
    archive = build_archive(tmp_path / "archive", 40)
    # Walked after the 20 images under a/ (names are walked sorted, depth first): each producer
    # stops itself when it opens this file, so both are provably mid-scan at once.
    gate = archive.root / "m-gate.png"
    write_bytes(gate, encode(noise(), "PNG"))
    images = [*archive.generated, path_to_uri(gate)]
    # A chunk per batch: each chunk committed and published as soon as its files are listed.
    # Read in the scan's own process: the process that stops at the gate is then the one that
    # writes, so the ledger is known complete up to the gate the moment both are stopped.
    settings = make_settings(scan=ScanSettings(chunk_size=4, batch_files=4, reader="inline"))
    workers.start(settings)

    # The producer opens a file by its name inside its folder (openat), so the name is matched.
    producers = [start_scan(settings, archive.root, stopping_on_open(gate.name)) for _ in "ab"]
    try:
        wait_for(
            lambda: all(process_state(p.pid) == "T" for p in producers),
            timeout=90,
            interval=0.02,
            what="both producers to stop mid-scan",
        )
        with sessions() as session:
            jobs = session.execute(select(Job.id, Job.status).order_by(Job.id)).all()
        assert [status for _, status in jobs] == [JobStatus.SCANNING] * 2
        job_ids = [job_id for job_id, _ in jobs]
        # Each job holds the 20 images listed so far: in full chunks, published, or skipped as
        # already labeled when the worker labeled them from the other job's chunks first.
        for job_id in job_ids:
            recorded = chunks_of(sessions, job_id)
            assert all(chunk.size == 4 for chunk in recorded)
            rows = ledger(sessions, job_id)
            assert len(rows) == 20
            assert (
                sum(chunk.size for chunk in recorded)
                + sum(row.reason == "already_labeled" for row in rows.values())
                == 20
            )
        for producer in producers:
            os.kill(producer.pid, signal.SIGCONT)
        outputs = [producer.communicate(timeout=120)[0] for producer in producers]
    finally:
        for producer in producers:
            if producer.poll() is None:
                producer.kill()
                producer.wait(timeout=30)
    assert [producer.returncode for producer in producers] == [0, 0], outputs

    for job_id in job_ids:
        balance = wait_for_job(sessions, job_id, settings, timeout=120)
        assert_balanced(balance)
        assert balance.enqueued == len(images)
        assert balance.failed == 0
        rows = ledger(sessions, job_id)
        assert set(rows) == set(images)
        assert {(row.state, row.reason) for row in rows.values()} <= {
            ("labeled", None),
            ("skipped", "already_labeled"),
        }
        assert_chunks_match_ledger(sessions, job_id)
    assert results_per_image(sessions) == dict.fromkeys(images, 1)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(RefusedMessage)) == 0
