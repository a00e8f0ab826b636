"""A smoke run of `python -m bench.ledger_floor` on SQLite and PostgreSQL, so that the floor it
reports is the cost of the rows a scan writes: after it, the database holds exactly a first
scan's images, pending ledger rows and published chunks, and the schema is the migrated one."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from db.session import check_schema, make_engine
from tests.support.services import PostgresServer

REPO = Path(__file__).resolve().parents[1]
FILES = 5000  # two full batches of 2,048 and a short one; the last chunk short too


def run_floor(out: Path, *extra: str) -> dict[str, object]:
    command = [sys.executable, "-m", "bench", "ledger_floor", "--files", str(FILES),
               "--out", str(out), *extra]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "files/s" in done.stdout
    return json.loads(next(out.glob("ledger-floor-*.json")).read_text())


def counts(rows: list[tuple[object, ...]]) -> tuple[object, ...]:
    (found,) = rows
    return tuple(found)


QUERY = (
    "SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM job_items WHERE"
    " state = 'pending'), (SELECT count(DISTINCT chunk_index) FROM job_items),"
    " (SELECT count(*) FROM chunks WHERE status = 'published')"
)
EXPECTED = (FILES, FILES, math.ceil(FILES / 256), math.ceil(FILES / 256))


def test_the_sqlite_floor_writes_a_first_scans_rows(tmp_path: Path) -> None:
    report = run_floor(tmp_path)
    assert (report["backend"], report["files"]) == ("sqlite", FILES)
    database = tmp_path / "floor.sqlite"
    check_schema(f"sqlite:///{database}")
    with sqlite3.connect(database) as connection:
        assert counts(connection.execute(QUERY).fetchall()) == EXPECTED


@pytest.mark.integration
def test_the_postgres_floor_writes_a_first_scans_rows(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.create_database()
    report = run_floor(tmp_path, "--database-url", url)
    assert (report["backend"], report["files"]) == ("postgresql", FILES)
    check_schema(url)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            assert counts([tuple(connection.execute(text(QUERY)).one())]) == EXPECTED
    finally:
        engine.dispose()
