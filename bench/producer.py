"""The producer over a generated tree: files/s, flat memory, and Redis bytes per pending image.

    python -m bench.producer --files 200000 --out runs/bench-producer
    python -m bench.producer --files 50000 --out runs/bench-producer \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/bench_producer --create-database

A tree of N tiny but valid JPEG/PNG files (1,000 per folder, two levels: g000/f00/img_0000000.jpg)
is written under OUT/tree once and reused while its count matches. Then, each phase in a fresh
process (so that one phase's memory cannot hide in the next one's numbers):

  walk      FolderSource.iter_entries alone: the floor the producer cannot beat
  scan      the real path: run_scan(FolderSource) -> a fresh database (SQLite in OUT, or a fresh
            PostgreSQL database) -> celery_publisher -> a real Redis, queue `bench-<uuid>`,
            no worker, so every chunk stays pending; the queue is deleted at the end
  rescan    the nightly case: the tree scanned once (not timed), every image given a result
            by the model version (one INSERT ... SELECT, as if workers had labeled it all),
            then scanned again, timed: nothing is new, so it must enqueue 0; this first rescan
            after labeling reads every file and learns which folders are settled
  settled   the nightly steady state: as rescan, with one more untimed rescan before the
            timed one, so the timed scan lists the folders and reads none of them (it must
            enqueue 0 too); `ledger rows` says how many rows each scan itemized
  walk again  the walk once more after the scans: `x walk` divides each scan's files/s by the
            mean of the two walks and says whether the machine's speed drifted between them
            (by more than 20%: the ratio is not a fair one)
  chunk=1   the same on the first 10,000 files with one URI per message, against
  chunk=N   the settings' chunk size, to show what chunking saves in Redis and in time
  tracemal  the 10,000-file scan again under tracemalloc (Python-heap peak; slower, not timed)

Memory: a thread samples VmRSS from /proc/self/status every 0.5 s (VmHWM is reset when the scan
starts), and the RSS is noted when the scan passes 10%, 50% and 100% of the files: flat means
the 100% figure is the 10% one. Redis: `MEMORY USAGE <queue> SAMPLES 0` and the change in
`INFO memory` used_memory, each divided by the pending images (used_memory is server-wide, so
other clients of the same Redis add noise to it; MEMORY USAGE is exact).

The machine's load average is recorded before and after every phase: on a shared machine the
files/s are only as good as the CPU that was free, so CPU seconds are reported too (with a scan's
reading process's, `EMOLABEL_SCAN__READER=process`, the default), and `busy`, the share of all
the machine's CPUs busy during the phase (every process: PostgreSQL's server included).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shutil
import sqlite3
import struct
import sys
import threading
import time
import tracemalloc
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bench.machine import describe, machine, package_versions

FILES_PER_FOLDER = 1000
FOLDERS_PER_GROUP = 10
FILES_PER_GROUP = FILES_PER_FOLDER * FOLDERS_PER_GROUP
TREE_LAYOUT = 1  # bump when the layout or the payloads change, so old trees are rebuilt
SAMPLE_SECONDS = 0.5
MODEL_VERSION = "bench-model"  # like the CLI: a version, so the already-labeled lookup runs
MIB = 1024 * 1024

# An 8x8 JPEG (PIL, quality 50); the PNGs are built below with zlib. The producer only sniffs
# the first bytes, but the files are valid images all the same.
_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERXRTc4"
    "UG1RV19iZ2hnPk1xeXBkeFxlZ2P/2wBDARESEhgVGC8aGi9jQjhCY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2Nj"
    "Y2NjY2NjY2NjY2NjY2NjY2NjY2P/wAARCAAIAAgDASIAAhEBAxEB/8QAFQABAQAAAAAAAAAAAAAAAAAAAAX/xAAUEAEA"
    "AAAAAAAAAAAAAAAAAAAA/8QAFQEBAQAAAAAAAAAAAAAAAAAABAb/xAAUEQEAAAAAAAAAAAAAAAAAAAAA/9oADAMBAAIR"
    "AxEAPwCOACqH/9k="
)


def _png(rgb: tuple[int, int, int], side: int = 8) -> bytes:
    """A `side` x `side` 8-bit RGB PNG of one colour."""

    def block(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + bytes(rgb) * side for _ in range(side))
    return (
        b"\x89PNG\r\n\x1a\n"
        + block(b"IHDR", header)
        + block(b"IDAT", zlib.compress(rows))
        + block(b"IEND", b"")
    )


PAYLOADS: tuple[tuple[str, bytes], ...] = (
    ("jpg", _JPEG),
    ("png", _png((220, 40, 40))),
    ("jpg", _JPEG),
    ("png", _png((40, 40, 220))),
)


# --- the tree ---------------------------------------------------------------------------------


def file_path(root: Path, index: int) -> Path:
    """Where file `index` lives: root/g<group>/f<folder>/img_<index>.<ext>."""
    extension, _ = PAYLOADS[index % len(PAYLOADS)]
    group, rest = divmod(index, FILES_PER_GROUP)
    folder = rest // FILES_PER_FOLDER
    return root / f"g{group:03d}" / f"f{folder:02d}" / f"img_{index:07d}.{extension}"


def count_files(root: Path) -> int:
    """Regular files below `root` (a quick check that a kept tree is whole)."""
    total = 0
    for _, _, names in os.walk(root):
        total += len(names)
    return total


def ensure_tree(out: Path, files: int) -> tuple[Path, float, bool]:
    """The tree of `files` images under out/tree, written unless a whole one is there already.

    Returns the root, the seconds spent writing and whether an existing tree was reused.
    """
    root = out / "tree"
    manifest = out / "tree.json"
    wanted = {"files": files, "layout": TREE_LAYOUT, "files_per_folder": FILES_PER_FOLDER}
    if manifest.exists():
        if json.loads(manifest.read_text()) == wanted and count_files(root) == files:
            return root, 0.0, True
        manifest.unlink()
    if root.exists():
        # Ours (the manifest lived next to it) or left by an interrupted run: rebuilt either way.
        shutil.rmtree(root)
    started = time.perf_counter()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for index in range(files):
        path = file_path(root, index)
        if index % FILES_PER_FOLDER == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, flags, 0o644)
        try:
            os.write(descriptor, PAYLOADS[index % len(PAYLOADS)][1])
        finally:
            os.close(descriptor)
    manifest.write_text(json.dumps(wanted))
    return root, time.perf_counter() - started, False


# --- measuring inside a phase -----------------------------------------------------------------


def _status_kib() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in KiB."""
    values: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as status:  # noqa: PTH123
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount, _unit = line.split()
                values[name.rstrip(":")] = int(amount)
    return values


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:  # noqa: PTH123
            clear.write("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Samples this process's RSS every `interval` seconds on a daemon thread."""

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (seconds since start, RSS MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._started = 0.0

    def __enter__(self) -> RssSampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def _take(self) -> None:
        rss = _status_kib()["VmRSS"] / 1024
        self.samples.append((round(time.perf_counter() - self._started, 2), round(rss, 1)))

    def _run(self) -> None:
        while True:
            self._take()
            if self._stop.wait(self.interval):
                return

    @property
    def peak_mib(self) -> float:
        return max(rss for _, rss in self.samples)


@dataclass
class Checkpoint:
    """The state when the scan first reached `percent` of the files."""

    percent: int
    seen: int
    seconds: float
    rss_mib: float
    python_heap_mib: float | None = None


@dataclass
class Progress:
    """Notes a checkpoint at 10%, 50% and 100% of `expected` files."""

    expected: int
    started: float
    traced: bool
    checkpoints: list[Checkpoint] = field(default_factory=list)
    percents: tuple[int, ...] = (10, 50, 100)

    def __call__(self, progress: Any) -> None:
        for percent in self.percents:
            done = {point.percent for point in self.checkpoints}
            if percent not in done and progress.seen * 100 >= percent * self.expected:
                heap = tracemalloc.get_traced_memory()[0] / MIB if self.traced else None
                self.checkpoints.append(
                    Checkpoint(
                        percent=percent,
                        seen=progress.seen,
                        seconds=round(time.perf_counter() - self.started, 2),
                        rss_mib=round(_status_kib()["VmRSS"] / 1024, 1),
                        python_heap_mib=None if heap is None else round(heap, 2),
                    )
                )


class TimedSource:
    """A source that adds up the time spent inside the wrapped source's iterator."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    @property
    def uri(self) -> str:
        return str(self.inner.uri)

    def iter_entries(self) -> Iterator[Any]:
        return self._timed(iter(self.inner.iter_entries()))

    def iter_runs(self) -> Iterator[Any]:
        """The inner source's runs, the listing and each run's reading timed."""
        for run in self._timed(iter(self.inner.iter_runs())):
            yield dataclasses.replace(run, _read=self._timed_read(run._read))

    def _timed_read(self, read: Callable[[], Any]) -> Callable[[], Any]:
        def timed() -> Any:
            started = time.perf_counter()
            try:
                return read()
            finally:
                self.seconds += time.perf_counter() - started

        return timed

    def _timed(self, items: Iterator[Any]) -> Iterator[Any]:
        while True:
            started = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                self.seconds += time.perf_counter() - started
                return
            self.seconds += time.perf_counter() - started
            yield item


def _timed_publisher(publish: Callable[[int, int, list[str]], str]) -> tuple[Any, list[float]]:
    """Wrap a publisher; the returned one-item list holds the seconds spent in the broker."""
    spent = [0.0]

    def timed(job_id: int, chunk_index: int, uris: list[str]) -> str:
        started = time.perf_counter()
        try:
            return publish(job_id, chunk_index, uris)
        finally:
            spent[0] += time.perf_counter() - started

    return timed, spent


def _cpu_seconds() -> float:
    """This process's CPU seconds and those of its children that ended (a scan's reading
    process, `EMOLABEL_SCAN__READER=process`, ends with its scan)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _machine_ticks() -> tuple[int, int]:
    """(busy, all) clock ticks of every CPU of the machine since boot (/proc/stat's first line:
    user nice system idle iowait irq softirq steal; guests are counted in user already)."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _busy_since(ticks: tuple[int, int]) -> float:
    """The share of all the machine's CPUs that was busy since `ticks` (every process: this
    one, a scan's reading process, PostgreSQL's server, Redis, anything else running)."""
    busy, total = _machine_ticks()
    return round((busy - ticks[0]) / max(1, total - ticks[1]), 3)


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


# --- phases (each runs in a fresh spawned process) --------------------------------------------


@dataclass(frozen=True)
class ScanSpec:
    """One measured scan: where, how many files to expect, which database and chunk size."""

    name: str
    root: str
    expected: int
    database_url: str  # "" for a fresh SQLite file under `workdir`
    workdir: str
    redis_url: str
    chunk_size: int | None  # None: the settings' chunk size
    traced: bool = False
    keep_database: bool = False
    rescan: bool = False  # scan and label everything first (untimed), then time a rescan
    settled: bool = False  # ... and rescan once more (untimed: it learns the settled folders)


def walk_phase(root: str, expected: int) -> dict[str, Any]:
    """Iterate FolderSource.iter_entries with nothing behind it."""
    from core.settings import load_settings
    from core.storage.folder_source import FolderSource

    settings = load_settings()
    source = FolderSource(
        Path(root),
        max_file_bytes=settings.limits.max_file_bytes,
        follow_symlinks=settings.scan.follow_symlinks,
    )
    load_before = _load()
    _reset_peak_rss()
    cpu = _cpu_seconds()
    ticks = _machine_ticks()
    started = time.perf_counter()
    progress = Progress(expected, started, traced=False)
    seen = usable = 0
    with RssSampler() as sampler:
        for entry in source.iter_entries():
            seen += 1
            usable += entry.usable
            if seen % 256 == 0 or seen == expected:
                progress(_Seen(seen))
    seconds = time.perf_counter() - started
    return {
        "phase": "walk",
        "files": seen,
        "usable": usable,
        "seconds": round(seconds, 2),
        "files_per_s": round(seen / seconds),
        "cpu_seconds": round(_cpu_seconds() - cpu, 2),
        "machine_busy": _busy_since(ticks),
        "rss": _rss_report(sampler, progress),
        "load_before": load_before,
        "load_after": _load(),
    }


@dataclass(frozen=True)
class _Seen:
    seen: int


def scan_phase(spec: ScanSpec) -> dict[str, Any]:
    """run_scan over the tree into a fresh database and a fresh Redis queue, no worker."""
    import redis

    from core.publishing import celery_publisher
    from core.settings import load_settings
    from core.storage.folder_source import FolderSource
    from db.repository import job_counts
    from db.session import make_engine, make_sessionmaker, upgrade
    from worker.celery_app import make_celery

    queue = f"bench-{uuid.uuid4().hex}"
    database_url = spec.database_url or _sqlite_url(spec)
    settings = load_settings(broker_url=spec.redis_url, database_url=database_url, queue=queue)
    chunk_size = spec.chunk_size or settings.scan.chunk_size
    upgrade(database_url)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    client = redis.Redis.from_url(spec.redis_url)
    publish, publish_seconds = _timed_publisher(
        celery_publisher(make_celery(settings), settings.queue)
    )
    source = TimedSource(
        FolderSource(
            Path(spec.root),
            max_file_bytes=settings.limits.max_file_bytes,
            follow_symlinks=settings.scan.follow_symlinks,
        )
    )
    if spec.rescan:
        _scan_and_label_everything(source.inner, sessions, publish, chunk_size, settings)
        if spec.settled:
            _scan(source.inner, sessions, publish, chunk_size, settings)
        _delete_queue(client, queue)
        publish_seconds[0] = 0.0  # what the untimed scan sent is not the rescan's
    load_before = _load()
    used_before = int(client.info("memory")["used_memory"])
    if spec.traced:
        tracemalloc.start()
    _reset_peak_rss()
    cpu = _cpu_seconds()
    ticks = _machine_ticks()
    started = time.perf_counter()
    progress = Progress(spec.expected, started, traced=spec.traced)
    # A reading process walks on its own: this process sees its batches, not its time.
    in_process = settings.scan.reader == "process"
    try:
        with RssSampler() as sampler:
            summary = _scan(
                source.inner if in_process else source,
                sessions,
                publish,
                chunk_size,
                settings,
                progress,
            )
        seconds = time.perf_counter() - started
        cpu_seconds = _cpu_seconds() - cpu
        machine_busy = _busy_since(ticks)
        heap_peak = tracemalloc.get_traced_memory()[1] / MIB if spec.traced else None
        tracemalloc.stop()
        redis_report = _redis_report(client, queue, used_before, summary.enqueued_images)
        with sessions() as session:
            counts = job_counts(session=session, job_id=summary.job_id)
        itemized_skips = _itemized_skips(sessions, summary.job_id)
        database_bytes = _database_bytes(engine)
    finally:
        _delete_queue(client, queue)
        engine.dispose()
        if not spec.database_url and not spec.keep_database:
            for suffix in ("", "-wal", "-shm"):
                Path(_sqlite_path(spec) + suffix).unlink(missing_ok=True)
    if counts.pending != summary.enqueued_images or not counts.balanced:
        raise RuntimeError(f"the ledger does not balance: {counts}")
    if spec.rescan and summary.enqueued_images:
        raise RuntimeError(f"a rescan of a labeled tree enqueued {summary.enqueued_images} images")
    walk_seconds = source.seconds
    return {
        "phase": spec.name,
        "database": engine.dialect.name,
        "chunk_size": chunk_size,
        "traced": spec.traced,
        "files": summary.seen,
        "ledger_rows": counts.total - counts.skipped + itemized_skips,
        "pending_images": summary.enqueued_images,
        "chunks": summary.chunks,
        "seconds": round(seconds, 2),
        "files_per_s": round(summary.seen / seconds),
        "cpu_seconds": round(cpu_seconds, 2),
        "machine_busy": machine_busy,
        "reader": settings.scan.reader,
        "split_seconds": {
            "walk": None if in_process else round(walk_seconds, 2),
            "publish": round(publish_seconds[0], 2),
            "database_and_rest": round(
                seconds - (0.0 if in_process else walk_seconds) - publish_seconds[0], 2
            ),
        },
        # The largest RSS of any child that ended (the reading process), MiB.
        "children_peak_rss_mib": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
        "rss": _rss_report(sampler, progress),
        "python_heap_peak_mib": None if heap_peak is None else round(heap_peak, 2),
        "redis": redis_report,
        "database_bytes": database_bytes,
        "database_bytes_per_file": round(database_bytes / max(1, summary.seen)),
        "queue": queue,
        "load_before": load_before,
        "load_after": _load(),
    }


def _scan(
    source: Any,
    sessions: Any,
    publish: Any,
    chunk_size: int,
    settings: Any,
    progress: Any = None,
) -> Any:
    """`run_scan` as the CLI calls it, for MODEL_VERSION."""
    from producer.enqueue import run_scan

    return run_scan(
        source,
        sessions=sessions,
        publish=publish,
        chunk_size=chunk_size,
        batch_files=settings.scan.batch_files,
        model_version=MODEL_VERSION,
        progress=progress,
        skip_settled=settings.scan.skip_settled,
        overlap_writes=settings.scan.overlap_writes,
        overlap_publish=settings.scan.overlap_publish,
        reader=settings.scan.reader,
    )


def _itemized_skips(sessions: Any, job_id: int) -> int:
    """The job's skipped files that have a ledger row (the rest were counted from runs)."""
    from db.repository import job_counts, unread_counts

    with sessions() as session:
        counted = sum(unread_counts(session=session, job_id=job_id).values())
        return job_counts(session=session, job_id=job_id).skipped - counted


def _scan_and_label_everything(
    source: Any, sessions: Any, publish: Any, chunk_size: int, settings: Any
) -> None:
    """Scan the tree, then give every image a result by MODEL_VERSION for its fingerprint."""
    from sqlalchemy import exists, insert, literal, select, text

    from db.models import Image, Result

    _scan(source, sessions, publish, chunk_size, settings)
    labeled = select(
        Image.id,
        literal(MODEL_VERSION),
        literal("happy"),
        literal(0.9),
        literal({"happy": 0.9, "sad": 0.1}, Result.scores.type),
        Image.fingerprint,
    ).where(  # a database an earlier phase labeled: only what it has not
        ~exists().where(Result.image_id == Image.id, Result.model_version == MODEL_VERSION)
    )
    columns = ["image_id", "model_version", "label", "confidence", "scores", "fingerprint"]
    with sessions.begin() as session:
        session.execute(insert(Result).from_select(columns, labeled))
    # What autovacuum does within a minute of such a load (workers writing results over hours
    # give it that minute many times). Without it PostgreSQL still believes `results` holds a
    # few dozen rows and drives the already-labeled lookup from it: a 100,000-file rescan took
    # 11.0 s instead of 6.8-7.9 s (and 172 s while psycopg still prepared statements; see
    # bench/RESULTS.md).
    with sessions.begin() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("ANALYZE images, results, job_items"))


def _sqlite_path(spec: ScanSpec) -> str:
    return str(Path(spec.workdir) / f"{spec.name}.sqlite")


def _sqlite_url(spec: ScanSpec) -> str:
    path = Path(_sqlite_path(spec))
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return f"sqlite:///{path}"


def _database_bytes(engine: Any) -> int:
    """The database's size on disk: the SQLite file (with its WAL), or pg_database_size."""
    from sqlalchemy import text

    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            return int(
                connection.execute(text("SELECT pg_database_size(current_database())")).scalar()
            )
    database = engine.url.database
    engine.dispose()  # the last connection to close checkpoints the WAL into the file
    return sum(
        Path(database + suffix).stat().st_size
        for suffix in ("", "-wal")
        if Path(database + suffix).exists()
    )


def _rss_report(sampler: RssSampler, progress: Progress) -> dict[str, Any]:
    status = _status_kib()
    points = progress.checkpoints
    first, last = (points[0], points[-1]) if points else (None, None)
    return {
        "checkpoints": [asdict(point) for point in points],
        "growth_10_to_100_mib": (
            None if first is None or last is None else round(last.rss_mib - first.rss_mib, 1)
        ),
        "sampled_peak_mib": sampler.peak_mib,
        "vm_hwm_mib": round(status["VmHWM"] / 1024, 1),
        "samples": sampler.samples,
    }


def _redis_report(client: Any, queue: str, used_before: int, pending: int) -> dict[str, Any]:
    """What the pending messages hold in Redis, and one message taken apart."""
    key_bytes = int(client.memory_usage(queue, samples=0) or 0)
    used_after = int(client.info("memory")["used_memory"])
    messages = int(client.llen(queue))
    oldest = client.lindex(queue, -1)  # kombu LPUSHes: the tail is the first (a full) chunk
    report: dict[str, Any] = {
        "messages": messages,
        "memory_usage_bytes": key_bytes,
        "memory_usage_bytes_per_image": round(key_bytes / max(1, pending), 1),
        "used_memory_delta_bytes": used_after - used_before,
        "used_memory_delta_bytes_per_image": round((used_after - used_before) / max(1, pending), 1),
    }
    if oldest is not None:
        report["first_message"] = _anatomy(oldest)
    return report


def _anatomy(raw: bytes) -> dict[str, Any]:
    """Where a message's bytes go: the envelope, the headers and the (base64) body of URIs."""
    envelope = json.loads(raw)
    body_text = envelope["body"]
    body = (
        base64.b64decode(body_text)
        if envelope["properties"].get("body_encoding") == "base64"
        else body_text.encode()
    )
    uris = json.loads(body)[0][2]
    uri_bytes = sum(len(uri.encode()) for uri in uris)
    return {
        "bytes": len(raw),
        "uris": len(uris),
        "bytes_per_uri": round(len(raw) / max(1, len(uris)), 1),
        "mean_uri_length": round(uri_bytes / max(1, len(uris)), 1),
        "body_bytes_as_stored": len(body_text),
        "body_bytes_decoded": len(body),
        "headers_bytes": len(json.dumps(envelope["headers"])),
        "body_encoding": envelope["properties"].get("body_encoding"),
    }


def _delete_queue(client: Any, queue: str) -> None:
    """Remove the bench queue and kombu's bindings for it (nothing else is touched).

    kombu 5.7 keeps a second set per binding (`_kombu.binding_permanent.*`, which tells its
    sweep of expiring bindings to keep it); without it here, every run left one behind.
    """
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


# --- PostgreSQL -------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_postgres(url: str) -> Iterator[str]:
    """A new database `<name>_<8 hex>` on the server of `url`, dropped afterwards."""
    from sqlalchemy import create_engine, make_url, text

    base = make_url(url)
    name = f"{base.database or 'bench_producer'}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- the report -------------------------------------------------------------------------------


def environment(redis_url: str, database_url: str | None) -> dict[str, Any]:
    """Versions, cores and load: what the numbers depend on."""
    import redis

    packages = ("sqlalchemy", "celery", "kombu", "redis", "psycopg", "alembic")
    versions: dict[str, str | None] = package_versions(packages)
    client = redis.Redis.from_url(redis_url)
    versions["redis_server"] = str(client.info("server")["redis_version"])
    versions["sqlite"] = sqlite3.sqlite_version
    if database_url:
        from sqlalchemy import create_engine, text

        engine = create_engine(database_url)
        with engine.connect() as connection:
            versions["postgresql"] = str(connection.execute(text("SHOW server_version")).scalar())
        engine.dispose()
    return {
        "python": platform.python_version(),
        **machine(),
        "load_average_at_start": _load(),
        "versions": versions,
    }


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def print_table(result: dict[str, Any]) -> None:
    """The phases side by side, then the memory checkpoints of the full scan."""
    header = (
        f"{'phase':<12}{'db':<11}{'chunk':>6}{'files':>9}{'s':>8}{'files/s':>9}{'cpu s':>7}"
        f"{'busy':>6}"
        f"{'peak MiB':>9}{'+10→100%':>9}{'B/img key':>10}{'B/img used':>11}{'B/msg':>8}"
        f"  load before→after"
    )
    print(header)
    print("-" * len(header))
    for phase in result["phases"]:
        redis_part = phase.get("redis", {})
        message = redis_part.get("first_message", {})
        growth = phase["rss"]["growth_10_to_100_mib"]
        print(
            f"{phase['phase']:<12}{phase.get('database', '-'):<11}"
            f"{phase.get('chunk_size', '-')!s:>6}{phase['files']:>9}{phase['seconds']:>8.1f}"
            f"{phase['files_per_s'] if not phase.get('traced') else '(traced)'!s:>9}"
            f"{phase['cpu_seconds']:>7.1f}"
            f"{_percent(phase.get('machine_busy')):>6}"
            f"{phase['rss']['vm_hwm_mib']:>9.1f}"
            f"{'-' if growth is None else f'{growth:+.1f}':>9}"
            f"{redis_part.get('memory_usage_bytes_per_image', '-')!s:>10}"
            f"{redis_part.get('used_memory_delta_bytes_per_image', '-')!s:>11}"
            f"{message.get('bytes', '-')!s:>8}"
            f"  {phase['load_before']}→{phase['load_after']}"
        )
    for phase in result["phases"]:
        if "split_seconds" in phase:
            split = phase["split_seconds"]
            marks = ", ".join(
                f"{point['percent']}%: {point['rss_mib']} MiB"
                + (
                    f" (heap {point['python_heap_mib']} MiB)"
                    if point["python_heap_mib"] is not None
                    else ""
                )
                for point in phase["rss"]["checkpoints"]
            )
            heap = phase.get("python_heap_peak_mib")
            walk = (
                f"walk {split['walk']} s"
                if split["walk"] is not None
                else "walk in the reading process (peak RSS"
                f" {phase['children_peak_rss_mib']} MiB), waiting for it counted below"
            )
            print(
                f"{phase['phase']}: {walk}, publish {split['publish']} s,"
                f" database+rest {split['database_and_rest']} s;"
                f" ledger rows {phase['ledger_rows']}; RSS {marks}"
                + (f"; tracemalloc peak {heap} MiB" if heap is not None else "")
                + f"; database {phase['database_bytes_per_file']} B/file"
            )
    ratios = result.get("ratios_to_walk")
    if ratios is not None:
        shown = ", ".join(f"{name} {value:.2f}x" for name, value in ratios["ratios"].items())
        walks = " and ".join(f"{rate:,}" for rate in ratios["walk_files_per_s"])
        verdict = (
            "steady"
            if ratios["steady"]
            else f"the machine's speed changed by more than {WALK_DRIFT:.0%}: not a fair ratio"
        )
        print(
            f"x walk (the mean of the walks, {walks} files/s; drift {ratios['drift']:.0%},"
            f" {verdict}): {shown}"
        )
    env = result["environment"]
    print(
        f"{describe(env)}, load {env['load_average_at_start']} at start,"
        f" {result['load_average_at_end']} at end; tree "
        + (
            "reused"
            if result["tree"]["reused"]
            else f"written in {result['tree']['write_seconds']} s"
        )
    )


# --- main -------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.producer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--files", type=int, default=200_000, help="files in the tree")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-producer"))
    parser.add_argument(
        "--database-url",
        default=None,
        help="a PostgreSQL URL for the full scan (default: a fresh SQLite file in OUT)",
    )
    parser.add_argument(
        "--create-database",
        action="store_true",
        help="create a fresh database <name>_<hex> on that server and drop it afterwards",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="default: the settings' scan.chunk_size"
    )
    parser.add_argument("--no-walk", action="store_true", help="skip the walk-only reference phase")
    parser.add_argument(
        "--no-rescan",
        action="store_true",
        help="skip the rescans of the labeled tree (which scan it five times more)",
    )
    parser.add_argument(
        "--no-compare",
        action="store_true",
        help="skip the chunk=1 vs chunk=N and tracemalloc scans of the first 10,000 files",
    )
    parser.add_argument("--keep-database", action="store_true", help="keep the SQLite files")
    arguments = parser.parse_args(argv)
    if arguments.files < 1:
        parser.error("--files must be at least 1")
    if arguments.create_database and not arguments.database_url:
        parser.error("--create-database needs --database-url")
    return arguments


def _in_child(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run one phase in a fresh interpreter, so that its memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def run(arguments: argparse.Namespace, database_url: str | None) -> dict[str, Any]:
    out: Path = arguments.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = environment(arguments.redis_url, database_url)
    root, write_seconds, reused = ensure_tree(out, arguments.files)
    phases: list[dict[str, Any]] = []

    def spec(name: str, scan_root: Path, expected: int, **kw: Any) -> ScanSpec:
        return ScanSpec(
            name=name,
            root=str(scan_root),
            expected=expected,
            database_url=kw.pop("database_url", ""),
            workdir=str(out / "databases"),
            redis_url=arguments.redis_url,
            keep_database=arguments.keep_database,
            **kw,
        )

    if not arguments.no_walk:
        phases.append(_in_child(walk_phase, str(root), arguments.files))
    phases.append(
        _in_child(
            scan_phase,
            spec(
                "scan",
                root,
                arguments.files,
                database_url=database_url or "",
                chunk_size=arguments.chunk_size,
            ),
        )
    )
    if not arguments.no_rescan:
        for name, settled in (("rescan", False), ("settled", True)):
            phases.append(
                _in_child(
                    scan_phase,
                    spec(
                        name,
                        root,
                        arguments.files,
                        database_url=database_url or "",
                        chunk_size=arguments.chunk_size,
                        rescan=True,
                        settled=settled,
                    ),
                )
            )
    if not arguments.no_walk:
        # The walk again: a ratio is only as good as the machine's speed staying put between
        # the phases, and this says whether it did (`ratios_to_walk`).
        phases.append({**_in_child(walk_phase, str(root), arguments.files), "phase": "walk again"})
    if not arguments.no_compare:
        subtree, subtree_files = root / "g000", min(arguments.files, FILES_PER_GROUP)
        phases.append(_in_child(scan_phase, spec("chunk=1", subtree, subtree_files, chunk_size=1)))
        phases.append(
            _in_child(
                scan_phase,
                spec("chunk=N", subtree, subtree_files, chunk_size=arguments.chunk_size),
            )
        )
        phases.append(
            _in_child(
                scan_phase,
                spec(
                    "tracemal", subtree, subtree_files, chunk_size=arguments.chunk_size, traced=True
                ),
            )
        )
    return {
        "benchmark": "producer",
        "command": " ".join(["python -m bench.producer", *sys.argv[1:]]),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": arguments.files,
        "tree": {"root": str(root), "reused": reused, "write_seconds": round(write_seconds, 2)},
        "environment": env,
        "phases": phases,
        "ratios_to_walk": ratios_to_walk(phases),
        "load_average_at_end": _load(),
    }


# Walks before and after that differ by more than this: the machine's speed changed meanwhile.
WALK_DRIFT = 0.2


def ratios_to_walk(phases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Each full-tree scan's files/s over the walk's, the walk being the mean of the walk before
    the scans and the walk after them; `drift` is how far those two walks differ (relative to
    their mean), and `steady` says whether it stayed under WALK_DRIFT."""
    walks = [phase for phase in phases if phase["phase"] in ("walk", "walk again")]
    if not walks:
        return None
    rates = [walk["files_per_s"] for walk in walks]
    mean = sum(rates) / len(rates)
    drift = (max(rates) - min(rates)) / mean
    return {
        "walk_files_per_s": rates,
        "drift": round(drift, 3),
        "steady": drift <= WALK_DRIFT,
        "ratios": {
            phase["phase"]: round(phase["files_per_s"] / mean, 3)
            for phase in phases
            if phase["phase"] in ("scan", "rescan", "settled")
        },
    }


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    with contextlib.ExitStack() as stack:
        database_url = arguments.database_url
        if database_url and arguments.create_database:
            database_url = stack.enter_context(fresh_postgres(database_url))
        result = run(arguments, database_url)
    if database_url:
        from sqlalchemy import make_url

        # Never write a password into the report.
        result["database_url"] = make_url(database_url).render_as_string(hide_password=True)
    kind = "postgresql" if arguments.database_url else "sqlite"
    report = arguments.out.resolve() / f"producer-{kind}-{arguments.files}.json"
    report.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    # Run the copy imported under its own name: the spawned phase processes unpickle
    # `bench.producer.*`, which they can import, not `__main__.*`.
    from bench import producer

    raise SystemExit(producer.main())
