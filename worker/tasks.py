"""The Celery task: a thin shell around `worker.chunks.handle_chunk`.

Retries what is transient (database, broker or model away) with capped exponential backoff,
for as long as it takes. Anything else unexpected is retried `worker.max_attempts` times in all,
then every image of the chunk is recorded as failed `internal_error` (`fail_chunk`), so the job
finishes with the error on record. A bad image is data, recorded by `handle_chunk`, never an
exception here.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.signals import celeryd_after_setup, worker_process_init, worker_ready
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import InterfaceError, OperationalError

from emolabel.errors import ConfigError, ModelError
from worker.celery_app import LABEL_CHUNK, RETRAIN

logger = logging.getLogger(__name__)

# Backoff doubles from 1 s to 60 s: seven retries are about two minutes of a chunk not going on.
STALLED_AFTER_RETRIES = 7

# Retried with backoff rather than acknowledged as failed: a chunk must not be lost because the
# database, the broker or the model (being promoted, on a share that is remounting) is away.
TRANSIENT = (
    OperationalError,
    InterfaceError,
    ConnectionError,
    BrokerError,
    RedisConnectionError,
    RedisTimeoutError,
    ModelError,
    ConfigError,
)


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _note_pool_size(sender: Any, instance: Any, **_: Any) -> None:
    """Record the pool size the worker really runs (`--concurrency` wins over the settings).

    Runs in the main process before the pool forks, so every child sizes its model and decode
    threads (`emolabel.resources.worker_layout`) from the number of processes sharing the CPUs.
    """
    settings = getattr(instance.app, "emolabel_settings", None)
    if settings is not None and instance.concurrency:
        settings.worker.concurrency = int(instance.concurrency)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _fresh_child(**_: Any) -> None:
    from billiard.process import current_process
    from celery import current_app

    from emolabel.runtime import pin_gpu
    from worker.state import forget_inherited_state, preload_active_model

    forget_inherited_state()
    settings = getattr(current_app, "emolabel_settings", None)
    if settings is None:
        return
    if settings.worker.gpus:
        pin_gpu(int(getattr(current_process(), "index", 0) or 0), settings.worker.gpus)
    preload_active_model(settings)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _serve_metrics(sender: Any, **_: Any) -> None:
    """Serve /metrics from the worker's main process (the pool writes multiprocess files)."""
    from worker.metrics import start_metrics_server

    settings = getattr(sender.app, "emolabel_settings", None)
    if settings is not None:
        start_metrics_server(settings, queues=list(sender.app.amqp.queues.consume_from))


@shared_task(name=LABEL_CHUNK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def label_chunk(self: Task, job_id: int, chunk_index: int, uris: list[str]) -> dict[str, Any]:
    """Label one chunk of image URIs of a job; returns counts and timings (shown in Flower)."""
    from worker.chunks import fail_chunk, handle_chunk
    from worker.state import process_state

    settings = self.app.emolabel_settings

    def publish(job: int, index: int, part: list[str]) -> str:
        sent = self.app.send_task(LABEL_CHUNK, args=[job, index, part], queue=settings.queue)
        return str(sent.id)

    try:
        report = handle_chunk(
            process_state(settings),
            job_id,
            chunk_index,
            uris,
            retries=self.request.retries,
            publish=publish,
        )
    except TRANSIENT as error:
        from worker.metrics import record_retry

        record_retry()
        countdown = min(60, 2 ** min(self.request.retries, 6))
        # Retried for as long as it takes (nothing is lost), but not quietly: after a few
        # minutes of it the log says ERROR, and emolabel_chunks_total{result="retried"} climbs.
        level = logging.ERROR if self.request.retries >= STALLED_AFTER_RETRIES else logging.WARNING
        logger.log(
            level,
            "chunk %s/%s: transient error, retry in %ss (retry %s): %s",
            job_id, chunk_index, countdown, self.request.retries + 1, error,
        )  # fmt: skip
        raise self.retry(exc=error, countdown=countdown) from None
    except Exception as error:
        from worker.metrics import record_retry

        attempt = self.request.retries + 1
        if attempt < settings.worker.max_attempts:
            record_retry()
            logger.exception(
                "chunk %s/%s: unexpected error (attempt %s of %s), retrying",
                job_id, chunk_index, attempt, settings.worker.max_attempts,
            )  # fmt: skip
            raise self.retry(exc=error, countdown=min(60, 2**attempt)) from None
        logger.exception(
            "chunk %s/%s: unexpected error on the last of %s attempts: recording its %s images "
            "as failed (internal_error)",
            job_id, chunk_index, attempt, len(uris),
        )  # fmt: skip
        report = fail_chunk(process_state(settings), job_id, chunk_index, uris, error)
    # Imported late: prometheus_client fixes its multiprocess mode at import.
    from worker.metrics import record_chunk

    result = report.to_json()
    record_chunk(result)
    return result


@shared_task(name=RETRAIN, bind=True)  # type: ignore[untyped-decorator]
def retrain(self: Task, data_dir: object = None) -> dict[str, Any]:
    """Train a challenger and promote it only if it passes the gate (see worker.retrain).

    `data_dir` comes from the broker: anything but a folder under the training roots is refused
    before a byte is read, and the refusal is recorded as a failed run.
    """
    from worker.retrain import RefusedRetrain, queued_data_dir, record_refusal, run_retrain
    from worker.state import process_state

    settings = self.app.emolabel_settings
    state = process_state(settings)
    try:
        source = queued_data_dir(data_dir, settings.retrain)
    except RefusedRetrain as error:
        logger.error("retrain message %s refused: %s", self.request.id, error)
        record_refusal(state.sessions, error)
        raise
    return run_retrain(settings, state.sessions, data_dir=source).to_json()
