"""The ledger at scale on PostgreSQL: `status`, `export`, `failures` and the review page's
queries on a generated ledger of N images, each statement's plan, and the bytes per image.

    python -m bench.ledger_scale --rows 10000000 --out runs/ledger-scale \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/ledger_scale

The goals (issue): `emolabel status JOB` under 1 s and `export` at 50,000 rows/s or more with
10,000,000 ledger rows.

1. The ledger. The database is created when missing and migrated (`db.session.upgrade`); then
   N images are written by the server itself (`INSERT ... SELECT ... FROM generate_series`), in
   slices of `--slice-rows` committed one by one, never a row from Python (as a superuser, with
   `session_replication_role = replica`: the rows are consistent by construction, so the
   foreign-key triggers are skipped):
     images     file:///archive/<year>/g<group>/f<folder>/IMG_<n>.jpg, 1,000 per folder, the
                fingerprint "<size>-<mtime_ns>" (no width, height or SHA-256: the product stores
                none of them today)
     job 1      the big job, done: one ledger row per image, chunks of 256 (done), states by a
                fixed permutation of the image ids: 94% labeled, 3% uncertain, 1% failed
                (corrupt, too_large, too_many_pixels, with messages), 1.5% skipped
                already_labeled, 0.5% skipped not_an_image
     jobs 2-6   five small jobs (`--force` reruns) of 1,000 images each, spread over the same
                archive, so that every query must find its job's rows among the big job's
     results    one model version (`--classes` classes, 2 to 7) labeled every labeled, uncertain
                and already_labeled image: label, confidence, runner-up and a scores document of
                float32 values as a worker writes them; `uncertain` exactly for uncertain rows
                (an already_labeled image's result has no job: the one that wrote it is gone)
     reviews    0.1% of the labeled images, a third of them corrected
   then `VACUUM ANALYZE` (what autovacuum does after such a load). Job 1's options mark the
   ledger as this bench's, with N: a later run with the same N reuses it (the report says so), a
   different N truncates and regenerates it, and a database holding anything else is refused.

2. The measurements, on the big job (1) and on the latest small job (6), each `--repeat` times
   (`--export-repeat` for the streaming ones), min and median reported:
     status       `get_job`, `job_counts`, `outcome_reasons` (what `emolabel status JOB` calls),
                  the chunks check it runs after them (`open_chunks`), the schema check every
                  command makes (`ready_schema`), and the real command, `python -m emolabel
                  status JOB`, wall time, in a fresh process; `emolabel status` (the latest jobs)
                  the same way, and `python -m emolabel --help` as the interpreter's floor
     export       the real command, `emolabel export --job J --state all` as CSV and JSON lines
                  into /tmp: rows/s = rows written / wall seconds, and its peak RSS (its
                  rusage, the command started by a small launcher process so that the bench's
                  own RSS cannot show in it): a streamed export's peak is the same for 1,000
                  rows and for N; and
                  `iter_ledger_rows` alone (as the Python writers call it), rows/s, with the
                  RSS at 10%, 50% and 100% of the rows; and the Python CSV writer over those
                  rows into a file (`export.python_csv`: SQLite's path, and PostgreSQL's before
                  the server wrote exports itself), the same run's reference for the command
     failures     `emolabel failures --job J --json`, and `failed_items` alone
     review       the page's queries with the page's defaults (no filter): `review_facets`
                  (thresholds, labels, versions), `ranked_review_items` for pages 1 and 10
                  and with the uncertain-only filter (facets included: what the page runs),
                  `human_labels` and `model_classes` for the first page, `latest_jobs(50)`;
                  and the page handler itself (`emolabel.review.app.page`, HTML included, no
                  HTTP): a first view (`review.page`, the facets counted) and the next page
                  within EMOLABEL_REVIEW__FACETS_SECONDS (`review.page_next`, facets
                  reused). `review_items`, every label of the job into Python (the ranking's
                  reference, and what the page ran before it ranked in SQL), is measured too;
                  above `--review-max-rows` labels it is not run in Python (the report says
                  so) and only its SQL is measured, by EXPLAIN ANALYZE
   Every SQL statement these send is captured as sent (a `before_cursor_execute` listener: the
   text and the parameters of the first run) and run again under `EXPLAIN (ANALYZE, BUFFERS)`;
   a statement streamed through a server-side cursor also gets `EXPLAIN DECLARE ...`, the plan
   the cursor really uses (planned for a fraction of its rows: `cursor_tuple_fraction`), which is
   the plan judged for it. The plans go to OUT/explain/<measurement>.<job>.<n>.txt; a `Seq Scan`
   on images, job_items or results, and a sort that spilled to disk, is flagged in the table and
   the report.

3. The bytes: heap, indexes and TOAST of images, job_items, results and chunks (and the small
   tables), each divided by N. The ledger is freshly loaded and vacuumed: a ledger written by
   workers (each row inserted pending, then updated) carries up to one dead version per row of
   reusable free space more.

Timings are warm (the ledger was just written or read; the first of the runs is the coldest).
The load average is recorded before and after every measurement: on a shared machine a time is
only as good as the CPU that was free. Nothing here is asserted: it measures, prints a table and
writes OUT/ledger-scale-<N>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.machine import describe, machine, package_versions
from bench.producer import _reset_peak_rss
from bench.producer import _status_kib as _rss_kib

REPOSITORY = Path(__file__).resolve().parent.parent

LAYOUT = 1  # bump when the generated ledger changes, so that an old one is not reused
MARKER = "bench_ledger_scale"  # the key in job 1's options that says this bench wrote the ledger
CHUNK_SIZE = 256
SLICE_ROWS = 1_024_000  # a multiple of CHUNK_SIZE and of 1,000: no chunk or folder straddles two
BIG_JOB = 1
SMALL_JOBS = 5
SMALL_JOB_ITEMS = 1_000
MIN_ROWS = SMALL_JOB_ITEMS
MODEL_NAME = "emotion"
MODEL_VERSION = "20240601-020000-000"
# Classes in order of frequency; a model of K classes has the first K, weighted like this.
CLASSES = ("happy", "neutral", "sad", "surprise", "angry", "fear", "disgust")
WEIGHTS = (34, 26, 14, 10, 8, 5, 3)
FILES_PER_FOLDER = 1_000
FOLDERS_PER_GROUP = 100
JOB_STARTED = dt.datetime(2024, 6, 1, 2, 0, tzinfo=dt.UTC)
ARCHIVE_START_NS = 1_325_376_000_000_000_000  # 2012-01-01: the photos' mtimes span ten years
ARCHIVE_SPAN_NS = 315_360_000_000_000_000
FLAGGED_TABLES = ("images", "job_items", "results")
SERVER_SETTINGS = (
    "shared_buffers", "work_mem", "effective_cache_size", "random_page_cost",
    "max_parallel_workers_per_gather", "jit", "cursor_tuple_fraction",
)  # fmt: skip
COLUMN_SAMPLES = (
    ("images", "uri"), ("images", "fingerprint"), ("results", "scores"), ("results", "label"),
    ("job_items", "message"),
)  # fmt: skip
PARTS = ("status", "export", "failures", "review")
SIZED_TABLES = ("images", "job_items", "results", "chunks", "jobs", "reviews", "faces")
MIB = 1024 * 1024

# The state of an image is a function of its id: bucket b = (id * 7919 + 13) mod 1000 (7919 is
# prime to 1000, so every 1,000 consecutive ids fill every bucket once).
LABELED_BELOW = 940  # 94.0%
UNCERTAIN_BELOW = 970  # 3.0%
FAILED_BELOW = 980  # 1.0%
ALREADY_LABELED_BELOW = 995  # 1.5%; the rest (0.5%) skipped as not_an_image
FAILURE_REASONS = ("corrupt", "too_large", "too_many_pixels")  # by b mod 3


# --- the generated ledger's arithmetic, the same in Python and in SQL -------------------------


def bucket(image_id: int) -> int:
    return (image_id * 7919 + 13) % 1000


def outcome(image_id: int) -> tuple[str, str | None]:
    """The ledger state and reason of an image, in every job (see `_STATE_SQL`)."""
    b = bucket(image_id)
    if b < LABELED_BELOW:
        return "labeled", None
    if b < UNCERTAIN_BELOW:
        return "uncertain", None
    if b < FAILED_BELOW:
        return "failed", FAILURE_REASONS[b % 3]
    if b < ALREADY_LABELED_BELOW:
        return "skipped", "already_labeled"
    return "skipped", "not_an_image"


def has_result(state: str, reason: str | None) -> bool:
    """Labeled, uncertain, and skipped as already labeled (by this model version, earlier)."""
    return state in ("labeled", "uncertain") or reason == "already_labeled"


def small_job_image_ids(index: int, rows: int) -> list[int]:
    """The images of small job `index` (0-based): 1,000 spread over the archive, i * step apart
    (modulo `rows`), `step` about rows/1,000 and prime to `rows` (so all distinct) and to 1,000
    (so, for a round `rows`, their states are spread exactly like the big job's)."""
    step = max(1, rows // SMALL_JOB_ITEMS)
    while math.gcd(step, rows) != 1 or math.gcd(step, 1000) != 1:
        step += 1
    return [1 + (index * 7 + i * step) % rows for i in range(SMALL_JOB_ITEMS)]


@dataclass
class Expected:
    """What a job's ledger holds by construction."""

    job_id: int
    items: int
    states: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)  # "state:reason" -> count
    results: int = 0  # the job's images with a label by the model version

    def add(self, state: str, reason: str | None, count: int) -> None:
        self.states[state] = self.states.get(state, 0) + count
        if reason is not None:
            key = f"{state}:{reason}"
            self.reasons[key] = self.reasons.get(key, 0) + count
        if has_result(state, reason):
            self.results += count


def expected_big_job(rows: int) -> Expected:
    """Job 1's counts for ids 1..rows, from the 1,000 residues of the id (no loop over rows)."""
    expected = Expected(BIG_JOB, rows)
    for residue in range(1000):
        first = residue if residue else 1000
        count = 0 if first > rows else (rows - first) // 1000 + 1
        if count:
            expected.add(*outcome(first), count)
    return expected


def expected_small_job(index: int, rows: int) -> Expected:
    expected = Expected(BIG_JOB + 1 + index, SMALL_JOB_ITEMS)
    for image_id in small_job_image_ids(index, rows):
        expected.add(*outcome(image_id), 1)
    return expected


# --- SQL that writes the ledger ---------------------------------------------------------------


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _per_image_sql(source: str, classes: int) -> str:
    """One row per image id of `source` (a set-returning function WITH ORDINALITY AS g(id, ord))
    with everything the tables need about it."""
    names = CLASSES[:classes]
    weights = WEIGHTS[:classes]
    total = sum(weights)
    bounds: list[int] = []
    running = 0
    for weight in weights[:-1]:
        running += weight
        bounds.append(running * 1000 // total)
    label_index = (
        "CASE "
        + " ".join(f"WHEN p.lb < {bound} THEN {index}" for index, bound in enumerate(bounds))
        + f" ELSE {classes - 1} END"
    )
    # An uncertain label's confidence lies in [low, high), a sure one's in [high, 0.995).
    low = round(1 / classes + 0.2 * (1 - 1 / classes), 4)
    high = round(low + 0.2, 4)
    array = "ARRAY[" + ", ".join(_quote(name) for name in names) + "]"
    if classes == 2:
        runner_up = "CAST(CAST(1 - q.conf AS real) AS float8)"
    else:
        runner_up = (
            "CAST(CAST(LEAST((1 - q.conf) * (0.5 + 0.4 * q.u2), q.conf * 0.95) AS real) AS float8)"
        )
    rest = (
        "0"
        if classes == 2
        else f"CAST(CAST(GREATEST((1 - r.conf - r.ru) / {classes - 2}, 0) AS real) AS float8)"
    )
    scores = (
        "jsonb_build_object("
        + ", ".join(
            f"{_quote(name)}, CASE WHEN r.li = {index} THEN r.conf"
            f" WHEN r.ri = {index} THEN r.ru ELSE {rest} END"
            for index, name in enumerate(names)
        )
        + ")"
    )
    per_image = f"""
        SELECT g.id, g.ord, g.id - 1 AS idx,
               (g.id * 7919 + 13) % 1000 AS b,
               CAST((g.id * 48271) % 1000003 AS float8) / 1000003 AS u1,
               CAST((g.id * 69621) % 999983 AS float8) / 999983 AS u2,
               (g.id * 31337) % 1000 AS lb,
               800000 + (g.id * 104729) % 7200000 AS size_bytes,
               {ARCHIVE_START_NS} + (g.id - 1) * CAST(:mtime_step AS bigint)
                   + (g.id * 7919) % 1000000000 AS mtime_ns
        FROM {source} AS g(id, ord)
    """
    states = f"""
        SELECT p.*,
               CASE WHEN p.b < {LABELED_BELOW} THEN 'labeled'
                    WHEN p.b < {UNCERTAIN_BELOW} THEN 'uncertain'
                    WHEN p.b < {FAILED_BELOW} THEN 'failed'
                    ELSE 'skipped' END AS state,
               CASE WHEN p.b < {UNCERTAIN_BELOW} THEN NULL
                    WHEN p.b < {FAILED_BELOW} THEN (ARRAY[{", ".join(map(_quote, FAILURE_REASONS))}])[p.b % 3 + 1]
                    WHEN p.b < {ALREADY_LABELED_BELOW} THEN 'already_labeled'
                    ELSE 'not_an_image' END AS reason,
               p.size_bytes || '-' || p.mtime_ns AS fingerprint,
               {label_index} AS li,
               CAST(CAST(CASE WHEN p.b >= {LABELED_BELOW} AND p.b < {UNCERTAIN_BELOW}
                              THEN {low} + {round(high - low, 4)} * p.u1
                              ELSE {high} + {round(0.995 - high, 4)} * p.u1 END
                         AS real) AS float8) AS conf
        FROM ({per_image}) AS p
    """  # noqa: E501
    return f"""
        SELECT r.*, ({array})[r.li + 1] AS label, ({array})[r.ri + 1] AS runner_up,
               {scores} AS scores
        FROM (SELECT q.*, (q.li + 1 + q.id % {classes - 1}) % {classes} AS ri,
                     {runner_up} AS ru
              FROM ({states}) AS q) AS r
    """


def _message_sql() -> str:
    return """CASE s.reason
        WHEN 'corrupt' THEN 'cannot decode: image file is truncated ('
            || (s.id % 4000 + 1) || ' bytes not processed)'
        WHEN 'too_large' THEN 'the file is ' || (67108864 + s.id % 50000000)
            || ' bytes, over max_file_bytes (67108864)'
        WHEN 'too_many_pixels' THEN 'the image is 20000x' || (6001 + s.id % 14000)
            || ' pixels, over max_pixels (120000000)'
        WHEN 'not_an_image' THEN 'not an image: no JPEG, PNG, GIF, WebP, TIFF, BMP or HEIF'
            || ' signature at the start of the file'
        END"""


def _uri_sql(rows: int) -> str:
    """file:///archive/<year>/g<group>/f<folder>/IMG_<n>.<ext>, 1,000 files per folder."""
    per_group = FILES_PER_FOLDER * FOLDERS_PER_GROUP
    return f"""'file:///archive/' || (2012 + s.idx * 12 / {max(rows, 1)})
        || '/g' || lpad(CAST(s.idx / {per_group} AS text), 4, '0')
        || '/f' || lpad(CAST(s.idx / {FILES_PER_FOLDER} % {FOLDERS_PER_GROUP} AS text), 3, '0')
        || '/IMG_' || lpad(CAST(s.idx AS text), GREATEST(7, length(CAST(s.idx AS text))), '0')
        || CASE WHEN s.id % 10 = 0 THEN '.png' ELSE '.jpg' END"""


def _slice_statements(rows: int, classes: int) -> list[tuple[str, str]]:
    """(what, SQL) writing images lo..hi, their job 1 rows, results and chunks."""
    per_image = _per_image_sql("generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) "
                               "WITH ORDINALITY", classes)  # fmt: skip
    at = "CAST(:t0 AS timestamptz) + s.idx * CAST(:step AS interval)"
    images = f"""
        INSERT INTO images (id, uri, size_bytes, mtime_ns, fingerprint, first_seen_at, updated_at)
        SELECT s.id, {_uri_sql(rows)}, s.size_bytes, s.mtime_ns, s.fingerprint, {at}, {at}
        FROM ({per_image}) AS s
    """
    job_items = f"""
        INSERT INTO job_items (job_id, image_id, chunk_index, state, reason, message, attempts,
                               updated_at)
        SELECT {BIG_JOB}, s.id,
               CASE WHEN s.state = 'skipped' THEN NULL ELSE CAST(s.idx / {CHUNK_SIZE} AS int) END,
               s.state, s.reason, {_message_sql()},
               CASE s.state WHEN 'skipped' THEN 0 WHEN 'failed' THEN 1 + s.id % 3 ELSE 1 END,
               {at} + interval '1 hour'
        FROM ({per_image}) AS s
    """
    results = f"""
        INSERT INTO results (image_id, model_version, label, confidence, scores, fingerprint,
                             job_id, created_at, face_count, uncertain, runner_up,
                             runner_up_confidence)
        SELECT s.id, :version, s.label, s.conf, s.scores, s.fingerprint,
               CASE WHEN s.state = 'skipped' THEN NULL ELSE {BIG_JOB} END,
               {at} + interval '1 hour', NULL, s.state = 'uncertain', s.runner_up, s.ru
        FROM ({per_image}) AS s
        WHERE s.state IN ('labeled', 'uncertain') OR s.reason = 'already_labeled'
    """
    chunks = f"""
        INSERT INTO chunks (job_id, chunk_index, size, status, published_at, attempts,
                            deliveries, crashes, task_id)
        SELECT {BIG_JOB}, CAST(s.idx / {CHUNK_SIZE} AS int), count(*), 'done',
               min({at}), 1, 1, 0, md5(CAST(s.idx / {CHUNK_SIZE} AS text))
        FROM ({per_image}) AS s
        WHERE s.state <> 'skipped'
        GROUP BY s.idx / {CHUNK_SIZE}
    """
    return [("images", images), ("job_items", job_items), ("results", results),
            ("chunks", chunks)]  # fmt: skip


def _small_job_statements(classes: int) -> list[tuple[str, str]]:
    """(what, SQL) writing one small job's ledger rows and chunks (:job, :ids)."""
    per_image = _per_image_sql("unnest(CAST(:ids AS bigint[])) WITH ORDINALITY", classes)
    job_items = f"""
        INSERT INTO job_items (job_id, image_id, chunk_index, state, reason, message, attempts,
                               updated_at)
        SELECT :job, s.id,
               CASE WHEN s.state = 'skipped' THEN NULL
                    ELSE CAST((s.ord - 1) / {CHUNK_SIZE} AS int) END,
               s.state, s.reason, {_message_sql()},
               CASE s.state WHEN 'skipped' THEN 0 WHEN 'failed' THEN 1 + s.id % 3 ELSE 1 END,
               CAST(:t0 AS timestamptz) + s.ord * interval '1 second'
        FROM ({per_image}) AS s
    """
    chunks = f"""
        INSERT INTO chunks (job_id, chunk_index, size, status, published_at, attempts,
                            deliveries, crashes, task_id)
        SELECT :job, CAST((s.ord - 1) / {CHUNK_SIZE} AS int), count(*), 'done',
               CAST(:t0 AS timestamptz), 1, 1, 0,
               md5(:job || '-' || CAST((s.ord - 1) / {CHUNK_SIZE} AS text))
        FROM ({per_image}) AS s
        WHERE s.state <> 'skipped'
        GROUP BY (s.ord - 1) / {CHUNK_SIZE}
    """
    return [("job_items", job_items), ("chunks", chunks)]


# --- the database -----------------------------------------------------------------------------


def ensure_database(url: str) -> bool:
    """Create the database of `url` when its server does not have it; True if created."""
    from sqlalchemy import create_engine, make_url, text

    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            found = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"),
                {"name": target.database},
            ).first()
            if found is None:
                name = str(target.database).replace('"', '""')
                connection.execute(text(f'CREATE DATABASE "{name}"'))
                return True
    finally:
        admin.dispose()
    return False


def ledger_state(engine: Any, rows: int, classes: int) -> str:
    """'reuse' (this bench's complete ledger of `rows`), 'empty', 'ours' (this bench's, of
    another size or unfinished: regenerate it) or 'foreign' (data this bench did not write)."""
    from sqlalchemy import text

    with engine.connect() as connection:
        options = connection.execute(
            text("SELECT options FROM jobs WHERE id = :id"), {"id": BIG_JOB}
        ).scalar()
        anything = connection.execute(
            text("SELECT EXISTS (SELECT 1 FROM jobs) OR EXISTS (SELECT 1 FROM images)")
        ).scalar()
        marker = (options or {}).get(MARKER) if isinstance(options, dict) else None
        if marker is None:
            return "foreign" if anything else "empty"
        wanted = {"rows": rows, "layout": LAYOUT, "classes": classes, "complete": True}
        if marker != wanted:
            return "ours"
        counted = connection.execute(text("SELECT count(*) FROM images")).scalar()
        items = connection.execute(
            text("SELECT count(*) FROM job_items WHERE job_id = :id"), {"id": BIG_JOB}
        ).scalar()
    return "reuse" if counted == rows and items == rows else "ours"


def _superuser(connection: Any) -> bool:
    from sqlalchemy import text

    return bool(
        connection.execute(
            text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        ).scalar()
    )


def generate(
    engine: Any, rows: int, classes: int, slice_rows: int, truncate: bool
) -> dict[str, Any]:
    """Write the ledger (see the module docstring); return what it took."""
    from sqlalchemy import text

    started = time.perf_counter()
    mtime_step = ARCHIVE_SPAN_NS // rows
    scan_step = dt.timedelta(seconds=6 * 3600 / rows)  # a six-hour scan
    chunks_total = -(-rows // CHUNK_SIZE)
    report: dict[str, Any] = {"slices": [], "slice_rows": slice_rows}
    with engine.begin() as connection:
        if truncate:
            connection.execute(
                text(
                    "TRUNCATE images, jobs, chunks, job_items, results, faces, reviews,"
                    " model_versions, refused_messages, retrain_runs RESTART IDENTITY CASCADE"
                )
            )
        options = {
            "chunk_size": CHUNK_SIZE, "chunk_bytes": 256 * MIB, "force": False, "where": [],
            MARKER: {"rows": rows, "layout": LAYOUT, "classes": classes, "complete": False},
        }  # fmt: skip
        connection.execute(
            text(
                "INSERT INTO jobs (id, source, options, status, model_version, created_at,"
                " started_at, finished_at, enqueued, next_chunk_index, producer, heartbeat_at)"
                " VALUES (:id, 'file:///archive', CAST(:options AS jsonb), 'done', :version,"
                " :created, :started, :finished, :enqueued, :chunks, 'archive-host:4242',"
                " :heartbeat)"
            ),
            {
                "id": BIG_JOB,
                "options": json.dumps(options),
                "version": MODEL_VERSION,
                "created": JOB_STARTED,
                "started": JOB_STARTED + dt.timedelta(minutes=1),
                "finished": JOB_STARTED + dt.timedelta(days=2),
                "enqueued": rows,
                "chunks": chunks_total,
                "heartbeat": JOB_STARTED + dt.timedelta(hours=6),
            },
        )
        connection.execute(
            text(
                "INSERT INTO model_versions (version, name, artifact_path, class_names, metrics,"
                " status, created_at, promoted_at) VALUES (:version, :name, :path,"
                " CAST(:classes AS jsonb), '{}', 'active', :created, :created)"
            ),
            {
                "version": MODEL_VERSION,
                "name": MODEL_NAME,
                "path": f"/models/{MODEL_NAME}/{MODEL_VERSION}",
                "classes": json.dumps(list(CLASSES[:classes])),
                "created": JOB_STARTED - dt.timedelta(days=1),
            },
        )
    statements = _slice_statements(rows, classes)
    for low in range(1, rows + 1, slice_rows):
        high = min(low + slice_rows - 1, rows)
        parameters = {"lo": low, "hi": high, "mtime_step": mtime_step, "t0": JOB_STARTED,
                      "step": scan_step, "version": MODEL_VERSION}  # fmt: skip
        slice_started = time.perf_counter()
        split: dict[str, float] = {}
        with engine.begin() as connection:
            if _superuser(connection):
                # The rows are consistent by construction: skip the foreign-key triggers.
                connection.execute(text("SET LOCAL session_replication_role = replica"))
            for what, sql in statements:
                step_started = time.perf_counter()
                connection.execute(text(sql), parameters)
                split[what] = round(time.perf_counter() - step_started, 2)
        seconds = time.perf_counter() - slice_started
        report["slices"].append({"first": low, "last": high, "seconds": round(seconds, 2),
                                 "split_seconds": split})  # fmt: skip
        print(
            f"  images {low:,}..{high:,} of {rows:,}: {seconds:.1f} s"
            f" ({(high - low + 1) / seconds:,.0f} images/s with their rows), load {_load()}",
            flush=True,
        )
    small_statements = _small_job_statements(classes)
    with engine.begin() as connection:
        for index in range(SMALL_JOBS):
            job_id = BIG_JOB + 1 + index
            created = JOB_STARTED + dt.timedelta(days=9 + index)
            connection.execute(
                text(
                    "INSERT INTO jobs (id, source, options, status, model_version, created_at,"
                    " started_at, finished_at, enqueued, next_chunk_index, producer,"
                    " heartbeat_at) VALUES (:id, 'file:///archive', CAST(:options AS jsonb),"
                    " 'done', :version, :created, :created, :finished, :enqueued, :chunks,"
                    " 'archive-host:4243', :created)"
                ),
                {
                    "id": job_id,
                    "options": json.dumps(
                        {
                            "chunk_size": CHUNK_SIZE,
                            "chunk_bytes": 256 * MIB,
                            "force": True,
                            "where": [],
                        }
                    ),
                    "version": MODEL_VERSION,
                    "created": created,
                    "finished": created + dt.timedelta(minutes=5),
                    "enqueued": SMALL_JOB_ITEMS,
                    "chunks": -(-SMALL_JOB_ITEMS // CHUNK_SIZE),
                },
            )
            parameters = {"job": job_id, "ids": small_job_image_ids(index, rows),
                          "mtime_step": mtime_step, "t0": created}  # fmt: skip
            for _, sql in small_statements:
                connection.execute(text(sql), parameters)
        # 0.1% of the labeled images reviewed; a third of the verdicts correct the label.
        connection.execute(
            text(
                "INSERT INTO reviews (image_id, face_index, model_version, old_label, new_label,"
                " reviewer, job_id, fingerprint, created_at)"
                " SELECT image_id, NULL, model_version, label,"
                " CASE WHEN image_id % 3000 = 500 THEN runner_up ELSE label END,"
                " 'reviewer-' || image_id % 3, :job, fingerprint,"
                " created_at + interval '3 days'"
                " FROM results WHERE image_id % 1000 = 500"
                " ORDER BY image_id"
            ),
            {"job": BIG_JOB},
        )
        connection.execute(
            text("SELECT setval('images_id_seq', :rows), setval('jobs_id_seq', :jobs)"),
            {"rows": rows, "jobs": BIG_JOB + SMALL_JOBS},
        )
        connection.execute(
            text(
                "UPDATE jobs SET options = jsonb_set(options, CAST(:path AS text[]), 'true')"
                " WHERE id = :id"
            ),
            {"path": "{" + MARKER + ",complete}", "id": BIG_JOB},
        )
    report["write_seconds"] = round(time.perf_counter() - started, 2)
    vacuum_started = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))
    report["vacuum_analyze_seconds"] = round(time.perf_counter() - vacuum_started, 2)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


# --- capturing and explaining statements ------------------------------------------------------


@dataclass(frozen=True)
class Captured:
    """A statement as the driver received it, with its parameters."""

    statement: str
    parameters: Any
    server_cursor: bool


class StatementLog:
    """Records what an engine sends while `active`; in `dry` mode every SELECT is sent as
    `SELECT * FROM (...) LIMIT 0` instead (the function runs through, no rows come back)."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.active = False
        self.dry = False
        self.statements: list[Captured] = []
        event.listen(engine, "before_cursor_execute", self._before, retval=True)

    def _before(
        self,
        connection: Any,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> tuple[str, Any]:
        if self.active:
            named = getattr(cursor, "name", None)
            captured = Captured(statement, parameters, bool(named))
            if captured not in self.statements:
                self.statements.append(captured)
        if self.dry and statement.lstrip().upper().startswith("SELECT"):
            statement = f"SELECT * FROM ({statement}) AS bench_dry_run LIMIT 0"
        return statement, parameters

    @contextlib.contextmanager
    def capture(self, *, dry: bool = False) -> Iterator[list[Captured]]:
        self.statements = []
        self.active, self.dry = True, dry
        try:
            yield self.statements
        finally:
            self.active, self.dry = False, False


_SEQ_SCAN = re.compile(r"(?:Parallel )?Seq Scan on (\w+)")
_TIME = re.compile(r"^(Planning|Execution) Time: ([\d.]+) ms", re.MULTILINE)


def explain(
    engine: Any, statements: list[Captured], directory: Path, name: str
) -> list[dict[str, Any]]:
    """EXPLAIN (ANALYZE, BUFFERS) each statement (and EXPLAIN DECLARE a streamed one) into
    `directory`/<name>.<n>.txt; what each plan shows."""
    directory.mkdir(parents=True, exist_ok=True)
    plans: list[dict[str, Any]] = []
    for number, captured in enumerate(statements, 1):
        with engine.connect() as connection:
            analyzed = _plan_text(connection, "EXPLAIN (ANALYZE, BUFFERS) ", captured)
            cursor_plan = (
                _plan_text(
                    connection, "EXPLAIN DECLARE bench_explain CURSOR WITHOUT HOLD FOR ", captured
                )
                if captured.server_cursor
                else None
            )
            connection.rollback()
        path = directory / f"{name}.{number}.txt"
        sections = [
            f"-- {name}, statement {number} of {len(statements)}"
            + (" (streamed through a server-side cursor)" if captured.server_cursor else ""),
            captured.statement.strip(),
            f"-- parameters: {captured.parameters!r}",
            "",
            "-- EXPLAIN (ANALYZE, BUFFERS)",
            analyzed,
        ]
        if cursor_plan is not None:
            sections += [
                "",
                "-- EXPLAIN DECLARE ... CURSOR (the plan the cursor runs)",
                cursor_plan,
            ]
        path.write_text("\n".join(sections) + "\n")
        times = {kind: float(ms) for kind, ms in _TIME.findall(analyzed)}
        # A streamed statement runs the cursor's plan: that is the one judged.
        scanned = sorted(set(_SEQ_SCAN.findall(cursor_plan or analyzed)))
        plans.append(
            {
                "file": str(path.relative_to(directory.parent)),
                "server_cursor": captured.server_cursor,
                "top": analyzed.splitlines()[0].split("  (")[0].strip() if analyzed else "",
                "planning_ms": times.get("Planning"),
                "execution_ms": times.get("Execution", 0.0),
                "seq_scans": scanned,
                "seq_scans_when_run_whole": sorted(set(_SEQ_SCAN.findall(analyzed))),
                "flagged_seq_scans": [table for table in scanned if table in FLAGGED_TABLES],
                "sort_spilled_to_disk": "external merge" in analyzed or "external sort" in analyzed,
                "cursor_plan_differs": (
                    None if cursor_plan is None else _shape(cursor_plan) != _shape(analyzed)
                ),
            }
        )
    return plans


def _plan_text(connection: Any, prefix: str, captured: Captured) -> str:
    result = connection.exec_driver_sql(prefix + captured.statement, captured.parameters)
    return "\n".join(str(row[0]) for row in result)


def _shape(plan: str) -> list[str]:
    """The plan's node names, without costs or timings."""
    nodes = []
    for line in plan.splitlines():
        text = line.strip().removeprefix("->").strip()
        if "(cost=" in text:
            nodes.append(text.split("  (cost=")[0])
    return nodes


# --- measuring --------------------------------------------------------------------------------


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _streamed(name: str) -> bool:
    """Measurements whose rows/s mean something: the exports and the failures lists."""
    return name.startswith(("export.", "failures.", "cli.export", "cli.failures"))


def _summary(seconds: list[float], rows: int | None, rate: bool) -> dict[str, Any]:
    best, middle = min(seconds), statistics.median(seconds)
    summary: dict[str, Any] = {
        "runs": len(seconds),
        "seconds": [round(value, 4) for value in seconds],
        "min_ms": round(best * 1000, 1),
        "median_ms": round(middle * 1000, 1),
        "rows": rows,
    }
    if rows is not None and rate:
        summary["rows_per_s"] = round(rows / middle) if middle > 0 else None
        summary["rows_per_s_best"] = round(rows / best) if best > 0 else None
    return summary


@dataclass
class Bench:
    """The state the measurements share."""

    url: str
    engine: Any
    sessions: Any
    log: StatementLog
    out: Path
    scratch: Path
    environment: dict[str, str]
    repeat: int
    export_repeat: int
    launcher: Launcher
    measurements: list[dict[str, Any]] = field(default_factory=list)

    def function(
        self,
        name: str,
        job: str | None,
        job_id: int | None,
        run: Callable[[], Any],
        *,
        repeat: int | None = None,
        explain_it: bool = True,
    ) -> dict[str, Any]:
        """Time `run()` (returns rows or a dict with "rows"); the first run's statements are
        captured and explained."""
        load_before = _load()
        seconds: list[float] = []
        last: Any = None
        statements: list[Captured] = []
        for index in range(repeat or self.repeat):
            with contextlib.ExitStack() as stack:
                if index == 0 and explain_it:
                    statements = stack.enter_context(self.log.capture())
                started = time.perf_counter()
                last = run()
                seconds.append(time.perf_counter() - started)
        load_after = _load()
        extra = last if isinstance(last, dict) else {"rows": last}
        measurement = {
            "name": name, "kind": "function", "job": job, "job_id": job_id,
            **_summary(seconds, extra.pop("rows", None), _streamed(name)), **extra,
            "load_before": load_before, "load_after": load_after,
        }  # fmt: skip
        measurement["plans"] = self._explain(name, job, statements)
        self.measurements.append(measurement)
        print(_line(measurement), flush=True)
        return measurement

    def sql_only(
        self, name: str, job: str, job_id: int, run: Callable[[], Any], why: str
    ) -> dict[str, Any]:
        """Run `run()` with every SELECT cut to LIMIT 0, to capture its statements; explain them
        (EXPLAIN ANALYZE runs each in full on the server, nothing comes to Python)."""
        load_before = _load()
        with self.log.capture(dry=True) as statements:
            run()
        plans = self._explain(name, job, list(statements))
        measurement = {
            "name": name, "kind": "sql only", "job": job, "job_id": job_id, "skipped": why,
            "server_ms": round(sum(plan["execution_ms"] for plan in plans), 1),
            "load_before": load_before, "load_after": _load(), "plans": plans,
        }  # fmt: skip
        self.measurements.append(measurement)
        print(_line(measurement), flush=True)
        return measurement

    def _explain(self, name: str, job: str | None, statements: list[Captured]) -> list[Any]:
        if not statements:
            return []
        return explain(self.engine, statements, self.out / "explain", f"{name}.{job or 'all'}")

    def cli(
        self,
        name: str,
        job: str | None,
        job_id: int | None,
        arguments: list[str],
        *,
        repeat: int | None = None,
        rows: Callable[[Path, str], int | None] | None = None,
        output: Path | None = None,
    ) -> dict[str, Any]:
        """Time `python -m emolabel ARGUMENTS` in a fresh process, `repeat` times: wall seconds,
        the child's peak RSS, and rows (from its stdout file and output)."""
        load_before = _load()
        seconds: list[float] = []
        peaks: list[float] = []
        counted: int | None = None
        output_bytes: int | None = None
        for _ in range(repeat or self.repeat):
            stdout = self.scratch / "stdout.txt"
            stderr = self.scratch / "stderr.txt"
            elapsed, status, peak = self.launcher.run(
                [sys.executable, "-m", "emolabel", *arguments],
                self.environment, self.scratch, stdout, stderr,
            )  # fmt: skip
            if status != 0:
                raise RuntimeError(
                    f"emolabel {' '.join(arguments)} exited with {status}:"
                    f" {stderr.read_text()[-2000:]}"
                )
            seconds.append(elapsed)
            peaks.append(peak)
            text = stdout.read_text(errors="replace")
            counted = rows(stdout, text) if rows is not None else None
            if output is not None and output.exists():
                output_bytes = output.stat().st_size
                output.unlink()
        measurement = {
            "name": name, "kind": "cli", "job": job, "job_id": job_id,
            "command": "emolabel " + " ".join(arguments),
            **_summary(seconds, counted, _streamed(name)),
            "peak_rss_mib": round(max(peaks), 1), "peak_rss_mib_runs": peaks,
            "load_before": load_before, "load_after": _load(),
        }  # fmt: skip
        if output_bytes is not None and counted:
            measurement["output_bytes"] = output_bytes
            measurement["output_bytes_per_row"] = round(output_bytes / counted, 1)
        self.measurements.append(measurement)
        print(_line(measurement), flush=True)
        return measurement


# Runs each command for the bench and reports its wall time and peak RSS. A child's ru_maxrss
# starts at the RSS of the process that forked it (Linux keeps the high-water mark across exec),
# so the commands are started by this small process, not by the bench, whose RSS would show.
LAUNCHER = """
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    with open(job["stdout"], "wb") as out, open(job["stderr"], "wb") as err:
        started = time.perf_counter()
        child = subprocess.Popen(job["command"], env=job["env"], cwd=job["cwd"],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    print(json.dumps({"seconds": seconds, "status": child.returncode,
                      "maxrss_kib": usage.ru_maxrss}), flush=True)
"""


class Launcher:
    """A small Python process that runs commands one at a time (see LAUNCHER)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-S", "-c", LAUNCHER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(
        self,
        command: list[str],
        environment: dict[str, str],
        cwd: Path,
        stdout: Path,
        stderr: Path,
    ) -> tuple[float, int, float]:
        """Run `command`; (wall seconds, exit status, peak RSS MiB of that child alone)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        job = {"command": command, "env": environment, "cwd": str(cwd), "stdout": str(stdout),
               "stderr": str(stderr)}  # fmt: skip
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError("the launcher process ended")
        done = json.loads(answer)
        return float(done["seconds"]), int(done["status"]), done["maxrss_kib"] / 1024

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def _lines(path: Path, text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip())


def _written(path: Path, text: str) -> int | None:
    found = re.search(r"(\d+) rows written", text)
    return int(found.group(1)) if found else None


def stream(rows: Iterator[Any], expected: int) -> dict[str, Any]:
    """Count `rows`, noting this process's RSS when 10%, 50% and 100% of `expected` went by."""
    _reset_peak_rss()
    start = _rss_kib()["VmRSS"]
    marks = [max(1, expected * percent // 100) for percent in (10, 50, 100)]
    checkpoints: list[dict[str, Any]] = []
    count = 0
    for _ in rows:
        count += 1
        if len(checkpoints) < len(marks) and count == marks[len(checkpoints)]:
            checkpoints.append({"rows": count, "rss_mib": round(_rss_kib()["VmRSS"] / 1024, 1)})
    status = _rss_kib()
    return {
        "rows": count,
        "rss_at_start_mib": round(start / 1024, 1),
        "rss_checkpoints": checkpoints,
        "rss_growth_10_to_100_mib": (
            round(checkpoints[-1]["rss_mib"] - checkpoints[0]["rss_mib"], 1)
            if len(checkpoints) == len(marks)
            else None
        ),
        "vm_hwm_mib": round(status["VmHWM"] / 1024, 1),
    }


# --- the measurements -------------------------------------------------------------------------


def measure_status(bench: Bench, job: str, job_id: int) -> None:
    from db.repository import get_job, job_counts, outcome_reasons

    def get() -> int:
        with bench.sessions() as session:
            return 1 if get_job(session=session, job_id=job_id) is not None else 0

    def counts() -> dict[str, Any]:
        with bench.sessions() as session:
            found = job_counts(session=session, job_id=job_id)
        return {"rows": found.total, "counts": _counts(found)}

    def reasons() -> dict[str, Any]:
        with bench.sessions() as session:
            found = outcome_reasons(session=session, job_id=job_id)
        return {"rows": len(found), "reasons": {f"{s}:{r}": n for s, r, n in found}}

    def together() -> int:
        # The three in one session, as `emolabel status JOB` calls them.
        with bench.sessions() as session:
            get_job(session=session, job_id=job_id)
            found = job_counts(session=session, job_id=job_id)
            outcome_reasons(session=session, job_id=job_id)
        return found.total

    bench.function("status.get_job", job, job_id, get)
    bench.function("status.job_counts", job, job_id, counts)
    bench.function("status.outcome_reasons", job, job_id, reasons)
    bench.function("status.functions", job, job_id, together, explain_it=False)
    bench.cli("cli.status_job", job, job_id, ["status", str(job_id)])


def measure_status_common(bench: Bench) -> None:
    """What `emolabel status` does besides the job's counts, and the latest-jobs list."""
    from db.reconcile import images_without_message
    from db.repository import job_counts, latest_jobs
    from db.session import ready_schema

    def orphans() -> int:
        return images_without_message(sessions=bench.sessions, broker_task_ids=set, stale_after=600)

    def schema() -> None:
        ready_schema(bench.url, migrate=False)

    def latest() -> int:
        with bench.sessions() as session:
            jobs = latest_jobs(session=session, limit=20)
            return sum(job_counts(session=session, job_id=row.id).total for row in jobs)

    def page_jobs() -> int:
        with bench.sessions() as session:
            return len(latest_jobs(session=session, limit=50))

    bench.cli("cli.help", None, None, ["--help"])
    bench.function("status.ready_schema", None, None, schema, explain_it=False)
    bench.function("status.open_chunks", None, None, orphans)
    bench.function("status_list.functions", None, None, latest)
    bench.function("review.latest_jobs", None, None, page_jobs)
    bench.cli("cli.status_list", None, None, ["status"])


def measure_export(bench: Bench, job: str, job_id: int, rows: int) -> None:
    from db.repository import iter_ledger_rows
    from emolabel import exports

    def ledger() -> dict[str, Any]:
        with bench.sessions() as session:
            records = map(
                exports.ledger_record,
                iter_ledger_rows(
                    session=session, states=exports.parse_states(["all"]), job_id=job_id
                ),
            )
            return stream(records, rows)

    def python_csv() -> int:
        # What the command wrote on PostgreSQL before the server wrote exports itself, and
        # writes on SQLite still: the Python CSV writer over the same rows.
        output = bench.scratch / f"export-python-{job_id}.csv"
        with bench.sessions() as session, output.open("w", newline="") as handle:
            records = map(
                exports.ledger_record,
                iter_ledger_rows(
                    session=session, states=exports.parse_states(["all"]), job_id=job_id
                ),
            )
            return exports.write_records(records, exports.LEDGER_COLUMNS, "csv", handle, None)

    bench.function("export.iter_ledger_rows", job, job_id, ledger, repeat=bench.export_repeat)
    bench.function("export.python_csv", job, job_id, python_csv, repeat=bench.export_repeat)
    for output_format in ("csv", "jsonl"):
        output = bench.scratch / f"export-{job_id}.{output_format}"
        bench.cli(
            f"cli.export_{output_format}", job, job_id,
            ["export", "--job", str(job_id), "--state", "all", "--format", output_format,
             "--output", str(output)],
            repeat=bench.export_repeat, rows=_written, output=output,
        )  # fmt: skip


def measure_failures(bench: Bench, job: str, job_id: int) -> None:
    from db.repository import failed_items

    def failed() -> int:
        with bench.sessions() as session:
            return sum(1 for _ in failed_items(session=session, job_id=job_id))

    bench.function("failures.failed_items", job, job_id, failed, repeat=bench.export_repeat)
    bench.cli(
        "cli.failures_json", job, job_id, ["failures", "--job", str(job_id), "--json"],
        repeat=bench.export_repeat, rows=_lines,
    )  # fmt: skip


def measure_review(
    bench: Bench, job: str, job_id: int, labels: int, review_max_rows: int, page_size: int
) -> None:
    from db.repository import (
        ReviewFilters,
        human_labels,
        model_classes,
        ranked_review_items,
        review_facets,
        review_items,
    )

    def items(uncertain: bool = False) -> Callable[[], int]:
        def run() -> int:
            with bench.sessions() as session:
                filters = ReviewFilters(job_id=job_id, uncertain_only=uncertain)
                return len(review_items(session=session, filters=filters))

        return run

    def facets() -> int:
        with bench.sessions() as session:
            found = review_facets(session=session, job_id=job_id)
            return len(found.thresholds) + len(found.labels) + len(found.versions)

    def ranked(uncertain: bool = False, page: int = 1) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            with bench.sessions() as session:
                found = review_facets(session=session, job_id=job_id)
                shown = ranked_review_items(
                    session=session,
                    filters=ReviewFilters(job_id=job_id, uncertain_only=uncertain),
                    facets=found,
                    classes=model_classes(session=session, versions=found.versions),
                    offset=(page - 1) * page_size,
                    limit=page_size,
                )
                return {"rows": len(shown.items), "total": shown.total}

        return run

    first_page = _first_page_ids(bench, job_id, page_size)

    def humans() -> int:
        with bench.sessions() as session:
            return len(human_labels(session=session, image_ids=first_page))

    def classes() -> int:
        with bench.sessions() as session:
            return len(model_classes(session=session, versions={MODEL_VERSION}))

    # The reference: every label of the job into Python, as the page did before it ranked in SQL.
    why = (
        f"the job has {labels:,} labels, over --review-max-rows {review_max_rows:,}: this would"
        " load every one into Python; its SQL is measured on the server only"
    )
    if labels > review_max_rows:
        bench.sql_only("review.review_items", job, job_id, items(), why)
    else:
        bench.function("review.review_items", job, job_id, items())
    uncertain_share = (UNCERTAIN_BELOW - LABELED_BELOW) / 1000
    if labels * uncertain_share > review_max_rows:
        bench.sql_only("review.review_items_uncertain", job, job_id, items(True), why)
    else:
        bench.function("review.review_items_uncertain", job, job_id, items(True))
    # What the page runs: the job's facets, then one page ranked in SQL (and its count).
    bench.function("review.review_facets", job, job_id, facets)
    bench.function("review.ranked_page", job, job_id, ranked())
    bench.function("review.ranked_page_10", job, job_id, ranked(page=10))
    bench.function("review.ranked_page_uncertain", job, job_id, ranked(True))
    bench.function("review.human_labels_page", job, job_id, humans)
    bench.function("review.model_classes", job, job_id, classes)
    # The first view of a job counts its facets; the next views within
    # EMOLABEL_REVIEW__FACETS_SECONDS reuse them (warmed once before the timed runs).
    page = review_page(bench, job_id, facets_seconds=0)
    bench.function("review.page", job, job_id, page, explain_it=False)
    next_page = review_page(bench, job_id, facets_seconds=3600, page_number=2)
    next_page()
    bench.function("review.page_next", job, job_id, next_page, explain_it=False)


def _first_page_ids(bench: Bench, job_id: int, page_size: int) -> list[int]:
    """The image ids of a page's worth of the job's reviewed images (human_labels' input)."""
    from sqlalchemy import text

    with bench.engine.connect() as connection:
        found = connection.execute(
            text(
                "SELECT i.image_id FROM job_items i WHERE i.job_id = :job"
                " ORDER BY (i.image_id % 1000 = 500) DESC, i.image_id LIMIT :size"
            ),
            {"job": job_id, "size": page_size},
        )
        return [int(row[0]) for row in found]


def review_page(
    bench: Bench, job_id: int, *, facets_seconds: float, page_number: int = 1
) -> Callable[[], dict[str, Any]]:
    """The review page's handler on ?job=JOB&page=N, called directly (no HTTP, no
    authentication), in an app that keeps a job's facets for `facets_seconds`."""
    from starlette.requests import Request

    from core.settings import ReviewSettings, Settings
    from emolabel.review.app import make_app, page
    from emolabel.review.auth import Credentials

    settings = Settings(
        home=bench.scratch / "home",
        models_dir=bench.scratch / "models",
        database_url=bench.url,
        review=ReviewSettings(facets_seconds=facets_seconds),
    )
    app = make_app(settings, bench.sessions, Credentials.generate("bench"))

    def run() -> dict[str, Any]:
        scope = {
            "type": "http", "method": "GET", "path": "/", "root_path": "", "scheme": "http",
            "query_string": f"job={job_id}&page={page_number}".encode(), "headers": [], "app": app,
            "server": ("127.0.0.1", 8765), "state": {"reviewer": "bench"},
        }  # fmt: skip
        response = page(Request(scope))
        if response.status_code != 200:
            raise RuntimeError(f"the review page answered {response.status_code}")
        return {"rows": None, "html_bytes": len(bytes(response.body))}

    return run


# --- bytes ------------------------------------------------------------------------------------


def database_bytes(engine: Any, rows: int) -> dict[str, Any]:
    """Heap, indexes, TOAST and total of each table, per image too; each index's size."""
    from sqlalchemy import text

    tables: dict[str, Any] = {}
    indexes: dict[str, Any] = {}
    with engine.connect() as connection:
        for table in SIZED_TABLES:
            heap, index_bytes, total, live = connection.execute(
                text(
                    "SELECT pg_relation_size(c.oid), pg_indexes_size(c.oid),"
                    " pg_total_relation_size(c.oid), c.reltuples"
                    " FROM pg_class c WHERE c.oid = CAST(:name AS regclass)"
                ),
                {"name": table},
            ).one()
            toast = total - heap - index_bytes
            tables[table] = {
                "rows_estimate": max(int(live), 0),
                "heap_bytes": heap, "index_bytes": index_bytes, "toast_bytes": toast,
                "total_bytes": total,
                "heap_per_image": round(heap / rows, 1),
                "index_per_image": round(index_bytes / rows, 1),
                "toast_per_image": round(toast / rows, 1),
                "total_per_image": round(total / rows, 1),
            }  # fmt: skip
            for name, size in connection.execute(
                text(
                    "SELECT i.indexrelid::regclass::text, pg_relation_size(i.indexrelid)"
                    " FROM pg_index i WHERE i.indrelid = CAST(:name AS regclass) ORDER BY 1"
                ),
                {"name": table},
            ):
                indexes[str(name)] = {"table": table, "bytes": int(size),
                                      "per_image": round(int(size) / rows, 1)}  # fmt: skip
        database = int(connection.execute(text("SELECT pg_database_size(current_database())"))
                       .scalar_one())  # fmt: skip
        # The widest values (mean of the non-NULL ones in the first 100,000 rows): what a row's
        # bytes are mostly made of.
        columns: dict[str, float] = {}
        for table, column in COLUMN_SAMPLES:
            mean = connection.execute(
                text(
                    f"SELECT avg(pg_column_size({column}))"
                    f" FROM (SELECT {column} FROM {table} LIMIT 100000) AS sample"
                )
            ).scalar_one()
            columns[f"{table}.{column}"] = round(float(mean or 0), 1)
    ledger = ("images", "job_items", "results")
    return {
        "tables": tables,
        "indexes": indexes,
        "ledger_per_image": round(sum(tables[t]["total_bytes"] for t in ledger) / rows, 1),
        "ledger_and_chunks_per_image": round(
            sum(tables[t]["total_bytes"] for t in (*ledger, "chunks")) / rows, 1
        ),
        "all_tables_per_image": round(sum(t["total_bytes"] for t in tables.values()) / rows, 1),
        "database_bytes": database,
        "database_per_image": round(database / rows, 1),
        "mean_column_bytes": columns,
    }


# --- the report -------------------------------------------------------------------------------


def _counts(counts: Any) -> dict[str, int]:
    return {
        "enqueued": counts.enqueued, "labeled": counts.labeled, "uncertain": counts.uncertain,
        "no_face": counts.no_face, "failed": counts.failed, "skipped": counts.skipped,
        "pending": counts.pending,
    }  # fmt: skip


def environment(engine: Any) -> dict[str, Any]:
    from sqlalchemy import text

    versions: dict[str, str | None] = package_versions(("sqlalchemy", "psycopg", "alembic"))
    server: dict[str, str] = {}
    with engine.connect() as connection:
        versions["postgresql"] = str(connection.execute(text("SHOW server_version")).scalar())
        for setting in SERVER_SETTINGS:
            server[setting] = str(connection.execute(text(f"SHOW {setting}")).scalar())
    return {
        "python": platform.python_version(),
        **machine(),
        "load_average_at_start": _load(),
        "versions": versions,
        "postgresql_settings": server,
    }


def _line(measurement: dict[str, Any]) -> str:
    """One measurement as a table row."""
    flags = sorted({t for p in measurement.get("plans", []) for t in p["flagged_seq_scans"]})
    spilled = any(p["sort_spilled_to_disk"] for p in measurement.get("plans", []))
    plans = measurement.get("plans", [])
    server = f"{sum(p['execution_ms'] for p in plans):.1f}" if plans else "-"
    rows = measurement.get("rows")
    rate = measurement.get("rows_per_s")
    rss = measurement.get("peak_rss_mib") or measurement.get("vm_hwm_mib")
    if "skipped" in measurement:
        timing = f"{'(not run in Python)':>21}"
    else:
        timing = f"{measurement['min_ms']:>10.1f}{measurement['median_ms']:>11.1f}"
    return (
        f"{measurement['name']:<34}{measurement['job'] or '-':<6}{timing}"
        f"{server:>11}{'-' if rows is None else f'{rows:,}':>12}"
        f"{'-' if rate is None else f'{rate:,}':>11}{'-' if rss is None else f'{rss:.0f}':>8}"
        f"  {','.join(flags) or '-'}{' +disk sort' if spilled else ''}"
    )


HEADER = (
    f"{'measurement':<34}{'job':<6}{'min ms':>10}{'median ms':>11}{'server ms':>11}{'rows':>12}"
    f"{'rows/s':>11}{'RSS MiB':>8}  seq scans on images/job_items/results"
)


def print_table(result: dict[str, Any]) -> None:
    print()
    print(HEADER)
    print("-" * len(HEADER))
    for measurement in result["measurements"]:
        print(_line(measurement))
    size = result["database_bytes"]
    print()
    print(
        f"{'table':<12}{'heap B/img':>11}{'index B/img':>12}{'toast B/img':>12}{'total B/img':>12}"
    )
    for table, sizes in size["tables"].items():
        print(
            f"{table:<12}{sizes['heap_per_image']:>11.1f}{sizes['index_per_image']:>12.1f}"
            f"{sizes['toast_per_image']:>12.1f}{sizes['total_per_image']:>12.1f}"
        )
    print(
        f"images + job_items + results: {size['ledger_per_image']:.0f} B per image"
        f" (with chunks {size['ledger_and_chunks_per_image']:.0f}; whole database"
        f" {size['database_per_image']:.0f})"
    )
    print(
        "mean value bytes: "
        + ", ".join(f"{name} {mean:.0f}" for name, mean in size["mean_column_bytes"].items())
    )
    for goal in result["goals"].values():
        print(f"goal: {goal['goal']}: {goal['measured']} -> {'met' if goal['met'] else 'MISSED'}"
              f" at {result['rows']:,} rows")  # fmt: skip
    ledger = result["ledger"]
    env = result["environment"]
    print(
        f"{describe(env)}; PostgreSQL {env['versions']['postgresql']}; ledger "
        + ("reused" if ledger["reused"] else f"generated in {ledger['generation']['seconds']} s")
        + f"; load {env['load_average_at_start']} at start, {result['load_average_at_end']} at end"
    )
    if ledger.get("summaries"):
        print(
            "job summaries counted (what finishing a job adds once): "
            + ", ".join(f"job {job} {seconds} s" for job, seconds in ledger["summaries"].items())
        )


def goals(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two goals, judged on the big job's medians, with what explains them: the
    command's fixed cost (the same command on the 1,000-image job) and the rest."""
    found = {(m["name"], m["job"]): m for m in measurements}
    result: dict[str, Any] = {}
    status, status_small = (
        found.get(("cli.status_job", "big")),
        found.get(("cli.status_job", "small")),
    )
    if status is not None:
        functions = found.get(("status.functions", "big"))
        help_ = found.get(("cli.help", None))
        result["status"] = {
            "goal": "emolabel status JOB under 1 s",
            "measured": f"{status['median_ms']:.0f} ms median",
            "met": status["median_ms"] < 1000,
            "median_ms": status["median_ms"],
            "queries_median_ms": functions["median_ms"] if functions else None,
            "same_command_on_small_job_median_ms": (
                status_small["median_ms"] if status_small else None
            ),
            "interpreter_and_imports_median_ms": help_["median_ms"] if help_ else None,
        }
    for output_format in ("csv", "jsonl"):
        export = found.get((f"cli.export_{output_format}", "big"))
        small = found.get((f"cli.export_{output_format}", "small"))
        if export is None:
            continue
        marginal = None
        if small is not None and export["rows"] and small["rows"] is not None:
            extra_s = (export["median_ms"] - small["median_ms"]) / 1000
            if extra_s > 0:
                marginal = round((export["rows"] - small["rows"]) / extra_s)
        result[f"export_{output_format}"] = {
            "goal": f"emolabel export ({output_format}) at 50,000 rows/s or more",
            "measured": f"{export['rows_per_s']:,} rows/s median"
            + (f" ({marginal:,} rows/s past the fixed cost)" if marginal else ""),
            "met": (export["rows_per_s"] or 0) >= 50_000,
            "rows_per_s": export["rows_per_s"],
            "rows_per_s_past_fixed_cost": marginal,
            "fixed_cost_ms": small["median_ms"] if small else None,
        }
    return result


def seq_scans(measurements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"measurement": m["name"], "job": m["job"], "file": plan["file"],
         "tables": plan["flagged_seq_scans"], "execution_ms": plan["execution_ms"]}
        for m in measurements
        for plan in m.get("plans", [])
        if plan["flagged_seq_scans"]
    ]  # fmt: skip


# --- main -------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ledger_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=10_000_000, help="images in the ledger")
    parser.add_argument(
        "--database-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/ledger_scale",
        help="a PostgreSQL database (created when missing) for this bench's ledger alone",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/ledger-scale"))
    parser.add_argument("--classes", type=int, default=7, choices=range(2, 8),
                        help="classes of the model (2 to 7): the size of `scores`")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=5, help="runs of each quick measurement")
    parser.add_argument(
        "--export-repeat", type=int, default=3, help="runs of each export and failures list"
    )
    parser.add_argument(
        "--review-max-rows",
        type=int,
        default=1_000_000,
        help="run review_items in Python only for jobs with at most this many labels",
    )
    parser.add_argument(
        "--slice-rows",
        type=int,
        default=SLICE_ROWS,
        help=f"images written per transaction (a multiple of {CHUNK_SIZE * 125:,})",
    )
    parser.add_argument(
        "--regenerate", action="store_true", help="write the ledger again even if it matches"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=PARTS,
        help="measure only this part (repeat the option for several; default: all of them)",
    )
    arguments = parser.parse_args(argv)
    if arguments.rows < MIN_ROWS:
        parser.error(f"--rows must be at least {MIN_ROWS:,}")
    if arguments.slice_rows < 1 or arguments.slice_rows % (CHUNK_SIZE * 125):
        parser.error(f"--slice-rows must be a positive multiple of {CHUNK_SIZE * 125:,}")
    if arguments.repeat < 1 or arguments.export_repeat < 1:
        parser.error("--repeat and --export-repeat must be at least 1")
    from sqlalchemy import make_url

    if make_url(arguments.database_url).get_backend_name() != "postgresql":
        parser.error("--database-url must be a PostgreSQL URL")
    return arguments


def prepare_ledger(arguments: argparse.Namespace, engine: Any) -> dict[str, Any]:
    from db.session import upgrade

    created = ensure_database(arguments.database_url)
    upgrade(arguments.database_url)
    state = ledger_state(engine, arguments.rows, arguments.classes)
    if state == "foreign":
        raise SystemExit(
            "the database holds jobs or images this bench did not write: give it a database of"
            " its own (--database-url), which it creates when missing"
        )
    if state == "reuse" and not arguments.regenerate:
        print(f"reusing the generated ledger of {arguments.rows:,} images", flush=True)
        return {"reused": True, "database_created": created, "summaries": summarize(engine)}
    print(f"writing a ledger of {arguments.rows:,} images", flush=True)
    generation = generate(engine, arguments.rows, arguments.classes, arguments.slice_rows,
                          truncate=state != "empty")  # fmt: skip
    print(
        f"ledger written in {generation['write_seconds']} s, VACUUM ANALYZE"
        f" {generation['vacuum_analyze_seconds']} s",
        flush=True,
    )
    return {
        "reused": False,
        "database_created": created,
        "generation": generation,
        "summaries": summarize(engine),
    }


def summarize(engine: Any) -> dict[str, float]:
    """What `finish_job_if_complete` does once when a job finishes: count its rows into
    `jobs.summary`. The generated jobs are written done, so it is done here, timed per job (a
    ledger generated before the summary existed gets it too)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.models import Job, JobStatus
    from db.repository import keep_job_summary

    seconds: dict[str, float] = {}
    with Session(engine) as session, session.begin():
        done = session.scalars(
            select(Job.id).where(Job.status == JobStatus.DONE, Job.summary.is_(None))
        ).all()
        for job_id in done:
            started = time.perf_counter()
            keep_job_summary(session=session, job_id=job_id)
            seconds[str(job_id)] = round(time.perf_counter() - started, 3)
    return seconds


def cli_environment(url: str, home: Path) -> dict[str, str]:
    """The CLI's environment: this database, a home of its own, no other EMOLABEL_* setting."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("EMOLABEL_")}
    path = os.pathsep.join(filter(None, [str(REPOSITORY), base.get("PYTHONPATH")]))
    return {
        **base,
        "PYTHONPATH": path,
        "EMOLABEL_DATABASE_URL": url,
        "EMOLABEL_HOME": str(home / "home"),
        "EMOLABEL_MODELS_DIR": str(home / "models"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy import make_url

    from core.settings import ReviewSettings
    from db.repository import job_counts, outcome_reasons
    from db.session import make_engine, make_sessionmaker

    out: Path = arguments.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if (out / "explain").exists():
        shutil.rmtree(out / "explain")
    url = arguments.database_url
    rows = arguments.rows
    engine = make_engine(url)
    scratch = Path(tempfile.mkdtemp(prefix="ledger-scale-", dir="/tmp"))
    launcher = Launcher()
    try:
        ledger = prepare_ledger(arguments, engine)
        small_id = BIG_JOB + SMALL_JOBS
        expected = {
            "big": expected_big_job(rows),
            "small": expected_small_job(SMALL_JOBS - 1, rows),
        }
        env = environment(engine)
        log = StatementLog(engine)
        sessions = make_sessionmaker(engine)
        with sessions() as session:  # connect before capturing: no dialect start-up queries
            measured = {
                name: {
                    "counts": _counts(job_counts(session=session, job_id=e.job_id)),
                    "reasons": {
                        f"{state}:{reason}": count
                        for state, reason, count in outcome_reasons(
                            session=session, job_id=e.job_id
                        )
                    },
                }
                for name, e in expected.items()
            }
        (scratch / "home").mkdir()
        bench = Bench(
            url=url, engine=engine, sessions=sessions, log=log, out=out, scratch=scratch,
            environment=cli_environment(url, scratch), repeat=arguments.repeat,
            export_repeat=arguments.export_repeat, launcher=launcher,
        )  # fmt: skip
        print()
        print(HEADER)
        print("-" * len(HEADER))
        only = set(arguments.only or PARTS)
        if "status" in only:
            measure_status_common(bench)
        page_size = ReviewSettings().page_size
        for job, job_id in (("big", BIG_JOB), ("small", small_id)):
            e = expected[job]
            if "status" in only:
                measure_status(bench, job, job_id)
            if "export" in only:
                measure_export(bench, job, job_id, e.items)
            if "failures" in only:
                measure_failures(bench, job, job_id)
            if "review" in only:
                measure_review(bench, job, job_id, e.results, arguments.review_max_rows, page_size)
        sizes = database_bytes(engine, rows)
    finally:
        launcher.close()
        engine.dispose()
        shutil.rmtree(scratch, ignore_errors=True)
    measurements = bench.measurements
    return {
        "benchmark": "ledger_scale",
        "command": " ".join(["python -m bench.ledger_scale", *sys.argv[1:]]),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rows": rows,
        "classes": arguments.classes,
        "database_url": make_url(url).render_as_string(hide_password=True),
        "environment": env,
        "ledger": {
            **ledger,
            "model_version": MODEL_VERSION,
            "jobs": {
                name: {
                    "job_id": e.job_id,
                    "items": e.items,
                    "expected_counts": {"enqueued": e.items, **e.states},
                    "expected_reasons": e.reasons,
                    "expected_labels": e.results,
                    **measured[name],
                }
                for name, e in expected.items()
            },
        },
        "measurements": measurements,
        "seq_scans": seq_scans(measurements),
        "database_bytes": sizes,
        "goals": goals(measurements),
        "load_average_at_end": _load(),
    }


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    result = run(arguments)
    report = arguments.out.resolve() / f"ledger-scale-{arguments.rows}.json"
    report.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
