"""The test services' addresses and clean-ups (used by the fixtures in tests/conftest.py), and
`wait_for`, the one way tests poll a real service until something happens.

Redis is EMOLABEL_TEST_REDIS_URL (default the local one, database 15); every test gets a queue of
its own. PostgreSQL is reached as tests/test_db.py says (POSTGRES_ADMIN_URL).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
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


def wait_for(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(interval)
