"""The export writers: scores kept as the database's JSON text are written as they are, in their
place, and read back the same as scores decoded and encoded again."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import ItemState, Review
from db.repository import FailureRow, ImageRow, JobItemRow, ResultRow, ReviewInput, rendered
from emolabel.exports import (
    EXPORT_COLUMNS,
    LEDGER_COLUMNS,
    STATES,
    jsonl_line,
    ledger_record,
    photo_record,
    write_records,
)
from tests.support.services import PostgresServer

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


# --- PostgreSQL writes the same files ------------------------------------------------------------

HOSTILE_NAMES = [
    "plain.jpg",
    "comma, and space.jpg",
    'quote " inside.jpg',
    "new\nline.jpg",
    "tab\tand ünïcode 😀.jpg",
    "back\\slash.jpg",
    "",  # a name that is empty after the folder
]


@pytest.fixture
def postgresql_sessions(postgres: PostgresServer) -> Iterator[sessionmaker[Session]]:
    from db.session import make_engine, make_sessionmaker, upgrade

    url = postgres.create_database()
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def hostile_ledger(session: Session) -> int:
    """A job with a row in every state: hostile URIs, messages and reviewer names, random
    confidences (six-decimal rounding is where two writers could differ), a verdict with and one
    without microseconds."""
    rng = random.Random(7)
    uris = [f"file:///photos/{quote(name)}{index}" for index, name in enumerate(HOSTILE_NAMES * 3)]
    ids = repository.upsert_images(
        session=session,
        rows=[ImageRow(uri=uri, fingerprint=f"{i}-1") for i, uri in enumerate(uris)],
    )
    image_ids = [ids[uri] for uri in uris]
    repository.register_model(
        session=session,
        version="v1",
        name="emotion",
        artifact_path="models/emotion/v1/model.keras",
        class_names=["happy", "sad", "fear"],
    )
    job_id = repository.create_job(session=session, source="/photos", model_version="v1")
    messages = ["", "a, b", 'say "no"', "two\nlines", None]
    items = [
        JobItemRow(image_id, chunk_index=0)
        if index % 3
        else JobItemRow(
            image_id,
            state=ItemState.SKIPPED,
            reason="not_an_image",
            message=messages[index % len(messages)],
        )
        for index, image_id in enumerate(image_ids)
    ]
    repository.add_job_items(session=session, job_id=job_id, items=items)
    pending = [item.image_id for item in items if item.state is not ItemState.SKIPPED]
    labeled, failed = pending[:-3], pending[-3:-1]
    results = []
    for image_id in labeled:
        happy = rng.random()
        scores = {"happy": happy, "sad": (1 - happy) * rng.random(), "fear": rng.random() / 1e6}
        results.append(
            ResultRow(
                image_id=image_id,
                model_version="v1",
                label="happy",
                confidence=happy,
                scores=scores,
                uncertain=happy < 0.3,
                runner_up="sad",
                runner_up_confidence=scores["sad"],
            )
        )
    repository.record_outcomes(
        session=session,
        job_id=job_id,
        results=results,
        failures=[FailureRow(image_id, "corrupt", 'bad, "huff"\ntable') for image_id in failed],
        chunk_index=0,
    )
    reviews = [
        ReviewInput(labeled[0], "v1", "sad", 'ann", "scores": 1'),
        ReviewInput(labeled[1], "v1", "fear", "bob\nsmith"),
    ]
    review_ids = repository.record_reviews(session=session, reviews=reviews)
    # One verdict at a whole second: isoformat() then leaves the fraction out.
    session.execute(
        update(Review)
        .where(Review.id == review_ids[1])
        .values(created_at=dt.datetime(2026, 12, 6, 3, 0, 0, tzinfo=dt.UTC))
    )
    session.flush()
    return job_id


def python_written(records: Iterator[dict[str, Any]], columns: list[str], fmt: str) -> str:
    handle = io.StringIO()
    write_records(records, columns, fmt, handle, None)
    return handle.getvalue()


def parsed(text: str, fmt: str) -> list[Any]:
    if fmt == "csv":
        return list(csv.reader(io.StringIO(text, newline="")))
    return [list(json.loads(line).items()) for line in text.splitlines()]


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_postgresql_writes_the_ledger_export_the_python_writer_writes(
    postgresql_sessions: sessionmaker[Session], fmt: str
) -> None:
    states = list(STATES)
    with postgresql_sessions() as session, session.begin():
        job_id = hostile_ledger(session)
    with postgresql_sessions() as session:
        assert rendered.renders_exports(session)
        python = python_written(
            map(ledger_record, repository.iter_ledger_rows(session=session, states=states)),
            LEDGER_COLUMNS,
            fmt,
        )
        query = repository.ledger_query(states=states, job_id=job_id, scores_as_text=False)
        server = server_written(session, query, LEDGER_COLUMNS, fmt)
    rows = parsed(python, fmt)
    assert len(rows) == len(HOSTILE_NAMES) * 3 + (fmt == "csv")
    assert parsed(server, fmt) == rows
    cells = {str(cell[1] if fmt == "jsonl" else cell) for row in rows for cell in row}
    assert {'ann", "scores": 1', "two\nlines", "a, b", "2026-12-06T03:00:00+00:00"} <= cells


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_postgresql_writes_the_results_export_the_python_writer_writes(
    postgresql_sessions: sessionmaker[Session], fmt: str
) -> None:
    with postgresql_sessions() as session, session.begin():
        job_id = hostile_ledger(session)
    with postgresql_sessions() as session:
        python = python_written(
            map(photo_record, repository.iter_results(session=session, job_id=job_id)),
            EXPORT_COLUMNS,
            fmt,
        )
        query = repository.results_query(job_id=job_id, scores_as_text=False)
        server = server_written(session, query, EXPORT_COLUMNS, fmt)
    rows = parsed(python, fmt)
    outcomes = {dict(row)["outcome"] for row in parsed(python, "jsonl")} if fmt == "jsonl" else {}
    assert len(rows) > 10 and parsed(server, fmt) == rows
    assert fmt == "csv" or outcomes == {"labeled", "uncertain"}


def server_written(
    session: Session, query: repository.ExportQuery, columns: list[str], fmt: str
) -> str:
    if fmt == "csv":
        handle = io.StringIO()
        count = rendered.write_csv(session, query, columns, handle.write)
        assert count == len(list(csv.reader(io.StringIO(handle.getvalue(), newline="")))) - 1
        return handle.getvalue()
    return "".join(line + "\n" for line in rendered.json_lines(session, query, columns))
