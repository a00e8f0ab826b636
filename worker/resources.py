"""How many worker processes and threads this machine gets, when the settings say 0 (auto).

Measured on the 2-core bench machine (bench/RESULTS.md): one single-threaded model process per
CPU labels face crops faster than one process whose framework spreads every op over all CPUs,
because a multi-threaded op waits for its slowest thread and the decode threads keep taking
cores from it. A model process holds ~1.3 GiB (framework, weights, a batch of activations), so the
automatic process count is also capped by the memory available.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.settings import WorkerSettings

GiB = 1024**3
# Resident memory budgeted per automatic worker process (VmHWM measured at batch 64: 1.25-1.31 GiB).
MEMORY_PER_PROCESS = 2 * GiB


@dataclass(frozen=True)
class WorkerLayout:
    """Concrete numbers for one `emolabel worker`: processes, and threads in each process."""

    processes: int
    model_threads: int
    decode_threads: int


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_has_bfloat16() -> bool | None:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16); None if unknown.

    Without either, oneDNN emulates bfloat16 and `worker.precision=bfloat16` is slower.
    """
    try:
        with Path("/proc/cpuinfo").open(encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return None


def available_memory() -> int | None:
    """Bytes available for new processes: Linux MemAvailable, within a cgroup v2 memory limit
    (a container's `--memory`, which /proc/meminfo does not show); None if unknown."""
    found: list[int] = []
    try:
        with Path("/proc/meminfo").open(encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, min(found)) if found else None


def worker_layout(
    worker: WorkerSettings, *, cpus: int | None = None, memory: int | None = None
) -> WorkerLayout:
    """Resolve the 0 (auto) values of `worker` for a machine of `cpus` and `memory` bytes.

    Processes: one per GPU, else one per CPU, at most one per `MEMORY_PER_PROCESS` available.
    Model threads: the process's share of the CPUs. Decode threads: the same share but at least
    two, so that a process left alone with a chunk of big photos (the end of a job) still decodes
    on two cores; for crops one or two made no difference (bench/RESULTS.md).
    """
    cpus = cpus if cpus is not None else available_cpus()
    processes = worker.concurrency or worker.gpus
    if not processes:
        memory = memory if memory is not None else available_memory()
        by_memory = cpus if memory is None else max(1, memory // MEMORY_PER_PROCESS)
        processes = max(1, min(cpus, by_memory))
    share = max(1, cpus // processes)
    return WorkerLayout(
        processes=processes,
        model_threads=worker.model_threads or share,
        decode_threads=worker.decode_threads or max(2, share),
    )
