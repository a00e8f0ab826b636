"""`emolabel export`'s rows and formats: records from the ledger's rows, written as CSV, JSON
lines or Parquet.

Three kinds of export, one column list each:
- results (the default): one row per label (`EXPORT_COLUMNS`); a face model's come one row per
  face (`FACE_COLUMNS`) or, with `--per photo`, one per photo (`PHOTO_COLUMNS`);
- the ledger (`--state ...`): one row per file a job saw, in the states asked for, with the reason
  and message of a failed or skipped file and the label when there is one (`LEDGER_COLUMNS`).

A record is a dict of Python values (datetimes stay datetimes); each format turns them into its
own types: CSV text, JSON, or Parquet columns typed by `PARQUET_TYPES` (scores a map of class to
score, times UTC timestamps), so a data person's reader gets numbers and times, not strings.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import operator
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Any

from core.errors import ConfigError

FORMATS = ("csv", "jsonl", "parquet")
STATES = ("labeled", "uncertain", "no_face", "failed", "skipped", "pending")
"""A job item's states, as `export --state` takes them (`all` is every one)."""

EXPORT_COLUMNS = [
    "uri",
    "label",
    "confidence",
    "model_version",
    "scores",
    "job_id",
    "outcome",
    "runner_up",
    "runner_up_confidence",
    "human_label",
    "reviewed_by",
    "reviewed_at",
]
"""An export's columns (CSV) or keys (JSON lines); whole-image model exports have these alone.

`outcome` is labeled, uncertain (below its class's threshold) or no_face; `human_label` is the
latest verdict of a person on the image (or face), `reviewed_by` and `reviewed_at` say whose and
when, empty when nobody reviewed it."""
PHOTO_COLUMNS = [*EXPORT_COLUMNS, "face_count"]
"""`--per photo` with a face model: the photo-level label (the largest face's) and face count."""
FACE_COLUMNS = [
    *EXPORT_COLUMNS,
    "face_index",
    "x",
    "y",
    "width",
    "height",
    "detector_score",
]
"""`--per face` (the default) with a face model: one row per face, one per no_face image."""
LEDGER_COLUMNS = [
    "uri",
    "job_id",
    "state",
    "reason",
    "message",
    "attempts",
    "label",
    "confidence",
    "model_version",
    "scores",
    "face_count",
    "runner_up",
    "runner_up_confidence",
    "human_label",
    "reviewed_by",
    "reviewed_at",
]
"""`--state`: one row per file in the job's ledger; label fields empty where there is no label
(failed, pending, and a face model's no_face)."""

FLOAT_COLUMNS = frozenset({"confidence", "runner_up_confidence", "detector_score"})
INTEGER_COLUMNS = frozenset(
    {"job_id", "attempts", "face_count", "face_index", "x", "y", "width", "height"}
)
PARQUET_BATCH_ROWS = 10_000


def parse_states(values: Iterable[str]) -> list[str]:
    """`--state` values (repeated or comma-separated; `all` is every state), checked."""
    states: list[str] = []
    for value in values:
        for name in (part.strip() for part in value.split(",")):
            if name == "all":
                states.extend(STATES)
            elif name in STATES:
                states.append(name)
            elif name:
                raise ConfigError(f"--state {name!r}: use one of {', '.join(STATES)} or all")
    return list(dict.fromkeys(states))


def photo_record(row: Any) -> dict[str, Any]:
    """A `results` row (`ExportRow`) as a record, keys in `EXPORT_COLUMNS`' order (the order
    PostgreSQL writes them in too); a face model's gains face_count."""
    record: dict[str, Any] = {
        "uri": row.uri,
        "label": row.label,
        "confidence": row.confidence,
        "model_version": row.model_version,
        "scores": row.scores,
        "job_id": row.job_id,
        "outcome": row.outcome,
        "runner_up": row.runner_up,
        "runner_up_confidence": row.runner_up_confidence,
        "human_label": row.human_label,
        "reviewed_by": row.reviewed_by,
        "reviewed_at": row.reviewed_at,
    }
    if row.face_count is not None:
        record["face_count"] = row.face_count
    return record


def face_record(row: Any) -> dict[str, Any]:
    """A per-face row (`FaceExportRow`) as a record; a whole-image model's label stays as is."""
    record = photo_record(row)
    if record.pop("face_count", None) is not None:
        record |= {
            "face_index": row.face_index,
            "x": row.x,
            "y": row.y,
            "width": row.width,
            "height": row.height,
            "detector_score": row.detector_score,
        }
    return record


_ledger_values = operator.attrgetter(*LEDGER_COLUMNS)


def ledger_record(row: Any) -> dict[str, Any]:
    """A ledger row (`LedgerRow`) as a record."""
    return dict(zip(LEDGER_COLUMNS, _ledger_values(row), strict=True))


def write_records(
    records: Iterable[dict[str, Any]],
    columns: list[str],
    output_format: str,
    handle: IO[str] | None,
    output: Path | None,
) -> int:
    """Write `records` in `output_format` to `output` (or `handle`, text formats only); return
    how many rows went out. Parquet needs a file: its footer is written last."""
    if output_format == "parquet":
        if output is None:
            raise ConfigError("--format parquet writes a file: give --output FILE.parquet")
        return write_parquet(records, columns, output)
    assert handle is not None
    count = 0
    if output_format == "csv":
        writer = csv.writer(handle)
        writer.writerow(columns)
        # Per row, only the cells that need it are converted (csv writes None as ""): at
        # millions of rows the per-cell call was a visible part of an export's time.
        converted = [
            (index, CSV_CELLS[column])
            for index, column in enumerate(columns)
            if column in CSV_CELLS
        ]
        for record in records:
            cells = [record.get(column) for column in columns]
            for index, convert in converted:
                value = cells[index]
                if value is not None:
                    cells[index] = convert(value)
            writer.writerow(cells)
            count += 1
        return count
    for record in records:
        handle.write(jsonl_line(record) + "\n")
        count += 1
    return count


def _six_places(value: float) -> str:
    return f"{value:.6f}"


def scores_text(value: str | dict[str, float]) -> str:
    """Scores as JSON text: the database's own text when the reader kept it (`scores_json`)."""
    return value if isinstance(value, str) else json.dumps(value)


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


CSV_CELLS: dict[str, Callable[[Any], Any]] = {
    "confidence": _six_places,
    "runner_up_confidence": _six_places,
    "scores": scores_text,
    "reviewed_at": _iso,
}
"""The CSV columns whose values are written otherwise than as they are."""


# Stands in for scores kept as JSON text while the rest of a line is encoded, then replaced by
# that text: one json.dumps per line. Should any other value contain it, the line is encoded in
# parts instead.
_SCORES_PLACEHOLDER = "\x00emolabel-scores\x00"
_SCORES_MARK = json.dumps(_SCORES_PLACEHOLDER)


def jsonl_line(record: dict[str, Any]) -> str:
    """One JSON line; scores already in JSON text (`scores_json`) go in as they are, in their
    place among the keys."""
    record = jsonl_record(record)
    scores = record.get("scores")
    if not isinstance(scores, str):
        return json.dumps(record, default=_json_default)
    text = json.dumps(record | {"scores": _SCORES_PLACEHOLDER}, default=_json_default)
    if text.count(_SCORES_MARK) == 1:
        return text.replace(_SCORES_MARK, scores)
    items = list(record.items())
    at = next(index for index, (key, _) in enumerate(items) if key == "scores")
    parts = [
        json.dumps(dict(items[:at]), default=_json_default)[1:-1],
        f'"scores": {scores}',
        json.dumps(dict(items[at + 1 :]), default=_json_default)[1:-1],
    ]
    return "{" + ", ".join(part for part in parts if part) + "}"


def jsonl_record(record: dict[str, Any]) -> dict[str, Any]:
    """JSON lines give a face's box as one object (null for a no_face image)."""
    if "x" not in record:
        return record
    record = dict(record)
    box = {side: record.pop(side) for side in ("x", "y", "width", "height")}
    record["box"] = None if box["x"] is None else box
    record["detector_score"] = record.pop("detector_score")
    return record


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def parquet_schema(columns: list[str]) -> Any:
    """The Parquet types of an export's columns: numbers as numbers, scores a map, UTC times."""
    import pyarrow as pa

    def column_type(column: str) -> Any:
        if column in FLOAT_COLUMNS:
            return pa.float64()
        if column in INTEGER_COLUMNS:
            return pa.int64()
        if column == "scores":
            return pa.map_(pa.string(), pa.float64())
        if column == "reviewed_at":
            return pa.timestamp("us", tz="UTC")
        return pa.string()

    return pa.schema([pa.field(column, column_type(column)) for column in columns])


def write_parquet(records: Iterable[dict[str, Any]], columns: list[str], output: Path) -> int:
    """Stream records into a Parquet file, `PARQUET_BATCH_ROWS` at a time (memory stays flat
    whatever the job's size); the file appears complete or not at all."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise ConfigError("--format parquet needs pyarrow: pip install pyarrow") from None

    schema = parquet_schema(columns)
    partial = output.with_name(output.name + ".partial")
    count = 0
    iterator: Iterator[dict[str, Any]] = iter(records)
    try:
        with pq.ParquetWriter(partial, schema) as writer:
            while batch := list(islice(iterator, PARQUET_BATCH_ROWS)):
                arrays = {
                    column: [_parquet_value(column, record.get(column)) for record in batch]
                    for column in columns
                }
                writer.write_table(pa.table(arrays, schema=schema))
                count += len(batch)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    return count


def _parquet_value(column: str, value: Any) -> Any:
    if column == "scores" and value is not None:
        return list((json.loads(value) if isinstance(value, str) else value).items())
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)  # the ledger stores UTC
    return value
