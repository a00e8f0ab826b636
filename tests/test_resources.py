"""How `worker_layout` resolves the automatic (0) process and thread counts."""

from __future__ import annotations

import pytest

from core.settings import WorkerSettings
from worker.resources import GiB, available_cpus, available_memory, worker_layout


@pytest.mark.parametrize(
    ("cpus", "memory", "expected"),
    [
        (2, 24 * GiB, (2, 1, 2)),  # the bench machine: one single-threaded process per CPU
        (16, 8 * GiB, (4, 4, 4)),  # a laptop: memory caps the processes, threads share the CPUs
        (8, None, (8, 1, 2)),  # memory unknown: by CPUs alone; decoding on two threads at least
        (4, GiB // 2, (1, 4, 4)),  # too little memory for two: one process, every CPU
        (1, 64 * GiB, (1, 1, 2)),
    ],
)
def test_auto_layout_one_process_per_cpu_within_memory(
    cpus: int, memory: int | None, expected: tuple[int, int, int]
) -> None:
    layout = worker_layout(WorkerSettings(), cpus=cpus, memory=memory)
    assert (layout.processes, layout.model_threads, layout.decode_threads) == expected


def test_gpus_and_explicit_settings_win() -> None:
    assert worker_layout(WorkerSettings(gpus=4), cpus=16, memory=GiB).processes == 4
    explicit = WorkerSettings(concurrency=3, model_threads=2, decode_threads=5)
    layout = worker_layout(explicit, cpus=2, memory=GiB)
    assert (layout.processes, layout.model_threads, layout.decode_threads) == (3, 2, 5)
    # Threads default to the process's share of the CPUs, never below one.
    assert worker_layout(WorkerSettings(concurrency=3), cpus=2).model_threads == 1
    assert worker_layout(WorkerSettings(concurrency=2), cpus=8).decode_threads == 4


def test_this_machine_is_read() -> None:
    assert available_cpus() >= 1
    memory = available_memory()
    assert memory is None or memory > 0
    assert worker_layout(WorkerSettings()).processes >= 1
