"""Workers read only regular files inside the allowed roots, and refuse the rest with a reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import ImageError
from core.reasons import Reason
from core.storage import local as reading
from core.storage.reader import Reader
from core.uris import path_to_uri


@pytest.fixture(autouse=True, params=["descriptor", "resolved name"])
def confinement(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs both ways a reader confines: by the opened handle (Linux) and by name."""
    by_descriptor = request.param == "descriptor"
    if by_descriptor and not reading.CONFINE_BY_DESCRIPTOR:
        pytest.skip("no O_PATH or /proc/self/fd here")
    monkeypatch.setattr(reading, "CONFINE_BY_DESCRIPTOR", by_descriptor)
    return str(request.param)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"\xff\xd8 image bytes")
    (tmp_path / "secret.txt").write_text("outside")
    return root


def reason(reader: Reader, uri: str, root: Path) -> Reason:
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
    assert reason(reader, path_to_uri(tree.parent / "secret.txt"), tree) == Reason.OUTSIDE_ROOT
    assert reason(reader, path_to_uri(tree / ".." / "secret.txt"), tree) == Reason.OUTSIDE_ROOT
    assert reason(reader, path_to_uri("/etc/passwd"), tree) == Reason.OUTSIDE_ROOT


def test_symlink_escape_is_refused(tree: Path) -> None:
    (tree / "link.jpg").symlink_to(tree.parent / "secret.txt")
    reader = Reader(max_file_bytes=1000)
    assert reason(reader, path_to_uri(tree / "link.jpg"), tree) == Reason.OUTSIDE_ROOT


def test_outside_paths_say_only_that_they_are_outside(tree: Path) -> None:
    # Whether a path outside the roots exists, or may be opened, is not told to a queue message.
    (tree / "dangling.jpg").symlink_to(tree.parent / "nothing-here.jpg")
    (tree.parent / "closed").mkdir(mode=0o000)
    reader = Reader(max_file_bytes=1000)
    try:
        for path in (
            tree / "dangling.jpg",
            tree.parent / "nothing-here.jpg",
            tree.parent / "closed" / "x.jpg",
        ):
            assert reason(reader, path_to_uri(path), tree) == Reason.OUTSIDE_ROOT, path
    finally:
        (tree.parent / "closed").chmod(0o700)


def test_a_directory_on_the_way_that_links_out_of_the_root_is_refused(tree: Path) -> None:
    # As when the scan saw sub/ as a directory and it became a link out before a worker read.
    outside = tree.parent / "elsewhere"
    outside.mkdir()
    (outside / "b.jpg").write_bytes(b"outside bytes")
    (tree / "sub").symlink_to(outside, target_is_directory=True)
    reader = Reader(max_file_bytes=1000)
    assert reason(reader, path_to_uri(tree / "sub" / "b.jpg"), tree) == Reason.OUTSIDE_ROOT


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_without_read_permission_is_unreadable(tree: Path) -> None:
    (tree / "a.jpg").chmod(0o000)
    reader = Reader(max_file_bytes=1000)
    assert reason(reader, path_to_uri(tree / "a.jpg"), tree) == Reason.UNREADABLE


def test_a_link_inside_the_root_is_read(tree: Path) -> None:
    (tree / "alias.jpg").symlink_to(tree / "a.jpg")
    reader = Reader(max_file_bytes=1000)
    assert (
        reader.read(path_to_uri(tree / "alias.jpg"), path_to_uri(tree)) == b"\xff\xd8 image bytes"
    )


def test_configured_roots_narrow_further(tree: Path) -> None:
    (tree / "sub").mkdir()
    (tree / "sub" / "b.jpg").write_bytes(b"b")
    reader = Reader(max_file_bytes=1000, allowed_roots=[os.fsencode(tree / "sub")])
    assert reader.read(path_to_uri(tree / "sub" / "b.jpg"), path_to_uri(tree)) == b"b"
    assert reason(reader, path_to_uri(tree / "a.jpg"), tree) == Reason.OUTSIDE_ROOT


@pytest.mark.timeout(10)
def test_fifo_is_never_read(tree: Path) -> None:
    os.mkfifo(tree / "pipe.jpg")
    reader = Reader(max_file_bytes=1000)
    assert reason(reader, path_to_uri(tree / "pipe.jpg"), tree) == Reason.NOT_A_FILE


def test_directory_missing_and_large(tree: Path) -> None:
    (tree / "dir.jpg").mkdir()
    reader = Reader(max_file_bytes=5)
    assert reason(reader, path_to_uri(tree / "dir.jpg"), tree) == Reason.NOT_A_FILE
    assert reason(reader, path_to_uri(tree / "gone.jpg"), tree) == Reason.MISSING
    assert reason(reader, path_to_uri(tree / "a.jpg"), tree) == Reason.TOO_LARGE


@pytest.mark.parametrize("expected", [0, 10, 100, 5000])
def test_read_all_reads_the_whole_file_whatever_size_fstat_gave(
    tmp_path: Path, expected: int
) -> None:
    from core.storage.local import _read_all

    path = tmp_path / "grows.bin"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes: more than fstat "said" for most
    descriptor = os.open(path, os.O_RDONLY)
    try:
        assert _read_all(descriptor, 1 << 20, expected=expected) == path.read_bytes()
    finally:
        os.close(descriptor)


def test_read_all_refuses_a_file_that_grew_over_the_limit(tmp_path: Path) -> None:
    from core.errors import ImageTooLarge
    from core.storage.local import _read_all

    path = tmp_path / "grew.bin"
    path.write_bytes(b"x" * 100)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ImageTooLarge, match="grew over the byte limit"):
            _read_all(descriptor, 50, expected=40)  # fstat said 40, the file now holds 100
    finally:
        os.close(descriptor)
