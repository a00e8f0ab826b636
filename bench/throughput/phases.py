"""Phases (a), (b), (c) and (c'): the notebook loop, the decode floor and the model alone.

(a)-(c) run in one spawned process per round (`local_phases` through `in_child`), (c') in as
many spawned model processes as the worker runs, started together (`model_layout_phase`):
TensorFlow never loads in the harness's own process.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from bench.throughput.measuring import load_average, own_cpu_seconds
from bench.throughput.model import INPUT_SIDE, MODEL_NAME
from core.settings import Precision


@dataclass(frozen=True)
class LocalSpec:
    """What the spawned process measures: the sets, the model's artifact and the knobs."""

    sets: list[tuple[str, list[str]]]  # (set name, file paths)
    artifact_dir: str
    batch_size: int
    decode_threads: int
    notebook_images: int
    model_images: int
    precision: Precision = "float32"


@contextlib.contextmanager
def _measured(result: dict[str, Any]) -> Iterator[None]:
    """Fill `result` with seconds, CPU seconds and the load average around the block."""
    result["load_before"] = load_average()
    cpu = own_cpu_seconds()
    started = time.perf_counter()
    yield
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["cpu_seconds"] = round(own_cpu_seconds() - cpu, 2)
    result["load_after"] = load_average()
    result["images_per_s"] = round(result["images"] / max(result["seconds"], 1e-9), 2)
    result["cpu_ms_per_image"] = round(1000 * result["cpu_seconds"] / max(1, result["images"]), 3)


def local_phases(spec: LocalSpec) -> dict[str, Any]:
    """(b), (c) and (a) for every set; runs in a fresh process."""
    from core.settings import LimitSettings
    from training.artifacts import load_artifact
    from worker.model_runner import KerasRunner

    artifact_dir = Path(spec.artifact_dir)
    artifact = load_artifact(artifact_dir, artifact_dir.parent.parent, MODEL_NAME)
    runner = KerasRunner(artifact, spec.batch_size, spec.precision)
    runtime = {**_runtime_threads(), "model_precision": runner.precision}
    limits = LimitSettings()
    results: dict[str, Any] = {}
    for name, texts in spec.sets:
        paths = [Path(text) for text in texts]
        _read_all(paths)  # the page cache holds every file before any phase is timed
        decode, decoded = decode_floor_phase(paths, artifact.spec, limits, spec)
        model = model_phase(runner, decoded, spec)
        del decoded
        notebook = notebook_phase(artifact.model, paths[: spec.notebook_images])
        results[name] = {"decode": decode, "model": model, "notebook": notebook}
    return {
        "artifact": str(artifact_dir),
        "version": artifact.metadata.version,
        "runtime": runtime,
        "sets": results,
    }


def _runtime_threads() -> dict[str, Any]:
    import keras
    import tensorflow as tf

    return {
        "opencv_threads": cv2.getNumThreads(),
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "keras_backend": keras.backend.backend(),
        "tensorflow": tf.__version__,
    }


def _read_all(paths: Sequence[Path]) -> None:
    for path in paths:
        path.read_bytes()


def decode_floor_phase(
    paths: Sequence[Path], input_spec: Any, limits: Any, spec: LocalSpec
) -> tuple[dict[str, Any], list[NDArray[np.uint8]]]:
    """(b): read + preprocess.load_image in a pool of `decode_threads`; keeps the first few."""
    from core.errors import ImageError
    from training.preprocess import load_image

    def decode(path: Path) -> NDArray[np.uint8] | None:
        try:
            return load_image(path.read_bytes(), input_spec, limits)
        except ImageError:
            return None

    failed = 0
    result: dict[str, Any] = {
        "phase": "decode",
        "files": len(paths),
        "threads": spec.decode_threads,
        "decoder": (
            "training.preprocess.load_image (TurboJPEG for plain JPEGs, else OpenCV; "
            "reduced-scale DCT decoding for large JPEGs)"
        ),
    }
    with (
        ThreadPoolExecutor(spec.decode_threads, thread_name_prefix="bench-decode") as pool,
        _measured(result),
    ):
        # Nothing is kept while timed: holding a thousand fresh arrays costs a page fault per
        # 4 KiB of each (about a third more CPU per crop on this VM), which no worker pays.
        for pixels in pool.map(decode, paths):
            failed += pixels is None
        # Images/s count what decoded, as (d) counts what it labeled (a refused file is cheap).
        result["images"] = len(paths) - failed
    result["failed"] = failed
    kept: list[NDArray[np.uint8]] = []
    for path in paths:  # (c)'s input, untimed
        if len(kept) >= spec.model_images:
            break
        pixels = decode(path)
        if pixels is not None:
            kept.append(pixels)
    return result, kept


def ready_batches(
    decoded: Sequence[NDArray[np.uint8]], size: int, model_images: int
) -> list[NDArray[np.uint8]]:
    """Whole batches of `size` from the first `model_images` images (repeated when fewer).

    Each in an aligned array like the worker's own batches (`aligned_empty`), so the runner
    hands them to the framework without a copy: the model alone, with no staging of our own.
    """
    from worker.predict import aligned_empty

    pixels = np.stack(decoded)
    batches = max(1, math.ceil(min(model_images, len(decoded)) / size))
    ready = []
    for index in range(batches):
        batch = aligned_empty((size, *pixels.shape[1:]))
        indices = np.arange(index * size, (index + 1) * size) % len(pixels)
        np.take(pixels, indices, axis=0, out=batch)  # gathered straight into the aligned array
        ready.append(batch)
    return ready


def model_phase(
    runner: Any, decoded: Sequence[NDArray[np.uint8]], spec: LocalSpec
) -> dict[str, Any]:
    """(c): KerasRunner.predict on whole ready batches (the first one, untimed, traces)."""
    if not decoded:
        return {"phase": "model", "images": 0, "images_per_s": 0.0, "note": "nothing decoded"}
    ready = ready_batches(decoded, spec.batch_size, spec.model_images)
    size, batches = spec.batch_size, len(ready)
    runner.predict(ready[0])
    result: dict[str, Any] = {
        "phase": "model",
        "images": batches * size,
        "batches": batches,
        "batch_size": size,
        "precision": runner.precision,
        "distinct_images": len(decoded),
    }
    with _measured(result):
        for batch in ready:
            runner.predict(batch)
    return result


def notebook_phase(model: Any, paths: Sequence[Path]) -> dict[str, Any]:
    """(a): the notebooks' loop, one image at a time (one untimed call first: a warm kernel)."""

    def one(path: Path) -> bool:
        image = cv2.imread(str(path))
        if image is None:
            return False
        resized = cv2.resize(image, (INPUT_SIDE, INPUT_SIDE))
        model.predict(np.expand_dims(resized, 0), verbose=0)
        return True

    result: dict[str, Any] = {"phase": "notebook", "files": len(paths), "images": 0}
    if not paths:
        result["images_per_s"] = 0.0
        return result
    one(paths[0])
    with _measured(result):
        result["images"] = sum(one(path) for path in paths)
    return result


@dataclass(frozen=True)
class LayoutSpec:
    """(c'): the model alone in the worker's layout, `processes` x `threads`, at the same time."""

    sets: list[tuple[str, list[str]]]
    artifact_dir: str
    batch_size: int
    model_images: int
    processes: int
    threads: int
    precision: Precision = "float32"


def _layout_child(spec: LayoutSpec, barrier: Any, results: Any) -> None:
    """One model process of (c'): same batches as (c), timed between shared barriers."""
    from training.runtime import load_keras

    load_keras(threads=spec.threads)
    from core.settings import LimitSettings
    from training.artifacts import load_artifact
    from training.preprocess import load_image
    from worker.model_runner import KerasRunner

    artifact_dir = Path(spec.artifact_dir)
    artifact = load_artifact(artifact_dir, artifact_dir.parent.parent, MODEL_NAME)
    runner = KerasRunner(artifact, spec.batch_size, spec.precision)
    limits = LimitSettings()
    for name, texts in spec.sets:
        decoded = [
            load_image(Path(text).read_bytes(), artifact.spec, limits)
            for text in texts[: spec.model_images]
        ]
        ready = ready_batches(decoded, spec.batch_size, spec.model_images)
        size, batches = spec.batch_size, len(ready)
        runner.predict(ready[0])
        barrier.wait()
        cpu, started = time.process_time(), time.perf_counter()
        for batch in ready:
            runner.predict(batch)
        finished = time.perf_counter()
        results.put((name, started, finished, time.process_time() - cpu, batches * size))
        barrier.wait()


def model_layout_phase(spec: LayoutSpec) -> dict[str, dict[str, Any]]:
    """(c'): `processes` spawned model processes of `threads` threads each, started together.

    Images/s is every process's images over the span from the first start to the last finish
    (perf_counter is the system-wide monotonic clock on Linux, so the processes' times compare).
    """
    context = get_context("spawn")
    barrier = context.Barrier(spec.processes)
    results = context.Queue()
    children = [
        context.Process(target=_layout_child, args=(spec, barrier, results), daemon=True)
        for _ in range(spec.processes)
    ]
    load_before = load_average()
    for child in children:
        child.start()
    rows = [results.get(timeout=600) for _ in range(spec.processes * len(spec.sets))]
    for child in children:
        child.join(timeout=60)
    measured: dict[str, dict[str, Any]] = {}
    for name, _ in spec.sets:
        mine = [row for row in rows if row[0] == name]
        seconds = max(row[2] for row in mine) - min(row[1] for row in mine)
        images = sum(row[4] for row in mine)
        cpu = sum(row[3] for row in mine)
        measured[name] = {
            "phase": "model_layout",
            "processes": spec.processes,
            "threads": spec.threads,
            "precision": spec.precision,
            "images": images,
            "batch_size": spec.batch_size,
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu, 2),
            "images_per_s": round(images / max(seconds, 1e-9), 2),
            "cpu_ms_per_image": round(1000 * cpu / max(1, images), 3),
            "load_before": load_before,
            "load_after": load_average(),
        }
    return measured


def in_child(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run `function` in a fresh interpreter, so that TensorFlow never loads in this one."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()
