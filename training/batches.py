"""Batches of (pixels, labels) for Keras from a list of examples, decoded by `preprocess`.

A `keras.utils.PyDataset` rather than `tf.data`, so the same code feeds any Keras backend and the
only decoder is ours. Decoded images are kept in memory when the whole split fits the configured
budget, so epochs after the first skip decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
from numpy.typing import NDArray

from core.settings import LimitSettings
from training.preprocess import InputSpec, load_image_file


def augment(image: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
    """Mild, label-preserving changes: mirror, small shift/rotation/zoom, light and contrast."""
    height, width = image.shape[:2]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    angle = rng.uniform(-10, 10)
    scale = rng.uniform(0.92, 1.08)
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, scale)
    matrix[:, 2] += rng.uniform(-0.06, 0.06, size=2) * np.array([width, height])
    moved: NDArray[Any] = cv2.warpAffine(
        np.ascontiguousarray(image), matrix, (width, height), borderMode=cv2.BORDER_REFLECT
    )
    if moved.ndim == 2:
        moved = moved[:, :, np.newaxis]
    gain = rng.uniform(0.8, 1.2)
    bias = rng.uniform(-20, 20)
    return np.asarray(np.clip(moved.astype(np.float32) * gain + bias, 0, 255), dtype=np.uint8)


class ImageBatches(keras.utils.PyDataset):  # type: ignore[misc]
    """Shuffled (per epoch, seeded) batches of uint8 images and integer labels."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        spec: InputSpec,
        limits: LimitSettings,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        augmentation: bool = False,
        cache_max_bytes: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.spec = spec
        self.limits = limits
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0
        self.order = np.arange(len(self.paths))
        image_bytes = int(np.prod(spec.shape))
        self.cache: NDArray[np.uint8] | None = None
        if len(self.paths) * image_bytes <= cache_max_bytes:
            self.cache = np.stack([load_image_file(path, spec, limits) for path in self.paths])
        self._reorder()

    def _reorder(self) -> None:
        if self.shuffle:
            self.order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.paths))

    def __len__(self) -> int:
        return (len(self.paths) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, index: int) -> tuple[NDArray[np.uint8], NDArray[np.int32]]:
        selected = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        if self.cache is not None:
            images = self.cache[selected]
        else:
            images = np.stack(
                [load_image_file(self.paths[i], self.spec, self.limits) for i in selected]
            )
        if self.augmentation:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            images = np.stack([augment(image, rng) for image in images])
        return images, self.labels[selected]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._reorder()
