"""Local worker processes for the end-to-end tests: `Workers` starts them and makes sure none
outlives its test, `child_pids` finds their pool processes, `worker_log*` read their log.
`SettingsFactory` is the type of the `make_settings` fixture (tests/integration/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

from core.settings import Settings
from emolabel.embedded import LocalWorker, start_local_worker

SettingsFactory = Callable[..., Settings]


class Workers:
    """Starts worker processes for a test and makes sure none outlives it."""

    def __init__(self) -> None:
        self.started: list[LocalWorker] = []

    def start(
        self,
        settings: Settings,
        *,
        concurrency: int | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> LocalWorker:
        local = start_local_worker(
            settings, concurrency=concurrency, extra_env=extra_env, timeout=120
        )
        self.started.append(local)
        return local

    def kill(self, local: LocalWorker) -> None:
        """`kill -9` of the whole worker: its main process and every pool process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(local.pid, signal.SIGKILL)  # the worker leads its own session
        local.process.wait(timeout=30)

    def stop_all(self) -> None:
        for local in self.started:
            if local.process.poll() is None:
                local.stop(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(local.pid, signal.SIGKILL)  # pool processes left by a killed parent


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (a worker's pool processes), from /proc."""
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # The command name may hold spaces and parentheses; the fields after it do not.
        fields = stat_line.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] not in {"Z", "X"}:
            children.append(int(entry.name))
    return sorted(children)


def worker_log(settings: Settings, last: int = 60) -> str:
    """The tail of the local worker's log, for failure messages."""
    try:
        lines = (settings.home.resolve() / "worker.log").read_text(errors="replace").splitlines()
    except OSError:
        return "(no worker log)"
    return "\n".join(lines[-last:])


def worker_log_text(settings: Settings) -> str:
    try:
        return (settings.home.resolve() / "worker.log").read_text(errors="replace")
    except OSError:
        return ""
