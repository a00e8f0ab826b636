"""Phase (d)'s set-up: the product end to end on a fresh EMOLABEL_HOME.

`end_to_end` starts the embedded Redis, migrates an SQLite ledger, registers the benchmark model
active and starts a real Celery worker, waits until every pool process has its model ready and
labels a small warm-up job; `EndToEnd.measure` then times one job per set (bench.throughput.job),
and `EndToEnd.paused` stops the worker while the other phases run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.throughput.corpus import ImageSet
from bench.throughput.job import POLL_SECONDS, run_job, worker_stage_seconds
from bench.throughput.measuring import WorkerMemory
from core.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from core.settings import Settings
    from emolabel.embedded import LocalWorker

WARM_UP_IMAGES = 4


@dataclass
class EndToEnd:
    """A warmed worker on a fresh home, Redis and database; `measure` runs (d) on one set."""

    settings: Settings
    sessions: sessionmaker[Session]
    worker: LocalWorker
    version: str
    timeout: float
    result: dict[str, Any]

    @contextlib.contextmanager
    def paused(self) -> Iterator[dict[str, float]]:
        """Stop the worker's processes (SIGSTOP) for the block, so an idle worker takes nothing.

        An idle Celery worker still wakes for its event loop, heartbeats and metrics: 0.3-2.4% of
        a core on this machine, taken from whatever (b), (c) or (c') measured beside it. The dict
        yielded is filled on exit with the block's seconds and the worker's CPU seconds in it:
        nothing, unless pausing failed.
        """
        memory = WorkerMemory(self.worker.pid)
        main, pool = memory.processes()
        spent: dict[str, float] = {}
        cpu, started = memory.cpu_seconds(), time.perf_counter()
        stopped: list[int] = []
        try:
            for pid in (main, *pool):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            yield spent
        finally:
            for pid in reversed(stopped):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            spent["seconds"] = round(time.perf_counter() - started, 2)
            spent["worker_cpu_seconds"] = round(memory.cpu_seconds() - cpu, 3)

    def measure(self, image_set: ImageSet, *, force: bool) -> dict[str, Any]:
        measured = run_job(
            self.settings, self.sessions, self.worker, image_set.root,
            expected=len(image_set.paths), model_version=self.version, timeout=self.timeout,
            force=force,
        )  # fmt: skip
        stages = worker_stage_seconds(self.worker.logfile, measured["job_id"])
        if "task_seconds" in stages:
            # Chunk N's write and ack, the next message's fetch: the model sits idle. Summed over
            # the pool processes, as task_seconds is (wall time alone went negative with two).
            processes = self.result["worker"]["concurrency"]
            stages["outside_tasks_seconds"] = round(
                processes * measured["seconds"] - stages["task_seconds"], 2
            )
        measured["worker_stages"] = stages
        measured["relabel"] = force
        return measured


@contextlib.contextmanager
def end_to_end(
    sets: Sequence[ImageSet],
    *,
    run_dir: Path,
    artifact_dir: Path,
    arguments: argparse.Namespace,
) -> Iterator[EndToEnd]:
    """Start Redis, a database and a worker for (d), and label a small warm-up job first."""
    from core.settings import FaceSettings, ScanSettings, Settings, WorkerSettings
    from db.session import make_engine, make_sessionmaker, upgrade
    from emolabel.embedded import MAX_SOCKET_PATH_BYTES, ensure_redis, start_local_worker
    from training.registry import register_artifact

    home = run_dir / "home"
    short_home = None
    if len(os.fsencode(home.resolve() / "redis.sock")) > MAX_SOCKET_PATH_BYTES:
        # A deep --out (pytest's folders under xdist) leaves no room for the unix socket's path.
        home = short_home = Path(tempfile.mkdtemp(prefix="emolabel-bench-"))
    settings = Settings(
        home=home,
        models_dir=artifact_dir.parent.parent,
        model_name=artifact_dir.parent.name,  # MODEL_NAME, or the face workload's model
        database_url=None,
        broker_url=None,
        worker=WorkerSettings(
            concurrency=arguments.layout.processes,
            batch_size=arguments.batch_size,
            decode_threads=arguments.layout.decode_threads,
            model_threads=arguments.layout.model_threads,
            precision=arguments.precision,
        ),
        scan=ScanSettings(chunk_size=arguments.chunk_size, chunk_bytes=arguments.chunk_bytes),
        faces=FaceSettings(detect_side=getattr(arguments, "detect_side", 1280)),
    )
    redis_server = ensure_redis(settings)
    result: dict[str, Any] = {
        "home": str(home.resolve()),
        "broker": "embedded redis-server (unix socket, appendonly everysec)",
        "database": "SQLite (WAL) in home",
        "worker": {
            "concurrency": arguments.layout.processes,
            "model_threads": arguments.layout.model_threads,
            "precision": arguments.precision,
            "batch_size": arguments.batch_size,
            "decode_threads": arguments.layout.decode_threads,
            "chunk_size": arguments.chunk_size,
            "chunk_bytes": arguments.chunk_bytes,
        },
        "redis_server": _redis_version(redis_server.url),
    }
    engine = make_engine(settings.effective_database_url)
    try:
        upgrade(settings.effective_database_url)
        sessions = make_sessionmaker(engine)
        with sessions.begin() as session:
            version = register_artifact(
                session=session, directory=artifact_dir, activate=True
            ).version
        started = time.perf_counter()
        with start_local_worker(
            settings, concurrency=arguments.layout.processes, timeout=arguments.timeout
        ) as worker:
            result["worker_start_seconds"] = round(time.perf_counter() - started, 2)
            warm_root = _warm_up_folder(home / "warm-up", sets)
            warm = run_job(
                settings, sessions, worker, warm_root,
                expected=_count_files(warm_root), model_version=version, timeout=arguments.timeout,
            )  # fmt: skip
            ready = _wait_for_ready_children(
                worker.logfile, version, arguments.layout.processes, arguments.timeout
            )
            if getattr(arguments, "workload", "images") == "faces":
                # A face model's processes also load and trace the detector before they are
                # ready (preloaded after the model): none of it may fall in a timed job.
                result["detector_ready"] = _wait_for_lines(
                    worker.logfile, _DETECTOR_READY, arguments.layout.processes, arguments.timeout
                )
            result["warm_up"] = {
                "images": warm["images"],
                "seconds": warm["seconds"],
                "model_ready": ready,
                "note": "model load and tracing in every pool process; not part of any figure",
            }
            yield EndToEnd(settings, sessions, worker, version, arguments.timeout, result)
    finally:
        engine.dispose()
        redis_server.stop()
        if short_home is not None:
            shutil.rmtree(short_home, ignore_errors=True)


def _wait_for_ready_children(
    logfile: Path, version: str, processes: int, timeout: float
) -> list[dict[str, Any]]:
    """Wait until every pool process has logged its model ready (loaded, traced, run once)."""
    ready = rf"model {re.escape(version)} ready in ([0-9.]+) s \((\d+) model threads, (\w+)\)"
    pattern = re.compile(ready)
    deadline = time.monotonic() + timeout
    while True:
        seconds = [
            {
                "seconds": float(match.group(1)),
                "model_threads": int(match.group(2)),
                "precision": match.group(3),
            }
            for match in pattern.finditer(logfile.read_text(errors="replace"))
        ]
        if len(seconds) >= processes:
            return seconds
        if time.monotonic() > deadline:
            raise ConfigError(f"only {len(seconds)} of {processes} worker processes loaded a model")
        time.sleep(POLL_SECONDS)


_DETECTOR_READY = re.compile(r"face detector ready in ([0-9.]+) s")


def _wait_for_lines(
    logfile: Path, pattern: re.Pattern[str], count: int, timeout: float
) -> list[float]:
    """Wait until the worker's log holds `count` lines matching `pattern`; their seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = [float(m.group(1)) for m in pattern.finditer(logfile.read_text(errors="replace"))]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise ConfigError(f"only {len(found)} of {count} worker processes logged {pattern}")
        time.sleep(POLL_SECONDS)


def faces_in_ledger(
    sessions: sessionmaker[Session], paths: Sequence[Path], version: str
) -> dict[str, list[tuple[float, float, float, float]]]:
    """The face boxes the ledger holds for these files and model version, by str(path)."""
    from sqlalchemy import select

    from core.uris import path_to_uri
    from db.models import Face, Image

    by_uri = {path_to_uri(path): str(path) for path in paths}
    found: dict[str, list[tuple[float, float, float, float]]] = {
        text: [] for text in by_uri.values()
    }
    query = (
        select(Image.uri, Face.x, Face.y, Face.width, Face.height)
        .join(Face, Face.image_id == Image.id)
        .where(Face.model_version == version)
    )
    with sessions() as session:
        for uri, x, y, width, height in session.execute(query):
            if uri in by_uri:
                found[by_uri[uri]].append((float(x), float(y), float(width), float(height)))
    return found


def _warm_up_folder(folder: Path, sets: Sequence[ImageSet]) -> Path:
    """Copies of the first few images of each set: the warm-up job must not label timed files."""
    for image_set in sets:
        for index, path in enumerate(image_set.paths[:WARM_UP_IMAGES]):
            target = folder / image_set.name / f"{index:02d}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return folder


def _redis_version(url: str) -> str | None:
    import redis

    from emolabel.embedded import _redis_py_url

    client = redis.Redis.from_url(_redis_py_url(url))
    try:
        return str(client.info("server")["redis_version"])
    except redis.RedisError:
        return None
    finally:
        client.close()


def _count_files(folder: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))
