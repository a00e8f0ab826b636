"""A ledger for the review page's tests: a job of real small JPEGs under a folder, labeled by a
three-class whole-image model and a face model, and one image outside the job's root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import update
from sqlalchemy.orm import Session

from core.uris import path_to_uri
from db import repository
from db.models import Result
from db.repository import FaceRow, ImageRow, JobItemRow, ResultRow

VERSION = "review-v1"
FACE_VERSION = "review-faces-v1"
CLASSES = ["happy", "sad", "angry"]


@dataclass(frozen=True)
class ReviewLedger:
    job_id: int
    root: Path
    image_ids: list[int]  # labeled by VERSION, inside the root, in order
    outside_id: int  # labeled by VERSION, its file outside every root
    face_image_id: int  # labeled by FACE_VERSION with two faces


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (96, 72)) -> Path:
    """A small real JPEG: a coloured background with a face-like disc, different per seed."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = np.full((height, width, 3), rng.integers(40, 200, 3), dtype=np.uint8)
    centre = (int(rng.integers(width // 3, 2 * width // 3)), height // 2)
    cv2.circle(image, centre, min(width, height) // 3, (60, 170, 230), thickness=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def scores_for(index: int) -> tuple[str, float, dict[str, float]]:
    """Varied, deterministic class scores: the label is the top one."""
    rng = np.random.default_rng(1000 + index)
    raw = rng.dirichlet([1.0, 1.0, 1.0])
    scores = {name: float(value) for name, value in zip(CLASSES, raw, strict=True)}
    label = max(scores, key=scores.__getitem__)
    return label, scores[label], scores


def build_review_ledger(session: Session, base: Path, count: int) -> ReviewLedger:
    """`count` JPEGs under `base/archive` (the job's root) labeled by VERSION, one JPEG under
    `base/elsewhere` labeled too, and a photo with two faces labeled by FACE_VERSION."""
    root = base / "archive"
    paths = [write_jpeg(root / f"nested/{index:03d}.jpg", index) for index in range(count)]
    outside = write_jpeg(base / "elsewhere" / "secret.jpg", 999)
    photo = write_jpeg(root / "faces.jpg", 500, size=(200, 120))
    uris = [path_to_uri(path) for path in [*paths, outside, photo]]
    ids = repository.upsert_images(
        session=session, rows=[ImageRow(uri=uri, fingerprint="1-1") for uri in uris]
    )
    image_ids = [ids[uri] for uri in uris]
    job_id = repository.create_job(session=session, source=path_to_uri(root), model_version=VERSION)
    repository.add_job_items(
        session=session, job_id=job_id, items=[JobItemRow(i, chunk_index=0) for i in image_ids]
    )
    results = []
    for index, image_id in enumerate(image_ids[:-1]):
        label, confidence, scores = scores_for(index)
        results.append(ResultRow(image_id, VERSION, label, confidence, scores))
    faces = [
        FaceRow(image_ids[-1], FACE_VERSION, index, 20 + 90 * index, 20, 60, 60, 0.99, "sad",
                0.6, {"happy": 0.3, "sad": 0.6, "angry": 0.1})
        for index in range(2)
    ]  # fmt: skip
    repository.record_outcomes(
        session=session, job_id=job_id, results=results, failures=[], faces=faces, chunk_index=0
    )
    return ReviewLedger(job_id, root, image_ids[:count], image_ids[count], image_ids[-1])


def mark_uncertain(session: Session, image_ids: list[int], runner_up: str) -> None:
    """What a calibrated worker stores for a doubtful label (ResultRow has no such fields yet)."""
    session.execute(
        update(Result)
        .where(Result.image_id.in_(image_ids), Result.model_version == VERSION)
        .values(uncertain=True, runner_up=runner_up, runner_up_confidence=0.3)
    )
