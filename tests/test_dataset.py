"""Classes, examples and the leak-free split of the file list, on real folders and files."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from core.errors import DataError
from core.reasons import Reason
from core.settings import LimitSettings
from training.clean import scan_dataset
from training.dataset import (
    DatasetSplit,
    Example,
    dataset_fingerprint,
    discover_classes,
    examples_from_report,
    read_manifest,
    split_examples,
    write_manifest,
)


def limit_settings(**overrides: int) -> LimitSettings:
    # model_validate, not LimitSettings(): without pydantic's mypy plugin, mypy reads the
    # positional defaults in `Field(default, ...)` as required arguments.
    return LimitSettings.model_validate(overrides)


LIMITS = limit_settings()

Edit = Callable[[dict[str, Any]], object]


def png(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".png", pixels)
    assert ok
    return encoded.tobytes()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def synthetic(counts: dict[str, int], root: Path = Path("/data")) -> list[Example]:
    """Examples without files: the split only looks at the list."""
    examples = []
    for label, (class_name, count) in enumerate(counts.items()):
        for index in range(count):
            digest = hashlib.sha256(f"{class_name}/{index}".encode()).hexdigest()
            examples.append(
                Example(root / class_name / f"{index:04d}.jpg", label, class_name, digest)
            )
    return examples


def split_of(split: DatasetSplit) -> dict[Path, str]:
    return {example.path: name for name, members in split.parts().items() for example in members}


# discover_classes


def test_classes_are_sorted_visible_folders(tmp_path: Path) -> None:
    for name in ("sad", "angry", "happy"):
        write(tmp_path / name / "a.png", png(0))
    write(tmp_path / ".thumbnails" / "a.png", png(0))
    write(tmp_path / "loose.png", png(0))
    assert discover_classes(tmp_path) == ["angry", "happy", "sad"]


def test_class_with_only_nested_files_counts(tmp_path: Path) -> None:
    write(tmp_path / "happy" / "2024" / "a.png", png(0))
    write(tmp_path / "sad" / "a.png", png(1))
    assert discover_classes(tmp_path) == ["happy", "sad"]


def test_a_class_folder_name_too_long_for_a_label_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "happy" / "a.png", png(0))
    write(tmp_path / ("s" * 129) / "a.png", png(1))
    with pytest.raises(DataError, match="over 128 characters"):
        discover_classes(tmp_path)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        discover_classes(tmp_path / "nope")


def test_root_is_a_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        discover_classes(write(tmp_path / "data.zip", b"zip"))


def test_no_class_folders(tmp_path: Path) -> None:
    write(tmp_path / "a.png", png(0))
    with pytest.raises(DataError, match="no class folders"):
        discover_classes(tmp_path)


def test_one_class(tmp_path: Path) -> None:
    write(tmp_path / "happy" / "a.png", png(0))
    with pytest.raises(
        DataError, match="found 1 class 'happy'; need at least 2 folders, one per class"
    ):
        discover_classes(tmp_path)


def test_empty_class_folder(tmp_path: Path) -> None:
    write(tmp_path / "happy" / "a.png", png(0))
    write(tmp_path / "sad" / ".DS_Store", b"junk")
    (tmp_path / "angry" / "empty_subfolder").mkdir(parents=True)
    with pytest.raises(DataError, match=r"'angry', 'sad' in .* hold no files"):
        discover_classes(tmp_path)


# examples_from_report


def test_examples_labels_follow_class_order(tmp_path: Path) -> None:
    write(tmp_path / "happy" / "a.png", png(1))
    write(tmp_path / "happy" / "nested" / "b.png", png(2))
    write(tmp_path / "sad" / "c.png", png(3))
    classes = discover_classes(tmp_path)
    examples, findings = examples_from_report(scan_dataset(tmp_path, LIMITS), classes)
    assert findings == []
    assert [(e.path.relative_to(tmp_path).as_posix(), e.label, e.class_name) for e in examples] == [
        ("happy/a.png", 0, "happy"),
        ("happy/nested/b.png", 0, "happy"),
        ("sad/c.png", 1, "sad"),
    ]
    assert all(len(e.sha256) == 64 for e in examples)


def test_file_outside_class_folders_is_a_finding(tmp_path: Path) -> None:
    write(tmp_path / "happy" / "a.png", png(1))
    write(tmp_path / "sad" / "b.png", png(2))
    loose = write(tmp_path / "loose.png", png(3))
    examples, findings = examples_from_report(scan_dataset(tmp_path, LIMITS), ["happy", "sad"])
    assert len(examples) == 2
    assert [(f.path, f.reason) for f in findings] == [(loose, Reason.NO_CLASS)]
    assert "happy, sad" in findings[0].detail


def test_same_content_in_two_classes_is_used_nowhere(tmp_path: Path) -> None:
    both = png(9)
    happy_copy = write(tmp_path / "happy" / "x.png", both)
    sad_copy = write(tmp_path / "sad" / "y.png", both)
    write(tmp_path / "happy" / "a.png", png(1))
    write(tmp_path / "sad" / "b.png", png(2))
    report = scan_dataset(tmp_path, LIMITS)

    examples, findings = examples_from_report(report, ["happy", "sad"])

    assert sorted(e.path.name for e in examples) == ["a.png", "b.png"]
    assert [(f.path, f.reason, f.duplicate_of) for f in findings] == [
        (happy_copy, Reason.LABEL_CONFLICT, sad_copy)
    ]
    assert "'happy', 'sad'" in findings[0].detail
    # The other copy was already set aside by the scan; every file is reported exactly once.
    assert [(f.path, f.reason) for f in report.findings] == [(sad_copy, Reason.DUPLICATE)]
    reported = [f.path for f in [*report.findings, *findings]]
    assert len(reported) == len(set(reported))
    assert report.scanned == len(examples) + len(reported)


def test_duplicates_within_one_class_are_fine(tmp_path: Path) -> None:
    write(tmp_path / "happy" / "a.png", png(1))
    write(tmp_path / "happy" / "a_copy.png", png(1))
    write(tmp_path / "sad" / "b.png", png(2))
    examples, findings = examples_from_report(scan_dataset(tmp_path, LIMITS), ["happy", "sad"])
    assert [e.path.name for e in examples] == ["a.png", "b.png"]
    assert findings == []


def test_class_without_usable_images_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "happy" / "a.png", png(1))
    write(tmp_path / "sad" / "broken.jpg", b"not an image")
    report = scan_dataset(tmp_path, LIMITS)
    with pytest.raises(DataError, match="'sad' have no usable images"):
        examples_from_report(report, discover_classes(tmp_path))


def test_fewer_than_two_classes_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "happy" / "a.png", png(1))
    with pytest.raises(DataError, match="at least 2 classes"):
        examples_from_report(scan_dataset(tmp_path, LIMITS), ["happy"])


# split_examples


def test_fractions_are_honoured_for_100_per_class() -> None:
    examples = synthetic({"angry": 100, "happy": 100, "sad": 100})
    split = split_examples(examples, (0.7, 0.2, 0.1), seed=1)
    for name, expected in (("train", 70), ("validation", 20), ("test", 10)):
        counts = Counter(e.class_name for e in split.parts()[name])
        assert counts == {"angry": expected, "happy": expected, "sad": expected}
    assert split.class_names == ["angry", "happy", "sad"]
    assert (split.seed, split.fractions) == (1, (0.7, 0.2, 0.1))


def test_every_example_lands_in_exactly_one_split() -> None:
    examples = synthetic({"happy": 37, "sad": 11})
    split = split_examples(examples, seed=5)
    assert sorted(e.path for e in split.examples()) == sorted(e.path for e in examples)


def test_small_classes_still_get_validation_and_test() -> None:
    split = split_examples(synthetic({"happy": 3, "sad": 4, "angry": 5}), seed=2)
    for members in split.parts().values():
        assert set(Counter(e.class_name for e in members)) == {"happy", "sad", "angry"}


def test_class_too_small_to_split() -> None:
    with pytest.raises(DataError, match="class 'sad' has only 2 distinct image"):
        split_examples(synthetic({"happy": 10, "sad": 2}), seed=0)


def test_copies_count_once_toward_the_minimum() -> None:
    examples = synthetic({"happy": 10, "sad": 2})
    sad = examples[-1]
    copy = Example(sad.path.with_name("copy.jpg"), sad.label, sad.class_name, sad.sha256)
    with pytest.raises(DataError, match="'sad' has only 2 distinct"):
        split_examples([*examples, copy], seed=0)


def test_same_seed_same_split_whatever_the_input_order() -> None:
    examples = synthetic({"happy": 40, "sad": 25})
    shuffled = list(examples)
    random.Random(4).shuffle(shuffled)
    assert split_examples(examples, seed=3) == split_examples(shuffled, seed=3)


def test_another_seed_another_split() -> None:
    examples = synthetic({"happy": 40, "sad": 25})
    assert split_of(split_examples(examples, seed=3)) != split_of(split_examples(examples, seed=4))


def test_seed_can_be_given_positionally() -> None:
    examples = synthetic({"happy": 10, "sad": 10})
    assert split_examples(examples, (0.6, 0.2, 0.2), 8) == split_examples(
        examples, fractions=(0.6, 0.2, 0.2), seed=8
    )


def test_adding_to_one_class_leaves_the_other_alone() -> None:
    before = split_of(split_examples(synthetic({"happy": 30, "sad": 30}), seed=9))
    after = split_of(split_examples(synthetic({"happy": 31, "sad": 30}), seed=9))
    sad_before = {path: name for path, name in before.items() if path.parent.name == "sad"}
    sad_after = {path: name for path, name in after.items() if path.parent.name == "sad"}
    assert sad_before == sad_after


def test_identical_content_never_straddles_splits() -> None:
    examples = synthetic({"happy": 30, "sad": 30})
    copies = [
        Example(e.path.with_name(f"copy_{e.path.name}"), e.label, e.class_name, e.sha256)
        for e in examples[::3]
    ]
    split = split_examples([*examples, *copies], seed=11)
    sides: dict[str, set[str]] = {}
    for name, members in split.parts().items():
        for example in members:
            sides.setdefault(example.sha256, set()).add(name)
    assert all(len(names) == 1 for names in sides.values())


def test_content_labelled_twice_is_refused() -> None:
    examples = synthetic({"happy": 5, "sad": 5})
    clash = Example(Path("/data/sad/clash.jpg"), 1, "sad", examples[0].sha256)
    with pytest.raises(DataError, match="same content as an image of class 'happy'"):
        split_examples([*examples, clash], seed=0)


@pytest.mark.parametrize(
    "fractions", [(0.5, 0.5, 0.0), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1), (float("nan"), 0.5, 0.5)]
)
def test_bad_fractions(fractions: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_examples(synthetic({"happy": 10, "sad": 10}), fractions, seed=0)


def test_inconsistent_labels_are_refused() -> None:
    examples = synthetic({"happy": 5, "sad": 5})
    wrong = Example(Path("/data/sad/odd.jpg"), 0, "sad", "f" * 64)
    with pytest.raises(ValueError, match="label 0"):
        split_examples([*examples, wrong], seed=0)


def test_real_folder_split_has_no_leak(tmp_path: Path) -> None:
    for index in range(12):
        write(tmp_path / "happy" / f"{index}.png", png(index))
        write(tmp_path / "sad" / f"{index}.png", png(100 + index))
    write(tmp_path / "happy" / "again.png", png(0))
    report = scan_dataset(tmp_path, LIMITS)
    examples, _ = examples_from_report(report, discover_classes(tmp_path))
    split = split_examples(examples, seed=1)
    digests = [{e.sha256 for e in members} for members in split.parts().values()]
    assert not (digests[0] & digests[1] or digests[0] & digests[2] or digests[1] & digests[2])


# fingerprint and manifest


def test_fingerprint_ignores_paths_and_order_but_not_content() -> None:
    examples = synthetic({"happy": 5, "sad": 5})
    moved = [
        Example(Path("/elsewhere") / e.path.name, e.label, e.class_name, e.sha256) for e in examples
    ]
    assert dataset_fingerprint(examples) == dataset_fingerprint(reversed(moved))
    changed = [*examples[:-1], Example(examples[-1].path, 1, "sad", "0" * 64)]
    assert dataset_fingerprint(examples) != dataset_fingerprint(changed)
    relabelled = [Example(e.path, 0, "happy", e.sha256) for e in examples]
    assert dataset_fingerprint(examples) != dataset_fingerprint(relabelled)


def test_manifest_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "data"
    split = split_examples(synthetic({"happy": 12, "sad": 9}, root=root), (0.6, 0.2, 0.2), seed=21)
    manifest = tmp_path / "run" / "split_manifest.json"

    write_manifest(split, root, manifest)

    assert read_manifest(manifest, root) == split
    document = json.loads(manifest.read_text())
    assert document["version"] == 1
    assert document["seed"] == 21
    assert document["fractions"] == [0.6, 0.2, 0.2]
    assert document["class_names"] == ["happy", "sad"]
    assert document["fingerprint"] == dataset_fingerprint(split.examples())
    first = document["splits"]["train"][0]
    assert set(first) == {"path", "label", "class", "sha256"}
    assert not first["path"].startswith("/")
    assert [p.name for p in manifest.parent.iterdir()] == ["split_manifest.json"]


def test_manifest_follows_a_moved_dataset(tmp_path: Path) -> None:
    split = split_examples(synthetic({"happy": 5, "sad": 5}, root=tmp_path / "old"), seed=1)
    write_manifest(split, tmp_path / "old", tmp_path / "manifest.json")
    moved = read_manifest(tmp_path / "manifest.json", tmp_path / "new")
    assert all(e.path.is_relative_to(tmp_path / "new") for e in moved.examples())
    assert dataset_fingerprint(moved.examples()) == dataset_fingerprint(split.examples())


def test_manifest_refuses_examples_outside_root(tmp_path: Path) -> None:
    split = split_examples(synthetic({"happy": 5, "sad": 5}, root=tmp_path / "a"), seed=1)
    with pytest.raises(ValueError, match="not inside the dataset root"):
        write_manifest(split, tmp_path / "b", tmp_path / "m.json")


def edited_manifest(tmp_path: Path, edit: Edit) -> Path:
    root = tmp_path / "data"
    manifest = tmp_path / "m.json"
    write_manifest(
        split_examples(synthetic({"happy": 5, "sad": 5}, root=root), seed=1), root, manifest
    )
    document = json.loads(manifest.read_text())
    edit(document)
    manifest.write_text(json.dumps(document))
    return manifest


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=99), "version 99"),
        (lambda d: d.pop("splits"), "missing field 'splits'"),
        (lambda d: d["splits"]["test"][0].update(path="../../etc/passwd"), "not a plain path"),
        (lambda d: d["splits"]["test"][0].update(label=1, **{"class": "happy"}), "label 1"),
        (lambda d: d["splits"]["train"].pop(), "fingerprint"),
        (lambda d: d.update(fractions=[0.5, 0.5, 0.5]), "fractions"),
    ],
)
def test_manifest_refuses_edits(tmp_path: Path, edit: Edit, message: str) -> None:
    with pytest.raises(DataError, match=message):
        read_manifest(edited_manifest(tmp_path, edit), tmp_path / "data")


def test_manifest_missing_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "none.json", tmp_path)
    with pytest.raises(DataError, match="cannot be read"):
        read_manifest(write(tmp_path / "bad.json", b"{not json"), tmp_path)
    with pytest.raises(DataError, match="not valid"):
        read_manifest(write(tmp_path / "list.json", b"[]"), tmp_path)


def test_clean_and_dataset_do_not_load_tensorflow() -> None:
    # A fresh interpreter: this test session may already have TensorFlow loaded for other tests.
    code = (
        "import sys, training.clean, training.dataset; "
        "sys.exit(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules) != [])"
    )
    repository = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=repository, check=False, timeout=60)
    assert result.returncode == 0
