"""How a scan keeps the interpreter busy with its own work: a writer that records a batch
(in a background thread, or at once) while the next is read, and `young_objects_only`, which
keeps the garbage collector's passes off the objects alive before the scan.

    writer = Writer(record)          # record(batch) runs in the writer thread, in order
    for batch in batches:
        writer.put(batch)            # waits while one batch is already waiting; raises the
                                     # writer's error here once it has one
    writer.close()                   # waits for every batch put; raises the writer's error
    ...
    writer.stop()                    # after an error of the reader's: waits, raises nothing

A scan is a walk (listing folders, opening each file for its first bytes) followed by the ledger
writes of what it found. Done one after the other, the producer's speed is at best the walk's
speed times walk / (walk + writes) (bench/RESULTS.md). The walk waits on the file system and the
writes on the database (PostgreSQL's server, SQLite's C code), and both release the GIL while
they wait, so on two cores they overlap. At most one batch waits while one is written and one
is read: memory stays that of three batches.

That holds where the database is another process. On SQLite the writes are this process's own
CPU work, and the two threads hand the GIL back and forth at every system call of the walk,
which costs more than the overlap gains (`python -m bench.producer` with
EMOLABEL_SCAN__OVERLAP_WRITES=always and never; bench/RESULTS.md). So `Writer(threaded=False)`
writes each batch as it is put, and `run_scan` asks for the thread on PostgreSQL only, and
only when `ScanSettings.overlap_writes` says so (it is off by default: with it, a batch's commit
trails the listing, so a producer stopped mid-scan can hold a write transaction open and the
batch it listed last is not yet in the ledger).

The reading side has its own second process (`producer.read_ahead`, `ScanSettings.reader`,
the default for local folders): there the walk uses the other core without sharing a GIL, and
this module's thread is seldom worth it.

The scan also publishes through a `Writer` (`ScanSettings.overlap_publish`): a batch's chunks,
once committed, are sent and marked in a second thread while the next batch is recorded; on
PostgreSQL the broker's round trips and the marks' commit then overlap the server's work.

The writer runs the batches in the order put, one at a time, so the ledger sees them as a single
thread would have written them. After its first error it runs nothing more (what was put after
is dropped: the scan stops there), and the error is raised in the reader's thread.
"""

from __future__ import annotations

import gc
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")

_DONE = object()


class Writer(Generic[T]):
    """Runs `work(batch)` for each batch put, in order, in one background thread."""

    def __init__(
        self, work: Callable[[T], None], *, threaded: bool = True, name: str = "scan-writer"
    ) -> None:
        self._work = work
        self._waiting: queue.Queue[object] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def put(self, batch: T) -> None:
        """Hand `batch` to the writer; wait while another batch is waiting. Without a thread,
        write it now (its error is raised as it is)."""
        if self._thread is None:
            self._work(batch)
            return
        self.check()
        self._waiting.put(batch)

    def close(self) -> None:
        """Wait until every batch put has been written; raise the writer's error if it had one."""
        self.stop()
        self.check()

    def stop(self) -> None:
        """Wait until the writer has finished (what was put before is written), raise nothing."""
        if self._thread is None:
            return
        if not self._closed:
            self._closed = True
            self._waiting.put(_DONE)
        self._thread.join()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def check(self) -> None:
        """Raise the writer's error now if it has one (before work that would be lost to it)."""
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            batch = self._waiting.get()
            if batch is _DONE:
                return
            if self._error is not None:
                # After a failure nothing more is written; taking what comes keeps `put` from
                # waiting forever.
                continue
            try:
                self._work(batch)  # type: ignore[arg-type]
            except BaseException as error:  # raised again in the reader's thread
                self._error = error


@contextmanager
def young_objects_only() -> Iterator[None]:
    """Leave every object alive before the block out of the garbage collector's passes in it.

    A scan allocates a few objects per file, so the collector runs thousands of times, and each
    pass of its oldest generation walked every object the process held: the imported modules,
    SQLAlchemy's and Celery's (gc.callbacks, read by hand). `gc.freeze` moves them to a
    generation the collector skips (CPython's own advice for long-lived objects); `gc.unfreeze`
    gives them back after the block, so a process that scans many times keeps nothing frozen.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
