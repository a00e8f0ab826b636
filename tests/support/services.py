"""The test services' addresses and clean-ups (used by the fixtures in tests/conftest.py), and
`wait_for`, the one way tests poll a real service until something happens.

Redis is EMOLABEL_TEST_REDIS_URL (default the local one, database 15); every test gets a queue of
its own. PostgreSQL is the server at EMOLABEL_TEST_POSTGRES_URL (POSTGRES_ADMIN_URL; default: the
local one, user postgres), where `PostgresServer` makes each test session's databases and drops
them at the end; EMOLABEL_TEST_NO_POSTGRES=1 (NO_POSTGRES) skips what needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

TEST_REDIS_URL = os.environ.get("EMOLABEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_ADMIN_URL = os.environ.get(
    "EMOLABEL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
NO_POSTGRES = os.environ.get("EMOLABEL_TEST_NO_POSTGRES") == "1"


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


class PostgresServer:
    """Creates throwaway databases on the test server, connecting on first use only."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []
        self._admin: Engine | None = None

    def admin(self) -> Engine:
        if NO_POSTGRES:
            pytest.skip("EMOLABEL_TEST_NO_POSTGRES=1")
        if self._admin is None:
            admin = create_engine(
                self.admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
            )
            try:
                with admin.connect() as connection:
                    connection.execute(text("SELECT 1"))
            except OperationalError as error:
                admin.dispose()
                pytest.fail(
                    f"PostgreSQL at {self.admin_url} is unreachable ({error.orig}); start it, or"
                    " set EMOLABEL_TEST_NO_POSTGRES=1 to test SQLite alone",
                    pytrace=False,
                )
            self._admin = admin
        return self._admin

    def create_database(self) -> str:
        admin = self.admin()
        name = f"emolabel_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return admin.url.set(database=name).render_as_string(hide_password=False)

    def drop_databases(self) -> None:
        if self._admin is None:
            return
        with self._admin.connect() as connection:
            for name in self.created:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._admin.dispose()
