"""A smoke run of `python -m bench.producer` on a tiny tree, so that the producer's harness
cannot rot: the real scan into SQLite and the test Redis, its JSON, and its clean-up.

The numbers mean nothing at this size; what is checked is that every figure the README and
bench/RESULTS.md quote is there and adds up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.support.services import TEST_REDIS_URL

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)  # bounds a hang, not the speed
def test_the_producer_harness_scans_publishes_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "bench.producer", "--files", "300", "--chunk-size", "64",
        "--no-compare", "--redis-url", TEST_REDIS_URL, "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((out / "producer-sqlite-300.json").read_text())
    walk, scan, rescan, settled, walk_again = report["phases"]
    assert (walk_again["phase"], walk_again["files"]) == ("walk again", 300)
    ratios = report["ratios_to_walk"]
    assert set(ratios["ratios"]) == {"scan", "rescan", "settled"}
    mean_walk = (walk["files_per_s"] + walk_again["files_per_s"]) / 2
    assert ratios["ratios"]["scan"] == round(scan["files_per_s"] / mean_walk, 3)
    assert "x walk (the mean of the walks" in done.stdout
    assert (walk["phase"], walk["files"], walk["usable"]) == ("walk", 300, 300)
    assert (scan["phase"], scan["database"], scan["files"]) == ("scan", "sqlite", 300)
    # 300 pending images in chunks of 64: five messages, each the chunk's URIs and no more.
    assert (scan["pending_images"], scan["chunks"], scan["redis"]["messages"]) == (300, 5, 5)
    assert scan["redis"]["first_message"]["uris"] == 64
    assert scan["redis"]["memory_usage_bytes_per_image"] > 0
    assert [mark["percent"] for mark in scan["rss"]["checkpoints"]] == [10, 50, 100]
    assert scan["files_per_s"] > 0 and scan["cpu_seconds"] >= 0
    assert report["environment"]["cpus_usable"] >= 1 and "versions" in report["environment"]
    assert "cores of" in done.stdout and "wrote" in done.stdout
    # The rescan of the same tree, every image labeled in between: nothing goes out again.
    assert (rescan["phase"], rescan["files"], rescan["pending_images"]) == ("rescan", 300, 0)
    assert rescan["chunks"] == 0 and rescan["split_seconds"]["publish"] == 0
    assert rescan["ledger_rows"] == 300  # the first rescan after labeling reads and itemizes
    # The next one finds every folder settled: the same files counted, none read or itemized.
    assert (settled["phase"], settled["files"], settled["pending_images"]) == ("settled", 300, 0)
    assert settled["ledger_rows"] == 0

    # The queue it filled is deleted: a bench run leaves nothing pending behind it.
    client = redis.Redis.from_url(TEST_REDIS_URL)
    for phase in (scan, rescan, settled):
        assert not list(client.scan_iter(match=f"*{phase['queue']}*"))
