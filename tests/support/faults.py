"""Helpers of the fault tests (tests/integration/test_faults*.py, test_reconcile.py): the worker
settings they run with, a redis-server of a test's own, the PostgreSQL activity queries, reading
a process's state, and the `sitecustomize` folders that stop a process at the open of a file."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from core.settings import ScanSettings, Settings, WorkerSettings
from db.models import Chunk, ChunkStatus
from tests.support.services import wait_for
from tests.support.workers import SettingsFactory

# Redis hands the unacknowledged chunk of a dead worker to another after this many seconds; a
# chunk (a fresh pool process loading the model included) takes far less than the time limit.
VISIBILITY_TIMEOUT = 20
TASK_TIME_LIMIT = 15

BLOCKED = text(
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    " AND wait_event_type = 'Lock'"
)
TERMINATE = text(
    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()) AS terminated"
)

# Put on the worker's PYTHONPATH: its `sitecustomize` stops (SIGSTOP) any process that opens the
# file named by STOP_ON_OPEN, at the open, before a byte is decoded.
STOP_ON_OPEN = Path(__file__).parent / "stop_on_open"
# Put on a process's PYTHONPATH: it stops (SIGSTOP) at the first open of a file named in
# STOP_ONCE_ON_OPEN, once per name across processes (see its docstring).
STOP_ONCE_ON_OPEN = Path(__file__).parent / "stop_once_on_open"


def fault_settings(make_settings: SettingsFactory, chunk_size: int, **overrides: Any) -> Settings:
    worker = WorkerSettings(
        concurrency=1,
        decode_threads=2,
        batch_size=16,
        task_time_limit=TASK_TIME_LIMIT,
        visibility_timeout=VISIBILITY_TIMEOUT,
        max_attempts=3,
    )
    return make_settings(scan=ScanSettings(chunk_size=chunk_size), worker=worker, **overrides)


def chunk_in_progress(
    sessions: sessionmaker[Session], job_id: int, *, besides: int | None = None
) -> Chunk | None:
    """A chunk a worker has started (its delivery is counted) and not finished, other than
    chunk `besides`."""
    query = select(Chunk).where(
        Chunk.job_id == job_id, Chunk.deliveries > 0, Chunk.status != ChunkStatus.DONE
    )
    if besides is not None:
        query = query.where(Chunk.chunk_index != besides)
    with sessions() as session:
        return session.scalars(query.order_by(Chunk.chunk_index)).first()


class OwnRedis:
    """A redis-server of this test's own, on a free port, fsyncing its AOF on every write."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        executable = shutil.which("redis-server")
        assert executable, "redis-server is not on PATH"
        self.directory.mkdir(parents=True, exist_ok=True)
        arguments = [
            executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            arguments,
            stdin=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        try:
            wait_for(self._answers(client), timeout=20, what=f"redis-server on {self.url}")
        finally:
            client.close()

    def _answers(self, client: redis.Redis) -> Any:
        def ping() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.RedisError:  # refused, or still loading the AOF
                return False

        return ping

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what the AOF holds survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=20)


def process_state(pid: int) -> str | None:
    """The one-letter state of a process (`T` when stopped), or None once it is gone."""
    try:
        stat_line = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat_line.rpartition(")")[2].split()[0]
