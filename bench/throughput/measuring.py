"""What a phase costs, read from the kernel: this process's CPU seconds and the load average,
and from /proc the machine's CPU split, other processes' CPU, and a worker's RSS, peaks and
CPU by thread.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _proc_status(pid: int) -> dict[str, int] | None:
    """VmRSS and VmHWM of `pid` in KiB, or None when it is gone."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:  # noqa: PTH123
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, amount, _unit = line.split()
                    values[key.rstrip(":")] = int(amount)
    except OSError:
        return None
    return values


def _proc_cpu_seconds(pid: int) -> float:
    return _proc_cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def _proc_cpu_seconds_of(stat_file: Path) -> float:
    """utime + stime from a /proc stat file (a process's or one thread's), in seconds."""
    try:
        return _stat_cpu_seconds(stat_file.read_text())
    except OSError:
        return 0.0


def _stat_cpu_seconds(text: str) -> float:
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# /proc/stat's first line, in order; guest time is already counted in user.
_CPU_STATES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu() -> dict[str, float]:
    """Seconds every CPU has spent in each state since boot (the machine, not this process)."""
    try:
        values = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    return {state: int(value) / tick for state, value in zip(_CPU_STATES, values, strict=False)}


def _process_stats() -> Iterator[tuple[int, str]]:
    """(pid, /proc/<pid>/stat text) of every live process; one that exits meanwhile is skipped."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                yield int(entry.name), (entry / "stat").read_text()


def cpu_by_command(commands: Sequence[str]) -> dict[str, float]:
    """CPU seconds used so far by every live process whose name is one of `commands`."""
    spent = dict.fromkeys(commands, 0.0)
    for _pid, text in _process_stats():
        name = text[text.find("(") + 1 : text.rfind(")")]
        if name in spent:
            spent[name] += _stat_cpu_seconds(text)
    return spent


def machine_cpu_split(
    before: dict[str, float],
    after: dict[str, float],
    *,
    worker: float,
    bench: float,
    services: dict[str, float],
) -> dict[str, float]:
    """Where the machine's CPU time went over a span: busy by whom, idle, stolen.

    `worker`, `bench` and `services` are CPU seconds measured per process over the same span;
    "other" is whatever else was busy (the kernel's own threads, other users of the machine).
    """
    spent = {state: after.get(state, 0.0) - before.get(state, 0.0) for state in _CPU_STATES}
    busy = sum(spent[state] for state in ("user", "nice", "system", "irq", "softirq"))
    return {
        "cpu_seconds_available": round(sum(spent.values()), 2),
        "busy": round(busy, 2),
        "worker": round(worker, 2),
        "bench": round(bench, 2),
        **{name: round(seconds, 2) for name, seconds in services.items()},
        "other": round(busy - worker - bench - sum(services.values()), 2),
        "idle": round(spent["idle"] + spent["iowait"], 2),
        "steal": round(spent["steal"], 2),
    }


def idle_by_part(
    samples: Sequence[tuple[float, float]], seconds: float, cores: int, edge: float = 0.5
) -> dict[str, float | None]:
    """Share of the machine's CPU left idle in the first and last `edge` seconds and between.

    `samples` are (seconds since the first publish, cumulative idle CPU seconds), `seconds` the
    timed span. Tells a pipeline's start and drain (one chunk, one process) from its steady state.
    """
    if seconds <= 0 or not samples:
        return {"start": None, "middle": None, "end": None}

    def idle_at(moment: float) -> float:
        before = [idle for at, idle in samples if at <= moment]
        return before[-1] if before else samples[0][1]

    marks = [0.0, min(edge, seconds / 3), max(seconds - edge, 2 * seconds / 3), seconds]
    shares: list[float | None] = []
    for start, end in itertools.pairwise(marks):
        span = end - start
        shares.append(
            round((idle_at(end) - idle_at(start)) / (span * cores), 3) if span > 0 else None
        )
    return dict(zip(("start", "middle", "end"), shares, strict=True))


def _children(pid: int) -> list[int]:
    """Live direct children of `pid` (the worker's pool processes)."""
    found: list[int] = []
    for child, text in _process_stats():
        fields = text.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] not in {"Z", "X"}:
            found.append(child)
    return sorted(found)


def _reset_peak(pid: int) -> bool:
    """Reset VmHWM of `pid` to its current RSS (Linux >= 4.0, our own processes)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class WorkerMemory:
    """RSS of a worker's main process and its pool processes, sampled from /proc."""

    main_pid: int
    samples: list[tuple[float, float]] = field(default_factory=list)  # (s, total RSS MiB)

    def processes(self) -> tuple[int, list[int]]:
        return self.main_pid, _children(self.main_pid)

    def rss(self) -> tuple[float, float]:
        """(main, pool) RSS in MiB now."""
        main, pool = self.processes()
        main_kib = (_proc_status(main) or {}).get("VmRSS", 0)
        pool_kib = sum((_proc_status(pid) or {}).get("VmRSS", 0) for pid in pool)
        return main_kib / 1024, pool_kib / 1024

    def reset_peaks(self) -> bool:
        main, pool = self.processes()
        return all([_reset_peak(main), *(_reset_peak(pid) for pid in pool)])

    def peaks(self) -> dict[str, Any]:
        main, pool = self.processes()
        main_hwm = (_proc_status(main) or {}).get("VmHWM", 0) / 1024
        pool_hwm = [(_proc_status(pid) or {}).get("VmHWM", 0) / 1024 for pid in pool]
        return {
            "main_vm_hwm_mib": round(main_hwm, 1),
            "pool_vm_hwm_mib": [round(value, 1) for value in pool_hwm],
            # Peaks of different processes need not coincide: the sum is an upper bound.
            "total_vm_hwm_mib": round(main_hwm + sum(pool_hwm), 1),
            "sampled_peak_rss_mib": max((rss for _, rss in self.samples), default=0.0),
        }

    def cpu_seconds(self) -> float:
        main, pool = self.processes()
        return _proc_cpu_seconds(main) + sum(_proc_cpu_seconds(pid) for pid in pool)

    def thread_cpu(self) -> dict[tuple[int, int], tuple[str, float]]:
        """(pid, tid) -> (thread name, CPU seconds) for every thread of the worker's processes."""
        main, pool = self.processes()
        threads: dict[tuple[int, int], tuple[str, float]] = {}
        for pid in (main, *pool):
            role = "main" if pid == main else "pool"
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError):
                        name = (task / "comm").read_text().strip()
                        threads[(pid, int(task.name))] = (
                            f"{role}:{name}",
                            _proc_cpu_seconds_of(task / "stat"),
                        )
        return threads


def thread_cpu_spent(
    before: dict[tuple[int, int], tuple[str, float]],
    after: dict[tuple[int, int], tuple[str, float]],
) -> list[dict[str, Any]]:
    """CPU seconds each worker thread spent between two `thread_cpu` snapshots, busiest first.

    Python and oneDNN threads are all called `python`, so the seconds tell them apart: with a
    model-bound set, as many threads as intra-op threads carry the model; the decode threads
    follow.
    """
    spent: list[dict[str, Any]] = [
        {
            "tid": tid,
            "name": name,
            "cpu_seconds": round(seconds - before.get((pid, tid), (name, 0.0))[1], 2),
        }
        for (pid, tid), (name, seconds) in after.items()
    ]
    return sorted(
        (thread for thread in spent if thread["cpu_seconds"] > 0),
        key=lambda thread: -thread["cpu_seconds"],
    )
