"""S3 through boto3, the one S3 library: the client, object reads confined to a prefix, listing
pages and ranged reads of first bytes. Works with any S3-compatible store (MinIO, moto, ...).

Keys travel verbatim (`a?versionId=1.png` is a name, not a version). boto3 is imported when the
first client is made, so folder scans never pay for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from core.errors import ImageError, ImageTooLarge
from core.reasons import Reason
from core.settings import S3Settings
from core.uris import parse_s3_uri, s3_dot_segment

DEFAULT_CONNECTIONS = 10
"""botocore's own pool size, enough for one worker process's reading threads."""

_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def make_client(
    *,
    endpoint_url: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    connections: int = DEFAULT_CONNECTIONS,
) -> Any:
    """A boto3 S3 client; without `access_key` and `secret_key`, boto's usual chain applies."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(max_pool_connections=connections),
    )


def client_from_settings(settings: S3Settings, *, connections: int = DEFAULT_CONNECTIONS) -> Any:
    """A boto3 S3 client for the `s3` settings."""
    secret = settings.secret_key.get_secret_value() if settings.secret_key else None
    return make_client(
        endpoint_url=settings.endpoint_url,
        access_key=settings.access_key,
        secret_key=secret,
        region=settings.region,
        connections=connections,
    )


def confine(uri: str, root: str) -> tuple[str, str]:
    """The bucket and key of `uri`, which must lie below the `s3://` root; else `ImageError`.

    Nothing is contacted: a key that a store or proxy might resolve elsewhere (a `.` or `..`
    segment) is refused from its name alone.
    """
    try:
        bucket, key = parse_s3_uri(uri)
        root_bucket, root_prefix = parse_s3_uri(root)
    except ValueError as error:
        raise ImageError(Reason.OUTSIDE_ROOT, f"not in the job's bucket: {error}") from None
    segment = s3_dot_segment(key) or s3_dot_segment(root_bucket) or s3_dot_segment(root_prefix)
    if segment is not None:
        # Checked before the prefix: `photos/../private/x` starts with `photos/`.
        message = f"key or prefix has a {segment!r} segment, which may resolve elsewhere"
        raise ImageError(Reason.OUTSIDE_ROOT, message)
    if bucket != root_bucket or not key.startswith(as_folder(root_prefix)):
        raise ImageError(Reason.OUTSIDE_ROOT, "object is outside the job's bucket prefix")
    return bucket, key


def as_folder(prefix: str) -> str:
    """A non-empty prefix names a folder: `photos` holds `photos/x`, not `photos2/x`."""
    return prefix + "/" if prefix and not prefix.endswith("/") else prefix


def read_object(client: Any, bucket: str, key: str, max_file_bytes: int) -> bytes:
    """An object's bytes, never more than the limit; `ImageError` when it cannot be read."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in _MISSING_CODES:
            raise ImageError(Reason.MISSING, "object no longer exists") from None
        raise ImageError(Reason.UNREADABLE, f"cannot read object: {code}") from None
    body = response["Body"]
    try:
        size = int(response.get("ContentLength", 0))
        if size > max_file_bytes:
            raise ImageTooLarge(
                Reason.TOO_LARGE, f"object is {size} bytes, over the {max_file_bytes} limit"
            )
        data: bytes = body.read(max_file_bytes + 1)
    except BotoCoreError as error:
        raise ImageError(Reason.UNREADABLE, f"cannot read object: {error}") from None
    finally:
        body.close()
    if len(data) > max_file_bytes:
        raise ImageTooLarge(Reason.TOO_LARGE, "object grew over the byte limit")
    return data


def list_pages(client: Any, bucket: str, prefix: str) -> Iterator[list[dict[str, Any]]]:
    """The objects below `prefix`, one `list_objects_v2` page (up to 1000) at a time."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        contents: list[dict[str, Any]] = page.get("Contents", [])
        if contents:
            yield contents


def read_head(client: Any, bucket: str, key: str, size: int) -> bytes:
    """The first `size` bytes of an object (a ranged GET); raises what botocore raises."""
    response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{size - 1}")
    body = response["Body"]
    try:
        head: bytes = body.read()
    finally:
        body.close()
    return head


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
    return Reason.UNREADABLE, describe(error)


def describe(error: Any) -> str:
    """A botocore `ClientError` in words: its code and message."""
    details = error.response.get("Error", {})
    return f"{details.get('Code', 'error')}: {details.get('Message', '')}".rstrip(": ")
