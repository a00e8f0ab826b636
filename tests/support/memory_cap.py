"""A memory cap for a group of processes: a cgroup v1 `memory` group with a byte limit.

Tests that must show a worker living within a container's memory use this instead of
`RLIMIT_AS`, which counts address space TensorFlow reserves but never touches. `MemoryCap.start`
starts processes inside the group from their first instruction: the calling thread joins the group
(v1 places threads on their own), forks, and leaves again, so every page the new processes ever
touch is charged to the cap. Where no such group can be made (not root, no v1 memory
controller), `memory_cap` yields None and the test says so.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

V1 = Path("/sys/fs/cgroup/memory")
T = TypeVar("T")


class MemoryCap:
    """One cgroup with a memory limit; processes join with `add`, counters are read live."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def start(self, launch: Callable[[], T]) -> T:
        """Run `launch` (which starts processes) in a thread that is inside the group meanwhile."""
        result: list[T] = []
        failure: list[BaseException] = []

        def inside() -> None:
            tid = str(threading.get_native_id())
            (self.path / "tasks").write_text(tid)
            try:
                result.append(launch())
            except BaseException as error:  # re-raised in the caller's thread
                failure.append(error)
            finally:
                (self.path.parent / "tasks").write_text(tid)

        thread = threading.Thread(target=inside, name="memory-cap")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return result[0]

    def pids(self) -> list[int]:
        return [int(line) for line in (self.path / "cgroup.procs").read_text().split()]

    def peak_bytes(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


def _make(limit: int) -> MemoryCap | None:
    if not (V1 / "memory.limit_in_bytes").is_file() or not os.access(V1, os.W_OK):
        return None
    path = V1 / f"emolabel-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    (path / "memory.limit_in_bytes").write_text(str(limit))
    with contextlib.suppress(OSError):  # no swap accounting: the limit above is all there is
        (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
    return MemoryCap(path)


@contextlib.contextmanager
def memory_cap(limit: int) -> Iterator[MemoryCap | None]:
    """A fresh cgroup limited to `limit` bytes, removed afterwards; None where none can be made."""
    try:
        cap = _make(limit)
    except OSError:
        cap = None
    try:
        yield cap
    finally:
        if cap is not None:
            parent = cap.path.parent / "cgroup.procs"
            for pid in cap.pids():  # survivors go back up, so the group can be removed
                with contextlib.suppress(OSError):
                    parent.write_text(str(pid))
            with contextlib.suppress(OSError):
                cap.path.rmdir()
