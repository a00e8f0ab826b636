"""Label a chunk of images: read and decode in a thread pool, predict in fixed-size batches.

Pure logic with its seams passed in (a `read` function and a `ModelRunner`), so it is tested on
real files and a real model without a broker. Decoding runs ahead in the pool while the model
works on the previous batch (the decoders and file reads release the GIL). A bad image is data: it
becomes an outcome with a reason, and the rest of the chunk goes on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from core.errors import ImageError
from core.reasons import Reason
from core.settings import FaceSettings, LimitSettings
from training.faces import FaceDetector
from training.faces.labeling import DetectedFaces, PhotoFaces, find_faces, label_photos
from training.inference import Prediction, to_predictions
from training.preprocess import InputSpec, load_image

logger = logging.getLogger(__name__)


class ModelRunner(Protocol):
    """What the worker needs of a model: its version, input, classes and a batch predict."""

    version: str
    spec: InputSpec
    class_names: Sequence[str]
    # The calibrated per-class thresholds (None: the model never says uncertain).
    thresholds: Mapping[str, float | None] | None

    def predict(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """(N, H, W, C) uint8 -> (N, classes) scores; `images` is not used after it returns."""
        ...


@dataclass(frozen=True)
class ImageOutcome:
    """One URI's result: a prediction, a face model's faces, or the reason there is none.

    An image model's outcome has `prediction`; a face model's has `faces` (its `outcome` is
    `labeled` with one `FaceLabel` per face, or `no_face`); a failure has neither, and a reason.
    """

    uri: str
    prediction: Prediction | None = None
    reason: str | None = None
    message: str | None = None
    faces: PhotoFaces | None = None

    @property
    def failed(self) -> bool:
        return self.prediction is None and self.faces is None


@dataclass
class StageTimes:
    """Seconds spent per stage of a chunk (read+decode overlaps predict, so they do not add up)."""

    decode: float = 0.0
    predict: float = 0.0
    waiting: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


def _prepare(
    uri: str,
    read: Callable[[str], bytes],
    spec: InputSpec,
    limits: LimitSettings,
    slot: NDArray[np.uint8],
) -> tuple[ImageOutcome | None, float]:
    """Decode one image into its batch slot; return its failure (None if it decoded) and time."""
    started = time.perf_counter()
    try:
        load_image(read(uri), spec, limits, out=slot)
    except ImageError as error:
        return ImageOutcome(uri, reason=error.reason.value, message=str(error)), 0.0
    except (ValueError, OSError) as error:
        # A decoder or file system surprise on one image must not sink the chunk.
        return ImageOutcome(
            uri, reason=Reason.CORRUPT.value, message=f"decode failed: {error}"
        ), 0.0
    except Exception as error:
        # Anything else is our bug or a library's surprise, not the file's fault: record it
        # against this image (a rescan sends it again) and let the rest of the chunk go on.
        logger.exception("unexpected error on %s", uri)
        return ImageOutcome(
            uri,
            reason=Reason.INTERNAL_ERROR.value,
            message=f"unexpected {type(error).__name__}: {error}",
        ), 0.0
    return None, time.perf_counter() - started


# TensorFlow takes an array without copying it only when it starts on a 64-byte boundary
# (EIGEN_MAX_ALIGN_BYTES); NumPy aligns to 16.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...]) -> NDArray[np.uint8]:
    """An uninitialised C-contiguous uint8 array that starts on an `ALIGNMENT`-byte boundary."""
    size = int(np.prod(shape))
    raw = np.empty(size + ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset : offset + size].reshape(shape)


Decoded = tuple[int, ImageOutcome | None, float]  # slot, failure (None: decoded), seconds


def _decode_slots(
    claim: Iterator[int],
    uris: Sequence[str],
    read: Callable[[str], bytes],
    spec: InputSpec,
    limits: LimitSettings,
    pixels: NDArray[np.uint8],
) -> list[Decoded]:
    """Decode slots taken from `claim` until none is left.

    A batch's `claim` is shared by as many of these tasks as the pool has threads: each slot is
    taken once (a range iterator's `next` is atomic under the GIL), and the threads share the
    work however uneven the images are, at one pool task per thread and batch, not per image.
    """
    decoded = []
    for slot in claim:
        decoded.append((slot, *_prepare(uris[slot], read, spec, limits, pixels[slot])))
    return decoded


@dataclass
class _Batch:
    """Consecutive URIs being decoded into the slots of one preallocated (N, H, W, C) array."""

    start: int
    size: int
    pixels: NDArray[np.uint8]
    decoding: list[Future[list[Decoded]]]


def label_images(
    uris: Sequence[str],
    *,
    read: Callable[[str], bytes],
    runner: ModelRunner,
    limits: LimitSettings,
    pool: Executor,
    batch_size: int,
    times: StageTimes | None = None,
    batches_ahead: int = 2,
    decode_tasks: int = 2,
) -> list[ImageOutcome]:
    """Return one outcome per URI, in input order.

    Every image is decoded straight into its slot of a batch array (no per-image array stacked
    into a batch afterwards: that copy was a third of the main thread's work on a face crop),
    aligned so that the model runner can hand it to the framework without a copy either.
    While the model predicts one batch, the pool decodes the next `batches_ahead` (at least 1),
    so memory stays bounded by `batches_ahead + 1` batch arrays, reused, whatever the chunk size.
    A batch with failed images is predicted on its good slots only. `decode_tasks` (the pool's
    thread count) tasks decode each batch, sharing its slots (`_decode_slots`).
    """
    times = times if times is not None else StageTimes()
    spec = runner.spec
    outcomes: list[ImageOutcome | None] = [None] * len(uris)
    spare: list[NDArray[np.uint8]] = []
    decoding: deque[_Batch] = deque()
    starts = iter(range(0, len(uris), batch_size))

    def submit_next() -> None:
        start = next(starts, None)
        if start is None:
            return
        pixels = spare.pop() if spare else aligned_empty((batch_size, *spec.shape))
        batch_uris = uris[start : start + batch_size]
        claim = iter(range(len(batch_uris)))
        futures = [
            pool.submit(_decode_slots, claim, batch_uris, read, spec, limits, pixels)
            for _ in range(max(1, min(decode_tasks, len(batch_uris))))
        ]
        decoding.append(_Batch(start, len(batch_uris), pixels, futures))

    for _ in range(max(1, batches_ahead)):
        submit_next()
    while decoding:
        batch = decoding.popleft()
        submit_next()  # queued behind this batch, so the pool never idles while the model works
        waited = time.perf_counter()
        results = [decoded for future in batch.decoding for decoded in future.result()]
        times.waiting += time.perf_counter() - waited
        good: list[int] = []
        for slot, failure, decode_seconds in sorted(results, key=lambda decoded: decoded[0]):
            times.decode += decode_seconds
            if failure is None:
                good.append(slot)
            else:
                outcomes[batch.start + slot] = failure
        if good:
            # Contiguous when nothing failed; fancy indexing copies only a batch with failures.
            pixels = batch.pixels[: batch.size] if len(good) == batch.size else batch.pixels[good]
            started = time.perf_counter()
            scores = runner.predict(pixels)
            times.predict += time.perf_counter() - started
            for slot, prediction in zip(
                good, to_predictions(scores, runner.class_names, runner.thresholds), strict=True
            ):
                position = batch.start + slot
                outcomes[position] = ImageOutcome(uris[position], prediction=prediction)
        # The runner has copied the batch into the framework by now: the array can be refilled.
        spare.append(batch.pixels)
    return [outcome for outcome in outcomes if outcome is not None]


def label_face_images(
    uris: Sequence[str],
    *,
    read: Callable[[str], bytes],
    runner: ModelRunner,
    detector: FaceDetector,
    faces: FaceSettings,
    limits: LimitSettings,
    pool: Executor,
    batch_size: int,
    times: StageTimes | None = None,
    photos_ahead: int = 4,
) -> list[ImageOutcome]:
    """A face model's chunk: per photo, read -> decode for faces -> detect -> crop (in the pool);
    the crops of many photos share the model's batches. One outcome per URI, in input order.

    The pool works `photos_ahead` photos ahead of the photo whose faces are being gathered, so
    memory holds a bounded number of decoded photos whatever the chunk size; crops wait for a
    full model batch (`batch_size` faces) and are then labeled together.
    """
    times = times if times is not None else StageTimes()
    spec = runner.spec
    outcomes: list[ImageOutcome | None] = [None] * len(uris)

    def detect(uri: str) -> tuple[DetectedFaces | None, ImageOutcome | None, float]:
        started = time.perf_counter()
        try:
            found = find_faces(read(uri), detector, spec, faces, limits)
        except ImageError as error:
            failure = ImageOutcome(uri, reason=error.reason.value, message=str(error))
            return None, failure, time.perf_counter() - started
        return found, None, time.perf_counter() - started

    waiting: list[tuple[int, DetectedFaces]] = []  # photos whose crops wait for the model

    def classify() -> None:
        if not waiting:
            return
        photos = [photo for _, photo in waiting]
        crops = np.concatenate([photo.crops for photo in photos]) if photos else None
        scores = np.empty((0, len(runner.class_names)), dtype=np.float32)
        if crops is not None and len(crops):
            started = time.perf_counter()
            scores = np.concatenate(
                [
                    runner.predict(crops[start : start + batch_size])
                    for start in range(0, len(crops), batch_size)
                ]
            )
            times.predict += time.perf_counter() - started
        for (position, _), result in zip(
            waiting,
            label_photos(photos, scores, runner.class_names, runner.thresholds),
            strict=True,
        ):
            outcomes[position] = ImageOutcome(uris[position], faces=result)
        waiting.clear()

    futures: deque[tuple[int, Future[tuple[DetectedFaces | None, ImageOutcome | None, float]]]]
    futures = deque()
    positions = iter(range(len(uris)))
    for position in positions:
        futures.append((position, pool.submit(detect, uris[position])))
        if len(futures) > max(1, photos_ahead):
            break
    while futures:
        position, future = futures.popleft()
        following = next(positions, None)
        if following is not None:
            futures.append((following, pool.submit(detect, uris[following])))
        waited = time.perf_counter()
        found, failure, seconds = future.result()
        times.waiting += time.perf_counter() - waited
        times.decode += seconds
        if failure is not None:
            outcomes[position] = failure
            continue
        assert found is not None
        waiting.append((position, found))
        if sum(len(photo.faces) for _, photo in waiting) >= batch_size:
            classify()
    classify()
    done = [outcome for outcome in outcomes if outcome is not None]
    if len(done) != len(uris):  # every position is filled above; a gap would be our bug
        raise RuntimeError(f"{len(uris) - len(done)} photo(s) got no outcome")
    return done
