"""The benchmark model: the seeds' CNN with random weights, saved as an artifact.

Speed does not depend on what a model learned, so (a)-(d) all run this one; it is built in a
spawned process, so that TensorFlow never loads in the harness's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_NAME = "bench"
CLASS_NAMES = ("happy", "sad")
INPUT_SIDE = 256


def build_model(models_dir: Path) -> Path:
    """Save the seeds' CNN with random weights as an artifact `<models_dir>/bench/<version>`."""
    from training.runtime import load_keras

    keras = load_keras()
    from training.artifacts import save_artifact
    from training.metadata import InputMetadata, ModelMetadata, library_versions, new_version
    from training.model import make_model

    keras.utils.set_random_seed(0)
    model = make_model((INPUT_SIDE, INPUT_SIDE, 3), len(CLASS_NAMES))
    version = new_version()
    meta = ModelMetadata(
        name=MODEL_NAME,
        version=version,
        class_names=list(CLASS_NAMES),
        head="sigmoid",
        input=InputMetadata(height=INPUT_SIDE, width=INPUT_SIDE, color_mode="rgb"),
        training={"note": "random weights (seed 0): a throughput benchmark model, never trained"},
        libraries=library_versions(),
    )
    return save_artifact(model, meta, models_dir / MODEL_NAME / version)


def build_model_phase(models_dir: str) -> dict[str, Any]:
    """Save the benchmark model; runs in a fresh process (TensorFlow stays out of this one)."""
    return {"artifact": str(build_model(Path(models_dir)))}
