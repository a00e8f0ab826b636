"""`emolabel xmp`: labels written back into XMP sidecars (digiKam, Lightroom, darktable).

One model version's labels (the job's, `--model-version`'s, or the active model's), one sidecar
per image, merged into what is already there (`emolabel.sidecars`). `--dry-run` counts what
would be created, updated or left unchanged and names a few, writing nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from emolabel.cli.app import app, console, fail, sessions_for, settings_from


@app.command("xmp")
def xmp(
    job: Annotated[int | None, typer.Option(help="Only this job's images.")] = None,
    model_version: Annotated[
        str | None,
        typer.Option(help="Whose labels (default: the job's model, else the active one)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count and show what would change; write nothing.")
    ] = False,
    naming: Annotated[
        str | None, typer.Option(help="append (photo.jpg.xmp) or replace (photo.xmp).")
    ] = None,
    root: Annotated[str | None, typer.Option(help="Root of the hierarchical keywords.")] = None,
    mirror: Annotated[
        Path | None, typer.Option(help="Write the sidecars under this folder instead.")
    ] = None,
) -> None:
    """Write each labeled image's labels into its XMP sidecar: keywords (root|label), the
    confidence and model version, and a face model's face regions (MWG). Other tools' keywords,
    fields and regions are kept; ours are replaced. The images are never touched."""
    from core.storage.s3 import client_from_settings
    from db.repository import active_model, get_job, iter_face_rows
    from emolabel.sidecars.write_back import SidecarStore, group_by_image, write_back
    from emolabel.sidecars.xmp import SidecarLabels, keywords_for

    settings = settings_from()
    overrides = {
        name: value
        for name, value in (("naming", naming), ("keyword_root", root), ("mirror", mirror))
        if value is not None
    }
    if naming is not None and naming not in ("append", "replace"):
        fail(f"--naming {naming!r}: use append or replace")
    xmp_settings = settings.xmp.model_copy(update=overrides)
    try:  # a bad root would fail every image alike: refuse it before the first one
        keywords_for(
            SidecarLabels(outcome="no_face", label=None, confidence=None, model_version="-"),
            xmp_settings.keyword_root,
        )
    except ValueError as error:
        fail(f"keyword root: {error}")
    sessions = sessions_for(settings)
    with sessions() as session:
        if model_version is None and job is not None:
            found = get_job(session=session, job_id=job)
            if found is None:
                fail(f"no job {job}")
            model_version = found.model_version
        if model_version is None:
            active = active_model(session=session)
            if active is None:
                fail("no active model: give --model-version or --job")
            model_version = active.version
        store = SidecarStore(xmp_settings, lambda: client_from_settings(settings.s3))
        groups = group_by_image(
            iter_face_rows(session=session, job_id=job, model_version=model_version)
        )
        progress = Progress(
            TextColumn("sidecars"), BarColumn(), MofNCompleteColumn(), console=console,
            transient=True,
        )  # fmt: skip
        with progress:
            task = progress.add_task("sidecars", total=None)
            tally = write_back(
                groups, store, dry_run=dry_run, on_image=lambda: progress.advance(task)
            )
    verb = "would be" if dry_run else "were"
    console.print(
        f"model {model_version}: {tally.images} images; sidecars {verb} created: "
        f"{tally.created}, updated: {tally.updated}, unchanged: {tally.unchanged}, "
        f"failed: {len(tally.failed)}",
        highlight=False,
        soft_wrap=True,
    )
    for line in tally.examples:
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    for uri, message in tally.failed[:20]:
        console.print(f"failed: {uri}: {message}", highlight=False, soft_wrap=True)
    if len(tally.failed) > 20:
        console.print(f"... and {len(tally.failed) - 20} more failed", highlight=False)
    if tally.failed:
        raise typer.Exit(3)
