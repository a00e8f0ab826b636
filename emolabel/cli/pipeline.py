"""Pipeline commands: `db`, `scan`, `worker`, `label`, `status`, `export`, `failures`,
`republish`, `reconcile`.

They share one set-up: settings -> broker reachable (the embedded Redis started when none is
configured) -> database migrated (the embedded SQLite migrates itself; PostgreSQL must be at head,
`emolabel db upgrade` does that) -> an active model in the registry.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from emolabel.cli.app import (
    app,
    broker_for,
    celery_for,
    console,
    fail,
    first_line,
    safe_url,
    sessions_for,
    settings_from,
)

db_app = typer.Typer(
    help="Database schema: upgrade, check, current revision.", no_args_is_help=True
)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the newest schema (safe to run again)."""
    from db.session import upgrade

    settings = settings_from()
    if settings.database_url is None:
        settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    console.print(f"database {safe_url(settings.effective_database_url)} is at the newest schema")


@db_app.command("check")
def db_check() -> None:
    """Fail unless the database schema matches the code's models and migrations."""
    from db.session import check_schema

    settings = settings_from()
    try:
        check_schema(settings.effective_database_url)
    except Exception as error:
        fail(first_line(error, settings.effective_database_url))
    console.print("schema is up to date")


class Terminated(KeyboardInterrupt):
    """SIGTERM during a scan (docker stop, systemd, kill)."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into an exception for the scan's duration, so it ends the way an interrupt
    does: what it recorded is published or left for the reconciler, and the job says where the
    scan stopped, instead of staying `scanning` until the reconciler notices its heartbeat."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _scan(
    settings: Settings,
    sessions: sessionmaker[Session],
    source_text: str,
    *,
    force: bool,
    where: list[str],
) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from core.publishing import celery_publisher
    from core.storage.sources import open_source
    from producer.enqueue import ScanProgress, parse_where, run_scan
    from training.registry import ensure_active_model

    selections = [parse_where(text) for text in where]
    with sessions.begin() as session:
        model = ensure_active_model(
            session=session, models_dir=settings.models_dir, name=settings.model_name
        )
        version = model.version
    secret = settings.s3.secret_key.get_secret_value() if settings.s3.secret_key else None
    source = open_source(
        source_text,
        max_file_bytes=settings.limits.max_file_bytes,
        follow_symlinks=settings.scan.follow_symlinks,
        endpoint_url=settings.s3.endpoint_url,
        key=settings.s3.access_key,
        secret=secret,
        region=settings.s3.region,
    )
    publish = celery_publisher(celery_for(settings), settings.queue)
    columns = (
        TextColumn("scanning"),
        BarColumn(),
        TextColumn(
            "{task.fields[seen]} files, {task.fields[enqueued]} to label, "
            "{task.fields[skipped]} skipped, {task.fields[chunks]} chunks"
        ),
        TimeElapsedColumn(),
    )
    with _terminate_as_interrupt(), Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("scan", total=None, seen=0, enqueued=0, skipped=0, chunks=0)

        def show(progress: ScanProgress) -> None:
            bar.update(
                task,
                seen=progress.seen,
                enqueued=progress.enqueued,
                skipped=progress.skipped,
                chunks=progress.chunks,
            )

        summary = run_scan(
            source,
            sessions=sessions,
            publish=publish,
            chunk_size=settings.scan.chunk_size,
            chunk_bytes=settings.scan.chunk_bytes,
            model_version=version,
            force=force,
            where=selections,
            progress=show,
        )
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(summary.skipped_by_reason.items()))
    console.print(
        f"job {summary.job_id}: {summary.seen} files seen, {summary.enqueued_images} to label in "
        f"{summary.chunks} chunks with model {version}"
        + (f"; skipped {skipped}" if skipped else ""),
        highlight=False,
    )
    return summary


@app.command()
def scan(
    source: Annotated[str, typer.Argument(help="A folder or s3://bucket/prefix.")],
    force: Annotated[
        bool, typer.Option(help="Relabel images already labeled by this model.")
    ] = False,
    where: Annotated[
        list[str] | None,
        typer.Option(help="Relabel only: older-model | confidence<0.6 | failed (repeatable)."),
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(min=1, help="Image URIs per message.")] = None,
) -> None:
    """Walk a source and enqueue chunks of image URIs for the workers; prints the job id."""
    base = settings_from()
    settings = (
        base
        if chunk_size is None
        else base.model_copy(
            update={"scan": base.scan.model_copy(update={"chunk_size": chunk_size})}
        )
    )
    broker_for(settings)
    _scan(settings, sessions_for(settings), source, force=force, where=where or [])


@app.command()
def republish(
    job: Annotated[int, typer.Argument(help="The job whose chunks to send again.")],
    older_than: Annotated[
        float | None,
        typer.Option(help="Also resend published chunks unfinished after this many seconds."),
    ] = None,
) -> None:
    """Publish a job's recorded-but-unpublished chunks (after a broker outage or a lost message)."""
    from core.publishing import celery_publisher
    from db.outbox import republish_unpublished

    settings = settings_from()
    broker_for(settings)
    sessions = sessions_for(settings)
    count = republish_unpublished(
        job,
        sessions=sessions,
        publish=celery_publisher(celery_for(settings), settings.queue),
        older_than=older_than,
    )
    console.print(f"job {job}: {count} chunks published", highlight=False)


@app.command()
def reconcile() -> None:
    """Finish what crashes left half-done: resend chunks with no message in Redis, end scans
    whose producer is gone (the `emolabel.reconcile` beat task runs the same every few minutes)."""
    from core.broker import redis_task_ids
    from core.publishing import celery_publisher
    from db.reconcile import reconcile as run_reconcile

    settings = settings_from()
    broker_for(settings)
    sessions = sessions_for(settings)
    report = run_reconcile(
        sessions=sessions,
        publish=celery_publisher(celery_for(settings), settings.queue),
        broker_task_ids=redis_task_ids(settings.effective_broker_url, settings.queue),
        settings=settings.reconcile,
    )
    sent = sum(report.chunks_sent.values())
    console.print(
        f"scans ended: {len(report.scans_ended)}; chunks sent again: {sent}"
        f" ({report.images_without_message} pending images had no message)",
        highlight=False,
    )


@app.command("worker")
def run_worker(
    concurrency: Annotated[int | None, typer.Option(min=1, help="Worker processes.")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Node name, e.g. gpu0@%h.")] = None,
    retrain: Annotated[
        bool,
        typer.Option(
            "--retrain",
            help="Consume only the retraining queue, one run at a time (a retrainer service), "
            "instead of the labeling queue.",
        ),
    ] = False,
) -> None:
    """Run a Celery worker in the foreground (same as `celery -A worker worker`).

    A worker labels (it consumes `EMOLABEL_QUEUE`) unless `--retrain` makes it the retrainer:
    a retraining run takes hours, and must not sit in front of label chunks.
    """
    settings = settings_from()
    broker_for(settings)
    sessions_for(settings)  # migrate or check before taking work
    from core.names import retrain_queue

    queue = retrain_queue(settings) if retrain else settings.queue
    arguments = ["worker", f"--loglevel={loglevel}", f"--queues={queue}"]
    from worker.resources import worker_layout

    if retrain and concurrency not in (None, 1):
        fail("a retrainer runs one retraining at a time: drop --concurrency or set it to 1")
    processes = 1 if retrain else concurrency or worker_layout(settings.worker).processes
    arguments.append(f"--concurrency={processes}")
    if hostname:
        arguments.append(f"--hostname={hostname}")
    _metrics_directory_for_pool(settings)
    celery_app = celery_for(settings)
    celery_app.loader.import_default_modules()
    celery_app.worker_main(arguments)


@contextmanager
def _local_worker_if_needed(settings: Settings) -> Iterator[bool]:
    from emolabel.embedded import start_local_worker, worker_running

    if not settings.embedded_broker or worker_running(celery_for(settings)):
        yield False
        return
    console.print("starting a local worker (embedded default)", highlight=False)
    with start_local_worker(settings):
        yield True


def _compact_table(columns: tuple[str, ...], *, left: tuple[str, ...] = (), **kwargs: Any) -> Table:
    """A table whose headers are never cut: no box, one space between columns, each column at
    least as wide as its header, so nine count columns fit in 80 terminal columns."""
    table = Table(box=None, pad_edge=False, padding=(0, 0, 0, 1), header_style="bold", **kwargs)
    for column in columns:
        table.add_column(
            column,
            justify="left" if column in left else "right",
            no_wrap=True,
            min_width=len(column),
        )
    return table


def _counts_table(job_id: int, counts: Any, rate: float, eta: float | None) -> Table:
    table = _compact_table(
        ("labeled", "uncertain", "no_face", "failed", "skipped", "remaining", "images/s", "ETA"),
        title=f"job {job_id}",
    )
    table.add_row(
        str(counts.labeled),
        str(counts.uncertain),
        str(counts.no_face),
        str(counts.failed),
        str(counts.skipped),
        str(counts.pending),
        f"{rate:.1f}",
        "-" if eta is None else f"{eta:.0f}s",
    )
    return table


def _follow(sessions: sessionmaker[Session], job_id: int, poll: float = 0.5) -> Any:
    from db.repository import job_counts

    started = time.monotonic()
    with sessions() as session:
        first = job_counts(session=session, job_id=job_id)
    done_at_start = first.done
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while True:
            with sessions() as session:
                counts = job_counts(session=session, job_id=job_id)
            elapsed = max(time.monotonic() - started, 1e-6)
            rate = (counts.done - done_at_start) / elapsed
            eta = counts.pending / rate if rate > 0 else None
            live.update(_counts_table(job_id, counts, rate, eta))
            if counts.pending == 0:
                return counts
            time.sleep(poll)


@app.command()
def label(
    source: Annotated[str, typer.Argument(help="A folder or s3://bucket/prefix.")],
    force: Annotated[
        bool, typer.Option(help="Relabel images already labeled by this model.")
    ] = False,
    where: Annotated[list[str] | None, typer.Option(help="As for `scan`.")] = None,
) -> None:
    """Scan, then follow the job live until every image is labeled, uncertain, no_face, failed
    or skipped."""
    settings = settings_from()
    broker_for(settings)
    sessions = sessions_for(settings)
    summary = _scan(settings, sessions, source, force=force, where=where or [])
    with _local_worker_if_needed(settings):
        counts = _follow(sessions, summary.job_id)
    console.print()
    console.print(
        f"done: {counts.labeled} labeled, {counts.uncertain} uncertain, {counts.no_face} no_face, "
        f"{counts.failed} failed, "
        f"{counts.skipped} skipped "
        f"of {counts.enqueued} (see `emolabel status {summary.job_id}`, `emolabel export`)",
        highlight=False,
    )


COUNT_COLUMNS = ("enqueued", "labeled", "uncertain", "no_face", "failed", "skipped", "pending")
"""`emolabel status`'s counts, each a `JobCounts` field; they balance (see the README)."""


@app.command()
def status(
    job: Annotated[int | None, typer.Argument(help="A job id (default: the latest jobs).")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per job, for scripts.")
    ] = False,
) -> None:
    """Jobs and their counts; with a job id, also why images failed or were skipped."""
    from db.repository import NotFoundError, get_job, job_counts, latest_jobs, outcome_reasons

    settings = settings_from()
    sessions = sessions_for(settings)
    with sessions() as session:
        jobs = (
            [get_job(session=session, job_id=job)]
            if job is not None
            else latest_jobs(session=session, limit=20)
        )
        if job is not None and jobs[0] is None:
            fail(f"no job {job}")
        # The counts in columns, what each job ran on below them: readable at 80 columns.
        table = _compact_table(("job", "status", *COUNT_COLUMNS), left=("status",))
        about: list[str] = []
        for row in jobs:
            assert row is not None
            try:
                counts = job_counts(session=session, job_id=row.id)
            except NotFoundError:
                continue
            if as_json:
                record = {
                    "job": row.id,
                    "status": row.status,
                    **{column: getattr(counts, column) for column in COUNT_COLUMNS},
                    "source": row.source,
                    "model_version": row.model_version,
                    "created_at": row.created_at.isoformat(),
                }
                if job is not None:
                    record["reasons"] = [
                        {"state": state, "reason": reason, "count": count}
                        for state, reason, count in outcome_reasons(session=session, job_id=job)
                    ]
                sys.stdout.write(json.dumps(record) + "\n")
                continue
            table.add_row(
                str(row.id),
                row.status,
                *(str(getattr(counts, column)) for column in COUNT_COLUMNS),
            )
            about.append(
                f"job {row.id}: {row.source} · model {row.model_version or '-'} · created "
                f"{row.created_at.strftime('%Y-%m-%d %H:%M:%S')}"
            )
        if as_json:
            return
        console.print(table)
        for line in about:
            console.print(line, highlight=False, soft_wrap=True)
        if job is not None:
            for state, reason, count in outcome_reasons(session=session, job_id=job):
                console.print(f"{state}: {reason}: {count}", highlight=False)
    _print_orphans(settings, sessions)


def _print_orphans(settings: Settings, sessions: sessionmaker[Session]) -> None:
    """The line an operator must not miss: images waiting for a message that no longer exists."""
    from redis.exceptions import RedisError

    from core.broker import redis_task_ids
    from db.reconcile import images_without_message

    try:
        orphans = images_without_message(
            sessions=sessions,
            broker_task_ids=redis_task_ids(settings.effective_broker_url, settings.queue),
            stale_after=settings.reconcile.stale_after,
        )
    except RedisError as error:
        console.print(f"broker not reachable, pending images not checked: {error}", highlight=False)
        return
    if orphans:
        console.print(
            f"{orphans} pending images have no message in Redis: the reconciler resends them"
            " (or run `emolabel reconcile`)",
            style="bold red",
            highlight=False,
        )


EXPORT_COLUMNS = [
    "uri",
    "label",
    "confidence",
    "model_version",
    "scores",
    "job_id",
    "outcome",
    "runner_up",
    "runner_up_confidence",
    "human_label",
    "reviewed_by",
    "reviewed_at",
]
"""An export's columns (CSV) or keys (JSON lines); whole-image model exports have these alone.

`outcome` is labeled, uncertain (below its class's threshold) or no_face; `human_label` is the
latest verdict of a person on the image (or face), `reviewed_by` and `reviewed_at` say whose and
when, empty when nobody reviewed it."""
PHOTO_COLUMNS = [*EXPORT_COLUMNS, "face_count"]
"""`--per photo` with a face model: the photo-level label (the largest face's) and face count."""
FACE_COLUMNS = [
    *EXPORT_COLUMNS,
    "face_index",
    "x",
    "y",
    "width",
    "height",
    "detector_score",
]
"""`--per face` (the default) with a face model: one row per face, one per no_face image."""


@app.command()
def export(
    job: Annotated[int | None, typer.Option(help="Only this job's results.")] = None,
    output_format: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    output: Annotated[Path | None, typer.Option(help="Write here (default: stdout).")] = None,
    model_version: Annotated[str | None, typer.Option(help="Only this model version.")] = None,
    per: Annotated[
        str,
        typer.Option(
            help="Face models: a row per face (face, the default) or per photo (photo: the "
            "largest face's label and the face count)."
        ),
    ] = "face",
) -> None:
    """Stream labels as CSV or JSON lines: uri, label, confidence, scores, model version.

    A face model's results come one row per face (its box, detector score, label) and one row
    per image without a face (outcome no_face), or with `--per photo` one row per photo.
    """
    from db.repository import any_face_results, iter_face_rows, iter_results

    if output_format not in ("csv", "jsonl"):
        fail(f"--format {output_format!r}: use csv or jsonl")
    if per not in ("face", "photo"):
        fail(f"--per {per!r}: use face or photo")
    settings = settings_from()
    sessions = sessions_for(settings)
    handle = output.open("w", newline="") if output else sys.stdout
    try:
        with sessions() as session:
            faces = any_face_results(session=session, job_id=job, model_version=model_version)
            records: Iterator[dict[str, Any]]
            if faces and per == "face":
                columns = FACE_COLUMNS
                records = map(
                    _face_record,
                    iter_face_rows(session=session, job_id=job, model_version=model_version),
                )
            else:
                columns = PHOTO_COLUMNS if faces else EXPORT_COLUMNS
                records = map(
                    _photo_record,
                    iter_results(session=session, job_id=job, model_version=model_version),
                )
            writer = csv.writer(handle) if output_format == "csv" else None
            if writer:
                writer.writerow(columns)
            for record in records:
                if writer:
                    writer.writerow([_csv_cell(column, record.get(column)) for column in columns])
                else:
                    handle.write(json.dumps(_jsonl_record(record)) + "\n")
    finally:
        if output:
            handle.close()


def _photo_record(row: Any) -> dict[str, Any]:
    """A `results` row as an export record; a face model's gains face_count and outcome."""
    record: dict[str, Any] = {
        "uri": row.uri,
        "label": row.label,
        "confidence": row.confidence,
        "scores": row.scores,
        "model_version": row.model_version,
        "job_id": row.job_id,
        "outcome": row.outcome,
        "runner_up": row.runner_up,
        "runner_up_confidence": row.runner_up_confidence,
        "human_label": row.human_label,
        "reviewed_by": row.reviewed_by,
        "reviewed_at": row.reviewed_at.isoformat() if row.reviewed_at is not None else None,
    }
    if row.face_count is not None:
        record["face_count"] = row.face_count
    return record


def _face_record(row: Any) -> dict[str, Any]:
    """A per-face row as an export record; a whole-image model's label stays as it was."""
    record = _photo_record(row)
    if record.pop("face_count", None) is not None:
        record |= {
            "face_index": row.face_index,
            "x": row.x,
            "y": row.y,
            "width": row.width,
            "height": row.height,
            "detector_score": row.detector_score,
        }
    return record


def _jsonl_record(record: dict[str, Any]) -> dict[str, Any]:
    """JSON lines give a face's box as one object (null for a no_face image)."""
    if "x" not in record:
        return record
    box = {side: record.pop(side) for side in ("x", "y", "width", "height")}
    record["box"] = None if box["x"] is None else box
    record["detector_score"] = record.pop("detector_score")
    return record


def _csv_cell(column: str, value: Any) -> Any:
    if value is None:
        return ""
    if column in ("confidence", "runner_up_confidence"):
        return f"{value:.6f}"
    if column == "scores":
        return json.dumps(value)
    return value


@app.command()
def failures(
    job: Annotated[int | None, typer.Option(help="Only this job.")] = None,
    retry: Annotated[bool, typer.Option(help="Enqueue the failed images of --job again.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="Rows to print.")] = 200,
) -> None:
    """List failed images with their reason; `--retry --job N` enqueues them again."""
    from db.repository import failed_items

    settings = settings_from()
    sessions = sessions_for(settings)
    if retry:
        if job is None:
            fail("--retry needs --job")
        from core.publishing import celery_publisher
        from db.requeue import requeue_failed

        broker_for(settings)
        count = requeue_failed(
            job,
            sessions=sessions,
            publish=celery_publisher(celery_for(settings), settings.queue),
            chunk_size=settings.scan.chunk_size,
        )
        console.print(f"job {job}: {count} failed images enqueued again", highlight=False)
        return
    table = Table("job", "uri", "reason", "message", "attempts")
    with sessions() as session:
        for index, item in enumerate(failed_items(session=session, job_id=job)):
            if index >= limit:
                break
            table.add_row(
                str(item.job_id),
                item.uri,
                item.reason or "-",
                item.message or "",
                str(item.attempts),
            )
    console.print(table)


def _metrics_directory_for_pool(settings: Settings) -> None:
    """Point prometheus_client at a fresh folder, so the pool's metrics reach /metrics.

    An entry point's job: prometheus_client reads `PROMETHEUS_MULTIPROC_DIR` once, when first
    imported, and the pool processes forked later inherit both the variable and that choice.
    A folder the user set is kept as it is.
    """
    import logging
    import os
    import socket

    from core.names import MULTIPROCESS_VARIABLE
    from emolabel.ops import prepare_metrics_directory

    if settings.metrics.port == 0 or os.environ.get(MULTIPROCESS_VARIABLE):
        return
    if "prometheus_client" in sys.modules:
        logging.getLogger(__name__).warning(
            "prometheus_client was imported before %s was set", MULTIPROCESS_VARIABLE
        )
    directory = prepare_metrics_directory(
        settings.home.resolve(), socket.gethostname(), os.getpid()
    )
    os.environ[MULTIPROCESS_VARIABLE] = str(directory)


@app.command()
def flower(
    address: Annotated[
        str | None, typer.Option(help="Interface to listen on (default: EMOLABEL_FLOWER__ADDRESS).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Port to listen on (default: EMOLABEL_FLOWER__PORT)."),
    ] = None,
) -> None:
    """Serve the Flower dashboard: workers, chunk tasks with their counts and times, the queue.

    Basic authentication is always on (EMOLABEL_FLOWER__USER and EMOLABEL_FLOWER__PASSWORD).
    """
    import logging

    from emolabel.ops import flower_arguments, run_flower

    base = settings_from()
    chosen = {"address": address, "port": port}
    settings = base.model_copy(
        update={
            "flower": base.flower.model_copy(
                update={key: value for key, value in chosen.items() if value is not None}
            )
        }
    )
    flower_arguments(settings)  # no credentials: refuse before starting anything
    broker_for(settings)
    logging.getLogger("flower").setLevel(logging.INFO)  # its "Visit me at" line
    console.print(
        f"Flower on http://{settings.flower.address}:{settings.flower.port} "
        f"(user {settings.flower.user})",
        highlight=False,
    )
    status = run_flower(settings)
    if status:
        raise typer.Exit(status)
