"""`emolabel prune --older-than DAYS`: delete the ledger rows of jobs finished long ago.

Every scan writes a ledger row per file; a nightly rescan of a large archive adds gigabytes a
month. The labels (`results`) stay, and so does each job's row with its counts (`status` shows
them); what goes is the per-file story of old jobs (`failures`, `export --state` of that job).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

from emolabel.cli.app import app, console, sessions_for, settings_from


@app.command()
def prune(
    older_than: Annotated[
        float,
        typer.Option(
            "--older-than", min=0, help="Days since a job finished (0: every finished job)."
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be deleted, delete nothing.")
    ] = False,
    batch_rows: Annotated[
        int, typer.Option(min=1, help="Ledger rows deleted per transaction.")
    ] = 50_000,
) -> None:
    """Delete the ledger rows and chunks of done jobs finished more than DAYS ago.

    Labels stay, and each job keeps its counts (by state and by reason) for `status`. A job
    still scanning, queued or running is never touched. Run again to finish a prune cut short.
    """
    from db.repository import count_job_items, prunable_jobs, prune_job

    settings = settings_from()
    sessions = sessions_for(settings)
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=older_than)
    with sessions() as session:
        jobs = prunable_jobs(session=session, finished_before=cutoff)
        rows = {job.job_id: count_job_items(session=session, job_id=job.job_id) for job in jobs}
    if not jobs:
        console.print(f"no done job finished before {cutoff:%Y-%m-%d %H:%M} UTC to prune")
        return
    total = sum(rows.values())
    verb = "would delete" if dry_run else "deleting"
    console.print(
        f"{len(jobs)} job(s) finished before {cutoff:%Y-%m-%d %H:%M} UTC: {verb} {total} "
        "ledger rows",
        highlight=False,
    )
    for job in jobs:
        console.print(
            f"job {job.job_id}: finished {job.finished_at:%Y-%m-%d %H:%M}, "
            f"{rows[job.job_id]} rows · {job.source}",
            highlight=False,
            soft_wrap=True,
        )
    if dry_run:
        return
    for job in jobs:
        try:
            pruned = prune_job(sessions=sessions, job_id=job.job_id, batch_rows=batch_rows)
        except ValueError as error:  # reopened (`failures --retry`) since it was listed
            console.print(f"job {job.job_id}: left as it is: {error}", highlight=False)
            continue
        console.print(
            f"job {pruned.job_id}: deleted {pruned.items} ledger rows and {pruned.chunks} chunks",
            highlight=False,
        )
