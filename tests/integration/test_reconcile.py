"""Issue 14: the reconciler finishes what no operator should have to.

- Redis restarted WITHOUT an append-only file mid-job: every queued and unacknowledged chunk is
  gone; `status` says how many pending images have no message, `emolabel reconcile` resends
  them from the ledger, and a real worker labels every image exactly once.
- A producer SIGKILLed mid-scan (a real `run_scan` in another process, stopped at a point the
  test chooses): its job stays `scanning` until the reconciler sees its heartbeat is old, ends
  the scan with an error and publishes what was recorded; every recorded image is labeled.
- The broker inspection reads real kombu messages, queued and unacknowledged.
"""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.broker import redis_task_ids, task_ids_in_broker
from core.publishing import celery_publisher
from core.settings import ReconcileSettings, ScanSettings, Settings
from db.models import Chunk, ChunkStatus, Job, JobStatus
from db.reconcile import reconcile
from emolabel.embedded import worker_environment
from tests.support.archives import build_archive
from tests.support.cli import cli, cli_scan
from tests.support.faults import OwnRedis, chunk_in_progress, fault_settings
from tests.support.ledger import assert_balanced, counts, results_per_image, wait_for_job
from tests.support.paths import REPO
from tests.support.services import TEST_REDIS_URL, wait_for
from tests.support.workers import SettingsFactory, Workers, worker_log_text
from worker.celery_app import make_celery

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class RedisWithoutAof(OwnRedis):
    """A private redis-server that keeps nothing: a restart loses every message."""

    def start(self) -> None:
        super().start()
        client = redis.Redis.from_url(self.url)
        try:
            client.config_set("appendonly", "no")
        finally:
            client.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_redis_restarted_without_aof_then_the_reconciler_loses_nothing(
    tmp_path: Path,
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
) -> None:
    own_redis = RedisWithoutAof(tmp_path / "redis")
    own_redis.start()
    try:
        archive = build_archive(tmp_path / "archive", 40)
        settings = fault_settings(
            make_settings,
            chunk_size=5,
            broker_url=own_redis.url,
            reconcile=ReconcileSettings(stale_after=0),
        )
        job_id = cli_scan(settings, str(archive.root))
        local = workers.start(settings)
        wait_for(lambda: chunk_in_progress(sessions, job_id), timeout=60, interval=0.02)
        own_redis.kill()
        shutil.rmtree(own_redis.directory)  # nothing on disk: as a Redis without AOF restarts
        own_redis.start()  # empty: every queued and unacknowledged chunk is gone
        assert "have no message in Redis" in cli(settings, "status", str(job_id)).stdout
        assert "the broker can lose messages: appendonly" in worker_log_text(settings)

        done = cli(settings, "reconcile")
        assert "chunks sent again: " in done.stdout and "chunks sent again: 0" not in done.stdout
        balance = wait_for_job(sessions, job_id, settings, timeout=180)
        assert_balanced(balance)
        assert balance.labeled == len(archive.generated) == balance.enqueued
        assert results_per_image(sessions) == dict.fromkeys(archive.generated, 1)
        assert local.process.poll() is None
    finally:
        own_redis.kill()


SCAN_UNTIL_TOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from db.session import make_engine, make_sessionmaker
    from core.settings import Settings
    from core.publishing import celery_publisher
    from producer.enqueue import run_scan
    from core.storage.sources import FolderSource
    from worker.celery_app import make_celery

    root, gate, stop_after = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    settings = Settings()

    class Stalling:
        uri = FolderSource(root, max_file_bytes=2**20).uri

        def iter_entries(self):
            for number, entry in enumerate(FolderSource(root, max_file_bytes=2**20).iter_entries()):
                if number == stop_after:
                    gate.touch()  # the test kills us here, mid-scan
                    time.sleep(3600)
                yield entry

    sessions = make_sessionmaker(make_engine(settings.effective_database_url))
    run_scan(
        Stalling(),
        sessions=sessions,
        publish=celery_publisher(make_celery(settings), settings.queue),
        chunk_size=settings.scan.chunk_size,
        batch_files=settings.scan.batch_files,
        model_version=None,
    )
    """
)


def test_a_producer_killed_mid_scan_is_ended_by_the_reconciler(
    tmp_path: Path,
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
) -> None:
    archive = build_archive(tmp_path / "archive", 30)
    # A chunk a transaction, so the producer dies with part of the tree in the ledger.
    settings = make_settings(scan=ScanSettings(chunk_size=4, batch_files=4))
    gate = tmp_path / "scanned-enough"
    producer = subprocess.Popen(
        [sys.executable, "-c", SCAN_UNTIL_TOLD, str(archive.root), str(gate), "12"],
        env={**worker_environment(settings), "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    try:
        wait_for(gate.exists, timeout=120, what="the producer to scan 12 files")
        with sessions() as session:
            job = session.scalars(select(Job).order_by(Job.id.desc())).first()
        assert job is not None and job.status is JobStatus.SCANNING
        job_id = job.id
    finally:
        producer.send_signal(signal.SIGKILL)
        producer.wait(timeout=30)

    # Not yet: the producer's heartbeat is fresh, so the scan is left alone.
    publisher = celery_publisher(make_celery(settings), settings.queue)
    broker = redis_task_ids(settings.effective_broker_url, settings.queue)
    quiet = reconcile(
        sessions=sessions, publish=publisher, broker_task_ids=broker, settings=settings.reconcile
    )
    assert quiet.scans_ended == []
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.reconcile.producer_timeout + 1)
    report = reconcile(
        sessions=sessions,
        publish=publisher,
        broker_task_ids=broker,
        settings=settings.reconcile,
        now=later,
    )
    assert report.scans_ended == [job_id]
    with sessions() as session:
        ended = session.get(Job, job_id)
        assert ended is not None
        assert ended.status is JobStatus.QUEUED
        assert ended.error is not None and "producer" in ended.error
    workers.start(settings)
    balance = wait_for_job(sessions, job_id, settings, timeout=180)
    assert_balanced(balance)
    # What the producer recorded before it died (three full chunks of four) is labeled.
    assert balance.labeled == balance.enqueued == 12
    with sessions() as session:
        states = set(session.scalars(select(Chunk.status).where(Chunk.job_id == job_id)))
    assert states == {ChunkStatus.DONE}
    assert counts(sessions, job_id).pending == 0


def test_the_broker_inspection_sees_queued_and_unacknowledged_messages(queue: str) -> None:
    app = make_celery(make_settings_for_broker(queue))
    try:
        publish = celery_publisher(app, queue)
        sent = {publish(1, index, [f"file:///{index}.jpg"]) for index in range(3)}
    finally:
        app.close()
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        assert task_ids_in_broker(client, queue) >= sent
        # Take one as a worker does (kombu moves it to the unacked hash until it is acked).
        with make_celery(make_settings_for_broker(queue)).connection_for_read() as connection:
            simple = connection.SimpleQueue(queue, no_ack=False)
            message = simple.get(timeout=10)
            assert message.headers["id"] in sent
            assert task_ids_in_broker(client, queue) >= sent  # still seen, as unacknowledged
            message.ack()
            assert message.headers["id"] not in task_ids_in_broker(client, queue)
            simple.close()
    finally:
        client.delete(queue)
        client.close()


def make_settings_for_broker(queue: str) -> Settings:
    return Settings(broker_url=TEST_REDIS_URL, queue=queue)
