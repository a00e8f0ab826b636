"""Flower and the workers' Prometheus endpoint, on real processes (issue 5).

The end-to-end tests share one labeling run on the embedded default: redis-server on a unix socket
in a temporary home, SQLite, the tiny model, a real `emolabel flower` subprocess and a real Celery
worker (`start_local_worker`, prefork, two pool processes) whose main process serves /metrics.
The archive is scanned with the real `emolabel scan`. Every wait is bounded.

The metrics assertions need the task to report each chunk: `label_chunk` calls
`worker.metrics.record_chunk(report)` and `worker_ready` starts `start_metrics_server`.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image as PillowImage
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from core.errors import ConfigError
from core.settings import (
    FlowerSettings,
    MetricsSettings,
    ScanSettings,
    Settings,
    WorkerSettings,
)
from db.models import Job, JobStatus
from db.repository import JobCounts, job_counts
from db.session import make_engine, make_sessionmaker, upgrade
from emolabel.embedded import EmbeddedRedis, LocalWorker, ensure_redis, start_local_worker
from emolabel.embedded import worker_environment as environment_for
from emolabel.ops import flower_arguments, prepare_metrics_directory
from tests.support.cli import run_cli
from tests.support.paths import REPO
from tests.support.services import TEST_REDIS_URL, wait_for
from training.sample_data import generate_sample_data
from training.train import TrainOutcome
from worker.metrics import BrokerCollector, record_chunk, start_metrics_server

USER, PASSWORD = "operator", "correct-horse-battery"
CLASSES = ("happy", "sad")
PER_CLASS = 12  # 24 faces + 2 files that fail: 4 chunks of 8 (the last one short)
CHUNK_SIZE = 8
FAILING_FILES = 2
JOB_TIMEOUT = 240.0
STARTUP_TIMEOUT = 60.0
EVENT_TIMEOUT = 30.0

needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


# --- helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_get(
    url: str, *, user: str | None = None, password: str | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    """(status, body) of a GET; an HTTP error status is returned, not raised."""
    request = urllib.request.Request(url)
    if user is not None and password is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def answering(url: str) -> bool:
    try:
        return http_get(url, timeout=2.0)[0] < 500
    except OSError:  # refused while the server starts
        return False


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value, from the Prometheus text format."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def total(
    scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (sample, series), v in scraped.items() if sample == name and wanted <= series)


def encode(image: PillowImage.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


def report(**values: Any) -> dict[str, Any]:
    """A chunk report as the task returns it (`ChunkReport.to_json()`)."""
    base: dict[str, Any] = {
        "job_id": 1,
        "chunk_index": 0,
        "images": 10,
        "labeled": 8,
        "failed": 2,
        "model_version": "20260101T000000Z",
        "split_into": [],
        "note": None,
        "seconds": 1.5,
        "images_per_second": 6.67,
        "stage_seconds": {"decode": 0.6, "predict": 0.4, "waiting_for_decode": 0.1, "write": 0.05},
    }
    return base | values


# --- fast: arguments, folders, the in-process endpoint ---------------------------------------


def test_flower_refuses_to_start_without_credentials(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", models_dir=tmp_path / "models")
    with pytest.raises(ConfigError, match="EMOLABEL_FLOWER__PASSWORD"):
        flower_arguments(settings)
    done = run_cli(
        ["flower"], env={"EMOLABEL_HOME": str(tmp_path / "home"), "EMOLABEL_FLOWER__USER": USER}
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: Flower needs credentials: set EMOLABEL_FLOWER__USER and EMOLABEL_FLOWER__PASSWORD "
        "(basic authentication is always on)"
    ]
    assert not (tmp_path / "home").exists()  # refused before starting a broker


def test_flower_arguments_bind_loopback_with_basic_auth(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path / "home",
        models_dir=tmp_path / "models",
        flower=FlowerSettings(user=USER, password=PASSWORD),
    )
    assert flower_arguments(settings) == [
        "flower",
        "--address=127.0.0.1",
        "--port=5555",
        f"--basic-auth={USER}:{PASSWORD}",
        "--max-tasks=10000",
    ]


@pytest.mark.parametrize(
    ("user", "password", "problem"),
    [
        (USER, "short", "8 characters"),
        (USER, "has,comma-inside", "comma"),
        ("a:b", PASSWORD, "user"),
    ],
)
def test_flower_credentials_that_flower_would_misread_are_refused(
    user: str, password: str, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        FlowerSettings(user=user, password=password)


def test_metrics_directory_is_fresh_and_dead_workers_folders_go(tmp_path: Path) -> None:
    host = "node1"
    stale = tmp_path / "metrics" / f"{host}-{os.getpid()}"
    stale.mkdir(parents=True)
    (stale / "counter_1.db").write_bytes(b"old counts")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "metrics" / f"{host}-{dead.pid}").mkdir()
    other_host = tmp_path / "metrics" / f"node2-{dead.pid}"
    other_host.mkdir()

    directory = prepare_metrics_directory(tmp_path, host, os.getpid())

    assert directory == stale and list(directory.iterdir()) == []
    assert not (tmp_path / "metrics" / f"{host}-{dead.pid}").exists()
    assert other_host.exists()  # another machine's worker sharing the folder: not ours to judge


def test_the_worker_command_sets_the_folder_before_prometheus_is_imported(tmp_path: Path) -> None:
    # prometheus_client picks file-backed values at its first import; the pool inherits that.
    code = (
        "import json, os, sys\n"
        "from emolabel.cli import main\n"
        "from emolabel.cli.pipeline import _metrics_directory_for_pool\n"
        "from core.settings import Settings\n"
        f"_metrics_directory_for_pool(Settings(home={str(tmp_path / 'home')!r}))\n"
        "print(json.dumps({'folder': os.environ.get('PROMETHEUS_MULTIPROC_DIR'),"
        " 'imported': 'prometheus_client' in sys.modules}))\n"
    )
    environment = {
        name: value
        for name, value in os.environ.items()
        if name != "PROMETHEUS_MULTIPROC_DIR" and not name.startswith("EMOLABEL_")
    }
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    printed = json.loads(done.stdout)
    assert printed["imported"] is False
    folder = Path(printed["folder"])
    assert folder.parent == tmp_path / "home" / "metrics" and folder.is_dir()


def test_record_chunk_counts_images_stages_and_the_model(tmp_path: Path) -> None:
    # The test process has no PROMETHEUS_MULTIPROC_DIR: the endpoint serves this process's values.
    settings = Settings(
        home=tmp_path / "home",
        models_dir=tmp_path / "models",
        broker_url="redis://127.0.0.1:1/0",  # nobody there: the scrape says the broker is down
        metrics=MetricsSettings(port=free_port()),
    )
    server = start_metrics_server(settings)
    assert server is not None
    try:
        before = samples(http_get(server.url)[1].decode())
        record_chunk(report(failed_by_reason={"corrupt": 1}, no_face=2))
        record_chunk(report(labeled=0, failed=0, stage_seconds={}, note="already done"))
        record_chunk(report(model_version="20260202T000000Z", labeled=3, failed=0, images=3))
        record_chunk({"labeled": "not a number"})  # logged, never raised into the task
        after = samples(http_get(server.url)[1].decode())
    finally:
        server.close()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("emolabel_images_total", outcome="labeled", reason="") == 11
    assert grew("emolabel_images_total", outcome="no_face", reason="") == 2
    assert grew("emolabel_images_total", outcome="failed", reason="corrupt") == 1
    assert grew("emolabel_images_total", outcome="failed", reason="unspecified") == 1
    assert grew("emolabel_chunks_total", result="written") == 2
    assert grew("emolabel_chunks_total", result="skipped") == 1
    assert grew("emolabel_chunk_images_count") == 2
    assert grew("emolabel_chunk_images_sum") == 13
    assert grew("emolabel_stage_seconds_count", stage="predict") == 2
    assert grew("emolabel_stage_seconds_sum", stage="decode") == pytest.approx(1.2)
    assert value(after, "emolabel_model_info", version="20260202T000000Z") == 1
    assert value(after, "emolabel_model_info", version="20260101T000000Z") == 0
    assert value(after, "emolabel_broker_up") == 0
    assert value(after, "emolabel_model_batch_size") == settings.worker.batch_size


def test_metrics_port_zero_serves_nothing(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path / "home", models_dir=tmp_path / "models", metrics=MetricsSettings(port=0)
    )
    assert start_metrics_server(settings) is None


@pytest.mark.integration
def test_queue_depth_is_read_from_redis_at_scrape_time(broker: redis.Redis, queue: str) -> None:
    keys = [queue, f"{queue}\x06\x163"]  # priority 0 and kombu's list for priority step 3
    try:
        broker.rpush(keys[0], "a", "b", "c")
        broker.rpush(keys[1], "d")
        collector = BrokerCollector(TEST_REDIS_URL, [queue, f"{queue}-empty"], batch_size=32)
        scraped = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in collector.collect()
            for sample in family.samples
        }
    finally:
        broker.delete(*keys)
    assert value(scraped, "emolabel_queue_depth", queue=queue) == 4
    assert value(scraped, "emolabel_queue_depth", queue=f"{queue}-empty") == 0
    assert ("emolabel_queue_depth", frozenset({("queue", f"{queue}-empty")})) in scraped
    assert value(scraped, "emolabel_broker_up") == 1
    assert ("emolabel_broker_unacked_messages", frozenset()) in scraped


# --- end to end: one labeling run watched by Flower and scraped ------------------------------


@dataclass
class LabelingRun:
    settings: Settings
    photos: Path
    job_id: int
    counts: JobCounts
    model_version: str
    worker: LocalWorker
    flower_url: str
    metrics_url: str
    flower_log: Path


class Flower:
    """`emolabel flower` in a subprocess; `stop()` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.log = log
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "emolabel", "flower"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=environment_for(settings),
                cwd=REPO,
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{settings.flower.port}"

    def wait_until_serving(self) -> None:
        def serving() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"emolabel flower exited: {self.log.read_text(errors='replace')}")
            return answering(f"{self.url}/healthcheck")

        wait_for(serving, timeout=STARTUP_TIMEOUT, what="Flower to answer /healthcheck")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)


def write_archive(photos: Path) -> None:
    generate_sample_data(photos, CLASSES, PER_CLASS, seed=5, min_size=64, max_size=96)
    broken = photos / "broken"
    broken.mkdir()
    jpeg = encode(PillowImage.effect_noise((64, 56), 50).convert("RGB"), "JPEG")
    (broken / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # failed: corrupt
    (broken / "tiny.png").write_bytes(encode(PillowImage.new("RGB", (4, 4)), "PNG"))  # too_small


def wait_for_job(settings: Settings, job_id: int, worker: LocalWorker) -> JobCounts:
    engine = make_engine(settings.effective_database_url)
    sessions = make_sessionmaker(engine)

    def done() -> JobCounts | None:
        with sessions() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            counts = job_counts(session=session, job_id=job_id)
        if worker.process.poll() is not None:
            pytest.fail(f"the worker exited: {worker.logfile.read_text(errors='replace')[-3000:]}")
        return counts if status is JobStatus.DONE else None

    try:
        return wait_for(done, timeout=JOB_TIMEOUT, what=f"job {job_id} to be done")  # type: ignore[no-any-return]
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def labeling_run(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_model: TrainOutcome
) -> Iterator[LabelingRun]:
    root = tmp_path_factory.mktemp("ops")
    settings = Settings(
        home=root / "home",
        models_dir=models_dir,
        model_name=tiny_model.artifact_dir.parent.name,
        database_url=f"sqlite:///{root / 'ledger.db'}",
        worker=WorkerSettings(concurrency=2, batch_size=4, decode_threads=2),
        scan=ScanSettings(chunk_size=CHUNK_SIZE),
        flower=FlowerSettings(user=USER, password=PASSWORD, port=free_port()),
        metrics=MetricsSettings(port=free_port()),
    )
    upgrade(settings.effective_database_url)
    photos = root / "photos"
    write_archive(photos)
    broker: EmbeddedRedis = ensure_redis(settings)
    flower = Flower(settings, root / "flower.log")
    local: LocalWorker | None = None
    try:
        flower.wait_until_serving()
        # What `emolabel worker` does for its pool, done here for `celery -A worker worker`.
        multiprocess = prepare_metrics_directory(root / "home", socket.gethostname(), os.getpid())
        local = start_local_worker(
            settings, extra_env={"PROMETHEUS_MULTIPROC_DIR": str(multiprocess)}, timeout=120
        )
        scanned = run_cli(["scan", str(photos)], env=environment_for(settings))
        assert scanned.returncode == 0, scanned.stderr + scanned.stdout
        match = re.search(r"job (\d+):.*with model (\S+)", scanned.stdout)
        assert match, scanned.stdout
        job_id, version = int(match.group(1)), match.group(2)
        counts = wait_for_job(settings, job_id, local)
        yield LabelingRun(
            settings=settings,
            photos=photos,
            job_id=job_id,
            counts=counts,
            model_version=version,
            worker=local,
            flower_url=flower.url,
            metrics_url=f"http://127.0.0.1:{settings.metrics.port}/metrics",
            flower_log=flower.log,
        )
    finally:
        if local is not None:
            local.stop(timeout=20)
        flower.stop()
        broker.stop()


def flower_api(run: LabelingRun, path: str) -> Any:
    status, body = http_get(f"{run.flower_url}{path}", user=USER, password=PASSWORD)
    assert status == 200, (status, body[:300])
    return json.loads(body)


def chunk_results(run: LabelingRun) -> list[dict[str, Any]]:
    """The results Flower shows for this run's finished chunk tasks (from task events)."""
    tasks = flower_api(run, "/api/tasks?taskname=emolabel.label_chunk&state=SUCCESS")
    results = []
    for task in tasks.values():
        result = task["result"]
        # Without a result backend, Flower has the worker's repr of the returned dict.
        parsed = ast.literal_eval(result) if isinstance(result, str) else result
        if parsed["job_id"] == run.job_id:  # the broker is this test's own: all are ours
            results.append(parsed | {"runtime": task["runtime"], "worker": task["worker"]})
    return results


@pytest.mark.integration
@pytest.mark.slow
@needs_redis_server
def test_flower_asks_for_credentials(labeling_run: LabelingRun) -> None:
    for path in ("/api/workers", "/api/tasks", "/"):
        assert http_get(f"{labeling_run.flower_url}{path}")[0] == 401
        wrong = http_get(f"{labeling_run.flower_url}{path}", user=USER, password="not-the-one")
        assert wrong[0] == 401


@pytest.mark.integration
@pytest.mark.slow
@needs_redis_server
def test_flower_lists_the_worker_and_the_chunks_it_labeled(labeling_run: LabelingRun) -> None:
    run = labeling_run
    workers = flower_api(run, "/api/workers?refresh=1")
    assert run.worker.nodename in workers, sorted(workers)
    queues = {queue["name"] for queue in workers[run.worker.nodename]["active_queues"]}
    assert run.settings.queue in queues

    chunks = -(-(run.counts.labeled + run.counts.failed) // CHUNK_SIZE)
    results = wait_for(
        lambda: (found := chunk_results(run)) and len(found) >= chunks and found,
        timeout=EVENT_TIMEOUT,
        what=f"Flower to show {chunks} finished chunks",
    )
    assert len(results) == chunks
    assert sum(result["labeled"] for result in results) == run.counts.labeled
    assert sum(result["failed"] for result in results) == run.counts.failed == FAILING_FILES
    assert sorted(result["chunk_index"] for result in results) == list(range(chunks))
    for result in results:
        assert result["worker"] == run.worker.nodename
        assert result["runtime"] > 0  # measured by Celery around the task
        assert result["model_version"] == run.model_version
        assert result["seconds"] > 0 and result["images_per_second"] > 0
        assert {"decode", "predict", "write"} <= set(result["stage_seconds"])


@pytest.mark.integration
@pytest.mark.slow
@needs_redis_server
def test_worker_metrics_after_a_labeling_run(labeling_run: LabelingRun) -> None:
    run = labeling_run
    # Served from the worker's main process once it is ready (the `worker_ready` signal).
    wait_for(
        lambda: answering(run.metrics_url),
        timeout=STARTUP_TIMEOUT,
        what="worker /metrics (served once `worker_ready` calls start_metrics_server)",
    )
    status, body = http_get(run.metrics_url)
    assert status == 200
    scraped = samples(body.decode())
    chunks = -(-(run.counts.labeled + run.counts.failed) // CHUNK_SIZE)

    assert run.counts.labeled == 2 * PER_CLASS
    assert (
        value(scraped, "emolabel_images_total", outcome="labeled", reason="") == run.counts.labeled
    )
    assert total(scraped, "emolabel_images_total", outcome="failed") == run.counts.failed
    assert value(scraped, "emolabel_chunks_total", result="written") == chunks
    assert value(scraped, "emolabel_chunk_images_count") == chunks
    assert value(scraped, "emolabel_chunk_images_sum") == run.counts.labeled + run.counts.failed
    assert value(scraped, "emolabel_chunk_seconds_count") == chunks
    for stage in ("decode", "predict", "write"):
        assert value(scraped, "emolabel_stage_seconds_count", stage=stage) == chunks
        assert value(scraped, "emolabel_stage_seconds_sum", stage=stage) > 0
    assert value(scraped, "emolabel_model_info", version=run.model_version) == 1
    assert value(scraped, "emolabel_broker_up") == 1
    assert ("emolabel_queue_depth", frozenset({("queue", run.settings.queue)})) in scraped
    assert value(scraped, "emolabel_queue_depth", queue=run.settings.queue) == 0
    assert value(scraped, "emolabel_model_batch_size") == run.settings.worker.batch_size
