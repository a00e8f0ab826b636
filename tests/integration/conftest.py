"""End-to-end fixtures: real Redis, real SQLite and PostgreSQL ledgers, real worker processes.

Nothing of ours is mocked and `task_always_eager` is never used: the tests run the `emolabel`
command line in subprocesses, start `celery -A worker worker` through
`emolabel.embedded.start_local_worker` with the environment built from the test's `Settings`, and
read the ledger back with SQLAlchemy. Every wait is bounded.

Services: Redis at EMOLABEL_TEST_REDIS_URL (default the local one, database 15; every test has a
queue of its own) and the PostgreSQL server of tests/support/services.py (a fresh database per
test, dropped at the end of the session). The tiny model of tests/conftest.py labels everything.
The helpers the tests use with these fixtures (archives, the command line, the ledger, workers)
are in tests/support/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.settings import LimitSettings, ScanSettings, Settings, WorkerSettings
from db.session import make_engine, make_sessionmaker, upgrade
from tests.support.archives import MiB
from tests.support.s3 import S3_KEY, S3_REGION, S3_SECRET
from tests.support.services import TEST_REDIS_URL, PostgresServer
from tests.support.workers import SettingsFactory, Workers
from training.train import TrainOutcome

BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgresql", id="postgresql")]


# --- services --------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, postgres: PostgresServer, tmp_path: Path) -> str:
    """A fresh ledger migrated to head; `@pytest.mark.parametrize(..., indirect=True)` narrows."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = postgres.create_database()
    upgrade(url)
    return url


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


# --- settings and workers --------------------------------------------------------------------


@pytest.fixture
def make_settings(
    tmp_path: Path,
    models_dir: Path,
    tiny_model: TrainOutcome,
    database_url: str,
    queue: str,
) -> SettingsFactory:
    """Settings for this test's ledger, queue and tiny model; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "home": tmp_path / "home",
            "models_dir": models_dir,
            "model_name": tiny_model.artifact_dir.parent.name,
            "database_url": database_url,
            "broker_url": TEST_REDIS_URL,
            "queue": queue,
            "worker": WorkerSettings(
                concurrency=1, decode_threads=2, batch_size=16, max_attempts=3
            ),
            "scan": ScanSettings(chunk_size=16),
            "limits": LimitSettings(max_file_bytes=MiB),
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def workers() -> Iterator[Workers]:
    started = Workers()
    try:
        yield started
    finally:
        started.stop_all()


# --- archives --------------------------------------------------------------------------------


@pytest.fixture
def outside_dir(tmp_path: Path) -> Path:
    """A folder beside the archive that no worker may read."""
    return tmp_path / "outside"


# --- S3 --------------------------------------------------------------------------------------


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name=S3_REGION,
    )
