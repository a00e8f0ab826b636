"""MTCNN face detection (Zhang et al., 2016) as three Keras 3 functional models, on any backend.

The networks are built here from `keras.layers` alone (no backend calls, no Lambda layers), so the
same detector runs on TensorFlow, JAX or PyTorch, and are given the weights of the `mtcnn` 1.0
wheel (`weights.py`); its own TensorFlow code is never imported. Three stages:

1. P-Net, fully convolutional, runs once on a mosaic of the image pyramid (the image scaled by
   12/min_face_size, then by `pyramid_scale` per level while the short side stays >= 12 pixels);
   every 12x12 window inside a level that it scores above `proposal_threshold` is a proposal.
   Proposals are thinned per level (NMS 0.5) and across levels (NMS 0.7) and made square.
   P-Net is most of the CPU time.
2. R-Net scores 24x24 crops of all proposals in one batch, regresses their boxes and keeps those
   above `refine_threshold` (NMS 0.7, squared again).
3. O-Net scores 48x48 crops in one batch, regresses boxes and five landmarks and keeps those above
   `min_score` (NMS 0.7 over the smaller box, which also removes a box inside another).

The pipeline follows `mtcnn` 1.0 (its thresholds, box regression and pixel scaling
(x - 127.5) / 128, RGB); crops are area-resized from the uint8 image, as the original MTCNN ports
do, rather than point-sampled, and the pyramid stops where P-Net's window fits.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from core.errors import ModelError
from training.faces import Face, FaceDetectorConfig
from training.faces import boxes as box_math
from training.faces.weights import read_weights
from training.runtime import load_keras

_WINDOW = 12  # P-Net's receptive field, in pixels of a pyramid level
_STRIDE = 2  # P-Net's output stride
_LEVEL_NMS = 0.5
_PYRAMID_NMS = 0.7
_REFINE_NMS = 0.7
_OUTPUT_NMS = 0.7
_CANVAS_STEP = 32  # P-Net's canvas sides are padded to a multiple: few shapes to compile
_BATCH_STEP = 32  # R-/O-Net batches are padded to a multiple: few shapes for JAX to compile

Corners = NDArray[np.float64]  # (N, 4) x1, y1, x2, y2


@dataclass(frozen=True)
class _Networks:
    pnet: Any  # keras.Model: (1, H, W, 3) -> box offsets (1, h, w, 4), face probability (.., 2)
    rnet: Any  # keras.Model: (N, 24, 24, 3) -> offsets (N, 4), probability (N, 2)
    onet: Any  # keras.Model: (N, 48, 48, 3) -> offsets (N, 4), landmarks (N, 10), prob. (N, 2)
    backend: str


_networks_lock = threading.Lock()
_networks: _Networks | None = None


def load_mtcnn(
    config: FaceDetectorConfig | None = None, *, backend: str | None = None
) -> MtcnnDetector:
    """The MTCNN detector; its networks are built and loaded once per process, then shared.

    `backend` is passed to `training.runtime.load_keras` (None: Keras' configured backend).
    Cheap after the first call, so a worker may call it per task or keep the result.
    """
    global _networks
    load_keras(backend=backend)  # refuses a backend other than the one this process runs
    with _networks_lock:
        if _networks is None:
            _networks = _build_networks(backend)
    return MtcnnDetector(_networks, config or FaceDetectorConfig())


def _build_networks(backend: str | None) -> _Networks:
    keras = load_keras(backend=backend)
    networks = _Networks(
        pnet=_pnet(keras), rnet=_rnet(keras), onet=_onet(keras), backend=keras.backend.backend()
    )
    for name in ("pnet", "rnet", "onet"):
        _set_weights(getattr(networks, name), read_weights(name))
    return networks


def _set_weights(model: Any, arrays: list[NDArray[np.float32]]) -> None:
    expected = [tuple(weight.shape) for weight in model.weights]
    found = [array.shape for array in arrays]
    if expected != found:
        raise ModelError(
            f"the face detector's {model.name} weights do not fit it: {found} for {expected}"
        )
    model.set_weights(arrays)


def _conv_block(layers: Any, x: Any, filters: int, kernel: int, name: str) -> Any:
    x = layers.Conv2D(filters, kernel, padding="valid", name=f"{name}_conv")(x)
    return layers.PReLU(shared_axes=[1, 2], name=f"{name}_prelu")(x)


def _pnet(keras: Any) -> Any:
    layers = keras.layers
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = _conv_block(layers, inputs, 10, 3, "block1")
    x = layers.MaxPooling2D(2, 2, padding="same", name="block1_pool")(x)
    x = _conv_block(layers, x, 16, 3, "block2")
    x = _conv_block(layers, x, 32, 3, "block3")
    offsets = layers.Conv2D(4, 1, name="offsets")(x)
    probability = layers.Conv2D(2, 1, activation="softmax", name="probability")(x)
    return keras.Model(inputs, [offsets, probability], name="pnet")


def _rnet(keras: Any) -> Any:
    layers = keras.layers
    inputs = keras.Input(shape=(24, 24, 3), name="patch")
    x = _conv_block(layers, inputs, 28, 3, "block1")
    x = layers.MaxPooling2D(3, 2, padding="same", name="block1_pool")(x)
    x = _conv_block(layers, x, 48, 3, "block2")
    x = layers.MaxPooling2D(3, 2, padding="valid", name="block2_pool")(x)
    x = _conv_block(layers, x, 64, 2, "block3")
    # The weights were converted from a channels-first (Caffe) model: its flatten order is W, H, C.
    x = layers.Flatten(name="flatten")(layers.Permute((2, 1, 3), name="permute")(x))
    x = layers.PReLU(name="dense_prelu")(layers.Dense(128, name="dense")(x))
    offsets = layers.Dense(4, name="offsets")(x)
    probability = layers.Dense(2, activation="softmax", name="probability")(x)
    return keras.Model(inputs, [offsets, probability], name="rnet")


def _onet(keras: Any) -> Any:
    layers = keras.layers
    inputs = keras.Input(shape=(48, 48, 3), name="patch")
    x = _conv_block(layers, inputs, 32, 3, "block1")
    x = layers.MaxPooling2D(3, 2, padding="same", name="block1_pool")(x)
    x = _conv_block(layers, x, 64, 3, "block2")
    x = layers.MaxPooling2D(3, 2, padding="valid", name="block2_pool")(x)
    x = _conv_block(layers, x, 64, 3, "block3")
    x = layers.MaxPooling2D(2, 2, padding="same", name="block3_pool")(x)
    x = _conv_block(layers, x, 128, 2, "block4")
    x = layers.Flatten(name="flatten")(layers.Permute((2, 1, 3), name="permute")(x))
    x = layers.PReLU(name="dense_prelu")(layers.Dense(256, name="dense")(x))
    offsets = layers.Dense(4, name="offsets")(x)
    landmarks = layers.Dense(10, name="landmarks")(x)
    probability = layers.Dense(2, activation="softmax", name="probability")(x)
    return keras.Model(inputs, [offsets, landmarks, probability], name="onet")


def pyramid_scales(height: int, width: int, config: FaceDetectorConfig) -> list[float]:
    """The scale of each pyramid level: from 12/min_face_size down while P-Net's window fits."""
    scale = _WINDOW / config.min_face_size
    scales: list[float] = []
    while min(height, width) * scale >= _WINDOW:
        scales.append(scale)
        scale *= config.pyramid_scale
    return scales


class MtcnnDetector:
    """Finds faces with MTCNN; see the module docstring. Use `load_mtcnn` to get one."""

    def __init__(self, networks: _Networks, config: FaceDetectorConfig) -> None:
        self._networks = networks
        self.config = config

    @property
    def backend(self) -> str:
        return self._networks.backend

    def detect(self, rgb: NDArray[np.uint8]) -> list[Face]:
        """Faces in an (H, W, 3) uint8 RGB image, highest score first (see `Face` for boxes)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
        height, width = rgb.shape[:2]
        image, factor = self._reduced(rgb)
        corners = self._propose(image)
        if len(corners):
            corners = self._refine(image, corners)
        if not len(corners):
            return []
        corners, scores, landmarks = self._output(image, corners)
        return self._faces(corners / factor, scores, landmarks / factor, width, height)

    def _reduced(self, rgb: NDArray[np.uint8]) -> tuple[NDArray[np.uint8], float]:
        height, width = rgb.shape[:2]
        limit = self.config.max_side
        if limit is None or max(height, width) <= limit:
            return rgb, 1.0
        factor = limit / max(height, width)
        size = (max(round(width * factor), 1), max(round(height * factor), 1))
        reduced = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        return np.asarray(reduced, dtype=np.uint8), factor

    def _propose(self, image: NDArray[np.uint8]) -> Corners:
        """P-Net over the pyramid, in one call: squared candidate boxes (N, 4) in `image` pixels."""
        height, width = image.shape[:2]
        scales = pyramid_scales(height, width, self.config)
        if not scales:
            return np.empty((0, 4))
        canvas, placements = _mosaic(image, scales)
        offsets, probability = self._run(self._networks.pnet, _normalised(canvas[None]))
        levels: list[NDArray[np.float64]] = []
        for scale, (left, top, level_width, level_height) in zip(scales, placements, strict=True):
            # Only windows wholly inside this level: they see its pixels alone, as if P-Net ran
            # on the level by itself (P-Net's receptive field is exactly its 12-pixel window).
            rows = slice(top // _STRIDE, (top + level_height - _WINDOW) // _STRIDE + 1)
            columns = slice(left // _STRIDE, (left + level_width - _WINDOW) // _STRIDE + 1)
            found = _windows(
                offsets[0, rows, columns], probability[0, rows, columns, 1], scale, self.config
            )
            if len(found):
                keep = box_math.suppress(found[:, :4], found[:, 4], _LEVEL_NMS)
                levels.append(found[keep])
        if not levels:
            return np.empty((0, 4))
        found = np.concatenate(levels)
        keep = box_math.suppress(found[:, :4], found[:, 4], _PYRAMID_NMS)
        return box_math.squared(found[keep, :4])

    def _refine(self, image: NDArray[np.uint8], corners: Corners) -> Corners:
        """R-Net on all candidates in one batch: the survivors' regressed, squared boxes."""
        offsets, probability = self._run(self._networks.rnet, _patches(image, corners, 24))
        scores = probability[:, 1]
        passed = scores > self.config.refine_threshold
        corners = _regressed(corners[passed], offsets[passed])
        keep = box_math.suppress(corners, scores[passed], _REFINE_NMS)
        return box_math.squared(corners[keep])

    def _output(
        self, image: NDArray[np.uint8], corners: Corners
    ) -> tuple[Corners, NDArray[np.float64], NDArray[np.float64]]:
        """O-Net in one batch: final boxes (N, 4), scores (N,), landmarks (N, 5, 2)."""
        offsets, points, probability = self._run(self._networks.onet, _patches(image, corners, 48))
        sides = corners[:, 2:] - corners[:, :2]
        # O-Net gives five x then five y, as fractions of the (square) input box.
        landmarks = np.stack([points[:, :5], points[:, 5:]], axis=2) * sides[:, None, :]
        landmarks = landmarks + corners[:, None, :2]
        scores = probability[:, 1].astype(np.float64)
        passed = scores > self.config.min_score
        corners = _regressed(corners[passed], offsets[passed])
        keep = box_math.suppress(corners, scores[passed], _OUTPUT_NMS, over="min")
        return corners[keep], scores[passed][keep], landmarks[passed][keep]

    def _faces(
        self,
        corners: Corners,
        scores: NDArray[np.float64],
        landmarks: NDArray[np.float64],
        width: int,
        height: int,
    ) -> list[Face]:
        boxes = box_math.corners_to_xywh(box_math.clipped(corners, width, height))
        faces = [
            Face(
                box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                score=float(score),
                landmarks=tuple((float(x), float(y)) for x, y in points),
            )
            for box, score, points in zip(boxes, scores, landmarks, strict=True)
            if max(box[2], box[3]) >= self.config.min_face_size
        ]
        faces.sort(key=lambda face: -face.score)
        return faces[: self.config.max_faces]

    def _run(self, model: Any, batch: NDArray[np.float32]) -> list[NDArray[np.float32]]:
        """One compiled forward pass; R-/O-Net batches are padded so that few shapes occur.

        `predict_on_batch` runs Keras' compiled predict step (a traced function on TensorFlow,
        jit on JAX): about half the CPU of an eager call here, whose per-layer dispatch
        dominates on these small networks.
        """
        count = batch.shape[0]
        if model is not self._networks.pnet:
            padded = -(-count // _BATCH_STEP) * _BATCH_STEP
            if padded != count:
                filler = np.zeros((padded - count, *batch.shape[1:]), dtype=batch.dtype)
                batch = np.concatenate([batch, filler])
        outputs = model.predict_on_batch(batch)
        return [np.asarray(output)[:count] for output in outputs]


def _mosaic(
    image: NDArray[np.uint8], scales: list[float]
) -> tuple[NDArray[np.uint8], list[tuple[int, int, int, int]]]:
    """All pyramid levels packed into one grey canvas, so that P-Net runs once per image.

    Level 0 and level 1 side by side, the rest on shelves below; every level starts at even
    pixels (P-Net's stride) and the canvas is padded to a multiple of `_CANVAS_STEP`, so images
    of similar size share a canvas shape (one compiled P-Net for a compiling backend). About a
    quarter more pixels than the levels themselves, in exchange for one call instead of ~10:
    a call costs milliseconds of framework overhead, most of P-Net's time on small images.
    Returns the canvas and each level's (left, top, width, height) in it.
    """
    height, width = image.shape[:2]
    sizes = [(math.ceil(width * scale), math.ceil(height * scale)) for scale in scales]
    canvas_width = _even(sizes[0][0]) + (sizes[1][0] if len(sizes) > 1 else 0)
    placements = [(0, 0, *sizes[0])]
    if len(sizes) > 1:
        placements.append((_even(sizes[0][0]), 0, *sizes[1]))
    shelf_top, shelf_height, left = _even(sizes[0][1]), 0, 0
    for level_width, level_height in sizes[2:]:
        if left + level_width > canvas_width:
            shelf_top, shelf_height, left = shelf_top + _even(shelf_height), 0, 0
        placements.append((left, shelf_top, level_width, level_height))
        shelf_height = max(shelf_height, level_height)
        left += _even(level_width)
    canvas_height = max(top + level_height for _, top, _, level_height in placements)
    canvas = np.full((_padded(canvas_height), _padded(canvas_width), 3), 128, dtype=np.uint8)
    for (left, top, level_width, level_height), scale in zip(placements, scales, strict=True):
        level = (
            image
            if scale == 1.0
            else cv2.resize(image, (level_width, level_height), interpolation=cv2.INTER_AREA)
        )
        canvas[top : top + level_height, left : left + level_width] = level
    return canvas, placements


def _even(value: int) -> int:
    return value + value % 2


def _padded(value: int) -> int:
    return -(-value // _CANVAS_STEP) * _CANVAS_STEP


def _normalised(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
    return (pixels.astype(np.float32) - np.float32(127.5)) * np.float32(1 / 128)


def _windows(
    offsets: NDArray[np.float32],
    probability: NDArray[np.float32],
    scale: float,
    config: FaceDetectorConfig,
) -> NDArray[np.float64]:
    """P-Net's windows above the threshold on one level: (N, 5) regressed corners and score."""
    rows, columns = np.nonzero(probability > config.proposal_threshold)
    if rows.size == 0:
        return np.empty((0, 5))
    top_left = np.stack([columns, rows], axis=1).astype(np.float64) * _STRIDE
    window = np.concatenate([top_left, top_left + _WINDOW], axis=1)
    corners = (window + offsets[rows, columns].astype(np.float64) * _WINDOW) / scale
    return np.concatenate([corners, probability[rows, columns, None]], axis=1)


def _regressed(corners: Corners, offsets: NDArray[np.float32]) -> Corners:
    """Boxes moved by a stage's offsets (fractions of the box's side, per edge)."""
    sides = corners[:, 2:] - corners[:, :2]
    moved: Corners = corners + offsets.astype(np.float64) * np.concatenate([sides, sides], axis=1)
    return moved


def _patches(image: NDArray[np.uint8], corners: Corners, size: int) -> NDArray[np.float32]:
    """Each box's pixels area-resized to (size, size), black outside the image, normalised."""
    height, width = image.shape[:2]
    patches = np.zeros((len(corners), size, size, 3), dtype=np.uint8)
    for index, (x1, y1, x2, y2) in enumerate(np.rint(corners).astype(np.int64)):
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        left, top, right, bottom = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if right <= left or bottom <= top:
            continue
        region = image[top:bottom, left:right]
        if (left, top, right, bottom) != (x1, y1, x2, y2):
            canvas = np.zeros((y2 - y1, x2 - x1, 3), dtype=np.uint8)
            canvas[top - y1 : bottom - y1, left - x1 : right - x1] = region
            region = canvas
        patches[index] = cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA)
    return _normalised(patches)
