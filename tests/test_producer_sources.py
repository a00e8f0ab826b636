"""Folder and S3 sources, on real files under tmp_path and a real local S3 server (moto)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigError
from core.storage.sources import Entry, FolderSource, Reason, S3Source, open_source
from core.uris import display_name, parse_s3_uri, path_to_uri, s3_uri, uri_to_path

MiB = 1024 * 1024
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
GIF_HEAD = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
TEXT = b"just some notes, not a photo\n"


def png_bytes() -> bytes:
    """A real 1x1 grey PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
        + chunk(b"IEND", b"")
    )


PNG = png_bytes()


def write(path: Path | bytes, content: bytes) -> None:
    with open(path, "wb") as file:  # noqa: PTH123 (bytes paths for names that are not UTF-8)
        file.write(content)


def walk(root: Path, **options: Any) -> list[Entry]:
    options.setdefault("max_file_bytes", MiB)
    return list(FolderSource(root, **options).iter_entries())


def by_path(entries: list[Entry]) -> dict[bytes, Entry]:
    return {uri_to_path(entry.uri): entry for entry in entries}


def path_of(path: Path) -> bytes:
    return os.fsencode(path)


def open_descriptors() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


# --- folders ---------------------------------------------------------------------------------


def test_walks_nested_folders_in_a_stable_order(tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    write(tmp_path / "top.png", PNG)
    write(tmp_path / "B.jpg", JPEG_HEAD)
    write(tmp_path / "a" / "mid.gif", GIF_HEAD)
    write(tmp_path / "a" / "b" / "c" / "deep.png", PNG)
    (tmp_path / "a" / "empty-folder").mkdir()

    entries = walk(tmp_path)

    assert [display_name(entry.uri) for entry in entries] == [
        f"{tmp_path}/B.jpg",
        f"{tmp_path}/a/b/c/deep.png",
        f"{tmp_path}/a/mid.gif",
        f"{tmp_path}/top.png",
    ]
    assert [entry.image_type for entry in entries] == ["jpeg", "png", "gif", "png"]
    assert all(entry.usable and entry.name_bytes is None for entry in entries)
    assert entries == walk(tmp_path)


def test_entry_records_size_mtime_and_fingerprint(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    write(photo, PNG)
    os.utime(photo, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))

    [entry] = walk(tmp_path)

    assert entry.size_bytes == len(PNG)
    assert entry.mtime_ns == 1_600_000_000_123_456_789
    assert entry.fingerprint == f"{len(PNG)}-1600000000123456789"
    os.utime(photo, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert walk(tmp_path)[0].fingerprint != entry.fingerprint


def test_non_utf8_names_round_trip_through_the_uri(tmp_path: Path) -> None:
    root = path_of(tmp_path)
    folder = root + b"/\xff\xfeodd"
    os.mkdir(folder)  # noqa: PTH102 (bytes path)
    write(root + b"/caf\xe9.jpg", JPEG_HEAD)
    write(folder + b"/plain.png", PNG)

    entries = by_path(walk(tmp_path))

    latin1 = entries[root + b"/caf\xe9.jpg"]
    assert latin1.image_type == "jpeg"
    assert latin1.name_bytes == root + b"/caf\xe9.jpg"
    assert latin1.uri.isascii() and latin1.uri.endswith("/caf%E9.jpg")
    with open(uri_to_path(latin1.uri), "rb") as file:  # noqa: PTH123 (bytes path)
        assert file.read() == JPEG_HEAD
    assert display_name(latin1.uri).endswith("caf\\xe9.jpg")
    assert entries[folder + b"/plain.png"].name_bytes == folder + b"/plain.png"


def test_long_and_unusual_names(tmp_path: Path) -> None:
    long_name = "x" * 196 + ".png"
    unusual = "café 100% #1?;&=+ .jpg"
    write(tmp_path / long_name, PNG)
    write(tmp_path / unusual, JPEG_HEAD)
    write(tmp_path / ".hidden.png", PNG)

    entries = by_path(walk(tmp_path))

    assert len(long_name) == 200
    assert entries[path_of(tmp_path / long_name)].image_type == "png"
    assert entries[path_of(tmp_path / unusual)].image_type == "jpeg"
    assert entries[path_of(tmp_path / ".hidden.png")].image_type == "png"
    for path, entry in entries.items():
        assert uri_to_path(entry.uri) == path
        assert entry.name_bytes is None


def test_content_decides_the_type_not_the_extension(tmp_path: Path) -> None:
    write(tmp_path / "notes.jpg", TEXT)
    write(tmp_path / "really-a-png.jpg", PNG)
    write(tmp_path / "no-extension", GIF_HEAD)
    write(tmp_path / "empty.jpg", b"")

    entries = by_path(walk(tmp_path))

    notes = entries[path_of(tmp_path / "notes.jpg")]
    assert (notes.skip_reason, notes.image_type) == (Reason.NOT_AN_IMAGE, None)
    assert notes.skip_message is not None and "6a 75 73 74" in notes.skip_message
    assert entries[path_of(tmp_path / "really-a-png.jpg")].image_type == "png"
    assert entries[path_of(tmp_path / "no-extension")].image_type == "gif"
    empty = entries[path_of(tmp_path / "empty.jpg")]
    assert (empty.skip_reason, empty.size_bytes) == ("empty", 0)


def test_files_over_the_limit_are_skipped_unread(tmp_path: Path) -> None:
    write(tmp_path / "big.png", PNG + b"\x00" * 2000)
    write(tmp_path / "small.png", PNG)

    entries = by_path(walk(tmp_path, max_file_bytes=1000))

    assert entries[path_of(tmp_path / "big.png")].skip_reason == "too_large"
    assert entries[path_of(tmp_path / "small.png")].usable


def test_a_folder_named_like_an_image_is_walked(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").mkdir()
    write(tmp_path / "x.jpg" / "inside.png", PNG)

    entries = walk(tmp_path)

    assert [uri_to_path(entry.uri) for entry in entries] == [path_of(tmp_path / "x.jpg/inside.png")]


@pytest.mark.timeout(10)
def test_fifos_and_sockets_are_reported_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.jpg")
    write(tmp_path / "y.png", PNG)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(os.fsdecode(tmp_path / "s.jpg"))

        entries = by_path(walk(tmp_path))

    fifo = entries[path_of(tmp_path / "x.jpg")]
    assert fifo.skip_reason == "not_a_file"
    assert fifo.skip_message is not None and "FIFO" in fifo.skip_message
    assert entries[path_of(tmp_path / "s.jpg")].skip_reason == "not_a_file"
    assert entries[path_of(tmp_path / "y.png")].usable


@pytest.mark.timeout(10)
def test_a_file_turned_into_a_fifo_before_open_does_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "x.jpg", JPEG_HEAD)
    real_open = os.open

    def open_after_swap(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == b"x.jpg":  # lstat said "regular file"; now the race happens
            (tmp_path / "x.jpg").unlink()
            os.mkfifo(tmp_path / "x.jpg")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_swap)

    [entry] = walk(tmp_path)

    assert entry.skip_reason == "not_a_file"
    assert entry.skip_message is not None and "became a named pipe" in entry.skip_message


@pytest.mark.timeout(10)
def test_symlink_loops_end(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "photo.png", PNG)
    (tmp_path / "sub" / "up").symlink_to("..")
    (tmp_path / "sub" / "self").symlink_to(".")
    (tmp_path / "me").symlink_to("me")
    (tmp_path / "ping").symlink_to("pong")
    (tmp_path / "pong").symlink_to("ping")

    entries = by_path(walk(tmp_path))

    assert entries[path_of(tmp_path / "sub/photo.png")].usable
    for name in ["sub/up", "sub/self", "me", "ping", "pong"]:
        assert entries[path_of(tmp_path / name)].skip_reason == "symlink_loop", name
    assert len(entries) == 6


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_files_and_folders_without_permission_are_unreadable(tmp_path: Path) -> None:
    write(tmp_path / "locked.png", PNG)
    (tmp_path / "locked-folder").mkdir()
    write(tmp_path / "locked-folder" / "inside.png", PNG)
    (tmp_path / "locked.png").chmod(0)
    (tmp_path / "locked-folder").chmod(0)
    try:
        entries = by_path(walk(tmp_path))
    finally:
        (tmp_path / "locked-folder").chmod(0o755)

    assert entries[path_of(tmp_path / "locked.png")].skip_reason == "unreadable"
    assert entries[path_of(tmp_path / "locked-folder")].skip_reason == "unreadable"


def test_links_out_of_the_root_are_not_followed_or_read(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    (outside / "album").mkdir(parents=True)
    write(outside / "secret.png", PNG)
    write(outside / "album" / "holiday.png", PNG)
    old = time.time_ns() - 3_600 * 10**9
    # atime before mtime: on relatime mounts the next read would move it.
    os.utime(outside / "secret.png", ns=(old, old + 10**9))
    (root / "secret.png").symlink_to(outside / "secret.png")
    (root / "album").symlink_to(outside / "album")
    (root / "relative.png").symlink_to("../outside/secret.png")

    entries = walk(root)

    assert [entry.skip_reason for entry in entries] == ["symlink_outside_root"] * 3
    assert not any(entry.usable for entry in entries)
    assert (outside / "secret.png").stat().st_atime_ns == old


def test_links_inside_the_root_label_the_target_once(tmp_path: Path) -> None:
    (tmp_path / "originals").mkdir()
    (tmp_path / "albums").mkdir()
    write(tmp_path / "originals" / "a.png", PNG)
    (tmp_path / "albums" / "best.png").symlink_to("../originals/a.png")
    (tmp_path / "albums" / "all").symlink_to(tmp_path / "originals")
    (tmp_path / "albums" / "gone.png").symlink_to("../originals/deleted.png")

    entries = by_path(walk(tmp_path))

    usable = [path for path, entry in entries.items() if entry.usable]
    assert usable == [path_of(tmp_path / "originals/a.png")]
    for name in ["albums/best.png", "albums/all"]:
        link = entries[path_of(tmp_path / name)]
        assert link.skip_reason == "duplicate"
        assert link.skip_message is not None and "originals" in link.skip_message
    assert entries[path_of(tmp_path / "albums/gone.png")].skip_reason == "missing"


def test_links_are_left_alone_when_following_is_off(tmp_path: Path) -> None:
    write(tmp_path / "a.png", PNG)
    (tmp_path / "b.png").symlink_to("a.png")

    entries = by_path(walk(tmp_path, follow_symlinks=False))

    assert entries[path_of(tmp_path / "b.png")].skip_reason == "not_a_file"
    assert entries[path_of(tmp_path / "a.png")].usable


def test_files_deleted_during_the_walk_do_not_crash_it(tmp_path: Path) -> None:
    for name in "abcde":
        write(tmp_path / f"{name}.png", PNG)
    (tmp_path / "f").mkdir()
    write(tmp_path / "f" / "inner.png", PNG)

    iterator = FolderSource(tmp_path, max_file_bytes=MiB).iter_entries()
    first = next(iterator)
    for name in "bcd":
        (tmp_path / f"{name}.png").unlink()
    shutil.rmtree(tmp_path / "f")
    rest = list(iterator)

    assert first.usable and first.uri == path_to_uri(tmp_path / "a.png")
    assert [(display_name(entry.uri), entry.skip_reason) for entry in rest] == [
        (f"{tmp_path}/b.png", "missing"),
        (f"{tmp_path}/c.png", "missing"),
        (f"{tmp_path}/d.png", "missing"),
        (f"{tmp_path}/e.png", None),
        (f"{tmp_path}/f", "missing"),
    ]


@pytest.mark.timeout(10)
def test_a_folder_swapped_for_a_link_mid_walk_is_not_entered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    write(tmp_path / "outside" / "secret.png", PNG)
    real_open = os.open

    def open_after_swap(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == b"sub":  # lstat said "folder"; now it becomes a link out of the root
            (root / "sub").rmdir()
            (root / "sub").symlink_to(tmp_path / "outside")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_swap)

    [entry] = walk(root)

    assert (entry.uri, entry.skip_reason) == (path_to_uri(root / "sub"), "unreadable")


def test_abandoning_a_walk_closes_its_folders(tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    for folder in ["a", "a/b", "a/b/c"]:
        write(tmp_path / folder / "photo.png", PNG)
    before = open_descriptors()

    iterator = FolderSource(tmp_path, max_file_bytes=MiB).iter_entries()
    next(iterator)
    assert open_descriptors() > before  # a, a/b, a/b/c and the root are open
    iterator.close()

    assert open_descriptors() == before


def test_a_root_that_is_not_a_folder_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "file.png", PNG)

    with pytest.raises(ConfigError, match="not a folder"):
        FolderSource(tmp_path / "file.png", max_file_bytes=MiB)
    with pytest.raises(ConfigError, match="cannot read folder"):
        FolderSource(tmp_path / "nowhere", max_file_bytes=MiB)


def test_a_root_given_through_a_link_is_walked_under_its_real_path(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    write(tmp_path / "real" / "a.png", PNG)
    (tmp_path / "alias").symlink_to("real")

    source = FolderSource(tmp_path / "alias", max_file_bytes=MiB)

    assert source.uri == path_to_uri(tmp_path / "real")
    assert [entry.uri for entry in source.iter_entries()] == [path_to_uri(tmp_path / "real/a.png")]


@pytest.mark.parametrize(
    ("folders", "files_per_folder", "limit"), [(40, 500, 1 * MiB), (1, 20_000, 5 * MiB)]
)
def test_walking_is_constant_memory(
    tmp_path: Path, folders: int, files_per_folder: int, limit: int
) -> None:
    for folder in range(folders):
        directory = tmp_path / f"folder-{folder:03d}"
        directory.mkdir()
        for number in range(files_per_folder):
            write(directory / f"photo-{number:05d}.png", PNG[:16])
    source = FolderSource(tmp_path, max_file_bytes=MiB)

    tracemalloc.start()
    try:
        count = sum(1 for entry in source.iter_entries() if entry.image_type == "png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert count == 20_000
    # The walk holds the sorted names of the folders on its path (1.2 MB for 20,000), no more.
    assert peak < limit, f"peak {peak / MiB:.2f} MiB"


# --- choosing a source -----------------------------------------------------------------------


def test_open_source_chooses_by_scheme(tmp_path: Path) -> None:
    write(tmp_path / "a.png", PNG)

    for location in [str(tmp_path), path_to_uri(tmp_path)]:
        source = open_source(location, max_file_bytes=MiB)
        assert isinstance(source, FolderSource)
        assert [entry.image_type for entry in source.iter_entries()] == ["png"]
    s3 = open_source("s3://bucket/prefix", max_file_bytes=MiB, key="k", secret="s")
    assert isinstance(s3, S3Source)
    assert s3.uri == "s3://bucket/prefix/"
    with pytest.raises(ConfigError, match="unsupported source https://"):
        open_source("https://example.org/photos", max_file_bytes=MiB)


def test_a_non_utf8_folder_opens_from_its_uri(tmp_path: Path) -> None:
    folder = path_of(tmp_path) + b"/\xe9t\xe9"
    os.mkdir(folder)  # noqa: PTH102 (bytes path)
    write(folder + b"/a.png", PNG)

    source = open_source(path_to_uri(folder), max_file_bytes=MiB)

    assert [uri_to_path(entry.uri) for entry in source.iter_entries()] == [folder + b"/a.png"]


def test_the_producer_loads_no_tensorflow_keras_or_opencv(tmp_path: Path) -> None:
    write(tmp_path / "a.png", PNG)
    program = f"""
import sys
import producer.chunking, core.storage.sniff, core.storage.sources, core.uris
import producer.enqueue, db.repository
from core.storage.sources import FolderSource, S3Source
source = FolderSource({str(tmp_path)!r}, max_file_bytes=1 << 20)
assert [entry.image_type for entry in source.iter_entries()] == ["png"]
S3Source("s3://bucket/prefix", key="k", secret="s", max_file_bytes=1 << 20)
loaded = sorted(name for name in ("tensorflow", "keras", "cv2") if name in sys.modules)
assert not loaded, loaded
"""
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 0, result.stderr


# --- S3 --------------------------------------------------------------------------------------


CREDENTIALS = {"key": "testing", "secret": "testing", "region": "us-east-1"}


@pytest.fixture
def bucket(s3_endpoint: str) -> tuple[Any, str]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    name = f"photos-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


def s3_walk(endpoint: str, url: str, max_file_bytes: int = MiB) -> list[Entry]:
    source = S3Source(url, endpoint_url=endpoint, max_file_bytes=max_file_bytes, **CREDENTIALS)
    return list(source.iter_entries())


def test_s3_source_lists_sniffs_and_skips(s3_endpoint: str, bucket: tuple[Any, str]) -> None:
    client, name = bucket
    objects = {
        "photos/a.png": PNG,
        "photos/nested/deep/b.jpg": JPEG_HEAD,
        "photos/notes.jpg": TEXT,
        "photos/empty.png": b"",
        "photos/big.png": PNG + b"\x00" * 2000,
        "photos/marker/": b"",
        "photos/café 100% #1?.gif": GIF_HEAD,
        "photos/a?versionId=1.png": PNG,  # verbatim, not parsed as a version
        "photos//double slash.png": PNG,
        "photos2/not-below-the-prefix.png": PNG,
        "other/x.png": PNG,
    }
    for key, body in objects.items():
        client.put_object(Bucket=name, Key=key, Body=body)
    client.put_object(Bucket=name, Key="photos/cold.png", Body=PNG, StorageClass="GLACIER")
    started_ns = time.time_ns()

    entries = s3_walk(s3_endpoint, f"s3://{name}/photos", max_file_bytes=1000)

    found = {parse_s3_uri(entry.uri)[1]: entry for entry in entries}
    assert list(found) == sorted(found)  # S3 lists in key order
    assert {key: (entry.image_type, entry.skip_reason) for key, entry in found.items()} == {
        "photos/a.png": ("png", None),
        "photos/nested/deep/b.jpg": ("jpeg", None),
        "photos/notes.jpg": (None, "not_an_image"),
        "photos/empty.png": (None, "empty"),
        "photos/big.png": (None, "too_large"),
        "photos/café 100% #1?.gif": ("gif", None),
        "photos/a?versionId=1.png": ("png", None),
        "photos//double slash.png": ("png", None),
        "photos/cold.png": (None, "unreadable"),
    }
    png = found["photos/a.png"]
    etag = client.head_object(Bucket=name, Key="photos/a.png")["ETag"].strip('"')
    assert png.uri == f"s3://{name}/photos/a.png"
    assert (png.size_bytes, png.fingerprint) == (len(PNG), f"{len(PNG)}-{etag}")
    assert abs(png.mtime_ns - started_ns) < 120 * 10**9
    assert found["photos/café 100% #1?.gif"].uri == s3_uri(name, "photos/café 100% #1?.gif")
    assert all(entry.name_bytes is None for entry in entries)


@pytest.mark.slow
def test_s3_source_pages_through_many_keys(s3_endpoint: str, bucket: tuple[Any, str]) -> None:
    client, name = bucket
    keys = [f"many/{number:05d}.png" for number in range(1_050)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=name, Key=key, Body=PNG), keys))

    entries = s3_walk(s3_endpoint, f"s3://{name}/many/")

    assert [parse_s3_uri(entry.uri)[1] for entry in entries] == keys
    assert all(entry.image_type == "png" for entry in entries)


def test_s3_source_refuses_a_missing_bucket(s3_endpoint: str) -> None:
    expected = r"cannot list s3://no-such-bucket-here/photos/: NoSuchBucket"
    with pytest.raises(ConfigError, match=expected):
        s3_walk(s3_endpoint, "s3://no-such-bucket-here/photos")


def test_s3_source_needs_a_bucket() -> None:
    with pytest.raises(ConfigError, match="bad S3 location"):
        S3Source("s3:///photos", max_file_bytes=MiB, **CREDENTIALS)


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [(404, "NoSuchKey", "missing"), (403, "AccessDenied", "unreadable"), (503, "SlowDown", None)],
)
def test_s3_read_failures_are_data_but_outages_stop_the_scan(
    status: int, code: str, expected: str | None
) -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    from core.storage.s3 import _read_failure

    error = ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )
    if expected is None:
        with pytest.raises(ClientError):
            _read_failure(error)
    else:
        assert _read_failure(error)[0] == expected
    with pytest.raises(EndpointConnectionError):
        _read_failure(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))


# --- runs: a listing the producer can trust without reading ------------------------------------


def test_runs_list_what_iter_entries_lists_and_change_only_where_the_folder_did(
    tmp_path: Path,
) -> None:
    from core.storage.folder_source import MAX_RUN_FILES

    root = tmp_path / "tree"
    for name in ("a.png", "b.png", "sub/c.png", "sub/d.txt", "z.png", "other/e.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write(root / name, png_bytes())
    (root / "other" / "link.png").symlink_to(root / "a.png")
    (root / "many").mkdir()
    for index in range(MAX_RUN_FILES + 2):  # one folder longer than a run
        (root / "many" / f"{index:05d}.png").write_bytes(b"")
    source = FolderSource(root, max_file_bytes=MiB)

    def listing() -> list[tuple[str, str, int, bool, list[Entry]]]:
        return [(r.key, r.digest, r.files, r.plain, r.read()) for r in source.iter_runs()]

    runs = listing()
    assert [entry for *_, entries in runs for entry in entries] == list(source.iter_entries())
    files = {tuple(e.uri.rsplit("/", 1)[-1] for e in entries): plain for *_, plain, entries in runs}
    # The root's files before and after its subfolders are two runs, with two keys.
    assert files[("a.png", "b.png")] is True and files[("z.png",)] is True
    assert files[("e.png", "link.png")] is False  # a link: read every time
    assert sorted(len(entries) for *_, entries in runs if "/many/" in entries[0].uri) == [
        2,
        MAX_RUN_FILES,
    ]
    assert len({key for key, *_ in runs}) == len(runs)
    assert listing() == runs  # the same tree lists the same keys and digests

    os.utime(root / "z.png", ns=(1_900_000_000_000_000_000,) * 2)
    changed = {key: digest for key, digest, *_ in listing()}
    assert [key for key, digest, *_ in runs if changed[key] != digest] == [
        key for key, *_, entries in runs if entries[0].uri.endswith("/z.png")
    ]

    run = next(iter(source.iter_runs()))
    run.release()
    with pytest.raises(RuntimeError, match="released"):
        run.read()


def test_s3_runs_list_what_iter_entries_lists_and_change_only_where_an_object_did(
    s3_endpoint: str, bucket: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.storage.s3_source

    monkeypatch.setattr(core.storage.s3_source, "MAX_RUN_FILES", 3)
    client, name = bucket
    keys = ["p/a.png", "p/b.txt", "p/b/c.png", "p/b/d/e.png", "p/b0.png", "p/big.png"]
    keys += [f"p/many/{index}.png" for index in range(5)]  # one folder longer than a run
    for key in keys:
        client.put_object(Bucket=name, Key=key, Body=PNG if key.endswith(".png") else TEXT)
    client.put_object(Bucket=name, Key="p/b/", Body=b"")  # a folder marker: in no run
    source = S3Source(f"s3://{name}/p", endpoint_url=s3_endpoint, max_file_bytes=MiB, **CREDENTIALS)

    def listing() -> list[tuple[str, str, int, list[Entry]]]:
        runs = list(source.iter_runs())
        for run in runs:
            run.prefetch()
        return [(r.key, r.digest, r.files, r.read()) for r in runs]

    runs = listing()
    assert [entry for *_, entries in runs for entry in entries] == list(source.iter_entries())
    names = [[e.uri.split("/p/", 1)[1] for e in entries] for *_, entries in runs]
    # p/ before its subfolder b/, then after it: two runs of one folder, with two keys.
    assert names == [
        ["a.png", "b.txt"],
        ["b/c.png"],
        ["b/d/e.png"],
        ["b0.png", "big.png"],
        ["many/0.png", "many/1.png", "many/2.png"],
        ["many/3.png", "many/4.png"],
    ]
    assert [files for _, _, files, _ in runs] == [len(n) for n in names]
    assert len({key for key, *_ in runs}) == len(runs)
    assert listing() == runs  # the same bucket lists the same keys and digests

    client.put_object(Bucket=name, Key="p/many/4.png", Body=PNG + b"\0")
    changed = {key: digest for key, digest, *_ in listing()}
    assert [key for key, digest, *_ in runs if changed[key] != digest] == [runs[-1][0]]
