"""Label churn: which labels a new model would change, from which class to which.

Pure and free of Keras, so the command line (`models diff`) and the retraining run build the
same table. A missing label (a face model's photo without a face) is counted as `no_face`, so a
model that starts or stops finding faces shows up as churn too.

    {"sample": 500, "changed": 12, "rate": 0.024,
     "table": {"happy": {"happy": 300, "sad": 10}, "sad": {"happy": 2, "sad": 188}},
     "changed_images": [17, 42, ...], "left_out": 0}

`table[a][b]` counts the images labeled `a` before (the champion, or version A) and `b` after;
the diagonal is what stays.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

NO_LABEL = "no_face"

LabelPair = tuple[str | None, str | None]


@dataclass(frozen=True)
class Churn:
    """How the labels of `sample` images move from one model to another."""

    sample: int
    changed: int
    table: dict[str, dict[str, int]]
    changed_images: list[int] = field(default_factory=list)
    # Images of the sample that could not be labeled by one of the models (unreadable now).
    left_out: int = 0

    @property
    def rate(self) -> float:
        """The share of the sample whose label changes (0 for an empty sample)."""
        return self.changed / self.sample if self.sample else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "sample": self.sample,
            "changed": self.changed,
            "rate": self.rate,
            "table": self.table,
            "changed_images": self.changed_images,
            "left_out": self.left_out,
        }


def _name(label: str | None) -> str:
    return NO_LABEL if label is None else label


def churn_from_counts(counts: Mapping[LabelPair, int]) -> Churn:
    """The churn of `(label before, label after) -> images` counts (no image ids)."""
    table: dict[str, dict[str, int]] = defaultdict(dict)
    sample = changed = 0
    for (before, after), count in sorted(
        counts.items(), key=lambda item: (_name(item[0][0]), _name(item[0][1]))
    ):
        if count <= 0:
            continue
        row = table[_name(before)]
        row[_name(after)] = row.get(_name(after), 0) + count
        sample += count
        if _name(before) != _name(after):
            changed += count
    return Churn(sample, changed, dict(table))


def churn_from_labels(labels: Iterable[tuple[int, str | None, str | None]]) -> Churn:
    """The churn of `(image id, label before, label after)` rows, with the changed image ids."""
    counts: dict[LabelPair, int] = defaultdict(int)
    changed_images = []
    for image_id, before, after in labels:
        counts[(before, after)] += 1
        if _name(before) != _name(after):
            changed_images.append(image_id)
    churn = churn_from_counts(counts)
    return Churn(churn.sample, churn.changed, churn.table, sorted(changed_images))


def sample_ids(image_ids: Sequence[int], size: int, seed: int) -> list[int]:
    """A seeded sample of at most `size` ids, sorted: the same ids and seed give the same
    sample whatever order the ids came in."""
    pool = sorted(set(image_ids))
    if size <= 0:
        return []
    if size >= len(pool):
        return pool
    return sorted(random.Random(seed).sample(pool, size))
