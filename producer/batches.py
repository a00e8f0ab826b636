"""A scan's reading side: the source's runs grouped into batches, and each batch read.

    for group in run_batches(source.iter_runs(), files=4096):
        batch = read_batch(group, settled=lookup)   # lookup(keys) -> {key: ListingRow}

`read_batch` counts the runs the ledger knows settled (same key, digest and file count, for the
scan's model: `settled`) without reading them, and reads the others. What it returns holds only
plain data (entries, the runs' keys and digests, counts), so a batch read in another process
(`producer.read_ahead`) reaches the writer as one read here would.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from core.storage.entries import Entry, Run
from db.repository import ListingRow, settled_listings
from producer.chunking import chunked

RUNS_PER_BATCH = 256
"""Runs held at once by a batch: each keeps its folder's descriptor open until it is read."""

SettledLookup = Callable[[Sequence[str]], Mapping[str, ListingRow]]
"""Run keys -> the stored listings among them that the scan's model had settled."""


@dataclass(frozen=True, slots=True)
class ReadRun:
    """A run whose files a batch read, and where its entries sit in the batch."""

    key: str
    digest: str
    files: int
    plain: bool
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class Batch:
    """The entries read, the runs they came from, and the files of the runs counted without
    reading, by reason."""

    entries: list[Entry]
    read: list[ReadRun]
    unread: Counter[str]


def settled_lookup(sessions: sessionmaker[Session], model_version: str) -> SettledLookup:
    """The ledger's answer, through `sessions`, to which runs `model_version` had settled."""

    def settled(keys: Sequence[str]) -> Mapping[str, ListingRow]:
        with sessions() as session:
            return settled_listings(session=session, keys=keys, model_version=model_version)

    return settled


def read_batch(runs: list[Run], *, settled: SettledLookup | None) -> Batch:
    """Count the runs that `settled` knows (same digest and file count) and read the others.

    `settled` None: every run is read (`--force`, `--where`, no model). Every run is released
    by the end, read or not.
    """
    try:
        known: Mapping[str, ListingRow] = {}
        keys = [run.key for run in runs if run.key and run.plain]
        if settled is not None and keys:
            known = settled(keys)
        entries: list[Entry] = []
        read: list[ReadRun] = []
        unread: Counter[str] = Counter()
        to_read: list[Run] = []
        for run in runs:
            row = known.get(run.key)
            if row is not None and row.digest == run.digest and row.files == run.files:
                run.release()
                unread.update(row.counts)
                continue
            run.prefetch()  # an S3 run's GETs start now, all of the batch's at once
            to_read.append(run)
        for run in to_read:
            start = len(entries)
            entries.extend(run.read())
            read.append(ReadRun(run.key, run.digest, run.files, run.plain, start, len(entries)))
    finally:
        for run in runs:
            run.release()
    return Batch(entries, read, unread)


def run_batches(runs: Iterator[Run], *, files: int) -> Iterator[list[Run]]:
    """Runs in groups of at least `files` files (the last may hold fewer), at most
    `RUNS_PER_BATCH` runs each: a run holds a folder descriptor until it is read or released.

    When the listing fails, the runs listed before it come out as one last group and the error
    is raised at the next step (as `chunked` does), so what was listed reaches the ledger.
    """
    group: list[Run] = []
    count = 0
    try:
        while True:
            try:
                run = next(runs, None)
            except Exception:
                if group:
                    batch, group = group, []
                    yield batch
                raise
            if run is None:
                break
            group.append(run)
            count += run.files
            if count >= files or len(group) >= RUNS_PER_BATCH:
                batch, group, count = group, [], 0
                yield batch
        if group:
            batch, group = group, []
            yield batch
    finally:
        for run in group:
            run.release()


def entry_runs(entries: Iterable[Entry], size: int) -> Iterator[Run]:
    """A source that only lists by reading (`iter_entries`): its entries, `size` at a time, as
    runs with no key, which are always read."""
    for batch in chunked(entries, size):
        yield Run(key="", digest="", files=len(batch), plain=False, _read=_returning(batch))


def _returning(entries: list[Entry]) -> Callable[[], list[Entry]]:
    return lambda: entries


__all__ = [
    "RUNS_PER_BATCH",
    "Batch",
    "ReadRun",
    "SettledLookup",
    "entry_runs",
    "read_batch",
    "run_batches",
    "settled_lookup",
]
