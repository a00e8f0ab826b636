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

from billiard.exceptions import WorkerLostError
from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import celeryd_after_setup, worker_process_init, worker_ready
from celery.worker.request import Request
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import InterfaceError, OperationalError

from core.errors import ConfigError, ModelError
from core.names import LABEL_CHUNK, RECONCILE, RETRAIN
from core.reasons import Reason

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
    threads (`worker.resources.worker_layout`) from the number of processes sharing the CPUs.
    """
    settings = getattr(instance.app, "emolabel_settings", None)
    if settings is not None and instance.concurrency:
        settings.worker.concurrency = int(instance.concurrency)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _fresh_child(**_: Any) -> None:
    from billiard.process import current_process
    from celery import current_app

    from training.runtime import pin_gpu
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
    """Serve /metrics from the worker's main process (the pool writes multiprocess files), and
    say loudly when the broker can lose messages."""
    from worker.broker_check import warn_if_broker_can_lose_messages
    from worker.metrics import start_metrics_server

    settings = getattr(sender.app, "emolabel_settings", None)
    if settings is not None:
        start_metrics_server(settings, queues=list(sender.app.amqp.queues.consume_from))
        warn_if_broker_can_lose_messages(settings.effective_broker_url)


class ChunkRequest(Request):  # type: ignore[misc]
    """The worker's parent process's view of a chunk task: counts the deliveries that end with
    the child process holding the chunk dead (`chunks.crashes`).

    The parent outlives its child, so it is the one place that knows a death happened while a
    given chunk was held: a decoder crash, the OOM killer, a hard time limit. A worker shutting
    down (warm: the task finishes first; cold: `should_terminate`) never counts, nor do
    retries, visibility-timeout redeliveries or republishes, which the old count
    (deliveries - 1 - retries) blamed on the chunk's images.
    """

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exception = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exception, WorkerLostError | SystemExit | KeyboardInterrupt):
            self._count_crash(f"the process died: {exception}")
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        if not soft:
            self._count_crash(f"hard time limit of {timeout} s: the process was killed")
        return super().on_timeout(soft, timeout)

    def _count_crash(self, why: str) -> None:
        from celery.worker import state as worker_state

        if worker_state.should_terminate or worker_state.should_stop:
            return
        settings = getattr(self.task.app, "emolabel_settings", None)
        arguments = self.args
        if settings is None or len(arguments) < 2:
            return
        job_id, chunk_index = arguments[0], arguments[1]
        if type(job_id) is not int or type(chunk_index) is not int:
            return
        logger.error("chunk %s/%s: %s; counted against the chunk", job_id, chunk_index, why)
        # Rare, and in the parent: a short-lived engine, so no connection is inherited by the
        # child that replaces the dead one.
        from db.delivery import record_crash
        from db.session import make_engine, make_sessionmaker

        engine = make_engine(settings.database_url)
        try:
            with make_sessionmaker(engine).begin() as session:
                record_crash(session=session, job_id=job_id, chunk_index=chunk_index)
        except (OperationalError, InterfaceError) as error:
            logger.error("chunk %s/%s: could not count the crash: %s", job_id, chunk_index, error)
        finally:
            engine.dispose()


@shared_task(  # type: ignore[untyped-decorator]
    name=LABEL_CHUNK, bind=True, max_retries=None, typing=False, Request=ChunkRequest
)
def label_chunk(
    self: Task, job_id: Any = None, chunk_index: Any = None, uris: Any = None, *extra: Any
) -> dict[str, Any]:
    """Label one chunk of image URIs of a job; returns counts and timings (shown in Flower).

    The arguments are whatever the message carried: checked here, refused and recorded when
    malformed or when the ledger disagrees (see worker.chunks).
    """
    from db.delivery import MessageRefused
    from worker.chunks import check_message, fail_chunk, handle_chunk, refuse_message
    from worker.state import DetectorUnavailable, process_state

    settings = self.app.emolabel_settings
    state = process_state(settings)

    # A `core.publishing.Publisher` (the halves of a split chunk go out through it).
    def publish(job_id: int, chunk_index: int, uris: list[str]) -> str:
        sent = self.app.send_task(
            LABEL_CHUNK, args=[job_id, chunk_index, uris], queue=settings.queue
        )
        return str(sent.id)

    try:
        if extra:
            raise MessageRefused(Reason.MALFORMED, f"{len(extra)} unexpected argument(s)")
        checked = check_message(job_id, chunk_index, uris)
        report = handle_chunk(state, job_id, chunk_index, checked, publish=publish)
    except MessageRefused as refusal:
        report = refuse_message(
            state, refusal, job_id=job_id, chunk_index=chunk_index, task_id=self.request.id
        )
    except DetectorUnavailable as error:
        # Every chunk of a face model would fail the same way here: stop taking them. The chunk
        # goes back to the queue untouched, and this worker shuts down (warm) with the reason.
        logger.critical(
            "chunk %s/%s: the active model is a face model and %s; this worker stops (the chunk "
            "goes back to the queue). Reinstall emolabel's dependencies (the mtcnn wheel) or "
            "promote an image model.",
            job_id, chunk_index, error,
        )  # fmt: skip
        self.app.control.shutdown(destination=[self.request.hostname])
        raise Reject(str(error), requeue=True) from None
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
            "chunk %s/%s: unexpected error on the last of %s attempts: recording its images "
            "as failed (internal_error)",
            job_id, chunk_index, attempt,
        )  # fmt: skip
        report = fail_chunk(state, job_id, chunk_index, error)
    # Imported late: prometheus_client fixes its multiprocess mode at import.
    from worker.metrics import record_chunk

    result = report.to_json()
    record_chunk(result)
    return result


@shared_task(name=RETRAIN, bind=True)  # type: ignore[untyped-decorator]
def retrain(self: Task, data_dir: object = None) -> dict[str, Any]:
    """Train a challenger and promote it only if it passes the gate (see training.retrain).

    `data_dir` comes from the broker: anything but a folder under the training roots is refused
    before a byte is read, and the refusal is recorded as a failed run.
    """
    from training.retrain import RefusedRetrain, queued_data_dir, record_refusal, run_retrain
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


@shared_task(name=RECONCILE, bind=True)  # type: ignore[untyped-decorator]
def reconcile(self: Task) -> dict[str, Any]:
    """Resend chunks with no message, end scans whose producer is gone (db.reconcile)."""
    from core.broker import redis_task_ids
    from core.publishing import celery_publisher
    from db.reconcile import reconcile as run_reconcile
    from worker.metrics import record_images_without_message
    from worker.state import process_state

    settings = self.app.emolabel_settings
    report = run_reconcile(
        sessions=process_state(settings).sessions,
        publish=celery_publisher(self.app, settings.queue),
        broker_task_ids=redis_task_ids(settings.effective_broker_url, settings.queue),
        settings=settings.reconcile,
    )
    record_images_without_message(report.images_without_message)
    return report.to_json()
