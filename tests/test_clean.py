"""`scan_dataset` and `quarantine` on real files: hostile ones, duplicates, a FIFO, symlinks."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from core.errors import DataError
from core.reasons import Reason
from core.settings import LimitSettings
from tests.support.images import bomb_png
from training.clean import QUARANTINE_FOLDER_NAME, CleanReport, quarantine, scan_dataset


def limit_settings(**overrides: int) -> LimitSettings:
    # model_validate, not LimitSettings(): without pydantic's mypy plugin, mypy reads the
    # positional defaults in `Field(default, ...)` as required arguments.
    return LimitSettings.model_validate(overrides)


LIMITS = limit_settings()


def image_bytes(extension: str = ".jpg", size: int = 24, seed: int = 0) -> bytes:
    """A small noise image, unique per seed, encoded by OpenCV."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(extension, pixels)
    assert ok
    return encoded.tobytes()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def reasons_by_name(report: CleanReport) -> dict[str, Reason]:
    return {
        finding.path.relative_to(report.root).as_posix(): finding.reason
        for finding in report.findings
    }


@pytest.fixture
def hostile_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    jpeg = image_bytes(".jpg", seed=1)
    write(root / "happy" / "good.jpg", jpeg)
    write(root / "happy" / "png_named.jpg", image_bytes(".png", seed=2))
    write(root / "happy" / "nested" / "deep.bmp", image_bytes(".bmp", seed=3))
    write(root / "happy" / "good_copy.jpg", jpeg)
    write(root / "sad" / "corrupt.jpg", os.urandom(2000))
    write(root / "sad" / "empty.jpg", b"")
    write(root / "sad" / "notes.txt", b"not a picture\n")
    write(root / "sad" / "truncated.jpg", jpeg[: len(jpeg) // 2])
    write(root / "sad" / "tiny.png", image_bytes(".png", size=4, seed=4))
    write(root / "sad" / "bomb.png", bomb_png(100_000, 100_000))
    icon = io.BytesIO()
    Image.new("RGB", (16, 16)).save(icon, "ICO")
    write(root / "sad" / "icon.jpg", icon.getvalue())
    write(root / "sad" / ".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(100))
    write(root / "sad" / "ok.png", image_bytes(".png", seed=5))
    return root


def test_scan_judges_every_file_by_content(hostile_dataset: Path) -> None:
    report = scan_dataset(hostile_dataset, LIMITS)

    assert [good.path.relative_to(hostile_dataset).as_posix() for good in report.good] == [
        "happy/good.jpg",
        "happy/nested/deep.bmp",
        "happy/png_named.jpg",
        "sad/ok.png",
    ]
    assert reasons_by_name(report) == {
        "happy/good_copy.jpg": Reason.DUPLICATE,
        "sad/.DS_Store": Reason.NOT_AN_IMAGE,
        "sad/bomb.png": Reason.TOO_MANY_PIXELS,
        "sad/corrupt.jpg": Reason.NOT_AN_IMAGE,
        "sad/empty.jpg": Reason.EMPTY,
        "sad/icon.jpg": Reason.UNSUPPORTED_TYPE,
        "sad/notes.txt": Reason.NOT_AN_IMAGE,
        "sad/tiny.png": Reason.TOO_SMALL,
        "sad/truncated.jpg": Reason.CORRUPT,
    }
    assert report.scanned == len(report.good) + len(report.findings) == 13


def test_good_files_carry_hash_and_header_size(hostile_dataset: Path) -> None:
    report = scan_dataset(hostile_dataset, LIMITS)
    good = {item.path.name: item for item in report.good}
    assert (good["good.jpg"].width, good["good.jpg"].height) == (24, 24)
    assert len(good["good.jpg"].sha256) == 64
    assert len({item.sha256 for item in report.good}) == len(report.good)


def test_duplicate_points_at_first_copy_in_path_order(hostile_dataset: Path) -> None:
    report = scan_dataset(hostile_dataset, LIMITS)
    (duplicate,) = [f for f in report.findings if f.reason is Reason.DUPLICATE]
    assert duplicate.path == hostile_dataset / "happy" / "good_copy.jpg"
    assert duplicate.duplicate_of == hostile_dataset / "happy" / "good.jpg"


def test_copy_of_a_refused_file_gets_the_same_reason(tmp_path: Path) -> None:
    write(tmp_path / "a" / "1.txt", b"hello")
    write(tmp_path / "b" / "2.txt", b"hello")
    report = scan_dataset(tmp_path, LIMITS)
    first, second = report.findings
    assert first.reason is second.reason is Reason.NOT_AN_IMAGE
    assert second.duplicate_of == first.path


def test_without_decode_only_the_header_is_judged(hostile_dataset: Path) -> None:
    report = scan_dataset(hostile_dataset, LIMITS, check_decode=False)
    assert "sad/truncated.jpg" not in reasons_by_name(report)
    assert hostile_dataset / "sad" / "truncated.jpg" in [good.path for good in report.good]


def test_file_over_the_byte_limit_is_refused_unread(tmp_path: Path) -> None:
    write(tmp_path / "big.png", image_bytes(".png", size=64))
    report = scan_dataset(tmp_path, limit_settings(max_file_bytes=100))
    assert [finding.reason for finding in report.findings] == [Reason.TOO_LARGE]


def test_scan_order_and_result_are_deterministic(hostile_dataset: Path) -> None:
    first = scan_dataset(hostile_dataset, LIMITS).to_json()
    second = scan_dataset(hostile_dataset, LIMITS).to_json()
    assert first == second
    paths = [entry["path"] for entry in first["good"]]
    assert paths == sorted(paths)


def test_progress_counts_every_entry(hostile_dataset: Path) -> None:
    seen: list[int] = []
    report = scan_dataset(hostile_dataset, LIMITS, progress=seen.append)
    assert seen == list(range(1, report.scanned + 1))


def test_report_json_and_counts(hostile_dataset: Path) -> None:
    report = scan_dataset(hostile_dataset, LIMITS)
    document = report.to_json()
    assert document["scanned"] == 13
    assert document["counts_by_reason"] == report.counts_by_reason()
    assert report.counts_by_reason()["not_an_image"] == 3
    assert list(report.counts_by_reason()) == sorted(report.counts_by_reason())
    duplicate = next(item for item in document["findings"] if item["reason"] == "duplicate")
    assert duplicate == {
        "path": "happy/good_copy.jpg",
        "reason": "duplicate",
        "detail": "same content as good.jpg",
        "duplicate_of": "happy/good.jpg",
    }


@pytest.mark.timeout(10)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
def test_fifo_is_reported_and_never_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "happy" / "a.png", image_bytes(".png"))
    fifo = tmp_path / "happy" / "pipe.jpg"
    os.mkfifo(fifo)
    opened: list[str] = []
    real_open = os.open

    def recording_open(path: str | os.PathLike[str], flags: int, *args: int, **kwargs: int) -> int:
        opened.append(os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    report = scan_dataset(tmp_path, LIMITS)

    assert [(f.path, f.reason) for f in report.findings] == [(fifo, Reason.NOT_A_FILE)]
    assert "FIFO" in report.findings[0].detail
    assert os.fspath(fifo) not in opened
    assert os.fspath(tmp_path / "happy" / "a.png") in opened


def test_symlinked_folder_is_not_followed(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside" / "x.png", image_bytes(".png")).parent
    root = tmp_path / "data"
    write(root / "happy" / "a.png", image_bytes(".png", seed=9))
    (root / "linked").symlink_to(outside, target_is_directory=True)
    report = scan_dataset(root, LIMITS)
    assert [good.path.name for good in report.good] == ["a.png"]
    assert reasons_by_name(report) == {"linked": Reason.NOT_A_FILE}


def test_symlinked_file_is_judged_and_broken_link_is_missing(tmp_path: Path) -> None:
    target = write(tmp_path / "outside.png", image_bytes(".png"))
    root = tmp_path / "data"
    write(root / "happy" / "a.png", image_bytes(".png", seed=9))
    (root / "happy" / "link.png").symlink_to(target)
    (root / "happy" / "broken.png").symlink_to(tmp_path / "gone.png")
    report = scan_dataset(root, LIMITS)
    assert [good.path.name for good in report.good] == ["a.png", "link.png"]
    assert reasons_by_name(report) == {"happy/broken.png": Reason.MISSING}


def test_unreadable_file_is_a_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores permission bits, so a chmod 000 cannot prove this here; fail the open instead.
    locked = write(tmp_path / "happy" / "locked.png", image_bytes(".png"))
    real_open = os.open

    def refusing_open(path: str | os.PathLike[str], flags: int, *args: int, **kwargs: int) -> int:
        if os.fspath(path) == os.fspath(locked):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    report = scan_dataset(tmp_path, LIMITS)
    assert [(f.path, f.reason) for f in report.findings] == [(locked, Reason.UNREADABLE)]
    assert "Permission denied" in report.findings[0].detail


def test_quarantine_folder_inside_the_dataset_is_never_scanned(tmp_path: Path) -> None:
    write(tmp_path / "happy" / "a.png", image_bytes(".png"))
    write(tmp_path / "happy" / QUARANTINE_FOLDER_NAME / "bad.jpg", b"junk")
    report = scan_dataset(tmp_path, LIMITS)
    assert report.scanned == 1
    assert report.findings == []


@pytest.mark.parametrize(
    "make", [lambda root: root / "missing", lambda root: write(root / "f", b"x")]
)
def test_scan_refuses_a_root_that_is_not_a_folder(
    tmp_path: Path, make: Callable[[Path], Path]
) -> None:
    with pytest.raises(DataError):
        scan_dataset(make(tmp_path), LIMITS)


def all_files(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def test_quarantine_moves_findings_and_deletes_nothing(
    hostile_dataset: Path, tmp_path: Path
) -> None:
    before = all_files(hostile_dataset)
    report = scan_dataset(hostile_dataset, LIMITS)
    destination = tmp_path / "quarantine"

    moved = quarantine(report, destination)

    assert {source for source, _ in moved} == {finding.path for finding in report.findings}
    for source, target in moved:
        assert not source.exists()
        assert target == destination / source.relative_to(hostile_dataset)
    after = all_files(hostile_dataset)
    quarantined = all_files(destination)
    assert set(after) | set(quarantined) == set(before)
    assert not set(after) & set(quarantined)
    assert {**after, **quarantined} == before
    assert scan_dataset(hostile_dataset, LIMITS).findings == []


def test_quarantine_filters_by_reason(hostile_dataset: Path, tmp_path: Path) -> None:
    report = scan_dataset(hostile_dataset, LIMITS)
    moved = quarantine(report, tmp_path / "q", reasons={Reason.DUPLICATE, Reason.EMPTY})
    assert sorted(source.name for source, _ in moved) == ["empty.jpg", "good_copy.jpg"]


def test_quarantine_never_overwrites(tmp_path: Path) -> None:
    root = tmp_path / "data"
    destination = tmp_path / "q"
    write(destination / "happy" / "bad.jpg", b"older quarantined file")
    write(destination / "happy" / "bad-1.jpg", b"another one")
    write(root / "happy" / "bad.jpg", b"new junk")

    moved = quarantine(scan_dataset(root, LIMITS), destination)

    assert moved == [(root / "happy" / "bad.jpg", destination / "happy" / "bad-2.jpg")]
    assert (destination / "happy" / "bad.jpg").read_bytes() == b"older quarantined file"
    assert (destination / "happy" / "bad-1.jpg").read_bytes() == b"another one"
    assert (destination / "happy" / "bad-2.jpg").read_bytes() == b"new junk"


@pytest.mark.timeout(10)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
def test_quarantine_leaves_a_fifo_in_place(tmp_path: Path) -> None:
    root = tmp_path / "data"
    fifo = root / "happy" / "pipe"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    write(root / "happy" / "junk.jpg", b"junk")
    moved = quarantine(scan_dataset(root, LIMITS), tmp_path / "q")
    assert [source.name for source, _ in moved] == ["junk.jpg"]
    assert fifo.exists()


def test_quarantine_refuses_a_destination_inside_the_dataset(hostile_dataset: Path) -> None:
    report = scan_dataset(hostile_dataset, LIMITS)
    before = all_files(hostile_dataset)
    for inside in (
        hostile_dataset,
        hostile_dataset / "happy" / "q",
        hostile_dataset / ".." / "data" / "q",
    ):
        with pytest.raises(DataError, match="inside the dataset"):
            quarantine(report, inside)
    assert all_files(hostile_dataset) == before


def test_quarantine_skips_files_already_gone(tmp_path: Path) -> None:
    root = tmp_path / "data"
    junk = write(root / "happy" / "junk.jpg", b"junk")
    report = scan_dataset(root, LIMITS)
    junk.unlink()
    assert quarantine(report, tmp_path / "q") == []
