"""Issues 3 and 14: a message put on the queue by hand is refused and recorded, and nothing it
names is read: the worker takes a chunk's images from the ledger, never from the message.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.names import LABEL_CHUNK
from core.settings import ScanSettings
from core.uris import path_to_uri
from db.models import Chunk, Image, JobItem, RefusedMessage
from tests.support.archives import build_archive, encode, noise, write_bytes
from tests.support.cli import cli_scan
from tests.support.ledger import assert_balanced, counts, wait_for_job
from tests.support.services import wait_for
from tests.support.workers import SettingsFactory, Workers
from worker.celery_app import make_celery

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_forged_messages_are_refused_recorded_and_change_nothing(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
) -> None:
    """Issue 14: the ledger, not the message, decides a chunk's images. Messages a real worker
    gets by hand (outside paths, another job's chunk, a reused number, wrong types, a huge
    list) are refused and recorded in `refused_messages`; nothing is read, nothing is written
    to any job's ledger, and the genuine jobs finish balanced."""
    archive = build_archive(tmp_path / "archive", 8)
    other = build_archive(tmp_path / "other", 4)
    write_bytes(tmp_path / "outside.jpg", encode(noise(), "JPEG"))
    settings = make_settings(scan=ScanSettings(chunk_size=4))
    job_id = cli_scan(settings, str(archive.root))
    other_job = cli_scan(settings, str(other.root))
    workers.start(settings)
    before = wait_for_job(sessions, job_id, settings)
    assert before.labeled == len(archive.generated)
    wait_for_job(sessions, other_job, settings)
    (archive.root / "shallow" / "escape.jpg").symlink_to(tmp_path / "outside.jpg")

    root = path_to_uri(archive.root)
    hand_written = [
        "file:///etc/passwd",
        f"{root}/../outside.jpg",
        f"{root}/shallow/escape.jpg",  # a link inside the root to a file outside it
        "s3://somebody-elses-bucket/photo.jpg",
    ]
    with sessions() as session:
        other_chunk = sorted(
            session.scalars(
                select(Image.uri)
                .join(JobItem, JobItem.image_id == Image.id)
                .where(JobItem.job_id == other_job, JobItem.chunk_index == 0)
            )
        )
    forged: list[list[object]] = [
        [job_id, 999, hand_written],  # a chunk the ledger never recorded
        [job_id, 0, hand_written],  # a reused chunk number (already done)
        # Another job's chunk under a number of this job already done: nothing to do.
        # (Against a chunk still open it is refused: tests/test_ledger_delivery.py.)
        [job_id, 1, other_chunk],
        [10**9, 0, hand_written],  # no such job
        ["1", 0, hand_written],  # wrong types
        [job_id, 0, ["file:///x.jpg"] * 20_000],  # a huge list
        [job_id, 0, hand_written, "extra"],
    ]
    app = make_celery(settings)
    try:
        for args in forged:
            app.send_task(LABEL_CHUNK, args=args, queue=settings.queue)
    finally:
        app.close()

    def refusals() -> list[str]:
        with sessions() as session:
            return sorted(session.scalars(select(RefusedMessage.reason)))

    wait_for(lambda: len(refusals()) == 5, timeout=60, what="five refused messages on record")
    assert refusals() == ["malformed"] * 3 + ["unknown_chunk", "unknown_job"]
    with sessions() as session:
        named = select(func.count()).select_from(Image).where(Image.uri.in_(hand_written))
        assert session.scalar(named) == 0
        assert session.get(Chunk, (job_id, 999)) is None
    after = counts(sessions, job_id)
    assert after == before
    assert_balanced(after)
    assert counts(sessions, other_job).labeled == len(other.generated)
