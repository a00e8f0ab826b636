"""Walk an `s3://bucket/prefix` a page of keys at a time, sniffing each object's first bytes.

The listing is boto3's `list_objects_v2` paginator, page by page, so memory does not grow with
the bucket; each page's ranged GETs (`HEAD_BYTES` each) run on a pool of threads sharing one
client, which is what makes sniffing millions of objects bearable.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from core.errors import ConfigError
from core.reasons import Reason
from core.storage import s3
from core.storage.entries import Entry
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
        from botocore.exceptions import ClientError

        client = s3.make_client(**self._connection, connections=CONCURRENT_READS)
        pages = s3.list_pages(client, self._bucket, self._prefix)
        with ThreadPoolExecutor(CONCURRENT_READS, thread_name_prefix="emolabel-s3") as pool:
            while True:
                try:
                    page = next(pages, None)
                except ClientError as error:
                    raise ConfigError(f"cannot list {self.uri}: {s3.describe(error)}") from None
                if page is None:
                    return
                yield from self._page_entries(client, pool, page)

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


def _to_nanoseconds(moment: object) -> int:
    if not isinstance(moment, datetime):
        return 0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000
