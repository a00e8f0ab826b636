"""Issue 14's fault acceptance, the long ones: PostgreSQL stopped for three minutes mid-job, and
worker pool processes killed and `failures --retry` run while a scan of 6,000 small images
(20,000 with EMOLABEL_TEST_SCAN_IMAGES) in chunks of 4 (some of them corrupt) is still running.

Real Redis, real PostgreSQL servers and real Celery worker processes; nothing of ours is mocked.
Every interleaving an assertion depends on is made certain, not raced: the write that the
outage interrupts is held on a table lock first, and the producer and the pool processes stop
themselves (SIGSTOP, `tests/support/stop_once_on_open/sitecustomize.py`) at the open of files
the test names, so the test acts while the scan is known to be mid-way and a chunk known to be
held. Each job ends with every image in exactly one state and exactly one result per (image,
model version).
"""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image as PillowImage
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from core.settings import ScanSettings, Settings, WorkerSettings
from core.uris import path_to_uri
from db.models import Chunk, ChunkStatus, Job, JobItem, JobStatus, RefusedMessage
from db.session import make_engine, make_sessionmaker, upgrade
from emolabel.embedded import LocalWorker, worker_environment
from tests.support.archives import build_archive
from tests.support.cli import cli, cli_scan
from tests.support.faults import BLOCKED, STOP_ONCE_ON_OPEN, process_state
from tests.support.ledger import assert_balanced, counts, ledger, results_per_image, wait_for_job
from tests.support.paths import REPO
from tests.support.services import NO_POSTGRES, wait_for
from tests.support.workers import SettingsFactory, Workers, child_pids, worker_log, worker_log_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPLIT = re.compile(r"WARNING/.*: a process died in this chunk \d+ time\(s\): split")


def splits(settings: Settings) -> int:
    """How many times the worker split a chunk (its log line; the task's result repeats it)."""
    return len(SPLIT.findall(worker_log_text(settings)))


def stop_once_environment(names: list[str], markers: Path) -> dict[str, str]:
    markers.mkdir(parents=True, exist_ok=True)
    python_path = [str(STOP_ONCE_ON_OPEN), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, python_path)),
        "STOP_ONCE_ON_OPEN": os.pathsep.join(names),
        "STOP_ONCE_MARKERS": str(markers),
    }


# --- (e) PostgreSQL stopped for three minutes --------------------------------------------------


def _postgres_bindir() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else the newest Debian/Ubuntu install."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    installed = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
    )
    return installed[-1].parent if installed else None


class PrivatePostgres:
    """A PostgreSQL server of this test's own, on a free port, that the test may stop.

    The shared server is never touched. initdb and the server refuse to run as root, so as root
    they run as the `postgres` user in a folder it owns (outside pytest's tmp_path, which root
    keeps private).
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="emolabel-pg-"))
        self.data = self.folder / "data"
        self.as_owner: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *arguments: str) -> None:
        done = subprocess.run(
            [*self.as_owner, str(self.bindir / program), *arguments],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"{program} {' '.join(arguments)}: {done.stderr}{done.stdout}"

    def initialize(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--locale", "C", "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        """`pg_ctl stop -m fast`: every session is ended, its transaction rolled back."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            if self.running():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if NO_POSTGRES:
        pytest.skip("EMOLABEL_TEST_NO_POSTGRES=1")
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("initdb and pg_ctl are not installed: no private PostgreSQL server to stop")
    server = PrivatePostgres(bindir)
    try:
        server.initialize()
        server.start()
        yield server
    finally:
        server.destroy()


# A real outage on the clock, longer than the worker's backoff cap (60 s), so a chunk's retries
# reach the cap (after 1+2+...+32 = 63 s) and keep going: 100 s by default;
# EMOLABEL_TEST_OUTAGE_SECONDS=180 is the three minutes (the test then takes four).
OUTAGE_SECONDS = int(os.environ.get("EMOLABEL_TEST_OUTAGE_SECONDS", "100"))
BACKOFF_CAP = "retry in 60s"


# The fixture's own ledger (SQLite, cheap) is left unused: the private server's replaces it.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True, ids=["private-postgresql"])
def test_postgresql_stopped_for_three_minutes_mid_job_loses_and_repeats_nothing(
    private_postgres: PrivatePostgres,  # first, so that it is torn down after the worker
    make_settings: SettingsFactory,
    workers: Workers,
    tmp_path: Path,
) -> None:
    upgrade(private_postgres.url)
    engine = make_engine(private_postgres.url)
    sessions = make_sessionmaker(engine)
    try:
        archive = build_archive(tmp_path / "archive", 24)
        # Production's visibility timeout (longer than the 60 s backoff cap): a retry waiting
        # for its countdown is not handed out a second time meanwhile.
        settings = make_settings(
            database_url=private_postgres.url,
            scan=ScanSettings(chunk_size=4),
            worker=WorkerSettings(concurrency=1, decode_threads=2, batch_size=16, max_attempts=3),
        )
        job_id = cli_scan(settings, str(archive.root))  # the whole job is queued: 6 chunks
        local = _stop_the_server_inside_a_write(private_postgres, workers, settings)

        time.sleep(OUTAGE_SECONDS)
        assert local.process.poll() is None, worker_log(settings)
        private_postgres.start()

        # Backoff is capped at 60 s: every chunk is tried again within a minute of the restart.
        balance = wait_for_job(sessions, job_id, settings, timeout=60 + 600)
        assert_balanced(balance)
        assert balance.labeled == balance.enqueued == len(archive.generated)
        assert results_per_image(sessions) == dict.fromkeys(archive.generated, 1)
        with sessions() as session:
            chunks = session.scalars(select(Chunk).where(Chunk.job_id == job_id)).all()
        assert {chunk.status for chunk in chunks} == {ChunkStatus.DONE}
        # Retries are not deaths: nothing was counted against a chunk, nothing split.
        assert [chunk.crashes for chunk in chunks] == [0] * len(chunks)
        assert local.process.poll() is None, "the worker should have waited, not exited"
        log = worker_log_text(settings)
        assert BACKOFF_CAP in log, worker_log(settings)
        assert "WorkerLostError" not in log and splits(settings) == 0, worker_log(settings)
    finally:
        engine.dispose()


def _stop_the_server_inside_a_write(
    server: PrivatePostgres, workers: Workers, settings: Settings
) -> LocalWorker:
    """Start the worker with the results table locked, and stop the server once the worker's
    write of its first chunk waits on that lock: the outage hits a chunk mid-transaction."""
    locker_engine = create_engine(server.url, poolclass=NullPool)
    locker = locker_engine.connect()
    try:
        locker.execute(text("LOCK TABLE results IN EXCLUSIVE MODE"))
        local = workers.start(settings)

        def blocked() -> int:
            # pg_stat_activity is read once per transaction unless the snapshot is dropped.
            locker.execute(text("SELECT pg_stat_clear_snapshot()"))
            return int(locker.execute(BLOCKED).scalar() or 0)

        wait_for(blocked, timeout=60, interval=0.05, what="a worker waiting inside its write")
        server.stop()  # ends the locker's session too
    finally:
        with contextlib.suppress(DBAPIError):  # its session ended with the server
            locker.close()
        locker_engine.dispose()
    return local


# --- (f) pool processes killed and failures retried while a 6,000-image scan runs --------------

# Issue 14 reproduced its lost images with 60,000 files; what the test needs is a scan still
# running, with hundreds of chunks published, while chunks split and failures are retried.
# CI scans 6,000; EMOLABEL_TEST_SCAN_IMAGES=20000 runs the issue's own size (a multiple of 2,000).
IMAGES = int(os.environ.get("EMOLABEL_TEST_SCAN_IMAGES", "6000"))
FILES_PER_FOLDER = 500
CORRUPT_EVERY = 100  # 1 %: a truncated JPEG
# The producer stops at the open of this file, a quarter through the listing: between two
# batches of 500 (the scan's batch_files below), so with no transaction open and a quarter of
# the chunks (375 of 1,500 at 6,000 images) already published.
GATE_INDEX = IMAGES // 4 // FILES_PER_FOLDER * FILES_PER_FOLDER
# A pool process stops at the first open of each of these (in the scan's chunks 10 and 100,
# both published before the gate) and is killed there, holding that chunk.
TRAP_INDICES = (40, 400)


@dataclass
class SmallArchive:
    """Generated files, by URI, and the names of the files the processes stop at."""

    root: Path
    labeled: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    gate: str = ""
    traps: list[str] = field(default_factory=list)


def _encoded(image: PillowImage.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


def write_small_archive(root: Path, total: int) -> SmallArchive:
    """`total` files of about a kilobyte: a few encoded images copied under unique names in
    folders of 500, every hundredth a truncated JPEG. Under a second for 6,000."""
    gradient = PillowImage.linear_gradient("L")
    valid: list[tuple[str, bytes]] = []
    for turn in range(3):
        pixels = gradient.rotate(90 * turn).resize((64, 56)).convert("RGB")
        valid += [("jpg", _encoded(pixels, "JPEG")), ("png", _encoded(pixels, "PNG"))]
    jpeg = _encoded(PillowImage.effect_noise((64, 56), 40).convert("RGB"), "JPEG")
    truncated = jpeg[: len(jpeg) // 2]
    archive = SmallArchive(root)
    for index in range(total):
        folder = root / f"part-{index // FILES_PER_FOLDER:02d}"
        if index % FILES_PER_FOLDER == 0:
            folder.mkdir(parents=True)
        # A suffix keeps the listing's order (bytewise, "-" sorts before the next digit).
        suffix = "-gate" if index == GATE_INDEX else "-trap" if index in TRAP_INDICES else ""
        if index % CORRUPT_EVERY == CORRUPT_EVERY // 2:
            extension, content = "jpg", truncated
        else:
            extension, content = valid[index % len(valid)]
        path = folder / f"{index:05d}{suffix}.{extension}"
        path.write_bytes(content)
        uri = path_to_uri(path)
        (archive.corrupt if content is truncated else archive.labeled).append(uri)
        if suffix == "-gate":
            archive.gate = path.name
        elif suffix:
            archive.traps.append(path.name)
    return archive


class StoppedChildKiller(threading.Thread):
    """SIGKILLs every pool process of a worker that has stopped itself (at a trap's first
    open, holding that chunk): a crash in the middle of a chunk, whatever the machine's speed."""

    def __init__(self, worker_pid: int) -> None:
        super().__init__(daemon=True)
        self.worker_pid = worker_pid
        self.killed: list[int] = []
        self.finished = threading.Event()

    def run(self) -> None:
        while not self.finished.wait(0.02):
            for child in child_pids(self.worker_pid):
                if process_state(child) == "T":
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                    self.killed.append(child)


def held_at_gate(producer: int) -> int | None:
    """The stopped process of a scan: the scan's own, or its reading process's."""
    for pid in (producer, *child_pids(producer)):
        if process_state(pid) == "T":
            return pid
    return None


def start_scan(
    settings: Settings, source: Path, extra_env: dict[str, str], output: Path
) -> subprocess.Popen[bytes]:
    """`emolabel scan SOURCE` in the background, its output to a file (never a full pipe)."""
    environment = {"TF_CPP_MIN_LOG_LEVEL": "3", **worker_environment(settings, extra_env)}
    with output.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "emolabel", "scan", str(source)],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=REPO,
        )


def job_status(sessions: sessionmaker[Session], job_id: int) -> JobStatus:
    with sessions() as session:
        return JobStatus(session.scalars(select(Job.status).where(Job.id == job_id)).one())


def next_chunk_index(sessions: sessionmaker[Session], job_id: int) -> int:
    with sessions() as session:
        return int(session.scalars(select(Job.next_chunk_index).where(Job.id == job_id)).one())


def only_job(sessions: sessionmaker[Session]) -> int | None:
    with sessions() as session:
        return session.scalars(select(Job.id)).one_or_none()


@pytest.mark.timeout(4200)  # the waits below add up to 70 minutes; a hang still ends
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_killed_children_and_failures_retry_during_a_6000_image_scan_lose_nothing(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
) -> None:
    archive = write_small_archive(tmp_path / "archive", IMAGES)
    # The worker starts before the scan registers the model, so its first chunks load it: tens
    # of seconds on a loaded machine, and the time limit must not take that for a crash.
    settings = make_settings(
        # Batches of 500 files: the gate (file 1,500) falls between two batches.
        scan=ScanSettings(chunk_size=4, batch_files=500),
        worker=WorkerSettings(
            concurrency=2,
            decode_threads=2,
            batch_size=16,
            task_time_limit=300,
            visibility_timeout=600,
            max_attempts=3,
        ),
    )
    traps = stop_once_environment(archive.traps, tmp_path / "stopped-workers")
    local = workers.start(settings, concurrency=2, extra_env=traps)
    killer = StoppedChildKiller(local.pid)
    killer.start()
    output = tmp_path / "scan.out"
    gate = stop_once_environment([archive.gate], tmp_path / "stopped-producer")
    producer = start_scan(settings, archive.root, gate, output)
    try:
        job_id = wait_for(lambda: only_job(sessions), timeout=600, what="the scan's job")
        # The scan's own process, or its reading process (`EMOLABEL_SCAN__READER=process`, the
        # default), is the one that opens the gate and stops.
        wait_for(
            lambda: held_at_gate(producer.pid) is not None or producer.poll() is not None,
            timeout=600,
            what="the producer to reach the gate",
        )
        assert producer.poll() is None, output.read_text(errors="replace")
        held = held_at_gate(producer.pid)
        assert held is not None
        assert job_status(sessions, job_id) is JobStatus.SCANNING

        # While the scan is held mid-way: a pool process killed holding each trap's chunk, and
        # each chunk split on its next delivery (new numbers from the job row) ...
        wait_for(
            lambda: (
                len(killer.killed) >= len(archive.traps) and splits(settings) >= len(archive.traps)
            ),
            timeout=600,
            what="both trap chunks killed and split",
        )
        # ... corrupt files failed, and `failures --retry` puts them in new chunks.
        wait_for(lambda: counts(sessions, job_id).failed >= 3, timeout=600, what="failures")
        done = cli(settings, "failures", "--retry", "--job", str(job_id))
        match = re.search(r"(\d+) failed images enqueued again", done.stdout)
        assert match and int(match[1]) >= 3, done.stdout
        assert job_status(sessions, job_id) is JobStatus.SCANNING  # still the scan's job
        numbered_while_held = next_chunk_index(sessions, job_id)

        os.kill(held, signal.SIGCONT)
        # Bounds on waits are there to end a hung test, not to time the scan: a loaded CI machine
        # took over 300 s for the rest of a 20,000-image scan.
        assert producer.wait(timeout=1800) == 0, output.read_text(errors="replace")
    finally:
        for pid in child_pids(producer.pid):  # a reader held at the gate would outlive it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if producer.poll() is None:
            producer.kill()  # SIGKILL ends a stopped process too
            producer.wait(timeout=30)
        killer.finished.set()
        killer.join(timeout=10)

    balance = wait_for_job(sessions, job_id, settings, timeout=1800)
    assert_balanced(balance)
    assert (balance.enqueued, balance.skipped) == (IMAGES, 0)
    assert (balance.labeled, balance.failed) == (len(archive.labeled), len(archive.corrupt))
    rows = ledger(sessions, job_id)
    assert {
        uri: (row.state, row.reason) for uri, row in rows.items() if uri in archive.corrupt
    } == dict.fromkeys(archive.corrupt, ("failed", "corrupt"))
    assert results_per_image(sessions) == dict.fromkeys(archive.labeled, 1)

    with sessions() as session:
        numbered = int(session.scalars(select(Job.next_chunk_index).where(Job.id == job_id)).one())
        chunks = session.execute(
            select(Chunk.chunk_index, Chunk.status, Chunk.crashes).where(Chunk.job_id == job_id)
        ).all()
        homeless = session.scalar(
            select(func.count())
            .select_from(JobItem)
            .outerjoin(
                Chunk,
                (Chunk.job_id == JobItem.job_id) & (Chunk.chunk_index == JobItem.chunk_index),
            )
            .where(JobItem.job_id == job_id, Chunk.chunk_index.is_(None))
        )
        refused = session.scalar(select(func.count()).select_from(RefusedMessage))
    # Every number the job row handed out (scan, splits, retry) names one recorded chunk, done.
    assert sorted(index for index, _, _ in chunks) == list(range(numbered))
    assert {status for _, status, _ in chunks} == {ChunkStatus.DONE}
    assert homeless == 0 and refused == 0
    # The scan went on numbering after the splits and the retry had taken theirs.
    assert numbered > numbered_while_held
    # Exactly the two kills were counted, against the two chunks, each split once.
    assert len(killer.killed) == len(archive.traps)
    assert sorted(crashes for _, _, crashes in chunks if crashes) == [1] * len(archive.traps)
    assert splits(settings) == len(archive.traps)
    assert local.process.poll() is None, worker_log(settings)
