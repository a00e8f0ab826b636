"""A smoke run of `python -m bench.ledger_scale` on a ledger of 3,000 images in a fresh PostgreSQL
database, so that the harness cannot rot: the generated ledger, the measurements through the real
command line, the EXPLAIN files, the byte counts, and a second run that reuses the ledger.

The numbers mean nothing at this size; what is checked is that the report is whole and that its
counts are the ones the generator promised (no timing, no plan shape).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.settings import ReviewSettings
from tests.support.services import PostgresServer

REPO = Path(__file__).resolve().parents[1]
ROWS = 3000
SMALL_ITEMS = 1000

pytestmark = pytest.mark.integration


def run_bench(url: str, out: Path) -> tuple[dict[str, Any], str]:
    command = [
        sys.executable, "-m", "bench.ledger_scale", "--rows", str(ROWS), "--database-url", url,
        "--out", str(out), "--repeat", "1", "--export-repeat", "1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / f"ledger-scale-{ROWS}.json").read_text()), done.stdout


@pytest.mark.timeout(1800)  # bounds a hang, not the speed
def test_the_ledger_scale_harness_generates_measures_and_explains(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.create_database()
    out = tmp_path / "out"
    report, stdout = run_bench(url, out)

    assert report["rows"] == ROWS and report["ledger"]["reused"] is False
    assert report["environment"]["versions"]["postgresql"]
    assert report["environment"]["cpu_count"] >= 1
    jobs = report["ledger"]["jobs"]
    assert (jobs["big"]["items"], jobs["small"]["items"]) == (ROWS, SMALL_ITEMS)
    for job in jobs.values():
        # What `status` counts is what the generator wrote, state by state and reason by reason.
        expected = job["expected_counts"]
        assert job["counts"] == {state: expected.get(state, 0) for state in job["counts"]}
        assert (
            job["counts"]["enqueued"]
            == job["items"]
            == sum(count for state, count in job["counts"].items() if state != "enqueued")
        )
        assert job["reasons"] == job["expected_reasons"]
    big = jobs["big"]["counts"]
    assert big["failed"] > 0 and big["uncertain"] > 0 and big["skipped"] > 0

    measured = {(m["name"], m["job"]): m for m in report["measurements"]}
    for name, job in jobs.items():
        # Every ledger row of the job comes out of the export, by the CLI and by the repository.
        for export in ("cli.export_csv", "cli.export_jsonl", "export.iter_ledger_rows"):
            assert measured[(export, name)]["rows"] == job["items"], export
        assert measured[("failures.failed_items", name)]["rows"] == job["counts"]["failed"]
        assert measured[("cli.failures_json", name)]["rows"] == job["counts"]["failed"]
        assert measured[("review.review_items", name)]["rows"] == job["expected_labels"]
        # The page ranked in SQL counts every label and returns one page of them.
        first = measured[("review.ranked_page", name)]
        assert first["total"] == job["expected_labels"]
        assert first["rows"] == min(job["expected_labels"], ReviewSettings().page_size)
        # The page handler, a first view and the next page with the job's facets kept.
        assert {("review.page", name), ("review.page_next", name)} <= measured.keys()
        assert measured[("status.job_counts", name)]["counts"] == job["counts"]
        assert measured[("cli.status_job", name)]["peak_rss_mib"] > 0
    for measurement in report["measurements"]:
        assert measurement.get("skipped") or measurement["median_ms"] >= measurement["min_ms"] >= 0

    # Every captured statement has its plan on disk, the flags beside it.
    plans = [plan for m in report["measurements"] for plan in m.get("plans", [])]
    assert len(plans) >= 20
    for plan in plans:
        text = (out / plan["file"]).read_text()
        assert "EXPLAIN (ANALYZE, BUFFERS)" in text and "Execution Time" in text
        assert set(plan["flagged_seq_scans"]) <= {"images", "job_items", "results"}
    streamed = [plan for plan in plans if plan["server_cursor"]]
    assert streamed and all("EXPLAIN DECLARE" in (out / p["file"]).read_text() for p in streamed)
    assert {entry["file"] for entry in report["seq_scans"]} <= {plan["file"] for plan in plans}

    sizes = report["database_bytes"]
    for table in ("images", "job_items", "results", "chunks"):
        assert sizes["tables"][table]["total_per_image"] > 0
    assert sizes["ledger_per_image"] == pytest.approx(
        sum(sizes["tables"][t]["total_bytes"] for t in ("images", "job_items", "results")) / ROWS,
        abs=0.1,
    )
    assert {"status", "export_csv", "export_jsonl"} <= set(report["goals"])
    assert "wrote" in stdout and "B per image" in stdout

    # A second run finds the same ledger and measures it again without writing it.
    again, stdout = run_bench(url, out)
    assert again["ledger"]["reused"] is True and "reusing the generated ledger" in stdout
    assert again["ledger"]["jobs"]["big"]["counts"] == jobs["big"]["counts"]
