"""The real `emolabel` command line in a subprocess: `run_cli`, and `cli` / `cli_scan`, which
run it with a test's `Settings` and fail the test on a non-zero exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from core.settings import Settings
from emolabel.embedded import worker_environment
from tests.support.paths import REPO


def run_cli(
    arguments: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `emolabel` console script in a subprocess (no in-process shortcuts)."""
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "emolabel", *arguments],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd or REPO,
        timeout=600,
        check=False,
    )


def cli(settings: Settings, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run `emolabel ARGUMENTS` with exactly these settings; fail the test on a non-zero exit."""
    done = run_cli(list(arguments), env=worker_environment(settings))
    assert done.returncode == 0, f"emolabel {' '.join(arguments)}: {done.stderr}{done.stdout}"
    return done


def cli_scan(settings: Settings, source: str, *options: str) -> int:
    """`emolabel scan SOURCE` and the job id it printed."""
    done = cli(settings, "scan", source, *options)
    match = re.search(r"job (\d+):", done.stdout)
    assert match, done.stdout
    return int(match.group(1))
