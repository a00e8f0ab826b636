"""Issue 14: chunk numbers come from the database and the ledger decides a chunk's images.

The interleavings that lost images are made deterministic: a worker's split and
`failures --retry` run inside the scan's own publish callback, that is, while the real
`run_scan` is between two batches of the same job. Then every message that went out is
checked against the ledger as a worker checks it (`begin_delivery`), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.reasons import Reason
from db import repository
from db.delivery import MessageRefused, begin_delivery, record_crash, record_refusal, split_chunk
from db.models import Chunk, ChunkStatus, ItemState, Job, JobItem, JobStatus, RefusedMessage
from db.repository import FailureRow, pending_images
from db.requeue import requeue_failed
from producer.enqueue import run_scan
from tests.support.listed import Broker, ListSource, entries
from worker.chunks import MAX_URIS_PER_MESSAGE, check_message


@pytest.fixture
def sessions(ledger_sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    return ledger_sessions


def deliver_everything(sessions: sessionmaker[Session], broker: Broker, job_id: int) -> None:
    """Every message as a worker gets it: checked against the ledger; pending images failed
    (a stand-in outcome: which one does not matter here, only that each image gets one)."""
    for message_job, chunk_index, uris in broker.sent:
        with sessions.begin() as session:
            delivery = begin_delivery(
                session=session, job_id=message_job, chunk_index=chunk_index, uris=uris
            )
            if delivery.status is ChunkStatus.DONE:
                continue
            repository.record_outcomes(
                session=session,
                job_id=job_id,
                results=[],
                failures=[FailureRow(image.id, "corrupt") for image in delivery.pending],
                chunk_index=chunk_index,
            )
            repository.finish_job_if_complete(session=session, job_id=job_id)


def split_first_chunk(sessions: sessionmaker[Session], broker: Broker) -> object:
    """What a worker does when a process died holding chunk 0: split it and publish halves."""

    def split(job_id: int) -> None:
        with sessions.begin() as session:
            pending = pending_images(session=session, job_id=job_id, chunk_index=0)
            halves = [pending[: len(pending) // 2], pending[len(pending) // 2 :]]
            indices = split_chunk(
                session=session,
                job_id=job_id,
                chunk_index=0,
                parts=[[image.id for image in half] for half in halves],
            )
        for index, half in zip(indices, halves, strict=True):
            broker(job_id, index, [image.uri for image in half])

    return split


@pytest.mark.parametrize("overlap_publish", ["never", "always"])
def test_a_split_while_the_scan_runs_takes_numbers_the_scan_never_reuses(
    sessions: sessionmaker[Session], overlap_publish: str
) -> None:
    prefix = uuid.uuid4().hex
    broker = Broker()
    # The split happens right after the scan published its first chunk.
    broker.during[1] = split_first_chunk(sessions, broker)
    summary = run_scan(
        ListSource(prefix, entries(prefix, 12)),
        sessions=sessions,
        publish=broker,
        chunk_size=4,
        batch_files=4,  # a chunk a transaction: the split comes between two of the scan's
        model_version=None,
        overlap_publish=overlap_publish,
    )
    indices = [chunk_index for _, chunk_index, _ in broker.sent]
    if overlap_publish == "never":
        # Chunk 0, its halves (1, 2), then the scan's next chunks continue after them.
        assert indices == [0, 1, 2, 3, 4]
    else:
        # Publishing a batch behind, the scan may record its second chunk before the split
        # (which then takes 2 and 3) or after it: either way no number is used twice.
        assert sorted(indices) == [0, 1, 2, 3, 4]
    deliver_everything(sessions, broker, summary.job_id)
    with sessions() as session:
        counts = repository.job_counts(session=session, job_id=summary.job_id)
        chunk_states = set(
            session.scalars(select(Chunk.status).where(Chunk.job_id == summary.job_id))
        )
    assert (counts.enqueued, counts.failed, counts.pending) == (12, 12, 0)
    assert chunk_states == {ChunkStatus.DONE}


def test_failures_retry_while_a_scan_of_the_job_runs_loses_nothing(
    sessions: sessionmaker[Session],
) -> None:
    prefix = uuid.uuid4().hex
    broker = Broker()

    def deliver_and_retry(job_id: int) -> None:
        # The first chunk comes back failed, and an operator retries the job's failures at once.
        deliver_everything(sessions, broker, job_id)
        requeue_failed(job_id, sessions=sessions, publish=broker, chunk_size=3)

    broker.during[2] = deliver_and_retry
    summary = run_scan(
        ListSource(prefix, entries(prefix, 20)),
        sessions=sessions,
        publish=broker,
        chunk_size=4,
        model_version=None,
    )
    indices = [chunk_index for _, chunk_index, _ in broker.sent]
    assert len(indices) == len(set(indices)), indices
    # Deliver what is left (the retry's chunks and the scan's later ones); then retry once more
    # and deliver: every image ends failed, nothing pending, every chunk done.
    deliver_everything(sessions, broker, summary.job_id)
    with sessions() as session:
        counts = repository.job_counts(session=session, job_id=summary.job_id)
        open_chunks = session.scalar(
            select(func.count())
            .select_from(Chunk)
            .where(Chunk.job_id == summary.job_id, Chunk.status != ChunkStatus.DONE)
        )
    assert (counts.enqueued, counts.pending, counts.failed) == (20, 0, 20)
    assert open_chunks == 0


def test_failures_retry_while_a_scan_runs_does_not_end_the_job_before_its_scan(
    sessions: sessionmaker[Session],
) -> None:
    prefix = uuid.uuid4().hex
    broker = Broker()
    mid_scan: list[JobStatus] = []

    def retry_and_deliver(job_id: int) -> None:
        # Everything recorded so far fails, is retried and fails again: for a moment nothing
        # of the job is pending, yet its scan has more to record.
        deliver_everything(sessions, broker, job_id)
        requeue_failed(job_id, sessions=sessions, publish=broker, chunk_size=3)
        deliver_everything(sessions, broker, job_id)
        with sessions() as session:
            mid_scan.append(session.scalars(select(Job.status).where(Job.id == job_id)).one())

    broker.during[2] = retry_and_deliver
    summary = run_scan(
        ListSource(prefix, entries(prefix, 20)),
        sessions=sessions,
        publish=broker,
        chunk_size=4,
        model_version=None,
    )
    # Once queued by the retry, the job was done here, and its scan's later chunks came after.
    assert mid_scan == [JobStatus.SCANNING]
    deliver_everything(sessions, broker, summary.job_id)
    with sessions() as session:
        counts = repository.job_counts(session=session, job_id=summary.job_id)
        status = session.scalars(select(Job.status).where(Job.id == summary.job_id)).one()
    assert (counts.enqueued, counts.pending, counts.failed) == (20, 0, 20)
    assert status is JobStatus.DONE


def test_a_uri_listed_twice_stays_in_its_first_chunk_and_every_message_matches_the_ledger(
    sessions: sessionmaker[Session],
) -> None:
    prefix = uuid.uuid4().hex
    broker = Broker()
    summary = run_scan(
        ListSource(prefix, entries(prefix, 9, repeat=1)),
        sessions=sessions,
        publish=broker,
        chunk_size=4,
        model_version=None,
    )
    sent_uris = [uri for _, _, uris in broker.sent for uri in uris]
    assert len(sent_uris) == len(set(sent_uris)) == 9
    deliver_everything(sessions, broker, summary.job_id)  # would raise MessageRefused
    with sessions() as session:
        counts = repository.job_counts(session=session, job_id=summary.job_id)
    assert (counts.enqueued, counts.pending, counts.failed) == (9, 0, 9)


def test_messages_the_ledger_disagrees_with_are_refused_and_change_nothing(
    sessions: sessionmaker[Session],
) -> None:
    broker = Broker()
    jobs = []
    for _ in range(2):
        prefix = uuid.uuid4().hex
        jobs.append(
            run_scan(
                ListSource(prefix, entries(prefix, 8)),
                sessions=sessions,
                publish=broker,
                chunk_size=4,
                model_version=None,
            ).job_id
        )
    first, second = jobs
    (chunk0,) = [uris for job, index, uris in broker.sent if (job, index) == (first, 0)]
    (other,) = [uris for job, index, uris in broker.sent if (job, index) == (second, 0)]
    forged = {
        Reason.UNKNOWN_JOB: (10**9, 0, chunk0),
        Reason.UNKNOWN_CHUNK: (first, 99, chunk0),
        # Another job's chunk under this job's number, and a number reused with other images.
        Reason.NOT_THE_CHUNKS_IMAGES: (first, 0, other),
    }
    for reason, (job_id, chunk_index, uris) in forged.items():
        with pytest.raises(MessageRefused) as refused, sessions.begin() as session:
            begin_delivery(session=session, job_id=job_id, chunk_index=chunk_index, uris=uris)
        assert refused.value.reason is reason
    for uris in (chunk0[:-1], [*chunk0, "file:///etc/passwd"]):
        with pytest.raises(MessageRefused, match="does not hold"), sessions.begin() as session:
            begin_delivery(session=session, job_id=first, chunk_index=0, uris=uris)
    with sessions.begin() as session:
        record_refusal(
            session=session,
            reason=Reason.UNKNOWN_CHUNK,
            message="x" * 10_000,
            job_id=first,
            chunk_index=99,
            task_id="t",
        )
    with sessions() as session:
        chunk = session.get(Chunk, (first, 0))
        assert chunk is not None
        assert (chunk.deliveries, chunk.status) == (0, ChunkStatus.PUBLISHED)
        stored = session.scalars(select(RefusedMessage)).all()
        assert [len(row.message or "") for row in stored if row.job_id == first] == [2000]
        assert (
            session.scalar(
                select(func.count()).select_from(JobItem).where(JobItem.state != ItemState.PENDING)
            )
            == 0
        )
    # The genuine message is still taken, in any order of its URIs.
    with sessions.begin() as session:
        delivery = begin_delivery(
            session=session, job_id=first, chunk_index=0, uris=list(reversed(chunk0))
        )
    assert sorted(image.uri for image in delivery.pending) == sorted(chunk0)
    assert (delivery.deliveries, delivery.crashes) == (1, 0)
    with sessions.begin() as session:
        assert record_crash(session=session, job_id=first, chunk_index=0)
        assert not record_crash(session=session, job_id=first, chunk_index=99)
    with sessions.begin() as session:
        again = begin_delivery(session=session, job_id=first, chunk_index=0, uris=chunk0)
    assert (again.deliveries, again.crashes) == (2, 1)


@pytest.mark.parametrize(
    ("job_id", "chunk_index", "uris", "complaint"),
    [
        ("1", 0, ["file:///a.jpg"], "job_id"),
        (True, 0, ["file:///a.jpg"], "job_id"),
        (1, -1, ["file:///a.jpg"], "chunk_index"),
        (1, 0.5, ["file:///a.jpg"], "chunk_index"),
        (1, 0, "file:///a.jpg", "non-empty list"),
        (1, 0, [], "non-empty list"),
        (1, 0, ["file:///a.jpg"] * (MAX_URIS_PER_MESSAGE + 1), "more than"),
        (1, 0, [42], "string"),
        (1, 0, ["file:///" + "a" * 9000], "string"),
        (1, 0, None, "non-empty list"),
    ],
)
def test_malformed_messages_are_refused_before_the_database(
    job_id: object, chunk_index: object, uris: object, complaint: str
) -> None:
    with pytest.raises(MessageRefused, match=complaint) as refused:
        check_message(job_id, chunk_index, uris)
    assert refused.value.reason is Reason.MALFORMED


def test_a_well_formed_message_passes() -> None:
    assert check_message(3, 0, ["file:///a.jpg"]) == ["file:///a.jpg"]
