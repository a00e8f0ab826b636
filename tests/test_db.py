"""The ledger on both databases: every test runs on SQLite (a temporary file) and PostgreSQL.

PostgreSQL is the server at EMOLABEL_TEST_POSTGRES_URL (default: the local one, user postgres);
each test session creates its own databases there and drops them at the end. When it cannot be
reached the tests fail, unless EMOLABEL_TEST_NO_POSTGRES=1 says to run SQLite alone.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes, urlsplit

import pytest
from sqlalchemy import Engine, delete, func, inspect, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import repository
from db.models import (
    Chunk,
    ChunkStatus,
    Image,
    ItemState,
    Job,
    JobItem,
    JobStatus,
    ModelStatus,
    ModelVersion,
    Result,
    RetrainDecision,
    RetrainRun,
)
from db.repository import (
    ChunkRow,
    FailureRow,
    ImageRow,
    JobItemRow,
    NotFoundError,
    ResultRow,
)
from db.session import (
    HEAD_REVISION,
    SchemaMismatchError,
    check_schema,
    current_revision,
    downgrade,
    ensure_schema,
    head_revision,
    make_engine,
    make_sessionmaker,
    ready_schema,
    upgrade,
)
from tests.support.services import POSTGRES_ADMIN_URL, PostgresServer

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.integration),
]

NewDatabase = Callable[[str], str]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def new_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NewDatabase]:
    """Make an empty database on a backend and return its URL; PostgreSQL ones are dropped."""
    folder = tmp_path_factory.mktemp("databases")
    server = PostgresServer(POSTGRES_ADMIN_URL)

    def make(backend: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{folder / uuid.uuid4().hex}.db"
        return server.create_database()

    yield make
    server.drop_databases()


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def database_url(backend: str, new_database: NewDatabase) -> str:
    """A database migrated to head once per backend and test session."""
    url = new_database(backend)
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session inside a transaction that is rolled back after the test."""
    with engine.connect() as connection:
        transaction = connection.begin()
        session = Session(bind=connection)
        try:
            yield session
        finally:
            session.close()
            transaction.rollback()


def unique() -> str:
    return f"file:///photos/{uuid.uuid4().hex}"


def images(session: Session, count: int) -> dict[str, int]:
    rows = [ImageRow(uri=f"{unique()}.jpg", fingerprint=f"{index}-1") for index in range(count)]
    return repository.upsert_images(session=session, rows=rows)


def queued_job(session: Session, image_ids: list[int], *, chunk_size: int = 2) -> int:
    """A job with its images pending in chunks of `chunk_size`, status queued."""
    job_id = repository.create_job(
        session=session, source="/photos", options={"chunk_size": chunk_size}
    )
    items = [
        JobItemRow(image_id, chunk_index=index // chunk_size)
        for index, image_id in enumerate(image_ids)
    ]
    repository.add_job_items(session=session, job_id=job_id, items=items)
    repository.set_job_status(
        session=session, job_id=job_id, status=JobStatus.QUEUED, enqueued=len(items)
    )
    return job_id


def result(image_id: int, version: str = "v1", label: str = "happy") -> ResultRow:
    return ResultRow(
        image_id=image_id,
        model_version=version,
        label=label,
        confidence=0.9,
        scores={"happy": 0.9, "sad": 0.1},
    )


# --- schema -----------------------------------------------------------------------------------


def test_migrations_build_the_models_schema_from_empty(
    backend: str, new_database: NewDatabase
) -> None:
    url = new_database(backend)
    engine = make_engine(url)
    try:
        assert current_revision(engine) is None
        upgrade(url)
        assert current_revision(engine) == head_revision() is not None
        check_schema(url)
        ensure_schema(engine)  # at head already: nothing to do
        downgrade(engine, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        ensure_schema(engine)
        check_schema(url)
        # The comparison is real: a missing index is reported.
        with engine.begin() as connection:
            connection.execute(text("DROP INDEX ix_results_label"))
        with pytest.raises(SchemaMismatchError, match="ix_results_label"):
            check_schema(url)
    finally:
        engine.dispose()


def test_check_schema_refuses_a_database_behind_the_migrations(
    backend: str, new_database: NewDatabase
) -> None:
    url = new_database(backend)
    with pytest.raises(SchemaMismatchError, match="run upgrade"):
        check_schema(url)


def test_the_head_revision_constant_is_the_migrations_head() -> None:
    # Commands compare the database with HEAD_REVISION without loading the migrations: a new
    # migration must move it too.
    assert head_revision() == HEAD_REVISION


def test_ready_schema_migrates_or_refuses_by_the_revision_alone(
    backend: str, new_database: NewDatabase
) -> None:
    url = new_database(backend)
    with pytest.raises(SchemaMismatchError, match=r"at revision None.*run upgrade"):
        ready_schema(url, migrate=False)
    ready_schema(url, migrate=True)  # the embedded default: migrated on first use
    check_schema(url)
    ready_schema(url, migrate=False)  # at head: nothing to do
    engine = make_engine(url)
    try:
        downgrade(engine, "0004")
        with pytest.raises(SchemaMismatchError, match="at revision 0004"):
            ready_schema(url, migrate=False)
        ready_schema(url, migrate=True)
        assert current_revision(engine) == HEAD_REVISION
    finally:
        engine.dispose()


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        with engine.connect() as connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys")
            }
    finally:
        engine.dispose()
    assert pragmas == {"journal_mode": "wal", "busy_timeout": 30_000, "foreign_keys": 1}


# --- images -----------------------------------------------------------------------------------


def test_upsert_images_twice_gives_the_same_ids_and_no_duplicates(session: Session) -> None:
    rows = [
        ImageRow(uri=f"{unique()}.jpg", fingerprint=f"{i}-7", size_bytes=i, mtime_ns=7)
        for i in range(25)
    ]
    first = repository.upsert_images(session=session, rows=rows)
    second = repository.upsert_images(session=session, rows=rows)
    assert first == second
    assert len(set(first.values())) == len(rows)
    stored = session.scalar(select(func.count()).where(Image.uri.in_([row.uri for row in rows])))
    assert stored == len(rows)


def test_record_images_says_which_images_it_inserted(session: Session) -> None:
    old = [ImageRow(uri=f"{unique()}.jpg", fingerprint=f"{i}-1") for i in range(5)]
    first = repository.record_images(session=session, rows=old)
    assert first.new == frozenset(first.ids.values()) and len(first.ids) == 5
    changed = ImageRow(uri=old[0].uri, fingerprint="9-9")
    fresh = [ImageRow(uri=f"{unique()}.jpg", fingerprint="3-3") for _ in range(4)]
    again = repository.record_images(session=session, rows=[changed, *old[1:], *fresh, fresh[0]])
    assert again.ids == {
        **first.ids,
        **repository.image_ids_for_uris(session=session, uris=[row.uri for row in fresh]),
    }
    # Neither the unchanged images nor the changed one are new; the four others are.
    assert again.new == frozenset(again.ids[row.uri] for row in fresh)
    assert repository.record_images(session=session, rows=[]).ids == {}


def test_add_job_items_tells_new_rows_from_rows_already_in_the_job(session: Session) -> None:
    recorded = repository.record_images(
        session=session,
        rows=[ImageRow(uri=f"{unique()}.jpg", fingerprint=f"{i}-1") for i in range(6)],
    )
    ids = sorted(recorded.ids.values())
    job_id = repository.create_job(session=session, source="file:///photos", options={})
    first = repository.add_job_items(
        session=session,
        job_id=job_id,
        items=[JobItemRow(image_id, chunk_index=0) for image_id in ids[:4]],
        new_images=recorded.new,
    )
    assert first == set(ids[:4])
    # The first four are in the job now: only the last two go in, and the first row given wins.
    second = repository.add_job_items(
        session=session,
        job_id=job_id,
        items=[
            JobItemRow(ids[5], chunk_index=1),
            *(JobItemRow(image_id, chunk_index=1) for image_id in ids),
        ],
    )
    assert second == set(ids[4:])
    rows = dict(
        session.execute(
            select(JobItem.image_id, JobItem.chunk_index).where(JobItem.job_id == job_id)
        ).all()
    )
    assert rows == {**dict.fromkeys(ids[:4], 0), ids[4]: 1, ids[5]: 1}


def test_upsert_images_respects_the_parameter_limit(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    dbapi_connection = session.connection().connection.dbapi_connection
    if session.get_bind().dialect.name == "sqlite":
        # A build with the historical limit: every statement must fit in 50 parameters.
        previous = dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50)  # type: ignore[union-attr]
    else:
        monkeypatch.setattr("db.repository.base.MAX_ROWS_PER_STATEMENT", 7)
    try:
        rows = [ImageRow(uri=f"{unique()}.jpg", fingerprint="1-1") for _ in range(60)]
        ids = repository.upsert_images(session=session, rows=rows)
        assert repository.upsert_images(session=session, rows=rows) == ids
        assert len(set(ids.values())) == 60
        assert repository.image_ids_for_uris(session=session, uris=ids) == ids
    finally:
        if session.get_bind().dialect.name == "sqlite":
            dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, previous)  # type: ignore[union-attr]


def test_a_changed_file_replaces_what_was_known_of_the_old_version(session: Session) -> None:
    uri = f"{unique()}.jpg"
    row = ImageRow(uri=uri, fingerprint="10-1", size_bytes=10, mtime_ns=1)
    image_id = repository.upsert_images(session=session, rows=[row])[uri]
    digest = "a" * 64
    learned = ImageRow(
        uri=uri,
        fingerprint="10-1",
        size_bytes=10,
        mtime_ns=1,
        content_sha256=digest,
        width=4,
        height=3,
    )
    repository.upsert_images(session=session, rows=[learned])
    # The producer rescans and knows nothing new: what was learned stays.
    repository.upsert_images(session=session, rows=[row])
    image = session.get(Image, image_id, populate_existing=True)
    assert image is not None
    assert (image.content_sha256, image.width, image.height) == (digest, 4, 3)
    changed = ImageRow(uri=uri, fingerprint="12-2", size_bytes=12, mtime_ns=2)
    assert repository.upsert_images(session=session, rows=[changed]) == {uri: image_id}
    image = session.get(Image, image_id, populate_existing=True)
    assert image is not None
    assert (image.fingerprint, image.size_bytes, image.content_sha256, image.width) == (
        "12-2",
        12,
        None,
        None,
    )
    assert image.updated_at.tzinfo is not None


def test_non_utf8_name_bytes_round_trip(session: Session) -> None:
    name = b"caf\xe9 \xff\xfe.jpg"  # Latin-1 and garbage: not UTF-8
    uri = f"file:///photos/{uuid.uuid4().hex}/{quote(name)}"
    image_id = repository.upsert_images(
        session=session, rows=[ImageRow(uri=uri, fingerprint="9-9", name_bytes=name)]
    )[uri]
    session.expunge_all()
    image = session.get(Image, image_id)
    assert image is not None
    assert image.name_bytes == name
    assert unquote_to_bytes(urlsplit(image.uri).path).endswith(name)


def test_a_uri_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(ValueError, match="percent-encode"):
        ImageRow(uri="file:///photos/caf\udce9.jpg", fingerprint="1-1")
    with pytest.raises(ValueError, match="NUL"):
        ImageRow(uri="file:///photos/a\x00b.jpg", fingerprint="1-1")


# --- outcomes and counts ----------------------------------------------------------------------


def test_a_redelivered_chunk_writes_one_result_per_image_and_version(session: Session) -> None:
    ids = list(images(session, 4).values())
    job_id = queued_job(session, ids, chunk_size=4)
    results = [result(image_id) for image_id in ids[:3]]
    failures = [FailureRow(ids[3], "corrupt", "truncated JPEG")]
    for expected in (3, 0):
        written = repository.record_outcomes(
            session=session, job_id=job_id, results=results, failures=failures, chunk_index=0
        )
        assert written == expected
    per_key = session.execute(
        select(Result.image_id, Result.model_version, func.count())
        .where(Result.image_id.in_(ids))
        .group_by(Result.image_id, Result.model_version)
    ).all()
    assert sorted(per_key) == sorted((image_id, "v1", 1) for image_id in ids[:3])
    items = {
        item.image_id: item
        for item in session.scalars(select(JobItem).where(JobItem.job_id == job_id))
    }
    assert [items[i].state for i in ids] == [ItemState.LABELED] * 3 + [ItemState.FAILED]
    assert {item.attempts for item in items.values()} == {2}
    assert (items[ids[3]].reason, items[ids[3]].message) == ("corrupt", "truncated JPEG")
    stored = session.get(Result, (ids[0], "v1"))
    assert stored is not None
    assert stored.scores == {"happy": 0.9, "sad": 0.1}
    assert stored.job_id == job_id


def test_a_labeled_item_is_never_turned_failed_by_a_redelivery(session: Session) -> None:
    ids = list(images(session, 1).values())
    job_id = queued_job(session, ids)
    repository.record_outcomes(
        session=session, job_id=job_id, results=[result(ids[0])], failures=[]
    )
    repository.record_outcomes(
        session=session, job_id=job_id, results=[], failures=[FailureRow(ids[0], "missing")]
    )
    item = session.get(JobItem, (job_id, ids[0]))
    assert item is not None
    assert (item.state, item.reason) == (ItemState.LABELED, None)
    with pytest.raises(ValueError, match="both labeled and failed"):
        repository.record_outcomes(
            session=session,
            job_id=job_id,
            results=[result(ids[0])],
            failures=[FailureRow(ids[0], "corrupt")],
        )


def test_counts_balance_and_the_job_finishes_when_nothing_is_pending(session: Session) -> None:
    ids = list(images(session, 7).values())
    job_id = repository.create_job(session=session, source="s3://bucket/prefix")
    skipped = [
        JobItemRow(ids[5], state=ItemState.SKIPPED, reason="not_an_image"),
        JobItemRow(ids[6], state=ItemState.SKIPPED, reason="already_labeled"),
    ]
    pending = [
        JobItemRow(image_id, chunk_index=index // 3) for index, image_id in enumerate(ids[:5])
    ]
    assert (
        len(repository.add_job_items(session=session, job_id=job_id, items=pending + skipped)) == 7
    )
    assert repository.add_job_items(session=session, job_id=job_id, items=pending) == set()
    # Still scanning: even with nothing pending the job is not done.
    repository.set_job_status(session=session, job_id=job_id, status=JobStatus.RUNNING, enqueued=7)
    counts = repository.job_counts(session=session, job_id=job_id)
    assert (counts.enqueued, counts.pending, counts.skipped, counts.balanced) == (7, 5, 2, True)

    repository.record_outcomes(
        session=session,
        job_id=job_id,
        results=[result(i) for i in ids[:2]],
        failures=[FailureRow(ids[2], "too_many_pixels")],
        chunk_index=0,
    )
    assert not repository.finish_job_if_complete(session=session, job_id=job_id)
    counts = repository.job_counts(session=session, job_id=job_id)
    assert (counts.labeled, counts.failed, counts.skipped, counts.pending) == (2, 1, 2, 2)
    assert counts.balanced

    repository.record_outcomes(
        session=session,
        job_id=job_id,
        results=[result(i) for i in ids[3:5]],
        failures=[],
        chunk_index=1,
    )
    assert repository.finish_job_if_complete(session=session, job_id=job_id)
    assert not repository.finish_job_if_complete(session=session, job_id=job_id)
    counts = repository.job_counts(session=session, job_id=job_id)
    assert counts.enqueued == counts.labeled + counts.failed + counts.skipped == 7
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    assert job.status is JobStatus.DONE
    assert job.started_at is not None and job.finished_at is not None
    assert job.finished_at >= job.started_at


def test_a_finished_job_keeps_its_counts_until_it_is_reopened(session: Session) -> None:
    ids = list(images(session, 4).values())
    job_id = repository.create_job(session=session, source="/photos")
    items = [JobItemRow(image_id, chunk_index=0) for image_id in ids[:3]]
    items.append(JobItemRow(ids[3], state=ItemState.SKIPPED, reason="not_an_image"))
    repository.add_job_items(session=session, job_id=job_id, items=items)
    repository.set_job_status(session=session, job_id=job_id, status=JobStatus.RUNNING, enqueued=4)
    repository.record_outcomes(
        session=session,
        job_id=job_id,
        results=[result(ids[0]), result(ids[1])],
        failures=[FailureRow(ids[2], "corrupt")],
        chunk_index=0,
    )
    assert repository.finish_job_if_complete(session=session, job_id=job_id)
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None and job.summary is not None
    assert job.summary["states"] == {
        "labeled": 2, "failed": 1, "skipped": 1, "pending": 0, "no_face": 0, "uncertain": 0
    }  # fmt: skip
    assert sorted(map(tuple, job.summary["reasons"])) == [
        ("failed", "corrupt", 1),
        ("skipped", "not_an_image", 1),
    ]
    # The summary is what a finished job's status reads: it must be the rows' own counts.
    from_summary = repository.job_counts(session=session, job_id=job_id)
    reasons = repository.outcome_reasons(session=session, job_id=job_id)
    session.execute(update(Job).where(Job.id == job_id).values(summary=None))
    assert repository.job_counts(session=session, job_id=job_id) == from_summary
    assert sorted(repository.outcome_reasons(session=session, job_id=job_id)) == sorted(reasons)
    session.execute(update(Job).where(Job.id == job_id).values(summary=job.summary))

    # failures --retry reopens it: the counts come from the rows again, then a new summary.
    repository.return_to_pending(session=session, job_id=job_id, image_ids=[ids[2]], chunk_index=1)
    repository.reopen_job(session=session, job_id=job_id)
    reopened = session.get(Job, job_id, populate_existing=True)
    assert reopened is not None and reopened.summary is None
    assert repository.job_counts(session=session, job_id=job_id).pending == 1
    repository.record_outcomes(
        session=session, job_id=job_id, results=[result(ids[2])], failures=[], chunk_index=1
    )
    assert repository.finish_job_if_complete(session=session, job_id=job_id)
    counts = repository.job_counts(session=session, job_id=job_id)
    assert (counts.labeled, counts.failed, counts.skipped, counts.pending) == (3, 0, 1, 0)
    assert repository.outcome_reasons(session=session, job_id=job_id) == [
        ("skipped", "not_an_image", 1)
    ]


def test_a_scanning_job_is_not_finished(session: Session) -> None:
    job_id = repository.create_job(session=session, source="/photos")
    assert not repository.finish_job_if_complete(session=session, job_id=job_id)
    with pytest.raises(NotFoundError):
        repository.job_counts(session=session, job_id=job_id + 10_000)
    with pytest.raises(NotFoundError):
        repository.set_job_status(session=session, job_id=job_id + 10_000, status=JobStatus.FAILED)


def test_two_workers_finishing_the_last_chunks_together_finish_the_job(engine: Engine) -> None:
    """Neither worker sees the other's uncommitted rows; the job row lock orders them."""
    make_session = make_sessionmaker(engine)
    with make_session() as setup, setup.begin():
        ids = list(images(setup, 2).values())
        job_id = queued_job(setup, ids, chunk_size=1)
    outcome: list[bool] = []

    def second_worker() -> None:
        with make_session() as worker, worker.begin():
            repository.record_outcomes(
                session=worker, job_id=job_id, results=[result(ids[1])], failures=[], chunk_index=1
            )
            outcome.append(repository.finish_job_if_complete(session=worker, job_id=job_id))

    with make_session() as first, first.begin():
        repository.record_outcomes(
            session=first, job_id=job_id, results=[result(ids[0])], failures=[], chunk_index=0
        )
        assert not repository.finish_job_if_complete(session=first, job_id=job_id)
        thread = threading.Thread(target=second_worker)
        thread.start()
        time.sleep(0.3)  # let the second worker reach the lock (PostgreSQL) or the write (SQLite)
    thread.join(timeout=30)
    assert outcome == [True]
    with make_session() as check, check.begin():
        job = check.get(Job, job_id)
        assert job is not None
        assert job.status is JobStatus.DONE
        # The ledger's rows first: `job_items` has no foreign keys to cascade (migration 0008).
        check.execute(delete(JobItem).where(JobItem.job_id == job_id))
        check.delete(job)
        check.execute(delete(Image).where(Image.id.in_(ids)))


# --- chunks -----------------------------------------------------------------------------------


def test_chunks_are_recorded_before_publishing_and_can_be_published_again(session: Session) -> None:
    ids = list(images(session, 3).values())
    job_id = queued_job(session, ids, chunk_size=2)
    chunks = [ChunkRow(0, 2, task_id="task-0"), ChunkRow(1, 1)]
    repository.record_chunks(session=session, job_id=job_id, chunks=chunks)
    assert [c.status for c in repository.unfinished_chunks(session=session, job_id=job_id)] == [
        ChunkStatus.PENDING
    ] * 2
    assert repository.mark_chunk_published(session=session, job_id=job_id, chunk_index=0)
    # The message was lost: publish it again, with a new task id.
    assert repository.mark_chunk_published(
        session=session, job_id=job_id, chunk_index=0, task_id="task-0b"
    )
    assert sorted(repository.pending_uris(session=session, job_id=job_id, chunk_index=0)) == sorted(
        session.scalars(select(Image.uri).where(Image.id.in_(ids[:2])))
    )
    repository.record_outcomes(
        session=session,
        job_id=job_id,
        results=[result(i) for i in ids[:2]],
        failures=[],
        chunk_index=0,
    )
    chunk = session.get(Chunk, (job_id, 0), populate_existing=True)
    assert chunk is not None
    assert (chunk.status, chunk.attempts, chunk.task_id) == (ChunkStatus.DONE, 2, "task-0b")
    assert not repository.mark_chunk_published(session=session, job_id=job_id, chunk_index=0)
    assert repository.pending_uris(session=session, job_id=job_id, chunk_index=0) == []
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    unfinished = repository.unfinished_chunks(
        session=session, job_id=job_id, published_before=later
    )
    assert [c.chunk_index for c in unfinished] == [1]


# --- skipping what is labeled -----------------------------------------------------------------


def test_labeled_fingerprints_name_the_version_each_model_labeled(session: Session) -> None:
    uris = [f"{unique()}.jpg" for _ in range(3)]
    rows = [ImageRow(uri=uri, fingerprint=f"{i}-1") for i, uri in enumerate(uris)]
    ids = repository.upsert_images(session=session, rows=rows)
    job_id = queued_job(session, [ids[uri] for uri in uris])
    repository.record_outcomes(
        session=session,
        job_id=job_id,
        results=[result(ids[uris[0]], "v1"), result(ids[uris[1]], "v2")],
        failures=[],
    )
    asked = [*uris, f"{unique()}.jpg"]
    assert repository.labeled_fingerprints(session=session, uris=asked, model_version="v1") == {
        uris[0]: "0-1"
    }
    assert repository.labeled_fingerprints(session=session, uris=asked, model_version="v2") == {
        uris[1]: "1-1"
    }

    # The file changes: the ledger still names the labeled version, so the producer relabels it.
    repository.upsert_images(session=session, rows=[ImageRow(uri=uris[0], fingerprint="0-2")])
    assert repository.labeled_fingerprints(session=session, uris=uris, model_version="v1") == {
        uris[0]: "0-1"
    }
    relabeled = result(ids[uris[0]], "v1", label="sad")
    assert (
        repository.record_outcomes(session=session, job_id=job_id, results=[relabeled], failures=[])
        == 1
    )
    assert repository.labeled_fingerprints(session=session, uris=uris, model_version="v1") == {
        uris[0]: "0-2"
    }
    count = session.scalar(select(func.count()).where(Result.image_id == ids[uris[0]]))
    assert count == 1
    # The same by image id, as a scan asks once it has its images' ids.
    for version, labeled in (("v1", {ids[uris[0]]: "0-2"}), ("v2", {ids[uris[1]]: "1-1"})):
        assert (
            repository.labeled_fingerprints_by_id(
                session=session, image_ids=[*ids.values(), 10**12], model_version=version
            )
            == labeled
        )


# --- export -----------------------------------------------------------------------------------


def test_results_and_failures_stream_for_export(session: Session) -> None:
    ids = list(images(session, 4).values())
    job_id = queued_job(session, ids)
    repository.record_outcomes(
        session=session,
        job_id=job_id,
        results=[result(ids[0]), result(ids[1], label="sad"), result(ids[1], "v2")],
        failures=[FailureRow(ids[2], "corrupt", "bad huffman table"), FailureRow(ids[3], "poison")],
    )
    exported = list(repository.iter_results(session=session, job_id=job_id, batch_size=2))
    assert [(row.image_id, row.model_version, row.label) for row in exported] == [
        (ids[0], "v1", "happy"),
        (ids[1], "v1", "sad"),
        (ids[1], "v2", "happy"),
    ]
    assert all(row.uri.startswith("file:///photos/") and row.created_at.tzinfo for row in exported)
    only_v2 = list(repository.iter_results(session=session, job_id=job_id, model_version="v2"))
    assert [row.image_id for row in only_v2] == [ids[1]]
    failed = list(repository.failed_items(session=session, job_id=job_id))
    assert [(item.image_id, item.reason, item.attempts) for item in failed] == [
        (ids[2], "corrupt", 1),
        (ids[3], "poison", 1),
    ]
    assert {item.image_id for item in repository.failed_items(session=session)} >= {ids[2], ids[3]}


# --- the model registry -----------------------------------------------------------------------


def test_at_most_one_model_is_active(session: Session) -> None:
    for version in ("2024-01", "2024-02"):
        repository.register_model(
            session=session,
            version=version,
            name="emotion",
            artifact_path=f"models/emotion/{version}/model.keras",
            class_names=["happy", "sad"],
            metrics={"accuracy": 0.9},
        )
    assert repository.active_model(session=session) is None
    repository.set_active_model(session=session, version="2024-01")
    promoted = repository.set_active_model(session=session, version="2024-02")
    assert promoted.promoted_at is not None
    active = repository.active_model(session=session)
    assert active is not None and active.version == "2024-02"
    statuses = {
        m.version: m.status for m in repository.list_models(session=session, name="emotion")
    }
    assert statuses == {"2024-01": ModelStatus.RETIRED, "2024-02": ModelStatus.ACTIVE}
    # The database refuses a second active model even when the repository is bypassed.
    with pytest.raises(IntegrityError), session.begin_nested():
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.version == "2024-01")
            .values(status=ModelStatus.ACTIVE)
        )
    with pytest.raises(ValueError, match="set_active_model"):
        repository.set_model_status(session=session, version="2024-01", status=ModelStatus.ACTIVE)
    with pytest.raises(NotFoundError):
        repository.set_active_model(session=session, version="nope")


def test_registering_a_version_again_is_idempotent_but_not_with_other_classes(
    session: Session,
) -> None:
    def register(classes: list[str], version: str = "v9", **metrics: float) -> ModelVersion:
        return repository.register_model(
            session=session,
            version=version,
            name="emotion",
            artifact_path="models/emotion/v9/model.keras",
            class_names=classes,
            metrics=metrics,
        )

    first = register(["happy", "sad"])
    again = register(["happy", "sad"])
    assert again is first and again.status is ModelStatus.CANDIDATE
    with pytest.raises(ValueError, match="already registered"):
        register(["sad", "happy"])
    rejected = repository.set_model_status(
        session=session, version="v9", status=ModelStatus.REJECTED
    )
    assert rejected.status is ModelStatus.REJECTED
    with pytest.raises(ValueError, match="JSON"):
        register(["a"], version="v10", auc=float("nan"))


def test_a_retrain_run_is_recorded(session: Session) -> None:
    started = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    run_id = repository.record_retrain_run(
        session=session,
        started_at=started,
        decision=RetrainDecision.REJECTED,
        reason="challenger accuracy 0.81 < champion 0.84",
        challenger_version="v2",
        champion_version="v1",
        data_fingerprint="sha256:abc",
        metrics={"challenger": {"accuracy": 0.81}, "champion": {"accuracy": 0.84}},
    )
    session.expunge_all()
    run = session.get(RetrainRun, run_id)
    assert run is not None
    assert (run.decision, run.started_at, run.metrics["champion"]["accuracy"]) == (
        RetrainDecision.REJECTED,
        started,
        0.84,
    )


def _one_ledger_row(engine: Engine, *, job_status: str, state: str, reason: str) -> None:
    """A job, an image and its ledger row, written in SQL as an older schema holds them."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO jobs (source, options, status, enqueued, next_chunk_index)"
                " VALUES ('/photos', '{}', :status, 1, 1)"
            ),
            {"status": job_status},
        )
        connection.execute(
            text("INSERT INTO images (uri, fingerprint) VALUES ('file:///photos/a.jpg', '1-1')")
        )
        connection.execute(
            text(
                "INSERT INTO job_items (job_id, image_id, state, reason, attempts)"
                " SELECT jobs.id, images.id, :state, :reason, 0 FROM jobs, images"
            ),
            {"state": state, "reason": reason},
        )


def test_migration_0006_upgrades_a_ledger_with_data_and_downgrades(
    backend: str, new_database: NewDatabase
) -> None:
    url = new_database(backend)
    upgrade(url, "0005")
    engine = make_engine(url)
    try:
        _one_ledger_row(engine, job_status="queued", state="skipped", reason="not_an_image")
        upgrade(url)
        check_schema(url)
        with Session(engine) as session:
            job_id = session.scalars(select(Job.id)).one()
            assert repository.unread_counts(session=session, job_id=job_id) == {}
            counts = repository.job_counts(session=session, job_id=job_id)
            assert counts.balanced and counts.skipped == 1
        downgrade(engine, "0005")
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT count(*) FROM job_items")) == 1
            assert "listings" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def _upgrade_and_downgrade_a_failed_ledger_row(
    url: str,
    *,
    before: str,
    shape: Callable[[Engine], list[str]],
    old: list[str],
    new: list[str],
) -> None:
    """From revision `before` with one failed ledger row, up to the head and back: `shape` (what
    the migration changes) reads `old` before and after, `new` at the head, where the row is
    still found as failed; the row survives the downgrade."""
    upgrade(url, before)
    engine = make_engine(url)
    try:
        _one_ledger_row(engine, job_status="done", state="failed", reason="corrupt")
        assert shape(engine) == old
        upgrade(url)
        check_schema(url)
        assert shape(engine) == new
        with Session(engine) as session:
            image_id = session.scalars(select(Image.id)).one()
            found = repository.failed_and_unchanged(
                session=session, image_ids=[image_id], reasons=["corrupt"]
            )
            assert found == {image_id: "corrupt"}
        downgrade(engine, before)
        assert shape(engine) == old
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT count(*) FROM job_items")) == 1
    finally:
        engine.dispose()


def test_migration_0007_indexes_a_ledger_with_data_by_image_and_downgrades(
    backend: str, new_database: NewDatabase
) -> None:
    def image_indexes(engine: Engine) -> list[str]:
        return [
            index["name"] or ""
            for index in inspect(engine).get_indexes("job_items")
            if index["column_names"] == ["image_id"]
        ]

    _upgrade_and_downgrade_a_failed_ledger_row(
        new_database(backend),
        before="0006",
        shape=image_indexes,
        old=[],
        new=["ix_job_items_image_id"],
    )


def test_migration_0008_drops_the_ledgers_foreign_keys_keeping_its_rows_and_downgrades(
    backend: str, new_database: NewDatabase
) -> None:
    def referenced(engine: Engine) -> list[str]:
        return sorted(
            key["referred_table"] for key in inspect(engine).get_foreign_keys("job_items")
        )

    _upgrade_and_downgrade_a_failed_ledger_row(
        new_database(backend), before="0007", shape=referenced, old=["images", "jobs"], new=[]
    )


def test_listings_keep_the_latest_reading_of_each_run(session: Session) -> None:
    settled = repository.ListingRow("k1", "d1", "v1", 3, {"already_labeled": 2, "empty": 1})
    other = repository.ListingRow("k2", "d2", "v1", 1, {"already_labeled": 1})
    repository.record_listings(session=session, settled=[settled, other], unsettled=[])
    keys = ["k1", "k2", "k3"]
    found = repository.settled_listings(session=session, keys=keys, model_version="v1")
    assert found == {"k1": settled, "k2": other}
    assert repository.settled_listings(session=session, keys=["k1"], model_version="v2") == {}
    # Read again: k1 unsettled now (a file pending), k2 settled by another model.
    by_v2 = repository.ListingRow("k2", "d3", "v2", 1, {"already_labeled": 1})
    repository.record_listings(session=session, settled=[by_v2], unsettled=["k1"])
    assert repository.settled_listings(session=session, keys=["k1", "k2"], model_version="v1") == {}
    assert repository.settled_listings(session=session, keys=["k2"], model_version="v2") == {
        "k2": by_v2
    }
    with pytest.raises(ValueError, match="3 files"):
        repository.ListingRow("k4", "d4", "v1", 3, {"already_labeled": 2})
