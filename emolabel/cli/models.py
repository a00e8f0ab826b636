"""Registry and retraining commands: `models list|show|promote|rollback|trust|diff`, `retrain`,
`beat`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from core.errors import ModelError
from emolabel.cli.app import (
    app,
    broker_for,
    celery_for,
    console,
    errors,
    fail,
    progress_line,
    sessions_for,
    settings_from,
)

models_app = typer.Typer(
    help="The model registry: list, show, promote, rollback, trust, diff.", no_args_is_help=True
)
app.add_typer(models_app, name="models")


@models_app.command("list")
def list_models_command(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per version.")] = False,
) -> None:
    """Every registered version with its status and test metrics (the active one labels)."""
    from db.repository import list_models

    sessions = sessions_for(settings_from())
    table = Table("version", "status", "name", "macro F1", "accuracy", "created", "promoted")
    with sessions() as session:
        for model in list_models(session=session):
            if as_json:
                print(json.dumps({
                    "version": model.version, "status": model.status, "name": model.name,
                    "metrics": model.metrics, "artifact_path": model.artifact_path,
                    "model_sha256": model.model_sha256, "metadata_sha256": model.metadata_sha256,
                    "created_at": model.created_at.isoformat(),
                    "promoted_at": model.promoted_at.isoformat() if model.promoted_at else None,
                }))  # fmt: skip
                continue
            metrics = model.metrics or {}
            f1 = metrics.get("macro", {}).get("f1")
            accuracy = metrics.get("accuracy")
            table.add_row(
                model.version,
                model.status,
                model.name,
                "-" if f1 is None else f"{f1:.4f}",
                "-" if accuracy is None else f"{accuracy:.4f}",
                model.created_at.strftime("%Y-%m-%d %H:%M"),
                model.promoted_at.strftime("%Y-%m-%d %H:%M") if model.promoted_at else "-",
            )
    if not as_json:
        console.print(table)


@models_app.command("show")
def show_model(version: Annotated[str, typer.Argument(help="A registered version.")]) -> None:
    """The registry row and the artifact's metadata of one version, as JSON."""
    from db.repository import get_model
    from training.metadata import read_metadata

    sessions = sessions_for(settings_from())
    with sessions() as session:
        model = get_model(session=session, version=version)
        if model is None:
            fail(f"no model version {version!r} is registered (see `emolabel models list`)")
        artifact_path = model.artifact_path
        row = {
            "version": model.version,
            "name": model.name,
            "status": model.status,
            "artifact_path": model.artifact_path,
            "class_names": model.class_names,
            "model_sha256": model.model_sha256,
            "metadata_sha256": model.metadata_sha256,
            "created_at": model.created_at.isoformat(),
            "promoted_at": model.promoted_at.isoformat() if model.promoted_at else None,
        }
    try:
        metadata: dict[str, Any] | None = read_metadata(Path(artifact_path)).model_dump(mode="json")
    except ModelError as error:  # the row stays worth showing when its files are gone or bad
        metadata = None
        errors.print(f"[yellow]warning:[/] {escape(str(error))}", highlight=False)
    console.print_json(data={"registry": row, "metadata": metadata})


@models_app.command("promote")
def promote(
    version: Annotated[str, typer.Argument(help="A registered version, or an artifact folder.")],
) -> None:
    """Make a version the active model; workers switch at their next chunk."""
    from db.repository import NotFoundError, set_active_model
    from training.registry import register_artifact
    from training.trust import artifact_under

    settings = settings_from()
    sessions = sessions_for(settings)
    with sessions.begin() as session:
        folder = Path(version)
        if (folder / "metadata.json").is_file():
            # Workers load only from under the models folder: refuse any other folder now.
            folder = artifact_under(folder, settings.models_dir)
            model = register_artifact(session=session, directory=folder, activate=True)
        else:
            try:
                model = set_active_model(session=session, version=version)
            except NotFoundError:
                fail(f"no model version {version!r} is registered (see `emolabel models list`)")
        promoted = model.version
    console.print(f"active model: {promoted}", highlight=False)


@models_app.command("trust")
def trust(version: Annotated[str, typer.Argument(help="A registered version.")]) -> None:
    """Record the SHA-256 of a version's model.keras and metadata.json as they are now.

    For a version registered before emolabel recorded hashes (workers refuse it until then), or
    after a deliberate change to its files: check the files first, this vouches for them.
    """
    from training.registry import trust_artifact

    settings = settings_from()
    with sessions_for(settings).begin() as session:
        model = trust_artifact(session=session, version=version, models_dir=settings.models_dir)
        line = f"{model.version}: model.keras {model.model_sha256}, metadata.json " + str(
            model.metadata_sha256
        )
    console.print(line, highlight=False)


@models_app.command("rollback")
def rollback() -> None:
    """Reactivate the version that was active before the current one."""
    from db.repository import active_model, previous_active_model, set_active_model

    sessions = sessions_for(settings_from())
    with sessions.begin() as session:
        current = active_model(session=session)
        previous = previous_active_model(session=session)
        if previous is None:
            fail("no earlier active version to roll back to")
        set_active_model(session=session, version=previous.version)
        restored, replaced = previous.version, current.version if current else None
    console.print(f"active model: {restored} (was {replaced})", highlight=False)


@models_app.command("diff")
def diff(
    version_a: Annotated[str, typer.Argument(metavar="A", help="The version labels move from.")],
    version_b: Annotated[str, typer.Argument(metavar="B", help="The version labels move to.")],
    job: Annotated[int | None, typer.Option(help="Only the images of this job.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Label churn from A to B over the images both labeled (stored results): a table of label
    by A x label by B, how many were compared and changed, and the churn a retraining run that
    compared A and B measured on its archive sample, if one did."""
    from db.repository import changed_image_ids, get_job, label_pairs, recorded_churn
    from training.churn import churn_from_counts

    sessions = sessions_for(settings_from())
    with sessions() as session:
        if job is not None and get_job(session=session, job_id=job) is None:
            fail(f"no job {job} (see `emolabel status`)")
        pairs = label_pairs(session=session, version_a=version_a, version_b=version_b, job_id=job)
        changed = changed_image_ids(
            session=session, version_a=version_a, version_b=version_b, job_id=job
        )
        run = recorded_churn(session=session, versions=(version_a, version_b))
    churn = churn_from_counts(pairs)
    recorded = None
    if run is not None:
        recorded = {"run_id": run.run_id, "champion_version": run.champion_version,
                    "challenger_version": run.challenger_version, **run.churn}  # fmt: skip
    if as_json:
        print(json.dumps({
            "version_a": version_a, "version_b": version_b, "job": job,
            "compared": churn.sample, "changed": churn.changed, "rate": churn.rate,
            "table": churn.table, "changed_images": changed, "retrain_sample": recorded,
        }))  # fmt: skip
        return
    if churn.sample == 0:
        console.print(
            f"no image has a label by both {version_a} and {version_b}"
            + (f" in job {job}" if job is not None else ""),
            highlight=False,
        )
    else:
        console.print(_churn_table(churn.table, version_a, version_b))
        console.print(
            f"compared {churn.sample} images, {churn.changed} changed ({churn.rate:.1%})",
            highlight=False,
        )
    if run is not None and recorded is not None:
        console.print(
            f"retrain run {run.run_id} (champion {run.champion_version}, challenger "
            f"{run.challenger_version}) measured on its archive sample: {recorded.get('changed')}"
            f" of {recorded.get('sample')} changed ({float(recorded.get('rate', 0.0)):.1%})",
            highlight=False,
        )


def _churn_table(table: dict[str, dict[str, int]], version_a: str, version_b: str) -> Table:
    """Rows: label by A; columns: label by B; the diagonal is what stays."""
    targets = sorted({name for row in table.values() for name in row})
    grid = Table(title=f"labels by {version_a} (rows) -> {version_b} (columns)")
    grid.add_column(escape(version_a))
    for name in targets:
        grid.add_column(escape(name), justify="right")
    grid.add_column("changed", justify="right")
    for source in sorted(table):
        row = table[source]
        moved = sum(count for name, count in row.items() if name != source)
        grid.add_row(escape(source), *(str(row.get(name, 0)) for name in targets), str(moved))
    return grid


@app.command()
def retrain(
    data_dir: Annotated[
        Path | None, typer.Argument(help="Training folder (default: EMOLABEL_RETRAIN__DATA_DIR).")
    ] = None,
    send: Annotated[
        bool, typer.Option(help="Send it to a worker instead of running it here.")
    ] = False,
) -> None:
    """Train a challenger, compare it with the champion on the frozen test split, promote it
    only if it is better; the run and its decision are recorded either way."""
    settings = settings_from()
    if send:
        from core.names import RETRAIN, retrain_queue

        broker_for(settings)
        sent = celery_for(settings).send_task(
            RETRAIN,
            kwargs={"data_dir": str(data_dir.resolve()) if data_dir else None},
            queue=retrain_queue(settings),
        )
        console.print(f"retraining sent as task {sent.id}", highlight=False)
        return
    from training.retrain import run_retrain

    report = run_retrain(
        settings, sessions_for(settings), data_dir=data_dir, progress=progress_line
    )
    console.print(
        f"run {report.run_id}: {report.decision} challenger {report.challenger_version} "
        f"(champion {report.champion_version}): {report.reason}",
        highlight=False,
    )
    churn = "-" if report.churn_rate is None else f"{report.churn_rate:.1%}"
    console.print(
        f"reviewed items used: {report.reviewed_items}; label churn on the archive sample: {churn}",
        highlight=False,
    )


@app.command()
def beat(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run Celery beat (exactly one per deployment): schedules the nightly retraining."""
    settings = settings_from()
    if settings.retrain.data_dir is None:
        fail("nothing to schedule: set EMOLABEL_RETRAIN__DATA_DIR to the training folder")
    broker_for(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    celery_for(settings).start(["beat", f"--loglevel={loglevel}"])
