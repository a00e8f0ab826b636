"""Which labels a person should look at first: `uncertain` ones, then the likeliest mistakes.

The likeliest mistakes are found from the stored class scores alone, in the manner of confident
learning (Northcutt et al., "Confident Learning", 2021; cleanlab's `find_label_issues`), without
taking that dependency:

- Each class c has a threshold t_c: the mean self-confidence (the score of the predicted class)
  of the rows predicted as c, over the whole job (`db.repository.review_facets`). A
  model's confidence differs from class to class; comparing a row with its own class's typical
  confidence is what makes the ranking fair across classes.
- A row is *suspect* when another class j scores at least t_j: confident learning would count it
  off the diagonal of the confident joint, i.e. as probably belonging to j.
- Rows are ordered: uncertain first, then suspects, then the rest; within each group by the
  self-confidence minus its class threshold (lowest first: the least typical of its class), then
  by the margin between the top two scores (smallest first: the closest call).

The ranking is a pure function of the rows and thresholds, so a test can check it on numbers. It
is the reference: the page runs the same key in SQL (`db.repository.ranked_review_items`), and a
test holds the two to the same order, page by page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar


class Scored(Protocol):
    """What the ranking needs of a row."""

    @property
    def model_version(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def scores(self) -> Mapping[str, float]: ...
    @property
    def uncertain(self) -> bool: ...


RowT = TypeVar("RowT", bound=Scored)

Thresholds = Mapping[tuple[str, str], float]
"""(model version, class) -> mean self-confidence of the rows predicted as that class."""


def self_confidence(row: Scored) -> float:
    """The score of the predicted class (0 when the scores do not name it)."""
    return float(row.scores.get(row.label, 0.0))


def top_margin(row: Scored) -> float:
    """The predicted class's score minus the best other class's score."""
    others = [float(score) for name, score in row.scores.items() if name != row.label]
    return self_confidence(row) - max(others, default=0.0)


def is_suspect(row: Scored, thresholds: Thresholds) -> bool:
    """Another class scores at least its own class threshold: probably that class instead."""
    return any(
        name != row.label
        and (row.model_version, name) in thresholds
        and float(score) >= thresholds[(row.model_version, name)]
        for name, score in row.scores.items()
    )


def doubt_key(row: Scored, thresholds: Thresholds) -> tuple[int, int, float, float]:
    """Sort key: smaller is more doubtful (see the module docstring)."""
    threshold = thresholds.get((row.model_version, row.label), self_confidence(row))
    return (
        0 if row.uncertain else 1,
        0 if is_suspect(row, thresholds) else 1,
        self_confidence(row) - threshold,
        top_margin(row),
    )


def rank_by_doubt(rows: Sequence[RowT], thresholds: Thresholds) -> list[RowT]:
    """The rows, most doubtful first; ties keep their given order."""
    return sorted(rows, key=lambda row: doubt_key(row, thresholds))


def group_by_label(rows: Sequence[RowT]) -> list[tuple[str, list[RowT]]]:
    """The rows grouped by label, groups in order of their first (most doubtful) row."""
    groups: dict[str, list[RowT]] = {}
    for row in rows:
        groups.setdefault(row.label, []).append(row)
    return list(groups.items())
