"""The worker's start-up check of the broker's persistence settings (issue 14)."""

from __future__ import annotations

import pytest
import redis

from tests.support.services import TEST_REDIS_URL
from worker.broker_check import broker_risks, warn_if_broker_can_lose_messages


def test_a_redis_that_keeps_its_messages_has_no_risk() -> None:
    assert broker_risks({"appendonly": "yes", "maxmemory-policy": "noeviction"}) == []


@pytest.mark.parametrize(
    ("config", "risk"),
    [
        ({"appendonly": "no", "maxmemory-policy": "noeviction"}, "appendonly"),
        ({"appendonly": "yes", "maxmemory-policy": "allkeys-lru"}, "allkeys-lru"),
        ({}, "appendonly"),
    ],
)
def test_each_way_to_lose_messages_is_named(config: dict[str, str], risk: str) -> None:
    (found,) = broker_risks(config)
    assert risk in found


def test_the_real_test_redis_is_read_as_it_is_configured(
    broker: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # scripts/services runs the suite's Redis with --appendonly no; whatever it runs with, the
    # check must report exactly what the server says.
    value = broker.config_get("appendonly")["appendonly"]
    appendonly = value.decode() if isinstance(value, bytes) else value
    risks = warn_if_broker_can_lose_messages(TEST_REDIS_URL)
    assert any("appendonly" in risk for risk in risks) == (appendonly != "yes")
    assert ("the broker can lose messages" in caplog.text) == bool(risks)


def test_an_unreachable_broker_is_a_warning_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    assert warn_if_broker_can_lose_messages("redis://127.0.0.1:1/0") == []
    assert "could not read the broker's persistence settings" in caplog.text
