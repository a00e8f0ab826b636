"""S3 names with `.` or `..` segments are refused, by the producer and by the worker, never read.

S3 stores `photos/../private/x.jpg` as a plain name (moto too, as these tests show), but a store
or a proxy that normalizes the request path reads `private/x.jpg`: outside the prefix checked.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from core.errors import ConfigError, ImageError
from core.reasons import Reason
from core.settings import S3Settings
from core.storage.reader import Reader
from core.storage.s3_source import S3Source
from core.uris import parse_s3_uri, s3_dot_segment, s3_uri

MiB = 1024 * 1024
PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00"
CREDENTIALS = {"key": "testing", "secret": "testing", "region": "us-east-1"}

ESCAPING_KEYS = [
    "photos/../private/x.png",
    "photos/./x.png",
    "photos/..",
    "../photos/x.png",
    "photos/..\\private\\x.png",  # a backslash is a separator to some stores
    "photos\\..\\private/x.png",
    "photos/%2e%2e/private/x.png",  # a proxy that decodes twice
    "photos/%2E%2e%2fprivate/x.png",
]
SAFE_KEYS = [
    "photos/x.png",
    "photos/a..b.png",
    "photos/.hidden.png",
    "photos/...png",
    "photos/.../x.png",
    "photos//double slash.png",
    "photos/café 100% #1?.png",
]


@pytest.mark.parametrize("key", ESCAPING_KEYS)
def test_dot_segments_are_found(key: str) -> None:
    assert s3_dot_segment(key) in {".", ".."}


@pytest.mark.parametrize("key", SAFE_KEYS)
def test_names_that_only_look_like_dots_pass(key: str) -> None:
    assert s3_dot_segment(key) is None


@pytest.mark.parametrize(
    "url", ["s3://bucket/photos/../private", "s3://bucket/./photos", "s3://../photos"]
)
def test_the_producer_refuses_a_location_with_dot_segments(url: str) -> None:
    with pytest.raises(ConfigError, match="segment"):
        S3Source(url, max_file_bytes=MiB, **CREDENTIALS)


def reason(reader: Reader, uri: str, job_root: str) -> tuple[Reason, str]:
    with pytest.raises(ImageError) as caught:
        reader.read(uri, job_root)
    return caught.value.reason, str(caught.value)


@pytest.mark.parametrize("key", ESCAPING_KEYS)
def test_the_worker_refuses_a_key_with_dot_segments_before_any_request(key: str) -> None:
    reader = Reader(max_file_bytes=MiB)
    code, message = reason(reader, s3_uri("bucket", key), s3_uri("bucket", ""))
    assert code == Reason.OUTSIDE_ROOT
    assert "segment" in message
    assert reader._client is None  # refused before a client, let alone a request, existed


def test_the_worker_refuses_every_key_of_a_job_root_with_dot_segments() -> None:
    reader = Reader(max_file_bytes=MiB)
    code, _ = reason(reader, "s3://bucket/photos/x.png", "s3://bucket/private/../photos/")
    assert code == Reason.OUTSIDE_ROOT
    assert reader._client is None


def test_a_prefix_is_a_folder_for_the_worker() -> None:
    reader = Reader(max_file_bytes=MiB)
    code, _ = reason(reader, "s3://bucket/photos2/x.png", "s3://bucket/photos")
    assert code == Reason.OUTSIDE_ROOT
    assert reader._client is None


# --- against a real S3 server (moto), which keeps such names as they are ----------------------


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
    name = f"keys-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


def test_the_producer_skips_keys_with_dot_segments_unread(
    s3_endpoint: str, bucket: tuple[Any, str]
) -> None:
    client, name = bucket
    for key in [*ESCAPING_KEYS, *SAFE_KEYS]:
        client.put_object(Bucket=name, Key=key, Body=PNG_HEAD)
    client.put_object(Bucket=name, Key="private/x.png", Body=PNG_HEAD)

    source = S3Source(
        f"s3://{name}/photos", endpoint_url=s3_endpoint, max_file_bytes=MiB, **CREDENTIALS
    )
    entries = {parse_s3_uri(entry.uri)[1]: entry for entry in source.iter_entries()}

    below_the_prefix = [key for key in ESCAPING_KEYS if key.startswith("photos/")]
    for key in below_the_prefix:
        entry = entries[key]
        # Image content, yet no image type: decided from the name alone, nothing was read.
        assert (entry.skip_reason, entry.image_type) == ("outside_root", None), key
        assert "segment" in (entry.skip_message or "")
    for key in SAFE_KEYS:
        assert (entries[key].skip_reason, entries[key].image_type) == (None, "png"), key
    assert set(entries) == {*below_the_prefix, *SAFE_KEYS}


def test_the_worker_reads_a_plain_key_and_refuses_one_with_dot_segments(
    s3_endpoint: str, bucket: tuple[Any, str]
) -> None:
    client, name = bucket
    client.put_object(Bucket=name, Key="photos/x.png", Body=PNG_HEAD)
    client.put_object(Bucket=name, Key="photos/../private/x.png", Body=b"secret")
    settings = S3Settings(
        endpoint_url=s3_endpoint,
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )
    reader = Reader(max_file_bytes=MiB, s3=settings)
    root = s3_uri(name, "photos/")

    assert reader.read(s3_uri(name, "photos/x.png"), root) == PNG_HEAD
    code, _ = reason(reader, s3_uri(name, "photos/../private/x.png"), root)
    assert code == Reason.OUTSIDE_ROOT
