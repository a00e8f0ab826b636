"""Label a chunk of images: read and decode in a thread pool, predict in fixed-size batches.

Pure logic with its seams passed in (a `read` function and a `ModelRunner`), so it is tested on
real files and a real model without a broker. Decoding runs ahead in the pool while the model
works on the previous batch (OpenCV and file reads release the GIL). A bad image is data: it
becomes an outcome with a reason, and the rest of the chunk goes on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from emolabel.errors import ImageError, ReasonCode
from emolabel.settings import LimitSettings
from training.inference import Prediction, to_predictions
from training.preprocess import InputSpec, load_image

logger = logging.getLogger(__name__)


class ModelRunner(Protocol):
    """What the worker needs of a model: its version, input, classes and a batch predict."""

    version: str
    spec: InputSpec
    class_names: Sequence[str]

    def predict(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """(N, H, W, C) uint8 -> (N, classes) scores."""
        ...


@dataclass(frozen=True)
class ImageOutcome:
    """One URI's result: a prediction, or the reason there is none."""

    uri: str
    prediction: Prediction | None = None
    reason: str | None = None
    message: str | None = None


@dataclass
class StageTimes:
    """Seconds spent per stage of a chunk (read+decode overlaps predict, so they do not add up)."""

    decode: float = 0.0
    predict: float = 0.0
    waiting: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


def _prepare(
    uri: str, read: Callable[[str], bytes], spec: InputSpec, limits: LimitSettings
) -> tuple[NDArray[np.uint8] | None, ImageOutcome | None, float]:
    started = time.perf_counter()
    try:
        pixels = load_image(read(uri), spec, limits)
    except ImageError as error:
        return None, ImageOutcome(uri, reason=error.reason.value, message=str(error)), 0.0
    except (ValueError, OSError) as error:
        # A decoder or file system surprise on one image must not sink the chunk.
        outcome = ImageOutcome(
            uri, reason=ReasonCode.CORRUPT.value, message=f"decode failed: {error}"
        )
        return None, outcome, 0.0
    except Exception as error:
        # Anything else is our bug or a library's surprise, not the file's fault: record it
        # against this image (a rescan sends it again) and let the rest of the chunk go on.
        logger.exception("unexpected error on %s", uri)
        outcome = ImageOutcome(
            uri,
            reason=ReasonCode.INTERNAL_ERROR.value,
            message=f"unexpected {type(error).__name__}: {error}",
        )
        return None, outcome, 0.0
    return pixels, None, time.perf_counter() - started


def label_images(
    uris: Sequence[str],
    *,
    read: Callable[[str], bytes],
    runner: ModelRunner,
    limits: LimitSettings,
    pool: Executor,
    batch_size: int,
    times: StageTimes | None = None,
    read_ahead: int | None = None,
) -> list[ImageOutcome]:
    """Return one outcome per URI, in input order.

    At most `read_ahead` images (default: two batches) are decoded ahead of the model, so memory
    stays bounded by the batch size, not the chunk size, when decoding outpaces predicting.
    """
    times = times if times is not None else StageTimes()
    window = read_ahead if read_ahead is not None else 2 * batch_size
    pending: deque[Future[tuple[NDArray[np.uint8] | None, ImageOutcome | None, float]]] = deque()
    submitted = 0

    def top_up() -> None:
        nonlocal submitted
        while submitted < len(uris) and len(pending) < window:
            pending.append(pool.submit(_prepare, uris[submitted], read, runner.spec, limits))
            submitted += 1

    outcomes: list[ImageOutcome | None] = [None] * len(uris)
    batch_pixels: list[NDArray[np.uint8]] = []
    batch_positions: list[int] = []

    def flush() -> None:
        if not batch_pixels:
            return
        started = time.perf_counter()
        scores = runner.predict(np.stack(batch_pixels))
        times.predict += time.perf_counter() - started
        for position, prediction in zip(
            batch_positions, to_predictions(scores, runner.class_names), strict=True
        ):
            outcomes[position] = ImageOutcome(uris[position], prediction=prediction)
        batch_pixels.clear()
        batch_positions.clear()

    top_up()
    for position in range(len(uris)):
        future = pending.popleft()
        top_up()
        waited = time.perf_counter()
        pixels, failure, decode_seconds = future.result()
        times.waiting += time.perf_counter() - waited
        times.decode += decode_seconds
        if pixels is None:
            outcomes[position] = failure
            continue
        batch_pixels.append(pixels)
        batch_positions.append(position)
        if len(batch_pixels) == batch_size:
            flush()
    flush()
    return [outcome for outcome in outcomes if outcome is not None]
