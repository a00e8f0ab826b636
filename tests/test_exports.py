"""The export writers: scores kept as the database's JSON text are written as they are, in their
place, and read back the same as scores decoded and encoded again."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest

from emolabel.exports import LEDGER_COLUMNS, jsonl_line, write_records

SCORES = {"happy": 0.25, "sad": 0.75, "fear": 1e-05}


def record(scores: object) -> dict[str, object]:
    return {
        "uri": 'file:///a/"scores": {x}.jpg',  # a hostile name must stay a name
        "job_id": 3,
        "state": "labeled",
        "reason": None,
        "message": None,
        "attempts": 1,
        "label": "sad",
        "confidence": 0.75,
        "model_version": "v1",
        "scores": scores,
        "face_count": None,
        "runner_up": "happy",
        "runner_up_confidence": 0.25,
        "human_label": "happy",
        "reviewed_by": 'ann", "scores": 1',
        "reviewed_at": dt.datetime(2026, 12, 6, 3, 0, tzinfo=dt.UTC),
    }


@pytest.mark.parametrize(
    "text", [json.dumps(SCORES), '{"sad": 0.75, "fear": 0.00001, "happy": 0.25}']
)
def test_scores_as_text_give_the_same_json_line_in_the_same_key_order(text: str) -> None:
    decoded = json.loads(jsonl_line(record(SCORES)))
    from_text = json.loads(jsonl_line(record(text)))
    assert from_text == decoded
    assert list(from_text) == list(decoded) == list(record(None))


def test_scores_as_text_give_the_same_csv() -> None:
    def written(scores: object) -> list[list[str]]:
        handle = io.StringIO()
        assert write_records([record(scores)], LEDGER_COLUMNS, "csv", handle, None) == 1
        return list(csv.reader(io.StringIO(handle.getvalue())))

    header, row = written(json.dumps(SCORES))
    assert header == LEDGER_COLUMNS and written(SCORES)[1] == row
    cells = dict(zip(header, row, strict=True))
    assert json.loads(cells["scores"]) == SCORES
    assert (cells["confidence"], cells["reason"], cells["reviewed_at"]) == (
        "0.750000",
        "",
        "2026-12-06T03:00:00+00:00",
    )


def test_a_line_with_scores_only_or_none() -> None:
    assert json.loads(jsonl_line({"scores": '{"a": 1.0}'})) == {"scores": {"a": 1.0}}
    assert json.loads(jsonl_line({"uri": "x", "scores": None})) == {"uri": "x", "scores": None}


def test_a_value_that_looks_like_the_scores_stand_in_stays_itself() -> None:
    # jsonl_line encodes scores text through a stand-in; a name equal to it must not be touched.
    hostile = record('{"sad": 0.75}') | {"uri": "\x00emolabel-scores\x00"}
    decoded = json.loads(jsonl_line(hostile))
    assert decoded["uri"] == "\x00emolabel-scores\x00" and decoded["scores"] == {"sad": 0.75}
    assert list(decoded) == list(hostile)
