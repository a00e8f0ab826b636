"""Walk an `s3://bucket/prefix` a page of keys at a time, sniffing each object's first bytes.

s3fs supplies the connection (credentials chain, endpoint, region, timeouts) and its event loop;
the calls themselves go to the aiobotocore client it hands out, so keys travel verbatim (s3fs's
path parsing would cut a key at `?versionId=`). The listing is `list_objects_v2` page by page,
so memory does not grow with the bucket; each page's ranged GETs (`HEAD_BYTES` each) run
concurrently, which is what makes sniffing millions of objects bearable.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from core.errors import ConfigError
from core.reasons import Reason
from core.uris import parse_s3_uri, s3_dot_segment, s3_uri
from producer.entries import Entry
from producer.sniff import HEAD_BYTES, sniff_image_type

CONCURRENT_READS = 32
"""Ranged GETs in flight at once while a listing page is sniffed."""

# Objects in these classes must be restored before a GET can read them.
_ARCHIVED_STORAGE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
_MISSING_CODES = frozenset({"NoSuchKey", "404"})
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
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        # Imported here so that folder scans do not pay for aiohttp and aiobotocore.
        import s3fs

        self._bucket = bucket
        self._prefix = prefix
        self._max_file_bytes = max_file_bytes
        self._filesystem = s3fs.S3FileSystem(
            key=key,
            secret=secret,
            endpoint_url=endpoint_url,
            client_kwargs={"region_name": region} if region else {},
            skip_instance_cache=True,
        )

    @property
    def uri(self) -> str:
        """The `s3://bucket/prefix/` URI this source lists."""
        return s3_uri(self._bucket, self._prefix)

    def iter_entries(self) -> Generator[Entry, None, None]:
        """Yield an entry for every object below the prefix; folder markers are left out."""
        from botocore.exceptions import ClientError
        from fsspec.asyn import sync

        loop = self._filesystem.loop
        client = sync(loop, self._filesystem.set_session)
        pages = _list_pages(client, self._bucket, self._prefix)
        try:
            while True:
                try:
                    page = sync(loop, _next_page, pages)
                except ClientError as error:
                    raise ConfigError(f"cannot list {self.uri}: {_describe(error)}") from None
                if page is None:
                    return
                yield from self._page_entries(client, page)
        finally:
            sync(loop, pages.aclose)

    def _page_entries(self, client: Any, page: list[dict[str, Any]]) -> Iterator[Entry]:
        from fsspec.asyn import sync

        decided = [self._entry_without_content(info) for info in page]
        unread = [info["Key"] for info, entry in zip(page, decided, strict=True) if entry is None]
        results = sync(self._filesystem.loop, _read_heads, client, self._bucket, unread)
        heads = dict(zip(unread, results, strict=True))
        for info, entry in zip(page, decided, strict=True):
            if info["Key"].endswith("/") and info["Size"] == 0:
                continue  # a folder marker left by a console or a sync tool
            yield entry if entry is not None else self._entry_from_head(info, heads[info["Key"]])

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

    def _entry_from_head(self, info: dict[str, Any], head: bytes | BaseException) -> Entry:
        if isinstance(head, BaseException):
            return self._entry(info, *_read_failure(head))
        image_type = sniff_image_type(head)
        if image_type is None:
            message = f"content is not a supported image (starts with {head[:8].hex(' ')})"
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


async def _list_pages(
    client: Any, bucket: str, prefix: str
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """The objects below `prefix`, one listing page (up to 1000) at a time."""
    paginator = client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        contents: list[dict[str, Any]] = page.get("Contents", [])
        if contents:
            yield contents


async def _next_page(
    pages: AsyncIterator[list[dict[str, Any]]],
) -> list[dict[str, Any]] | None:
    return await anext(pages, None)


async def _read_heads(client: Any, bucket: str, keys: list[str]) -> list[bytes | BaseException]:
    """The first `HEAD_BYTES` of each object, or the exception that reading it raised."""
    slots = asyncio.Semaphore(CONCURRENT_READS)

    async def read_head(key: str) -> bytes:
        async with slots:
            response = await client.get_object(
                Bucket=bucket, Key=key, Range=f"bytes=0-{HEAD_BYTES - 1}"
            )
            async with response["Body"] as body:
                head: bytes = await body.read()
                return head

    return await asyncio.gather(*(read_head(key) for key in keys), return_exceptions=True)


def _read_failure(error: BaseException) -> tuple[Reason, str]:
    """The skip reason for an object whose first bytes could not be read; re-raises outages."""
    from botocore.exceptions import ClientError

    # Anything but an answer about this object (a timeout, a refused connection) or a server
    # error is the store's problem: stop the scan so that it can be retried, rather than mark
    # every object after it unreadable.
    if not isinstance(error, ClientError):
        raise error
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if status >= 500:
        raise error
    if error.response.get("Error", {}).get("Code") in _MISSING_CODES:
        return Reason.MISSING, "deleted after it was listed"
    return Reason.UNREADABLE, _describe(error)


def _describe(error: Any) -> str:
    details = error.response.get("Error", {})
    return f"{details.get('Code', 'error')}: {details.get('Message', '')}".rstrip(": ")


def _to_nanoseconds(moment: object) -> int:
    if not isinstance(moment, datetime):
        return 0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000
