"""The publisher protocol: how a chunk recorded in the ledger becomes a message on the queue.

The producer, `failures --retry`, the reconciler and a worker splitting a chunk all publish through
a `Publisher`; only the caller at the top (the command line or the worker process) builds one
from a Celery app, so nothing below it needs the worker's code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from core.errors import EmolabelError
from core.names import LABEL_CHUNK

if TYPE_CHECKING:
    from celery import Celery


class PublishError(EmolabelError):
    """The broker did not take a chunk's message (down, unreachable, refusing)."""


class Publisher(Protocol):
    """Sends one chunk's message and returns its task id; raises `PublishError` on failure."""

    def __call__(self, job_id: int, chunk_index: int, uris: list[str]) -> str: ...


def celery_publisher(app: Celery, queue: str) -> Publisher:
    """A publisher that sends `label_chunk(job_id, chunk_index, uris)` by name to `queue`."""
    # Imported here: kombu and redis load only when something is published.
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from core.redaction import mask_url

    broker = mask_url(str(app.conf.broker_url))
    refused = (OperationalError, RedisConnectionError, RedisTimeoutError, OSError)

    def publish(job_id: int, chunk_index: int, uris: list[str]) -> str:
        try:
            result = app.send_task(
                LABEL_CHUNK,
                args=[job_id, chunk_index, uris],
                queue=queue,
                # The header would repeat every URI; Flower and logs need only the shape.
                argsrepr=f"[{job_id}, {chunk_index}, <{len(uris)} URIs>]",
            )
        except refused as error:
            raise PublishError(
                f"the broker at {broker} did not take chunk {chunk_index} of job {job_id}"
                f" ({str(error).rstrip('.')})"
            ) from error
        return str(result.id)

    return publish
