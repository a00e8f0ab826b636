"""End-to-end fixtures: real Redis, real SQLite and PostgreSQL ledgers, real worker processes.

Nothing of ours is mocked and `task_always_eager` is never used: the tests run the `emolabel`
command line in subprocesses, start `celery -A worker worker` through
`emolabel.embedded.start_local_worker` with the environment built from the test's `Settings`, and
read the ledger back with SQLAlchemy. Every wait is bounded.

Services: Redis at EMOLABEL_TEST_REDIS_URL (default the local one, database 15; every test has a
queue of its own) and the PostgreSQL server of tests/test_db.py (a fresh database per test,
dropped at the end of the session). The tiny model of tests/conftest.py labels everything.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image as PillowImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import LimitSettings, ScanSettings, Settings, WorkerSettings
from core.uris import path_to_uri
from db.models import Image, Job, JobItem, JobStatus, Result
from db.repository import JobCounts, job_counts
from db.session import make_engine, make_sessionmaker, upgrade
from emolabel.embedded import LocalWorker, start_local_worker, worker_environment
from tests.conftest import run_cli
from tests.images import bomb_png
from tests.services import TEST_REDIS_URL
from tests.test_db import PostgresServer
from training.sample_data import generate_sample_data
from training.train import TrainOutcome

MiB = 1024 * 1024
CLASSES = ("happy", "sad")
# Seconds: a job of a few dozen small images takes well under this on two cores.
JOB_TIMEOUT = 180.0

BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgresql", id="postgresql")]


# --- services --------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, postgres: PostgresServer, tmp_path: Path) -> str:
    """A fresh ledger migrated to head; `@pytest.mark.parametrize(..., indirect=True)` narrows."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = postgres.create_database()
    upgrade(url)
    return url


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


# --- settings and workers --------------------------------------------------------------------

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(
    tmp_path: Path,
    models_dir: Path,
    tiny_model: TrainOutcome,
    database_url: str,
    queue: str,
) -> SettingsFactory:
    """Settings for this test's ledger, queue and tiny model; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "home": tmp_path / "home",
            "models_dir": models_dir,
            "model_name": tiny_model.artifact_dir.parent.name,
            "database_url": database_url,
            "broker_url": TEST_REDIS_URL,
            "queue": queue,
            "worker": WorkerSettings(
                concurrency=1, decode_threads=2, batch_size=16, max_attempts=3
            ),
            "scan": ScanSettings(chunk_size=16),
            "limits": LimitSettings(max_file_bytes=MiB),
        }
        values.update(overrides)
        return Settings(**values)

    return make


class Workers:
    """Starts worker processes for a test and makes sure none outlives it."""

    def __init__(self) -> None:
        self.started: list[LocalWorker] = []

    def start(
        self,
        settings: Settings,
        *,
        concurrency: int | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> LocalWorker:
        local = start_local_worker(
            settings, concurrency=concurrency, extra_env=extra_env, timeout=120
        )
        self.started.append(local)
        return local

    def kill(self, local: LocalWorker) -> None:
        """`kill -9` of the whole worker: its main process and every pool process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(local.pid, signal.SIGKILL)  # the worker leads its own session
        local.process.wait(timeout=30)

    def stop_all(self) -> None:
        for local in self.started:
            if local.process.poll() is None:
                local.stop(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(local.pid, signal.SIGKILL)  # pool processes left by a killed parent


@pytest.fixture
def workers() -> Iterator[Workers]:
    started = Workers()
    try:
        yield started
    finally:
        started.stop_all()


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (a worker's pool processes), from /proc."""
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # The command name may hold spaces and parentheses; the fields after it do not.
        fields = stat_line.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] not in {"Z", "X"}:
            children.append(int(entry.name))
    return sorted(children)


def worker_log(settings: Settings, last: int = 60) -> str:
    """The tail of the local worker's log, for failure messages."""
    try:
        lines = (settings.home.resolve() / "worker.log").read_text(errors="replace").splitlines()
    except OSError:
        return "(no worker log)"
    return "\n".join(lines[-last:])


def worker_log_text(settings: Settings) -> str:
    try:
        return (settings.home.resolve() / "worker.log").read_text(errors="replace")
    except OSError:
        return ""


# --- the command line ------------------------------------------------------------------------


def cli(settings: Settings, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run `emolabel ARGUMENTS` with exactly these settings; fail the test on a non-zero exit."""
    done = run_cli(list(arguments), env=worker_environment(settings))
    assert done.returncode == 0, f"emolabel {' '.join(arguments)}: {done.stderr}{done.stdout}"
    return done


def cli_scan(settings: Settings, source: str, *options: str) -> int:
    """`emolabel scan SOURCE` and the job id it printed."""
    done = cli(settings, "scan", source, *options)
    match = re.search(r"job (\d+):", done.stdout)
    assert match, done.stdout
    return int(match.group(1))


# --- waiting and reading the ledger ----------------------------------------------------------


def counts(sessions: sessionmaker[Session], job_id: int) -> JobCounts:
    with sessions() as session:
        return job_counts(session=session, job_id=job_id)


def job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found


def wait_for_job(
    sessions: sessionmaker[Session],
    job_id: int,
    settings: Settings,
    *,
    timeout: float = JOB_TIMEOUT,
) -> JobCounts:
    """Wait until the job is done; on timeout, fail with its counts and the worker's log."""
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            balance = job_counts(session=session, job_id=job_id)
        if status is JobStatus.DONE:
            return balance
        if time.monotonic() > deadline:
            pytest.fail(
                f"job {job_id} not done after {timeout:g} s: {status}, {balance}\n"
                f"worker log:\n{worker_log(settings)}"
            )
        time.sleep(0.2)


@dataclass(frozen=True)
class LedgerRow:
    uri: str
    state: str
    reason: str | None
    name_bytes: bytes | None


def ledger(sessions: sessionmaker[Session], job_id: int) -> dict[str, LedgerRow]:
    """uri -> the job's ledger row for it."""
    query = (
        select(Image.uri, JobItem.state, JobItem.reason, Image.name_bytes)
        .join(JobItem, JobItem.image_id == Image.id)
        .where(JobItem.job_id == job_id)
    )
    with sessions() as session:
        return {
            uri: LedgerRow(uri, str(state), reason, name_bytes)
            for uri, state, reason, name_bytes in session.execute(query)
        }


def results_per_image(sessions: sessionmaker[Session]) -> dict[str, int]:
    """uri -> how many result rows it has (one per model version at most)."""
    query = (
        select(Image.uri, func.count())
        .join(Result, Result.image_id == Image.id)
        .group_by(Image.uri)
    )
    with sessions() as session:
        return {uri: number for uri, number in session.execute(query)}


def assert_balanced(balance: JobCounts) -> None:
    assert balance.pending == 0, balance
    assert balance.enqueued == balance.labeled + balance.failed + balance.skipped, balance


# --- archives --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """How a file must end: its ledger state and reason (None for labeled)."""

    state: str
    reason: str | None = None


LABELED = Expected("labeled")


@dataclass
class Archive:
    """A generated folder tree and how each file in it must end, by URI."""

    root: Path
    expected: dict[str, Expected] = field(default_factory=dict)
    generated: list[str] = field(default_factory=list)
    # Deleted by the test between the scan and the worker.
    doomed: Path | None = None
    non_utf8_path: bytes | None = None
    long_name_path: Path | None = None
    outside_file: Path | None = None

    def labeled(self) -> set[str]:
        return {uri for uri, want in self.expected.items() if want == LABELED}


def generate_images(root: Path, total: int, *, seed: int = 11) -> list[Path]:
    """`total` small synthetic faces spread over folders at depths 2 to 5."""
    folders = [root / "shallow", root / "a" / "b", root / "a" / "b" / "c" / "d", root / "x" / "y"]
    per_folder = [total // len(folders)] * len(folders)
    per_folder[0] += total - sum(per_folder)
    for index, (folder, count) in enumerate(zip(folders, per_folder, strict=True)):
        per_class, extra = divmod(count, len(CLASSES))
        if per_class:
            generate_sample_data(folder, CLASSES, per_class, seed + index, min_size=64, max_size=72)
        if extra:
            generate_sample_data(
                folder / "extra", CLASSES[:1], extra, seed + 100 + index, min_size=64, max_size=72
            )
    paths = sorted(path for path in root.rglob("*") if path.is_file())
    assert len(paths) == total
    return paths


def encode(image: PillowImage.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def noise(mode: str = "RGB", size: tuple[int, int] = (64, 56)) -> PillowImage.Image:
    return PillowImage.effect_noise(size, 50).convert(mode)


def write_bytes(path: Path | bytes, content: bytes) -> None:
    with open(path, "wb") as handle:  # noqa: PTH123 (bytes paths: names that are not UTF-8)
        handle.write(content)


def add_hostile_files(archive: Archive, outside: Path) -> None:
    """Write the hostile files of issue 3 (and a few more) under `archive.root / "hostile"`."""
    folder = archive.root / "hostile"
    folder.mkdir(parents=True)
    expected = archive.expected

    def put(name: str, content: bytes, want: Expected) -> Path:
        path = folder / name
        write_bytes(path, content)
        expected[path_to_uri(path)] = want
        return path

    jpeg = encode(noise(), "JPEG", quality=90)
    put("zero.jpg", b"", Expected("skipped", "empty"))
    put("notes.jpg", b"meeting notes, not a photo\n" * 4, Expected("skipped", "not_an_image"))
    put("truncated.jpg", jpeg[: len(jpeg) // 2], Expected("failed", "corrupt"))
    put("png-content.jpg", encode(noise(), "PNG"), LABELED)
    put("jpeg-content.txt", jpeg, LABELED)
    put("grayscale.png", encode(noise("L"), "PNG"), LABELED)
    rgba = noise("RGBA")
    rgba.putalpha(PillowImage.linear_gradient("L").resize(rgba.size))
    put("rgba.png", encode(rgba, "PNG"), LABELED)
    sixteen = (np.random.default_rng(1).integers(0, 65535, (56, 64, 3))).astype(np.uint16)
    put("sixteen-bit.png", cv2.imencode(".png", sixteen)[1].tobytes(), LABELED)
    put("cmyk.jpg", encode(noise("CMYK"), "JPEG"), LABELED)
    exif = PillowImage.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    put("exif-rotated.jpg", encode(noise(size=(80, 48)), "JPEG", exif=exif.tobytes()), LABELED)
    frames = [noise(), noise(), noise()]
    animated = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    put("animated.gif", animated, LABELED)
    put("bomb.png", bomb_png(20000, 20000), Expected("failed", "too_many_pixels"))
    put("tiny.png", encode(noise(size=(4, 4)), "PNG"), Expected("failed", "too_small"))
    put(
        "garbage.png",
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        Expected("failed", "not_an_image"),
    )
    put("too-big.jpg", jpeg[:64] + b"\x00" * (MiB + 1), Expected("skipped", "too_large"))
    put("bitmap.bmp", encode(noise(), "BMP"), LABELED)
    put("photo.webp", encode(noise(), "WEBP"), LABELED)
    put("scan.tiff", encode(noise(), "TIFF"), LABELED)
    put("odd name %41 #1?.jpg", jpeg, LABELED)
    put(".hidden.png", encode(noise(), "PNG"), LABELED)
    archive.doomed = put("doomed.jpg", jpeg, Expected("failed", "missing"))

    # A name that is not UTF-8 and one of 200 characters, both kept byte for byte.
    raw = os.fsencode(folder) + b"/caf\xe9-\xff\xfe.jpg"
    write_bytes(raw, jpeg)
    expected[path_to_uri(raw)] = LABELED
    archive.non_utf8_path = raw
    archive.long_name_path = put("n" * 196 + ".jpg", jpeg, LABELED)

    # A folder named like an image is walked into; only what is inside it is listed.
    (folder / "folder.jpg").mkdir()
    put("folder.jpg/inside.png", encode(noise(), "PNG"), LABELED)

    os.mkfifo(folder / "pipe.jpg")
    expected[path_to_uri(folder / "pipe.jpg")] = Expected("skipped", "not_a_file")
    (folder / "loop-a.jpg").symlink_to("loop-b.jpg")
    (folder / "loop-b.jpg").symlink_to("loop-a.jpg")
    for name in ("loop-a.jpg", "loop-b.jpg"):
        expected[path_to_uri(folder / name)] = Expected("skipped", "symlink_loop")
    outside.mkdir(parents=True, exist_ok=True)
    secret = outside / "secret.jpg"
    write_bytes(secret, jpeg)
    archive.outside_file = secret
    (folder / "escape.jpg").symlink_to(secret)
    expected[path_to_uri(folder / "escape.jpg")] = Expected("skipped", "symlink_outside_root")
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    expected[path_to_uri(folder / "dangling.jpg")] = Expected("skipped", "missing")
    (folder / "alias.png").symlink_to(folder / "png-content.jpg")
    expected[path_to_uri(folder / "alias.png")] = Expected("skipped", "duplicate")


def build_archive(root: Path, images: int, *, outside: Path | None = None) -> Archive:
    """`images` generated faces in nested folders, plus the hostile files when `outside` is set."""
    archive = Archive(root=root)
    for path in generate_images(root, images):
        uri = path_to_uri(path)
        archive.generated.append(uri)
        archive.expected[uri] = LABELED
    if outside is not None:
        add_hostile_files(archive, outside)
    return archive


@pytest.fixture
def outside_dir(tmp_path: Path) -> Path:
    """A folder beside the archive that no worker may read."""
    return tmp_path / "outside"


# --- S3 --------------------------------------------------------------------------------------

S3_KEY, S3_SECRET, S3_REGION = "testing", "testing", "us-east-1"


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name=S3_REGION,
    )
