"""Issue 14's hostile corpus through a real worker held to 2 GiB of memory (a cgroup).

Every file is inside every default limit and once cost gigabytes or hours: an RGBA PNG near the
pixel limit, 16-bit RGBA, JPEGs with hundreds of scans, a transparent and a 200-frame GIF. A real
`emolabel worker` (its main process and its pool process, TensorFlow and the model loaded) runs in
a memory cgroup of 2 GiB, as in a container with `--memory 2g`; `emolabel scan` sends the folder.
Each file must end labeled or refused with its reason, and no process may die: no OOM kill in the
group, no pool process lost, no crash counted against a chunk.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import LimitSettings, ScanSettings, WorkerSettings
from core.uris import path_to_uri
from db.models import Chunk
from tests.support.cli import cli_scan
from tests.support.images import HOSTILE
from tests.support.ledger import assert_balanced, ledger, results_per_image, wait_for_job
from tests.support.memory_cap import memory_cap
from tests.support.services import wait_for
from tests.support.workers import SettingsFactory, Workers, child_pids, worker_log_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CAP = 2 * 1024**3


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_hostile_files_are_labeled_or_refused_by_a_real_worker_in_2_gib(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "hostile"
    folder.mkdir()
    expected: dict[str, str | None] = {}
    for name, (make, reason) in HOSTILE.items():
        (folder / name).write_bytes(make())
        expected[path_to_uri(folder / name)] = None if reason is None else reason.value
    # One file per chunk, so that a death would be pinned on its file; the default limits.
    settings = make_settings(
        limits=LimitSettings(),
        scan=ScanSettings(chunk_size=1),
        worker=WorkerSettings(concurrency=1, decode_threads=2, batch_size=16, max_attempts=3),
    )
    with memory_cap(CAP) as cap:
        if cap is None:
            pytest.skip("no memory cgroup can be made here (needs root and cgroup v1 memory)")
        local = cap.start(lambda: workers.start(settings))
        pool = wait_for(lambda: child_pids(local.pid), timeout=120, what="the pool process")
        assert sorted(cap.pids()) == sorted([local.pid, *pool]) and len(pool) == 1
        started = time.monotonic()
        job_id = cli_scan(settings, str(folder))
        balance = wait_for_job(sessions, job_id, settings, timeout=600)
        seconds = time.monotonic() - started

        rows = ledger(sessions, job_id)
        ended = {uri: (None if row.state == "labeled" else row.reason) for uri, row in rows.items()}
        assert ended == expected, worker_log_text(settings)[-3000:]
        assert {row.state for uri, row in rows.items() if expected[uri] is None} == {"labeled"}
        assert_balanced(balance)
        labeled = {uri for uri, reason in expected.items() if reason is None}
        assert results_per_image(sessions) == dict.fromkeys(labeled, 1)
        # Nothing died: the group saw no OOM kill, the pool lost no process, no chunk crashed.
        assert cap.oom_kills() == 0
        assert local.process.poll() is None
        assert "WorkerLostError" not in worker_log_text(settings)
        with sessions() as session:
            crashes = session.scalar(
                select(func.coalesce(func.sum(Chunk.crashes), 0)).where(Chunk.job_id == job_id)
            )
        assert crashes == 0
        print(
            f"{len(expected)} hostile files in {seconds:.1f} s through a worker capped at 2 GiB;"
            f" peak {cap.peak_bytes() / 2**30:.2f} GiB"
        )
