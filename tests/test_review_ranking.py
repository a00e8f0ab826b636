"""The doubt ranking on numbers: uncertain first, then rows another class claims above its own
threshold (confident learning's off-diagonal), then the least typical of their class."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from emolabel.review.ranking import (
    doubt_key,
    group_by_label,
    is_suspect,
    rank_by_doubt,
    self_confidence,
    top_margin,
)


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    scores: dict[str, float]
    uncertain: bool = False
    model_version: str = field(default="v1")


def test_the_order_is_uncertain_then_suspects_then_least_typical() -> None:
    thresholds = {("v1", "cat"): 0.8, ("v1", "dog"): 0.6}
    rows = [
        Row("typical cat", "cat", {"cat": 0.95, "dog": 0.05}),
        Row("weak cat", "cat", {"cat": 0.7, "dog": 0.3}),
        # dog scores 0.65 >= dog's threshold 0.6: probably a dog, though labeled cat
        Row("cat that is a dog", "cat", {"cat": 0.66, "dog": 0.65}),
        Row("uncertain dog", "dog", {"cat": 0.1, "dog": 0.9}, uncertain=True),
        Row("typical dog", "dog", {"cat": 0.4, "dog": 0.6}),
    ]
    ranked = [row.name for row in rank_by_doubt(rows, thresholds)]
    assert ranked == [
        "uncertain dog",
        "cat that is a dog",
        "weak cat",  # 0.7 - 0.8 = -0.1 below its class's typical confidence
        "typical dog",  # 0.6 - 0.6 = 0: a dog's confidence is lower, but typical of dogs
        "typical cat",
    ]
    assert is_suspect(rows[2], thresholds) and not is_suspect(rows[1], thresholds)


def test_ties_on_threshold_distance_go_to_the_closer_call() -> None:
    thresholds = {("v1", "a"): 0.5, ("v1", "b"): 0.9, ("v1", "c"): 0.9}
    wide = Row("wide", "a", {"a": 0.5, "b": 0.1, "c": 0.4})
    close = Row("close", "a", {"a": 0.5, "b": 0.45, "c": 0.05})
    assert [row.name for row in rank_by_doubt([wide, close], thresholds)] == ["close", "wide"]
    assert abs(top_margin(close) - 0.05) < 1e-9 and self_confidence(wide) == 0.5


def test_thresholds_are_per_model_version_and_a_missing_one_is_neutral() -> None:
    row = Row("other model", "a", {"a": 0.4, "b": 0.6}, model_version="v2")
    # v1's thresholds say nothing about v2's row: no suspicion, distance 0
    assert doubt_key(row, {("v1", "b"): 0.1}) == (1, 1, 0.0, pytest.approx(-0.2))


def test_groups_follow_their_most_doubtful_row() -> None:
    rows = [Row("1", "sad", {}), Row("2", "happy", {}), Row("3", "sad", {})]
    assert [(label, [row.name for row in group]) for label, group in group_by_label(rows)] == [
        ("sad", ["1", "3"]),
        ("happy", ["2"]),
    ]
