"""People's labels as training data: the reviewed images (or faces) written as files, one folder
per class, and split train / validation / holdout the same seeded way every run.

Only a human label is ever used (the latest verdict on an image or face, `db.repository.
human_labels`), never a model's own output. Each one is materialized into a per-run folder

    <folder>/<class>/<image id>.<type>          a whole-image model: the file's own bytes
    <folder>/<class>/<image id>-face<i>.png     a face model: the face cropped as served

so it goes through the same preprocessing as the data folder's images: the image is read with
the worker's limits and checked to decode (`preprocess.load_image`), its bytes are kept as they
are, and training decodes them like any other file; a face is cut with the serving crop
(`faces.labeling.face_crops`, same margin, from the same decode) at the challenger's input size,
and stored losslessly. What cannot be used is counted by reason, never guessed:

    stale           the file changed since the person looked at it
    unknown_class   a label the data folder has no class folder for
    wrong_subject   a face verdict for a whole-image model, or an image verdict (no box) for
                    a face model
    unreadable      the file cannot be read or decoded now (`ImageError`)

The split is drawn per image id from a hash of (seed, image id), not from a shuffled stream: an
item stays in its part from one run to the next as others are added, the faces of one photo stay
together, and the holdout is never trained on.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from core.errors import ImageError
from core.reasons import Reason
from core.settings import FaceSettings, LimitSettings
from db.repository import HumanLabel
from training.dataset import Example
from training.faces import Face
from training.metadata import Subject
from training.preprocess import InputSpec, load_image, read_header

logger = logging.getLogger(__name__)

Part = Literal["train", "validation", "holdout"]
ReadLabel = Callable[[HumanLabel], bytes]


@dataclass(frozen=True)
class ReviewedFile:
    """One human label written as a training file."""

    review_id: int
    image_id: int
    face_index: int | None
    example: Example


@dataclass(frozen=True)
class ReviewedSplit:
    """The reviewed files by part, in `class_names` label order, and what was left out."""

    class_names: list[str]
    train: list[ReviewedFile]
    validation: list[ReviewedFile]
    holdout: list[ReviewedFile]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return len(self.train) + len(self.validation) + len(self.holdout)

    def excluding(self, hashes: set[str]) -> ReviewedSplit:
        """Without train and validation files whose content is in `hashes` (the frozen test
        split's): a reviewed copy of a test image must not be trained on."""

        def kept(files: list[ReviewedFile]) -> list[ReviewedFile]:
            return [item for item in files if item.example.sha256 not in hashes]

        train, validation = kept(self.train), kept(self.validation)
        left_out = len(self.train) + len(self.validation) - len(train) - len(validation)
        skipped = dict(self.skipped)
        if left_out:
            skipped[Reason.FROZEN_TEST_COPY] = skipped.get(Reason.FROZEN_TEST_COPY, 0) + left_out
        return ReviewedSplit(self.class_names, train, validation, self.holdout, skipped)

    def summary(self) -> dict[str, Any]:
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "holdout": len(self.holdout),
            "skipped": dict(sorted(self.skipped.items())),
        }


def part_of(image_id: int, fractions: tuple[float, float, float], seed: int) -> Part:
    """The part an image's reviewed items belong to: a stable draw from (seed, image id)."""
    digest = hashlib.sha256(f"{seed}\0reviewed\0{image_id}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    _, validation, holdout = fractions
    if draw < holdout:
        return "holdout"
    if draw < holdout + validation:
        return "validation"
    return "train"


def split_reviewed(
    files: Sequence[ReviewedFile],
    class_names: Sequence[str],
    fractions: tuple[float, float, float],
    seed: int,
    skipped: dict[str, int] | None = None,
) -> ReviewedSplit:
    """Train, validation and holdout files, each sorted by (image id, face index)."""
    parts: dict[Part, list[ReviewedFile]] = {"train": [], "validation": [], "holdout": []}
    for item in sorted(files, key=lambda item: (item.image_id, item.face_index or -1)):
        parts[part_of(item.image_id, fractions, seed)].append(item)
    return ReviewedSplit(
        list(class_names), parts["train"], parts["validation"], parts["holdout"], skipped or {}
    )


def materialize(
    labels: Iterable[HumanLabel],
    class_names: Sequence[str],
    folder: Path,
    read: ReadLabel,
    *,
    subject: Subject,
    spec: InputSpec,
    faces: FaceSettings,
    limits: LimitSettings,
) -> tuple[list[ReviewedFile], dict[str, int]]:
    """Write each usable human label as a file under `folder/<class>/`; return the files and the
    labels left out, counted by reason (see the module docstring)."""
    labels_by_name = {name: index for index, name in enumerate(class_names)}
    files: list[ReviewedFile] = []
    skipped: Counter[str] = Counter()
    for label in labels:
        reason = _unusable(label, labels_by_name, subject)
        if reason is not None:
            skipped[reason] += 1
            continue
        try:
            data = read(label)
            if label.box is None:
                content, suffix = _whole_image(data, spec, limits)
                name = f"{label.image_id}{suffix}"
            else:
                content = _face_crop(data, label.box, spec, faces, limits)
                name = f"{label.image_id}-face{label.face_index}.png"
        except ImageError as error:
            logger.info("reviewed image %d left out: %s", label.image_id, error)
            skipped[Reason.UNREADABLE] += 1
            continue
        path = folder / label.label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        example = Example(
            path, labels_by_name[label.label], label.label, hashlib.sha256(content).hexdigest()
        )
        files.append(ReviewedFile(label.review_id, label.image_id, label.face_index, example))
    if skipped:
        logger.info(
            "reviewed labels left out: %s",
            ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items())),
        )
    return files, dict(skipped)


def _unusable(label: HumanLabel, labels_by_name: dict[str, int], subject: Subject) -> Reason | None:
    if label.stale:
        return Reason.STALE
    if label.label not in labels_by_name:
        return Reason.UNKNOWN_CLASS
    # A face model learns from face crops only; a whole-image model from whole images only.
    if (subject == "face") != (label.box is not None):
        return Reason.WRONG_SUBJECT
    return None


def _whole_image(data: bytes, spec: InputSpec, limits: LimitSettings) -> tuple[bytes, str]:
    """The file's bytes, once they are known to decode within the limits, and a suffix."""
    load_image(data, spec, limits)
    image_type = read_header(data).image_type
    return data, "." + ("jpg" if image_type == "jpeg" else image_type)


def _face_crop(
    data: bytes,
    box: tuple[int, int, int, int],
    spec: InputSpec,
    faces: FaceSettings,
    limits: LimitSettings,
) -> bytes:
    """The face at `box` (original oriented pixels), cropped as the worker crops it, as PNG."""
    from training.faces.labeling import face_crops
    from training.faces.scene import crop_source, decode_for_faces

    # The decode the worker detected in, and the pixels it would crop from (`crop_source`).
    photo = decode_for_faces(data, faces.detect_side, limits)
    x, y, width, height = box
    face = Face(box=(float(x), float(y), float(width), float(height)), score=1.0)
    side = max(spec.height, spec.width)
    source = crop_source(photo, data, [face], side, faces.margin, limits)
    crop = face_crops(source, [face.box], photo.width, photo.height, spec, faces.margin)[0]
    pixels = crop if crop.shape[2] == 1 else cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)
    encoded, buffer = cv2.imencode(".png", np.ascontiguousarray(pixels))
    if not encoded:  # pragma: no cover - PNG encoding of a valid array does not fail
        raise ValueError("could not encode a face crop as PNG")
    return bytes(buffer)
