"""Scans and workers at once on one PostgreSQL: do lock waits stall either? (measured)

    python -m bench.concurrency --out runs/concurrency \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/bench_concurrency \\
        --create-database

Trees of tiny but valid JPEG/PNG files (bench.producer's writer; the worker decodes them, 8x8)
are written once under OUT/tree-a and OUT/tree-b (--files each) and reused while their counts
match; tree C, which the workers label, is tree A unless --label-files gives it another size
(then OUT/tree-c). Each phase runs in a fresh database (`<name>_<8 hex>`, dropped
afterwards, with --create-database) and a fresh Redis queue (`bench-conc-<hex>`, deleted
afterwards); every scan is `producer.enqueue.run_scan` over a FolderSource with the CLI's
settings, in a spawned process of its own, started on a signal once all of the phase's scans
are ready (imports done, a connection open):

  alone          tree A alone: the reference files/s
  two scans      tree A and tree B at the same moment, two processes, one database: the files/s
                 of each, and of both together (all files / first start to last end)
  alone C        tree C alone, a tiny model registered active and no worker: the reference
                 for the next phase
  scan+workers   tree C again while `emolabel worker --concurrency W` (default 4 pool
                 processes) labels the job's chunks as they are published: the scan's files/s,
                 then the workers' images/s until the job is done (its finished_at), split into
                 while the scan ran and after it

The model is trained once (2 classes x 30 generated images, 1 epoch at 32x32, in a spawned
process; reused from OUT/models when there) and registered active in each database that needs
it; the workers are started before the scan and it starts only once every pool process has
logged its model ready, so loading TensorFlow does not fall in the timed part. They are
stopped with SIGTERM (then SIGKILL to their group after 60 s) at the end of the phase.

The measurement: during every phase a thread polls PostgreSQL every 50 ms over its own
connection (application_name bench-lock-sampler):

  pg_stat_activity   the phase database's non-idle backends; those with wait_event_type
                     'Lock' are lock waits, the others' wait events are kept as context
                     (LWLock, IO, ... : waits that are not row or table locks)
  pg_locks           the locks not granted, with `now() - waitstart` (the wait so far), the
                     lock's type, mode and relation, and pg_blocking_pids: whom it waits for

A sample "has a lock wait" when either shows one. A wait is one (pid, waitstart) pair; its
length is the longest `now() - waitstart` seen (a lower bound: the 50 ms sampling misses the
end, and waits shorter than the period are often not seen at all). Every process connects with
its own application_name (scan-a, scan-b, scan-c, emolabel-worker), so each waiting statement
(normalized: numbers as N, deduplicated, with counts) says who waited, on which lock, for whom.

The sampler also counts what the busy backends were running (by application and statement):
a scan that is slow without waiting on a lock shows there where its server time goes. To see
the plans of the slow statements, run with PGOPTIONS='-c session_preload_libraries=auto_explain
-c auto_explain.log_min_duration=400' (a superuser connection; the plans go to the server log).

Nothing is asserted: the script measures, prints a table and writes OUT/concurrency.json. The
machine's load average and CPU use (/proc/stat) are recorded before and after every phase: on a
machine with few cores, a slower scan beside workers is first of all a share of the CPU.

Without --create-database every phase runs in the named database as it is (upgraded first), so
later phases find earlier phases' files in the ledger; use --create-database for the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bench.machine import describe, machine, package_versions
from bench.producer import (
    MODEL_VERSION,
    TimedSource,
    _delete_queue,
    _in_child,
    _timed_publisher,
    ensure_tree,
    fresh_postgres,
)

SAMPLE_SECONDS = 0.05
MODEL_NAME = "concurrency"
CLASS_NAMES = ("happy", "sad")
STATEMENT_CHARS = 200
READY_TIMEOUT = 300.0  # seconds for the scan processes and the workers' models to get ready
WORKER_STOP_SECONDS = 60.0
KEPT_WAIT_SAMPLES = 500  # samples with a wait kept in the report, in order

_NOT_PRELOADED = re.compile(r"model not preloaded \(.*")  # worker.state's line
_NUMBERS = re.compile(r"\b\d+\b")
_SPACES = re.compile(r"\s+")


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with Path("/proc/stat").open(encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return total - idle, total


def _busy_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    total = after[1] - before[1]
    return None if total <= 0 else round((after[0] - before[0]) / total, 3)


def _with_application(url: str, name: str) -> str:
    """`url` with libpq's application_name set, so that pg_stat_activity says who is who."""
    from sqlalchemy import make_url

    parsed = make_url(url)
    return parsed.update_query_dict({"application_name": name}).render_as_string(
        hide_password=False
    )


def _libpq_url(url: str) -> str:
    """A SQLAlchemy URL (postgresql+psycopg://...) as a libpq connection URI."""
    from sqlalchemy import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def normalize(statement: str | None) -> str:
    """A statement with its numbers as N and its white space collapsed, for counting."""
    if not statement:
        return "(none)"
    return _NUMBERS.sub("N", _SPACES.sub(" ", statement).strip())


# --- the lock sampler -------------------------------------------------------------------------

_ACTIVITY = """
SELECT pid, coalesce(application_name, ''), coalesce(state, ''), wait_event_type, wait_event,
       extract(epoch FROM clock_timestamp() - query_start) * 1000, left(query, %(chars)s)
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND state IS DISTINCT FROM 'idle'
"""

_NOT_GRANTED = """
SELECT l.pid, l.locktype, l.mode, coalesce(l.relation::regclass::text, ''),
       extract(epoch FROM l.waitstart),
       extract(epoch FROM clock_timestamp() - l.waitstart) * 1000,
       pg_blocking_pids(l.pid)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE NOT l.granted AND a.datname = current_database()
"""


@dataclass
class Backend:
    pid: int
    application: str
    state: str
    wait_type: str | None
    wait_event: str | None
    query_ms: float | None
    statement: str


@dataclass
class Sample:
    """One poll: when, how many backends were busy, which waited on a lock, other waits."""

    t: float
    active: int
    lock_waiters: int  # pg_stat_activity rows with wait_event_type = 'Lock'
    not_granted: int  # pg_locks rows not granted
    other_waits: tuple[str, ...]  # "type:event" of the busy backends not waiting on a lock
    busy: tuple[str, ...]  # "application: statement" of the same backends


@dataclass
class Wait:
    """One lock wait: a backend from `waitstart` on, seen in one or more samples."""

    pid: int
    application: str
    locktype: str
    mode: str
    relation: str
    statement: str
    first_t: float
    last_t: float
    longest_ms: float
    samples: int = 0
    blocked_by: Counter[str] = field(default_factory=Counter)


class LockSampler:
    """Polls the database's lock waits every `interval` seconds on a thread of its own."""

    def __init__(self, database_url: str, interval: float = SAMPLE_SECONDS) -> None:
        self.conninfo = _libpq_url(_with_application(database_url, "bench-lock-sampler"))
        self.interval = interval
        self.samples: list[Sample] = []
        self.waits: dict[tuple[int, str, float | None], Wait] = {}
        self.activity_lock_ms: list[tuple[float, float]] = []  # (t, query age) of Lock waiters
        self.poll_seconds: list[float] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-sampler", daemon=True)
        self.started = 0.0  # time.monotonic() of the first poll
        self.deadlocks_before = 0
        self.deadlocks_after: int | None = None

    def __enter__(self) -> LockSampler:
        import psycopg

        self._connection = psycopg.connect(self.conninfo, autocommit=True)
        self.deadlocks_before = self._deadlocks()
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self.deadlocks_after = self._deadlocks()
        self._connection.close()

    def _deadlocks(self) -> int:
        """pg_stat_database's deadlock count for this database (backends report it lazily)."""
        row = self._connection.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _run(self) -> None:
        next_poll = time.monotonic()
        while not self._stop.is_set():
            try:
                self._poll()
            except Exception as error:  # the report says the sampling stopped, and why
                self.error = f"{type(error).__name__}: {error}"
                return
            next_poll += self.interval
            delay = next_poll - time.monotonic()
            if delay < 0:  # a slow poll: start again from now rather than catch up in a burst
                next_poll, delay = time.monotonic(), 0.0
            if self._stop.wait(delay):
                return

    def _poll(self) -> None:
        began = time.monotonic()
        t = round(began - self.started, 3)
        with self._connection.cursor() as cursor:
            cursor.execute(_ACTIVITY, {"chars": STATEMENT_CHARS})
            backends = {row[0]: Backend(*row) for row in cursor.fetchall()}
            cursor.execute(_NOT_GRANTED)
            locks = cursor.fetchall()
        self.poll_seconds.append(time.monotonic() - began)
        waiting = [b for b in backends.values() if b.wait_type == "Lock"]
        for backend in waiting:
            self.activity_lock_ms.append((t, float(backend.query_ms or 0.0)))
        busy = [b for b in backends.values() if b.wait_type != "Lock" and b.state == "active"]
        others = tuple(f"{b.wait_type}:{b.wait_event}" if b.wait_type else "running" for b in busy)
        statements = tuple(f"{b.application}: {normalize(b.statement)}" for b in busy)
        self.samples.append(Sample(t, len(backends), len(waiting), len(locks), others, statements))
        for pid, locktype, mode, relation, waitstart, wait_ms, blockers in locks:
            backend = backends.get(pid) or Backend(pid, "?", "?", None, None, None, "")
            key = (pid, locktype, None if waitstart is None else round(float(waitstart), 6))
            wait = self.waits.get(key)
            if wait is None:
                wait = self.waits[key] = Wait(
                    pid=pid,
                    application=backend.application,
                    locktype=locktype,
                    mode=mode,
                    relation=relation,
                    statement=normalize(backend.statement),
                    first_t=t,
                    last_t=t,
                    longest_ms=0.0,
                )
            wait.samples += 1
            wait.last_t = t
            wait.longest_ms = max(wait.longest_ms, float(wait_ms or 0.0))
            for blocker_pid in blockers or ():
                blocker = backends.get(blocker_pid)
                if blocker is None:
                    wait.blocked_by[f"pid {blocker_pid} (not in this database's activity)"] += 1
                else:
                    wait.blocked_by[
                        f"{blocker.application} [{blocker.state}]: {normalize(blocker.statement)}"
                    ] += 1

    def report(self, start: float = 0.0, end: float | None = None) -> dict[str, Any]:
        """The samples and waits between `start` and `end` (seconds since the first poll)."""
        last = float("inf") if end is None else end
        samples = [s for s in self.samples if start <= s.t <= last]
        waits = [w for w in self.waits.values() if w.last_t >= start and w.first_t <= last]
        with_wait = [s for s in samples if s.lock_waiters or s.not_granted]
        activity_ms = [ms for t, ms in self.activity_lock_ms if start <= t <= last]
        by_statement: dict[str, dict[str, Any]] = {}
        for wait in waits:
            entry = by_statement.setdefault(
                wait.statement,
                {
                    "statement": wait.statement,
                    "waits": 0,
                    "samples": 0,
                    "longest_ms": 0.0,
                    "observed_ms": 0.0,
                    "who": Counter(),
                    "locks": Counter(),
                    "blocked_by": Counter(),
                },
            )
            entry["waits"] += 1
            entry["samples"] += wait.samples
            entry["longest_ms"] = max(entry["longest_ms"], wait.longest_ms)
            entry["observed_ms"] += wait.longest_ms
            entry["who"][wait.application] += 1
            entry["locks"][f"{wait.locktype} {wait.mode} {wait.relation}".strip()] += 1
            entry["blocked_by"].update(wait.blocked_by)
        statements = sorted(by_statement.values(), key=lambda e: (-e["samples"], -e["waits"]))
        for entry in statements:
            entry["longest_ms"] = round(entry["longest_ms"], 1)
            entry["observed_ms"] = round(entry["observed_ms"], 1)
            for name in ("who", "locks", "blocked_by"):
                entry[name] = dict(entry[name].most_common(8))
        by_application: dict[str, dict[str, float]] = {}
        for wait in waits:
            part = by_application.setdefault(
                wait.application, {"waits": 0, "observed_ms": 0.0, "longest_ms": 0.0}
            )
            part["waits"] += 1
            part["observed_ms"] = round(part["observed_ms"] + wait.longest_ms, 1)
            part["longest_ms"] = round(max(part["longest_ms"], wait.longest_ms), 1)
        other = Counter(event for s in samples for event in s.other_waits)
        busy = Counter(statement for s in samples for statement in s.busy)
        polls = self.poll_seconds
        return {
            "samples": len(samples),
            "samples_with_lock_wait": len(with_wait),
            "share_with_lock_wait": round(len(with_wait) / max(1, len(samples)), 4),
            "max_waiters_at_once": max(
                (max(s.lock_waiters, s.not_granted) for s in samples), default=0
            ),
            "waits": len(waits),
            "longest_wait_ms": round(max((w.longest_ms for w in waits), default=0.0), 1),
            # The statement's age when seen waiting (pg_stat_activity, the brief's query): the
            # wait is at most that.
            "longest_waiting_statement_age_ms": round(max(activity_ms, default=0.0), 1),
            "observed_wait_ms_total": round(sum(w.longest_ms for w in waits), 1),
            "by_application": by_application,
            "statements": statements,
            "other_waits_of_busy_backends": dict(other.most_common(12)),
            "busy_backend_samples": sum(len(s.other_waits) for s in samples),
            # What the busy backends were running when sampled: where the server's time went.
            "busy_statements": [
                {"samples": count, "statement": statement}
                for statement, count in busy.most_common(12)
            ],
            "sample_period_s": round((samples[-1].t - samples[0].t) / max(1, len(samples) - 1), 4)
            if len(samples) > 1
            else None,
            "poll_ms_mean": round(1000 * sum(polls) / max(1, len(polls)), 2),
            "sampler_error": self.error,
            # Over the whole phase, whatever the window (pg_stat_database, as last reported).
            "deadlocks": None
            if self.deadlocks_after is None
            else self.deadlocks_after - self.deadlocks_before,
            "wait_samples": [
                {"t": s.t, "lock_waiters": s.lock_waiters, "not_granted": s.not_granted}
                for s in with_wait[:KEPT_WAIT_SAMPLES]
            ],
        }


# --- scans in processes of their own ----------------------------------------------------------


@dataclass(frozen=True)
class ScanJob:
    """One scan process: its name (also its application_name), folder and where it writes."""

    name: str
    root: str
    database_url: str
    redis_url: str
    queue: str
    model_version: str


def scan_process(job: ScanJob, start: Any, messages: Any) -> None:
    """Get ready, say so, wait for `start`, run the scan as the CLI does; report on `messages`."""
    try:
        from sqlalchemy import text

        from core.publishing import celery_publisher
        from core.settings import load_settings
        from core.storage.folder_source import FolderSource
        from db.session import make_engine, make_sessionmaker
        from producer.enqueue import run_scan
        from worker.celery_app import make_celery

        database_url = _with_application(job.database_url, job.name)
        settings = load_settings(
            broker_url=job.redis_url, database_url=database_url, queue=job.queue
        )
        engine = make_engine(database_url)
        sessions = make_sessionmaker(engine)
        app = make_celery(settings)
        publish, publish_seconds = _timed_publisher(celery_publisher(app, settings.queue))
        source = TimedSource(
            FolderSource(
                Path(job.root),
                max_file_bytes=settings.limits.max_file_bytes,
                follow_symlinks=settings.scan.follow_symlinks,
            )
        )
        with engine.connect() as connection:  # the pool holds an open connection from here
            connection.execute(text("SELECT 1"))
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
        messages.put(("ready", job.name, None))
        start.wait()
        cpu = _cpu_seconds()
        began = time.monotonic()
        summary = run_scan(
            source,
            sessions=sessions,
            publish=publish,
            chunk_size=settings.scan.chunk_size,
            chunk_bytes=settings.scan.chunk_bytes,
            batch_files=settings.scan.batch_files,
            model_version=job.model_version,
        )
        ended = time.monotonic()
        seconds = ended - began
        messages.put(
            (
                "done",
                job.name,
                {
                    "scan": job.name,
                    "root": job.root,
                    "job_id": summary.job_id,
                    "files": summary.seen,
                    "enqueued_images": summary.enqueued_images,
                    "chunks": summary.chunks,
                    "seconds": round(seconds, 3),
                    "files_per_s": round(summary.seen / max(seconds, 1e-9), 1),
                    "cpu_seconds": round(_cpu_seconds() - cpu, 2),
                    "split_seconds": {
                        "walk": round(source.seconds, 2),
                        "publish": round(publish_seconds[0], 2),
                        "database_and_rest": round(
                            seconds - source.seconds - publish_seconds[0], 2
                        ),
                    },
                    "began_monotonic": began,
                    "ended_monotonic": ended,
                },
            )
        )
        engine.dispose()
    except BaseException:
        messages.put(("error", job.name, traceback.format_exc()))
        raise


class Scans:
    """The phase's scan processes: started, waited for until ready, released at once, joined."""

    def __init__(self, jobs: list[ScanJob]) -> None:
        self.context = get_context("spawn")
        self.jobs = jobs
        self.start = self.context.Event()
        self.messages = self.context.Queue()
        self.processes = [
            self.context.Process(
                target=scan_process, args=(job, self.start, self.messages), name=job.name
            )
            for job in jobs
        ]
        self.results: dict[str, dict[str, Any]] = {}
        self.released = 0.0

    def __enter__(self) -> Scans:
        try:
            for process in self.processes:
                process.start()
            self._receive(len(self.jobs), "ready", READY_TIMEOUT)
        except BaseException:
            self.__exit__()
            raise
        return self

    def release(self) -> None:
        self.released = time.monotonic()
        self.start.set()

    def wait(self, timeout: float) -> dict[str, dict[str, Any]]:
        for name, result in self._receive(len(self.jobs), "done", timeout).items():
            self.results[name] = result
        for process in self.processes:
            process.join(30)
        return self.results

    def _receive(self, count: int, kind: str, timeout: float) -> dict[str, Any]:
        import queue

        got: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                what, name, payload = self.messages.get(timeout=0.5)
            except queue.Empty:
                dead = [p.name for p in self.processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"scan process(es) {dead} exited early") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no '{kind}' from every scan in {timeout:g} s") from None
                continue
            if what == "error":
                raise RuntimeError(f"{name} failed:\n{payload}")
            if what == kind:
                got[name] = payload
        return got

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()
            process.join(10)


# --- the workers ------------------------------------------------------------------------------


class Workers:
    """`emolabel worker --concurrency N` on the phase's database and queue, model loaded."""

    def __init__(self, settings: Any, version: str, concurrency: int, logfile: Path) -> None:
        self.settings = settings
        self.version = version
        self.concurrency = concurrency
        self.logfile = logfile
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_seconds: list[float] = []
        self.start_seconds = 0.0
        self.exit_status: int | None = None

    def __enter__(self) -> Workers:
        from emolabel.embedded import worker_environment

        environment = worker_environment(self.settings, {"TF_CPP_MIN_LOG_LEVEL": "3"})
        self.settings.home.mkdir(parents=True, exist_ok=True)
        offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        command = [
            sys.executable, "-m", "emolabel", "worker",
            "--concurrency", str(self.concurrency),
            "--hostname", f"bench-conc-{os.getpid()}@%h",
            "--loglevel", "INFO",
        ]  # fmt: skip
        started = time.monotonic()
        with self.logfile.open("ab") as output:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,  # its own group: SIGKILL reaches the pool processes too
            )
        try:
            self.ready_seconds = self._wait_until_ready(offset)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = round(time.monotonic() - started, 2)
        return self

    def _wait_until_ready(self, offset: int) -> list[float]:
        """Wait until every pool process has logged the model ready (loaded and warmed up)."""
        pattern = re.compile(rf"model {re.escape(self.version)} ready in ([0-9.]+) s")
        deadline = time.monotonic() + READY_TIMEOUT
        assert self.process is not None
        while True:
            with self.logfile.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
            found = [float(match.group(1)) for match in pattern.finditer(text)]
            if len(found) >= self.concurrency:
                return found
            failed = _NOT_PRELOADED.search(text)
            if failed is not None:
                raise RuntimeError(f"a worker process could not load the model: {failed.group(0)}")
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the worker exited with status {self.process.poll()}; log: {self.logfile}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(found)} of {self.concurrency} worker processes loaded the model in"
                    f" {READY_TIMEOUT:g} s; log: {self.logfile}"
                )
            time.sleep(0.25)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (a warm shutdown), then SIGKILL to the whole group after a while."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.exit_status = self.process.wait(WORKER_STOP_SECONDS)
                return
            except subprocess.TimeoutExpired:
                pass
            # Unreaped, so its pid is still the group's id: the pool processes die with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.exit_status = self.process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def train_tiny_model(out: str) -> dict[str, Any]:
    """Train the phase's model (fast, not good: speed is what matters); in a spawned process."""
    from core.settings import LimitSettings, TrainSettings
    from training.metadata import write_metadata
    from training.runtime import load_keras
    from training.sample_data import generate_sample_data
    from training.train import train_model

    load_keras("tensorflow")
    root = Path(out)
    sample = root / "sample-data"
    generate_sample_data(sample, list(CLASS_NAMES), 30, seed=3, min_size=96, max_size=160)
    started = time.perf_counter()
    outcome = train_model(
        sample,
        TrainSettings(epochs=1, batch_size=16, image_size=32, patience=1, seed=7, augment=False),
        LimitSettings(),
        root / "models",
        MODEL_NAME,
        progress=lambda _: None,
    )
    # Served raw, like the tests' tiny model: a 1-epoch model's thresholds would call most
    # images uncertain (which changes nothing here, but raw labels read better).
    write_metadata(outcome.artifact_dir, outcome.metadata.model_copy(update={"calibration": None}))
    return {
        "artifact": str(outcome.artifact_dir),
        "version": outcome.metadata.version,
        "train_seconds": round(time.perf_counter() - started, 1),
    }


def ensure_model(out: Path) -> dict[str, Any]:
    """The tiny model of an earlier run when its artifact is still there, else a new one."""
    record = out / "model.json"
    if record.exists():
        known = json.loads(record.read_text())
        if Path(known["artifact"]).is_dir():
            return {**known, "reused": True}
    made = _in_child(train_tiny_model, str(out))
    record.write_text(json.dumps(made) + "\n")
    return {**made, "reused": False}


# --- phases -----------------------------------------------------------------------------------


@dataclass
class Context:
    arguments: argparse.Namespace
    out: Path
    base_url: str
    trees: dict[str, Path]
    model: dict[str, Any] | None = None


@contextlib.contextmanager
def phase_database(context: Context) -> Iterator[str]:
    """A fresh, migrated database for one phase (or the named one, without --create-database)."""
    from db.session import upgrade

    if not context.arguments.create_database:
        upgrade(context.base_url)
        yield context.base_url
        return
    with fresh_postgres(context.base_url) as url:
        upgrade(url)
        yield url


def run_phase(
    context: Context,
    name: str,
    scans: dict[str, Path],
    *,
    with_model: bool = False,
    workers: int = 0,
) -> dict[str, Any]:
    """One phase: its database, queue, scans (and workers), sampled from release to the end."""
    import redis

    from core.settings import MetricsSettings, Settings, WorkerSettings

    arguments = context.arguments
    queue = f"bench-conc-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(arguments.redis_url)
    print(f"--- {name}: {', '.join(f'{n} {p}' for n, p in scans.items())}", flush=True)
    result: dict[str, Any] = {"phase": name, "queue": queue}
    with contextlib.ExitStack() as stack:
        stack.callback(_delete_queue, client, queue)
        database_url = stack.enter_context(phase_database(context))
        version = MODEL_VERSION
        if with_model:
            assert context.model is not None
            version = _register(database_url, context.model["artifact"])
        result["model_version"] = version
        worker_group: Workers | None = None
        if workers:
            assert context.model is not None
            settings = Settings(
                home=context.out / "home",
                models_dir=Path(context.model["artifact"]).parent.parent,
                model_name=MODEL_NAME,
                database_url=_with_application(database_url, "emolabel-worker"),
                broker_url=arguments.redis_url,
                queue=queue,
                worker=WorkerSettings(concurrency=workers),
                metrics=MetricsSettings(port=0),
            )
            worker_group = stack.enter_context(
                Workers(settings, version, workers, context.out / "worker.log")
            )
            result["workers"] = {
                "processes": workers,
                "start_seconds": worker_group.start_seconds,
                "model_ready_seconds": worker_group.ready_seconds,
            }
        jobs = [
            ScanJob(scan, str(root), database_url, arguments.redis_url, queue, version)
            for scan, root in scans.items()
        ]
        scan_group = stack.enter_context(Scans(jobs))
        sampler = stack.enter_context(LockSampler(database_url, arguments.sample_seconds))
        time.sleep(max(0.2, 2 * arguments.sample_seconds))  # a few quiet samples first
        load_before, ticks_before = _load(), _machine_ticks()
        release_t = time.monotonic() - sampler.started
        scan_group.release()
        outcomes = scan_group.wait(arguments.timeout)
        scans_ended = max(o["ended_monotonic"] for o in outcomes.values())
        ticks_scans = _machine_ticks()
        result["scans"] = [_scan_entry(outcomes[job.name], scan_group.released) for job in jobs]
        files = sum(o["files"] for o in outcomes.values())
        scans_seconds = scans_ended - scan_group.released
        result["files"] = files
        result["scans_seconds"] = round(scans_seconds, 3)
        result["files_per_s"] = round(files / max(scans_seconds, 1e-9), 1)
        result["machine_busy_share_during_scans"] = _busy_share(ticks_before, ticks_scans)
        scans_end_t = scans_ended - sampler.started
        if worker_group is not None:
            job_id = outcomes[jobs[0].name]["job_id"]
            result["labeling"] = _wait_for_job(
                database_url, job_id, worker_group, scan_group.released, arguments.timeout
            )
        ended_t = time.monotonic() - sampler.started
        result["seconds"] = round(ended_t - release_t, 3)
        result["load_before"], result["load_after"] = load_before, _load()
        result["machine_busy_share"] = _busy_share(ticks_before, _machine_ticks())
    # The sampler is stopped (and the workers, the scans, the database) by now.
    result["locks"] = sampler.report(release_t, ended_t)
    if worker_group is not None:
        result["locks_while_scanning"] = _brief(sampler.report(release_t, scans_end_t))
        result["locks_after_the_scan"] = _brief(sampler.report(scans_end_t, ended_t))
        result["workers"]["exit_status"] = worker_group.exit_status
    return result


def _register(database_url: str, artifact: str) -> str:
    from db.session import make_engine, make_sessionmaker
    from training.registry import register_artifact

    engine = make_engine(database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            return str(
                register_artifact(session=session, directory=Path(artifact), activate=True).version
            )
    finally:
        engine.dispose()


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "samples",
        "samples_with_lock_wait",
        "share_with_lock_wait",
        "waits",
        "longest_wait_ms",
        "observed_wait_ms_total",
        "by_application",
    )
    return {key: report[key] for key in keys}


def _scan_entry(outcome: dict[str, Any], released: float) -> dict[str, Any]:
    entry = {k: v for k, v in outcome.items() if not k.endswith("_monotonic")}
    entry["start_delay_s"] = round(outcome["began_monotonic"] - released, 4)
    return entry


def _wait_for_job(
    database_url: str, job_id: int, workers: Workers, released: float, timeout: float
) -> dict[str, Any]:
    """Poll the job until the workers have finished it; images/s from the scan's start."""
    from sqlalchemy import func, select

    from db.models import Chunk, ItemState, Job, JobItem, JobStatus
    from db.repository import job_counts
    from db.session import make_engine, make_sessionmaker

    engine = make_engine(_with_application(database_url, "bench-watch"))
    sessions = make_sessionmaker(engine)
    scan_returned = time.monotonic()
    try:
        with sessions() as session:
            finished_by_scan_end = session.scalar(
                select(func.count())
                .select_from(JobItem)
                .where(JobItem.job_id == job_id, JobItem.state != ItemState.PENDING)
            )
        while True:
            with sessions() as session:
                status = session.scalar(select(Job.status).where(Job.id == job_id))
                if status is JobStatus.DONE:
                    counts = job_counts(session=session, job_id=job_id)
                    chunks, deliveries, redelivered = session.execute(
                        select(
                            func.count(),
                            func.coalesce(func.sum(Chunk.deliveries), 0),
                            func.count().filter(Chunk.deliveries > 1),
                        ).where(Chunk.job_id == job_id)
                    ).one()
                    break
            if not workers.alive():
                raise RuntimeError(f"the worker exited; log: {workers.logfile}")
            if time.monotonic() - released > timeout:
                raise RuntimeError(f"job {job_id} not done after {timeout:g} s")
            time.sleep(0.25)
        done_at = time.monotonic()
    finally:
        engine.dispose()
    images = counts.done
    seconds = done_at - released
    during = int(finished_by_scan_end or 0)
    return {
        "job_id": job_id,
        "images": images,
        "labeled": counts.labeled,
        "uncertain": counts.uncertain,
        "failed": counts.failed,
        "skipped": counts.skipped,
        "chunks": int(chunks),
        "deliveries": int(deliveries),
        "chunks_delivered_more_than_once": int(redelivered),
        "seconds_from_scan_start": round(seconds, 2),
        "images_per_s": round(images / max(seconds, 1e-9), 1),
        "finished_while_scanning": during,
        "images_per_s_while_scanning": round(during / max(scan_returned - released, 1e-9), 1),
        "images_per_s_after_scan": round((images - during) / max(done_at - scan_returned, 1e-9), 1),
        "note": "seconds: from the scans' release to the job seen done (polled every 0.25 s)",
    }


def run(arguments: argparse.Namespace, base_url: str) -> dict[str, Any]:
    out: Path = arguments.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_at_start = _load()
    trees: dict[str, Path] = {}
    tree_info: dict[str, Any] = {}
    for key, count in (("a", arguments.files), ("b", arguments.files)):
        root, seconds, reused = ensure_tree(out / f"tree-{key}", count)
        trees[key] = root
        tree_info[key] = {"root": str(root), "files": count, "reused": reused,
                          "write_seconds": round(seconds, 2)}  # fmt: skip
    if arguments.label_files == arguments.files:
        trees["c"], tree_info["c"] = trees["a"], {**tree_info["a"], "note": "tree C is tree A"}
    else:
        root, seconds, reused = ensure_tree(out / "tree-c", arguments.label_files)
        trees["c"] = root
        tree_info["c"] = {"root": str(root), "files": arguments.label_files, "reused": reused,
                          "write_seconds": round(seconds, 2)}  # fmt: skip
    context = Context(arguments, out, base_url, trees)
    phases: list[dict[str, Any]] = []
    wanted = set(arguments.phases)
    if "alone" in wanted:
        phases.append(run_phase(context, "alone", {"scan-a": trees["a"]}))
    if "two" in wanted:
        phases.append(run_phase(context, "two scans", {"scan-a": trees["a"], "scan-b": trees["b"]}))
    if wanted & {"aloneC", "workers"}:
        context.model = ensure_model(out)
        print(f"model {context.model['version']} ({context.model['artifact']})", flush=True)
    if "aloneC" in wanted:
        phases.append(run_phase(context, "alone C", {"scan-c": trees["c"]}, with_model=True))
    if "workers" in wanted:
        phases.append(
            run_phase(
                context,
                f"scan+{arguments.workers} workers",
                {"scan-c": trees["c"]},
                with_model=True,
                workers=arguments.workers,
            )
        )
    _compare(phases)
    return {
        "benchmark": "concurrency",
        "command": " ".join(["python -m bench.concurrency", *sys.argv[1:]]),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": arguments.files,
        "label_files": arguments.label_files,
        "sample_seconds": arguments.sample_seconds,
        "trees": tree_info,
        "model": context.model,
        "environment": environment(arguments.redis_url, base_url, load_at_start),
        "phases": phases,
        "load_average_at_end": _load(),
    }


def _compare(phases: list[dict[str, Any]]) -> None:
    """Each scan's files/s against the last scan alone before it of the same tree, else of a
    tree of the same size and layout (tree B against tree A): `vs_alone`."""
    by_root: dict[str, float] = {}
    by_files: dict[int, float] = {}
    for phase in phases:
        if len(phase["scans"]) == 1 and "workers" not in phase:
            scan = phase["scans"][0]
            by_root[scan["root"]] = by_files[scan["files"]] = scan["files_per_s"]
        for scan in phase["scans"]:
            reference = by_root.get(scan["root"]) or by_files.get(scan["files"])
            scan["vs_alone"] = None if not reference else round(scan["files_per_s"] / reference, 3)


def environment(redis_url: str, database_url: str, load_at_start: list[float]) -> dict[str, Any]:
    import redis
    from sqlalchemy import create_engine, text

    versions: dict[str, str | None] = package_versions(
        ("sqlalchemy", "celery", "kombu", "redis", "psycopg", "tensorflow", "keras")
    )
    versions["redis_server"] = str(redis.Redis.from_url(redis_url).info("server")["redis_version"])
    engine = create_engine(_admin_url(database_url))
    with engine.connect() as connection:
        versions["postgresql"] = str(connection.execute(text("SHOW server_version")).scalar())
        shown = ("max_connections", "shared_buffers", "synchronous_commit", "deadlock_timeout")
        settings = {name: str(connection.execute(text(f"SHOW {name}")).scalar()) for name in shown}
    engine.dispose()
    return {
        "python": sys.version.split()[0],
        **machine(),
        "load_average_at_start": load_at_start,
        "versions": versions,
        "postgresql_settings": settings,
    }


def _admin_url(url: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).set(database="postgres").render_as_string(hide_password=False)


# --- the report -------------------------------------------------------------------------------


def print_table(result: dict[str, Any]) -> None:
    header = (
        f"{'phase':<17}{'scan':<8}{'files':>8}{'s':>8}{'files/s':>9}{'vs alone':>9}"
        f"{'cpu s':>7}{'lock samples':>15}{'longest ms':>11}{'waits':>6}  load before→after"
    )
    print(header)
    print("-" * len(header))
    for phase in result["phases"]:
        locks = phase["locks"]
        lock_text = f"{locks['samples_with_lock_wait']}/{locks['samples']}"
        for index, scan in enumerate(phase["scans"]):
            first = index == 0
            ratio = "-" if scan["vs_alone"] is None else f"{scan['vs_alone']:.2f}"
            print(
                f"{phase['phase'] if first else '':<17}{scan['scan']:<8}{scan['files']:>8}"
                f"{scan['seconds']:>8.1f}{scan['files_per_s']:>9.0f}{ratio:>9}"
                f"{scan['cpu_seconds']:>7.1f}"
                + (
                    f"{lock_text:>15}{locks['longest_wait_ms']:>11.1f}{locks['waits']:>6}"
                    f"  {phase['load_before']}→{phase['load_after']}"
                    if first
                    else ""
                )
            )
        if len(phase["scans"]) > 1:
            print(
                f"{'':<17}{'both':<8}{phase['files']:>8}{phase['scans_seconds']:>8.1f}"
                f"{phase['files_per_s']:>9.0f}"
            )
        labeling = phase.get("labeling")
        if labeling:
            print(
                f"{'':<17}{'workers':<8}{labeling['images']:>8}"
                f"{labeling['seconds_from_scan_start']:>8.1f}{labeling['images_per_s']:>9.0f}"
                f"  images/s ({labeling['images_per_s_while_scanning']:.0f} while the scan ran,"
                f" {labeling['images_per_s_after_scan']:.0f} after; labeled {labeling['labeled']},"
                f" uncertain {labeling['uncertain']}, failed {labeling['failed']})"
            )
    for phase in result["phases"]:
        locks = phase["locks"]
        print(
            f"\n{phase['phase']}: {locks['samples_with_lock_wait']} of {locks['samples']} samples"
            f" with a lock wait, {locks['waits']} waits, longest {locks['longest_wait_ms']} ms,"
            f" observed total {locks['observed_wait_ms_total']} ms;"
            f" deadlocks {locks['deadlocks']}; machine busy"
            f" {phase['machine_busy_share']}; poll {locks['poll_ms_mean']} ms"
            + (f"; SAMPLER ERROR {locks['sampler_error']}" if locks["sampler_error"] else "")
        )
        for part in ("locks_while_scanning", "locks_after_the_scan"):
            if part in phase:
                brief = phase[part]
                print(
                    f"  {part.replace('_', ' ')}: {brief['samples_with_lock_wait']}/"
                    f"{brief['samples']} samples, {brief['waits']} waits, longest"
                    f" {brief['longest_wait_ms']} ms, by {brief['by_application']}"
                )
        for entry in locks["statements"][:5]:
            print(
                f"  {entry['samples']:>4} samples {entry['waits']:>3} waits"
                f" longest {entry['longest_ms']:>7.1f} ms  {dict(entry['who'])}"
                f" {dict(entry['locks'])}\n      {entry['statement'][:140]}"
            )
            for blocker, count in list(entry["blocked_by"].items())[:2]:
                print(f"      blocked by ({count}): {blocker[:140]}")
        for scan in phase["scans"]:
            split = scan["split_seconds"]
            print(
                f"  {scan['scan']}: walk {split['walk']} s, publish {split['publish']} s,"
                f" database and the rest {split['database_and_rest']} s"
            )
        for entry in locks["busy_statements"][:4]:
            print(f"  busy ({entry['samples']} samples): {entry['statement'][:150]}")
        if locks["other_waits_of_busy_backends"]:
            print(f"  other waits of busy backends: {locks['other_waits_of_busy_backends']}")
    env = result["environment"]
    print(
        f"\n{describe(env)}, PostgreSQL {env['versions'].get('postgresql')},"
        f" load {env['load_average_at_start']} at start, {result['load_average_at_end']} at end"
    )


# --- main -------------------------------------------------------------------------------------

PHASES = ("alone", "two", "aloneC", "workers")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.concurrency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--files", type=int, default=100_000, help="files in trees A and B")
    parser.add_argument(
        "--label-files",
        type=int,
        default=None,
        help="files in tree C, which the workers label (default: --files, and tree C is tree A)",
    )
    parser.add_argument("--workers", type=int, default=4, help="worker pool processes")
    parser.add_argument("--out", type=Path, default=Path("runs/concurrency"))
    parser.add_argument(
        "--database-url",
        required=True,
        help="a PostgreSQL URL, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/bench_concurrency",
    )
    parser.add_argument(
        "--create-database",
        action="store_true",
        help="a fresh database <name>_<hex> on that server for each phase, dropped after it",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=PHASES,
        default=list(PHASES),
        help="which phases to run (default: all)",
    )
    parser.add_argument(
        "--sample-seconds", type=float, default=SAMPLE_SECONDS, help="the lock sampler's period"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds a phase's scans (or job) may take"
    )
    arguments = parser.parse_args(argv)
    if arguments.label_files is None:
        arguments.label_files = arguments.files
    if arguments.files < 1 or arguments.label_files < 1 or arguments.workers < 1:
        parser.error("--files, --label-files and --workers must be at least 1")
    if not arguments.database_url.startswith("postgresql"):
        parser.error("--database-url must be a PostgreSQL URL: the lock views are PostgreSQL's")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    result = run(arguments, arguments.database_url)
    from sqlalchemy import make_url

    # Never write a password into the report.
    result["database_url"] = make_url(arguments.database_url).render_as_string(hide_password=True)
    report = arguments.out.resolve() / "concurrency.json"
    report.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    # Run the copy imported under its own name: the spawned scan processes unpickle
    # `bench.concurrency.*`, which they can import, not `__main__.*`.
    from bench import concurrency

    raise SystemExit(concurrency.main())
