"""Shared fixtures: generated data, one tiny model trained once per test session, and the
services (the test Redis, a queue per test, PostgreSQL databases made and dropped)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from core.settings import LimitSettings
from tests.support.services import POSTGRES_ADMIN_URL, TEST_REDIS_URL, PostgresServer, forget_queue
from tests.support.tiny_model import TINY
from training.metadata import write_metadata
from training.sample_data import generate_sample_data
from training.train import TrainOutcome, train_model


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    generate_sample_data(root, ["happy", "sad"], 30, seed=3, min_size=96, max_size=160)
    return root


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(sample_dir: Path, models_dir: Path) -> TrainOutcome:
    """The pipeline tests' model, served raw: they count labels, and a three-epoch model's
    calibrated thresholds would call most of them uncertain. Calibration and the uncertain
    outcome are tested with models of their own (tests/test_calibration.py)."""
    outcome = train_model(
        sample_dir, TINY, LimitSettings(), models_dir, "tiny", progress=lambda _: None
    )
    raw = outcome.metadata.model_copy(update={"calibration": None})
    write_metadata(outcome.artifact_dir, raw)
    return replace(outcome, metadata=raw)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on a free loopback port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """Makes databases on the test PostgreSQL server; drops them all at the end of the session."""
    server = PostgresServer(POSTGRES_ADMIN_URL)
    yield server
    server.drop_databases()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.integration),
    ]
)
def ledger_sessions(
    request: pytest.FixtureRequest, postgres: PostgresServer, tmp_path: Path
) -> Iterator[sessionmaker[Session]]:
    """A fresh ledger migrated to head, once on SQLite and once on PostgreSQL."""
    from db.session import make_engine, make_sessionmaker, upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = postgres.create_database()
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=10)
    try:
        client.ping()
    except redis.ConnectionError as error:
        pytest.fail(f"Redis at {TEST_REDIS_URL} is unreachable ({error}); start it", pytrace=False)
    yield client
    client.close()


@pytest.fixture
def queue(broker: redis.Redis) -> Iterator[str]:
    """A queue of this test's own; its keys and its unacknowledged messages go afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    forget_queue(broker, name)
