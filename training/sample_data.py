"""Synthetic face photos in a folder-per-class layout, for tests and demos (nothing is downloaded).

Each class gets an expression: the known emotion names (happy, sad, angry, fear, surprise, neutral,
disgust and a few aliases) get a recognisable one, any other name gets a distinct made-up one
chosen by its position in the class list. Everything else about a picture (size, background, skin
tone, pose, lighting, glasses, hair, blur, noise, JPEG or PNG) is drawn at random, so a model has to
learn the expression and nothing else.

Every image has its own generator, spawned from the seed by (class position, image index): the same
arguments give byte-identical files, and one image does not depend on how many came before it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

RGBColor = tuple[float, float, float]

# Fixed encoder parameters: part of what makes output byte-identical for a seed.
# Huffman-only with the SUB filter: noisy pictures barely compress anyway, and it is 3x faster.
_PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION,
    1,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_SUB,
]
_JPEG_QUALITY_RANGE = (60, 95)
_MIN_IMAGE_SIZE = 64

# cv2 drawing takes integer points; 4 fractional bits keep small features smooth.
_SHIFT = 4
_SCALE = 1 << _SHIFT

# Refused in class names: path separators, characters Windows forbids, control characters.
_BAD_NAME_CHARACTERS = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f]')


@dataclass(frozen=True)
class FaceFeatures:
    """The expression of one face; lengths are fractions of the face's half-width.

    mouth_curve: -1 (corners down, frown) .. +1 (corners up, smile).
    mouth_open: 0 (lips closed) .. 1 (wide open).
    mouth_width: mouth width as a fraction of face width.
    mouth_wave: 0 .. 1, a wavy mouth line (only for made-up classes).
    upper_lip_raise: 0 .. 1, the upper lip pulled up on one side (disgust).
    eye_open: 0 (closed) .. 0.5 (relaxed) .. 1 (wide, white above and below the iris).
    eye_tilt: degrees; positive lowers the outer corners (droopy, sad).
    wink: 0 .. 1, how far the left eye is closed beyond `eye_open`.
    brow_angle: degrees; positive lowers the inner ends (a V, anger), negative raises them.
    brow_height: 0 (pulled down onto the eyes) .. 1 (raised high).
    brow_asymmetry: 0 .. 1, the right brow raised above the left.
    nose_wrinkle: 0 .. 1, wrinkle lines across the nose bridge (disgust).
    cheek_raise: 0 .. 1, smile lines from the nose to the mouth corners (happy).
    """

    mouth_curve: float = 0.0
    mouth_open: float = 0.0
    mouth_width: float = 0.42
    mouth_wave: float = 0.0
    upper_lip_raise: float = 0.0
    eye_open: float = 0.5
    eye_tilt: float = 0.0
    wink: float = 0.0
    brow_angle: float = 0.0
    brow_height: float = 0.45
    brow_asymmetry: float = 0.0
    nose_wrinkle: float = 0.0
    cheek_raise: float = 0.0


NEUTRAL = FaceFeatures()

EXPRESSIONS: Mapping[str, FaceFeatures] = {
    "neutral": NEUTRAL,
    "happy": FaceFeatures(
        mouth_curve=1.0,
        mouth_open=0.55,
        mouth_width=0.5,
        eye_open=0.75,
        brow_height=0.5,
        cheek_raise=1.0,
    ),
    "sad": FaceFeatures(
        mouth_curve=-1.0,
        mouth_width=0.44,
        eye_open=0.32,
        eye_tilt=16.0,
        brow_angle=-24.0,
        brow_height=0.55,
    ),
    "angry": FaceFeatures(
        mouth_curve=-0.15, mouth_width=0.36, eye_open=0.36, brow_angle=26.0, brow_height=0.05
    ),
    "fear": FaceFeatures(
        mouth_curve=-0.35,
        mouth_open=0.3,
        mouth_width=0.5,
        eye_open=1.0,
        brow_angle=-14.0,
        brow_height=0.85,
    ),
    "surprise": FaceFeatures(
        mouth_open=1.0, mouth_width=0.32, eye_open=1.0, brow_height=1.0, brow_angle=-3.0
    ),
    "disgust": FaceFeatures(
        mouth_curve=-0.45,
        upper_lip_raise=1.0,
        mouth_width=0.42,
        eye_open=0.3,
        brow_angle=14.0,
        brow_height=0.15,
        nose_wrinkle=1.0,
    ),
}

ALIASES: Mapping[str, str] = {
    "happiness": "happy",
    "joy": "happy",
    "sadness": "sad",
    "anger": "angry",
    "fearful": "fear",
    "afraid": "fear",
    "surprised": "surprise",
    "disgusted": "disgust",
    "calm": "neutral",
}

# Made-up expressions for names we do not know. Every one carries at least one marker no known
# expression has (a wink, one raised brow, closed eyes), so it never looks like a known class; the
# three cycles have coprime lengths, so the first 60 positions are all different combinations.
_INVENTED_MOUTHS = (
    {"mouth_curve": 0.8},
    {"mouth_curve": -0.8},
    {"mouth_open": 0.9, "mouth_width": 0.3},
    {"mouth_wave": 1.0, "mouth_width": 0.48},
)
_INVENTED_EYES = (
    {"wink": 1.0},
    {"brow_asymmetry": 1.0},
    {"eye_open": 0.0},
)
_INVENTED_BROWS = (
    {"brow_angle": 0.0, "brow_height": 0.45},
    {"brow_angle": 24.0, "brow_height": 0.1},
    {"brow_angle": -20.0, "brow_height": 0.6},
    {"brow_angle": 0.0, "brow_height": 0.95},
    {"brow_angle": 0.0, "brow_height": 0.0},
)


@dataclass(frozen=True)
class SampleSummary:
    """What `generate_sample_data` wrote."""

    out: Path
    counts: Mapping[str, int]  # class name -> files, in the order given
    jpeg_files: int
    png_files: int
    total_files: int
    total_bytes: int


def features_for_class(name: str, index: int) -> FaceFeatures:
    """The expression for a class: by name if known (any case), else by its position in the list."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in EXPRESSIONS:
        return EXPRESSIONS[key]
    if index < 0:
        raise ValueError(f"class index must be >= 0, got {index}")
    values: dict[str, float] = {}
    values.update(_INVENTED_MOUTHS[index % len(_INVENTED_MOUTHS)])
    values.update(_INVENTED_EYES[index % len(_INVENTED_EYES)])
    values.update(_INVENTED_BROWS[index % len(_INVENTED_BROWS)])
    return dataclasses.replace(NEUTRAL, **values)


def generate_sample_data(
    out: Path,
    classes: Sequence[str],
    per_class: int,
    seed: int,
    *,
    min_size: int = 160,
    max_size: int = 320,
    jpeg_fraction: float = 0.7,
    workers: int | None = None,
) -> SampleSummary:
    """Write `per_class` synthetic faces per class to `out/<class>/<class>_<index:05d>.<jpg|png>`.

    Files of the same names are overwritten; nothing else in `out` is touched. `workers` threads
    (default: up to 4, one per CPU) draw in parallel; the files do not depend on it.
    """
    _check_arguments(classes, per_class, seed, min_size, max_size, jpeg_fraction)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    counts: dict[str, int] = {}
    extensions: list[str] = []
    total_bytes = 0
    # Threads, not processes: cv2 and numpy release the GIL for most of the work.
    with ThreadPoolExecutor(max_workers=workers) as executor:
        for class_index, name in enumerate(classes):
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            job = _ImageJob(
                folder=folder,
                name=name,
                class_index=class_index,
                features=features_for_class(name, class_index),
                seed=seed,
                min_size=min_size,
                max_size=max_size,
                jpeg_fraction=jpeg_fraction,
            )
            for extension, size in executor.map(job.write, range(per_class)):
                extensions.append(extension)
                total_bytes += size
            counts[name] = per_class
    summary = SampleSummary(
        out=out,
        counts=counts,
        jpeg_files=extensions.count("jpg"),
        png_files=extensions.count("png"),
        total_files=len(extensions),
        total_bytes=total_bytes,
    )
    logger.info("wrote %d sample images (%d bytes) to %s", summary.total_files, total_bytes, out)
    return summary


@dataclass(frozen=True)
class _ImageJob:
    """Everything one class's images need; `write` makes one of them."""

    folder: Path
    name: str
    class_index: int
    features: FaceFeatures
    seed: int
    min_size: int
    max_size: int
    jpeg_fraction: float

    def write(self, image_index: int) -> tuple[str, int]:
        """Draw, encode and write image `image_index`; return its extension and size in bytes."""
        sequence = np.random.SeedSequence(self.seed, spawn_key=(self.class_index, image_index))
        rng = np.random.default_rng(sequence)
        image = draw_face(rng, self.features, _image_size(rng, self.min_size, self.max_size))
        extension, data = _encode(rng, image, self.jpeg_fraction)
        _write_atomically(self.folder / f"{self.name}_{image_index:05d}.{extension}", data)
        return extension, len(data)


def draw_face(
    rng: np.random.Generator, features: FaceFeatures, size: tuple[int, int]
) -> NDArray[np.uint8]:
    """One synthetic photo (H, W, 3) RGB of `size` (height, width) showing a face with `features`.

    `features` is drawn with a random intensity around the given expression; everything else
    (background, face placement, skin, lighting, accessories, blur, noise) comes from `rng`.
    """
    height, width = size
    if height < _MIN_IMAGE_SIZE or width < _MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be at least {_MIN_IMAGE_SIZE} pixels, got {size}")
    features = _vary_intensity(rng, features)
    background = _draw_background(rng, height, width)
    face, mask = _draw_face_layer(rng, features, height, width)
    alpha = mask.astype(np.float32)[:, :, None] * np.float32(1 / 255)
    image = background + (face - background) * alpha
    if rng.random() < 0.3:
        sigma = rng.uniform(0.4, 1.4) * min(height, width) / 256
        image = np.asarray(cv2.GaussianBlur(image, (0, 0), sigmaX=sigma), np.float32)
    # Luminance noise only: a third of the draws, and cameras' chroma noise is mostly smoothed.
    noise_level = np.float32(rng.uniform(0.0, 8.0))
    image += rng.standard_normal((height, width, 1), dtype=np.float32) * noise_level
    image += 0.5
    return np.clip(image, 0, 255).astype(np.uint8)


def _check_arguments(
    classes: Sequence[str],
    per_class: int,
    seed: int,
    min_size: int,
    max_size: int,
    jpeg_fraction: float,
) -> None:
    if isinstance(classes, str):
        raise ValueError("classes must be a list of class names, not one string")
    if len(classes) == 0:
        raise ValueError("classes is empty: give at least one class name")
    seen: dict[str, str] = {}
    for name in classes:
        _check_class_name(name)
        # Compared case-insensitively: "Happy" and "happy" are one folder on macOS and Windows.
        if name.lower() in seen:
            raise ValueError(
                f"duplicate class name {name!r} (same folder as {seen[name.lower()]!r})"
            )
        seen[name.lower()] = name
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if not _MIN_IMAGE_SIZE <= min_size <= max_size:
        raise ValueError(
            f"need {_MIN_IMAGE_SIZE} <= min_size <= max_size, got min_size={min_size}, "
            f"max_size={max_size}"
        )
    if not 0.0 <= jpeg_fraction <= 1.0:
        raise ValueError(f"jpeg_fraction must be between 0 and 1, got {jpeg_fraction}")


def _check_class_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"class name must be a non-empty string, got {name!r}")
    if name in {".", ".."} or _BAD_NAME_CHARACTERS.search(name):
        raise ValueError(
            f"class name {name!r} is not a valid folder name: "
            'avoid "." and "..", / \\ : * ? " < > | and control characters'
        )
    if name != name.strip() or name.endswith("."):
        raise ValueError(
            f"class name {name!r} is not a valid folder name: "
            "no leading or trailing spaces and no trailing dot"
        )


def _image_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width), each in min_size..max_size, at most 3:2 either way like most photos.

    Wilder shapes squash the face when a model resizes to a square, which costs accuracy and
    teaches nothing about expressions.
    """
    height = int(rng.integers(min_size, max_size, endpoint=True))
    aspect = math.exp(rng.uniform(-math.log(1.5), math.log(1.5)))
    width = int(np.clip(round(height * aspect), min_size, max_size))
    return height, width


def _encode(
    rng: np.random.Generator, image: NDArray[np.uint8], jpeg_fraction: float
) -> tuple[str, bytes]:
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if rng.random() < jpeg_fraction:
        quality = int(rng.integers(*_JPEG_QUALITY_RANGE, endpoint=True))
        extension, params = "jpg", [cv2.IMWRITE_JPEG_QUALITY, quality]
    else:
        extension, params = "png", _PNG_PARAMS
    ok, encoded = cv2.imencode(f".{extension}", bgr, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {extension} image")
    return extension, encoded.tobytes()


def _write_atomically(path: Path, data: bytes) -> None:
    # A reader never sees half a file: write beside it, then rename over it.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)


def _vary_intensity(rng: np.random.Generator, features: FaceFeatures) -> FaceFeatures:
    """Scale how far the expression is from neutral, and jitter it a little."""
    # Every field takes the same draws whatever the expression, so two expressions drawn from
    # equal generators differ in the expression only.
    intensity = rng.uniform(0.8, 1.15)
    values: dict[str, float] = {}
    for field in dataclasses.fields(FaceFeatures):
        jitter, low, high = _VARIATION[field.name]
        base = getattr(NEUTRAL, field.name)
        value = base + (getattr(features, field.name) - base) * intensity
        values[field.name] = float(np.clip(value + rng.uniform(-jitter, jitter), low, high))
    return FaceFeatures(**values)


# Per field: (jitter, lowest, highest) after scaling by the intensity.
_VARIATION: Mapping[str, tuple[float, float, float]] = {
    "mouth_curve": (0.08, -1.2, 1.2),
    "mouth_open": (0.04, 0.0, 1.1),
    "mouth_width": (0.03, 0.28, 0.56),
    "mouth_wave": (0.0, 0.0, 1.2),
    "upper_lip_raise": (0.0, 0.0, 1.2),
    "eye_open": (0.05, 0.0, 1.1),
    "eye_tilt": (3.0, -8.0, 20.0),
    "wink": (0.0, 0.0, 1.0),
    "brow_angle": (3.0, -28.0, 32.0),
    "brow_height": (0.05, 0.0, 1.1),
    "brow_asymmetry": (0.0, 0.0, 1.2),
    "nose_wrinkle": (0.0, 0.0, 1.2),
    "cheek_raise": (0.0, 0.0, 1.2),
}


# --- background ---------------------------------------------------------------------------------


def _random_color(rng: np.random.Generator) -> RGBColor:
    red, green, blue = rng.uniform(0, 255, size=3)
    return (float(red), float(green), float(blue))


def _draw_background(rng: np.random.Generator, height: int, width: int) -> NDArray[np.float32]:
    kind = int(rng.integers(4))
    if kind == 0:
        background = np.empty((height, width, 3), np.float32)
        background[:] = _random_color(rng)
    elif kind == 1:
        background = _gradient(rng, height, width)
    elif kind == 2:
        background = _noise_texture(rng, height, width)
    else:
        background = _shapes(rng, height, width)
    return background


def _gradient(rng: np.random.Generator, height: int, width: int) -> NDArray[np.float32]:
    angle = rng.uniform(0, 2 * math.pi)
    rows, columns = np.ogrid[0:height, 0:width]
    position = (columns * math.cos(angle) + rows * math.sin(angle)).astype(np.float32)
    position = (position - position.min()) / max(float(np.ptp(position)), 1.0)
    start = np.array(_random_color(rng), np.float32)
    end = np.array(_random_color(rng), np.float32)
    return np.asarray(start + position[:, :, None] * (end - start), np.float32)


def _noise_texture(rng: np.random.Generator, height: int, width: int) -> NDArray[np.float32]:
    cells = int(rng.integers(3, 16))
    spread = rng.uniform(30, 110)
    base = np.array(_random_color(rng), np.float32)
    coarse = np.clip(base + rng.uniform(-spread, spread, size=(cells, cells, 3)), 0, 255)
    coarse = coarse.astype(np.float32)
    texture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    fine = rng.standard_normal((height, width, 1), dtype=np.float32) * rng.uniform(0, 25)
    return np.asarray(texture + fine, np.float32)


def _shapes(rng: np.random.Generator, height: int, width: int) -> NDArray[np.float32]:
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = _random_color(rng)
    for _ in range(int(rng.integers(3, 12))):
        center = (int(rng.integers(width)), int(rng.integers(height)))
        extent = int(rng.integers(8, max(9, min(height, width) // 3)))
        color = _random_color(rng)
        if rng.random() < 0.5:
            cv2.circle(canvas, center, extent, color, -1, cv2.LINE_AA)
        else:
            corner = (center[0] + extent, center[1] + int(rng.integers(8, extent + 9)))
            cv2.rectangle(canvas, center, corner, color, -1, cv2.LINE_AA)
    return canvas.astype(np.float32)


# --- face ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """Where the upright face sits in the image, in pixels."""

    center_x: float
    center_y: float
    half_width: float  # `a`: every feature size is a multiple of it
    half_height: float

    @property
    def eye_y(self) -> float:
        return self.center_y - 0.2 * self.half_height

    @property
    def mouth_y(self) -> float:
        return self.center_y + 0.5 * self.half_height


@dataclass(frozen=True)
class _Palette:
    skin: RGBColor
    feature: RGBColor  # brows, eye outlines, lip line: dark on every skin tone
    mouth_inside: RGBColor
    hair: RGBColor


def _place_face(rng: np.random.Generator, height: int, width: int) -> _Geometry:
    half_width = rng.uniform(0.26, 0.32) * min(height, width)
    half_height = half_width * rng.uniform(1.2, 1.35)
    # Off centre by up to a twelfth of the picture, but kept inside it.
    center_x = _jitter_inside(rng, width, 1.1 * half_width)
    center_y = _jitter_inside(rng, height, 1.05 * half_height)
    return _Geometry(center_x, center_y, half_width, half_height)


def _jitter_inside(rng: np.random.Generator, length: int, margin: float) -> float:
    low = max(margin, 5 / 12 * length)
    high = min(length - margin, 7 / 12 * length)
    return length / 2 if low >= high else float(rng.uniform(low, high))


def _choose_palette(rng: np.random.Generator) -> _Palette:
    light, dark = np.array([252, 224, 200]), np.array([72, 45, 32])
    tone = rng.uniform(0, 1)
    skin = light + tone * (dark - light) + rng.uniform(-12, 12, size=3)
    skin = np.clip(skin, 0, 255)
    feature = np.minimum(skin * 0.4, 60) + rng.uniform(0, 12, size=3)
    hair = rng.choice(np.array([[25, 20, 18], [70, 45, 25], [130, 90, 50], [200, 170, 110]]))
    hair = np.clip(hair + rng.uniform(-15, 15, size=3), 0, 255)
    mouth_inside = np.array([70, 20, 25]) * rng.uniform(0.5, 1.0)

    def color(values: NDArray[np.floating]) -> RGBColor:
        return (float(values[0]), float(values[1]), float(values[2]))

    return _Palette(color(skin), color(feature), color(mouth_inside), color(hair))


def _draw_face_layer(
    rng: np.random.Generator, features: FaceFeatures, height: int, width: int
) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """The face on a black layer and its coverage mask, rotated and lit."""
    geometry = _place_face(rng, height, width)
    palette = _choose_palette(rng)
    # Drawn in uint8: cv2 anti-aliases only 8-bit images.
    layer = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    has_hair = rng.random() < 0.6
    if has_hair:
        _draw_hair_behind(layer, mask, geometry, palette)
    _draw_head(layer, mask, geometry, palette)
    if has_hair:
        _draw_fringe(layer, geometry, palette)
    _draw_eyes(layer, geometry, palette, features)
    _draw_brows(layer, geometry, palette, features)
    _draw_nose(layer, geometry, palette, features)
    _draw_mouth(layer, geometry, palette, features)
    _draw_smile_lines(layer, geometry, palette, features)
    if rng.random() < 0.1:
        _draw_glasses(rng, layer, geometry)
    return _rotate(rng, _light(rng, layer, geometry), mask, geometry)


def _points(xs: NDArray[np.float64], ys: NDArray[np.float64]) -> NDArray[np.int32]:
    """Float pixel coordinates -> the fixed-point int32 points cv2 draws with `_SHIFT`."""
    return np.round(np.stack([xs, ys], axis=1) * _SCALE).astype(np.int32)


def _ellipse(
    center_x: float,
    center_y: float,
    axis_x: float,
    axis_y: float,
    angle_degrees: float = 0.0,
    count: int = 48,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    theta = np.linspace(0, 2 * np.pi, count, endpoint=False)
    angle = math.radians(angle_degrees)
    x, y = axis_x * np.cos(theta), axis_y * np.sin(theta)
    return (
        center_x + x * math.cos(angle) - y * math.sin(angle),
        center_y + x * math.sin(angle) + y * math.cos(angle),
    )


def _fill(canvas: NDArray[np.uint8], points: NDArray[np.int32], color: RGBColor | float) -> None:
    cv2.fillPoly(canvas, [points], color, cv2.LINE_AA, _SHIFT)


def _stroke(
    canvas: NDArray[np.uint8],
    points: NDArray[np.int32],
    color: RGBColor,
    thickness: float,
    closed: bool = False,
) -> None:
    cv2.polylines(canvas, [points], closed, color, max(1, round(thickness)), cv2.LINE_AA, _SHIFT)


def _draw_hair_behind(
    layer: NDArray[np.uint8], mask: NDArray[np.uint8], geometry: _Geometry, palette: _Palette
) -> None:
    a, b = geometry.half_width, geometry.half_height
    outline = _points(*_ellipse(geometry.center_x, geometry.center_y - 0.18 * b, 1.12 * a, 1.0 * b))
    _fill(layer, outline, palette.hair)
    _fill(mask, outline, 255)


def _draw_fringe(layer: NDArray[np.uint8], geometry: _Geometry, palette: _Palette) -> None:
    # Its lower edge stays above the highest brow, so hair never hides the expression.
    a, b = geometry.half_width, geometry.half_height
    bottom = geometry.eye_y - 0.82 * a
    top = geometry.center_y - 1.02 * b
    center_y = (bottom + top) / 2
    _fill(
        layer,
        _points(*_ellipse(geometry.center_x, center_y, 0.92 * a, (bottom - top) / 2)),
        palette.hair,
    )


def _draw_head(
    layer: NDArray[np.uint8], mask: NDArray[np.uint8], geometry: _Geometry, palette: _Palette
) -> None:
    a, b = geometry.half_width, geometry.half_height
    for side in (-1, 1):
        ear = _points(
            *_ellipse(
                geometry.center_x + side * 0.97 * a, geometry.eye_y + 0.2 * a, 0.14 * a, 0.26 * a
            )
        )
        _fill(layer, ear, palette.skin)
        _fill(mask, ear, 255)
    head = _points(*_ellipse(geometry.center_x, geometry.center_y, a, b, count=72))
    _fill(layer, head, palette.skin)
    _fill(mask, head, 255)


def _draw_eyes(
    layer: NDArray[np.uint8], geometry: _Geometry, palette: _Palette, features: FaceFeatures
) -> None:
    a = geometry.half_width
    eye_half_width = 0.19 * a
    for side in (-1, 1):  # -1 is the left of the image
        openness = features.eye_open - (features.wink if side == -1 else 0.0)
        center_x = geometry.center_x + side * 0.4 * a
        # Outer corners lowered: the left eye turns anticlockwise on screen, the right clockwise.
        tilt = -side * features.eye_tilt
        if openness < 0.08:
            _draw_closed_eye(layer, center_x, geometry.eye_y, eye_half_width, tilt, palette)
            continue
        eye_half_height = eye_half_width * (0.12 + 0.58 * min(openness, 1.1))
        outline = _points(
            *_ellipse(center_x, geometry.eye_y, eye_half_width, eye_half_height, tilt)
        )
        _fill(layer, outline, (240.0, 238.0, 232.0))
        # A circle no wider than the eye's short axis, centred, stays inside the eye.
        iris_radius = min(0.55 * eye_half_width, 0.95 * eye_half_height)
        iris = _points(*_ellipse(center_x, geometry.eye_y, iris_radius, iris_radius))
        _fill(layer, iris, (70.0, 50.0, 35.0))
        pupil = _points(*_ellipse(center_x, geometry.eye_y, 0.5 * iris_radius, 0.5 * iris_radius))
        _fill(layer, pupil, (10.0, 10.0, 10.0))
        _stroke(layer, outline, palette.feature, 0.05 * a, closed=True)
        if features.cheek_raise > 0.2:
            _push_up_lower_lid(
                layer,
                center_x,
                geometry.eye_y,
                eye_half_width,
                eye_half_height,
                tilt,
                palette,
                features.cheek_raise,
            )


def _push_up_lower_lid(
    layer: NDArray[np.uint8],
    center_x: float,
    center_y: float,
    half_width: float,
    half_height: float,
    tilt: float,
    palette: _Palette,
    cheek_raise: float,
) -> None:
    """Raised cheeks hide the bottom of the eye: the crescent-shaped eye of a real smile."""
    t = np.linspace(-1.1, 1.1, 23)
    lid_y = -0.35 * cheek_raise * half_height * np.clip(1 - t**2, 0, None)
    below = np.full_like(t, 1.6 * half_height)
    cover_x = np.concatenate([half_width * t, half_width * t[::-1]])
    cover_y = np.concatenate([lid_y, below])
    _fill(layer, _points(*_rotate_about(cover_x, cover_y, center_x, center_y, tilt)), palette.skin)
    lid = _rotate_about(half_width * t[2:-2], lid_y[2:-2], center_x, center_y, tilt)
    _stroke(layer, _points(*lid), palette.feature, 0.12 * half_width)


def _rotate_about(
    xs: NDArray[np.float64],
    ys: NDArray[np.float64],
    center_x: float,
    center_y: float,
    angle_degrees: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Offsets (xs, ys) from a centre, turned by the angle and moved to the centre."""
    angle = math.radians(angle_degrees)
    return (
        center_x + xs * math.cos(angle) - ys * math.sin(angle),
        center_y + xs * math.sin(angle) + ys * math.cos(angle),
    )


def _draw_closed_eye(
    layer: NDArray[np.uint8],
    center_x: float,
    center_y: float,
    half_width: float,
    tilt: float,
    palette: _Palette,
) -> None:
    t = np.linspace(-1, 1, 16)
    xs, ys = half_width * t, 0.25 * half_width * (1 - t**2)
    lid = _rotate_about(xs, ys, center_x, center_y, tilt)
    _stroke(layer, _points(*lid), palette.feature, 0.3 * half_width)


def _draw_brows(
    layer: NDArray[np.uint8], geometry: _Geometry, palette: _Palette, features: FaceFeatures
) -> None:
    a = geometry.half_width
    s = np.linspace(0, 1, 20)  # 0 at the inner end, 1 at the outer end
    for side in (-1, 1):
        raise_by = features.brow_height + (features.brow_asymmetry * 0.7 if side == 1 else 0.0)
        middle_y = geometry.eye_y - (0.3 + 0.42 * raise_by) * a
        inner_x, outer_x = geometry.center_x + side * 0.1 * a, geometry.center_x + side * 0.68 * a
        half_drop = math.tan(math.radians(features.brow_angle)) * abs(outer_x - inner_x) / 2
        arch = (0.05 + 0.08 * raise_by) * a * (1 - (2 * s - 1) ** 2)
        xs = inner_x + s * (outer_x - inner_x)
        centre_line = middle_y + half_drop * (1 - 2 * s) - arch
        thickness = 0.12 * a * (1.0 - 0.4 * s)  # tapered towards the outer end
        upper = _points(xs, centre_line - thickness / 2)
        lower = _points(xs[::-1], (centre_line + thickness / 2)[::-1])
        _fill(layer, np.concatenate([upper, lower]), palette.feature)


def _draw_nose(
    layer: NDArray[np.uint8], geometry: _Geometry, palette: _Palette, features: FaceFeatures
) -> None:
    a, x = geometry.half_width, geometry.center_x
    shade = _darker(palette.skin, 0.72)
    tip_y = geometry.center_y + 0.18 * geometry.half_height
    bridge = _points(
        np.array([x + 0.02 * a, x - 0.04 * a, x + 0.02 * a]),
        np.array([geometry.eye_y + 0.05 * a, tip_y, tip_y + 0.06 * a]),
    )
    _stroke(layer, bridge, shade, 0.04 * a)
    for side in (-1, 1):
        nostril = _points(*_ellipse(x + side * 0.1 * a, tip_y + 0.05 * a, 0.05 * a, 0.03 * a))
        _fill(layer, nostril, shade)
    if features.nose_wrinkle > 0.2:
        # Short creases slanting down and out from the bridge, as the nose wrinkles up.
        wrinkle_color = _darker(palette.skin, 0.5)
        for row in range(2):
            y = geometry.eye_y + (0.06 + 0.1 * row) * a
            for side in (-1, 1):
                wrinkle = _points(
                    np.array([x + side * 0.05 * a, x + side * 0.11 * a, x + side * 0.17 * a]),
                    np.array([y, y + 0.01 * a, y + 0.05 * a]),
                )
                _stroke(layer, wrinkle, wrinkle_color, 0.035 * a * features.nose_wrinkle)


def _darker(color: RGBColor, factor: float) -> RGBColor:
    return (color[0] * factor, color[1] * factor, color[2] * factor)


def _draw_mouth(
    layer: NDArray[np.uint8], geometry: _Geometry, palette: _Palette, features: FaceFeatures
) -> None:
    a = geometry.half_width
    half_width = features.mouth_width * a
    t = np.linspace(-1, 1, 33)
    xs = geometry.center_x + t * half_width
    # Corners move by `curve`, the middle the other way, so the mouth stays where it is on average.
    line = geometry.mouth_y - features.mouth_curve * 0.55 * half_width * (t**2 - 0.5)
    line = line + features.mouth_wave * 0.18 * half_width * np.sin(2.5 * np.pi * t)
    bulge = np.sqrt(np.clip(1 - t**2, 0, 1))
    opening = features.mouth_open * 0.55 * a * bulge
    upper = line - 0.4 * opening
    lower = line + 0.6 * opening
    # Disgust: the upper lip pulled up on the right, baring teeth there.
    raise_shape = np.clip(t + 0.3, 0, None) ** 1.2 * bulge**0.5
    upper = upper - features.upper_lip_raise * 0.22 * a * raise_shape
    if float(np.max(lower - upper)) > 0.04 * a:
        _draw_open_mouth(layer, xs, upper, lower, palette, a)
    lip = _points(xs, line) if float(np.max(lower - upper)) <= 0.04 * a else None
    thickness = 0.1 * a
    if lip is not None:
        _stroke(layer, lip, palette.feature, thickness)
    else:
        outline = np.concatenate([_points(xs, upper), _points(xs[::-1], lower[::-1])])
        _stroke(layer, outline, palette.feature, 0.8 * thickness, closed=True)


def _draw_smile_lines(
    layer: NDArray[np.uint8], geometry: _Geometry, palette: _Palette, features: FaceFeatures
) -> None:
    """Creases from beside the nose round the mouth corners, pushed up by raised cheeks."""
    if features.cheek_raise < 0.2:
        return
    a = geometry.half_width
    mouth_half_width = features.mouth_width * a
    corner_y = geometry.mouth_y - 0.275 * features.mouth_curve * mouth_half_width
    start_y = geometry.center_y + 0.12 * geometry.half_height
    s = np.linspace(0, 1, 16)[:, None]
    for side in (-1, 1):
        start = np.array([geometry.center_x + side * 0.24 * a, start_y])
        control = np.array(
            [geometry.center_x + side * (mouth_half_width + 0.22 * a), corner_y - 0.2 * a]
        )
        end = np.array(
            [geometry.center_x + side * (mouth_half_width + 0.1 * a), corner_y + 0.08 * a]
        )
        curve = (1 - s) ** 2 * start + 2 * (1 - s) * s * control + s**2 * end
        crease = _points(curve[:, 0], curve[:, 1])
        _stroke(layer, crease, _darker(palette.skin, 0.6), 0.045 * a * features.cheek_raise)


def _draw_open_mouth(
    layer: NDArray[np.uint8],
    xs: NDArray[np.float64],
    upper: NDArray[np.float64],
    lower: NDArray[np.float64],
    palette: _Palette,
    a: float,
) -> None:
    inside = np.concatenate([_points(xs, upper), _points(xs[::-1], lower[::-1])])
    _fill(layer, inside, palette.mouth_inside)
    # Upper teeth: a band under the upper lip, at most a fifth of the face's half-width tall.
    teeth_bottom = upper + np.minimum(0.45 * (lower - upper), 0.16 * a)
    teeth = np.concatenate([_points(xs, upper), _points(xs[::-1], teeth_bottom[::-1])])
    _fill(layer, teeth, (235.0, 230.0, 215.0))


def _draw_glasses(rng: np.random.Generator, layer: NDArray[np.uint8], geometry: _Geometry) -> None:
    a = geometry.half_width
    color = (float(rng.uniform(0, 60)), float(rng.uniform(0, 60)), float(rng.uniform(0, 60)))
    thickness = 0.03 * a
    radius_x, radius_y = 0.3 * a, 0.24 * a
    for side in (-1, 1):
        rim = _points(
            *_ellipse(geometry.center_x + side * 0.4 * a, geometry.eye_y, radius_x, radius_y)
        )
        _stroke(layer, rim, color, thickness, closed=True)
        temple_x = np.array(
            [geometry.center_x + side * 0.7 * a, geometry.center_x + side * 0.98 * a]
        )
        _stroke(layer, _points(temple_x, np.full(2, geometry.eye_y - 0.05 * a)), color, thickness)
    bridge_x = np.array([geometry.center_x - 0.1 * a, geometry.center_x + 0.1 * a])
    _stroke(layer, _points(bridge_x, np.full(2, geometry.eye_y - 0.03 * a)), color, thickness)


def _light(
    rng: np.random.Generator, layer: NDArray[np.uint8], geometry: _Geometry
) -> NDArray[np.float32]:
    """Brightness falling off across the face from a random side, and a random contrast."""
    height, width = layer.shape[:2]
    angle = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0.0, 0.35)
    rows, columns = np.ogrid[0:height, 0:width]
    along = (columns - geometry.center_x) * math.cos(angle) + (rows - geometry.center_y) * math.sin(
        angle
    )
    gain = np.clip(1.0 + strength * along / geometry.half_width, 0.45, 1.6).astype(np.float32)
    contrast = rng.uniform(0.8, 1.15)
    brightness = rng.uniform(-20, 20)
    lit = layer.astype(np.float32) * gain[:, :, None]
    lit -= 128.0
    lit *= contrast
    lit += 128.0 + brightness
    return lit


def _rotate(
    rng: np.random.Generator,
    layer: NDArray[np.float32],
    mask: NDArray[np.uint8],
    geometry: _Geometry,
) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    height, width = mask.shape
    # Mostly near upright, as in photos, now and then up to 20 degrees either way.
    angle = float(np.clip(rng.normal(0.0, 9.0), -20.0, 20.0))
    matrix = cv2.getRotationMatrix2D((geometry.center_x, geometry.center_y), angle, 1.0)
    rotated_layer = cv2.warpAffine(layer, matrix, (width, height), flags=cv2.INTER_LINEAR)
    rotated_mask = cv2.warpAffine(mask, matrix, (width, height), flags=cv2.INTER_LINEAR)
    return np.asarray(rotated_layer, np.float32), np.asarray(rotated_mask, np.uint8)
