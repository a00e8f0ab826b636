"""The image sets the phases run on: generated crops and photos, cached, or an existing folder.

crops are 256x256 face crops (JPEG q90, 50 per session folder, 10 sessions per person), photos
12 MP camera-like JPEGs (q92, 25 per day folder); both are drawn once under CACHE/<name>/ with a
manifest of their recipe and reused while the recipe is the same (LAYOUT_VERSION, seed, size).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from bench.throughput.model import CLASS_NAMES
from core.errors import ConfigError

KINDS = ("crops", "photos")
DEFAULT_IMAGES = {"crops": 2000, "photos": 300}
CROP_SIDE = 256
PHOTO_SIZE = (4000, 3000)  # width, height: 12 MP
CROP_QUALITY = 90
PHOTO_QUALITY = 92
CROPS_PER_FOLDER = 50
PHOTOS_PER_FOLDER = 25
LAYOUT_VERSION = 1  # bump when generated images change, so that cached sets are drawn again


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


def set_name(kind: str, count: int, photo_size: tuple[int, int]) -> str:
    name = f"{kind}-{count}"
    if kind == "photos" and photo_size != PHOTO_SIZE:
        name += f"-{photo_size[0]}x{photo_size[1]}"
    return name


def ensure_image_set(
    cache: Path, kind: str, count: int, *, photo_size: tuple[int, int], seed: int
) -> ImageSet:
    """The generated set under cache/<name>/, drawn unless a whole one with the same recipe is."""
    name = set_name(kind, count, photo_size)
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
