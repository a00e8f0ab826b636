"""The same artifact serves on TensorFlow and JAX with the same scores (KerasRunner, compiled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.train import TrainOutcome

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
import numpy as np
from pathlib import Path
from training.runtime import load_keras
keras = load_keras(sys.argv[1])
from worker.model_runner import KerasRunner
runner = KerasRunner.from_path(Path(sys.argv[2]), 4, sys.argv[3])
images = np.random.default_rng(0).integers(0, 255, (7, *runner.spec.shape), dtype=np.uint8)
print(json.dumps({
    "backend": keras.backend.backend(),
    "precision": runner.precision,
    "scores": runner.predict(images).tolist(),
}))
"""


def scores_on(backend: str, artifact: Path, precision: str = "float32") -> tuple[str, np.ndarray]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, backend, str(artifact), precision],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
        check=True,
    )
    document = json.loads(result.stdout.strip().splitlines()[-1])
    assert document["precision"] == precision
    return document["backend"], np.asarray(document["scores"])


def test_tensorflow_and_jax_agree(tiny_model: TrainOutcome) -> None:
    backend_tf, on_tf = scores_on("tensorflow", tiny_model.artifact_dir)
    backend_jax, on_jax = scores_on("jax", tiny_model.artifact_dir)
    assert (backend_tf, backend_jax) == ("tensorflow", "jax")
    assert on_tf.shape == (7, 2)
    np.testing.assert_allclose(on_tf, on_jax, atol=1e-4)
    np.testing.assert_allclose(on_tf.sum(axis=1), 1.0, atol=1e-5)


def test_bfloat16_serves_on_jax_too(tiny_model: TrainOutcome) -> None:
    _, exact = scores_on("jax", tiny_model.artifact_dir)
    _, fast = scores_on("jax", tiny_model.artifact_dir, "bfloat16")
    assert not np.array_equal(exact, fast)  # computed in bfloat16, not silently float32
    np.testing.assert_allclose(fast, exact, atol=0.03)


def test_compiled_runner_matches_plain_predict(tiny_model: TrainOutcome) -> None:
    from training.inference import predict_scores
    from worker.model_runner import KerasRunner

    runner = KerasRunner.from_path(tiny_model.artifact_dir, 4)
    images = np.random.default_rng(1).integers(0, 255, (9, *runner.spec.shape), dtype=np.uint8)
    np.testing.assert_allclose(
        runner.predict(images), predict_scores(runner.artifact, images, 4), atol=1e-5
    )
    assert runner.predict(images[:0]).shape == (0, 2)


def test_short_batches_are_padded_to_a_few_shapes_with_the_same_scores(
    tiny_model: TrainOutcome,
) -> None:
    """A face model predicts a different count of faces in every photo: each count is padded to
    one of a few batch sizes (a trace of the model's predict function each, on JAX a
    compilation, where every new count was a new one), with the scores of the batch alone."""
    from training.artifacts import load_artifact
    from training.inference import padded_sizes, predict_scores

    directory = tiny_model.artifact_dir
    artifact = load_artifact(directory, directory.parent.parent, directory.parent.name)
    shapes: list[int] = []
    original = artifact.model.predict_on_batch

    def recording(batch: np.ndarray) -> np.ndarray:
        shapes.append(len(batch))
        return np.asarray(original(batch))

    images = np.random.default_rng(2).integers(0, 255, (40, *artifact.spec.shape), dtype=np.uint8)
    singly = np.concatenate([predict_scores(artifact, images[i : i + 1], 32) for i in range(40)])
    artifact.model.predict_on_batch = recording
    for count in range(1, 41):
        np.testing.assert_allclose(
            predict_scores(artifact, images[:count], 32), singly[:count], atol=1e-5
        )
    assert set(shapes) == set(padded_sizes(32)) == {8, 16, 32}
