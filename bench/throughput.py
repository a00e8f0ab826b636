"""Labeling throughput, four ways, in one run on the same images, model and cores.

    python -m bench throughput                                  # crops 2000 and photos 300
    python -m bench throughput --kind crops --images 20000      # a long run: is worker RSS flat?
    python -m bench throughput --folder ~/Pictures/2024         # your own images
    python -m bench throughput --kind both --crops 20 --photos 3 --photo-size 800x600  # smoke

Image sets (generated once, cached under CACHE/<kind>-<n>[-<W>x<H>]/ and reused):

  crops    256x256 face crops (training.sample_data.draw_face plus texture at every scale and
           sensor noise), JPEG q90, ~20 KB each, 500 per person folder
  photos   12 MP camera-like JPEGs (4000x3000): a scene drawn at quarter size (gradient sky,
           objects, a face, texture), upscaled, then fine texture and sensor noise at full size,
           JPEG q92, 2-5 MB each, in year/day folders like a camera archive
  --folder an existing folder instead (every regular file below it; (d) scans all of it)

Phases, each on the same files (read once beforehand, so every phase reads the page cache):

  (a) notebook   the notebooks' loop: cv2.imread, cv2.resize to 256x256, model.predict on a
                 batch of one; on the first --notebook-images images only (it is slow)
  (b) decode     the decode floor: preprocess.load_image (TurboJPEG for plain JPEGs, OpenCV for
                 the rest; reduced-scale DCT decoding for large JPEGs, full size for crops), the
                 worker's own decoding, over every image in a thread pool of
                 --floor-threads threads (default: every usable CPU); no model
  (c) model      KerasRunner.predict alone on ready uint8 batches of --batch-size, made from the
                 first --model-images decoded images (whole batches, repeated when fewer; aligned
                 like the worker's, so no copy on the way in), in one
                 process with the framework's default threads (one per CPU), in
                 --precision (float32 by default; (a) is always the notebooks' float32)
  (c') model     the same batches in the worker's layout: as many spawned processes as (d) runs,
                 each with (d)'s model threads, all started together; images/s over the span
                 from the first start to the last finish. The faster of (c) and (c') is the
                 model's limit on these cores.
  (d) emolabel   the product end to end: a fresh EMOLABEL_HOME under OUT, the embedded Redis
                 (ensure_redis), a real Celery worker (start_local_worker; processes, model and
                 decode threads as the settings resolve them unless --concurrency,
                 --model-threads, --decode-threads say otherwise; worker.batch_size and
                 scan.chunk_size / chunk_bytes as given), a benchmark
                 model registered active in SQLite, the real producer (run_scan over the folder,
                 as `emolabel scan` does). Every worker process loads the model when it starts;
                 the bench waits until each has, and the worker labels a small warm-up job;
                 then the clock runs from the first publish to the job's
                 finished_at, which the worker sets in the transaction that commits the
                 last outcome (the harness reads only the job's row, every 0.25 s).

Rounds (--repeat, default 3): the worker is started first, and stopped (SIGSTOP) while the other
phases run, since an idle Celery worker still takes some CPU. Every round measures (b), (c), (a),
(c') and (d) once, in that order. A shared machine drifts by 10% within minutes, so the table
shows, per phase, the round with the median images/s (the JSON keeps every round, and each
round's own ratios). Rounds after the first relabel the same files (`scan --force`), so their
writes are upserts over existing results.

(a)-(c) run in a spawned process per round (TensorFlow is never imported by this one); (d) here.
(d) also records where the machine's CPU time went (/proc/stat): the worker, this process (scan,
watcher), Redis, the rest, and idle, with the idle share at the start, middle and end.
The model is the seeds' CNN (training.model.make_model, 256x256x3, 2 classes) with random
weights, saved as an artifact: speed does not depend on what it learned.

Worker memory during (d): VmHWM of the worker's main and pool processes (reset when the timed job
starts), RSS sampled every 0.5 s and noted at 10%, 50% and 100% of the images: flat means the
100% figure is the 10% one. The worker's log gives the chunks' stage seconds (decode is summed
over threads) and the time between chunks (write, ack, next message: the model idles).

Ratios: (d)/(b), (d)/(c), (d)/(c'), (d)/(a), and (d) over the shared-core bound
1/(1/b + 1/max(c, c')): decoding
and the model each use every core, so one pipeline doing both cannot go faster than that.
The load average is recorded before and after every phase; on a shared machine images/s are only
as good as the CPU that was free, so CPU ms per image (all threads; the worker's processes for
(d)) are given too: they hardly depend on the load.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from numpy.typing import NDArray

from bench.machine import describe, machine, package_versions
from core.errors import ConfigError, EmolabelError
from core.settings import Precision, ScanSettings, WorkerSettings
from worker.precision import PRECISIONS
from worker.resources import available_cpus, worker_layout

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from core.settings import Settings
    from emolabel.embedded import LocalWorker

KINDS = ("crops", "photos")
DEFAULT_IMAGES = {"crops": 2000, "photos": 300}
CROP_SIDE = 256
PHOTO_SIZE = (4000, 3000)  # width, height: 12 MP
CROP_QUALITY = 90
PHOTO_QUALITY = 92
CROPS_PER_FOLDER = 50
PHOTOS_PER_FOLDER = 25
# Services whose CPU (d) reports apart from "other" (the embedded Redis; PostgreSQL if used).
SERVICE_COMMANDS = ("redis-server", "postgres")
LAYOUT_VERSION = 1  # bump when generated images change, so that cached sets are drawn again
MODEL_NAME = "bench"
CLASS_NAMES = ("happy", "sad")
INPUT_SIDE = 256
WARM_UP_IMAGES = 4
SAMPLE_SECONDS = 0.5
# (d)'s time comes from the job's finished_at, so the poll only decides how soon the harness
# notices the end; each poll costs the cores it measures a millisecond or two of CPU.
POLL_SECONDS = 0.25
# The job's counts (a GROUP BY over its ledger) are read this often, for the 10% and 50% marks;
# every POLL_SECONDS only the job's row is: the harness must not take the worker's CPU.
COUNT_SECONDS = 0.5


# --- image sets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    """The files one set of phases runs on, and how they came to be."""

    name: str
    kind: str  # crops | photos | folder
    root: Path
    paths: list[Path]
    reused: bool
    generate_seconds: float

    def describe(self) -> dict[str, Any]:
        sizes = [path.stat().st_size for path in self.paths]
        return {
            "name": self.name,
            "kind": self.kind,
            "root": str(self.root),
            "images": len(self.paths),
            "bytes_total": sum(sizes),
            "bytes_mean": round(sum(sizes) / max(1, len(sizes))),
            "bytes_min": min(sizes, default=0),
            "bytes_max": max(sizes, default=0),
            "dimensions": _dimensions(self.paths[0]) if self.paths else None,
            "reused": self.reused,
            "generate_seconds": round(self.generate_seconds, 2),
        }


def _dimensions(path: Path) -> list[int] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return list(image.size)
    except (OSError, UnidentifiedImageError):
        return None


def crop_path(root: Path, index: int) -> Path:
    """root/person_<n>/session_<n>/crop_<index>.jpg: 50 crops a session, 10 sessions a person."""
    session = index // CROPS_PER_FOLDER
    return (
        root
        / f"person_{session // 10:03d}"
        / f"session_{session % 10:02d}"
        / (f"crop_{index:06d}.jpg")
    )


def photo_path(root: Path, index: int) -> Path:
    """root/<year>/<year>-<month>-01/IMG_<index>.JPG: 25 photos a day folder, 12 a year."""
    day = index // PHOTOS_PER_FOLDER
    year = 2015 + day // 12
    return root / str(year) / f"{year}-{day % 12 + 1:02d}-01" / f"IMG_{index:05d}.JPG"


def _noise_octaves(
    rng: np.random.Generator, height: int, width: int, octaves: int, cells: int
) -> NDArray[np.float32]:
    """Smooth noise summed over octaves, amplitude falling with frequency as in natural images."""
    total = np.zeros((height, width), np.float32)
    amplitude, weight = 1.0, 0.0
    for _ in range(octaves):
        grid_height = max(2, round(cells * height / max(height, width)))
        grid_width = max(2, round(cells * width / max(height, width)))
        grid = rng.standard_normal((grid_height, grid_width), dtype=np.float32)
        total += np.float32(amplitude) * cv2.resize(
            grid, (width, height), interpolation=cv2.INTER_CUBIC
        )
        weight += amplitude
        amplitude *= 0.6
        cells *= 2
    return total / np.float32(weight)


def _encode_jpeg(rgb: NDArray[np.float32], quality: int) -> bytes:
    pixels = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return encoded.tobytes()


def draw_crop(rng: np.random.Generator, index: int) -> bytes:
    """One 256x256 face crop as JPEG q90, with texture at every scale and sensor noise."""
    from training.sample_data import draw_face, features_for_class

    class_index = index % len(CLASS_NAMES)
    features = features_for_class(CLASS_NAMES[class_index], class_index)
    image = draw_face(rng, features, (CROP_SIDE, CROP_SIDE)).astype(np.float32)
    # Drawn faces are flat; skin, hair and fabric are not. The tint keeps the texture coloured.
    texture = _noise_octaves(rng, CROP_SIDE, CROP_SIDE, octaves=6, cells=4)
    image += texture[:, :, None] * np.float32(rng.uniform(8, 16)) * rng.uniform(0.8, 1.2, 3)
    sensor = rng.standard_normal((CROP_SIDE, CROP_SIDE, 1), dtype=np.float32)
    image += sensor * np.float32(rng.uniform(1.5, 3.5))
    return _encode_jpeg(image, CROP_QUALITY)


def draw_photo(
    rng: np.random.Generator, size: tuple[int, int], grain: NDArray[np.float32]
) -> bytes:
    """One camera-like JPEG of `size` (width, height); `grain` is full-size unit noise to shift.

    Shifting one shared noise field costs a copy where fresh noise costs a random draw per pixel;
    JPEG codes each 8x8 block on its own, so the file is as large either way.
    """
    from training.sample_data import draw_face, features_for_class

    width, height = size
    low_width, low_height = max(64, width // 4), max(48, height // 4)
    scene = np.empty((low_height, low_width, 3), np.float32)
    top, bottom = rng.uniform(40, 230, 3), rng.uniform(20, 200, 3)
    ramp = np.linspace(0, 1, low_height, dtype=np.float32)[:, None, None]
    scene[:] = top * (1 - ramp) + bottom * ramp
    for _ in range(int(rng.integers(6, 16))):
        colour = tuple(float(value) for value in rng.uniform(0, 255, 3))
        centre = (int(rng.uniform(0, low_width)), int(rng.uniform(0, low_height)))
        axes = (int(rng.uniform(0.03, 0.3) * low_width), int(rng.uniform(0.03, 0.4) * low_height))
        cv2.ellipse(scene, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    side = max(64, int(min(low_height, low_width) * rng.uniform(0.3, 0.5)))
    if side <= min(low_height, low_width):
        face = draw_face(rng, features_for_class("happy", 0), (side, side)).astype(np.float32)
        y = int(rng.uniform(0, low_height - side))
        x = int(rng.uniform(0, low_width - side))
        scene[y : y + side, x : x + side] = face
    scene += _noise_octaves(rng, low_height, low_width, 5, 8)[:, :, None] * np.float32(25)
    blurred = cv2.GaussianBlur(scene, (0, 0), 1.0)
    image = np.asarray(
        cv2.resize(blurred, (width, height), interpolation=cv2.INTER_CUBIC), dtype=np.float32
    )
    # Foliage, fabric and hair here, smooth sky there: fine texture under a patchy mask.
    mask = np.clip(_noise_octaves(rng, 48, 64, 3, 4) * 1.5 + 0.5, 0.05, 1.0)
    mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR)
    shift = (int(rng.integers(0, height)), int(rng.integers(0, width)))
    noise = np.roll(grain, shift, axis=(0, 1))
    detail = np.asarray(cv2.GaussianBlur(noise, (0, 0), 1.2), dtype=np.float32)
    detail *= np.float32(2.5 * rng.uniform(14, 26))
    detail *= mask
    detail += noise[::-1, ::-1] * np.float32(rng.uniform(2.5, 4.0))  # sensor noise
    image += detail[:, :, None]
    return _encode_jpeg(image, PHOTO_QUALITY)


def _set_name(kind: str, count: int, photo_size: tuple[int, int]) -> str:
    name = f"{kind}-{count}"
    if kind == "photos" and photo_size != PHOTO_SIZE:
        name += f"-{photo_size[0]}x{photo_size[1]}"
    return name


def ensure_image_set(
    cache: Path, kind: str, count: int, *, photo_size: tuple[int, int], seed: int
) -> ImageSet:
    """The generated set under cache/<name>/, drawn unless a whole one with the same recipe is."""
    name = _set_name(kind, count, photo_size)
    root = cache / name
    manifest = cache / f"{name}.json"
    recipe = {
        "kind": kind,
        "count": count,
        "layout": LAYOUT_VERSION,
        "seed": seed,
        "size": [CROP_SIDE, CROP_SIDE] if kind == "crops" else list(photo_size),
    }
    place = crop_path if kind == "crops" else photo_path
    paths = [place(root, index) for index in range(count)]
    if (
        manifest.exists()
        and json.loads(manifest.read_text()) == recipe
        and all(path.is_file() for path in paths)
    ):
        return ImageSet(name, kind, root, paths, reused=True, generate_seconds=0.0)
    manifest.unlink(missing_ok=True)
    if root.exists():
        shutil.rmtree(root)  # ours: a set of another recipe, or one an interrupt left half drawn
    started = time.perf_counter()
    grain = (
        np.random.default_rng(seed).standard_normal(photo_size[::-1], dtype=np.float32)
        if kind == "photos"
        else None
    )

    def write(index: int) -> None:
        rng = np.random.default_rng(
            np.random.SeedSequence(seed, spawn_key=(KINDS.index(kind), index))
        )
        data = draw_crop(rng, index) if grain is None else draw_photo(rng, photo_size, grain)
        path = paths[index]
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".part")
        temporary.write_bytes(data)
        temporary.replace(path)

    # Threads: OpenCV and numpy release the GIL for the heavy parts. A 12 MP photo holds a few
    # hundred MB of float32 while it is drawn, hence the cap.
    threads = max(1, min(os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(threads, thread_name_prefix="bench-draw") as pool:
        for _ in pool.map(write, range(count)):
            pass
    manifest.write_text(json.dumps(recipe))
    return ImageSet(
        name, kind, root, paths, reused=False, generate_seconds=time.perf_counter() - started
    )


def folder_set(folder: Path) -> ImageSet:
    """Every regular file below `folder`, sorted: (d) scans the whole folder, so all of them."""
    if not folder.is_dir():
        raise ConfigError(f"--folder {folder}: not a folder")
    paths: list[Path] = []
    for directory, _subfolders, names in os.walk(folder):
        paths.extend(Path(directory) / name for name in names)
    paths = sorted(path for path in paths if path.is_file() and not path.is_symlink())
    if not paths:
        raise ConfigError(f"--folder {folder}: no files below it")
    return ImageSet(
        folder.name or "folder", "folder", folder, paths, reused=True, generate_seconds=0.0
    )


def _count_files(folder: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))


# --- phases (a), (b), (c): one spawned process ------------------------------------------------


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


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


@contextlib.contextmanager
def _measured(result: dict[str, Any]) -> Iterator[None]:
    """Fill `result` with seconds, CPU seconds and the load average around the block."""
    result["load_before"] = _load()
    cpu = _cpu_seconds()
    started = time.perf_counter()
    yield
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["cpu_seconds"] = round(_cpu_seconds() - cpu, 2)
    result["load_after"] = _load()
    result["images_per_s"] = round(result["images"] / max(result["seconds"], 1e-9), 2)
    result["cpu_ms_per_image"] = round(1000 * result["cpu_seconds"] / max(1, result["images"]), 3)


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
    load_before = _load()
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
            "load_after": _load(),
        }
    return measured


def _in_child(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run `function` in a fresh interpreter, so that TensorFlow never loads in this one."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# --- phase (d): the product end to end --------------------------------------------------------


def _proc_status(pid: int) -> dict[str, int] | None:
    """VmRSS and VmHWM of `pid` in KiB, or None when it is gone."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:  # noqa: PTH123
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, amount, _unit = line.split()
                    values[key.rstrip(":")] = int(amount)
    except OSError:
        return None
    return values


def _proc_cpu_seconds(pid: int) -> float:
    return _proc_cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def _proc_cpu_seconds_of(stat_file: Path) -> float:
    """utime + stime from a /proc stat file (a process's or one thread's), in seconds."""
    try:
        return _stat_cpu_seconds(stat_file.read_text())
    except OSError:
        return 0.0


def _stat_cpu_seconds(text: str) -> float:
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# /proc/stat's first line, in order; guest time is already counted in user.
_CPU_STATES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _machine_cpu() -> dict[str, float]:
    """Seconds every CPU has spent in each state since boot (the machine, not this process)."""
    try:
        values = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    return {state: int(value) / tick for state, value in zip(_CPU_STATES, values, strict=False)}


def _process_stats() -> Iterator[tuple[int, str]]:
    """(pid, /proc/<pid>/stat text) of every live process; one that exits meanwhile is skipped."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                yield int(entry.name), (entry / "stat").read_text()


def _cpu_by_command(commands: Sequence[str]) -> dict[str, float]:
    """CPU seconds used so far by every live process whose name is one of `commands`."""
    spent = dict.fromkeys(commands, 0.0)
    for _pid, text in _process_stats():
        name = text[text.find("(") + 1 : text.rfind(")")]
        if name in spent:
            spent[name] += _stat_cpu_seconds(text)
    return spent


def machine_cpu_split(
    before: dict[str, float],
    after: dict[str, float],
    *,
    worker: float,
    bench: float,
    services: dict[str, float],
) -> dict[str, float]:
    """Where the machine's CPU time went over a span: busy by whom, idle, stolen.

    `worker`, `bench` and `services` are CPU seconds measured per process over the same span;
    "other" is whatever else was busy (the kernel's own threads, other users of the machine).
    """
    spent = {state: after.get(state, 0.0) - before.get(state, 0.0) for state in _CPU_STATES}
    busy = sum(spent[state] for state in ("user", "nice", "system", "irq", "softirq"))
    return {
        "cpu_seconds_available": round(sum(spent.values()), 2),
        "busy": round(busy, 2),
        "worker": round(worker, 2),
        "bench": round(bench, 2),
        **{name: round(seconds, 2) for name, seconds in services.items()},
        "other": round(busy - worker - bench - sum(services.values()), 2),
        "idle": round(spent["idle"] + spent["iowait"], 2),
        "steal": round(spent["steal"], 2),
    }


def idle_by_part(
    samples: Sequence[tuple[float, float]], seconds: float, cores: int, edge: float = 0.5
) -> dict[str, float | None]:
    """Share of the machine's CPU left idle in the first and last `edge` seconds and between.

    `samples` are (seconds since the first publish, cumulative idle CPU seconds), `seconds` the
    timed span. Tells a pipeline's start and drain (one chunk, one process) from its steady state.
    """
    if seconds <= 0 or not samples:
        return {"start": None, "middle": None, "end": None}

    def idle_at(moment: float) -> float:
        before = [idle for at, idle in samples if at <= moment]
        return before[-1] if before else samples[0][1]

    marks = [0.0, min(edge, seconds / 3), max(seconds - edge, 2 * seconds / 3), seconds]
    shares: list[float | None] = []
    for start, end in itertools.pairwise(marks):
        span = end - start
        shares.append(
            round((idle_at(end) - idle_at(start)) / (span * cores), 3) if span > 0 else None
        )
    return dict(zip(("start", "middle", "end"), shares, strict=True))


def _children(pid: int) -> list[int]:
    """Live direct children of `pid` (the worker's pool processes)."""
    found: list[int] = []
    for child, text in _process_stats():
        fields = text.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] not in {"Z", "X"}:
            found.append(child)
    return sorted(found)


def _reset_peak(pid: int) -> bool:
    """Reset VmHWM of `pid` to its current RSS (Linux >= 4.0, our own processes)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Checkpoint:
    """Worker RSS when the job first reached `percent` of the images."""

    percent: int
    done: int
    seconds: float
    rss_mib: float
    main_rss_mib: float
    pool_rss_mib: float


@dataclass
class WorkerMemory:
    """RSS of a worker's main process and its pool processes, sampled from /proc."""

    main_pid: int
    samples: list[tuple[float, float]] = field(default_factory=list)  # (s, total RSS MiB)

    def processes(self) -> tuple[int, list[int]]:
        return self.main_pid, _children(self.main_pid)

    def rss(self) -> tuple[float, float]:
        """(main, pool) RSS in MiB now."""
        main, pool = self.processes()
        main_kib = (_proc_status(main) or {}).get("VmRSS", 0)
        pool_kib = sum((_proc_status(pid) or {}).get("VmRSS", 0) for pid in pool)
        return main_kib / 1024, pool_kib / 1024

    def reset_peaks(self) -> bool:
        main, pool = self.processes()
        return all([_reset_peak(main), *(_reset_peak(pid) for pid in pool)])

    def peaks(self) -> dict[str, Any]:
        main, pool = self.processes()
        main_hwm = (_proc_status(main) or {}).get("VmHWM", 0) / 1024
        pool_hwm = [(_proc_status(pid) or {}).get("VmHWM", 0) / 1024 for pid in pool]
        return {
            "main_vm_hwm_mib": round(main_hwm, 1),
            "pool_vm_hwm_mib": [round(value, 1) for value in pool_hwm],
            # Peaks of different processes need not coincide: the sum is an upper bound.
            "total_vm_hwm_mib": round(main_hwm + sum(pool_hwm), 1),
            "sampled_peak_rss_mib": max((rss for _, rss in self.samples), default=0.0),
        }

    def cpu_seconds(self) -> float:
        main, pool = self.processes()
        return _proc_cpu_seconds(main) + sum(_proc_cpu_seconds(pid) for pid in pool)

    def thread_cpu(self) -> dict[tuple[int, int], tuple[str, float]]:
        """(pid, tid) -> (thread name, CPU seconds) for every thread of the worker's processes."""
        main, pool = self.processes()
        threads: dict[tuple[int, int], tuple[str, float]] = {}
        for pid in (main, *pool):
            role = "main" if pid == main else "pool"
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError):
                        name = (task / "comm").read_text().strip()
                        threads[(pid, int(task.name))] = (
                            f"{role}:{name}",
                            _proc_cpu_seconds_of(task / "stat"),
                        )
        return threads


def thread_cpu_spent(
    before: dict[tuple[int, int], tuple[str, float]],
    after: dict[tuple[int, int], tuple[str, float]],
) -> list[dict[str, Any]]:
    """CPU seconds each worker thread spent between two `thread_cpu` snapshots, busiest first.

    Python and oneDNN threads are all called `python`, so the seconds tell them apart: with a
    model-bound set, as many threads as intra-op threads carry the model; the decode threads
    follow.
    """
    spent: list[dict[str, Any]] = [
        {
            "tid": tid,
            "name": name,
            "cpu_seconds": round(seconds - before.get((pid, tid), (name, 0.0))[1], 2),
        }
        for (pid, tid), (name, seconds) in after.items()
    ]
    return sorted(
        (thread for thread in spent if thread["cpu_seconds"] > 0),
        key=lambda thread: -thread["cpu_seconds"],
    )


class JobWatch:
    """Times a job from its first publish until nothing is pending; samples worker RSS meanwhile.

    `publisher()` wraps the real publisher to note the first publish; the scan runs in the
    calling thread while a thread reads the job's row every POLL_SECONDS, its counts every
    COUNT_SECONDS and the worker's RSS every SAMPLE_SECONDS. The job is over when its row says
    done: the worker sets that, with `finished_at`, in the transaction that commits the last
    outcome, and never while the scan runs (the job is `scanning` until then). The time is taken
    from `finished_at`, so the polling interval does not add to it.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        worker: LocalWorker,
        memory: WorkerMemory,
        expected: int,
        timeout: float,
    ) -> None:
        self.sessions = sessions
        self.worker = worker
        self.memory = memory
        self.expected = expected
        self.timeout = timeout
        self.job_id: int | None = None
        self.first_publish: float | None = None
        self.first_publish_utc: dt.datetime | None = None
        self.finished: float | None = None
        self.finished_utc: dt.datetime | None = None
        self.checkpoints: list[Checkpoint] = []
        # (seconds since the first publish, the machine's idle CPU seconds so far), every poll.
        self.idle_samples: list[tuple[float, float]] = []
        self.error: BaseException | str | None = None
        self.counts: Any = None
        self._published = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)

    def publisher(self, publish: Callable[[int, int, list[str]], str]) -> Any:
        def first_noted(job_id: int, chunk_index: int, uris: list[str]) -> str:
            if self.first_publish is None:
                self.job_id = job_id
                self.first_publish = time.perf_counter()
                self.first_publish_utc = dt.datetime.now(dt.UTC)
                self._published.set()
            return publish(job_id, chunk_index, uris)

        return first_noted

    def start(self) -> None:
        self._thread.start()

    def scan_returned(self) -> None:
        self._published.set()  # a scan that published nothing must not leave the thread waiting

    def wait(self) -> None:
        self._thread.join()
        if isinstance(self.error, BaseException):
            raise self.error
        if self.error is not None:
            raise RuntimeError(self.error)

    def _run(self) -> None:
        try:
            self._watch()
        except BaseException as error:  # re-raised in the calling thread by wait()
            self.error = error

    def _watch(self) -> None:
        from sqlalchemy import select

        from db.models import Job, JobStatus
        from db.repository import job_counts

        self._published.wait()
        if self.first_publish is None or self.job_id is None:
            return
        next_sample = next_count = 0.0
        counts = None
        while True:
            now = time.perf_counter()
            machine = _machine_cpu()
            self.idle_samples.append(
                (now - self.first_publish, machine.get("idle", 0.0) + machine.get("iowait", 0.0))
            )
            if now >= next_sample:
                main, pool = self.memory.rss()
                self.memory.samples.append(
                    (round(now - self.first_publish, 2), round(main + pool, 1))
                )
                next_sample = now + SAMPLE_SECONDS
            with self.sessions() as session:
                status, finished_at = session.execute(
                    select(Job.status, Job.finished_at).where(Job.id == self.job_id)
                ).one()
                if status is JobStatus.DONE or now >= next_count:
                    counts = job_counts(session=session, job_id=self.job_id)
                    next_count = now + COUNT_SECONDS
            done = counts.labeled + counts.failed if counts is not None else 0
            for percent in (10, 50):
                reached = {point.percent for point in self.checkpoints}
                if percent not in reached and done * 100 >= percent * self.expected:
                    self._checkpoint(percent, done)
            if status is JobStatus.DONE and finished_at is not None:
                self.finished = time.perf_counter()
                self.finished_utc = _as_utc(finished_at)
                self.counts = counts
                self._checkpoint(100, done)
                return
            if self.worker.process.poll() is not None:
                self.error = f"the worker exited with status {self.worker.process.poll()}"
                return
            if now - self.first_publish > self.timeout:
                self.error = f"job {self.job_id} not done after {self.timeout:g} s: {counts}"
                return
            time.sleep(POLL_SECONDS)

    def _checkpoint(self, percent: int, done: int) -> None:
        assert self.first_publish is not None
        main, pool = self.memory.rss()
        self.checkpoints.append(
            Checkpoint(
                percent=percent,
                done=done,
                seconds=round(time.perf_counter() - self.first_publish, 2),
                rss_mib=round(main + pool, 1),
                main_rss_mib=round(main, 1),
                pool_rss_mib=round(pool, 1),
            )
        )


def run_job(
    settings: Settings,
    sessions: sessionmaker[Session],
    worker: LocalWorker,
    root: Path,
    *,
    expected: int,
    model_version: str,
    timeout: float,
    force: bool = False,
) -> dict[str, Any]:
    """Scan `root` with the real producer and wait until the worker has labeled all of it.

    `force` relabels images the active model labeled already (a later round on the same set).
    """
    from core.publishing import celery_publisher
    from core.storage.sources import open_source
    from producer.enqueue import run_scan
    from worker.celery_app import make_celery

    app = make_celery(settings)
    memory = WorkerMemory(worker.pid)
    watch = JobWatch(sessions, worker, memory, expected, timeout)
    source = open_source(
        str(root),
        max_file_bytes=settings.limits.max_file_bytes,
        follow_symlinks=settings.scan.follow_symlinks,
    )
    before_reset = memory.peaks()["total_vm_hwm_mib"]
    peaks_reset = memory.reset_peaks()
    result: dict[str, Any] = {"phase": "emolabel", "load_before": _load()}
    worker_cpu, own_cpu = memory.cpu_seconds(), _cpu_seconds()
    threads_before = memory.thread_cpu()
    machine_before, services_before = _machine_cpu(), _cpu_by_command(SERVICE_COMMANDS)
    watch.start()
    try:
        summary = run_scan(
            source,
            sessions=sessions,
            publish=watch.publisher(celery_publisher(app, settings.queue)),
            chunk_size=settings.scan.chunk_size,
            chunk_bytes=settings.scan.chunk_bytes,
            model_version=model_version,
            force=force,
        )
    finally:
        watch.scan_returned()
    scan_cpu = _cpu_seconds() - own_cpu  # the scan's, and the watcher's while it ran
    try:
        watch.wait()
    finally:
        app.close()
    if watch.first_publish is None or watch.finished is None or watch.counts is None:
        raise RuntimeError(f"job {summary.job_id} published nothing: {summary}")
    # From the first publish to the commit of the last outcome (the job row's finished_at).
    seconds = (
        (watch.finished_utc - watch.first_publish_utc).total_seconds()
        if watch.finished_utc is not None and watch.first_publish_utc is not None
        else watch.finished - watch.first_publish
    )
    worker_cpu_used = memory.cpu_seconds() - worker_cpu
    bench_cpu_used = _cpu_seconds() - own_cpu
    services_after = _cpu_by_command(SERVICE_COMMANDS)
    machine = machine_cpu_split(
        machine_before,
        _machine_cpu(),
        worker=worker_cpu_used,
        bench=bench_cpu_used,
        services={name: services_after[name] - services_before[name] for name in services_after},
    )
    threads = thread_cpu_spent(threads_before, memory.thread_cpu())
    counts = watch.counts
    images = counts.labeled + counts.failed
    result.update(
        {
            "job_id": summary.job_id,
            "images": images,
            "labeled": counts.labeled,
            "failed": counts.failed,
            "skipped": counts.skipped,
            "chunks": summary.chunks,
            "seconds": round(seconds, 3),
            "images_per_s": round(images / max(seconds, 1e-9), 2),
            "seconds_polled": round(watch.finished - watch.first_publish, 3),
            "scan_seconds": round(summary.seconds, 3),
            "worker_cpu_seconds": round(worker_cpu_used, 2),
            "cpu_ms_per_image": round(1000 * worker_cpu_used / max(1, images), 3),
            "bench_cpu_seconds": round(bench_cpu_used, 2),
            "bench_cpu_seconds_until_scan_returned": round(scan_cpu, 2),
            # The whole machine from just before the scan to just after the job finished.
            "machine_cpu_seconds": machine,
            "machine_idle_share": idle_by_part(watch.idle_samples, seconds, os.cpu_count() or 1),
            "worker_cpu_by_thread": threads,
            "load_after": _load(),
            "memory": {
                "peaks_reset_at_start": peaks_reset,
                # The worker's whole life so far: start, model load, warm-up, earlier jobs.
                "total_vm_hwm_mib_before_reset": before_reset,
                **memory.peaks(),
                "checkpoints": [asdict(point) for point in watch.checkpoints],
                "growth_10_to_100_mib": _growth(watch.checkpoints),
                "samples": memory.samples,
            },
        }
    )
    return result


def _as_utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment  # SQLite: naive UTC


def _growth(points: Sequence[Checkpoint]) -> float | None:
    if len(points) < 2:
        return None
    return round(points[-1].rss_mib - points[0].rss_mib, 1)


_TASK_LINE = re.compile(r"Task \S+\[[^\]]+\] succeeded in ([0-9.e+-]+)s: (\{.*\})\s*$")


def worker_stage_seconds(logfile: Path, job_id: int) -> dict[str, Any]:
    """Sum the per-chunk reports the worker logged for `job_id` (decode is thread-seconds)."""
    totals: dict[str, float] = {}
    chunks = 0
    task_seconds = 0.0
    try:
        lines = logfile.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        match = _TASK_LINE.search(line)
        if match is None:
            continue
        try:
            report = ast.literal_eval(match.group(2))
        except (ValueError, SyntaxError):
            continue
        if not isinstance(report, dict) or report.get("job_id") != job_id:
            continue
        chunks += 1
        task_seconds += float(match.group(1))
        for stage, seconds in (report.get("stage_seconds") or {}).items():
            totals[stage] = totals.get(stage, 0.0) + float(seconds)
    return {
        "chunks": chunks,
        "task_seconds": round(task_seconds, 2),
        **{stage: round(value, 2) for stage, value in totals.items()},
    }


@dataclass
class EndToEnd:
    """A warmed worker on a fresh home, Redis and database; `measure` runs (d) on one set."""

    settings: Settings
    sessions: sessionmaker[Session]
    worker: LocalWorker
    version: str
    timeout: float
    result: dict[str, Any]

    @contextlib.contextmanager
    def paused(self) -> Iterator[dict[str, float]]:
        """Stop the worker's processes (SIGSTOP) for the block, so an idle worker takes nothing.

        An idle Celery worker still wakes for its event loop, heartbeats and metrics: 0.3-2.4% of
        a core on this machine, taken from whatever (b), (c) or (c') measured beside it. The dict
        yielded is filled on exit with the block's seconds and the worker's CPU seconds in it:
        nothing, unless pausing failed.
        """
        memory = WorkerMemory(self.worker.pid)
        main, pool = memory.processes()
        spent: dict[str, float] = {}
        cpu, started = memory.cpu_seconds(), time.perf_counter()
        stopped: list[int] = []
        try:
            for pid in (main, *pool):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            yield spent
        finally:
            for pid in reversed(stopped):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            spent["seconds"] = round(time.perf_counter() - started, 2)
            spent["worker_cpu_seconds"] = round(memory.cpu_seconds() - cpu, 3)

    def measure(self, image_set: ImageSet, *, force: bool) -> dict[str, Any]:
        measured = run_job(
            self.settings, self.sessions, self.worker, image_set.root,
            expected=len(image_set.paths), model_version=self.version, timeout=self.timeout,
            force=force,
        )  # fmt: skip
        stages = worker_stage_seconds(self.worker.logfile, measured["job_id"])
        if "task_seconds" in stages:
            # Chunk N's write and ack, the next message's fetch: the model sits idle. Summed over
            # the pool processes, as task_seconds is (wall time alone went negative with two).
            processes = self.result["worker"]["concurrency"]
            stages["outside_tasks_seconds"] = round(
                processes * measured["seconds"] - stages["task_seconds"], 2
            )
        measured["worker_stages"] = stages
        measured["relabel"] = force
        return measured


@contextlib.contextmanager
def end_to_end(
    sets: Sequence[ImageSet],
    *,
    run_dir: Path,
    artifact_dir: Path,
    arguments: argparse.Namespace,
) -> Iterator[EndToEnd]:
    """Start Redis, a database and a worker for (d), and label a small warm-up job first."""
    from core.settings import ScanSettings, Settings, WorkerSettings
    from db.session import make_engine, make_sessionmaker, upgrade
    from emolabel.embedded import ensure_redis, start_local_worker
    from training.registry import register_artifact

    home = run_dir / "home"
    settings = Settings(
        home=home,
        models_dir=artifact_dir.parent.parent,
        model_name=MODEL_NAME,
        database_url=None,
        broker_url=None,
        worker=WorkerSettings(
            concurrency=arguments.layout.processes,
            batch_size=arguments.batch_size,
            decode_threads=arguments.layout.decode_threads,
            model_threads=arguments.layout.model_threads,
            precision=arguments.precision,
        ),
        scan=ScanSettings(chunk_size=arguments.chunk_size, chunk_bytes=arguments.chunk_bytes),
    )
    redis_server = ensure_redis(settings)
    result: dict[str, Any] = {
        "home": str(home.resolve()),
        "broker": "embedded redis-server (unix socket, appendonly everysec)",
        "database": "SQLite (WAL) in home",
        "worker": {
            "concurrency": arguments.layout.processes,
            "model_threads": arguments.layout.model_threads,
            "precision": arguments.precision,
            "batch_size": arguments.batch_size,
            "decode_threads": arguments.layout.decode_threads,
            "chunk_size": arguments.chunk_size,
            "chunk_bytes": arguments.chunk_bytes,
        },
        "redis_server": _redis_version(redis_server.url),
    }
    engine = make_engine(settings.effective_database_url)
    try:
        upgrade(settings.effective_database_url)
        sessions = make_sessionmaker(engine)
        with sessions.begin() as session:
            version = register_artifact(
                session=session, directory=artifact_dir, activate=True
            ).version
        started = time.perf_counter()
        with start_local_worker(
            settings, concurrency=arguments.layout.processes, timeout=arguments.timeout
        ) as worker:
            result["worker_start_seconds"] = round(time.perf_counter() - started, 2)
            warm_root = _warm_up_folder(home / "warm-up", sets)
            warm = run_job(
                settings, sessions, worker, warm_root,
                expected=_count_files(warm_root), model_version=version, timeout=arguments.timeout,
            )  # fmt: skip
            ready = _wait_for_ready_children(
                worker.logfile, version, arguments.layout.processes, arguments.timeout
            )
            result["warm_up"] = {
                "images": warm["images"],
                "seconds": warm["seconds"],
                "model_ready": ready,
                "note": "model load and tracing in every pool process; not part of any figure",
            }
            yield EndToEnd(settings, sessions, worker, version, arguments.timeout, result)
    finally:
        engine.dispose()
        redis_server.stop()


def _wait_for_ready_children(
    logfile: Path, version: str, processes: int, timeout: float
) -> list[dict[str, Any]]:
    """Wait until every pool process has logged its model ready (loaded, traced, run once)."""
    ready = rf"model {re.escape(version)} ready in ([0-9.]+) s \((\d+) model threads, (\w+)\)"
    pattern = re.compile(ready)
    deadline = time.monotonic() + timeout
    while True:
        seconds = [
            {
                "seconds": float(match.group(1)),
                "model_threads": int(match.group(2)),
                "precision": match.group(3),
            }
            for match in pattern.finditer(logfile.read_text(errors="replace"))
        ]
        if len(seconds) >= processes:
            return seconds
        if time.monotonic() > deadline:
            raise ConfigError(f"only {len(seconds)} of {processes} worker processes loaded a model")
        time.sleep(POLL_SECONDS)


def _warm_up_folder(folder: Path, sets: Sequence[ImageSet]) -> Path:
    """Copies of the first few images of each set: the warm-up job must not label timed files."""
    for image_set in sets:
        for index, path in enumerate(image_set.paths[:WARM_UP_IMAGES]):
            target = folder / image_set.name / f"{index:02d}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return folder


def _redis_version(url: str) -> str | None:
    import redis

    from emolabel.embedded import _redis_py_url

    client = redis.Redis.from_url(_redis_py_url(url))
    try:
        return str(client.info("server")["redis_version"])
    except redis.RedisError:
        return None
    finally:
        client.close()


# --- the report -------------------------------------------------------------------------------


def environment(*, tensorflow: str) -> dict[str, Any]:
    """Versions, cores and memory: what the numbers depend on (TensorFlow's from the child)."""
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "tensorflow": tensorflow,
    }
    # simplejpeg: (b) and (d) decode plain JPEGs through it.
    packages = ("keras", "tensorflow-cpu", "opencv-python-headless", "simplejpeg", "pillow")
    installed = package_versions((*packages, "celery", "redis", "sqlalchemy"))
    versions.update({name: version for name, version in installed.items() if version})
    return {**machine(), "versions": versions}


def ratios(phases: dict[str, Any]) -> dict[str, float | None]:
    """(d) over (b), (c) and (a), from images/s, and over the shared-core bound of (b) and (c).

    Decoding and the model each use every core, so one pipeline doing both cannot beat
    1 / (1/b + 1/c) images/s: that is what perfect overlap on the same cores would give.
    """
    end_to_end_rate = phases["emolabel"]["images_per_s"]

    def over(name: str) -> float | None:
        rate = phases[name]["images_per_s"]
        return round(end_to_end_rate / rate, 3) if rate else None

    decode_rate, model_rate = phases["decode"]["images_per_s"], phases["model"]["images_per_s"]
    # The faster of the two model-alone figures is the model's limit on these cores.
    model_rate = max(model_rate, phases.get("model_layout", {}).get("images_per_s", 0.0))
    bound = 1 / (1 / decode_rate + 1 / model_rate) if decode_rate and model_rate else None
    return {
        "d_over_b": over("decode"),
        "d_over_c": over("model"),
        "d_over_c_layout": over("model_layout") if "model_layout" in phases else None,
        "d_over_a": over("notebook"),
        "shared_core_bound_images_per_s": None if bound is None else round(bound, 2),
        "d_over_shared_core_bound": None if bound is None else round(end_to_end_rate / bound, 3),
    }


PHASE_LABELS = {
    "notebook": "(a) notebook loop",
    "decode": "(b) decode floor",
    "model": "(c) model alone",
    "model_layout": "(c') model, layout",
    "emolabel": "(d) emolabel e2e",
}


def print_table(report: dict[str, Any]) -> None:
    """One row per set and phase, the ratios, and the worker's memory."""
    header = (
        f"{'set':<20}{'phase':<20}{'images':>7}{'s':>9}{'images/s':>10}{'cpu s':>8}"
        f"{'cpu ms/img':>11}  {'load':<12}note"
    )
    print(header)
    print("-" * (len(header) + 20))
    for name, result in report["sets"].items():
        for phase in ("notebook", "decode", "model", "model_layout", "emolabel"):
            if phase not in result["phases"]:
                continue
            row = result["phases"][phase]
            cpu = row.get("cpu_seconds", row.get("worker_cpu_seconds"))
            per_image = row.get("cpu_ms_per_image")
            print(
                f"{name:<20}{PHASE_LABELS[phase]:<20}{row['images']:>7}"
                f"{row.get('seconds', 0.0):>9.2f}{row['images_per_s']:>10.1f}"
                f"{'-' if cpu is None else f'{cpu:.1f}':>8}"
                f"{'-' if per_image is None else f'{per_image:.2f}':>11}"
                f"  {_load_text(row):<12}{_note(phase, row)}{_spread(row)}"
            )
    print()
    for name, result in report["sets"].items():
        ratio = result["ratios"]
        print(
            f"{name}: (d)/(b) {_ratio(ratio['d_over_b'])}  (d)/(c) {_ratio(ratio['d_over_c'])}"
            f"  (d)/(c') {_ratio(ratio.get('d_over_c_layout'))}"
            f"  (d)/(a) {_ratio(ratio['d_over_a'])}   (d) / shared-core bound 1/(1/b+1/max(c,c'))"
            f" {ratio['shared_core_bound_images_per_s']} img/s:"
            f" {_ratio(ratio['d_over_shared_core_bound'])}"
        )
        by_round = result.get("by_round") or []
        if len(by_round) > 1:
            print(
                f"{name}: by round (each round's own (d) over its own (b), (c), (c'), (a)):"
                + "".join(
                    f"  {index}: (d)/(b) {_ratio(r['d_over_b'])} (d)/(c) {_ratio(r['d_over_c'])}"
                    f" (d)/(c') {_ratio(r['d_over_c_layout'])} (d)/(a) {_ratio(r['d_over_a'])}"
                    for index, r in enumerate(by_round, start=1)
                )
            )
    print()
    for name, result in report["sets"].items():
        e2e = result["phases"]["emolabel"]
        memory = e2e["memory"]
        marks = ", ".join(
            f"{point['percent']}%: {point['rss_mib']:.0f}" for point in memory["checkpoints"]
        )
        pool = "+".join(f"{value:.0f}" for value in memory["pool_vm_hwm_mib"]) or "-"
        stages = e2e.get("worker_stages") or {}
        stage_text = ", ".join(
            f"{stage} {stages[stage]}"
            for stage in (
                "task_seconds",
                "decode",
                "predict",
                "waiting_for_decode",
                "write",
                "outside_tasks_seconds",
            )
            if stage in stages
        )
        print(
            f"{name}: worker VmHWM main {memory['main_vm_hwm_mib']:.0f} MiB + pool {pool} MiB;"
            f" RSS (MiB) {marks}; worker CPU {e2e['worker_cpu_seconds']} s,"
            f" chunks (s): {stage_text or '-'}"
        )
        machine = e2e.get("machine_cpu_seconds")
        if machine:
            parts = ", ".join(
                f"{key} {value}"
                for key, value in machine.items()
                if key not in {"cpu_seconds_available", "busy"}
            )
            idle = e2e.get("machine_idle_share") or {}
            shares = ", ".join(f"{part} {share}" for part, share in idle.items())
            print(
                f"{name}: machine CPU s during (d): {machine['cpu_seconds_available']} available,"
                f" {machine['busy']} busy; {parts}; idle share by part of the span: {shares}"
            )
        busiest = e2e.get("worker_cpu_by_thread", [])[:8]
        if busiest:
            print(
                f"{name}: worker CPU s by thread, busiest first: "
                + ", ".join(f"{thread['name']} {thread['cpu_seconds']}" for thread in busiest)
            )
    idle = report.get("end_to_end", {}).get("idle_worker_cpu_by_round") or []
    if idle:
        print(
            "the idle worker's CPU s during (a)-(c') by round: "
            + ", ".join(f"{row['worker_cpu_seconds']} in {row['seconds']} s" for row in idle)
        )
    env = report["environment"]
    print(
        f"\n{describe(env)}; load {report['load_before']} before, "
        f"{report['load_after']} after; {report['sets_note']}"
    )


def _load_text(row: dict[str, Any]) -> str:
    """The 1-minute load average before → after (all three are in the JSON)."""
    before, after = row.get("load_before") or ["-"], row.get("load_after") or ["-"]
    return f"{before[0]}→{after[0]}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _spread(row: dict[str, Any]) -> str:
    repeats = row.get("repeats") or []
    if len(repeats) < 2:
        return ""
    rates = sorted(repeat["images_per_s"] for repeat in repeats)
    return f"; median of {len(rates)}: {rates[0]:.1f}-{rates[-1]:.1f}"


def _note(phase: str, row: dict[str, Any]) -> str:
    if phase == "notebook":
        return "subset: the first images only"
    if phase == "decode":
        return f"{row['threads']} threads, {row['failed']} failed"
    if phase == "model":
        return f"{row['batches']} batches of {row['batch_size']}, {row.get('precision', '')}"
    if phase == "model_layout":
        return f"{row['processes']} processes x {row['threads']} threads, at once"
    return f"{row['chunks']} chunks, {row['failed']} failed; scan {row['scan_seconds']} s"


# --- main -------------------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 4000x3000")
    width, height = int(match.group(1)), int(match.group(2))
    if min(width, height) < INPUT_SIDE:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be at least {INPUT_SIDE}")
    return width, height


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kind", choices=("crops", "photos", "both"), default="both")
    parser.add_argument(
        "--images", type=int, default=None,
        help="images per generated set (default: 2000 crops, 300 photos)",
    )  # fmt: skip
    parser.add_argument("--crops", type=int, default=None, help="crops (overrides --images)")
    parser.add_argument("--photos", type=int, default=None, help="photos (overrides --images)")
    parser.add_argument(
        "--folder", type=Path, default=None,
        help="measure every file below this folder instead of generated sets",
    )  # fmt: skip
    parser.add_argument(
        "--photo-size", type=_size, default=PHOTO_SIZE, metavar="WxH",
        help="generated photo size (default 4000x3000)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench-throughput"),
        help="the JSON report and this run's home (Redis, SQLite, model) go here",
    )  # fmt: skip
    parser.add_argument(
        "--cache", type=Path, default=Path("runs/bench-images"), help="generated sets live here"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="model batch, (c) and (d)")
    parser.add_argument("--chunk-size", type=int, default=256, help="URIs per queue message in (d)")
    parser.add_argument(
        "--chunk-bytes", type=int, default=ScanSettings().chunk_bytes,
        help="a chunk also closes at this many bytes in (d) (default: the settings')",
    )  # fmt: skip
    parser.add_argument(
        "--floor-threads", type=int, default=available_cpus(),
        help="decode threads in (b), the floor (default: every usable CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--decode-threads", type=int, default=0,
        help="decode threads per worker process in (d) (default 0: the settings' auto)",
    )  # fmt: skip
    parser.add_argument(
        "--model-threads", type=int, default=0,
        help="model threads per worker process in (c') and (d) (default 0: the settings' auto)",
    )  # fmt: skip
    parser.add_argument(
        "--notebook-images", type=int, default=100, help="images the slow loop (a) runs on"
    )
    parser.add_argument(
        "--concurrency", type=int, default=0,
        help="worker processes in (c') and (d) (default 0: the settings' auto)",
    )  # fmt: skip
    parser.add_argument(
        "--model-images", type=int, default=1024,
        help="decoded images that (c) makes its batches from (at most)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="float32",
        help="model arithmetic in (c), (c') and (d), as worker.precision; (a) stays float32",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated sets")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of (b), (c), (c') and (d); the table shows each one's median (default 3)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds one job may take in (d)"
    )
    parser.add_argument(
        "--keep-run", action="store_true", help="keep OUT/run-*/ (home, database, model)"
    )
    arguments = parser.parse_args(argv)
    if arguments.repeat < 1:
        parser.error("--repeat must be at least 1")
    if arguments.folder is not None and (arguments.images or arguments.crops or arguments.photos):
        parser.error("--folder measures the whole folder: leave out --images, --crops, --photos")
    for option in ("images", "crops", "photos"):
        value = getattr(arguments, option)
        if value is not None and value < 1:
            parser.error(f"--{option} must be at least 1")
    positive = ("batch_size", "chunk_size", "chunk_bytes", "floor_threads", "notebook_images")
    for option in (*positive, "model_images"):
        if getattr(arguments, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    for option in ("concurrency", "decode_threads", "model_threads"):
        if getattr(arguments, option) < 0:
            parser.error(f"--{option.replace('_', '-')} must be 0 (auto) or more")
    arguments.layout = worker_layout(
        WorkerSettings(
            concurrency=arguments.concurrency,
            decode_threads=arguments.decode_threads,
            model_threads=arguments.model_threads,
        )
    )
    return arguments


def image_sets(arguments: argparse.Namespace) -> list[ImageSet]:
    if arguments.folder is not None:
        return [folder_set(arguments.folder.resolve())]
    kinds = KINDS if arguments.kind == "both" else (arguments.kind,)
    sets: list[ImageSet] = []
    for kind in kinds:
        count = getattr(arguments, kind) or arguments.images or DEFAULT_IMAGES[kind]
        print(f"image set {_set_name(kind, count, arguments.photo_size)} ...", flush=True)
        sets.append(
            ensure_image_set(
                arguments.cache.resolve(),
                kind,
                count,
                photo_size=arguments.photo_size,
                seed=arguments.seed,
            )
        )
    return sets


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median images/s (the lower middle one of an even count), whole.

    A whole run rather than per-field medians, so that its seconds, CPU and memory belong
    together; `repeats` lists every round's images/s and CPU ms per image beside it.
    """
    by_rate = sorted(range(len(runs)), key=lambda index: runs[index]["images_per_s"])
    middle = by_rate[(len(runs) - 1) // 2]
    chosen = dict(runs[middle])
    chosen["round"] = middle + 1
    chosen["repeats"] = [
        {
            "round": index + 1,
            "images_per_s": run["images_per_s"],
            "cpu_ms_per_image": run.get("cpu_ms_per_image"),
            "seconds": run.get("seconds"),
        }
        for index, run in enumerate(runs)
    ]
    return chosen


REPEATED = ("notebook", "decode", "model", "model_layout", "emolabel")


def run(arguments: argparse.Namespace, command: str) -> dict[str, Any]:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    out: Path = arguments.out.resolve()
    run_dir = out / f"run-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=False)
    load_before = _load()
    sets = image_sets(arguments)
    described = [image_set.describe() for image_set in sets]
    listed = [(image_set.name, [str(path) for path in image_set.paths]) for image_set in sets]
    artifact = _in_child(build_model_phase, str(run_dir / "models"))["artifact"]
    layout = arguments.layout
    rounds: list[dict[str, dict[str, Any]]] = []
    idle_worker_cpu: list[dict[str, float]] = []
    local: dict[str, Any] = {}
    # Every round measures (b), (c), (c') and (d) once, in that order, with the worker started
    # (paused while the others run): drift of a shared machine then falls on every phase alike.
    with end_to_end(sets, run_dir=run_dir, artifact_dir=Path(artifact), arguments=arguments) as e2e:
        for round_index in range(arguments.repeat):
            first = round_index == 0
            label = f"round {round_index + 1} of {arguments.repeat}: "
            print(f"{label}(b), (c) and (a) in a spawned process ...", flush=True)
            with e2e.paused() as paused:  # the worker's processes are stopped: they take no CPU
                local = _in_child(
                    local_phases,
                    LocalSpec(
                        sets=listed,
                        artifact_dir=artifact,
                        batch_size=arguments.batch_size,
                        decode_threads=arguments.floor_threads,
                        notebook_images=arguments.notebook_images,
                        model_images=arguments.model_images,
                        precision=arguments.precision,
                    ),
                )
                print(
                    f"{label}(c') the model alone in the worker's layout, {layout.processes}"
                    f" process(es) x {layout.model_threads} thread(s) ...",
                    flush=True,
                )
                in_layout = model_layout_phase(
                    LayoutSpec(
                        sets=listed,
                        artifact_dir=artifact,
                        batch_size=arguments.batch_size,
                        model_images=arguments.model_images,
                        processes=layout.processes,
                        threads=layout.model_threads,
                        precision=arguments.precision,
                    )
                )
            idle_worker_cpu.append(paused)
            print(f"{label}(d) emolabel end to end ...", flush=True)
            rounds.append(
                {
                    image_set.name: {
                        **local["sets"][image_set.name],
                        "model_layout": in_layout[image_set.name],
                        # Later rounds relabel the same files (scan --force): an upsert per result.
                        "emolabel": e2e.measure(image_set, force=not first),
                    }
                    for image_set in sets
                }
            )
        worker_meta = e2e.result
    report: dict[str, Any] = {
        "benchmark": "throughput",
        "command": command,
        "started_at": stamp,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": environment(tensorflow=local["runtime"]["tensorflow"]),
        "runtime": local["runtime"],
        "model": {
            "artifact": artifact,
            "version": local["version"],
            "note": "training.model.make_model((256, 256, 3), 2), random weights",
        },
        "image_sets": described,
        "repeat": arguments.repeat,
        "end_to_end": {**worker_meta, "idle_worker_cpu_by_round": idle_worker_cpu},
        "sets": {},
        "sets_note": (
            f"(a) on the first {arguments.notebook_images} images of each set; (c) on whole "
            f"batches of {arguments.batch_size} from the first {arguments.model_images} images"
            + (
                f"; (a)-(d): the median of {arguments.repeat} rounds"
                if arguments.repeat > 1
                else ""
            )
        ),
        "load_before": load_before,
        "load_after": _load(),
    }
    for image_set in sets:
        name = image_set.name
        phases = {phase: median_run([r[name][phase] for r in rounds]) for phase in REPEATED}
        by_round = [ratios(r[name]) for r in rounds]
        report["sets"][name] = {"phases": phases, "ratios": ratios(phases), "by_round": by_round}
    if not arguments.keep_run:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    shown = sys.argv[1:] if argv is None else list(argv)
    try:
        report = run(arguments, " ".join(["python -m bench throughput", *shown]))
    except EmolabelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out: Path = arguments.out.resolve()
    names = "-".join(report["sets"])
    path = out / f"throughput-{names}-{report['started_at']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print_table(report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    # Run the copy imported under its own name: the spawned process unpickles
    # `bench.throughput.*`, which it can import, not `__main__.*`.
    from bench import throughput

    raise SystemExit(throughput.main())
