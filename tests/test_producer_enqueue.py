"""Scanning into jobs against the real services: SQLite and PostgreSQL ledgers, a real Redis.

Messages are read back from Redis as the worker would receive them (kombu's JSON envelope), so
what is checked is what was really published. PostgreSQL comes from the same server and
environment variables as tests/test_db.py; Redis is EMOLABEL_TEST_REDIS_URL (default the local
one, database 15), each test on a queue of its own.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from PIL import Image as PillowImage
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ConfigError
from core.names import LABEL_CHUNK
from core.publishing import Publisher, PublishError, celery_publisher
from core.reasons import Reason
from core.settings import Settings
from core.storage.entries import Entry, Run
from core.storage.sources import FolderSource, S3Source
from core.uris import path_to_uri, uri_to_path
from db import repository
from db.models import Chunk, ChunkStatus, Image, ItemState, Job, JobItem, JobStatus
from db.outbox import republish_unpublished
from db.repository import FailureRow, ResultRow
from db.session import make_engine, make_sessionmaker, upgrade
from producer.enqueue import (
    ScanInterrupted,
    ScanProgress,
    ScanSummary,
    Selection,
    SelectionKind,
    parse_where,
    run_scan,
)
from tests.support.services import TEST_REDIS_URL, PostgresServer
from worker.celery_app import make_celery

CLOSED_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
MiB = 1024 * 1024
IMAGE_COUNT = 50
JUNK_REASONS = {
    "notes.txt": Reason.NOT_AN_IMAGE,
    "fake.jpg": Reason.NOT_AN_IMAGE,
    "empty.png": Reason.EMPTY,
    "pipe.jpg": Reason.NOT_A_FILE,
    "escape.jpg": Reason.SYMLINK_OUTSIDE_ROOT,
}

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.integration),
]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def sessions(
    request: pytest.FixtureRequest,
    postgres: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[sessionmaker[Session]]:
    """A ledger migrated to head, one per backend; tests keep apart by their own files."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
    else:
        url = postgres.create_database()
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def celery_app(queue: str) -> Iterator[Celery]:
    app = make_celery(Settings(broker_url=TEST_REDIS_URL, queue=queue))
    yield app
    app.close()


@pytest.fixture
def publish(celery_app: Celery, queue: str) -> Publisher:
    return celery_publisher(celery_app, queue)


@pytest.fixture
def closed_broker(queue: str) -> Iterator[Publisher]:
    """A real publisher whose broker is down."""
    app = make_celery(Settings(broker_url=CLOSED_BROKER_URL, queue=queue))
    yield celery_publisher(app, queue)
    app.close()


# --- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    task_id: str
    job_id: int
    chunk_index: int
    uris: list[str]


def messages(broker: redis.Redis, queue: str, job_id: int | None = None) -> list[Message]:
    """The messages waiting in `queue`, oldest first, decoded from kombu's envelope."""
    found = []
    # kombu pushes on the left and workers pop on the right: the oldest is last.
    for raw in reversed(broker.lrange(queue, 0, -1)):
        envelope = json.loads(raw)
        assert envelope["headers"]["task"] == LABEL_CHUNK
        assert envelope["content-type"] == "application/json"
        assert envelope["properties"]["body_encoding"] == "base64"
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        assert kwargs == {}
        assert "URIs>" in envelope["headers"]["argsrepr"]  # not every URI a second time
        found.append(Message(envelope["headers"]["id"], *args))
    return [message for message in found if job_id is None or message.job_id == job_id]


def make_archive(root: Path) -> list[str]:
    """Real images in nested folders plus junk; returns the image URIs in walk order."""
    root.mkdir()
    paths: list[bytes] = []
    for index in range(IMAGE_COUNT - 1):
        folder = root / f"album{index % 4}" / ("deep" if index % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"photo{index:02d}.{'jpg' if index % 2 else 'png'}"
        image = PillowImage.new("RGB", (8 + index, 8), (index * 5, 100, 200))
        image.save(path, format="JPEG" if index % 2 else "PNG")
        paths.append(os.fsencode(path))
    latin1 = os.fsencode(root) + b"/caf\xe9.jpg"  # a name that is not UTF-8
    with open(latin1, "wb") as file:  # noqa: PTH123 (bytes path)
        PillowImage.new("RGB", (9, 9)).save(file, format="JPEG")
    paths.append(latin1)
    (root / "notes.txt").write_text("not a photo\n")
    (root / "fake.jpg").write_text("a text file with an image's name\n")
    (root / "empty.png").touch()
    os.mkfifo(root / "pipe.jpg")
    outside = root.parent / f"outside-{root.name}.jpg"
    PillowImage.new("RGB", (8, 8)).save(outside, format="JPEG")
    (root / "escape.jpg").symlink_to(outside)
    return [path_to_uri(path) for path in sorted(paths, key=_walk_key(root))]


def _walk_key(root: Path) -> Callable[[bytes], list[bytes]]:
    prefix = len(os.fsencode(root)) + 1
    return lambda path: path[prefix:].split(b"/")


def folder(root: Path) -> FolderSource:
    return FolderSource(root, max_file_bytes=MiB)


def scan(
    root: Path,
    sessions: sessionmaker[Session],
    publish: Publisher,
    *,
    model_version: str | None = "v1",
    chunk_size: int = 7,
    batch_files: int = 2048,
    force: bool = False,
    where: Sequence[Selection] = (),
    overlap_publish: str = "auto",
) -> ScanSummary:
    return run_scan(
        folder(root),
        sessions=sessions,
        publish=publish,
        chunk_size=chunk_size,
        batch_files=batch_files,
        model_version=model_version,
        force=force,
        where=where,
        overlap_publish=overlap_publish,
    )


@dataclass(frozen=True)
class Item:
    state: ItemState
    reason: str | None
    message: str | None
    chunk_index: int | None


def ledger(sessions: sessionmaker[Session], job_id: int) -> dict[str, Item]:
    with sessions() as session:
        rows = session.execute(
            select(Image.uri, JobItem.state, JobItem.reason, JobItem.message, JobItem.chunk_index)
            .join(Image, Image.id == JobItem.image_id)
            .where(JobItem.job_id == job_id)
        )
        return {
            uri: Item(state, reason, message, chunk_index)
            for uri, state, reason, message, chunk_index in rows
        }


def pending(sessions: sessionmaker[Session], job_id: int) -> set[str]:
    return {
        uri for uri, item in ledger(sessions, job_id).items() if item.state is ItemState.PENDING
    }


def chunks(sessions: sessionmaker[Session], job_id: int) -> list[Chunk]:
    with sessions() as session:
        query = select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.chunk_index)
        return list(session.scalars(query))


def job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found


def counts(sessions: sessionmaker[Session], job_id: int) -> repository.JobCounts:
    with sessions() as session:
        return repository.job_counts(session=session, job_id=job_id)


def label(
    sessions: sessionmaker[Session],
    job_id: int,
    version: str,
    *,
    confidence: dict[str, float] | None = None,
    fail: frozenset[str] = frozenset(),
) -> None:
    """Record outcomes for every pending image of a job, chunk by chunk, as a worker would."""
    with sessions() as session, session.begin():
        rows = session.execute(
            select(JobItem.image_id, JobItem.chunk_index, Image.uri, Image.fingerprint)
            .join(Image, Image.id == JobItem.image_id)
            .where(JobItem.job_id == job_id, JobItem.state == ItemState.PENDING)
        ).all()
        for chunk_index in sorted({row.chunk_index for row in rows}):
            members = [row for row in rows if row.chunk_index == chunk_index]
            results = []
            for row in members:
                if row.uri in fail:
                    continue
                score = (confidence or {}).get(row.uri, 0.9)
                scores = {"happy": score, "sad": 1 - score}
                results.append(
                    ResultRow(row.image_id, version, "happy", score, scores, row.fingerprint)
                )
            failures = [
                FailureRow(r.image_id, "corrupt", "bad data") for r in members if r.uri in fail
            ]
            repository.record_outcomes(
                session=session,
                job_id=job_id,
                results=results,
                failures=failures,
                chunk_index=chunk_index,
            )
        repository.finish_job_if_complete(session=session, job_id=job_id)


# --- scanning ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlap_writes", "overlap_publish", "reader"),
    [
        ("never", "never", "inline"),
        ("always", "never", "inline"),
        ("never", "never", "process"),
        ("never", "always", "process"),
        ("always", "always", "inline"),
    ],
)
def test_a_tree_goes_out_in_full_chunks_and_every_file_has_a_ledger_row(
    sessions: sessionmaker[Session],
    publish: Publisher,
    broker: redis.Redis,
    queue: str,
    tmp_path: Path,
    overlap_writes: str,
    overlap_publish: str,
    reader: str,
) -> None:
    """The same ledger and messages whether the writes run beside the walk or after it, the
    publishing beside the records or after each, and the walk in this process or in a reading
    process."""
    root = tmp_path.resolve() / "archive"
    images = make_archive(root)
    reports: list[ScanProgress] = []

    summary = run_scan(
        folder(root),
        sessions=sessions,
        publish=publish,
        chunk_size=7,
        batch_files=21,  # three chunks a transaction: progress comes once per batch
        model_version="v1",
        options={"follow_symlinks": True},
        progress=reports.append,
        overlap_writes=overlap_writes,
        overlap_publish=overlap_publish,
        reader=reader,
    )

    sent = messages(broker, queue)
    assert len(sent) == math.ceil(IMAGE_COUNT / 7) == summary.chunks == 8
    assert [(m.job_id, m.chunk_index) for m in sent] == [(summary.job_id, i) for i in range(8)]
    assert [len(m.uris) for m in sent] == [7] * 7 + [1]
    assert [uri for m in sent for uri in m.uris] == images  # each once, in walk order

    items = ledger(sessions, summary.job_id)
    for message in sent:
        for uri in message.uris:
            assert items[uri] == Item(ItemState.PENDING, None, None, message.chunk_index)
    skipped = {
        uri.rsplit("/", 1)[1]: item
        for uri, item in items.items()
        if item.state is ItemState.SKIPPED
    }
    assert {name: item.reason for name, item in skipped.items()} == JUNK_REASONS
    assert all(item.message and item.chunk_index is None for item in skipped.values())
    assert len(items) == IMAGE_COUNT + len(JUNK_REASONS)

    recorded = chunks(sessions, summary.job_id)
    assert [(c.chunk_index, c.size, c.status, c.attempts) for c in recorded] == [
        (i, len(m.uris), ChunkStatus.PUBLISHED, 1) for i, m in enumerate(sent)
    ]
    assert [c.task_id for c in recorded] == [m.task_id for m in sent]

    started = job(sessions, summary.job_id)
    assert (started.status, started.model_version, started.source) == (
        JobStatus.QUEUED,
        "v1",
        path_to_uri(root),
    )
    assert started.options == {
        "follow_symlinks": True,
        "chunk_size": 7,
        "chunk_bytes": None,
        "force": False,
        "where": [],
    }
    balance = counts(sessions, summary.job_id)
    assert balance.balanced
    assert (balance.enqueued, balance.pending, balance.skipped) == (55, 50, 5)

    assert (summary.seen, summary.enqueued_images) == (55, 50)
    assert summary.skipped_by_reason == {
        "empty": 1,
        "not_a_file": 1,
        "not_an_image": 2,
        "symlink_outside_root": 1,
    }
    assert len(reports) == math.ceil(55 / 21) + 1
    assert reports[-1] == ScanProgress(seen=55, images=50, skipped=5, enqueued=50, chunks=8)
    for before, after in itertools.pairwise(reports):
        assert before.seen <= after.seen and before.enqueued <= after.enqueued

    with sessions() as session:
        raw = session.scalar(select(Image.name_bytes).where(Image.uri == images[-1]))
    assert raw is not None and raw.endswith(b"/caf\xe9.jpg")


def test_a_byte_budget_closes_chunks_of_big_files_early(
    sessions: sessionmaker[Session],
    publish: Publisher,
    broker: redis.Redis,
    queue: str,
    tmp_path: Path,
) -> None:
    root = tmp_path.resolve() / "archive"
    images = make_archive(root)
    sizes = {uri: os.stat(uri_to_path(uri)).st_size for uri in images}  # noqa: PTH116 (bytes)
    budget = 3 * max(sizes[uri] for uri in images)

    summary = run_scan(
        folder(root), sessions=sessions, publish=publish, chunk_size=7, chunk_bytes=budget,
        model_version="v1",
    )  # fmt: skip

    sent = messages(broker, queue)
    assert [uri for m in sent for uri in m.uris] == images  # each once, in walk order
    assert all(sum(sizes[uri] for uri in m.uris) <= budget for m in sent)
    assert all(1 <= len(m.uris) <= 7 for m in sent)
    # Every chunk but the last closed because the next file would not fit, or at 7 files.
    for message, following in itertools.pairwise(sent):
        total = sum(sizes[uri] for uri in message.uris)
        assert len(message.uris) == 7 or total + sizes[following.uris[0]] > budget
    assert len(sent) > math.ceil(IMAGE_COUNT / 7)  # the budget cut some chunks short
    assert counts(sessions, summary.job_id).balanced
    assert job(sessions, summary.job_id).options["chunk_bytes"] == budget


def test_rescans_skip_labeled_images_until_they_change_or_are_forced(
    sessions: sessionmaker[Session],
    publish: Publisher,
    broker: redis.Redis,
    queue: str,
    tmp_path: Path,
) -> None:
    root = tmp_path.resolve() / "archive"
    images = make_archive(root)
    first = scan(root, sessions, publish, chunk_size=16)
    label(sessions, first.job_id, "v1")
    assert job(sessions, first.job_id).status is JobStatus.DONE

    again = scan(root, sessions, publish, chunk_size=16)

    assert (again.enqueued_images, again.chunks) == (0, 0)
    assert again.skipped_by_reason[Reason.ALREADY_LABELED] == IMAGE_COUNT
    assert messages(broker, queue, again.job_id) == []
    assert job(sessions, again.job_id).status is JobStatus.DONE  # nothing to wait for
    balance = counts(sessions, again.job_id)
    assert balance.balanced and balance.skipped == balance.enqueued == 55

    # A new mtime is a new fingerprint: exactly those files go out again.
    touched = images[3], images[20], images[-1]
    for uri in touched:
        os.utime(uri_to_path(uri), ns=(1_900_000_000_000_000_000, 1_900_000_000_000_000_000))
    changed = scan(root, sessions, publish, chunk_size=16)
    [message] = messages(broker, queue, changed.job_id)
    assert sorted(message.uris) == sorted(touched)
    assert pending(sessions, changed.job_id) == set(touched)
    assert changed.skipped_by_reason[Reason.ALREADY_LABELED] == IMAGE_COUNT - 3
    assert counts(sessions, changed.job_id).balanced

    forced = scan(root, sessions, publish, chunk_size=16, force=True)
    sent = messages(broker, queue, forced.job_id)
    assert sorted(uri for m in sent for uri in m.uris) == sorted(images)
    assert Reason.ALREADY_LABELED not in forced.skipped_by_reason
    assert job(sessions, forced.job_id).options["force"] is True


class ReadCounting:
    """A source (a folder's by default) that counts the files whose first bytes were read (its
    runs' `read`)."""

    def __init__(self, root: Path | None = None, *, inner: FolderSource | S3Source | None = None):
        self.inner = inner if inner is not None else folder(root or Path())
        self.uri = self.inner.uri
        self.read: list[str] = []

    def iter_entries(self) -> Iterator[Entry]:
        return self.inner.iter_entries()

    def iter_runs(self) -> Iterator[Run]:
        for run in self.inner.iter_runs():
            yield dataclasses.replace(run, _read=self._counted(run))

    def _counted(self, run: Run) -> Callable[[], list[Entry]]:
        original = run._read

        def read() -> list[Entry]:
            entries = original()
            self.read.extend(entry.uri for entry in entries)
            return entries

        return read


def open_below(root: Path) -> list[str]:
    """What this process holds open below `root` (folder descriptors a run failed to close)."""
    held = []
    for descriptor in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            target = str(descriptor.readlink())
            if target.startswith(str(root)):
                held.append(target)
    return held


def test_a_rescan_of_settled_folders_reads_and_itemizes_nothing_until_a_file_changes(
    sessions: sessionmaker[Session], publish: Publisher, tmp_path: Path
) -> None:
    root = tmp_path.resolve() / "archive"
    images = make_archive(root)
    junk_in_album = root / "album2" / "notes.txt"  # no image, and settled as such
    junk_in_album.write_text("not a photo\n")

    def rescan(**options: object) -> tuple[ScanSummary, ReadCounting]:
        source = ReadCounting(root)
        summary = run_scan(
            source,
            sessions=sessions,
            publish=publish,
            chunk_size=16,
            **options,  # type: ignore[arg-type]
        )
        return summary, source

    first, _ = rescan(model_version="v1")
    label(sessions, first.job_id, "v1")
    # The first rescan reads every file, finds all settled, and learns the folders.
    learned, source = rescan(model_version="v1")
    assert len(source.read) == 56 and learned.enqueued_images == 0

    quiet, source = rescan(model_version="v1")
    # The root folder's run holds a pipe and a link: it is read every time; the albums are not.
    root_files = {path_to_uri(p) for p in root.iterdir() if not p.is_dir()}
    assert set(source.read) == root_files
    assert quiet.enqueued_images == 0 and quiet.seen == 56
    assert quiet.skipped_by_reason[Reason.ALREADY_LABELED] == IMAGE_COUNT
    assert quiet.skipped_by_reason[Reason.NOT_AN_IMAGE] == 3
    assert set(ledger(sessions, quiet.job_id)) == root_files  # the albums: counted, no rows
    balance = counts(sessions, quiet.job_id)
    assert balance.balanced and (balance.enqueued, balance.skipped) == (56, 56)
    assert job(sessions, quiet.job_id).status is JobStatus.DONE
    with sessions() as session:
        reasons = repository.outcome_reasons(session=session, job_id=quiet.job_id)
    assert ("skipped", Reason.ALREADY_LABELED, IMAGE_COUNT) in reasons
    assert sum(count for _, _, count in reasons) == 56
    assert open_below(root) == []  # every run's folder descriptor was closed

    # A touched file: its folder run is read again and the file alone goes out.
    touched = next(uri for uri in images if "/album1/" in uri and "/deep/" not in uri)
    os.utime(uri_to_path(touched), ns=(1_900_000_000_000_000_000, 1_900_000_000_000_000_000))
    changed, source = rescan(model_version="v1")
    assert pending(sessions, changed.job_id) == {touched}
    album1 = {uri for uri in source.read if "/album1/" in uri and "/deep/" not in uri}
    assert touched in album1 and all("/album3/" not in uri for uri in source.read)
    assert counts(sessions, changed.job_id).balanced
    label(sessions, changed.job_id, "v1")

    # A file added to a folder: that folder is read, the new file goes out.
    added = root / "album3" / "new.png"
    PillowImage.new("RGB", (9, 9)).save(added, format="PNG")
    grown, source = rescan(model_version="v1")
    assert pending(sessions, grown.job_id) == {path_to_uri(added)}
    assert path_to_uri(added) in source.read and all("/album0/" not in u for u in source.read)
    label(sessions, grown.job_id, "v1")

    # --force, --where or the setting turned off: every file is read again.
    for options in (
        {"model_version": "v1", "force": True},
        {"model_version": "v1", "where": [parse_where("confidence<0.5")]},
        {"model_version": "v1", "skip_settled": False},
    ):
        summary, source = rescan(**options)
        assert len(source.read) == 57, options
        assert counts(sessions, summary.job_id).balanced
    # Nothing above forgot what v1 settled; album3, read while its new file was pending, is
    # learned by the first plain rescan after the file was labeled, and then left unread.
    album3 = {path_to_uri(p) for p in (root / "album3").iterdir() if not p.is_dir()}
    for expected_read in (root_files | album3, root_files):
        again, source = rescan(model_version="v1")
        assert set(source.read) == expected_read and again.enqueued_images == 0
    # Another model reads everything: nothing is settled for it yet.
    other, source = rescan(model_version="v2")
    assert len(source.read) == 57 and other.enqueued_images == IMAGE_COUNT + 1


def readers_left() -> list[int]:
    """This process's children still running `producer.read_ahead` (a scan's reading process)."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone while we looked
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            command = (entry / "cmdline").read_bytes()
            if int(fields[1]) == os.getpid() and b"producer.read_ahead" in command:
                left.append(int(entry.name))
    return left


def test_a_reading_process_skips_settled_folders_and_reads_changed_ones(
    sessions: sessionmaker[Session], publish: Publisher, tmp_path: Path
) -> None:
    """With `reader="process"` the reading process asks the ledger which folders are settled
    (its own connection): they are counted, not itemized, as in one process."""
    root = tmp_path.resolve() / "archive"
    images = make_archive(root)
    root_files = {path_to_uri(p) for p in root.iterdir() if not p.is_dir()}

    def rescan() -> ScanSummary:
        return run_scan(
            folder(root),
            sessions=sessions,
            publish=publish,
            chunk_size=16,
            model_version="v1",
            reader="process",
        )

    first = rescan()
    assert first.enqueued_images == IMAGE_COUNT
    label(sessions, first.job_id, "v1")
    learned = rescan()  # reads every file, finds every album settled
    assert len(ledger(sessions, learned.job_id)) == 55 and learned.enqueued_images == 0

    quiet = rescan()
    assert set(ledger(sessions, quiet.job_id)) == root_files  # the albums: counted, no rows
    assert quiet.seen == 55 and quiet.enqueued_images == 0
    assert quiet.skipped_by_reason[Reason.ALREADY_LABELED] == IMAGE_COUNT
    assert counts(sessions, quiet.job_id).balanced
    assert readers_left() == []  # the reader is gone once the scan ends

    touched = next(uri for uri in images if "/album1/" in uri and "/deep/" not in uri)
    os.utime(uri_to_path(touched), ns=(1_900_000_000_000_000_000, 1_900_000_000_000_000_000))
    changed = rescan()
    assert pending(sessions, changed.job_id) == {touched}
    assert counts(sessions, changed.job_id).balanced


def test_a_scan_that_stops_stops_its_reading_process(
    sessions: sessionmaker[Session], closed_broker: Publisher, tmp_path: Path
) -> None:
    """The broker refuses the first message: the scan stops as it does in one process, what
    was read is in the ledger, and the reading process does not outlive it."""
    root = tmp_path.resolve() / "archive"
    make_archive(root)
    with pytest.raises(ScanInterrupted) as raised:
        run_scan(
            folder(root),
            sessions=sessions,
            publish=closed_broker,
            chunk_size=4,
            batch_files=4,
            model_version="v1",
            reader="process",
        )
    assert readers_left() == []
    stopped = job(sessions, raised.value.job_id)
    assert stopped.error is not None and "scan stopped after" in stopped.error
    assert counts(sessions, raised.value.job_id).balanced


def test_a_folder_gone_before_the_reader_starts_is_a_clear_error(
    sessions: sessionmaker[Session], publish: Publisher, tmp_path: Path
) -> None:
    """The reading process's error is raised in the scan as it was raised there."""
    root = tmp_path.resolve() / "archive"
    make_archive(root)
    source = folder(root)
    shutil.rmtree(root)
    with pytest.raises(ConfigError, match="cannot read folder"):
        run_scan(
            source,
            sessions=sessions,
            publish=publish,
            chunk_size=4,
            model_version="v1",
            reader="process",
        )
    assert readers_left() == []


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("overlap_writes", "overlap_writes must be auto, always or never"),
        ("overlap_publish", "overlap_publish must be auto, always or never"),
        ("reader", "reader must be inline or process"),
    ],
)
def test_an_unknown_way_to_scan_is_a_config_error(
    sessions: sessionmaker[Session],
    publish: Publisher,
    tmp_path: Path,
    setting: str,
    complaint: str,
) -> None:
    root = tmp_path.resolve() / "archive"
    make_archive(root)
    unknown: dict[str, Any] = {setting: "sometimes"}
    with pytest.raises(ConfigError, match=complaint):
        run_scan(
            folder(root),
            sessions=sessions,
            publish=publish,
            chunk_size=4,
            model_version="v1",
            **unknown,
        )


def test_a_rescan_of_a_settled_s3_prefix_sends_no_get_until_an_object_changes(
    sessions: sessionmaker[Session], publish: Publisher, s3_endpoint: str
) -> None:
    import boto3

    from tests.support.s3 import S3_KEY, S3_REGION, S3_SECRET

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name=S3_REGION,
    )
    bucket = f"settled-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    images = {}
    for index in range(12):
        key = f"trip/{'day1' if index < 6 else 'day2'}/{index:02d}.png"
        buffer = io.BytesIO()
        PillowImage.new("RGB", (8 + index, 8), (index * 9, 50, 90)).save(buffer, format="PNG")
        images[key] = buffer.getvalue()
    images["trip/day2/notes.txt"] = b"not a photo\n"  # settled as not_an_image
    images["trip/cover.png"] = images["trip/day1/00.png"]
    for key, body in images.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    client.put_object(Bucket=bucket, Key="trip/day1/", Body=b"")  # a console's folder marker

    def rescan() -> tuple[ScanSummary, ReadCounting]:
        source = ReadCounting(
            inner=S3Source(
                f"s3://{bucket}/trip",
                endpoint_url=s3_endpoint,
                key=S3_KEY,
                secret=S3_SECRET,
                region=S3_REGION,
                max_file_bytes=MiB,
            )
        )
        summary = run_scan(
            source, sessions=sessions, publish=publish, chunk_size=4, model_version="v1"
        )
        return summary, source

    first, source = rescan()
    assert first.enqueued_images == 13 and len(source.read) == 14
    label(sessions, first.job_id, "v1")
    learned, source = rescan()  # reads every object, finds each folder settled, learns it
    assert len(source.read) == 14 and learned.enqueued_images == 0

    quiet, source = rescan()
    assert source.read == [] and quiet.enqueued_images == 0 and quiet.seen == 14
    assert quiet.skipped_by_reason == {Reason.ALREADY_LABELED: 13, Reason.NOT_AN_IMAGE: 1}
    assert ledger(sessions, quiet.job_id) == {}
    balance = counts(sessions, quiet.job_id)
    assert balance.balanced and (balance.enqueued, balance.skipped) == (14, 14)

    # An object written again (a new ETag): its folder's objects are read, it alone goes out.
    changed_key = "trip/day2/08.png"
    buffer = io.BytesIO()
    PillowImage.new("RGB", (30, 30), (1, 2, 3)).save(buffer, format="PNG")
    client.put_object(Bucket=bucket, Key=changed_key, Body=buffer.getvalue())
    changed, source = rescan()
    assert pending(sessions, changed.job_id) == {f"s3://{bucket}/{changed_key}"}
    assert {uri.rsplit("/", 2)[1] for uri in source.read} == {"day2"}
    assert counts(sessions, changed.job_id).balanced
    # The ranged GETs' threads end with the scan (the last run read or released stops them).
    readers = [t for t in threading.enumerate() if t.name.startswith("emolabel-s3")]
    for thread in readers:
        thread.join(timeout=30)
    assert not [thread for thread in readers if thread.is_alive()]


def test_where_selects_by_confidence_model_and_failure(
    sessions: sessionmaker[Session],
    publish: Publisher,
    broker: redis.Redis,
    queue: str,
    tmp_path: Path,
) -> None:
    root = tmp_path.resolve() / "archive"
    images = sorted(make_archive(root))
    unsure, failed, sure = set(images[:10]), set(images[10:15]), set(images[15:])
    first = scan(root, sessions, publish, chunk_size=10)
    label(
        sessions,
        first.job_id,
        "v1",
        confidence=dict.fromkeys(unsure, 0.55) | dict.fromkeys(sure, 0.95),
        fail=frozenset(failed),
    )

    def selected(*where: str, version: str = "v2", force: bool = False) -> set[str]:
        summary = scan(
            root,
            sessions,
            publish,
            model_version=version,
            chunk_size=10,
            force=force,
            where=[parse_where(text) for text in where],
        )
        sent = {uri for m in messages(broker, queue, summary.job_id) for uri in m.uris}
        assert sent == pending(sessions, summary.job_id)
        assert counts(sessions, summary.job_id).balanced
        left_out = sum(
            summary.skipped_by_reason.get(r, 0)
            for r in (Reason.NOT_SELECTED, Reason.ALREADY_LABELED)
        )
        assert left_out == IMAGE_COUNT - len(sent)
        assert job(sessions, summary.job_id).options["where"] == list(where)
        return sent

    assert selected("confidence<0.6") == unsure
    assert selected("failed") == failed  # still found after scans that skipped them
    assert selected("older-model") == unsure | sure
    assert selected("older-model", "confidence<0.6") == unsure
    assert selected("model!=v1") == set()
    assert selected("model!=v0", version="v1", force=True) == unsure | sure
    # Labeled by the scan's own model at this version: already labeled comes first.
    assert selected("confidence<0.6", version="v1") == set()


def test_older_model_needs_a_model_version(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    (tmp_path / "archive").mkdir()
    with pytest.raises(ConfigError, match="older-model needs a model version"):
        run_scan(
            folder(tmp_path / "archive"),
            sessions=sessions,
            publish=CountingPublisher(),
            chunk_size=5,
            model_version=None,
            where=[parse_where("older-model")],
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("older-model", Selection(SelectionKind.MODEL_OTHER_THAN)),
        ("model!=2024-05-01", Selection(SelectionKind.MODEL_OTHER_THAN, version="2024-05-01")),
        ("  Model != v1 ", Selection(SelectionKind.MODEL_OTHER_THAN, version="v1")),
        ("confidence<0.6", Selection(SelectionKind.CONFIDENCE_BELOW, threshold=0.6)),
        ("confidence < .25", Selection(SelectionKind.CONFIDENCE_BELOW, threshold=0.25)),
        ("FAILED", Selection(SelectionKind.FAILED)),
    ],
)
def test_parse_where_reads_each_accepted_form(text: str, expected: Selection) -> None:
    assert parse_where(text) == expected
    assert parse_where(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "older-model"),
        ("labeled", "confidence<NUMBER"),
        ("confidence>0.6", "model!=VERSION"),
        ("confidence<", "failed"),
        ("confidence<high", "from 0 to 1"),
        ("confidence<1.5", "from 0 to 1"),
        ("confidence<nan", "from 0 to 1"),
        ("model=v1", "older-model"),
        ("model!=", "older-model"),
        ("failed and confidence<0.6", "repeat --where"),
        ("failed or older-model", "repeat --where"),
    ],
)
def test_parse_where_refuses_anything_else_listing_the_forms(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        parse_where(text)


# --- when the broker is down ------------------------------------------------------------------


def test_a_closed_broker_is_a_publish_error_naming_it(closed_broker: Publisher) -> None:
    with pytest.raises(PublishError, match=r"127\.0\.0\.1:1/0 did not take chunk 3 of job 9"):
        closed_broker(9, 3, ["file:///a.jpg"])


@pytest.mark.parametrize("overlap_publish", ["never", "always"])
def test_a_scan_the_broker_stops_loses_nothing_and_can_be_republished(
    sessions: sessionmaker[Session],
    publish: Publisher,
    closed_broker: Publisher,
    broker: redis.Redis,
    queue: str,
    tmp_path: Path,
    overlap_publish: str,
) -> None:
    """The broker goes away mid-scan, whether the chunks are published after each batch or in
    a thread a batch behind the records: the same ledger, and every recorded chunk is either
    published and marked or pending for the republisher."""
    root = tmp_path.resolve() / "archive"
    make_archive(root)
    calls: list[int] = []

    def broker_goes_down(job_id: int, chunk_index: int, uris: list[str]) -> str:
        calls.append(chunk_index)
        return (publish if len(calls) <= 3 else closed_broker)(job_id, chunk_index, uris)

    with pytest.raises(ScanInterrupted) as caught:
        # One chunk a transaction: the broker goes away while most of the tree is still unlisted.
        scan(
            root,
            sessions,
            broker_goes_down,
            chunk_size=7,
            batch_files=7,
            overlap_publish=overlap_publish,
        )

    job_id = caught.value.job_id
    assert f"job {job_id}" in str(caught.value) and "republish" in str(caught.value)
    assert "127.0.0.1:1" in str(caught.value)
    assert [m.chunk_index for m in messages(broker, queue, job_id)] == [0, 1, 2]
    recorded = chunks(sessions, job_id)
    if overlap_publish == "never":
        assert "again for the files not listed" in str(caught.value)
        # The rest of the tree was not listed.
        assert len(ledger(sessions, job_id)) < IMAGE_COUNT + len(JUNK_REASONS)
    # With the publishing a batch behind, the records run up to two batches ahead of the
    # refusal (this small tree may be listed to its end); none is published after it.
    unsent = [c.chunk_index for c in recorded if c.status is ChunkStatus.PENDING]
    assert unsent and len(unsent) == caught.value.unpublished_chunks
    assert [c.status for c in recorded[:3]] == [ChunkStatus.PUBLISHED] * 3
    items = ledger(sessions, job_id)
    assert {i.chunk_index for i in items.values() if i.state is ItemState.PENDING} == {
        c.chunk_index for c in recorded
    }
    stopped = job(sessions, job_id)
    assert stopped.status is JobStatus.QUEUED
    assert stopped.error is not None and "scan stopped after" in stopped.error
    assert counts(sessions, job_id).balanced

    assert republish_unpublished(job_id, sessions=sessions, publish=publish) == len(unsent)

    sent = messages(broker, queue, job_id)
    assert [m.chunk_index for m in sent] == [c.chunk_index for c in recorded]
    sent_uris = [uri for m in sent for uri in m.uris]
    assert sorted(sent_uris) == sorted(pending(sessions, job_id))
    assert {c.status for c in chunks(sessions, job_id)} == {ChunkStatus.PUBLISHED}
    assert republish_unpublished(job_id, sessions=sessions, publish=publish) == 0

    # Redis lost every message; chunk 0 was done before that, the others were not.
    with sessions() as session, session.begin():
        image_ids = session.scalars(
            select(JobItem.image_id).where(JobItem.job_id == job_id, JobItem.chunk_index == 0)
        ).all()
        results = [ResultRow(i, "v1", "sad", 0.7, {"sad": 0.7, "happy": 0.3}) for i in image_ids]
        repository.record_outcomes(
            session=session, job_id=job_id, results=results, failures=[], chunk_index=0
        )
    broker.delete(queue)
    assert republish_unpublished(job_id, sessions=sessions, publish=publish, older_than=3600) == 0
    again = republish_unpublished(job_id, sessions=sessions, publish=publish, older_than=0)

    assert again == len(recorded) - 1
    assert [m.chunk_index for m in messages(broker, queue, job_id)] == list(range(1, len(recorded)))
    assert [c.attempts for c in chunks(sessions, job_id)] == [1] + [2] * again


def test_a_source_that_fails_midway_leaves_a_queued_job_with_its_error(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    class BrokenListing:
        uri = path_to_uri(tmp_path / "remote")

        def iter_entries(self) -> Iterator[Entry]:
            yield from fake_entries(f"{tmp_path}/remote", 12)
            raise ConfigError("cannot list s3://bucket/: SlowDown")

    publisher = CountingPublisher()
    with pytest.raises(ConfigError, match="SlowDown"):
        run_scan(
            BrokenListing(), sessions=sessions, publish=publisher, chunk_size=5, model_version="v1"
        )

    with sessions() as session:
        job_id = session.scalars(select(Job.id).where(Job.source == BrokenListing.uri)).one()
    stopped = job(sessions, job_id)
    assert stopped.status is JobStatus.QUEUED  # done once its recorded chunks are
    assert stopped.error is not None and "SlowDown" in stopped.error
    # All 12 files listed before the error are in the ledger (one not an image): the two full
    # chunks went out, the image waiting for a full chunk is recorded, not published.
    assert publisher.sent == [5, 5]
    recorded = chunks(sessions, job_id)
    assert [(c.size, c.status) for c in recorded] == [
        (5, ChunkStatus.PUBLISHED),
        (5, ChunkStatus.PUBLISHED),
        (1, ChunkStatus.PENDING),
    ]
    balance = counts(sessions, job_id)
    assert balance.balanced and (balance.enqueued, balance.skipped) == (12, 1)


def test_a_source_that_fails_at_once_leaves_a_finished_job_with_its_error(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    class Unlistable:
        uri = path_to_uri(tmp_path / "nowhere")

        def iter_entries(self) -> Iterator[Entry]:
            raise ConfigError("cannot list s3://bucket/: AccessDenied")

    with pytest.raises(ConfigError, match="AccessDenied"):
        run_scan(
            Unlistable(),
            sessions=sessions,
            publish=CountingPublisher(),
            chunk_size=5,
            model_version="v1",
        )

    with sessions() as session:
        stopped = session.scalars(select(Job).where(Job.source == Unlistable.uri)).one()
    assert stopped.status is JobStatus.DONE
    assert stopped.error is not None and "AccessDenied" in stopped.error


# --- memory -----------------------------------------------------------------------------------


class CountingPublisher:
    """Stands in for the broker only (the real one is tested above): counts each chunk's URIs."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def __call__(self, job_id: int, chunk_index: int, uris: list[str]) -> str:
        self.sent.append(len(uris))
        return f"task-{job_id}-{chunk_index}"


def fake_entries(prefix: str, count: int) -> Iterator[Entry]:
    """`count` generated entries, every tenth not an image; made one at a time."""
    for index in range(count):
        size = 1000 + index
        junk = index % 10 == 9
        yield Entry(
            uri=f"file://{prefix}/{index // 1000:04d}/{index:08d}.jpg",
            name_bytes=None,
            size_bytes=size,
            mtime_ns=index,
            fingerprint=f"{size}-{index}",
            image_type=None if junk else "jpeg",
            skip_reason=Reason.NOT_AN_IMAGE if junk else None,
            skip_message="content is not a supported image" if junk else None,
        )


class GeneratedSource:
    def __init__(self, prefix: str, count: int) -> None:
        self.uri = f"file://{prefix}"
        self.prefix = prefix
        self.count = count

    def iter_entries(self) -> Iterator[Entry]:
        return fake_entries(self.prefix, self.count)


@pytest.mark.slow
def test_memory_stays_flat_however_many_files(tmp_path: Path) -> None:
    """Tens of seconds: tracemalloc slows the statement compilation of every batch ~6x."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)

    def scan_generated(count: int) -> ScanSummary:
        publisher = CountingPublisher()
        source = GeneratedSource(f"/archive-{uuid.uuid4().hex}", count)
        summary = run_scan(
            source, sessions=sessions, publish=publisher, chunk_size=500, model_version="v1"
        )
        assert summary.seen == count and sum(publisher.sent) == summary.enqueued_images
        assert summary.enqueued_images == count - count // 10
        return summary

    def peak_bytes(count: int) -> int:
        tracemalloc.start()
        try:
            scan_generated(count)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    try:
        scan_generated(2_000)  # warm the caches (compiled statements, imports)
        # Four batches: one being read, one waiting and one being written (producer.pipeline)
        # are already held at once, as many as at any size.
        small = peak_bytes(8_000)
        large = peak_bytes(24_000)
    finally:
        engine.dispose()
    # Holding the listing would add several MiB at 16,000 more entries; the batches in flight
    # are the same either way.
    assert large < small * 1.25 + 512 * 1024, (small, large)


# --- no TensorFlow ----------------------------------------------------------------------------


def test_publishing_loads_no_tensorflow_keras_opencv_or_worker_tasks(queue: str) -> None:
    program = f"""
import sys
from core.settings import Settings
from core.publishing import celery_publisher
from producer.enqueue import run_scan
from worker.celery_app import make_celery
app = make_celery(Settings(broker_url={TEST_REDIS_URL!r}, queue={queue!r}))
celery_publisher(app, {queue!r})(1, 0, ["file:///a.jpg"])
loaded = sorted(m for m in ("tensorflow", "keras", "cv2", "worker.tasks") if m in sys.modules)
assert not loaded, loaded
"""
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 0, result.stderr


def test_on_sqlite_a_rescan_looks_up_its_batch_by_uri_not_every_result_of_the_model(
    tmp_path: Path, publish: Publisher
) -> None:
    """SQLite keeps no statistics by itself; without them it drove the already-labeled lookup
    from `results.model_version` (every result of the model read for each batch: a 1,000,000
    file rescan at 3,188 files/s). A scan refreshes them first, and the lookup then searches
    the batch's URIs in the images index."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    root = tmp_path / "archive"
    make_archive(root)
    with sessions.begin() as session:
        rows = [repository.ImageRow(f"file:///elsewhere/{n}.jpg", "1-1") for n in range(3000)]
        ids = list(repository.upsert_images(session=session, rows=rows).values())
        job_id = repository.create_job(session=session, source="/elsewhere", model_version="v1")
        repository.add_job_items(
            session=session,
            job_id=job_id,
            items=[repository.JobItemRow(i, chunk_index=0) for i in ids],
        )
        repository.record_outcomes(
            session=session,
            job_id=job_id,
            results=[ResultRow(i, "v1", "happy", 0.9, {"happy": 0.9, "sad": 0.1}) for i in ids],
            failures=[],
            chunk_index=0,
        )

    def lookup_plan(by_id: bool = False) -> str:
        statements: list[tuple[str, object]] = []

        def keep(_conn: object, _cursor: object, sql: str, params: object, *_: object) -> None:
            statements.append((sql, params))

        event.listen(engine, "before_cursor_execute", keep)
        try:
            with sessions() as session:
                if by_id:
                    found: Mapping[object, str] = repository.labeled_fingerprints_by_id(
                        session=session, image_ids=ids[:10], model_version="v1"
                    )
                else:
                    uris = [f"file:///elsewhere/{n}.jpg" for n in range(10)]
                    found = repository.labeled_fingerprints(
                        session=session, uris=uris, model_version="v1"
                    )
                assert len(found) == 10
        finally:
            event.remove(engine, "before_cursor_execute", keep)
        ((sql, params),) = statements
        with engine.connect() as connection:
            plan = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all()
        return "\n".join(str(row[-1]) for row in plan)

    with engine.connect() as connection:
        assert not connection.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'"
        ).all()
    summary = scan(root, sessions, publish)
    assert summary.enqueued_images == IMAGE_COUNT
    with engine.connect() as connection:
        counted = dict(
            connection.exec_driver_sql(
                "SELECT tbl, stat FROM sqlite_stat1 WHERE tbl IN ('images', 'results')"
            ).all()
        )
    # The statistics are the ledger's as the scan began: 3,000 images, 3,000 results.
    assert counted["images"].split()[0] == counted["results"].split()[0] == "3000"
    plan = lookup_plan()
    first = plan.splitlines()[0]
    assert first.startswith("SEARCH images USING") and "uri" in first, plan
    assert "model_version" not in first, plan
    # The scan's own lookup, by the ids it has: the results' primary key, never the version's
    # index.
    plan = lookup_plan(by_id=True)
    assert plan.startswith("SEARCH results USING") and "image_id=? AND model_version=?" in plan, (
        plan
    )
    assert "ix_results_model_version" not in plan, plan
    engine.dispose()
