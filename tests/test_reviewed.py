"""People's labels as training data, and label churn: the pure parts, on real files.

The split of reviewed items is stable (the same item lands in the same part whatever else is
reviewed) and disjoint; materializing writes whole images and face crops (cut as served) into
class folders and leaves out stale, unknown-class, wrong-subject and unreadable labels; the
churn table counts label moves; the gate holds a promotion over the churn limit.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.errors import ImageError
from core.reasons import Reason
from core.settings import FaceSettings, LimitSettings
from db.repository import HumanLabel
from training.churn import Churn, churn_from_counts, churn_from_labels, sample_ids
from training.dataset import Example
from training.faces.labeling import face_crops
from training.gate import Decision, hold_for_churn
from training.preprocess import InputSpec
from training.reviewed import ReviewedFile, materialize, part_of, split_reviewed

FRACTIONS = (0.7, 0.2, 0.1)
CLASSES = ["happy", "sad"]
SPEC = InputSpec(32, 32, "rgb")


def human_label(
    image_id: int,
    label: str,
    *,
    box: tuple[int, int, int, int] | None = None,
    stale: bool = False,
) -> HumanLabel:
    return HumanLabel(
        review_id=image_id * 10,
        image_id=image_id,
        uri=f"file:///archive/{image_id}.png",
        face_index=None if box is None else 0,
        box=box,
        model_version="v1",
        old_label="happy",
        label=label,
        reviewer="ann",
        reviewed_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        fingerprint="1-1",
        current_fingerprint="2-2" if stale else "1-1",
    )


def reviewed_file(
    image_id: int, class_name: str = "happy", face: int | None = None
) -> ReviewedFile:
    example = Example(Path(f"/r/{class_name}/{image_id}.png"), 0, class_name, f"sha{image_id}")
    return ReviewedFile(image_id, image_id, face, example)


def test_the_split_of_reviewed_items_is_stable_and_disjoint() -> None:
    files = [reviewed_file(image_id) for image_id in range(1, 401)]
    split = split_reviewed(files, CLASSES, FRACTIONS, seed=7)
    parts = {
        name: {item.image_id for item in members}
        for name, members in {
            "train": split.train, "validation": split.validation, "holdout": split.holdout
        }.items()
    }  # fmt: skip
    assert set().union(*parts.values()) == set(range(1, 401))
    assert sum(len(ids) for ids in parts.values()) == 400  # disjoint
    assert 0.6 < len(parts["train"]) / 400 < 0.8
    assert 0.05 < len(parts["holdout"]) / 400 < 0.15
    # Stable: input order, other items and a rerun do not move an item.
    again = split_reviewed(list(reversed(files[:150])), CLASSES, FRACTIONS, seed=7)
    for item in again.holdout:
        assert item.image_id in parts["holdout"]
    for item in again.train:
        assert item.image_id in parts["train"]
    assert all(part_of(image_id, FRACTIONS, 7) == part_of(image_id, FRACTIONS, 7)
               for image_id in range(50))  # fmt: skip
    # The faces of one photo stay together.
    faces = split_reviewed(
        [reviewed_file(5, face=0), reviewed_file(5, face=1)], CLASSES, FRACTIONS, seed=7
    )
    assert max(len(faces.train), len(faces.validation), len(faces.holdout)) == 2
    # Another seed draws another split.
    other = split_reviewed(files, CLASSES, FRACTIONS, seed=8)
    assert {item.image_id for item in other.holdout} != parts["holdout"]


def test_materialize_writes_images_and_face_crops_into_class_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    photo = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".png", photo)
    assert ok
    stored = {1: bytes(encoded), 2: bytes(encoded), 3: bytes(encoded), 4: bytes(encoded),
              5: b"not an image at all", 6: bytes(encoded)}  # fmt: skip

    def read(label: HumanLabel) -> bytes:
        return stored[label.image_id]

    labels = [
        human_label(1, "sad"),
        human_label(2, "happy", stale=True),
        human_label(3, "angry"),  # not a class of the data
        human_label(4, "sad", box=(40, 30, 60, 60)),  # a face verdict: not for an image model
        human_label(5, "happy"),
        human_label(6, "happy"),
    ]
    files, skipped = materialize(
        labels, CLASSES, tmp_path / "image", read, subject="image", spec=SPEC,
        faces=FaceSettings(), limits=LimitSettings(),
    )  # fmt: skip
    assert skipped == {"stale": 1, "unknown_class": 1, "wrong_subject": 1, "unreadable": 1}
    assert [(item.image_id, item.example.class_name, item.example.label) for item in files] == [
        (1, "sad", 1),
        (6, "happy", 0),
    ]
    assert files[0].example.path == tmp_path / "image" / "sad" / "1.png"
    assert files[0].example.path.read_bytes() == stored[1]  # the file itself, preprocessed later

    # A face model: the face cut with the serving crop (margin included), at the model's size.
    faces = FaceSettings(margin=0.2)
    face_files, face_skipped = materialize(
        [human_label(4, "sad", box=(40, 30, 60, 60)), human_label(1, "sad")],
        CLASSES, tmp_path / "face", read, subject="face", spec=SPEC, faces=faces,
        limits=LimitSettings(),
    )  # fmt: skip
    assert face_skipped == {"wrong_subject": 1}
    (crop_file,) = face_files
    assert crop_file.example.path == tmp_path / "face" / "sad" / "4-face0.png"
    written = cv2.cvtColor(cv2.imread(str(crop_file.example.path)), cv2.COLOR_BGR2RGB)
    rgb = np.ascontiguousarray(photo[:, :, ::-1])
    served = face_crops(rgb, [(40.0, 30.0, 60.0, 60.0)], 200, 160, SPEC, 0.2)[0]
    assert written.shape == (32, 32, 3)
    np.testing.assert_array_equal(written, served)


def test_a_read_refusal_is_an_unreadable_label(tmp_path: Path) -> None:
    def refuse(label: HumanLabel) -> bytes:
        raise ImageError(Reason.OUTSIDE_ROOT, "outside the roots")

    files, skipped = materialize(
        [human_label(1, "sad")], CLASSES, tmp_path, refuse, subject="image", spec=SPEC,
        faces=FaceSettings(), limits=LimitSettings(),
    )  # fmt: skip
    assert files == [] and skipped == {"unreadable": 1}


def test_excluding_frozen_copies_keeps_them_out_of_training_only() -> None:
    files = [reviewed_file(image_id) for image_id in range(1, 60)]
    split = split_reviewed(files, CLASSES, FRACTIONS, seed=1)
    hashes = {item.example.sha256 for item in [split.train[0], split.holdout[0]]}
    used = split.excluding(hashes)
    assert split.train[0] not in used.train
    assert used.holdout == split.holdout
    assert used.skipped == {"frozen_test_copy": 1}
    assert used.used == split.used - 1


def test_churn_counts_moves_from_class_to_class() -> None:
    churn = churn_from_labels(
        [(1, "happy", "happy"), (2, "happy", "sad"), (3, "sad", "sad"), (4, None, "sad"),
         (5, "sad", None), (6, "happy", "sad")]
    )  # fmt: skip
    assert churn.sample == 6
    assert churn.changed == 4
    assert churn.rate == pytest.approx(4 / 6)
    assert churn.table == {
        "happy": {"happy": 1, "sad": 2},
        "no_face": {"sad": 1},
        "sad": {"no_face": 1, "sad": 1},
    }
    assert churn.changed_images == [2, 4, 5, 6]
    counted = churn_from_counts({("happy", "happy"): 1, ("happy", "sad"): 2, ("sad", "sad"): 1,
                                 (None, "sad"): 1, ("sad", None): 1})  # fmt: skip
    assert (counted.sample, counted.changed, counted.table) == (6, 4, churn.table)
    assert churn_from_counts({}).rate == 0.0
    assert churn.to_json()["rate"] == pytest.approx(4 / 6)


def test_the_churn_sample_is_seeded_and_order_free() -> None:
    ids = list(range(1000))
    first = sample_ids(ids, 50, seed=3)
    assert first == sample_ids(list(reversed(ids)), 50, seed=3)
    assert len(set(first)) == 50 and first == sorted(first)
    assert first != sample_ids(ids, 50, seed=4)
    assert sample_ids(ids[:10], 50, seed=3) == ids[:10]
    assert sample_ids(ids, 0, seed=3) == []


def test_a_promotion_over_the_churn_limit_is_held() -> None:
    churn = Churn(sample=200, changed=30, table={})
    better = Decision(True, "macro_f1 0.9 beats the champion's 0.8")
    held = hold_for_churn(better, churn, max_churn=0.1, challenger_version="v2")
    assert (held.promote, held.held) == (False, True)
    assert "30 of 200" in held.reason and "15.0%" in held.reason and "10.0%" in held.reason
    assert "emolabel models promote v2" in held.reason
    assert better.reason in held.reason
    assert hold_for_churn(better, churn, max_churn=0.15, challenger_version="v2") == better
    assert hold_for_churn(better, None, max_churn=0.0, challenger_version="v2") == better
    worse = Decision(False, "does not beat")
    assert hold_for_churn(worse, churn, max_churn=0.0, challenger_version="v2") == worse
