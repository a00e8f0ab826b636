"""A worker's check, at start, that Redis keeps what it is given.

Without an append-only file a restarted Redis has lost every queued and unacknowledged chunk;
with an eviction policy other than `noeviction` a full Redis silently drops messages. Either
way the reconciler resends what the ledger says is missing, but later than need be: the
operator should know at once, so the worker says so at ERROR level when it starts.
"""

from __future__ import annotations

import logging
from typing import Any

from core.broker import redis_client

logger = logging.getLogger(__name__)


def broker_risks(config: dict[str, Any]) -> list[str]:
    """What in a Redis `CONFIG GET` answer can lose messages (empty: nothing)."""
    risks = []
    if str(config.get("appendonly", "")).lower() != "yes":
        risks.append(
            "appendonly is not 'yes': a restart loses every queued chunk (the reconciler "
            "resends them after reconcile.stale_after)"
        )
    policy = str(config.get("maxmemory-policy", "noeviction")).lower()
    if policy != "noeviction":
        risks.append(f"maxmemory-policy is {policy!r}, not 'noeviction': a full Redis drops chunks")
    return risks


def warn_if_broker_can_lose_messages(broker_url: str) -> list[str]:
    """Log an ERROR per risk found (a WARNING when CONFIG cannot be read); returns the risks."""
    from redis.exceptions import RedisError

    client = redis_client(broker_url)
    try:
        config: dict[str, Any] = {}
        for name in ("appendonly", "maxmemory-policy"):
            config |= {_text(key): _text(value) for key, value in client.config_get(name).items()}
    except RedisError as error:
        logger.warning(
            "could not read the broker's persistence settings (CONFIG GET refused?): %s; make"
            " sure Redis runs with appendonly yes and maxmemory-policy noeviction",
            error,
        )
        return []
    finally:
        client.close()
    risks = broker_risks(config)
    for risk in risks:
        logger.error("the broker can lose messages: %s", risk)
    return risks


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
