"""Issue 3: a message put on the queue by hand, naming paths outside the job's root, is refused
and recorded, and nothing outside the root is read.

That nothing is read is shown by the reasons recorded: a path that does not exist would fail as
`missing` and /etc/passwd as `not_an_image` had the worker read them; `outside_root` is decided
from where the path resolves (an `O_PATH` handle on Linux, which reads nothing), before any file
is opened for reading.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Chunk, ChunkStatus, Image, Result
from emolabel.settings import ScanSettings
from producer.uris import path_to_uri
from tests.integration.conftest import (
    SettingsFactory,
    Workers,
    assert_balanced,
    build_archive,
    cli_scan,
    counts,
    encode,
    ledger,
    noise,
    wait_for_job,
    write_bytes,
)
from tests.services import wait_for
from worker.celery_app import LABEL_CHUNK, make_celery

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_hand_written_message_outside_the_root_is_refused_and_recorded(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
) -> None:
    archive = build_archive(tmp_path / "archive", 8)
    write_bytes(tmp_path / "outside.jpg", encode(noise(), "JPEG"))
    settings = make_settings(scan=ScanSettings(chunk_size=4))
    job_id = cli_scan(settings, str(archive.root))
    workers.start(settings)
    before = wait_for_job(sessions, job_id, settings)
    assert before.labeled == len(archive.generated)
    # Made after the scan, so that only the hand-written message names it.
    (archive.root / "shallow" / "escape.jpg").symlink_to(tmp_path / "outside.jpg")

    root = path_to_uri(archive.root)
    hand_written = [
        "file:///etc/passwd",
        f"{root}/../outside.jpg",
        f"{root}/shallow/../../outside.jpg",
        f"{root}/../never-there.jpg",
        f"{root}/shallow/escape.jpg",  # a link inside the root to a file outside it
        "file://elsewhere.example/etc/passwd",
        "s3://somebody-elses-bucket/photo.jpg",
    ]
    app = make_celery(settings)
    try:
        app.send_task(LABEL_CHUNK, args=[job_id, 999, hand_written], queue=settings.queue)
    finally:
        app.close()

    def chunk_done() -> bool:
        with sessions() as session:
            chunk = session.get(Chunk, (job_id, 999))
            return chunk is not None and chunk.status == ChunkStatus.DONE

    wait_for(chunk_done, timeout=60, what="the hand-written chunk to be recorded")
    rows = ledger(sessions, job_id)
    assert {uri: (rows[uri].state, rows[uri].reason) for uri in hand_written} == dict.fromkeys(
        hand_written, ("failed", "outside_root")
    )
    with sessions() as session:
        refused_results = session.scalar(
            select(func.count())
            .select_from(Result)
            .join(Image, Image.id == Result.image_id)
            .where(Image.uri.in_(hand_written))
        )
    assert refused_results == 0
    # The refusal is in the job's ledger, and its counts still balance.
    after = counts(sessions, job_id)
    assert after.failed == before.failed + len(hand_written)
    assert after.labeled == before.labeled
    assert_balanced(after)
