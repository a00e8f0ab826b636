"""Scan a source into a job: every file is accounted for, new images go out in full chunks.

    run_scan(source, sessions=..., publish=..., chunk_size=256, model_version="v3")
      create the job (scanning), commit
      for each batch of runs (`core.storage.entries.Run`: files listed in one folder, not read
      yet) adding up to `batch_files` files (at least a chunk; the listing is never held whole):
        a run the ledger knows settled by model_version under the same listing digest
          (`listings`; a plain scan only)      -> counted into `jobs.unread` by its reasons,
                                                  neither read nor itemized
        the other runs are read (first bytes sniffed); upsert their images (an image new to
          the ledger is looked up no further); decide each entry:
          unusable                    -> skipped, with the source's reason
          labeled by model_version,
            same fingerprint          -> skipped `already_labeled` (unless force or
                                         --where uncertain)
          failed for its content and
            unchanged since           -> skipped `already_failed` (unless force or --where)
          not matching every --where  -> skipped `not_selected`
          else                        -> pending, into the next chunk
        record the ledger rows, each full chunk (`chunk_size` images, or fewer that add up to
        `chunk_bytes`) (status pending), what was learned of the runs read (settled or not) and
        the unread count, COMMIT, then publish each chunk and mark them all published, COMMIT
      the last partial chunk; the job becomes queued (done at once when nothing was enqueued)

The listing and reading of a local folder runs in a second process by default
(`producer.read_ahead`, `ScanSettings.reader`), a batch or two ahead of this one, which records
and publishes the batches in the order walked; S3 prefixes and other sources are read here.

A chunk is committed before its message is sent, so a message the broker lost or never took can
be sent again from the ledger (`db.outbox.republish_unpublished`, the reconciler). Recording then
publishing follows `db.outbox.record_and_publish`, the one outbox loop; on PostgreSQL the
publishing half (`publish_recorded`) runs in a thread of the scan's, a batch behind the records
(`ScanSettings.overlap_publish`), so that the broker's round trips and the marks' commit overlap
the next batch's writes. Pending images wait
for a full chunk before they enter the ledger, so every committed pending row belongs to a
recorded chunk.

When the broker refuses a message the scan stops with `ScanInterrupted`: what was scanned is in
the ledger (chunks not sent stay `pending`), the job is queued with an error saying the scan
stopped early, and the message says how to go on. Any other failure (the source, an interrupt)
leaves the job the same way, as far as the database allows, and is raised as it is.

    EmolabelError
    ├── PublishError       the broker did not take a message
    └── ScanInterrupted    a scan stopped on a PublishError; names the job and how to resume
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ConfigError, EmolabelError
from core.publishing import Publisher, PublishError
from core.reasons import FINAL_FAILURES, Reason
from core.settings import ScanSettings
from core.storage.entries import Entry, Run, Source
from core.storage.folder_source import FolderSource
from core.uris import display_name
from db import repository
from db.models import NAME_LENGTH, ItemState
from db.outbox import OutgoingChunk, publish_recorded
from db.repository import ChunkRow, ImageRow, JobItemRow
from db.session import database_url, refresh_planner_statistics
from producer.batches import (
    Batch,
    ReadRun,
    entry_runs,
    read_batch,
    run_batches,
    settled_lookup,
)
from producer.chunking import cut_chunks
from producer.pipeline import Writer, young_objects_only
from producer.read_ahead import ReadAhead, ReadAheadSpec

logger = logging.getLogger(__name__)


SETTLED_REASONS = frozenset(
    {Reason.ALREADY_LABELED, Reason.NOT_AN_IMAGE, Reason.EMPTY, Reason.TOO_LARGE}
)
"""A file is settled for a model when that model labeled it as it is, or when what it is (no
image, empty, over the size limit) cannot change while its size and time stay the same. No other
skip settles a file: a failure may be retried, a link's target may change."""


class ScanInterrupted(EmolabelError):
    """A scan stopped because a chunk could not be published; nothing recorded is lost."""

    def __init__(self, message: str, *, job_id: int, unpublished_chunks: int) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.unpublished_chunks = unpublished_chunks


# --- --where ----------------------------------------------------------------------------------


class SelectionKind(StrEnum):
    """What a `--where` selection tests, always on an image's latest label or outcome."""

    MODEL_OTHER_THAN = "model_other_than"
    CONFIDENCE_BELOW = "confidence_below"
    FAILED = "failed"
    UNCERTAIN = "uncertain"


WHERE_FORMS = (
    "older-model (the latest label is by another model than the scan's)",
    "model!=VERSION (the latest label is by another model than VERSION)",
    "confidence<NUMBER (the latest label's confidence is below NUMBER, 0 to 1)",
    "failed (the latest worker outcome was a failure)",
    "uncertain (the latest label is below its class's calibrated threshold)",
)

_MODEL_PATTERN = re.compile(r"model\s*!=\s*(?P<version>\S+)", re.IGNORECASE)
_CONFIDENCE_PATTERN = re.compile(r"confidence\s*<\s*(?P<threshold>\S+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Selection:
    """One `--where` condition; a scan enqueues only images that match all of its selections.

    `version` is None for `older-model`: the scan's own model version is meant.
    """

    kind: SelectionKind
    version: str | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.kind is SelectionKind.CONFIDENCE_BELOW and self.threshold is None:
            raise ValueError("a confidence selection needs a threshold")

    def __str__(self) -> str:
        if self.kind is SelectionKind.MODEL_OTHER_THAN:
            return "older-model" if self.version is None else f"model!={self.version}"
        if self.kind is SelectionKind.CONFIDENCE_BELOW:
            return f"confidence<{self.threshold}"
        return self.kind.value


def parse_where(text: str) -> Selection:
    """Parse one `--where` condition; `ConfigError` lists the accepted forms."""
    clause = " ".join(text.split())
    lowered = clause.lower()
    if re.search(r"\s(and|or)\s|&&|\|\|", lowered):
        raise ConfigError(
            f"--where {text!r}: one condition per --where; repeat --where to require several"
        )
    if lowered in {"older-model", "older_model"}:
        return Selection(SelectionKind.MODEL_OTHER_THAN)
    if lowered == "failed":
        return Selection(SelectionKind.FAILED)
    if lowered == "uncertain":
        return Selection(SelectionKind.UNCERTAIN)
    if match := _MODEL_PATTERN.fullmatch(clause):
        version = match["version"]
        if len(version) > 128:
            raise ConfigError(f"--where {text!r}: a model version has at most 128 characters")
        return Selection(SelectionKind.MODEL_OTHER_THAN, version=version)
    if match := _CONFIDENCE_PATTERN.fullmatch(clause):
        return Selection(SelectionKind.CONFIDENCE_BELOW, threshold=_threshold(text, match))
    raise ConfigError(f"--where {text!r} is not understood; use one of: {'; '.join(WHERE_FORMS)}")


def _threshold(text: str, match: re.Match[str]) -> float:
    try:
        threshold = float(match["threshold"])
    except ValueError:
        threshold = math.nan
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise ConfigError(f"--where {text!r}: the confidence must be a number from 0 to 1")
    return threshold


def _select(
    session: Session,
    image_ids: set[int],
    where: Sequence[Selection],
    *,
    model_version: str | None,
    job_id: int,
) -> set[int]:
    """The ids among `image_ids` that match every selection."""
    for selection in where:
        if not image_ids:
            break
        if selection.kind is SelectionKind.MODEL_OTHER_THAN:
            image_ids = repository.latest_label_not_by(
                session=session,
                image_ids=image_ids,
                version=_other_than(selection, model_version),
            )
        elif selection.kind is SelectionKind.CONFIDENCE_BELOW and selection.threshold is not None:
            image_ids = repository.latest_confidence_below(
                session=session, image_ids=image_ids, threshold=selection.threshold
            )
        elif selection.kind is SelectionKind.FAILED:
            image_ids = repository.latest_outcome_failed(
                session=session, image_ids=image_ids, exclude_job_id=job_id
            )
        elif selection.kind is SelectionKind.UNCERTAIN:
            image_ids = repository.latest_uncertain(session=session, image_ids=image_ids)
    return image_ids


def _other_than(selection: Selection, model_version: str | None) -> str:
    """The version `model!=` compares with; `older-model` means the scan's own."""
    version = selection.version or model_version
    if version is None:
        raise ConfigError("--where older-model needs a model version: promote a model first")
    return version


# --- scanning ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScanProgress:
    """How far a scan is, reported after every batch; chunks and enqueued count what was sent."""

    seen: int
    images: int
    skipped: int
    enqueued: int
    chunks: int


@dataclass(frozen=True, slots=True)
class ScanSummary:
    """What a finished scan did: files seen, images sent in `chunks` messages, skips by reason."""

    job_id: int
    seen: int
    enqueued_images: int
    skipped_by_reason: dict[str, int]
    chunks: int
    seconds: float


@dataclass(frozen=True, slots=True)
class _Pending:
    image_id: int
    uri: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class _Staged:
    """What a record transaction wrote, for the scan's state once it has committed."""

    entries: list[Entry]
    items: list[JobItemRow]
    chunks: list[OutgoingChunk]
    inserted: int
    waiting: list[_Pending]
    unread: Counter[str]  # the scan's whole count of files from settled runs, this batch's in


class _Scan:
    """The state of one scan: counters and the pending images that do not fill a chunk yet."""

    def __init__(
        self,
        job_id: int,
        *,
        sessions: sessionmaker[Session],
        publish: Publisher,
        chunk_size: int,
        chunk_bytes: int,
        model_version: str | None,
        force: bool,
        where: Sequence[Selection],
        trust_runs: bool,
        publish_behind: bool,
    ) -> None:
        self.job_id = job_id
        self.sessions = sessions
        self.publish = publish
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self.model_version = model_version
        self.force = force
        self.where = where
        self.producer = f"{socket.gethostname()}:{os.getpid()}"[:NAME_LENGTH]
        self.waiting: list[_Pending] = []  # fewer than chunk_size between batches
        self.unsent: list[OutgoingChunk] = []  # recorded, not yet published
        self.staged: _Staged | None = None  # written by the open record transaction
        self.seen = 0
        self.images = 0
        self.items = 0
        self.enqueued = 0
        self.chunks = 0
        self.skipped: Counter[str] = Counter()
        self.unread: Counter[str] = Counter()  # files counted from settled runs, by reason
        self.listed_all = False
        # Whether settled runs are counted unread and learned (`_trusts_runs`).
        self.trust_runs = trust_runs
        # Publishes each recorded batch's chunks and marks them, in order: in a thread of its
        # own, a batch behind the records (`ScanSettings.overlap_publish`), or at once.
        self.publisher: Writer[list[OutgoingChunk]] = Writer(
            self._publish, threaded=publish_behind, name="scan-publisher"
        )

    def read_runs(self, runs: list[Run]) -> Batch:
        """Count the runs the ledger knows settled (same key, digest and model) without reading
        them and read the others: what `add_batch` puts in the ledger."""
        settled = None
        if self.trust_runs:
            assert self.model_version is not None
            settled = settled_lookup(self.sessions, self.model_version)
        return read_batch(runs, settled=settled)

    def add_batch(self, batch: Batch) -> None:
        """Put a batch of entries in the ledger and record every chunk it fills (one commit),
        then publish those chunks in order, marking each published once the broker has it.

        The batch says which runs its entries came from (the ledger learns which of them are
        now settled) and counts the files of runs not read, by reason, in the same commit.
        """
        # Once the broker has refused a chunk the scan stops: no batch is recorded after that.
        self.publisher.check()
        entries, read, unread = batch.entries, batch.read, batch.unread
        unread_total = self.unread + unread

        def record(session: Session) -> list[OutgoingChunk]:
            images = repository.record_images(
                session=session, rows=[_image_row(e) for e in entries]
            )
            items, pending, reasons = self._decide(session, entries, images)
            closed, still_open = cut_chunks(
                self.waiting + pending,
                size=self.chunk_size,
                max_bytes=self.chunk_bytes,
                weight=lambda member: member.size_bytes,
            )
            chunks, inserted = self._record(session, items, closed, new_images=images.new)
            if self.trust_runs:
                self._learn_runs(session, read, reasons)
            if unread:
                repository.count_unread(session=session, job_id=self.job_id, unread=unread_total)
            self.staged = _Staged(
                entries, items, chunks, inserted, waiting=still_open, unread=unread_total
            )
            return chunks

        self._record_and_publish(record)

    def add_remainder(self, *, publish: bool = True) -> None:
        """Record the pending images that do not fill a whole chunk as the last chunk, and
        publish it unless `publish` is False (a scan stopping early only records it)."""
        if not self.waiting:
            return

        def record(session: Session) -> list[OutgoingChunk]:
            items: list[JobItemRow] = []
            chunks, inserted = self._record(session, items, [self.waiting])
            self.staged = _Staged([], items, chunks, inserted, waiting=[], unread=self.unread)
            return chunks

        if publish:
            self._record_and_publish(record)
            return
        with self.sessions() as session, session.begin():
            record(session)
        self._committed()

    def _record_and_publish(self, record: Callable[[Session], list[OutgoingChunk]]) -> None:
        """The outbox's order (`db.outbox.record_and_publish`): record and commit here, then
        publish and mark through `publisher` (a PublishError of its comes up at a later call
        or at `publisher.close`)."""
        with self.sessions.begin() as session:
            chunks = record(session)
        self._committed()
        if chunks:
            self.publisher.put(chunks)

    def _publish(self, chunks: list[OutgoingChunk]) -> None:
        publish_recorded(
            sessions=self.sessions,
            publish=self.publish,
            job_id=self.job_id,
            chunks=chunks,
            published=self._published,
        )

    def _published(self, chunk: OutgoingChunk) -> None:
        """Count a chunk the broker took (its mark committed); in the publishing thread, if any
        (list and counter updates are atomic under the GIL)."""
        self.unsent.pop(0)  # published in the order recorded
        self.chunks += 1
        self.enqueued += len(chunk.uris)

    @property
    def ledger_size(self) -> int:
        """The files the job accounts for: its ledger rows and the files counted unread."""
        return self.items + sum(self.unread.values())

    def progress(self) -> ScanProgress:
        return ScanProgress(
            seen=self.seen,
            images=self.images,
            skipped=sum(self.skipped.values()),
            enqueued=self.enqueued,
            chunks=self.chunks,
        )

    def _decide(
        self, session: Session, entries: list[Entry], images: repository.RecordedImages
    ) -> tuple[list[JobItemRow], list[_Pending], list[str | None]]:
        """The ledger rows of the skipped entries, the pending ones, and each entry's skip
        reason in the batch's order (None: pending).

        An image new to the ledger has no label and no failure: only the others are looked up
        (on a first scan, none)."""
        ids = images.ids
        usable = [entry for entry in entries if entry.usable]
        known = [entry for entry in usable if ids[entry.uri] not in images.new]
        labeled: dict[str, str] = {}
        # `--where uncertain` asks for labels a person doubts: it sends them again even to the
        # model that gave them (recalibrated thresholds or a review may have changed the picture).
        relabel = any(selection.kind is SelectionKind.UNCERTAIN for selection in self.where)
        if self.model_version is not None and not self.force and not relabel and known:
            by_id = repository.labeled_fingerprints_by_id(
                session=session,
                image_ids=[ids[entry.uri] for entry in known],
                model_version=self.model_version,
            )
            labeled = {
                entry.uri: by_id[ids[entry.uri]] for entry in known if ids[entry.uri] in by_id
            }
        candidates = [entry for entry in usable if labeled.get(entry.uri) != entry.fingerprint]
        failed: dict[int, str] = {}
        looked_up = [
            ids[entry.uri] for entry in known if labeled.get(entry.uri) != entry.fingerprint
        ]
        if not self.force and not self.where and looked_up:
            failed = repository.failed_and_unchanged(
                session=session,
                image_ids=looked_up,
                reasons=FINAL_FAILURES,
                exclude_job_id=self.job_id,
            )
        selected = {ids[entry.uri] for entry in candidates} - failed.keys()
        if self.where:
            selected = _select(
                session,
                selected,
                self.where,
                model_version=self.model_version,
                job_id=self.job_id,
            )
        items: list[JobItemRow] = []
        pending: list[_Pending] = []
        reasons: list[str | None] = []
        for entry in entries:
            image_id = ids[entry.uri]
            if entry.skip_reason is not None:
                items.append(_skipped(image_id, entry.skip_reason, entry.skip_message))
            elif labeled.get(entry.uri) == entry.fingerprint:
                items.append(_skipped(image_id, Reason.ALREADY_LABELED))
            elif image_id in failed:
                message = f"failed as {failed[image_id]} and unchanged since"
                items.append(_skipped(image_id, Reason.ALREADY_FAILED, message))
            elif image_id not in selected:
                items.append(_skipped(image_id, Reason.NOT_SELECTED))
            else:
                pending.append(_Pending(image_id, entry.uri, entry.size_bytes))
                reasons.append(None)
                continue
            reasons.append(items[-1].reason)
        return items, pending, reasons

    def _learn_runs(
        self, session: Session, read: Sequence[ReadRun], reasons: list[str | None]
    ) -> None:
        """Store the runs just read whose every file is settled for the scan's model; forget
        the stored reading of the others (see `db.repository.listings`)."""
        assert self.model_version is not None
        settled: list[repository.ListingRow] = []
        unsettled: list[str] = []
        for run in read:
            if not run.key or not run.plain:
                continue
            outcome = reasons[run.start : run.stop]
            if len(outcome) == run.files and all(r in SETTLED_REASONS for r in outcome):
                counts = Counter(str(r) for r in outcome)
                settled.append(
                    repository.ListingRow(
                        run.key, run.digest, self.model_version, run.files, dict(counts)
                    )
                )
            else:
                unsettled.append(run.key)
        repository.record_listings(session=session, settled=settled, unsettled=unsettled)

    def _record(
        self,
        session: Session,
        items: list[JobItemRow],
        groups: list[list[_Pending]],
        *,
        new_images: frozenset[int] = frozenset(),
    ) -> tuple[list[OutgoingChunk], int]:
        """Number `groups` as the job's next chunks, add their rows to `items`, record it all.

        The numbers come from the job row (`allocate_chunk_indices`), never from a counter of
        ours: workers splitting chunks and `failures --retry` take numbers from the same job
        while this scan runs. The call also stamps the scan's heartbeat. An image already in
        the ledger (a URI listed twice) stays in its first chunk and leaves this one, so a
        chunk's message names exactly the images its ledger rows hold.

        Returns the chunks and how many ledger rows were new.
        """
        first = repository.allocate_chunk_indices(
            session=session, job_id=self.job_id, count=len(groups), producer=self.producer
        )
        for offset, members in enumerate(groups):
            items.extend(JobItemRow(m.image_id, chunk_index=first + offset) for m in members)
        inserted = repository.add_job_items(
            session=session, job_id=self.job_id, items=items, new_images=new_images
        )
        # The row that went in for an image is the first one given for it.
        chunk_of: dict[int, int | None] = {}
        for item in items:
            chunk_of.setdefault(item.image_id, item.chunk_index)
        chunks: list[OutgoingChunk] = []
        for offset, members in enumerate(groups):
            kept: list[str] = []
            for member in members:
                if member.image_id in inserted and chunk_of[member.image_id] == first + offset:
                    inserted.discard(member.image_id)
                    kept.append(member.uri)
            if kept:
                chunks.append(OutgoingChunk(first + offset, kept))
        repository.record_chunks(
            session=session,
            job_id=self.job_id,
            chunks=[ChunkRow(chunk.chunk_index, len(chunk.uris)) for chunk in chunks],
        )
        new_rows = sum(len(chunk.uris) for chunk in chunks) + len(inserted)
        return chunks, new_rows

    def _committed(self) -> None:
        """Count what the last record transaction committed; the state moves on only then."""
        staged, self.staged = self.staged, None
        if staged is None:
            return
        self.waiting = staged.waiting
        self.seen += len(staged.entries)
        self.images += sum(1 for entry in staged.entries if entry.usable)
        # The ledger's own count: a URI listed twice has one row, and `enqueued` must balance.
        self.items += staged.inserted
        self.skipped.update(item.reason for item in staged.items if item.reason is not None)
        newly_unread = staged.unread - self.unread
        self.seen += sum(newly_unread.values())
        self.skipped.update(newly_unread)
        self.unread = staged.unread
        self.unsent.extend(staged.chunks)


def run_scan(
    source: Source,
    *,
    sessions: sessionmaker[Session],
    publish: Publisher,
    chunk_size: int,
    model_version: str | None,
    chunk_bytes: int | None = None,
    batch_files: int = ScanSettings.model_fields["batch_files"].default,
    force: bool = False,
    where: Sequence[Selection] = (),
    options: Mapping[str, Any] | None = None,
    progress: Callable[[ScanProgress], None] | None = None,
    skip_settled: bool = ScanSettings.model_fields["skip_settled"].default,
    overlap_writes: str = ScanSettings.model_fields["overlap_writes"].default,
    overlap_publish: str = ScanSettings.model_fields["overlap_publish"].default,
    reader: str = ScanSettings.model_fields["reader"].default,
) -> ScanSummary:
    """Scan `source` into a new job and publish its images in chunks of `chunk_size` URIs.

    A chunk closes earlier once its files add up to `chunk_bytes` (None: no byte budget). The
    listing goes to the ledger `batch_files` files at a time (at least a chunk's worth): one
    commit records a batch's images and chunks, one more marks its chunks published.

    With `model_version` None nothing counts as already labeled. `force` enqueues images already
    labeled by `model_version`; `where` keeps only the images that match every selection.

    With `skip_settled` (and neither `force` nor `where`), a run of files the ledger knows to be
    settled by `model_version` under the same listing (`db.repository.listings`) is counted, not
    read and not itemized: its files count as skipped for the reasons stored with it.
    `overlap_writes` ("never", "auto", "always") says whether a batch is written in a second
    thread while the next one is read (`producer.pipeline`; auto: on PostgreSQL only).
    `overlap_publish` (the same values) says whether a batch's chunks are published and marked
    in a thread of their own while the next batch is recorded (auto: on PostgreSQL only).
    `reader` ("inline", "process") says where a local folder is walked and read: in this
    process, or in a second one while this one writes (`producer.read_ahead`); other sources
    are always read here.
    Raises `ScanInterrupted` when the broker refuses a message (see the module docstring).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be at least 1, got {chunk_bytes}")
    if model_version is None and any(
        s.kind is SelectionKind.MODEL_OTHER_THAN and s.version is None for s in where
    ):
        raise ConfigError("--where older-model needs a model version: promote a model first")
    started = time.monotonic()
    job_options = {
        **(options or {}),
        "chunk_size": chunk_size,
        "chunk_bytes": chunk_bytes,
        "force": force,
        "where": [str(selection) for selection in where],
    }
    files = max(batch_files, chunk_size)
    trusted = _trusts_runs(skip_settled, model_version, force=force, where=where)
    with sessions() as session:
        on_postgresql = session.get_bind().dialect.name == "postgresql"
    writes_behind = _overlaps(overlap_writes, on_postgresql, what="overlap_writes")
    publish_behind = _overlaps(overlap_publish, on_postgresql, what="overlap_publish")
    # A reading process starts first: it imports and opens the folder while the job is made.
    with _read_ahead(
        source, reader, files=files, sessions=sessions, model_version=trusted
    ) as ahead:
        with sessions() as session, session.begin():
            # Each scan compares a batch with what the ledger holds: on SQLite that needs
            # statistics as fresh as the last scan's and the workers' writes (see the function).
            refresh_planner_statistics(session)
            job_id = repository.create_job(
                session=session, source=source.uri, options=job_options, model_version=model_version
            )
        logger.info("job %d: scanning %s", job_id, display_name(source.uri))
        scan = _Scan(
            job_id,
            sessions=sessions,
            publish=publish,
            chunk_size=chunk_size,
            chunk_bytes=chunk_bytes if chunk_bytes is not None else sys.maxsize,
            model_version=model_version,
            force=force,
            where=where,
            trust_runs=trusted is not None,
            publish_behind=publish_behind,
        )
        batches = ahead if ahead is not None else _read_here(scan, source, files=files)
        # The writer records each batch (and publishes its chunks), beside the reading or after
        # each batch (`producer.pipeline`).
        writer: Writer[Batch] = Writer(scan.add_batch, threaded=writes_behind)
        with young_objects_only():
            _scan_source(scan, source, batches, writer, progress=progress)
    if progress is not None:
        progress(scan.progress())
    return _finish(scan, started)


def _trusts_runs(
    skip_settled: bool, model_version: str | None, *, force: bool, where: Sequence[Selection]
) -> str | None:
    """The model whose settled runs a scan may count unread, or None. Runs are trusted (and
    learned) only by a plain scan for a model: `--force` and `--where` decide otherwise than
    "labeled by this model", and without a model nothing is ever settled."""
    if skip_settled and model_version is not None and not force and not where:
        return model_version
    return None


@contextmanager
def _read_ahead(
    source: Source,
    reader: str,
    *,
    files: int,
    sessions: sessionmaker[Session],
    model_version: str | None,
) -> Iterator[Iterator[Batch] | None]:
    """A reading process's batches (`producer.read_ahead`; stopped when the block ends), or None
    where the source is read in this process. `model_version`: whose settled runs it skips."""
    if reader not in ("inline", "process"):
        raise ConfigError(f"reader must be inline or process, not {reader!r}")
    if reader == "inline" or not isinstance(source, FolderSource):
        yield None
        return
    spec = ReadAheadSpec(
        source.spec,
        files=files,
        database_url=None if model_version is None else database_url(sessions),
        model_version=model_version,
    )
    with ReadAhead(spec) as batches:
        yield batches


def _read_here(scan: _Scan, source: Source, *, files: int) -> Iterator[Batch]:
    """The source's batches, read in this process as they are asked for (the listing starts at
    the first, so that its error is the scan's like any other)."""
    iter_runs = getattr(source, "iter_runs", None)
    runs: Iterator[Run] = (
        iter_runs() if callable(iter_runs) else entry_runs(source.iter_entries(), files)
    )
    for group in run_batches(runs, files=files):
        yield scan.read_runs(group)


def _scan_source(
    scan: _Scan,
    source: Source,
    batches: Iterator[Batch],
    writer: Writer[Batch],
    *,
    progress: Callable[[ScanProgress], None] | None,
) -> None:
    """Hand each batch to `writer`, then record the remainder. On an error, stop early (the
    module docstring) and raise."""
    try:
        for batch in batches:
            writer.put(batch)
            if progress is not None:
                progress(scan.progress())
        writer.close()
        scan.listed_all = True
        scan.add_remainder()
        scan.publisher.close()
    except PublishError as error:
        writer.stop()
        scan.publisher.stop()
        _stop_early(scan, str(error))
        raise _interrupted(scan, source, error) from error
    except BaseException as error:
        # A source, database or user interrupt: what was read before it is recorded, what was
        # committed stays usable (and what was recorded is published), and the error is raised
        # as it is.
        writer.stop()
        scan.publisher.stop()
        _stop_early(scan, repr(error))
        raise


def _overlaps(value: str, on_postgresql: bool, *, what: str) -> bool:
    """Whether a thread of the scan's overlaps its other work (`ScanSettings.overlap_writes`,
    `overlap_publish`): always, never, or auto, on PostgreSQL only."""
    if value not in ("auto", "always", "never"):
        raise ConfigError(f"{what} must be auto, always or never, not {value!r}")
    if value != "auto":
        return value == "always"
    return on_postgresql


def _finish(scan: _Scan, started: float) -> ScanSummary:
    """Queue the job (done at once when nothing was enqueued) and sum the scan up."""
    with scan.sessions() as session, session.begin():
        repository.end_scan(session=session, job_id=scan.job_id, enqueued=scan.ledger_size)
        done = repository.finish_job_if_complete(session=session, job_id=scan.job_id)
    summary = ScanSummary(
        job_id=scan.job_id,
        seen=scan.seen,
        enqueued_images=scan.enqueued,
        skipped_by_reason=dict(sorted(scan.skipped.items())),
        chunks=scan.chunks,
        seconds=time.monotonic() - started,
    )
    logger.info(
        "job %d: %d files, %d images in %d chunks, skipped %s%s",
        scan.job_id,
        summary.seen,
        summary.enqueued_images,
        summary.chunks,
        summary.skipped_by_reason,
        "; done, nothing to label" if done else "",
    )
    return summary


def _interrupted(scan: _Scan, source: Source, error: PublishError) -> ScanInterrupted:
    """The error that says how to go on after the broker refused a chunk."""
    unsent = len(scan.unsent)
    rest = (
        ""
        if scan.listed_all
        else f", then scan {display_name(source.uri)} again for the files not listed yet"
        " (images already labeled are skipped)"
    )
    message = (
        f"{error}. The scan of job {scan.job_id} stopped after {scan.seen} files and nothing is"
        f" lost: {unsent} chunk(s) are recorded but not published. When the broker is back,"
        f" republish the unpublished chunks of job {scan.job_id}{rest}."
    )
    return ScanInterrupted(message, job_id=scan.job_id, unpublished_chunks=unsent)


def _stop_early(scan: _Scan, cause: str) -> None:
    """Record the waiting images as a last, unpublished chunk and queue what the ledger holds.

    The job then finishes once its recorded chunks are done, and its error says that the scan
    stopped early. Best effort: when the database is what failed, the job stays `scanning`.
    """
    try:
        scan.add_remainder(publish=False)
        reason = (
            f"scan stopped after {scan.seen} files, {len(scan.unsent)} chunk(s) recorded but"
            f" not published: {cause}"
        )
        with scan.sessions() as session, session.begin():
            repository.end_scan(
                session=session, job_id=scan.job_id, enqueued=scan.ledger_size, error=reason
            )
            repository.finish_job_if_complete(session=session, job_id=scan.job_id)
    except SQLAlchemyError:
        logger.exception("job %d: could not record where the scan stopped", scan.job_id)


def _image_row(entry: Entry) -> ImageRow:
    return ImageRow(
        uri=entry.uri,
        fingerprint=entry.fingerprint,
        size_bytes=entry.size_bytes,
        mtime_ns=entry.mtime_ns,
        name_bytes=entry.name_bytes,
    )


def _skipped(image_id: int, reason: str, message: str | None = None) -> JobItemRow:
    return JobItemRow(image_id, state=ItemState.SKIPPED, reason=reason, message=message)


__all__ = [
    "WHERE_FORMS",
    "ScanInterrupted",
    "ScanProgress",
    "ScanSummary",
    "Selection",
    "SelectionKind",
    "parse_where",
    "run_scan",
]
