"""label_images on real files and the real tiny model: order kept, bad images become reasons."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from core.settings import LimitSettings
from training.train import TrainOutcome
from worker.model_runner import KerasRunner
from worker.predict import StageTimes, label_images

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("decode_tasks", [1, 2, 5])
def test_outcomes_in_order_with_reasons(
    tiny_model: TrainOutcome, sample_dir: Path, tmp_path: Path, decode_tasks: int
) -> None:
    good = sorted((sample_dir / "happy").iterdir())[:5] + sorted((sample_dir / "sad").iterdir())[:5]
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    uris = [str(path) for path in good[:1]] + [str(tmp_path / "text.jpg")]
    uris += [str(path) for path in good[1:]] + [str(tmp_path / "empty.png")]

    def read(uri: str) -> bytes:
        return Path(uri).read_bytes()

    runner = KerasRunner.from_path(tiny_model.artifact_dir, 4)
    times = StageTimes()
    with ThreadPoolExecutor(2) as pool:
        outcomes = label_images(
            uris, read=read, runner=runner, limits=LimitSettings(), pool=pool, batch_size=4,
            times=times, batches_ahead=1, decode_tasks=decode_tasks,
        )  # fmt: skip
    assert [outcome.uri for outcome in outcomes] == uris
    assert outcomes[1].reason == "not_an_image" and outcomes[1].prediction is None
    assert outcomes[-1].reason == "empty"
    labeled = [outcome for outcome in outcomes if outcome.prediction is not None]
    assert len(labeled) == 10
    assert all(outcome.prediction.label in {"happy", "sad"} for outcome in labeled)  # type: ignore[union-attr]
    assert times.predict > 0 and times.decode > 0
    # Each image got its own scores: slots map back to positions, through batches with failed
    # slots and through batch arrays reused once their batch was predicted.
    import numpy as np

    from training.preprocess import load_image

    alone = runner.predict(
        np.stack([load_image(read(o.uri), runner.spec, LimitSettings()) for o in labeled])
    )
    for outcome, scores in zip(labeled, alone, strict=True):
        assert outcome.prediction is not None
        expected = dict(zip(runner.class_names, scores.tolist(), strict=True))
        assert outcome.prediction.scores == pytest.approx(expected, abs=1e-5)


def test_a_short_batch_is_padded_to_a_small_compiled_shape_with_the_same_scores(
    tiny_model: TrainOutcome,
) -> None:
    import numpy as np

    from training.inference import padded_sizes

    assert padded_sizes(64) == (8, 16, 32, 64)
    assert padded_sizes(8) == (8,) and padded_sizes(5) == (5,) and padded_sizes(12) == (8, 12)
    runner = KerasRunner.from_path(tiny_model.artifact_dir, 32)
    images = np.random.default_rng(0).integers(0, 256, (32, *runner.spec.shape), dtype=np.uint8)

    whole = runner.predict(images)
    short = runner.predict(images[:3])  # padded to 8, not to 32
    split = runner.predict(images[:20])  # one batch of 20, padded to 32

    assert sorted(runner._calls) == [8, 32]  # each shape compiled once, none per call
    np.testing.assert_allclose(short, whole[:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split, whole[:20], rtol=1e-5, atol=1e-6)
    assert runner.predict(images[:0]).shape == (0, len(runner.class_names))


@pytest.mark.parametrize(("scale", "offset"), [(1.0, 0.0), (2 / 255, -1.0)])
def test_the_compiled_call_scales_pixels_as_the_artifact_says(
    tiny_model: TrainOutcome, scale: float, offset: float
) -> None:
    import dataclasses

    import numpy as np

    from training.preprocess import to_model_input

    runner = KerasRunner.from_path(tiny_model.artifact_dir, 8)
    runner.spec = dataclasses.replace(runner.spec, pixel_scale=scale, pixel_offset=offset)
    images = np.random.default_rng(1).integers(0, 256, (8, *runner.spec.shape), dtype=np.uint8)

    expected = np.asarray(runner.artifact.model(to_model_input(images, runner.spec)))
    np.testing.assert_allclose(runner._call(images), expected, rtol=1e-5, atol=1e-6)


def test_a_bfloat16_runner_computes_in_bfloat16_from_the_same_weights(
    tiny_model: TrainOutcome,
) -> None:
    import numpy as np

    exact = KerasRunner.from_path(tiny_model.artifact_dir, 8)
    fast = KerasRunner.from_path(tiny_model.artifact_dir, 8, precision="bfloat16")
    assert (exact.precision, fast.precision) == ("float32", "bfloat16")
    policies = [layer.dtype_policy.name for layer in fast.model.layers]
    # Input and the last layer stay float32: confidences come out of a float32 head.
    assert policies[0] == policies[-1] == "float32"
    assert set(policies[1:-1]) == {"mixed_bfloat16"}
    for copied, original in zip(fast.model.weights, exact.model.weights, strict=True):
        assert str(copied.dtype) == "float32"
        np.testing.assert_array_equal(np.asarray(copied), np.asarray(original))

    images = np.random.default_rng(2).integers(0, 256, (8, *exact.spec.shape), dtype=np.uint8)
    scores_exact, scores_fast = exact.predict(images), fast.predict(images)
    assert scores_fast.dtype == np.float32 and scores_fast.shape == scores_exact.shape
    assert not np.array_equal(scores_fast, scores_exact)  # it really computed in bfloat16
    np.testing.assert_allclose(scores_fast, scores_exact, atol=0.03)
    assert exact.model is exact.artifact.model  # float32 serves the artifact itself


def test_a_model_that_cannot_be_rebuilt_is_served_in_float32() -> None:
    from training.runtime import load_keras
    from worker.precision import bfloat16_copy

    keras = load_keras()

    class Subclassed(keras.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):  # type: ignore[no-untyped-def]
            return self.dense(inputs)

    model = Subclassed()
    model(keras.ops.zeros((1, 4)))
    assert bfloat16_copy(model) is None


def test_an_unexpected_error_on_one_image_is_recorded_against_it_alone(
    tiny_model: TrainOutcome, sample_dir: Path
) -> None:
    paths = sorted((sample_dir / "happy").iterdir())[:4]
    uris = [str(path) for path in paths]
    broken = uris[1]

    def read(uri: str) -> bytes:
        # A reader surprise no file explains (say, an object store client's own exception).
        if uri == broken:
            raise RuntimeError("the storage client fell over")
        return Path(uri).read_bytes()

    runner = KerasRunner.from_path(tiny_model.artifact_dir, 4)
    with ThreadPoolExecutor(2) as pool:
        outcomes = label_images(
            uris, read=read, runner=runner, limits=LimitSettings(), pool=pool, batch_size=4
        )
    assert [outcome.uri for outcome in outcomes] == uris
    assert outcomes[1].prediction is None and outcomes[1].reason == "internal_error"
    assert outcomes[1].message == "unexpected RuntimeError: the storage client fell over"
    assert all(outcome.prediction is not None for outcome in outcomes[:1] + outcomes[2:])


def test_aligned_and_unaligned_batches_get_the_same_scores(tiny_model: TrainOutcome) -> None:
    # An aligned batch goes to TensorFlow through DLPack, sharing its memory; any other is
    # staged into an aligned copy first. Both must score exactly alike and leave the input be.
    import numpy as np

    from worker.predict import ALIGNMENT, aligned_empty

    runner = KerasRunner.from_path(tiny_model.artifact_dir, 8)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (8, *runner.spec.shape), dtype=np.uint8)
    aligned = aligned_empty(images.shape)
    aligned[...] = images
    raw = np.empty(images.nbytes + 1, dtype=np.uint8)
    unaligned = raw[1:].reshape(images.shape)
    unaligned[...] = images
    assert aligned.ctypes.data % ALIGNMENT == 0 and unaligned.ctypes.data % ALIGNMENT != 0
    reversed_view = images[::-1]  # not contiguous

    expected = np.asarray(runner.artifact.model(images.astype(np.float32)))
    for batch in (aligned, unaligned):
        np.testing.assert_allclose(runner._call(batch), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runner._call(reversed_view), expected[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(aligned, images)
