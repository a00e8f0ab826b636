"""Phase (d)'s measurement of one job: from the first publish to the job's finished_at.

`run_job` scans a folder with the real producer while `JobWatch` polls the job's row and counts
and samples the worker's RSS; `worker_stage_seconds` sums the per-chunk stage seconds the worker
logged for the job.
"""

from __future__ import annotations

import ast
import datetime as dt
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.throughput.measuring import (
    WorkerMemory,
    cpu_by_command,
    idle_by_part,
    load_average,
    machine_cpu,
    machine_cpu_split,
    own_cpu_seconds,
    thread_cpu_spent,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from core.settings import Settings
    from emolabel.embedded import LocalWorker

# Services whose CPU (d) reports apart from "other" (the embedded Redis; PostgreSQL if used).
SERVICE_COMMANDS = ("redis-server", "postgres")
SAMPLE_SECONDS = 0.5
# (d)'s time comes from the job's finished_at, so the poll only decides how soon the harness
# notices the end; each poll costs the cores it measures a millisecond or two of CPU.
POLL_SECONDS = 0.25
# The job's counts (a GROUP BY over its ledger) are read this often, for the 10% and 50% marks;
# every POLL_SECONDS only the job's row is: the harness must not take the worker's CPU.
COUNT_SECONDS = 0.5


@dataclass
class Checkpoint:
    """Worker RSS when the job first reached `percent` of the images."""

    percent: int
    done: int
    seconds: float
    rss_mib: float
    main_rss_mib: float
    pool_rss_mib: float


class JobWatch:
    """Times a job from its first publish until nothing is pending; samples worker RSS meanwhile.

    `publisher()` wraps the real publisher to note the first publish; the scan runs in the
    calling thread while a thread reads the job's row every POLL_SECONDS, its counts every
    COUNT_SECONDS and the worker's RSS every SAMPLE_SECONDS. The job is over when its row says
    done: the worker sets that, with `finished_at`, in the transaction that commits the last
    outcome, and never while the scan runs (the job is `scanning` until then). The time is taken
    from `finished_at`, so the polling interval does not add to it.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        worker: LocalWorker,
        memory: WorkerMemory,
        expected: int,
        timeout: float,
    ) -> None:
        self.sessions = sessions
        self.worker = worker
        self.memory = memory
        self.expected = expected
        self.timeout = timeout
        self.job_id: int | None = None
        self.first_publish: float | None = None
        self.first_publish_utc: dt.datetime | None = None
        self.finished: float | None = None
        self.finished_utc: dt.datetime | None = None
        self.checkpoints: list[Checkpoint] = []
        # (seconds since the first publish, the machine's idle CPU seconds so far), every poll.
        self.idle_samples: list[tuple[float, float]] = []
        self.error: BaseException | str | None = None
        self.counts: Any = None
        self._published = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)

    def publisher(self, publish: Callable[[int, int, list[str]], str]) -> Any:
        def first_noted(job_id: int, chunk_index: int, uris: list[str]) -> str:
            if self.first_publish is None:
                self.job_id = job_id
                self.first_publish = time.perf_counter()
                self.first_publish_utc = dt.datetime.now(dt.UTC)
                self._published.set()
            return publish(job_id, chunk_index, uris)

        return first_noted

    def start(self) -> None:
        self._thread.start()

    def scan_returned(self) -> None:
        self._published.set()  # a scan that published nothing must not leave the thread waiting

    def wait(self) -> None:
        self._thread.join()
        if isinstance(self.error, BaseException):
            raise self.error
        if self.error is not None:
            raise RuntimeError(self.error)

    def _run(self) -> None:
        try:
            self._watch()
        except BaseException as error:  # re-raised in the calling thread by wait()
            self.error = error

    def _watch(self) -> None:
        from sqlalchemy import select

        from db.models import Job, JobStatus
        from db.repository import job_counts

        self._published.wait()
        if self.first_publish is None or self.job_id is None:
            return
        next_sample = next_count = 0.0
        counts = None
        while True:
            now = time.perf_counter()
            machine = machine_cpu()
            self.idle_samples.append(
                (now - self.first_publish, machine.get("idle", 0.0) + machine.get("iowait", 0.0))
            )
            if now >= next_sample:
                main, pool = self.memory.rss()
                self.memory.samples.append(
                    (round(now - self.first_publish, 2), round(main + pool, 1))
                )
                next_sample = now + SAMPLE_SECONDS
            with self.sessions() as session:
                status, finished_at = session.execute(
                    select(Job.status, Job.finished_at).where(Job.id == self.job_id)
                ).one()
                if status is JobStatus.DONE or now >= next_count:
                    counts = job_counts(session=session, job_id=self.job_id)
                    next_count = now + COUNT_SECONDS
            done = counts.done if counts is not None else 0
            for percent in (10, 50):
                reached = {point.percent for point in self.checkpoints}
                if percent not in reached and done * 100 >= percent * self.expected:
                    self._checkpoint(percent, done)
            if status is JobStatus.DONE and finished_at is not None:
                self.finished = time.perf_counter()
                self.finished_utc = _as_utc(finished_at)
                self.counts = counts
                self._checkpoint(100, done)
                return
            if self.worker.process.poll() is not None:
                self.error = f"the worker exited with status {self.worker.process.poll()}"
                return
            if now - self.first_publish > self.timeout:
                self.error = f"job {self.job_id} not done after {self.timeout:g} s: {counts}"
                return
            time.sleep(POLL_SECONDS)

    def _checkpoint(self, percent: int, done: int) -> None:
        assert self.first_publish is not None
        main, pool = self.memory.rss()
        self.checkpoints.append(
            Checkpoint(
                percent=percent,
                done=done,
                seconds=round(time.perf_counter() - self.first_publish, 2),
                rss_mib=round(main + pool, 1),
                main_rss_mib=round(main, 1),
                pool_rss_mib=round(pool, 1),
            )
        )


def run_job(
    settings: Settings,
    sessions: sessionmaker[Session],
    worker: LocalWorker,
    root: Path,
    *,
    expected: int,
    model_version: str,
    timeout: float,
    force: bool = False,
) -> dict[str, Any]:
    """Scan `root` with the real producer and wait until the worker has labeled all of it.

    `force` relabels images the active model labeled already (a later round on the same set).
    """
    from core.publishing import celery_publisher
    from core.storage.sources import open_source
    from producer.enqueue import run_scan
    from worker.celery_app import make_celery

    app = make_celery(settings)
    memory = WorkerMemory(worker.pid)
    watch = JobWatch(sessions, worker, memory, expected, timeout)
    source = open_source(
        str(root),
        max_file_bytes=settings.limits.max_file_bytes,
        follow_symlinks=settings.scan.follow_symlinks,
    )
    before_reset = memory.peaks()["total_vm_hwm_mib"]
    peaks_reset = memory.reset_peaks()
    result: dict[str, Any] = {"phase": "emolabel", "load_before": load_average()}
    worker_cpu, own_cpu = memory.cpu_seconds(), own_cpu_seconds()
    threads_before = memory.thread_cpu()
    machine_before, services_before = machine_cpu(), cpu_by_command(SERVICE_COMMANDS)
    watch.start()
    try:
        summary = run_scan(
            source,
            sessions=sessions,
            publish=watch.publisher(celery_publisher(app, settings.queue)),
            chunk_size=settings.scan.chunk_size,
            chunk_bytes=settings.scan.chunk_bytes,
            batch_files=settings.scan.batch_files,
            model_version=model_version,
            force=force,
        )
    finally:
        watch.scan_returned()
    scan_cpu = own_cpu_seconds() - own_cpu  # the scan's, and the watcher's while it ran
    try:
        watch.wait()
    finally:
        app.close()
    if watch.first_publish is None or watch.finished is None or watch.counts is None:
        raise RuntimeError(f"job {summary.job_id} published nothing: {summary}")
    # From the first publish to the commit of the last outcome (the job row's finished_at).
    seconds = (
        (watch.finished_utc - watch.first_publish_utc).total_seconds()
        if watch.finished_utc is not None and watch.first_publish_utc is not None
        else watch.finished - watch.first_publish
    )
    worker_cpu_used = memory.cpu_seconds() - worker_cpu
    bench_cpu_used = own_cpu_seconds() - own_cpu
    services_after = cpu_by_command(SERVICE_COMMANDS)
    machine = machine_cpu_split(
        machine_before,
        machine_cpu(),
        worker=worker_cpu_used,
        bench=bench_cpu_used,
        services={name: services_after[name] - services_before[name] for name in services_after},
    )
    threads = thread_cpu_spent(threads_before, memory.thread_cpu())
    counts = watch.counts
    images = counts.done  # labeled, uncertain, no_face (a face model's outcome) or failed
    result.update(
        {
            "job_id": summary.job_id,
            "images": images,
            "labeled": counts.labeled,
            "no_face": counts.no_face,
            "failed": counts.failed,
            "skipped": counts.skipped,
            "chunks": summary.chunks,
            "seconds": round(seconds, 3),
            "images_per_s": round(images / max(seconds, 1e-9), 2),
            "seconds_polled": round(watch.finished - watch.first_publish, 3),
            "scan_seconds": round(summary.seconds, 3),
            "worker_cpu_seconds": round(worker_cpu_used, 2),
            "cpu_ms_per_image": round(1000 * worker_cpu_used / max(1, images), 3),
            "bench_cpu_seconds": round(bench_cpu_used, 2),
            "bench_cpu_seconds_until_scan_returned": round(scan_cpu, 2),
            # The whole machine from just before the scan to just after the job finished.
            "machine_cpu_seconds": machine,
            "machine_idle_share": idle_by_part(watch.idle_samples, seconds, os.cpu_count() or 1),
            "worker_cpu_by_thread": threads,
            "load_after": load_average(),
            "memory": {
                "peaks_reset_at_start": peaks_reset,
                # The worker's whole life so far: start, model load, warm-up, earlier jobs.
                "total_vm_hwm_mib_before_reset": before_reset,
                **memory.peaks(),
                "checkpoints": [asdict(point) for point in watch.checkpoints],
                "growth_10_to_100_mib": _growth(watch.checkpoints),
                "samples": memory.samples,
            },
        }
    )
    return result


def _as_utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment  # SQLite: naive UTC


def _growth(points: Sequence[Checkpoint]) -> float | None:
    if len(points) < 2:
        return None
    return round(points[-1].rss_mib - points[0].rss_mib, 1)


_TASK_LINE = re.compile(r"Task \S+\[[^\]]+\] succeeded in ([0-9.e+-]+)s: (\{.*\})\s*$")


def worker_stage_seconds(logfile: Path, job_id: int) -> dict[str, Any]:
    """Sum the per-chunk reports the worker logged for `job_id` (decode is thread-seconds)."""
    totals: dict[str, float] = {}
    chunks = 0
    task_seconds = 0.0
    try:
        lines = logfile.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        match = _TASK_LINE.search(line)
        if match is None:
            continue
        try:
            report = ast.literal_eval(match.group(2))
        except (ValueError, SyntaxError):
            continue
        if not isinstance(report, dict) or report.get("job_id") != job_id:
            continue
        chunks += 1
        task_seconds += float(match.group(1))
        for stage, seconds in (report.get("stage_seconds") or {}).items():
            totals[stage] = totals.get(stage, 0.0) + float(seconds)
    return {
        "chunks": chunks,
        "task_seconds": round(task_seconds, 2),
        **{stage: round(value, 2) for stage, value in totals.items()},
    }
