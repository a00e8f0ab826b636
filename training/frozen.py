"""The frozen test split: fixed once, stored, and used to compare every challenger and champion.

The first retraining copies its test images into `<models_dir>/<name>/frozen_test/` with their
labels as they were then. Later challengers never train on those images (matched by content
hash), and champion and challenger are scored on exactly these files, whatever happens to the
training folder since (new images, moved or relabelled ones).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import DataError
from training.dataset import DatasetSplit, Example

MANIFEST = "frozen_test.json"


@dataclass(frozen=True)
class FrozenItem:
    """One frozen test image: its stored copy, its label when frozen, and its content hash."""

    path: Path
    class_name: str
    sha256: str


@dataclass(frozen=True)
class FrozenTest:
    directory: Path
    class_names: list[str]
    items: list[FrozenItem]

    @property
    def hashes(self) -> set[str]:
        return {item.sha256 for item in self.items}

    def examples(self, class_names: Sequence[str]) -> list[Example]:
        """The frozen images as examples labelled in `class_names` order."""
        unknown = sorted({item.class_name for item in self.items} - set(class_names))
        if unknown:
            raise DataError(
                f"the frozen test split has classes the data no longer has: {', '.join(unknown)}"
            )
        return [
            Example(
                item.path, list(class_names).index(item.class_name), item.class_name, item.sha256
            )
            for item in self.items
        ]


def load_frozen(directory: Path) -> FrozenTest | None:
    """The frozen split stored in `directory`, or None when none was frozen yet."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None
    try:
        document = json.loads(manifest.read_text())
        items = [
            FrozenItem(directory / row["file"], row["class_name"], row["sha256"])
            for row in document["items"]
        ]
        return FrozenTest(directory, list(document["class_names"]), items)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{manifest}: unreadable frozen test split ({error})") from None


def freeze(directory: Path, test: Sequence[Example], class_names: Sequence[str]) -> FrozenTest:
    """Copy `test` into `directory` once and record it; refuses to overwrite an existing one."""
    if (directory / MANIFEST).exists():
        raise DataError(f"{directory} already holds a frozen test split")
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rows = []
    for example in test:
        name = f"{example.sha256[:16]}{example.path.suffix.lower()}"
        shutil.copy2(example.path, staging / name)
        rows.append(
            {
                "file": name,
                "class_name": example.class_name,
                "sha256": example.sha256,
                "source": str(example.path),
            }
        )
    (staging / MANIFEST).write_text(
        json.dumps({"class_names": list(class_names), "items": rows}, indent=2) + "\n"
    )
    staging.rename(directory)
    frozen = load_frozen(directory)
    if frozen is None:  # pragma: no cover - written just above
        raise DataError(f"{directory}: frozen test split vanished")
    return frozen


def apply_frozen(split: DatasetSplit, frozen: FrozenTest) -> DatasetSplit:
    """Train on everything but the frozen images (the old test part joins training) and test on
    the frozen images only."""
    excluded = frozen.hashes
    return DatasetSplit(
        train=[e for e in [*split.train, *split.test] if e.sha256 not in excluded],
        validation=[e for e in split.validation if e.sha256 not in excluded],
        test=frozen.examples(split.class_names),
        class_names=split.class_names,
        seed=split.seed,
        fractions=split.fractions,
    )
