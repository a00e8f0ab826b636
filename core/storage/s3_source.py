"""Walk an `s3://bucket/prefix` a page of keys at a time, sniffing each object's first bytes.

The listing is boto3's `list_objects_v2` paginator, page by page, so memory does not grow with
the bucket; each page's ranged GETs (`HEAD_BYTES` each) run on a pool of threads sharing one
client, which is what makes sniffing millions of objects bearable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from core.errors import ConfigError
from core.reasons import Reason
from core.storage import s3
from core.storage.entries import MAX_RUN_FILES, Entry, Run
from core.storage.sniff import HEAD_BYTES, sniff_image_type
from core.uris import parse_s3_uri, s3_dot_segment, s3_uri

CONCURRENT_READS = 32
"""Ranged GETs in flight at once while a listing page is sniffed."""

# Objects in these classes must be restored before a GET can read them.
_ARCHIVED_STORAGE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class S3Source:
    """Every object below an S3 prefix, in key order (the order S3 lists them)."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        key: str | None = None,
        secret: str | None = None,
        region: str | None = None,
        max_file_bytes: int,
    ) -> None:
        """Parse `s3://bucket/prefix`; without `key` and `secret`, boto's usual chain applies.

        A non-empty prefix names a folder: `s3://b/photos` lists `photos/...`, not `photos2/`.
        The prefix is percent-decoded like the URIs this source yields. Nothing is contacted
        until `iter_entries` runs.
        """
        if max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be at least 1, got {max_file_bytes}")
        try:
            bucket, prefix = parse_s3_uri(url)
        except ValueError as error:
            raise ConfigError(f"bad S3 location {url!r}: {error}") from None
        segment = s3_dot_segment(bucket) or s3_dot_segment(prefix)
        if segment is not None:
            raise ConfigError(
                f"bad S3 location {url!r}: a {segment!r} segment, which a store or proxy may "
                "resolve to another prefix or bucket"
            )
        self._bucket = bucket
        self._prefix = s3.as_folder(prefix)
        self._max_file_bytes = max_file_bytes
        self._connection = {
            "endpoint_url": endpoint_url,
            "access_key": key,
            "secret_key": secret,
            "region": region,
        }

    @property
    def uri(self) -> str:
        """The `s3://bucket/prefix/` URI this source lists."""
        return s3_uri(self._bucket, self._prefix)

    def iter_entries(self) -> Generator[Entry, None, None]:
        """Yield an entry for every object below the prefix; folder markers are left out."""
        client = s3.make_client(**self._connection, connections=CONCURRENT_READS)
        with ThreadPoolExecutor(CONCURRENT_READS, thread_name_prefix="emolabel-s3") as pool:
            for page in self._pages(client):
                yield from self._page_entries(client, pool, page)

    def _pages(self, client: Any) -> Iterator[list[dict[str, Any]]]:
        """The listing's pages; a listing the store refuses stops the scan with a clear error."""
        from botocore.exceptions import ClientError

        pages = s3.list_pages(client, self._bucket, self._prefix)
        while True:
            try:
                page = next(pages, None)
            except ClientError as error:
                raise ConfigError(f"cannot list {self.uri}: {s3.describe(error)}") from None
            if page is None:
                return
            yield page

    def iter_runs(self) -> Generator[Run, None, None]:
        """The entries of `iter_entries`, in the same order, as runs read only when asked.

        A run is the objects of one "folder" (the key up to its last '/') listed one after
        another: a folder's objects before its first subfolder, those between two subfolders,
        and so on, cut every `MAX_RUN_FILES`, as `FolderSource.iter_runs` cuts a folder. Its
        digest covers each object's name, size, ETag and storage class, all from the listing,
        so a run the producer already knows is counted without one GET.
        """
        client = s3.make_client(**self._connection, connections=CONCURRENT_READS)
        folder: str | None = None
        after, piece, previous = "", 0, ""
        members: list[dict[str, Any]] = []
        pool = _RunPool()
        try:
            for page in self._pages(client):
                for info in page:
                    key = info["Key"]
                    if key.endswith("/") and info["Size"] == 0:
                        continue  # a folder marker, left out as `iter_entries` leaves it
                    parent = key.rpartition("/")[0]
                    if parent != folder or len(members) >= MAX_RUN_FILES:
                        if members:
                            assert folder is not None
                            yield self._run(client, pool, (folder, after, piece), members)
                            members = []
                        if parent == folder:
                            piece += 1
                        else:
                            folder, after, piece = parent, _subfolder_left(parent, previous), 0
                    members.append(info)
                    previous = key
            if members:
                assert folder is not None
                yield self._run(client, pool, (folder, after, piece), members)
        finally:
            pool.listing_done()

    def _run(
        self,
        client: Any,
        pool: _RunPool,
        place: tuple[str, str, int],
        members: list[dict[str, Any]],
    ) -> Run:
        folder, after, piece = place
        name = hashlib.blake2b(digest_size=16)
        name.update("\0".join(("s3", self._bucket, folder, after, str(piece))).encode())
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{self._max_file_bytes}".encode())
        for info in members:
            etag = str(info.get("ETag", "")).strip('"')
            storage_class = info.get("StorageClass") or ""
            fields = (info["Key"].rpartition("/")[2], str(info["Size"]), etag, storage_class)
            digest.update(("\0" + "\0".join(fields)).encode())
        decided: list[Entry | None] = []
        heads: dict[str, Future[bytes]] = {}

        def prefetch() -> None:
            decided.extend(self._entry_without_content(info) for info in members)
            for info, entry in zip(members, decided, strict=True):
                if entry is None:
                    heads[info["Key"]] = pool.submit(
                        s3.read_head, client, self._bucket, info["Key"], HEAD_BYTES
                    )

        def read() -> list[Entry]:
            if not decided:
                prefetch()
            return [
                entry if entry is not None else self._entry_from_head(info, heads[info["Key"]])
                for info, entry in zip(members, decided, strict=True)
            ]

        def release() -> None:
            for future in heads.values():
                future.cancel()
            pool.run_done()

        pool.run_listed()

        return Run(
            name.hexdigest(), digest.hexdigest(), len(members), True, read, release, prefetch
        )

    def _page_entries(
        self, client: Any, pool: ThreadPoolExecutor, page: list[dict[str, Any]]
    ) -> Iterator[Entry]:
        decided = [self._entry_without_content(info) for info in page]
        heads: dict[str, Future[bytes]] = {
            info["Key"]: pool.submit(s3.read_head, client, self._bucket, info["Key"], HEAD_BYTES)
            for info, entry in zip(page, decided, strict=True)
            if entry is None
        }
        try:
            for info, entry in zip(page, decided, strict=True):
                if info["Key"].endswith("/") and info["Size"] == 0:
                    continue  # a folder marker left by a console or a sync tool
                if entry is None:
                    entry = self._entry_from_head(info, heads[info["Key"]])
                yield entry
        finally:
            for future in heads.values():
                future.cancel()

    def _entry_without_content(self, info: dict[str, Any]) -> Entry | None:
        """The entry when the listing alone decides it; None when the content must be read."""
        size = int(info["Size"])
        segment = s3_dot_segment(info["Key"])
        if segment is not None:
            message = f"key has a {segment!r} segment, which may resolve outside {self.uri}"
            return self._entry(info, Reason.OUTSIDE_ROOT, message)
        if info["Key"].endswith("/"):
            message = "key ends in '/' (a folder name)"
            return self._entry(info, Reason.NOT_A_FILE, message)
        if size == 0:
            return self._entry(info, Reason.EMPTY, "zero bytes")
        if size > self._max_file_bytes:
            message = f"{size} bytes, over the limit of {self._max_file_bytes}"
            return self._entry(info, Reason.TOO_LARGE, message)
        storage_class = info.get("StorageClass")
        if storage_class in _ARCHIVED_STORAGE_CLASSES:
            message = f"in storage class {storage_class}; restore it before labeling"
            return self._entry(info, Reason.UNREADABLE, message)
        return None

    def _entry_from_head(self, info: dict[str, Any], head: Future[bytes]) -> Entry:
        error = head.exception()
        if error is not None:
            return self._entry(info, *s3._read_failure(error))
        content = head.result()
        image_type = sniff_image_type(content)
        if image_type is None:
            message = f"content is not a supported image (starts with {content[:8].hex(' ')})"
            return self._entry(info, Reason.NOT_AN_IMAGE, message)
        return self._entry(info, None, None, image_type)

    def _entry(
        self,
        info: dict[str, Any],
        skip_reason: Reason | None,
        skip_message: str | None,
        image_type: str | None = None,
    ) -> Entry:
        size = int(info["Size"])
        etag = str(info.get("ETag", "")).strip('"')
        return Entry(
            uri=s3_uri(self._bucket, info["Key"]),
            name_bytes=None,  # S3 keys are UTF-8 by definition
            size_bytes=size,
            mtime_ns=_to_nanoseconds(info.get("LastModified")),
            fingerprint=f"{size}-{etag}",
            image_type=image_type,
            skip_reason=skip_reason,
            skip_message=skip_message,
        )


class _RunPool:
    """The ranged GETs' threads for a listing's runs. A run may be read after the listing has
    ended (the producer holds a batch of runs), so the threads stop when the listing has ended
    and its last run has been read or released, not when the generator returns."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(CONCURRENT_READS, thread_name_prefix="emolabel-s3")
        self._open_runs = 0
        self._listing = True

    def submit(self, function: Callable[..., bytes], *args: Any) -> Future[bytes]:
        return self._pool.submit(function, *args)

    def run_listed(self) -> None:
        self._open_runs += 1

    def run_done(self) -> None:
        self._open_runs -= 1
        self._close_when_idle()

    def listing_done(self) -> None:
        self._listing = False
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        if not self._listing and self._open_runs == 0:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _subfolder_left(folder: str, previous: str) -> str:
    """The subfolder of `folder` the listing just came out of ("" when it came from elsewhere):
    the name that tells a folder's runs apart."""
    prefix = folder + "/"
    if not previous.startswith(prefix):
        return ""
    return previous[len(prefix) :].split("/", 1)[0]


def _to_nanoseconds(moment: object) -> int:
    if not isinstance(moment, datetime):
        return 0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000
