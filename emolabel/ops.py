"""Operating the pipeline: the Flower dashboard and the folder of the workers' metrics.

Flower runs as Celery's `flower` subcommand on our app, so it reads the same broker settings as
the workers. It always asks for basic authentication: its HTTP API can revoke and terminate tasks
and shut workers down, so an open port is never acceptable, and we generate no password (one
printed to a log is one more secret to leak).

A prefork worker's chunks run in pool processes, while its /metrics endpoint is served by the main
process. prometheus_client's multiprocess mode joins them: every process writes its values to
files in one folder, and the endpoint adds them up at scrape time. `prepare_metrics_directory`
makes that folder fresh for each worker; the entry point puts it in `PROMETHEUS_MULTIPROC_DIR`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from core.errors import ConfigError
from core.settings import Settings
from emolabel.embedded import process_alive

logger = logging.getLogger(__name__)

METRICS_FOLDER = "metrics"


def flower_arguments(settings: Settings) -> list[str]:
    """`celery flower` arguments from the settings; ConfigError when credentials are missing."""
    flower = settings.flower
    if flower.user is None or flower.password is None:
        raise ConfigError(
            "Flower needs credentials: set EMOLABEL_FLOWER__USER and EMOLABEL_FLOWER__PASSWORD "
            "(basic authentication is always on)"
        )
    return [
        "flower",
        f"--address={flower.address}",
        f"--port={flower.port}",
        f"--basic-auth={flower.user}:{flower.password.get_secret_value()}",
        f"--max-tasks={flower.max_tasks}",
    ]


def run_flower(settings: Settings) -> int:
    """Serve Flower in the foreground until interrupted; its exit status."""
    from worker.celery_app import make_celery

    arguments = flower_arguments(settings)
    app = make_celery(settings)
    # The arguments stay inside this process: the password never shows in `ps`.
    status = app.start(arguments)
    return int(status or 0)


def prepare_metrics_directory(home: Path, host: str, pid: int) -> Path:
    """An empty `<home>/metrics/<host>-<pid>`; folders of this host's dead workers are removed.

    prometheus_client keeps counting in files it finds, so a folder must start empty; one folder
    per worker lets several workers share a home without adding up each other's values.
    """
    root = home / METRICS_FOLDER
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for folder in root.glob(f"{host}-*"):
        other = folder.name.removeprefix(f"{host}-")
        if other.isdigit() and int(other) != pid and not process_alive(int(other)):
            logger.info("removing the metrics of a stopped worker: %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
    directory = root / f"{host}-{pid}"
    shutil.rmtree(directory, ignore_errors=True)  # a previous worker with the same pid
    directory.mkdir(mode=0o700)
    return directory
