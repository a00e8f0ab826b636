"""Where `emolabel xmp` puts sidecars and what one image's failure does, with a real S3 server
(moto) and real files: S3 sidecars next to the objects (merged with one already there) or under
a mirror folder, a refusal when neither is set, local images under a mirror folder, a broken
sidecar reported against its image while the others are written, and face regions normalized
by the displayed (EXIF-rotated) size.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Any

import boto3
import pytest
from PIL import Image

from core.errors import ConfigError
from core.settings import S3Settings, XmpSettings
from core.uris import path_to_uri, s3_uri
from db.repository import FaceExportRow
from emolabel.sidecars.write_back import SidecarStore, oriented_size, sidecar_labels, write_back
from emolabel.sidecars.xmp import merge_sidecar
from tests.support.s3 import S3_KEY, S3_REGION, S3_SECRET

NOW = dt.datetime(2026, 12, 5, tzinfo=dt.UTC)


def row(uri: str, image_id: int, label: str = "happy", **face: Any) -> FaceExportRow:
    """A whole-image label, or with `face` fields one face of a face model's photo."""
    fields: dict[str, Any] = {
        "face_count": None, "face_index": None, "x": None, "y": None, "width": None,
        "height": None, "detector_score": None,
    }  # fmt: skip
    fields.update(face)
    return FaceExportRow(
        image_id=image_id, uri=uri, model_version="v1", label=label, confidence=0.91,
        scores={label: 0.91}, job_id=1, created_at=NOW, **fields,
    )  # fmt: skip


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "gray").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    return boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET, region_name=S3_REGION,
    )  # fmt: skip


def store(settings: XmpSettings, client: Any = None) -> SidecarStore:
    return SidecarStore(settings, lambda: client)


def test_s3_sidecars_go_next_to_the_objects_and_merge_with_one_there(s3: Any) -> None:
    s3.create_bucket(Bucket="beside")
    s3.put_object(Bucket="beside", Key="a/one.jpg", Body=b"not read")
    theirs = merge_sidecar(None, sidecar_labels([row("x", 1, "calm")], None))
    s3.put_object(Bucket="beside", Key="a/one.jpg.xmp", Body=theirs.replace(b"calm", b"other"))
    rows = [[row(s3_uri("beside", "a/one.jpg"), 1)], [row(s3_uri("beside", "b/two.jpg"), 2)]]

    tally = write_back(rows, store(XmpSettings(s3_beside=True), s3), dry_run=False)

    assert (tally.created, tally.updated, tally.failed) == (1, 1, [])
    one = s3.get_object(Bucket="beside", Key="a/one.jpg.xmp")["Body"].read()
    assert b"emolabel|happy" in one and b"emolabel|other" not in one  # ours replaced
    assert b"emolabel|happy" in s3.get_object(Bucket="beside", Key="b/two.jpg.xmp")["Body"].read()
    again = write_back(rows, store(XmpSettings(s3_beside=True), s3), dry_run=False)
    assert again.unchanged == 2


def test_s3_sidecars_go_under_a_mirror_folder_when_one_is_set(s3: Any, tmp_path: Path) -> None:
    settings = XmpSettings(mirror=tmp_path / "mirror", naming="replace")
    rows = [[row(s3_uri("bucket", "deep/x.jpg"), 1)]]

    tally = write_back(rows, store(settings, s3), dry_run=False)

    assert tally.created == 1
    assert b"emolabel|happy" in (tmp_path / "mirror" / "bucket" / "deep" / "x.xmp").read_bytes()


def test_s3_sidecars_without_a_place_are_refused_with_the_setting_to_use(s3: Any) -> None:
    rows = [[row(s3_uri("bucket", "x.jpg"), 1)]]
    with pytest.raises(ConfigError, match="EMOLABEL_XMP__MIRROR"):
        write_back(rows, store(XmpSettings(), s3), dry_run=False)


def test_local_images_under_a_mirror_and_a_broken_sidecar_stays_its_images_failure(
    tmp_path: Path,
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "broken.jpg.xmp").write_bytes(b"<x:xmpmeta")  # not XML: never overwritten
    rows = [[row(path_to_uri(photos / "broken.jpg"), 1)], [row(path_to_uri(photos / "ok.jpg"), 2)]]

    beside = write_back(rows, store(XmpSettings()), dry_run=False)
    assert beside.created == 1 and [uri for uri, _ in beside.failed] == [rows[0][0].uri]
    assert (photos / "broken.jpg.xmp").read_bytes() == b"<x:xmpmeta"
    assert (photos / "ok.jpg.xmp").is_file()

    mirror = tmp_path / "mirror"
    mirrored = write_back(rows, store(XmpSettings(mirror=mirror)), dry_run=False)
    assert mirrored.created == 2
    assert (mirror / str(photos).lstrip("/") / "broken.jpg.xmp").is_file()


def test_face_regions_are_normalized_by_the_displayed_size(tmp_path: Path) -> None:
    # Stored 200 wide and 100 high, EXIF orientation 6: shown 100 wide and 200 high.
    image = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (200, 100), "gray").save(image, "JPEG", exif=exif)
    assert oriented_size(image.read_bytes()) == (100, 200)
    assert oriented_size(png(30, 20)) == (30, 20)
    assert oriented_size(b"not an image") is None

    face = row(path_to_uri(image), 1, face_count=1, face_index=0, x=25, y=50, width=50, height=100)
    tally = write_back([[face]], store(XmpSettings()), dry_run=False)

    assert tally.created == 1
    text = (tmp_path / "turned.jpg.xmp").read_text()
    # The box's centre (50, 100) of a 100 x 200 photo: 0.5, 0.5; its size 0.5 x 0.5.
    for side in ("x", "y", "w", "h"):
        assert f"<stArea:{side}>0.500000</stArea:{side}>" in text, text
    assert "<stDim:w>100</stDim:w>" in text and "<stDim:h>200</stDim:h>" in text


def test_an_s3_client_is_made_only_for_s3_images(tmp_path: Path) -> None:
    made: list[S3Settings] = []
    lazy = SidecarStore(XmpSettings(), lambda: made.append(S3Settings()))
    write_back([[row(path_to_uri(tmp_path / "a.jpg"), 1)]], lazy, dry_run=True)
    assert made == [] and not (tmp_path / "a.jpg.xmp").exists()  # a dry run writes nothing
