"""The least a scan's ledger writes can cost: the same rows, written with the driver alone.

    python -m bench.ledger_floor --files 1000000
    python -m bench.ledger_floor --files 1000000 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/bench_floor

For N files it writes what a first scan writes to the ledger (an `images` row, a pending
`job_items` row, and a published `chunks` row per 256 files), in batches of 2,048 files with one
commit each, as `run_scan` does, into a freshly migrated database (SQLite in `--out`, or the
PostgreSQL database given, dropped and created again). Nothing else: no walk, no per-file
Python objects, no decisions, no SQLAlchemy, no broker. SQLite gets `executemany` on the sqlite3
driver; PostgreSQL gets psycopg's COPY into a temporary table and one set-based insert of the
images and their ledger rows, then COPY of the chunks.

It is the floor under `python -m bench.producer`'s "database and the rest": with the walk
measured beside it, walk + floor is the fastest a producer that walks, then writes, could scan.
Nothing is asserted; it prints one line and writes OUT/ledger-floor-<backend>-<N>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BATCH_FILES = 2048
CHUNK_SIZE = 256


def uris(start: int, stop: int) -> Iterator[str]:
    """URIs shaped like bench.producer's tree (~67 bytes each)."""
    for index in range(start, stop):
        yield (
            f"file:///work/runs/bench-producer/tree/g{index // 10000:03d}"
            f"/f{(index // 1000) % 10:02d}/img_{index:07d}.jpg"
        )


def sqlite_floor(path: Path, files: int) -> tuple[float, float]:
    """Wall and CPU seconds of the writes (the migration before them not counted)."""
    import sqlite3

    from db.session import upgrade

    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    upgrade(f"sqlite:///{path}")
    connection = sqlite3.connect(path, isolation_level=None)
    # What db.session gives every SQLite connection.
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(
        "INSERT INTO jobs (id, source, status, options, enqueued, next_chunk_index)"
        " VALUES (1, '/floor', 'scanning', '{}', 0, 0)"
    )
    now = dt.datetime.now(dt.UTC).isoformat()
    chunk = 0
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, files, BATCH_FILES):
        stop = min(files, start + BATCH_FILES)
        connection.execute("BEGIN")
        connection.executemany(
            "INSERT INTO images (uri, size_bytes, mtime_ns, fingerprint, first_seen_at,"
            " updated_at) VALUES (?, 123, 456, '123-456', ?, ?) ON CONFLICT (uri) DO NOTHING",
            [(uri, now, now) for uri in uris(start, stop)],
        )
        last = connection.execute("SELECT max(id) FROM images").fetchone()[0]
        first = last - (stop - start) + 1
        connection.executemany(
            "INSERT INTO job_items (job_id, image_id, chunk_index, state, updated_at)"
            " VALUES (1, ?, ?, 'pending', ?)",
            [(first + k, chunk + k // CHUNK_SIZE, now) for k in range(stop - start)],
        )
        chunks = -(-(stop - start) // CHUNK_SIZE)
        connection.executemany(
            "INSERT INTO chunks (job_id, chunk_index, size, status, published_at, attempts,"
            " deliveries, crashes) VALUES (1, ?, ?, 'published', ?, 0, 0, 0)",
            [(chunk + k, CHUNK_SIZE, now) for k in range(chunks)],
        )
        chunk += chunks
        connection.execute("COMMIT")
    seconds = time.perf_counter() - started, time.process_time() - cpu
    connection.close()
    return seconds


def postgres_floor(url: str, files: int) -> tuple[float, float]:
    """Wall and client CPU seconds of the writes (the migration before them not counted)."""
    import psycopg
    from sqlalchemy import make_url

    from db.session import upgrade

    parsed = make_url(url)
    name = parsed.database
    admin = parsed.set(database="postgres", drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as server:
        server.execute(f'DROP DATABASE IF EXISTS "{name}"')
        server.execute(f'CREATE DATABASE "{name}"')
    upgrade(url)
    plain = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    now = dt.datetime.now(dt.UTC)
    with psycopg.connect(plain) as connection:
        connection.execute(
            "INSERT INTO jobs (id, source, status, options, enqueued, next_chunk_index)"
            " VALUES (1, '/floor', 'scanning', '{}', 0, 0)"
        )
        connection.execute(
            "CREATE TEMP TABLE staged (uri text, size_bytes bigint, mtime_ns bigint,"
            " fingerprint text) ON COMMIT DELETE ROWS"
        )
        connection.commit()
        chunk = 0
        started, cpu = time.perf_counter(), time.process_time()
        for start in range(0, files, BATCH_FILES):
            stop = min(files, start + BATCH_FILES)
            with connection.cursor() as cursor:
                with cursor.copy(
                    "COPY staged (uri, size_bytes, mtime_ns, fingerprint) FROM STDIN"
                ) as copy:
                    for uri in uris(start, stop):
                        copy.write_row((uri, 123, 456, "123-456"))
                cursor.execute(
                    "WITH new AS (INSERT INTO images (uri, size_bytes, mtime_ns, fingerprint)"
                    " SELECT uri, size_bytes, mtime_ns, fingerprint FROM staged"
                    " ON CONFLICT (uri) DO NOTHING RETURNING id)"
                    " INSERT INTO job_items (job_id, image_id, chunk_index, state)"
                    " SELECT 1, id, %s + (row_number() OVER (ORDER BY id) - 1) / %s, 'pending'"
                    " FROM new",
                    (chunk, CHUNK_SIZE),
                )
                chunks = -(-(stop - start) // CHUNK_SIZE)
                with cursor.copy(
                    "COPY chunks (job_id, chunk_index, size, status, published_at) FROM STDIN"
                ) as copy:
                    for k in range(chunks):
                        copy.write_row((1, chunk + k, CHUNK_SIZE, "published", now))
                chunk += chunks
            connection.commit()
        return time.perf_counter() - started, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ledger_floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("runs/ledger-floor"))
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL database for this bench alone (dropped and created); default SQLite",
    )
    arguments = parser.parse_args(argv)
    if arguments.files < 1:
        parser.error("--files must be at least 1")
    arguments.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    if arguments.database_url:
        backend = "postgresql"
        seconds, cpu = postgres_floor(arguments.database_url, arguments.files)
    else:
        backend = "sqlite"
        seconds, cpu = sqlite_floor(arguments.out / "floor.sqlite", arguments.files)
    result: dict[str, Any] = {
        "benchmark": "ledger_floor",
        "command": " ".join(["python -m bench.ledger_floor", *sys.argv[1:]]),
        "backend": backend,
        "files": arguments.files,
        "seconds": round(seconds, 2),
        "files_per_s": round(arguments.files / seconds),
        # The client's CPU; on PostgreSQL the server's work is the rest of the wall time.
        "client_cpu_seconds": round(cpu, 2),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    report = arguments.out / f"ledger-floor-{backend}-{arguments.files}.json"
    report.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{backend}: the ledger writes of {arguments.files:,} files alone in {seconds:.1f} s"
        f" = {result['files_per_s']:,} files/s (client CPU {result['client_cpu_seconds']} s;"
        f" load {result['load_before']} -> {result['load_after']}); wrote {report}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
