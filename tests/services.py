"""The test services' addresses and clean-ups, shared by the fixtures in tests/conftest.py.

Redis is EMOLABEL_TEST_REDIS_URL (default the local one, database 15); every test gets a queue of
its own. PostgreSQL is reached as tests/test_db.py says (POSTGRES_ADMIN_URL).
"""

from __future__ import annotations

import contextlib
import json
import os

import redis

TEST_REDIS_URL = os.environ.get("EMOLABEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def forget_queue(client: redis.Redis, name: str) -> None:
    """Delete a queue's keys and the messages of it that kombu still holds as unacknowledged."""
    for key in client.scan_iter(match=f"*{name}*"):
        client.delete(key)
    for tag, payload in client.hscan_iter("unacked"):
        with contextlib.suppress(ValueError, TypeError):
            _message, _exchange, routing_key = json.loads(payload)
            if routing_key == name:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
