"""The face workload's image set: camera-size scenes with 0 to 8 real faces at known boxes.

Every pixel is real, from registry wheels (nothing downloaded, nothing drawn): the background is
one of ten photos without a person shipped by scikit-image and scikit-learn (cut, mirrored and
tinted differently per scene, then upscaled to the scene size), and the faces are scikit-image's
`lfw_subset` (100 real 25x25 LFW faces, grey), upscaled and pasted at known boxes, one per cell of
a 4x3 grid so that they never overlap. Their side is 5-15% of the scene's longer side (200-600
pixels at 4000x3000; 64-192 pixels once the worker reduces the scene to 1280 for detection).
Fine texture and sensor noise are added at full size, as for the `photos` set, so that a 12 MP
scene is a 2-4 MB JPEG (q92) that costs a camera photo's decode, not an upscaled smooth one's.

A set is drawn once under CACHE/faces-<n>[-<W>x<H>]/ with a manifest: the recipe and every
scene's true boxes (x, y, width, height in the scene's pixels), reused while the recipe is the
same. `recall` matches found boxes to them at IoU >= 0.5, as bench.detectors does.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from bench.throughput.corpus import PHOTO_QUALITY, ImageSet, _encode_jpeg, _noise_octaves
from core.errors import ConfigError

KIND = "faces"
DEFAULT_SCENES = 24
MAX_FACES = 8
GRID = (4, 3)  # columns, rows: one face at most per cell, so boxes never overlap
FACE_SIDE = (0.05, 0.15)  # of the scene's longer side
SCENES_PER_FOLDER = 25
LAYOUT_VERSION = 1  # bump when generated scenes change, so that cached sets are drawn again
IOU = 0.5

Box = tuple[float, float, float, float]
Image = NDArray[np.uint8]

# Photos without a person inside the scikit-image wheel's data folder (read from the files, so
# nothing is ever fetched) and scikit-learn's two sample images.
SKIMAGE_PHOTOS = (
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "grass.png",
    "gravel.png",
    "brick.png",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


@dataclass(frozen=True)
class FaceSet:
    """A face scene set: its files (an `ImageSet`) and each file's true face boxes."""

    images: ImageSet
    truth: dict[str, list[Box]]  # str(path) -> boxes in the scene's pixels

    @property
    def faces(self) -> int:
        return sum(len(boxes) for boxes in self.truth.values())

    def describe(self) -> dict[str, Any]:
        counts = [len(self.truth[str(path)]) for path in self.images.paths]
        return {
            **self.images.describe(),
            "faces": self.faces,
            "faces_per_scene": {str(n): counts.count(n) for n in range(MAX_FACES + 1)},
            "face_source": "scikit-image lfw_subset (100 real LFW faces), upscaled and pasted",
        }


def set_name(count: int, size: tuple[int, int]) -> str:
    from bench.throughput.corpus import PHOTO_SIZE

    name = f"{KIND}-{count}"
    if size != PHOTO_SIZE:
        name += f"-{size[0]}x{size[1]}"
    return name


def scene_path(root: Path, index: int) -> Path:
    """root/<year>/<year>-<month>-01/DSC_<index>.JPG: 25 scenes a day folder, like a camera."""
    day = index // SCENES_PER_FOLDER
    year = 2018 + day // 12
    return root / str(year) / f"{year}-{day % 12 + 1:02d}-01" / f"DSC_{index:05d}.JPG"


def backgrounds() -> list[Image]:
    """The ten photos without a person, RGB uint8 (grey ones as three equal channels)."""
    import skimage
    import sklearn

    files = [Path(skimage.__file__).parent / "data" / name for name in SKIMAGE_PHOTOS]
    files += [Path(sklearn.__file__).parent / "datasets" / "images" / n for n in SKLEARN_PHOTOS]
    photos = []
    for file in files:
        pixels = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if pixels is None:
            raise ConfigError(f"{file}: cannot read this background photo (is the wheel whole?)")
        photos.append(np.asarray(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), dtype=np.uint8))
    return photos


def lfw_faces() -> list[Image]:
    """scikit-image's 100 real LFW faces (25x25 grey), as uint8."""
    import skimage

    patches = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
    return [np.asarray(np.rint(patch * 255), dtype=np.uint8) for patch in patches[:100]]


def draw_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    grounds: Sequence[Image],
    faces: Sequence[Image],
    grain: NDArray[np.float32],
) -> tuple[bytes, list[Box]]:
    """One scene of `size` (width, height) as JPEG q92, and its true face boxes."""
    width, height = size
    ground = grounds[int(rng.integers(len(grounds)))]
    # A different cut of the background each time: 60-100% of it, anywhere, maybe mirrored.
    g_height, g_width = ground.shape[:2]
    fraction = rng.uniform(0.6, 1.0)
    cut_height, cut_width = max(8, int(g_height * fraction)), max(8, int(g_width * fraction))
    top = int(rng.integers(0, g_height - cut_height + 1))
    left = int(rng.integers(0, g_width - cut_width + 1))
    cut = ground[top : top + cut_height, left : left + cut_width]
    if rng.random() < 0.5:
        cut = cut[:, ::-1]
    image = np.asarray(
        cv2.resize(np.ascontiguousarray(cut), size, interpolation=cv2.INTER_CUBIC), np.float32
    )
    image *= rng.uniform(0.85, 1.15, 3).astype(np.float32)  # white balance and exposure
    columns, rows = GRID
    cell_width, cell_height = width // columns, height // rows
    longer = max(width, height)
    count = int(rng.integers(0, MAX_FACES + 1))
    cells = rng.choice(columns * rows, size=count, replace=False)
    boxes: list[Box] = []
    for cell in cells:
        face = faces[int(rng.integers(len(faces)))]
        side = int(longer * rng.uniform(*FACE_SIDE))
        side = min(side, cell_width, cell_height)
        row, column = divmod(int(cell), columns)
        x = column * cell_width + int(rng.integers(0, cell_width - side + 1))
        y = row * cell_height + int(rng.integers(0, cell_height - side + 1))
        grown = np.asarray(
            cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC), np.float32
        )
        tint = rng.uniform(0.85, 1.1, 3).astype(np.float32)  # grey faces, warmed a little
        image[y : y + side, x : x + side] = grown[:, :, None] * tint
        boxes.append((float(x), float(y), float(side), float(side)))
    # Fine texture under a patchy mask, and sensor noise: a camera photo's detail and file size.
    mask = np.clip(_noise_octaves(rng, 48, 64, 3, 4) * 1.5 + 0.5, 0.05, 1.0)
    mask = cv2.resize(mask, size, interpolation=cv2.INTER_LINEAR)
    shift = (int(rng.integers(0, height)), int(rng.integers(0, width)))
    noise = np.roll(grain, shift, axis=(0, 1))
    detail = np.asarray(cv2.GaussianBlur(noise, (0, 0), 1.2), dtype=np.float32)
    detail *= np.float32(2.5 * rng.uniform(8, 16))
    detail *= mask
    detail += noise[::-1, ::-1] * np.float32(rng.uniform(2.0, 3.5))
    image += detail[:, :, None]
    return _encode_jpeg(image, PHOTO_QUALITY), boxes


def ensure_face_set(cache: Path, count: int, *, size: tuple[int, int], seed: int) -> FaceSet:
    """The face scene set under cache/<name>/, drawn unless a whole one with this recipe is."""
    name = set_name(count, size)
    root = cache / name
    manifest = cache / f"{name}.json"
    recipe = {"kind": KIND, "count": count, "layout": LAYOUT_VERSION, "seed": seed}
    recipe["size"] = list(size)
    paths = [scene_path(root, index) for index in range(count)]
    if manifest.exists() and all(path.is_file() for path in paths):
        stored = json.loads(manifest.read_text())
        if stored.get("recipe") == recipe:
            truth = {
                str(root / relative): [(b[0], b[1], b[2], b[3]) for b in boxes]
                for relative, boxes in stored["boxes"].items()
            }
            images = ImageSet(name, KIND, root, paths, reused=True, generate_seconds=0.0)
            return FaceSet(images, truth)
    manifest.unlink(missing_ok=True)
    if root.exists():
        shutil.rmtree(root)  # ours: a set of another recipe, or one an interrupt left half drawn
    started = time.perf_counter()
    grounds, faces = backgrounds(), lfw_faces()
    grain = np.random.default_rng(seed).standard_normal(size[::-1], dtype=np.float32)

    def write(index: int) -> list[Box]:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7, index)))
        data, boxes = draw_scene(rng, size, grounds, faces, grain)
        path = paths[index]
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".part")
        temporary.write_bytes(data)
        temporary.replace(path)
        return boxes

    threads = max(1, min(os.cpu_count() or 1, 4))  # a 12 MP scene holds ~300 MB while drawn
    with ThreadPoolExecutor(threads, thread_name_prefix="bench-scenes") as pool:
        drawn = list(pool.map(write, range(count)))
    boxes_by_file = {
        str(path.relative_to(root)): boxes for path, boxes in zip(paths, drawn, strict=True)
    }
    manifest.write_text(json.dumps({"recipe": recipe, "boxes": boxes_by_file}))
    images = ImageSet(
        name, KIND, root, paths, reused=False, generate_seconds=time.perf_counter() - started
    )
    return FaceSet(images, {str(path): boxes for path, boxes in zip(paths, drawn, strict=True)})


def matched(truth: Sequence[Box], found: Sequence[Box], threshold: float = IOU) -> int:
    """How many true boxes a distinct found box overlaps with IoU >= threshold (greedy)."""
    from bench.detectors import matched as greedy

    return greedy(truth, found, threshold)


def recall(
    truth: Mapping[str, Sequence[Box]], found: Mapping[str, Sequence[Box]]
) -> dict[str, Any]:
    """Faces found (IoU >= 0.5) of the true ones, and the found boxes that match none."""
    true_faces = sum(len(boxes) for boxes in truth.values())
    hits = reported = 0
    for key, boxes in truth.items():
        mine = found.get(key, [])
        hits += matched(boxes, mine)
        reported += len(mine)
    return {
        "true_faces": true_faces,
        "found": hits,
        "recall": round(hits / true_faces, 4) if true_faces else None,
        "reported": reported,
        "false_faces": reported - hits,
        "iou": IOU,
    }
