"""Issue 18's hints where a newcomer gets stuck, through the real command line: `label` against
an external broker with no worker says so and how to start one, and leaves on Ctrl-C with the
job still queued; `status` shows whole headers at 80 columns.
"""

from __future__ import annotations

import os
import queue as queues
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from emolabel.embedded import worker_environment
from tests.support.archives import build_archive
from tests.support.cli import cli_scan, run_cli
from tests.support.paths import REPO
from tests.support.workers import SettingsFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HINT = "no worker consumes queue"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_label_without_a_worker_says_how_to_start_one_and_leaves_on_ctrl_c(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    archive = build_archive(tmp_path / "archive", 6)
    settings = make_settings()  # the test Redis: an external broker, and no worker on the queue
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **worker_environment(settings)}
    process = subprocess.Popen(
        [sys.executable, "-m", "emolabel", "label", str(archive.root)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
        cwd=REPO,
    )
    lines: queues.Queue[str] = queues.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or []]).start()
    seen: list[str] = []
    try:
        while not any(HINT in line for line in seen):
            seen.append(lines.get(timeout=120))  # a bound to end a hang, not a timing
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    while not lines.empty():
        seen.append(lines.get())
    output = "".join(seen)
    assert status == 130, output
    assert "emolabel worker" in output and "Traceback" not in output, output
    assert "stopped following job" in output and "stay queued" in output, output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_status_shows_whole_headers_at_80_columns(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    archive = build_archive(tmp_path / "archive", 3)
    settings = make_settings()
    job_id = cli_scan(settings, str(archive.root))
    done = run_cli(["status"], env={**worker_environment(settings), "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    shown = done.stdout
    header = shown.splitlines()[0]
    assert header.split() == [
        "job", "status", "enqueued", "labeled", "uncertain", "no_face", "failed", "skipped",
        "pending",
    ], shown  # fmt: skip
    assert max(len(line) for line in shown.splitlines()[:2]) <= 80, shown
    assert f"job {job_id}:" in shown
