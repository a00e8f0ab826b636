"""Prometheus metrics of the labeling workers, served from each worker's main process.

Pool processes record what each chunk did (`record_chunk`, called by the task with the chunk's
report); the main process serves `/metrics` (`start_metrics_server`, called once the worker is
ready). What a scrape shows:

    emolabel_images_total{outcome,reason}   images finished: outcome labeled | uncertain |
                                            no_face | failed
                                            (+ reason)
    emolabel_chunks_total{result}           deliveries: written | split | skipped
    emolabel_chunk_images                   histogram: images per chunk delivery
    emolabel_chunk_seconds                  histogram: wall time per chunk
    emolabel_stage_seconds{stage}           histogram per chunk: decode (read + decode, summed
                                            over images), predict, waiting_for_decode, write
    emolabel_model_info{version}            1 for the model version the processes last loaded
    emolabel_queue_depth{queue}             chunk messages waiting in Redis (read at scrape)
    emolabel_broker_unacked_messages        chunks delivered and not yet acknowledged
    emolabel_broker_up                      1 when the scrape could read the broker
    emolabel_model_batch_size               images per model call (the setting)

Prefork pools: prometheus_client's multiprocess mode. Each process writes its values to files in
`PROMETHEUS_MULTIPROC_DIR` and the main process adds them up at scrape time. The variable must be
set before prometheus_client is first imported, which decides then how values are stored; the
pool's processes inherit it. `emolabel worker` sets it to a fresh folder (see `emolabel.ops`);
with `celery -A worker worker`, set it yourself (an empty folder), or only the main process's
values are served, which is right for the solo and thread pools alone.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from core.broker import UNACKED_KEY, queue_keys, redis_client
from core.names import MULTIPROCESS_VARIABLE
from core.settings import Settings

logger = logging.getLogger(__name__)

CHUNK_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 10_000)
CHUNK_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800)
STAGE_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
STAGES = ("decode", "predict", "waiting_for_decode", "write")
CHUNK_RESULTS = ("written", "split", "skipped", "refused", "retried")
UNSPECIFIED_REASON = "unspecified"
BROKER_TIMEOUT = 2.0


@dataclass(frozen=True)
class Instruments:
    """The metrics this process records into (file-backed in multiprocess mode)."""

    images: Counter
    chunks: Counter
    chunk_images: Histogram
    chunk_seconds: Histogram
    stage_seconds: Histogram
    model: Gauge
    without_message: Gauge

    def all(self) -> tuple[Counter | Histogram | Gauge, ...]:
        return (
            self.images,
            self.chunks,
            self.chunk_images,
            self.chunk_seconds,
            self.stage_seconds,
            self.model,
            self.without_message,
        )


@functools.cache
def instruments() -> Instruments:
    """This process's metrics, created on first use (so importing this module writes no file)."""
    made = Instruments(
        images=Counter(
            "emolabel_images",
            "Images finished by the workers, by outcome (labeled, uncertain, no_face, failed) and "
            "failure "
            "reason.",
            ["outcome", "reason"],
            registry=None,
        ),
        chunks=Counter(
            "emolabel_chunks",
            "Chunk deliveries: written (outcomes stored), split (a process died in it), "
            "skipped (already done), refused (the ledger disagrees with the message: see the "
            "refused_messages table), retried (an error; sent again later).",
            ["result"],
            registry=None,
        ),
        chunk_images=Histogram(
            "emolabel_chunk_images",
            "Images per written chunk.",
            buckets=CHUNK_SIZE_BUCKETS,
            registry=None,
        ),
        chunk_seconds=Histogram(
            "emolabel_chunk_seconds",
            "Wall time of a written chunk, from delivery to commit.",
            buckets=CHUNK_SECONDS_BUCKETS,
            registry=None,
        ),
        stage_seconds=Histogram(
            "emolabel_stage_seconds",
            "Seconds per chunk in each stage: decode is read + decode summed over images (the "
            "decode threads overlap prediction, so stages do not add up to the chunk time).",
            ["stage"],
            buckets=STAGE_SECONDS_BUCKETS,
            registry=None,
        ),
        model=Gauge(
            "emolabel_model_info",
            "1 for the model version the worker processes last loaded, 0 for the one it replaced.",
            ["version"],
            multiprocess_mode="mostrecent",
            registry=None,
        ),
        without_message=Gauge(
            "emolabel_images_without_message",
            "Pending images whose chunk had no message in Redis at the reconciler's last run "
            "(it sent them again; above 0 at every run means messages keep getting lost).",
            multiprocess_mode="mostrecent",
            registry=None,
        ),
    )
    # Series that exist from the start, so that rate() sees their first increase.
    made.images.labels(outcome="labeled", reason="")
    made.images.labels(outcome="no_face", reason="")
    made.images.labels(outcome="uncertain", reason="")
    for result in CHUNK_RESULTS:
        made.chunks.labels(result=result)
    for stage in STAGES:
        made.stage_seconds.labels(stage=stage)
    return made


_loaded_version: str | None = None
_loaded_lock = threading.Lock()


def mark_model(version: str) -> None:
    """Record that this process now predicts with `version` (the previous one goes to 0)."""
    global _loaded_version
    with _loaded_lock:
        if version == _loaded_version:
            return
        gauge = instruments().model
        if _loaded_version is not None:
            gauge.labels(version=_loaded_version).set(0)
        gauge.labels(version=version).set(1)
        _loaded_version = version


def record_chunk(report: Mapping[str, Any]) -> None:
    """Count one chunk delivery from its report (`ChunkReport.to_json()`); never raises on I/O.

    An optional `failed_by_reason` mapping (reason -> images) labels the failures; without it
    they are counted with reason `unspecified`.
    """
    try:
        _record(report)
    except (OSError, ValueError, TypeError) as error:
        # Metrics must never fail a chunk whose results are already committed.
        logger.warning("could not record the metrics of a chunk: %s", error)


def _record(report: Mapping[str, Any]) -> None:
    metrics = instruments()
    labeled = int(report.get("labeled") or 0)
    failed = int(report.get("failed") or 0)
    no_face = int(report.get("no_face") or 0)
    uncertain = int(report.get("uncertain") or 0)
    if uncertain:
        metrics.images.labels(outcome="uncertain", reason="").inc(uncertain)
    if labeled:
        metrics.images.labels(outcome="labeled", reason="").inc(labeled)
    if no_face:
        metrics.images.labels(outcome="no_face", reason="").inc(no_face)
    counted = 0
    for reason, images in (report.get("failed_by_reason") or {}).items():
        metrics.images.labels(outcome="failed", reason=str(reason)).inc(int(images))
        counted += int(images)
    if failed > counted:
        metrics.images.labels(outcome="failed", reason=UNSPECIFIED_REASON).inc(failed - counted)
    stage_seconds: Mapping[str, float] = report.get("stage_seconds") or {}
    if str(report.get("note") or "").startswith("refused"):
        result = "refused"
    elif report.get("split_into"):
        result = "split"
    elif "write" in stage_seconds:
        result = "written"
    else:
        result = "skipped"
    metrics.chunks.labels(result=result).inc()
    if result == "written":
        metrics.chunk_images.observe(int(report.get("images") or 0))
        metrics.chunk_seconds.observe(float(report.get("seconds") or 0.0))
        for stage, seconds in stage_seconds.items():
            metrics.stage_seconds.labels(stage=stage).observe(float(seconds))
    version = report.get("model_version")
    if version:
        mark_model(str(version))


def record_images_without_message(count: int) -> None:
    """Set what the reconciler found at its last run; never raises on I/O."""
    try:
        instruments().without_message.set(count)
    except (OSError, ValueError) as error:
        logger.warning("could not record the reconciler's count: %s", error)


def record_retry() -> None:
    """Count a chunk delivery that raised and will be retried; never raises on I/O."""
    try:
        instruments().chunks.labels(result="retried").inc()
    except (OSError, ValueError) as error:
        logger.warning("could not record a retry: %s", error)


class BrokerCollector(Collector):
    """Reads the queue depth from Redis at scrape time (the main process; no worker state)."""

    def __init__(
        self,
        broker_url: str,
        queues: Sequence[str],
        batch_size: int,
        *,
        timeout: float = BROKER_TIMEOUT,
    ) -> None:
        self.queues = list(queues)
        self.batch_size = batch_size
        self.client = redis_client(
            broker_url, timeout=timeout, connect_timeout=timeout, retries=False
        )

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "emolabel_model_batch_size",
            "Images per model call (EMOLABEL_WORKER__BATCH_SIZE).",
            value=self.batch_size,
        )
        up = GaugeMetricFamily("emolabel_broker_up", "1 when this scrape could read the broker.")
        try:
            depths, unacked = self._read()
        except redis.exceptions.RedisError as error:
            logger.warning("metrics: cannot read the broker: %s", error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily(
            "emolabel_queue_depth",
            "Chunk messages waiting in the queue (not yet delivered to a worker).",
            labels=["queue"],
        )
        for queue, waiting in depths.items():
            depth.add_metric([queue], waiting)
        yield depth
        yield GaugeMetricFamily(
            "emolabel_broker_unacked_messages",
            "Messages delivered to workers and not yet acknowledged, all queues of this Redis "
            "database (chunks running or reserved).",
            value=unacked,
        )

    def _read(self) -> tuple[dict[str, int], int]:
        # kombu keeps a queue as one list per priority step: `name`, then `name<sep><step>`.
        keys = {queue: queue_keys(queue) for queue in self.queues}
        with self.client.pipeline(transaction=False) as pipeline:
            for lists in keys.values():
                for key in lists:
                    pipeline.llen(key)
            pipeline.hlen(UNACKED_KEY)
            replies = [int(reply) for reply in pipeline.execute()]
        depths: dict[str, int] = {}
        position = 0
        for queue, lists in keys.items():
            depths[queue] = sum(replies[position : position + len(lists)])
            position += len(lists)
        return depths, replies[-1]


@dataclass
class MetricsServer:
    """The running /metrics endpoint of this process."""

    server: WSGIServer
    thread: threading.Thread
    registry: CollectorRegistry
    address: str

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.server.server_port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def metrics_registry(settings: Settings, queues: Sequence[str] | None = None) -> CollectorRegistry:
    """What the endpoint serves: every process's values (multiprocess) or this one's, + broker."""
    registry = CollectorRegistry()
    # prometheus_client's own switch, read (never written) here to choose how to serve.
    directory = os.environ.get(MULTIPROCESS_VARIABLE)
    if directory:
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        instruments()  # the zero-valued series, written to this process's files
    else:
        logger.warning(
            "%s is not set: /metrics shows this process's values only, not the pool's "
            "(`emolabel worker` sets it; for `celery -A worker worker`, set an empty folder)",
            MULTIPROCESS_VARIABLE,
        )
        for metric in instruments().all():
            registry.register(metric)
    registry.register(
        BrokerCollector(
            settings.effective_broker_url,
            queues or [settings.queue],
            settings.worker.batch_size,
        )
    )
    return registry


def start_metrics_server(
    settings: Settings, *, queues: Sequence[str] | None = None
) -> MetricsServer | None:
    """Serve /metrics on `settings.metrics` in a daemon thread; None when off or not possible.

    A worker that cannot serve its metrics (the port is taken) still labels: the error is logged.
    """
    if settings.metrics.port == 0:
        return None
    address, port = settings.metrics.address, settings.metrics.port
    try:
        registry = metrics_registry(settings, queues)
        server, thread = start_http_server(port, address, registry=registry)
    except (OSError, ValueError) as error:
        logger.error("cannot serve metrics on %s:%d: %s", address, port, error)
        return None
    served = MetricsServer(server, thread, registry, address)
    logger.info("serving Prometheus metrics on %s", served.url)
    return served
