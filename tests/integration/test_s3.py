"""Issue 3's bucket acceptance: the end-to-end run with the archive in a bucket on a local
S3-compatible server (moto, on loopback), scanned by `emolabel scan s3://...` and read by the
worker from the object store.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import S3Settings, ScanSettings
from core.uris import s3_uri
from db.models import Result
from tests.support.archives import LABELED, Expected, encode, generate_images, noise
from tests.support.cli import cli_scan as scan
from tests.support.images import bomb_png
from tests.support.ledger import assert_balanced, ledger, results_per_image, wait_for_job
from tests.support.s3 import S3_KEY, S3_REGION, S3_SECRET
from tests.support.workers import SettingsFactory, Workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = 36
PREFIX = "photos"


def upload_archive(client: Any, bucket: str, local: Path) -> dict[str, Expected]:
    """Generated images under `PREFIX/` at several depths, junk beside them; key -> expected."""
    expected: dict[str, Expected] = {}
    for path in generate_images(local, IMAGES):
        key = f"{PREFIX}/{path.relative_to(local).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        expected[key] = LABELED
    jpeg = encode(noise(), "JPEG")
    junk = {
        "notes.jpg": (b"not a photo\n", Expected("skipped", "not_an_image")),
        "empty.jpg": (b"", Expected("skipped", "empty")),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], Expected("failed", "corrupt")),
        "bomb.png": (bomb_png(20000, 20000), Expected("failed", "too_many_pixels")),
        "png-content.jpg": (encode(noise(), "PNG"), LABELED),
        "odd name %41 #1?.jpg": (jpeg, LABELED),
        "deep/er/cmyk.jpg": (encode(noise("CMYK"), "JPEG"), LABELED),
        "doomed.jpg": (jpeg, Expected("failed", "missing")),
        # S3 keeps the name as it is; a normalizing store would read elsewhere/secret.jpg.
        "../elsewhere/secret.jpg": (jpeg, Expected("skipped", "outside_root")),
    }
    for name, (body, want) in junk.items():
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/{name}", Body=body)
        expected[f"{PREFIX}/{name}"] = want
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/folder/", Body=b"")  # a folder marker
    client.put_object(Bucket=bucket, Key="elsewhere/secret.jpg", Body=jpeg)  # outside the prefix
    return expected


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_bucket_is_labeled_like_a_folder(
    make_settings: SettingsFactory,
    sessions: sessionmaker[Session],
    workers: Workers,
    s3_endpoint: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    bucket = f"archive-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    keys = upload_archive(s3_client, bucket, tmp_path / "local")
    expected = {s3_uri(bucket, key): want for key, want in keys.items()}
    labeled = {uri for uri, want in expected.items() if want == LABELED}
    settings = make_settings(
        scan=ScanSettings(chunk_size=8),
        s3=S3Settings(
            endpoint_url=s3_endpoint,
            access_key=S3_KEY,
            secret_key=S3_SECRET,
            region=S3_REGION,
        ),
    )

    job_id = scan(settings, f"s3://{bucket}/{PREFIX}")
    s3_client.delete_object(Bucket=bucket, Key=f"{PREFIX}/doomed.jpg")
    workers.start(settings)
    balance = wait_for_job(sessions, job_id, settings)

    ended = {uri: (row.state, row.reason) for uri, row in ledger(sessions, job_id).items()}
    assert ended == {uri: (want.state, want.reason) for uri, want in expected.items()}
    assert_balanced(balance)
    assert balance.labeled == len(labeled)
    assert results_per_image(sessions) == dict.fromkeys(labeled, 1)

    # Unchanged, nothing goes out again; new content (a new ETag) is labeled again.
    again = scan(settings, f"s3://{bucket}/{PREFIX}")
    assert wait_for_job(sessions, again, settings, timeout=30).labeled == 0
    changed = sorted(key for key, want in keys.items() if want == LABELED)[:3]
    for key in changed:
        s3_client.put_object(Bucket=bucket, Key=key, Body=encode(noise(), "PNG"))
    third = scan(settings, f"s3://{bucket}/{PREFIX}")
    assert wait_for_job(sessions, third, settings).labeled == len(changed)
    with sessions() as session:
        relabeled = session.scalar(select(func.count()).where(Result.job_id == third))
    assert relabeled == len(changed)
    assert results_per_image(sessions) == dict.fromkeys(labeled, 1)
