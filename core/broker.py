"""What the broker (Redis, through kombu's Redis transport) holds, read directly.

The reconciler asks which chunk tasks are still in Redis: queued on the queue's lists (one per
priority step) or in the `unacked` hash of delivered, unacknowledged messages (running,
prefetched, or waiting for a retry's countdown). `redis_task_ids` builds that question as a
plain callable, so the ledger side (`db.reconcile`) never imports a Redis client. Clients made
here have timeouts: nothing waits for a broker forever.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from kombu.transport.redis import Channel as RedisChannel

# kombu's Redis transport: a queue with priorities is one list per step, named with its
# separator; delivered messages wait in this hash until acknowledged.
UNACKED_KEY = RedisChannel.unacked_key


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold `queue`'s waiting messages: `queue`, then one per priority step."""
    return [
        f"{queue}{RedisChannel.sep}{step}" if step else queue
        for step in RedisChannel.priority_steps
    ]


def task_ids_in_broker(client: Any, queue: str) -> set[str]:
    """Ids of the tasks queued on `queue` or delivered and not yet acknowledged (any queue)."""
    ids: set[str] = set()
    for key in queue_keys(queue):
        for raw in client.lrange(key, 0, -1):
            ids.update(_task_id(raw))
    for raw in client.hvals(UNACKED_KEY):
        ids.update(_task_id(raw, wrapped=True))
    return ids


def _task_id(raw: bytes | str, *, wrapped: bool = False) -> Iterable[str]:
    try:
        document = json.loads(raw)
        envelope = document[0] if wrapped else document
        task_id = envelope["headers"]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ()
    return (task_id,) if isinstance(task_id, str) else ()


def redis_task_ids(broker_url: str, queue: str) -> Callable[[], set[str]]:
    """`task_ids_in_broker` against the broker at `broker_url` (redis:// or redis+socket://)."""

    def read() -> set[str]:
        client = redis_client(broker_url)
        try:
            return task_ids_in_broker(client, queue)
        finally:
            client.close()

    return read


def redis_client(
    broker_url: str, *, timeout: float = 30.0, connect_timeout: float = 5.0, retries: bool = True
) -> Any:
    """A redis-py client for a kombu broker URL, with timeouts (never waits forever).

    `retries=False` makes one failed call fail at once (a metrics scrape reports the broker down
    rather than waiting).
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # kombu spells a Unix socket redis+socket:///path; redis-py spells it unix:///path.
    parts = urlsplit(broker_url)
    url = broker_url
    if parts.scheme in {"redis+socket", "socket"}:
        url = f"unix://{parts.path}" + (f"?{parts.query}" if parts.query else "")
    options: dict[str, Any] = {}
    if not retries:
        options["retry"] = Retry(NoBackoff(), 0)
    return redis.Redis.from_url(
        url, socket_connect_timeout=connect_timeout, socket_timeout=timeout, **options
    )


__all__ = ["UNACKED_KEY", "queue_keys", "redis_client", "redis_task_ids", "task_ids_in_broker"]
