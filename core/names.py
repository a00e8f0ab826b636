"""Task, queue and environment names: the contract between a publisher and the worker that
consumes its messages. Tasks are sent by name, so a publisher never imports the worker's code."""

from __future__ import annotations

from core.settings import Settings

LABEL_CHUNK = "emolabel.label_chunk"
RETRAIN = "emolabel.retrain"
RECONCILE = "emolabel.reconcile"

# prometheus_client's multiprocess folder: set by `emolabel worker` before the pool forks, read
# by every pool process (see worker.metrics).
MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def retrain_queue(settings: Settings) -> str:
    """Retraining runs on its own queue, so a long run never sits in front of label chunks."""
    return f"{settings.queue}.retrain"
