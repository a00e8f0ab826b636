"""The reading process (`producer.read_ahead`): the batches it sends are those read in one
process, and neither side outlives the other. Real processes, real folders; no database (the
settled lookup through the ledger is tested with the scan, tests/test_producer_enqueue.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.storage.folder_source import FolderSource, FolderSpec
from producer.batches import Batch, read_batch, run_batches
from producer.read_ahead import ReadAhead, ReadAheadSpec, ReaderDied
from tests.support.paths import REPO
from tests.support.services import wait_for

PNG = bytes.fromhex("89504e470d0a1a0a") + b"\0" * 24


def make_tree(root: Path, folders: int = 3, per_folder: int = 5) -> None:
    """Images, junk and a link out of the root, over a few folders."""
    for index in range(folders):
        folder = root / f"f{index}"
        folder.mkdir(parents=True)
        for number in range(per_folder):
            (folder / f"img{number}.png").write_bytes(PNG)
        (folder / "notes.txt").write_text("no image")
        (folder / "empty.png").write_bytes(b"")
    (root / "escape.png").symlink_to("/etc/hostname")


def read_here(spec: FolderSpec, files: int) -> list[Batch]:
    source = spec.open()
    return [
        read_batch(group, settled=None) for group in run_batches(source.iter_runs(), files=files)
    ]


def test_the_reading_process_sends_the_batches_one_process_reads(tmp_path: Path) -> None:
    make_tree(tmp_path / "archive")
    spec = FolderSource(tmp_path / "archive", max_file_bytes=1024).spec
    expected = read_here(spec, files=4)
    assert len(expected) == 3  # several batches cross the pipe

    with ReadAhead(ReadAheadSpec(spec, files=4, database_url=None, model_version=None)) as got:
        batches = list(got)

    assert batches == expected
    reasons = {entry.skip_reason for batch in batches for entry in batch.entries}
    assert reasons == {None, "not_an_image", "empty", "symlink_outside_root"}


def test_a_killed_reader_is_an_error_that_says_so(tmp_path: Path) -> None:
    # ~2 MB of batches: more than any pipe buffers, so the reader cannot have finished when
    # it is killed, however fast it reads.
    make_tree(tmp_path / "archive", folders=100, per_folder=150)
    spec = FolderSource(tmp_path / "archive", max_file_bytes=1024).spec
    reader = ReadAhead(ReadAheadSpec(spec, files=50, database_url=None, model_version=None))
    with reader as batches:
        next(batches)
        assert reader.pid is not None
        os.kill(reader.pid, signal.SIGKILL)
        with pytest.raises(ReaderDied, match="ended without finishing"):
            list(batches)
    assert reader.pid is None


def test_a_root_that_now_resolves_elsewhere_is_refused(tmp_path: Path) -> None:
    """The reader opens the root the scan resolved, never where a link put in its place leads."""
    make_tree(tmp_path / "archive")
    (tmp_path / "elsewhere").mkdir()
    spec = FolderSource(tmp_path / "archive", max_file_bytes=1024).spec
    (tmp_path / "archive").rename(tmp_path / "moved")
    (tmp_path / "archive").symlink_to(tmp_path / "elsewhere")

    with pytest.raises(ConfigError, match="now resolves elsewhere"):
        spec.open()
    with (
        ReadAhead(ReadAheadSpec(spec, files=4, database_url=None, model_version=None)) as batches,
        pytest.raises(ConfigError, match="now resolves elsewhere"),
    ):
        list(batches)


def test_a_reader_whose_scan_was_killed_stops(tmp_path: Path) -> None:
    """The scan's process is killed (-9) while its reader waits to send: the reader exits."""
    make_tree(tmp_path / "archive", folders=60, per_folder=100)
    script = textwrap.dedent(
        f"""
        import sys, time
        from core.storage.folder_source import FolderSource
        from producer.read_ahead import ReadAhead, ReadAheadSpec

        if __name__ == "__main__":
            spec = FolderSource({str(tmp_path / "archive")!r}, max_file_bytes=1024).spec
            plan = ReadAheadSpec(spec, files=100, database_url=None, model_version=None)
            reader = ReadAhead(plan)
            with reader as batches:
                next(batches)
                print(reader.pid, flush=True)
                time.sleep(600)
        """
    )
    path = tmp_path / "scan.py"
    path.write_text(script)
    scan = subprocess.Popen(
        [sys.executable, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert scan.stdout is not None
        reader_pid = int(scan.stdout.readline())
        scan.kill()
        scan.wait(timeout=30)
        wait_for(lambda: not alive(reader_pid), timeout=60, what="the orphaned reader to exit")
    finally:
        if scan.poll() is None:
            scan.kill()


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie no longer does: its parent is gone and init reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
