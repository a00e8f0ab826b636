"""Workers read only regular files inside the allowed roots, and refuse the rest with a reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from emolabel.errors import ImageError, ReasonCode
from producer.uris import path_to_uri
from worker.reading import Reader


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"\xff\xd8 image bytes")
    (tmp_path / "secret.txt").write_text("outside")
    return root


def reason(reader: Reader, uri: str, root: Path) -> ReasonCode:
    with pytest.raises(ImageError) as caught:
        reader.read(uri, path_to_uri(root))
    return caught.value.reason


def test_reads_a_file_inside_the_root(tree: Path) -> None:
    reader = Reader(max_file_bytes=1000)
    assert reader.read(path_to_uri(tree / "a.jpg"), path_to_uri(tree)) == b"\xff\xd8 image bytes"


def test_non_utf8_name(tree: Path) -> None:
    name = os.fsencode(tree) + b"/caf\xe9.jpg"
    with open(name, "wb") as handle:  # noqa: PTH123 - bytes path
        handle.write(b"x")
    assert Reader(max_file_bytes=10).read(path_to_uri(name), path_to_uri(tree)) == b"x"


def test_outside_root_is_refused(tree: Path) -> None:
    reader = Reader(max_file_bytes=1000)
    assert reason(reader, path_to_uri(tree.parent / "secret.txt"), tree) == ReasonCode.OUTSIDE_ROOT
    assert reason(reader, path_to_uri(tree / ".." / "secret.txt"), tree) == ReasonCode.OUTSIDE_ROOT
    assert reason(reader, path_to_uri("/etc/passwd"), tree) == ReasonCode.OUTSIDE_ROOT


def test_symlink_escape_is_refused(tree: Path) -> None:
    (tree / "link.jpg").symlink_to(tree.parent / "secret.txt")
    reader = Reader(max_file_bytes=1000)
    assert reason(reader, path_to_uri(tree / "link.jpg"), tree) == ReasonCode.OUTSIDE_ROOT


def test_configured_roots_narrow_further(tree: Path) -> None:
    (tree / "sub").mkdir()
    (tree / "sub" / "b.jpg").write_bytes(b"b")
    reader = Reader(max_file_bytes=1000, allowed_roots=[os.fsencode(tree / "sub")])
    assert reader.read(path_to_uri(tree / "sub" / "b.jpg"), path_to_uri(tree)) == b"b"
    assert reason(reader, path_to_uri(tree / "a.jpg"), tree) == ReasonCode.OUTSIDE_ROOT


@pytest.mark.timeout(10)
def test_fifo_is_never_read(tree: Path) -> None:
    os.mkfifo(tree / "pipe.jpg")
    reader = Reader(max_file_bytes=1000)
    assert reason(reader, path_to_uri(tree / "pipe.jpg"), tree) == ReasonCode.NOT_A_FILE


def test_directory_missing_and_large(tree: Path) -> None:
    (tree / "dir.jpg").mkdir()
    reader = Reader(max_file_bytes=5)
    assert reason(reader, path_to_uri(tree / "dir.jpg"), tree) == ReasonCode.NOT_A_FILE
    assert reason(reader, path_to_uri(tree / "gone.jpg"), tree) == ReasonCode.MISSING
    assert reason(reader, path_to_uri(tree / "a.jpg"), tree) == ReasonCode.TOO_LARGE


@pytest.mark.parametrize("expected", [0, 10, 100, 5000])
def test_read_all_reads_the_whole_file_whatever_size_fstat_gave(
    tmp_path: Path, expected: int
) -> None:
    from worker.reading import _read_all

    path = tmp_path / "grows.bin"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes: more than fstat "said" for most
    descriptor = os.open(path, os.O_RDONLY)
    try:
        assert _read_all(descriptor, 1 << 20, expected=expected) == path.read_bytes()
    finally:
        os.close(descriptor)


def test_read_all_refuses_a_file_that_grew_over_the_limit(tmp_path: Path) -> None:
    from emolabel.errors import ImageTooLarge
    from worker.reading import _read_all

    path = tmp_path / "grew.bin"
    path.write_bytes(b"x" * 100)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ImageTooLarge, match="grew over the byte limit"):
            _read_all(descriptor, 50, expected=40)  # fstat said 40, the file now holds 100
    finally:
        os.close(descriptor)
