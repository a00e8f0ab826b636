"""Synthetic sample data: layout, determinism, formats, decodability, and a class signal."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.sample_data import (
    EXPRESSIONS,
    FaceFeatures,
    SampleSummary,
    draw_face,
    features_for_class,
    generate_sample_data,
)

SIX_CLASSES = ["angry", "fear", "happy", "neutral", "sad", "surprise"]
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by path relative to it."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None, "cv2 could not decode a generated file"
    return image


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = generate_sample_data(tmp_path / "first", ["happy", "sad"], 6, seed=7)
    second = generate_sample_data(tmp_path / "second", ["happy", "sad"], 6, seed=7, workers=1)

    assert read_tree(tmp_path / "first") == read_tree(tmp_path / "second")
    assert dataclasses.replace(first, out=tmp_path) == dataclasses.replace(second, out=tmp_path)


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    generate_sample_data(tmp_path / "seven", ["happy", "sad"], 4, seed=7)
    generate_sample_data(tmp_path / "eight", ["happy", "sad"], 4, seed=8)

    seven = read_tree(tmp_path / "seven")
    eight = read_tree(tmp_path / "eight")
    assert not set(seven.values()) & set(eight.values())


def test_images_do_not_depend_on_the_number_per_class(tmp_path: Path) -> None:
    generate_sample_data(tmp_path / "few", ["happy"], 3, seed=1)
    generate_sample_data(tmp_path / "many", ["happy"], 5, seed=1)

    few, many = read_tree(tmp_path / "few"), read_tree(tmp_path / "many")
    assert few == {name: many[name] for name in few}


@pytest.mark.parametrize(
    "classes",
    [
        ["happy", "sad"],
        SIX_CLASSES,
        ["a", "b", "c", "d"],
        ["Chat noir", "Überrascht", "class-1", "x.y"],
    ],
    ids=["two", "six", "letters", "odd-names"],
)
def test_folder_layout_and_counts(tmp_path: Path, classes: list[str]) -> None:
    summary = generate_sample_data(tmp_path, classes, 3, seed=0, min_size=64, max_size=96)

    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(classes)
    for name in classes:
        files = sorted(path.name for path in (tmp_path / name).iterdir())
        assert [re.sub(r"\.(jpg|png)$", "", file) for file in files] == [
            f"{name}_{index:05d}" for index in range(3)
        ]
    assert isinstance(summary, SampleSummary)
    assert dict(summary.counts) == dict.fromkeys(classes, 3)
    assert list(summary.counts) == classes
    all_files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert summary.total_files == len(all_files) == 3 * len(classes)
    assert summary.jpeg_files + summary.png_files == summary.total_files
    assert summary.total_bytes == sum(path.stat().st_size for path in all_files)


def test_both_formats_with_matching_magic_bytes(tmp_path: Path) -> None:
    summary = generate_sample_data(tmp_path, ["happy", "sad"], 15, seed=3, min_size=64, max_size=96)

    magic_by_extension = {".jpg": JPEG_MAGIC, ".png": PNG_MAGIC}
    extensions = []
    for path in tmp_path.rglob("*.*"):
        assert path.read_bytes().startswith(magic_by_extension[path.suffix]), path
        extensions.append(path.suffix)
    assert extensions.count(".jpg") == summary.jpeg_files > 0
    assert extensions.count(".png") == summary.png_files > 0


@pytest.mark.parametrize(("jpeg_fraction", "suffix"), [(0.0, ".png"), (1.0, ".jpg")])
def test_jpeg_fraction_at_the_extremes(tmp_path: Path, jpeg_fraction: float, suffix: str) -> None:
    generate_sample_data(
        tmp_path, ["happy"], 5, seed=0, min_size=64, max_size=80, jpeg_fraction=jpeg_fraction
    )

    assert {path.suffix for path in tmp_path.rglob("*.*")} == {suffix}


def test_images_decode_as_colour_within_the_size_range(tmp_path: Path) -> None:
    generate_sample_data(tmp_path, SIX_CLASSES, 4, seed=5, min_size=100, max_size=140)

    shapes = []
    for data in read_tree(tmp_path).values():
        image = decode(data)
        assert image.dtype == np.uint8
        assert image.ndim == 3
        assert image.shape[2] == 3
        assert 100 <= image.shape[0] <= 140
        assert 100 <= image.shape[1] <= 140
        assert image.std() > 10, "an image is (nearly) flat"
        shapes.append(image.shape[:2])
    assert any(height != width for height, width in shapes)
    assert len(set(shapes)) > 5


def test_rewriting_overwrites_same_names_and_keeps_other_files(tmp_path: Path) -> None:
    (tmp_path / "happy").mkdir()
    keep = tmp_path / "happy" / "mine.txt"
    keep.write_text("not generated")
    generate_sample_data(tmp_path, ["happy"], 2, seed=0, min_size=64, max_size=80)
    before = read_tree(tmp_path)

    generate_sample_data(tmp_path, ["happy"], 2, seed=0, min_size=64, max_size=80)

    assert read_tree(tmp_path) == before
    assert keep.read_text() == "not generated"
    assert not list(tmp_path.rglob(".*.tmp"))


def test_draw_face_returns_an_rgb_array_of_the_requested_size() -> None:
    image = draw_face(np.random.default_rng(0), EXPRESSIONS["happy"], (120, 200))

    assert image.shape == (120, 200, 3)
    assert image.dtype == np.uint8


def paired_faces(first: FaceFeatures, second: FaceFeatures, seed: int) -> np.ndarray:
    """|first - second| for faces drawn from equal generators: only the expression differs."""
    one = draw_face(np.random.default_rng(seed), first, (192, 192)).astype(np.int16)
    two = draw_face(np.random.default_rng(seed), second, (192, 192)).astype(np.int16)
    difference: np.ndarray = np.abs(one - two)
    return difference


def test_happy_and_sad_differ_only_in_the_face() -> None:
    happy, sad = features_for_class("happy", 0), features_for_class("sad", 1)

    for seed in range(10):
        difference = paired_faces(happy, sad, seed).max(axis=2)
        changed = float(np.mean(difference > 40))
        # The features are a visible part of the picture, and the background did not move.
        assert 0.005 < changed < 0.25, f"seed {seed}: {changed:.3f} of the pixels changed"


def test_every_pair_of_classes_is_drawn_differently() -> None:
    classes = [*SIX_CLASSES, "disgust", "a", "b", "c", "d"]
    features = [features_for_class(name, index) for index, name in enumerate(classes)]

    for (first_name, first), (second_name, second) in itertools.combinations(
        zip(classes, features, strict=True), 2
    ):
        assert first != second, (first_name, second_name)
        changed = [np.mean(paired_faces(first, second, seed).max(axis=2) > 40) for seed in range(3)]
        assert np.mean(changed) > 0.01, (first_name, second_name, changed)


def test_known_expressions_have_their_characteristic_features() -> None:
    happy, sad = features_for_class("happy", 0), features_for_class("sad", 0)
    angry, surprise = features_for_class("angry", 0), features_for_class("surprise", 0)
    fear, neutral = features_for_class("fear", 0), features_for_class("neutral", 0)

    assert happy.mouth_curve > 0.5 > -0.5 > sad.mouth_curve
    assert sad.brow_angle < 0 < angry.brow_angle
    assert surprise.mouth_open > 0.5 and surprise.brow_height > neutral.brow_height
    assert fear.eye_open > neutral.eye_open
    assert features_for_class("Happiness", 3) == happy


def test_unknown_names_get_distinct_expressions_by_position() -> None:
    invented = [features_for_class(f"class {index}", index) for index in range(60)]

    assert len(set(invented)) == 60
    assert not set(invented) & set(EXPRESSIONS.values())
    assert features_for_class("x", 2) == features_for_class("y", 2)


@pytest.mark.parametrize(
    ("classes", "per_class", "message"),
    [
        ([], 3, "empty"),
        (["happy", "happy"], 3, "duplicate"),
        (["happy", "Happy"], 3, "duplicate"),
        (["happy", "a/b"], 3, "folder name"),
        (["..", "sad"], 3, "folder name"),
        (["", "sad"], 3, "non-empty"),
        ([" happy"], 3, "folder name"),
        (["what?"], 3, "folder name"),
        (["happy", "sad"], 0, "per_class"),
        ("happy", 3, "list of class names"),
    ],
)
def test_bad_arguments_raise_value_error(
    tmp_path: Path, classes: list[str], per_class: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        generate_sample_data(tmp_path / "out", classes, per_class, seed=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_size": 200, "max_size": 100}, "min_size"),
        ({"min_size": 16, "max_size": 100}, "min_size"),
        ({"jpeg_fraction": 1.5}, "jpeg_fraction"),
        ({"workers": 0}, "workers"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options_raise_value_error(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"seed": 0, **options}
    with pytest.raises(ValueError, match=message):
        generate_sample_data(tmp_path / "out", ["happy"], 1, **arguments)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
