"""Issue 3's first acceptance point, on SQLite and on PostgreSQL: 1,000 generated images in nested
folders plus the hostile files, scanned by `emolabel scan`, labeled by a real worker process, read
back with SQLAlchemy and through `emolabel status` / `emolabel export`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import ScanSettings, WorkerSettings
from core.uris import path_to_uri, uri_to_path
from db.models import Chunk, Image, Result
from tests.support.archives import CLASSES, build_archive
from tests.support.cli import cli, cli_scan
from tests.support.ledger import assert_balanced, counts, ledger, results_per_image, wait_for_job
from tests.support.workers import SettingsFactory, Workers, worker_log_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARCHIVE_IMAGES = 1000
TOUCHED = 10


def test_an_archive_with_hostile_files_ends_with_every_file_in_one_state(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
    outside_dir: Path,
) -> None:
    archive = build_archive(tmp_path / "archive", ARCHIVE_IMAGES, outside=outside_dir)
    assert len(archive.expected) - ARCHIVE_IMAGES >= 20  # the hostile files
    settings = make_settings(
        scan=ScanSettings(chunk_size=100),
        worker=WorkerSettings(concurrency=1, batch_size=64, decode_threads=2),
    )

    # Scanned with no worker running, so that a file can vanish before a worker reads it.
    job_id = cli_scan(settings, str(archive.root))
    assert archive.doomed is not None
    archive.doomed.unlink()
    local = workers.start(settings)
    balance = wait_for_job(sessions, job_id, settings)

    rows = ledger(sessions, job_id)
    assert set(rows) == set(archive.expected)  # one row per file (the key is job + image)
    ended = {uri: (row.state, row.reason) for uri, row in rows.items()}
    wanted = {uri: (want.state, want.reason) for uri, want in archive.expected.items()}
    assert {uri: ended[uri] for uri in ended if ended[uri] != wanted[uri]} == {}
    assert_balanced(balance)
    assert balance.enqueued == len(archive.expected)
    assert balance.labeled == len(archive.labeled())
    assert results_per_image(sessions) == dict.fromkeys(archive.labeled(), 1)

    # Names are kept byte for byte: the raw bytes in name_bytes, the URI decodes back to them.
    assert archive.non_utf8_path is not None and archive.long_name_path is not None
    with sessions() as session:
        raw = session.scalar(
            select(Image.name_bytes).where(Image.uri == path_to_uri(archive.non_utf8_path))
        )
        long_uri = path_to_uri(archive.long_name_path)
        assert session.scalar(select(Image.name_bytes).where(Image.uri == long_uri)) is None
        # The file outside the root, reachable only through a link, is never an image of ours.
        outside = session.scalar(
            select(func.count()).select_from(Image).where(Image.uri.like("%/outside/%"))
        )
    assert raw == archive.non_utf8_path
    assert uri_to_path(path_to_uri(archive.non_utf8_path)) == archive.non_utf8_path
    assert len(uri_to_path(long_uri).rsplit(b"/", 1)[1]) == 200
    assert outside == 0

    status = cli(settings, "status", str(job_id)).stdout
    for line in ("failed: missing: 1", "failed: too_many_pixels: 1", "skipped: symlink_loop: 2"):
        assert line in status, status
    exported = [
        json.loads(line)
        for line in cli(settings, "export", "--job", str(job_id), "--format", "jsonl")
        .stdout.strip()
        .splitlines()
    ]
    assert {row["uri"] for row in exported} == archive.labeled()
    assert all(set(row["scores"]) == set(CLASSES) for row in exported)
    assert all(row["label"] in CLASSES and 0.0 <= row["confidence"] <= 1.0 for row in exported)
    assert {row["job_id"] for row in exported} == {job_id}

    # The whole story of the job in one file: one row per file, its state and reason, the
    # counts those of `status --json`; the Parquet file holds the same rows.
    story = [
        json.loads(line)
        for line in cli(settings, "export", "--job", str(job_id), "--state", "all", "--format",
                        "jsonl").stdout.strip().splitlines()
    ]  # fmt: skip
    assert sorted(row["uri"] for row in story) == sorted(archive.expected)
    assert {row["uri"]: (row["state"], row["reason"]) for row in story} == ended
    (reported,) = [json.loads(line) for line in cli(settings, "status", str(job_id), "--json")
                   .stdout.strip().splitlines()]  # fmt: skip
    for state in ("labeled", "failed", "skipped", "uncertain", "no_face", "pending"):
        assert sum(row["state"] == state for row in story) == reported[state], state
    assert all(row["message"] for row in story if row["state"] == "failed")
    labeled_rows = [row for row in story if row["state"] == "labeled"]
    assert all(row["label"] in CLASSES and row["scores"] for row in labeled_rows)
    assert all(row["label"] is None for row in story if row["state"] == "failed")
    parquet = tmp_path / "story.parquet"
    cli(settings, "export", "--job", str(job_id), "--state", "all", "--format", "parquet",
        "--output", str(parquet))  # fmt: skip
    table = pq.read_table(parquet).to_pylist()
    assert [(row["uri"], row["state"], row["reason"]) for row in table] == [
        (row["uri"], row["state"], row["reason"]) for row in story
    ]
    assert [dict(row["scores"] or []) for row in table] == [row["scores"] or {} for row in story]
    failed_json = [json.loads(line) for line in cli(settings, "failures", "--job", str(job_id),
                   "--json").stdout.strip().splitlines()]  # fmt: skip
    assert sorted(row["uri"] for row in failed_json) == sorted(
        row["uri"] for row in story if row["state"] == "failed"
    )

    # The worker is still running: a second scan of the unchanged archive enqueues nothing.
    again = cli_scan(settings, str(archive.root))
    again_balance = wait_for_job(sessions, again, settings, timeout=30)
    assert_balanced(again_balance)
    assert again_balance.labeled == again_balance.failed == 0
    with sessions() as session:
        assert session.scalar(select(func.count()).where(Chunk.job_id == again)) == 0
    skipped_again = {row.reason for row in ledger(sessions, again).values()}
    assert {"already_labeled", "already_failed"} <= skipped_again

    # What failed for its content is sent again only when asked for.
    failed_first = {uri for uri, want in archive.expected.items() if want.state == "failed"}
    retried = cli_scan(settings, str(archive.root), "--where", "failed")
    assert wait_for_job(sessions, retried, settings).failed == len(failed_first) - 1  # not missing

    # A new mtime is a new version of the file: exactly the touched files are labeled again.
    touched = sorted(archive.generated)[:: ARCHIVE_IMAGES // TOUCHED][:TOUCHED]
    for uri in touched:
        os.utime(uri_to_path(uri), ns=(1_900_000_000_000_000_000, 1_900_000_000_000_000_000))
    third = cli_scan(settings, str(archive.root))
    third_balance = wait_for_job(sessions, third, settings)
    assert_balanced(third_balance)
    assert third_balance.labeled == TOUCHED
    assert {uri for uri, row in ledger(sessions, third).items() if row.state == "labeled"} == set(
        touched
    )
    with sessions() as session:
        relabeled = session.scalar(select(func.count()).where(Result.job_id == third))
    assert relabeled == TOUCHED
    assert results_per_image(sessions) == dict.fromkeys(archive.labeled(), 1)
    assert counts(sessions, job_id) == balance  # the first job's ledger is history, unchanged
    # No hostile file took a process down: the worker lived throughout and lost no pool process.
    assert local.process.poll() is None
    assert "WorkerLostError" not in worker_log_text(settings)
