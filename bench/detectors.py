"""Face detectors compared on real faces: recall, false faces and speed, in one run.

    python -m bench.detectors [--seed 0] [--repeats 1]

Workload (real pixels only, all from registry wheels; nothing downloaded, nothing drawn):
- the 100 real LFW faces of scikit-image's `lfw_subset` (25x25 grey), upscaled to 90-160 px and
  pasted at known boxes, 20 to a 1400x900 scene whose background is a real photo without a person
  (`coffee`, `rocket`, `chelsea`, upscaled); a face counts as found at IoU >= 0.5;
- the 100 non-face patches of `lfw_subset`, pasted the same way: a patch counts as reported when a
  detection's centre lies inside it;
- five photos without a person (scikit-image `coffee`, `chelsea`, `rocket`; scikit-learn
  `china.jpg`, `flower.jpg`) and `astronaut` (one face).
The scenes are resized to 640 and to 1280 pixels on the long side; speed is the mean CPU time
of this process (and the wall time) per `detect` call on a scene, with TensorFlow and OpenCV held
to one thread, after one untimed call: CPU time is what one core spends, whatever else runs on
the machine. Detectors: emolabel's Keras MTCNN (`training.faces.mtcnn`), the `mtcnn` 1.0 package it
takes its weights from (TensorFlow), and scikit-image's LBP frontal-face cascade (its XML ships
in the scikit-image wheel). `lfw_scenes` is also what tests/test_face_detector.py detects on.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from training.faces import Box
from training.faces import boxes as box_math

Image = NDArray[np.uint8]
Detect = Callable[[Image], list[Box]]

SCENE_SIZE = (1400, 900)  # width, height
CELL = 175  # one pasted patch per cell of this side, so patches never overlap
PATCHES_PER_SCENE = 20


@dataclass(frozen=True)
class Scene:
    """A real photo with real patches pasted at known boxes (x, y, width, height)."""

    image: Image
    boxes: list[Box] = field(default_factory=list)

    def resized(self, long_side: int) -> Scene:
        height, width = self.image.shape[:2]
        factor = long_side / max(height, width)
        size = (round(width * factor), round(height * factor))
        image = np.asarray(cv2.resize(self.image, size, interpolation=cv2.INTER_AREA), np.uint8)
        scaled = box_math.rescaled(box_math.as_array(self.boxes), factor)
        return Scene(image, [(b[0], b[1], b[2], b[3]) for b in scaled.tolist()])


def skimage_data() -> Any:
    """scikit-image's `data` module (untyped), for the photos its wheel ships."""
    from skimage import data

    return data


def backgrounds() -> list[Image]:
    """Real photos without a person, upscaled to the scene size."""
    data = skimage_data()
    return [
        np.asarray(cv2.resize(photo, SCENE_SIZE, interpolation=cv2.INTER_CUBIC), dtype=np.uint8)
        for photo in (data.coffee(), data.rocket(), data.chelsea())
    ]


def lfw_patches(faces: bool) -> list[Image]:
    """scikit-image's `lfw_subset` as uint8 grey patches: its 100 faces, or its 100 non-faces."""
    patches = skimage_data().lfw_subset()  # (200, 25, 25) floats in [0, 1]; faces first
    chosen = patches[:100] if faces else patches[100:]
    return [np.asarray(np.rint(patch * 255), dtype=np.uint8) for patch in chosen]


def lfw_scenes(faces: bool = True, seed: int = 0) -> list[Scene]:
    """The 100 LFW faces (or non-face patches), 20 to a scene, at 90-160 px and known boxes."""
    rng = np.random.default_rng(seed)
    grounds = backgrounds()
    patches = lfw_patches(faces)
    columns, rows = SCENE_SIZE[0] // CELL, SCENE_SIZE[1] // CELL
    scenes = []
    for number, start in enumerate(range(0, len(patches), PATCHES_PER_SCENE)):
        image = grounds[number % len(grounds)].copy()
        cells = rng.choice(columns * rows, size=PATCHES_PER_SCENE, replace=False)
        boxes: list[Box] = []
        for patch, cell in zip(patches[start : start + PATCHES_PER_SCENE], cells, strict=False):
            side = int(rng.integers(90, 161))
            row, column = divmod(int(cell), columns)
            x = column * CELL + int(rng.integers(0, CELL - side + 1))
            y = row * CELL + int(rng.integers(0, CELL - side + 1))
            grown = cv2.resize(patch, (side, side), interpolation=cv2.INTER_CUBIC)
            image[y : y + side, x : x + side] = np.asarray(grown)[:, :, None]
            boxes.append((float(x), float(y), float(side), float(side)))
        scenes.append(Scene(image, boxes))
    return scenes


def photos_without_faces() -> dict[str, Image]:
    """Real photos with no person in them, from the scikit-image and scikit-learn wheels."""
    from sklearn.datasets import load_sample_image

    photos = {name: getattr(skimage_data(), name)() for name in ("coffee", "chelsea", "rocket")}
    for name in ("china.jpg", "flower.jpg"):
        photos[name] = np.asarray(load_sample_image(name), dtype=np.uint8)
    return photos


ASTRONAUT_FACE: Box = (175.0, 60.0, 95.0, 110.0)  # scikit-image `astronaut`, judged by eye


def matched(truth: Sequence[Box], found: Sequence[Box], threshold: float = 0.5) -> int:
    """How many true boxes a distinct found box overlaps with IoU >= threshold (greedy)."""
    if not truth or not found:
        return 0
    overlaps = box_math.overlap(
        box_math.xywh_to_corners(box_math.as_array(list(truth))),
        box_math.xywh_to_corners(box_math.as_array(list(found))),
    )
    count = 0
    while overlaps.size and overlaps.max() >= threshold:
        row, column = np.unravel_index(int(overlaps.argmax()), overlaps.shape)
        overlaps[row, :] = -1.0
        overlaps[:, column] = -1.0
        count += 1
    return count


def centred_in(patches: Sequence[Box], found: Sequence[Box]) -> int:
    """How many patches hold the centre of at least one found box."""
    count = 0
    for x, y, width, height in patches:
        if any(
            x <= fx + fw / 2 < x + width and y <= fy + fh / 2 < y + height
            for fx, fy, fw, fh in found
        ):
            count += 1
    return count


def keras_mtcnn() -> Detect:
    from training.faces.mtcnn import load_mtcnn

    detector = load_mtcnn(backend="tensorflow")
    return lambda image: [face.box for face in detector.detect(image)]


def mtcnn_package() -> Detect:
    from mtcnn import MTCNN  # comparison only: the package's own TensorFlow pipeline

    detector = MTCNN()

    def detect(image: Image) -> list[Box]:
        found = detector.detect_faces(image)
        return [tuple(float(v) for v in face["box"]) for face in found]  # type: ignore[misc]

    return detect


def skimage_lbp_cascade() -> Detect:
    from skimage.feature import Cascade

    cascade = Cascade(skimage_data().lbp_frontal_face_cascade_filename())

    def detect(image: Image) -> list[Box]:
        found: list[dict[str, Any]] = cascade.detect_multi_scale(
            img=image, scale_factor=1.2, step_ratio=1, min_size=(20, 20), max_size=(400, 400)
        )
        return [
            (float(f["c"]), float(f["r"]), float(f["width"]), float(f["height"])) for f in found
        ]

    return detect


DETECTORS: dict[str, Callable[[], Detect]] = {
    "emolabel Keras MTCNN (TF)": keras_mtcnn,
    "mtcnn 1.0 package (TF)": mtcnn_package,
    "scikit-image LBP cascade": skimage_lbp_cascade,
}


@dataclass
class Row:
    name: str
    found: dict[int, int] = field(default_factory=dict)  # long side -> LFW faces found
    false_in_scenes: dict[int, int] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)  # wall, per image
    cpu_seconds: dict[int, float] = field(default_factory=dict)  # this process's CPU, per image
    non_faces_reported: int = 0
    false_in_photos: int = 0
    astronaut: str = ""


def measure(name: str, detect: Detect, repeats: int, seed: int) -> Row:
    row = Row(name)
    faces = lfw_scenes(True, seed)
    for long_side in (640, 1280):
        scenes = [scene.resized(long_side) for scene in faces]
        detect(scenes[0].image)  # untimed: first-call set-up
        found = false = 0
        elapsed = cpu = 0.0
        for scene in scenes:
            for _ in range(repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                boxes = detect(scene.image)
                elapsed += time.perf_counter() - start
                cpu += time.process_time() - start_cpu
            hits = matched(scene.boxes, boxes)
            found += hits
            false += len(boxes) - hits
        row.found[long_side], row.false_in_scenes[long_side] = found, false
        row.seconds[long_side] = elapsed / (len(scenes) * repeats)
        row.cpu_seconds[long_side] = cpu / (len(scenes) * repeats)
    for scene in lfw_scenes(False, seed):
        row.non_faces_reported += centred_in(scene.boxes, detect(scene.resized(1280).image))
    row.false_in_photos = sum(len(detect(photo)) for photo in photos_without_faces().values())
    astronaut = detect(skimage_data().astronaut())
    row.astronaut = f"{len(astronaut)} ({matched([ASTRONAUT_FACE], astronaut)} at IoU>=0.5)"
    return row


def table(rows: list[Row]) -> str:
    lines = [
        "| Detector | LFW faces found, 640 / 1280 px | false faces in those scenes, 640 / 1280 "
        "| non-face patches reported (of 100) | faces on 5 photos without people "
        "| astronaut: faces (matched) | CPU s per image, 640 / 1280 px | wall s, 640 / 1280 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.found[640]} / {row.found[1280]} of 100 "
            f"| {row.false_in_scenes[640]} / {row.false_in_scenes[1280]} "
            f"| {row.non_faces_reported} | {row.false_in_photos} | {row.astronaut} "
            f"| {row.cpu_seconds[640]:.3f} / {row.cpu_seconds[1280]:.3f} "
            f"| {row.seconds[640]:.3f} / {row.seconds[1280]:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.detectors", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seed", type=int, default=0, help="placement of the pasted patches")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per scene")
    parser.add_argument(
        "--only", action="append", choices=list(DETECTORS), help="run only these (repeatable)"
    )
    options = parser.parse_args(argv)
    from training.runtime import load_keras

    load_keras(backend="tensorflow", threads=1)
    cv2.setNumThreads(1)
    rows = [
        measure(name, DETECTORS[name](), options.repeats, options.seed)
        for name in (options.only or list(DETECTORS))
    ]
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
