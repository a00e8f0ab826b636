"""A loaded artifact behind the `ModelRunner` seam: what the worker calls to predict a batch.

`model.predict` pays Python and tracing overhead on every call and retraces for every new batch
shape. The runner instead compiles one function per fixed batch shape (uint8 in, scores out, the
artifact's pixel scaling inside): the batch size, and powers of two below it that a short last
batch is padded up to. So a worker traces each shape once, never per call.
TensorFlow gets a `tf.function`, JAX a `jax.jit` over the model's stateless call; any other
backend falls back to `predict_on_batch`. With `precision="bfloat16"` the runner serves a
bfloat16-computing copy of the model (`worker.precision`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.settings import Precision
from training.artifacts import Artifact, load_artifact
from training.inference import class_scores, padded_sizes, thresholds_of
from training.preprocess import InputSpec
from training.trust import ArtifactHashes, artifact_under
from worker.precision import bfloat16_copy
from worker.predict import ALIGNMENT, aligned_empty

BatchFunction = Callable[[NDArray[np.uint8]], NDArray[np.float32]]


def _compile(model: Any, spec: InputSpec, batch_size: int) -> BatchFunction:
    import keras

    shape = (batch_size, *spec.shape)
    scale, offset = np.float32(spec.pixel_scale), np.float32(spec.pixel_offset)
    # Our models scale inside (scale 1, offset 0): skip two passes over a 50 MB float batch.
    identity = scale == 1 and offset == 0

    def scaled(values: Any) -> Any:
        return values if identity else values * scale + offset

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.uint8)])  # type: ignore[untyped-decorator]
        def call(images: Any) -> Any:
            return model(scaled(tf.cast(images, tf.float32)), training=False)

        # The concrete function, not the tf.function, which binds its arguments in Python. And
        # the batch goes in through DLPack, sharing its memory: given a NumPy array, TensorFlow
        # copies it, and copies it again when it is not 64-byte aligned (bench/RESULTS.md,
        # round 7). The worker's batches are aligned (`aligned_empty`); any other batch is
        # copied once into an aligned one.
        concrete = call.get_concrete_function()

        def run(images: NDArray[np.uint8]) -> NDArray[np.float32]:
            if images.ctypes.data % ALIGNMENT or not images.flags.c_contiguous:
                staging = aligned_empty(shape)
                staging[...] = images
                images = staging
            tensor = tf.experimental.dlpack.from_dlpack(images.__dlpack__())
            return np.asarray(concrete(tensor).numpy(), dtype=np.float32)

        return run
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [variable.value for variable in model.trainable_variables]
        non_trainable = [variable.value for variable in model.non_trainable_variables]

        @jax.jit
        def jitted(trainable_values: Any, non_trainable_values: Any, images: Any) -> Any:
            outputs, _ = model.stateless_call(
                trainable_values, non_trainable_values, scaled(images.astype(jnp.float32)),
                training=False,
            )  # fmt: skip
            return outputs

        return lambda images: np.asarray(jitted(trainable, non_trainable, images), dtype=np.float32)

    def eager(images: NDArray[np.uint8]) -> NDArray[np.float32]:
        values = scaled(images.astype(np.float32))
        return np.asarray(model.predict_on_batch(values), dtype=np.float32)

    return eager


class KerasRunner:
    """Predicts with one artifact; its version, classes and input come from the metadata."""

    def __init__(
        self, artifact: Artifact, batch_size: int, precision: Precision = "float32"
    ) -> None:
        self.artifact = artifact
        self.model: Any = artifact.model
        self.precision: Precision = "float32"
        if precision == "bfloat16":
            copy = bfloat16_copy(artifact.model)
            if copy is not None:
                self.model, self.precision = copy, "bfloat16"
        self.version: str = artifact.metadata.version
        self.spec: InputSpec = artifact.spec
        self.class_names: Sequence[str] = artifact.metadata.class_names
        # Scores come out calibrated (`class_scores`); below these a label is uncertain.
        self.thresholds: Mapping[str, float | None] | None = thresholds_of(artifact.metadata)
        self.subject = artifact.metadata.subject  # "face": served detect -> crop -> classify
        self.batch_size = batch_size
        # A short batch (a chunk's last, a small chunk of big photos) is padded to the smallest
        # of these sizes that holds it, not to a whole batch: at most twice its own size of work.
        # Each size is compiled once, on first use, so a worker traces at most a handful.
        self.shapes = padded_sizes(batch_size)
        self._calls: dict[int, BatchFunction] = {}

    def _call(self, batch: NDArray[np.uint8]) -> NDArray[np.float32]:
        size = len(batch)
        call = self._calls.get(size)
        if call is None:
            call = self._calls[size] = _compile(self.model, self.spec, size)
        return call(batch)

    def warm_up(self) -> None:
        """Trace and run the full-batch call once, so the first real batch does not pay for it."""
        self._call(np.zeros((self.batch_size, *self.spec.shape), dtype=np.uint8))

    @classmethod
    def from_path(
        cls, directory: Path, batch_size: int, precision: Precision = "float32"
    ) -> KerasRunner:
        """Load the artifact in `directory` (`<models_dir>/<name>/<version>`), unregistered."""
        artifact = load_artifact(directory, directory.parent.parent, directory.parent.name)
        return cls(artifact, batch_size, precision)

    @classmethod
    def from_registry(
        cls,
        directory: Path,
        models_dir: Path,
        expected: ArtifactHashes,
        batch_size: int,
        precision: Precision = "float32",
    ) -> KerasRunner:
        """Load a registered artifact: only from under `models_dir`, only with the registry's
        hashes for both `model.keras` and `metadata.json`."""
        resolved = artifact_under(directory, models_dir)
        artifact = load_artifact(resolved, models_dir, resolved.parent.name, expected=expected)
        return cls(artifact, batch_size, precision)

    def predict(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """(N, H, W, C) uint8 -> (N, classes) scores, in fixed-size batches."""
        outputs: list[NDArray[np.float32]] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            count = len(batch)
            size = next(size for size in self.shapes if size >= count)
            if size > count:
                # Pad to a compiled shape: any other shape would mean a new trace.
                padded = aligned_empty((size, *self.spec.shape))
                padded[:count] = batch
                padded[count:] = 0
                batch = padded
            outputs.append(self._call(np.ascontiguousarray(batch))[:count])
        if not outputs:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return class_scores(np.concatenate(outputs), self.artifact.metadata)
