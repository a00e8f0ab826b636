"""Pipeline commands: `db`, `scan`, `worker`, `label`, `status`, `export`, `failures`,
`republish`, `reconcile`.

They share one set-up: settings -> broker reachable (the embedded Redis started when none is
configured) -> database migrated (the embedded SQLite migrates itself; PostgreSQL must be at head,
`emolabel db upgrade` does that) -> an active model in the registry.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
            batch_files=settings.scan.batch_files,
            model_version=version,
            force=force,
            where=selections,
            progress=show,
            skip_settled=settings.scan.skip_settled,
            overlap_writes=settings.scan.overlap_writes,
            overlap_publish=settings.scan.overlap_publish,
            reader=settings.scan.reader,
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


PollHook = Callable[[Any, float, Callable[[str], None]], None]
"""Called on every poll of `_follow` with the counts, the seconds since it began and a print."""


def _follow(
    sessions: sessionmaker[Session],
    job_id: int,
    poll: float = 0.5,
    on_poll: PollHook | None = None,
) -> Any:
    from db.repository import job_counts

    started = time.monotonic()
    with sessions() as session:
        first = job_counts(session=session, job_id=job_id)
    done_at_start = first.done
    with (
        _ctrl_c_between_polls() as interrupted,
        Live(console=console, refresh_per_second=4, transient=False) as live,
    ):
        while True:
            with sessions() as session:
                counts = job_counts(session=session, job_id=job_id)
            elapsed = max(time.monotonic() - started, 1e-6)
            rate = (counts.done - done_at_start) / elapsed
            eta = counts.pending / rate if rate > 0 else None
            live.update(_counts_table(job_id, counts, rate, eta))
            if counts.pending == 0:
                return counts
            if on_poll is not None:
                on_poll(counts, elapsed, lambda line: live.console.print(line, highlight=False))
            if interrupted.wait(poll):
                raise KeyboardInterrupt


@contextmanager
def _ctrl_c_between_polls() -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) while following a job sets the event instead of raising wherever the
    main thread happens to be: raised inside a broker broadcast, a database query or the live
    display's redraw, it can leave a socket or a lock half-used, and the command then hung on its
    way out instead of leaving. The poll loop raises KeyboardInterrupt at its next wait."""
    import signal

    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted  # only the main thread gets signals (and may set their handlers)
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


class _WorkerWatch:
    """`label`'s hint when nothing consumes the job's queue: an external broker with no worker
    would otherwise leave it waiting in silence. Asks the workers (Celery's `active_queues`)
    a few seconds in, while nothing has finished, and again every `RECHECK` seconds; says so
    once when none consumes the queue and once when one turns up."""

    FIRST_CHECK = 3.0
    RECHECK = 15.0

    def __init__(self, settings: Settings, job_id: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.next_check = self.FIRST_CHECK
        self.warned = False
        self.done_at_start: int | None = None

    def __call__(self, counts: Any, elapsed: float, say: Callable[[str], None]) -> None:
        from emolabel.embedded import worker_running

        if self.done_at_start is None:
            self.done_at_start = counts.done
        if elapsed < self.next_check or (counts.done > self.done_at_start and not self.warned):
            return
        self.next_check = elapsed + self.RECHECK
        consuming = worker_running(celery_for(self.settings), queue=self.settings.queue)
        if not consuming and not self.warned:
            self.warned = True
            say(
                f"no worker consumes queue {self.settings.queue!r} on "
                f"{safe_url(self.settings.effective_broker_url)}: start one with `emolabel "
                "worker` (same settings) or `docker compose up worker`. Waiting; Ctrl-C leaves "
                f"job {self.job_id} queued (`emolabel status {self.job_id}`)."
            )
        elif consuming and self.warned:
            self.warned = False
            say(f"a worker consumes queue {self.settings.queue!r} now")


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
    with _local_worker_if_needed(settings) as started:
        watch = None if started else _WorkerWatch(settings, summary.job_id)
        try:
            counts = _follow(sessions, summary.job_id, on_poll=watch)
        except KeyboardInterrupt:
            console.print(
                f"stopped following job {summary.job_id}; its images stay queued for the "
                f"workers (`emolabel status {summary.job_id}`)",
                highlight=False,
            )
            raise typer.Exit(130) from None
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
        pending = 0
        for row in jobs:
            assert row is not None
            try:
                counts = job_counts(session=session, job_id=row.id)
            except NotFoundError:
                continue
            pending += counts.pending
            if as_json:
                record = {
                    "job": row.id,
                    "status": row.status,
                    **{column: getattr(counts, column) for column in COUNT_COLUMNS},
                    "source": row.source,
                    "model_version": row.model_version,
                    "created_at": row.created_at.isoformat(),
                    "pruned_at": row.pruned_at.isoformat() if row.pruned_at else None,
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
                + (
                    f" · ledger pruned {row.pruned_at.strftime('%Y-%m-%d')} (counts kept)"
                    if row.pruned_at
                    else ""
                )
            )
        if as_json:
            return
        console.print(table)
        for line in about:
            console.print(line, highlight=False, soft_wrap=True)
        if job is not None:
            for state, reason, count in outcome_reasons(session=session, job_id=job):
                console.print(f"{state}: {reason}: {count}", highlight=False)
    # Only pending images can lack a message: jobs with none shown need no trip to the broker
    # (its client's import and connection were a fifth of a finished job's `status`).
    if pending:
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


@app.command()
def export(
    job: Annotated[int | None, typer.Option(help="Only this job's results.")] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="csv, jsonl or parquet (needs --output).")
    ] = "csv",
    output: Annotated[Path | None, typer.Option(help="Write here (default: stdout).")] = None,
    model_version: Annotated[str | None, typer.Option(help="Only this model version.")] = None,
    per: Annotated[
        str | None,
        typer.Option(
            help="Face models: a row per face (face, the default) or per photo (photo: the "
            "largest face's label and the face count)."
        ),
    ] = None,
    state: Annotated[
        list[str] | None,
        typer.Option(
            help="Export the ledger instead: one row per file in these states (labeled, "
            "uncertain, no_face, failed, skipped, pending, or all; repeat or comma-separate), "
            "with the reason and message of the failed and skipped ones."
        ),
    ] = None,
) -> None:
    """Stream labels as CSV, JSON lines or Parquet: uri, label, confidence, scores, model version.

    A face model's results come one row per face (its box, detector score, label) and one row
    per image without a face (outcome no_face), or with `--per photo` one row per photo. With
    `--state`, one row per file a job saw, whatever became of it: `--state all --job N` tells
    the whole story of job N, its rows per state equal to `status N`.
    """
    from core.errors import ConfigError
    from db.repository import (
        ExportQuery,
        any_face_results,
        iter_face_rows,
        iter_ledger_rows,
        iter_results,
        ledger_query,
        rendered,
        results_query,
    )
    from emolabel import exports

    if output_format not in exports.FORMATS:
        fail(f"--format {output_format!r}: use {', '.join(exports.FORMATS)}")
    if per not in (None, "face", "photo"):
        fail(f"--per {per!r}: use face or photo")
    try:
        states = exports.parse_states(state or [])
    except ConfigError as error:
        fail(str(error))
    if states and per == "face":
        fail("--state exports one row per file: leave --per out (or use --per photo)")
    if states and model_version is not None:
        fail("--state exports each job's own model version's labels: leave --model-version out")
    if output_format == "parquet" and output is None:
        fail("--format parquet writes a file: give --output FILE.parquet")
    settings = settings_from()
    sessions = sessions_for(settings)
    handle = (
        None
        if output_format == "parquet"
        else output.open("w", newline="")
        if output
        else sys.stdout
    )
    try:
        with sessions() as session:
            faces = any_face_results(session=session, job_id=job, model_version=model_version)
            query: ExportQuery | None = None
            records: Iterator[dict[str, Any]]
            if faces and not states and per != "photo":
                columns = exports.FACE_COLUMNS
                records = map(
                    exports.face_record,
                    iter_face_rows(session=session, job_id=job, model_version=model_version),
                )
            elif states:
                columns = exports.LEDGER_COLUMNS
                query = ledger_query(states=states, job_id=job, scores_as_text=False)
                records = map(
                    exports.ledger_record,
                    iter_ledger_rows(session=session, states=states, job_id=job),
                )
            else:
                columns = exports.PHOTO_COLUMNS if faces else exports.EXPORT_COLUMNS
                query = results_query(job_id=job, model_version=model_version, scores_as_text=False)
                records = map(
                    exports.photo_record,
                    iter_results(session=session, job_id=job, model_version=model_version),
                )
            if query is not None and handle is not None and rendered.renders_exports(session):
                # PostgreSQL writes CSV and JSON lines itself, as the Python writers would.
                count = rendered.write_export(session, query, columns, output_format, handle)
            else:
                count = exports.write_records(records, columns, output_format, handle, output)
    finally:
        if output and handle is not None:
            handle.close()
    _written(count, output)


def _written(count: int, output: Path | None) -> None:
    if output is not None:
        console.print(f"{count} rows written to {output}", highlight=False)


@app.command()
def failures(
    job: Annotated[int | None, typer.Option(help="Only this job.")] = None,
    retry: Annotated[bool, typer.Option(help="Enqueue the failed images of --job again.")] = False,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Rows to print (default 200; --json: all).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON lines: job, uri, reason, message, attempts.")
    ] = False,
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
    if limit is None and not as_json:
        limit = 200
    table = Table("job", "uri", "reason", "message", "attempts")
    with sessions() as session:
        for index, item in enumerate(failed_items(session=session, job_id=job)):
            if limit is not None and index >= limit:
                break
            if as_json:
                record = {
                    "job_id": item.job_id,
                    "uri": item.uri,
                    "reason": item.reason,
                    "message": item.message,
                    "attempts": item.attempts,
                    "updated_at": item.updated_at.isoformat(),
                }
                sys.stdout.write(json.dumps(record) + "\n")
                continue
            table.add_row(
                str(item.job_id),
                item.uri,
                item.reason or "-",
                item.message or "",
                str(item.attempts),
            )
    if not as_json:
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
