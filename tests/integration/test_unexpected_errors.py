"""A chunk that fails for a reason no image explains is retried, then recorded, never lost.

The failure is a real one an operator can make: the worker's PostgreSQL role may not write the
`results` table. That is no connection error (nothing transient to wait out) and no image's
fault, so the chunk is tried `max_attempts` times, then every image in it is recorded as failed
`internal_error` with the database's message, and the job finishes. Once the grant is fixed, a
rescan sends those images again (`internal_error` is not a content failure) and they are labeled.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from core.settings import ScanSettings
from db.models import JobItem
from tests.support.archives import build_archive
from tests.support.cli import cli_scan
from tests.support.ledger import assert_balanced, ledger, wait_for_job
from tests.support.workers import SettingsFactory, Workers, worker_log_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def role_without_results(database_url: str) -> Iterator[tuple[str, str]]:
    """A login role that may do everything the worker does except write `results`."""
    role = f"emolabel_worker_{uuid.uuid4().hex[:8]}"
    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"CREATE ROLE {role} LOGIN"))
        connection.execute(text(f"GRANT USAGE ON SCHEMA public TO {role}"))
        connection.execute(
            text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        )
        connection.execute(text(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"))
        connection.execute(text(f"REVOKE INSERT, UPDATE ON results FROM {role}"))
    url = make_url(database_url).set(username=role, password=None)
    try:
        yield role, url.render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.execute(text(f"DROP OWNED BY {role}"))
            connection.execute(text(f"DROP ROLE {role}"))
        engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_chunk_failing_unexpectedly_is_retried_then_recorded_and_rescanned(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    database_url: str,
    role_without_results: tuple[str, str],
    tmp_path: Path,
) -> None:
    role, worker_url = role_without_results
    archive = build_archive(tmp_path / "archive", 6)
    scan = ScanSettings(chunk_size=4)
    settings = make_settings(scan=scan)
    worker_settings = make_settings(scan=scan, database_url=worker_url)

    job_id = cli_scan(settings, str(archive.root))
    workers.start(worker_settings)
    balance = wait_for_job(sessions, job_id, worker_settings)

    assert_balanced(balance)
    assert (balance.labeled, balance.failed) == (0, len(archive.generated))
    rows = ledger(sessions, job_id)
    assert {row.reason for row in rows.values()} == {"internal_error"}
    with sessions() as session:
        messages = set(session.scalars(select(JobItem.message).where(JobItem.job_id == job_id)))
    assert all(message and "permission denied for table results" in message for message in messages)
    log = worker_log_text(worker_settings)
    # Two chunks (4 + 2 images), each tried three times: two retries, then recorded.
    assert log.count("unexpected error (attempt 1 of 3), retrying") == 2, log[-3000:]
    assert log.count("unexpected error (attempt 2 of 3), retrying") == 2, log[-3000:]
    assert log.count("unexpected error on the last of 3 attempts") == 2, log[-3000:]

    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"GRANT INSERT, UPDATE ON results TO {role}"))
    engine.dispose()
    again = cli_scan(settings, str(archive.root))
    retried = wait_for_job(sessions, again, worker_settings)
    assert (retried.labeled, retried.failed, retried.skipped) == (len(archive.generated), 0, 0)
