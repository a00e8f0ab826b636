"""The folder-per-class dataset: its classes, its examples, and a leak-free split of its file list.

    root/
        angry/  a.jpg  b.png  more/c.jpg      one folder per class, nested folders allowed
        happy/  ...

The split is made on the list of files, before any `tf.data` pipeline exists, and it is:
- stratified: every class is split on its own, so each split holds each class in proportion;
- leak-free: files with the same content (sha256) always land in the same split;
- stable: the order inside a class comes from hashing (seed, class name, content), so it does not
  depend on input order, on other classes, or on any library's random number stream. Adding an
  image to one class never moves an image of another class.
The manifest written beside a model records the split, so evaluation uses the very same test files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from core.errors import DataError
from core.reasons import Reason
from training.clean import QUARANTINE_FOLDER_NAME, CleanReport, Finding
from training.metadata import MAX_CLASS_NAME, overlong_class_names

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.7, 0.2, 0.1)
DEFAULT_SEED = 1337  # the same as `TrainSettings.seed`; every split records the seed it used


@dataclass(frozen=True)
class Example:
    """One training image: where it is, its class index and name, and its content hash."""

    path: Path
    label: int
    class_name: str
    sha256: str


@dataclass(frozen=True)
class DatasetSplit:
    """Train, validation and test examples (each sorted by path) and how they were drawn."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    class_names: list[str]
    seed: int
    fractions: tuple[float, float, float]

    def parts(self) -> dict[str, list[Example]]:
        """The three splits by name, in the order train, validation, test."""
        return {"train": self.train, "validation": self.validation, "test": self.test}

    def examples(self) -> list[Example]:
        """All examples of the three splits."""
        return [*self.train, *self.validation, *self.test]


def discover_classes(root: Path) -> list[str]:
    """Class names in label order: the sorted names of the visible folders directly under `root`.

    Raises `DataError` when `root` is not a folder, has fewer than two class folders, or a class
    folder holds no files.
    """
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(
            f"dataset path {root} is not a folder; give the folder that holds one folder per class"
        )
    with os.scandir(root) as entries:
        class_names = sorted(
            entry.name
            for entry in entries
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
        )
    if not class_names:
        raise DataError(
            f"dataset folder {root} has no class folders; put images in one folder per class, "
            f"e.g. {root / 'happy'} and {root / 'sad'}"
        )
    if len(class_names) < 2:
        raise DataError(
            f"found 1 class '{class_names[0]}'; need at least 2 folders, one per class, in {root}"
        )
    too_long = overlong_class_names(class_names)
    if too_long:
        # Refused now, not when the trained model is saved or its first labels are written.
        raise DataError(
            f"class folder name(s) over {MAX_CLASS_NAME} characters in {root}: "
            + ", ".join(f"'{name[:40]}...'" for name in too_long)
        )
    empty = [name for name in class_names if not _has_visible_file(root / name)]
    if empty:
        listed = ", ".join(f"'{name}'" for name in empty)
        raise DataError(
            f"class folder(s) {listed} in {root} hold no files; add images or remove the folder(s)"
        )
    return class_names


def _has_visible_file(folder: Path) -> bool:
    for _, folder_names, file_names in os.walk(folder):
        folder_names[:] = [name for name in folder_names if name != QUARANTINE_FOLDER_NAME]
        if any(not name.startswith(".") for name in file_names):
            return True
    return False


def examples_from_report(
    report: CleanReport, class_names: list[str]
) -> tuple[list[Example], list[Finding]]:
    """Turn a scan's usable files into labelled examples, in sorted path order.

    A file's class is the class folder it sits in, at any depth. Returns the examples and the
    findings for usable files that cannot be examples: `NO_CLASS` for a file outside every class
    folder, `LABEL_CONFLICT` for content also filed under another class (no copy is used; the
    other copies are already in `report.findings` as duplicates, so no path is reported twice).
    Raises `DataError` when fewer than two classes are given or a class has no usable image left.
    """
    if len(class_names) < 2:
        raise DataError(f"need at least 2 classes, got {len(class_names)}: {class_names}")
    labels = {name: index for index, name in enumerate(class_names)}
    copies = _copies_by_content(report)
    examples: list[Example] = []
    findings: list[Finding] = []
    for good in report.good:
        class_name = _class_of(good.path, report.root, labels)
        conflict = _label_conflict(good.path, copies[good.sha256], report.root, labels)
        if conflict is not None:
            findings.append(conflict)
        elif class_name is None:
            findings.append(
                Finding(
                    good.path,
                    Reason.NO_CLASS,
                    "not inside a class folder; move it into one of: " + ", ".join(class_names),
                )
            )
        else:
            examples.append(Example(good.path, labels[class_name], class_name, good.sha256))
    _require_every_class(examples, class_names, report.root)
    return examples, findings


def _copies_by_content(report: CleanReport) -> dict[str, list[Path]]:
    """sha256 -> every path with that content: usable files and the duplicates set aside."""
    sha_by_path = {good.path: good.sha256 for good in report.good}
    copies: dict[str, list[Path]] = defaultdict(list)
    for good in report.good:
        copies[good.sha256].append(good.path)
    for finding in report.findings:
        if finding.reason is Reason.DUPLICATE and finding.duplicate_of in sha_by_path:
            copies[sha_by_path[finding.duplicate_of]].append(finding.path)
    return {digest: sorted(paths) for digest, paths in copies.items()}


def _class_of(path: Path, root: Path, labels: dict[str, int]) -> str | None:
    parts = path.relative_to(root).parts
    if len(parts) >= 2 and parts[0] in labels:
        return parts[0]
    return None


def _label_conflict(
    path: Path, copies: list[Path], root: Path, labels: dict[str, int]
) -> Finding | None:
    """A `LABEL_CONFLICT` finding for `path` when its copies sit in two or more classes."""
    classes = sorted({name for copy in copies if (name := _class_of(copy, root, labels))})
    if len(classes) < 2:
        return None
    others = [copy for copy in copies if copy != path]
    detail = (
        "same content is filed under classes "
        + ", ".join(f"'{name}'" for name in classes)
        + f" (also at {', '.join(copy.relative_to(root).as_posix() for copy in others)}); "
        "keep one copy, in the right class folder"
    )
    return Finding(path, Reason.LABEL_CONFLICT, detail, duplicate_of=others[0])


def _require_every_class(examples: list[Example], class_names: list[str], root: Path) -> None:
    present = {example.class_name for example in examples}
    missing = [name for name in class_names if name not in present]
    if missing:
        listed = ", ".join(f"'{name}'" for name in missing)
        raise DataError(
            f"class(es) {listed} have no usable images after cleaning; add decodable images to "
            f"{', '.join(str(root / name) for name in missing)} or remove the folder(s)"
        )


def split_examples(
    examples: Sequence[Example],
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
) -> DatasetSplit:
    """Split into train, validation and test: seeded, per class, identical content kept together.

    Counts are taken in distinct contents (groups of identical files) per class; each class needs
    at least 3 so that every split gets one. Raises `ValueError` for bad fractions or inconsistent
    examples, `DataError` for a class too small to split or content labelled with two classes.
    """
    _check_fractions(fractions)
    class_names = _class_names_of(examples)
    groups = _group_by_class_and_content(examples)
    parts: dict[str, list[Example]] = {name: [] for name in SPLIT_NAMES}
    for class_name in class_names:
        class_groups = groups[class_name]
        ranked = sorted(class_groups, key=lambda digest: _rank(seed, class_name, digest))
        test_count, validation_count = _split_counts(len(ranked), fractions, class_name)
        bounds = {
            "test": ranked[:test_count],
            "validation": ranked[test_count : test_count + validation_count],
            "train": ranked[test_count + validation_count :],
        }
        for split_name, digests in bounds.items():
            for digest in digests:
                parts[split_name].extend(class_groups[digest])
    for members in parts.values():
        members.sort(key=lambda example: example.path)
    logger.info(
        "split %d examples of %d classes: %s",
        len(examples),
        len(class_names),
        ", ".join(f"{name} {len(members)}" for name, members in parts.items()),
    )
    return DatasetSplit(
        train=parts["train"],
        validation=parts["validation"],
        test=parts["test"],
        class_names=class_names,
        seed=seed,
        fractions=fractions,
    )


def _check_fractions(fractions: Sequence[float]) -> None:
    if (
        len(fractions) != 3
        or any(not math.isfinite(part) or part <= 0 for part in fractions)
        or abs(sum(fractions) - 1.0) > 1e-6
    ):
        raise ValueError(
            f"split fractions must be 3 positive numbers (train, validation, test) summing to 1, "
            f"got {tuple(fractions)}"
        )


def _class_names_of(examples: Sequence[Example]) -> list[str]:
    """Class names in label order, checking that labels and names agree and leave no gap."""
    if not examples:
        raise DataError("no examples to split")
    name_by_label: dict[int, str] = {}
    seen_paths: set[Path] = set()
    for example in examples:
        if name_by_label.setdefault(example.label, example.class_name) != example.class_name:
            raise ValueError(
                f"label {example.label} is used for classes '{name_by_label[example.label]}' "
                f"and '{example.class_name}'"
            )
        if example.path in seen_paths:
            raise ValueError(f"{example.path} is listed twice")
        seen_paths.add(example.path)
    if sorted(name_by_label) != list(range(len(name_by_label))):
        raise ValueError(f"labels must run from 0 without gaps, got {sorted(name_by_label)}")
    if len(set(name_by_label.values())) != len(name_by_label):
        raise ValueError("one class name is used with two labels")
    if len(name_by_label) < 2:
        raise DataError("need at least 2 classes to train a classifier, got 1")
    return [name_by_label[label] for label in range(len(name_by_label))]


def _group_by_class_and_content(
    examples: Iterable[Example],
) -> dict[str, dict[str, list[Example]]]:
    """class name -> sha256 -> its examples (sorted by path); refuses content in two classes."""
    groups: dict[str, dict[str, list[Example]]] = defaultdict(lambda: defaultdict(list))
    class_by_digest: dict[str, str] = {}
    for example in sorted(examples, key=lambda example: example.path):
        other = class_by_digest.setdefault(example.sha256, example.class_name)
        if other != example.class_name:
            raise DataError(
                f"{example.path} has the same content as an image of class '{other}' but is in "
                f"class '{example.class_name}'; keep one copy, in the right class folder"
            )
        groups[example.class_name][example.sha256].append(example)
    return groups


def _rank(seed: int, class_name: str, digest: str) -> str:
    # A hash, not a shuffled RNG stream: the order is independent of input order, of the other
    # classes, and of library versions; a new image only inserts itself at one place.
    return hashlib.sha256(f"{seed}\0{class_name}\0{digest}".encode()).hexdigest()


def _split_counts(
    group_count: int, fractions: tuple[float, float, float], class_name: str
) -> tuple[int, int]:
    """(test, validation) counts for one class: at least one each, and at least one for train."""
    if group_count < 3:
        raise DataError(
            f"class '{class_name}' has only {group_count} distinct image(s); need at least 3 to "
            "put one in each of train, validation and test; add images to that class"
        )
    test_count = max(1, math.floor(group_count * fractions[2] + 0.5))
    validation_count = max(1, math.floor(group_count * fractions[1] + 0.5))
    while group_count - test_count - validation_count < 1:
        if validation_count >= test_count and validation_count > 1:
            validation_count -= 1
        else:
            test_count -= 1
    return test_count, validation_count


def dataset_fingerprint(examples: Iterable[Example]) -> str:
    """sha256 over the sorted (class name, content sha256) pairs: stable under renames and moves."""
    pairs = sorted((example.class_name, example.sha256) for example in examples)
    digest = hashlib.sha256()
    for class_name, content in pairs:
        digest.update(f"{class_name}\t{content}\n".encode())
    return digest.hexdigest()


def write_manifest(split: DatasetSplit, root: Path, path: Path) -> None:
    """Write the split as JSON with paths relative to `root`, atomically (no half-written file)."""
    document: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "root": str(root),
        "seed": split.seed,
        "fractions": list(split.fractions),
        "class_names": split.class_names,
        "fingerprint": dataset_fingerprint(split.examples()),
        "splits": {
            name: [
                {
                    "path": _relative_posix(example.path, root),
                    "label": example.label,
                    "class": example.class_name,
                    "sha256": example.sha256,
                }
                for example in members
            ]
            for name, members in split.parts().items()
        },
    }
    text = json.dumps(document, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def _relative_posix(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not inside the dataset root {root}") from None


def read_manifest(path: Path, root: Path) -> DatasetSplit:
    """Read a split written by `write_manifest`, resolving its relative paths against `root`.

    Raises `DataError` when the file is missing, is not a manifest of a known version, or has been
    edited inconsistently (labels, classes or fingerprint disagree).
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"split manifest {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"split manifest {path} cannot be read: {error}") from None
    try:
        return _split_from_document(document, root)
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"split manifest {path} is not valid: {_describe(error)}") from None


def _describe(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"missing field {error}"
    return str(error)


def _split_from_document(document: Any, root: Path) -> DatasetSplit:
    if not isinstance(document, dict):
        raise TypeError("top level is not an object")
    if document.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"version {document.get('version')!r} is not {MANIFEST_VERSION}, the version read here"
        )
    class_names = [str(name) for name in document["class_names"]]
    fractions = tuple(float(part) for part in document["fractions"])
    _check_fractions(fractions)
    parts = {
        name: [_example_from_entry(entry, root, class_names) for entry in document["splits"][name]]
        for name in SPLIT_NAMES
    }
    split = DatasetSplit(
        train=parts["train"],
        validation=parts["validation"],
        test=parts["test"],
        class_names=class_names,
        seed=int(document["seed"]),
        fractions=(fractions[0], fractions[1], fractions[2]),
    )
    if dataset_fingerprint(split.examples()) != document["fingerprint"]:
        raise ValueError("fingerprint does not match the listed files")
    return split


def _example_from_entry(entry: Any, root: Path, class_names: list[str]) -> Example:
    relative = PurePosixPath(str(entry["path"]))
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"path {str(relative)!r} is not a plain path inside the dataset")
    label = int(entry["label"])
    class_name = str(entry["class"])
    if not 0 <= label < len(class_names) or class_names[label] != class_name:
        raise ValueError(f"{relative}: label {label} does not name class '{class_name}'")
    return Example(root.joinpath(*relative.parts), label, class_name, str(entry["sha256"]))
