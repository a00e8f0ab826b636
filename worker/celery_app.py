"""The one Celery app. Imports no TensorFlow: the producer and the worker's parent process use it.

Delivery is at-least-once with an exactly-once effect: late acks, reject on worker loss and a
prefetch of one mean a chunk whose process dies is delivered again; results are upserts keyed on
(image, model version), so a second delivery writes nothing twice. The task time limit is shorter
than Redis' visibility timeout (the settings refuse anything else), so Redis never hands a chunk
that is still running to a second worker.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.schedules import crontab

from core.names import LABEL_CHUNK, RECONCILE, RETRAIN, retrain_queue
from core.settings import Settings
from worker.resources import worker_layout


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """The reconciler every few minutes; the nightly retraining when a training folder is set."""
    schedule: dict[str, Any] = {
        "reconcile": {
            "task": RECONCILE,
            "schedule": float(settings.reconcile.interval),
            # A run that waited longer than the interval behind chunks is replaced by the next.
            "options": {"queue": settings.queue, "expires": float(settings.reconcile.interval)},
        }
    }
    if settings.retrain.data_dir is None:
        return schedule
    minute, hour, day_of_month, month_of_year, day_of_week = settings.retrain.schedule.split()
    return schedule | {
        "retrain": {
            "task": RETRAIN,
            "schedule": crontab(
                minute=minute,
                hour=hour,
                day_of_month=day_of_month,
                month_of_year=month_of_year,
                day_of_week=day_of_week,
            ),
            "options": {"queue": retrain_queue(settings)},
        }
    }


def transport_options(settings: Settings) -> dict[str, Any]:
    """Redis transport options shared by the broker connection everywhere it is made."""
    visibility = settings.worker.visibility_timeout
    return {
        "visibility_timeout": visibility,
        # kombu looks for overdue unacknowledged messages every interval x throttle seconds
        # (10 x 10 by default): a dead worker's chunk would wait up to 100 s past the timeout.
        "unacked_restore_interval": min(10, max(1, visibility // 4)),
        "unacked_restore_throttle": 1,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }


def make_celery(settings: Settings) -> Celery:
    """Build the app from settings; tasks are registered by name, so producers need no code."""
    app = Celery("emolabel", set_as_current=False)
    options = transport_options(settings)
    app.conf.update(
        broker_url=settings.effective_broker_url,
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        # No result backend: outcomes go to SQL; Flower reads task results from events.
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A chunk over the time limit has its process killed; its message goes back (not
        # acknowledged) and the parent counts the death against it (worker.tasks.ChunkRequest),
        # so the next delivery splits the chunk.
        task_acks_on_failure=True,
        task_acks_on_timeout=False,
        worker_prefetch_multiplier=settings.worker.prefetch_multiplier,
        worker_concurrency=worker_layout(settings.worker).processes,
        task_time_limit=settings.worker.task_time_limit,
        # No soft limit: nothing would use it, and the exception it raises anywhere (inside an
        # import of Keras, say) failed the task, acknowledged the chunk and lost its images.
        task_default_queue=settings.queue,
        task_routes={
            LABEL_CHUNK: {"queue": settings.queue},
            RETRAIN: {"queue": retrain_queue(settings)},
            RECONCILE: {"queue": settings.queue},
        },
        # A retraining run outlives the visibility timeout, so it is acknowledged on receipt
        # (a lost run is simply the next night's) and has its own time limit.
        task_annotations={
            RETRAIN: {
                "acks_late": False,
                "time_limit": settings.retrain.time_limit,
                "soft_time_limit": settings.retrain.time_limit - 30,
            }
        },
        beat_schedule=beat_schedule(settings),
        beat_schedule_filename=str(settings.home.resolve() / "celerybeat-schedule"),
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    # The settings travel with the app so that tasks in the child process read the same ones.
    app.emolabel_settings = settings
    app.conf.imports = ("worker.tasks",)
    return app
