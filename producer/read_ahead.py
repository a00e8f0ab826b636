"""A folder's batches read in a second process, while the scan's own process writes the ledger.

    with ReadAhead(ReadAheadSpec(source.spec, files=4096, database_url=url, model_version="v3"))
            as batches:
        for batch in batches:          # `producer.batches.Batch`, in the walk's order
            ...                        # record and publish it: the reader reads the next one

Why a process: the walk (listing folders, opening each file for its first bytes) and the ledger
writes (SQLAlchemy, the driver, publishing) are both CPU work of the interpreter, and in one
process they take turns: a scan then runs at the walk's speed times walk / (walk + writes),
about 0.35x (bench/RESULTS.md). Threads share one GIL, and a writer thread measured slower on
SQLite (`producer.pipeline`). A second process walks on the second core; the scan's process
only writes.

What stays as it was:
- Confinement: the reader opens the folder from its resolved root (`FolderSpec.open` refuses a
  root that now resolves elsewhere) and walks it with the same code, each file opened relative
  to its folder's descriptor. Nothing but plain data crosses the pipe.
- The order and the outbox: batches arrive in the walk's order, and the scan's process records,
  commits and publishes each one before it takes the next. The reader is at most a batch or two
  ahead (a pipe's buffer and one batch in hand), so memory stays that of a few batches.
- Settled runs: the reader asks the ledger (its own read-only connection) which runs the model
  had settled, and counts them unread, as `producer.batches.read_batch` does in one process.
- Errors: a listing error in the reader reaches the scan after the batches listed before it, and
  is raised there as it was raised in the reader. A reader that dies (killed) is an error that
  says so. The scan stopping for any reason stops the reader; a reader whose scan went away
  (killed) stops at its next send (a broken pipe). Ctrl-C is the scan's to handle: the reader
  ignores SIGINT and is stopped by the scan.

The reader is `python -m producer.read_ahead FD`, not a multiprocessing child: it imports only
what reading needs, never re-runs the scan's `__main__` (multiprocessing's spawn does,
and fails in a script without a `__main__` guard), and copies none of the scan's threads or
connections (a fork would). It starts before the job is created, so its start overlaps that.
Entries cross the pipe as tuples: pickling the frozen dataclasses cost several times more per
file (timed by hand).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from core.storage.entries import Entry
from core.storage.folder_source import FolderSpec
from db.session import make_engine, make_sessionmaker
from producer.batches import Batch, SettledLookup, read_batch, run_batches, settled_lookup

_STOP_SECONDS = 10.0


class ReaderDied(RuntimeError):
    """The reading process ended without saying why (killed, or out of memory)."""


@dataclass(frozen=True, slots=True)
class ReadAheadSpec:
    """What the reader needs: the folder, the batch size, and how to ask the ledger which runs
    are settled (`database_url` None or `model_version` None: it reads every run)."""

    source: FolderSpec
    files: int
    database_url: str | None
    model_version: str | None


class ReadAhead:
    """A reading process and the batches it sends, in order. Use as a context manager: leaving
    it stops the reader, whatever the scan did."""

    def __init__(self, spec: ReadAheadSpec) -> None:
        self._spec = spec
        self._receiver: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Iterator[Batch]:
        receiving, sending = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(sending)],
                stdin=subprocess.PIPE,
                pass_fds=(sending,),
            )
        except BaseException:
            os.close(receiving)
            raise
        finally:
            os.close(sending)  # the reader holds the only sending end: its death is our EOF
        self._receiver, self._process = Connection(receiving, writable=False), process
        try:
            assert process.stdin is not None
            with process.stdin:
                pickle.dump(self._spec, process.stdin)
        except BrokenPipeError:
            pass  # the reader is already gone: the first receive says so
        return self._batches(self._receiver)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The reading process's id while it runs (None before and after)."""
        return None if self._process is None else self._process.pid

    def stop(self) -> None:
        """Stop the reader (at once, if it is still reading) and wait for it."""
        process, self._process = self._process, None
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.close()
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _batches(self, receiver: Connection) -> Iterator[Batch]:
        while True:
            try:
                kind, payload = receiver.recv()
            except EOFError:
                code = None if self._process is None else self._process.wait()
                raise ReaderDied(
                    f"the scan's reading process ended without finishing (exit code {code})"
                ) from None
            if kind == "batch":
                entries, read, unread = payload
                yield Batch([Entry(*row) for row in entries], read, unread)
            elif kind == "done":
                return
            else:
                raise payload


def main(argv: Sequence[str]) -> int:
    """The reading process: its spec comes pickled on stdin, its batches go to the descriptor
    named by `argv[1]`. Started by `ReadAhead` as `python -m producer.read_ahead FD`, so it
    imports only what reading needs, never the scan's own `__main__`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the scan's: it stops us
    spec = pickle.load(sys.stdin.buffer)
    _read(spec, Connection(int(argv[1]), readable=False))
    return 0


def _read(spec: ReadAheadSpec, sender: Connection) -> None:
    """The reader's whole life: send each batch, then "done", or the error that stopped it."""
    try:
        source = spec.source.open()
        with _settled_lookup(spec) as settled:
            for group in run_batches(source.iter_runs(), files=spec.files):
                batch = read_batch(group, settled=settled)
                rows = [_row(entry) for entry in batch.entries]
                sender.send(("batch", (rows, batch.read, batch.unread)))
        sender.send(("done", None))
    except (BrokenPipeError, ConnectionResetError):
        return  # the scan is gone: nobody to tell
    except BaseException as error:
        try:
            sender.send(("error", _sendable(error)))
        except (BrokenPipeError, ConnectionResetError):
            return
    finally:
        sender.close()


def _row(entry: Entry) -> tuple[Any, ...]:
    """An entry as the tuple `Entry(*row)` makes again (`dataclasses.astuple` deep-copies)."""
    return (
        entry.uri,
        entry.name_bytes,
        entry.size_bytes,
        entry.mtime_ns,
        entry.fingerprint,
        entry.image_type,
        entry.skip_reason,
        entry.skip_message,
    )


@contextlib.contextmanager
def _settled_lookup(spec: ReadAheadSpec) -> Iterator[SettledLookup | None]:
    """The ledger's settled runs through the reader's own engine, disposed of at the end."""
    if spec.database_url is None or spec.model_version is None:
        yield None
        return
    engine = make_engine(spec.database_url)
    try:
        yield settled_lookup(make_sessionmaker(engine), spec.model_version)
    finally:
        engine.dispose()


def _sendable(error: BaseException) -> BaseException:
    """The error itself when it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


__all__ = ["ReadAhead", "ReadAheadSpec", "ReaderDied"]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
