"""`emolabel xmp`: one model version's labels, image by image, merged into XMP sidecars.

The rows come from the export's per-face reader (`db.repository.iter_face_rows`), grouped by
image: a whole-image model's one row, or a face model's faces (or its one no_face row). A face's
box is stored in pixels of the EXIF-oriented image; MWG regions are normalized, so the image's
oriented size is read from its header (a local file, or the first bytes of an S3 object).

Where a sidecar goes (`XmpSettings`): beside a local image (`photo.jpg.xmp` or `photo.xmp`), or
under `mirror` (the image's absolute path, or `bucket/key` for an object, below it); an S3
object's sidecar goes under `mirror`, or next to the object with `s3_beside`. Nothing is ever
written into an image. One image's failure (an unreadable header, a sidecar that is not XMP, a
folder without write permission) is counted with its message; the rest go on.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.settings import XmpSettings
from core.uris import FILE_SCHEME, S3_SCHEME, parse_s3_uri, uri_to_path
from emolabel.sidecars.xmp import (
    FaceRegion,
    SidecarError,
    SidecarLabels,
    merge_sidecar,
    sidecar_path,
    write_sidecar,
)

# Enough for the EXIF block of any camera JPEG (APP1 is at most 64 KiB) and a PNG's IHDR.
HEADER_BYTES = 256 * 1024
EXIF_ORIENTATION = 0x0112
# EXIF orientations 5-8 turn the image a quarter: its displayed width is the stored height.
QUARTER_TURNS = frozenset({5, 6, 7, 8})


@dataclass
class Tally:
    """What a write-back did (or, in a dry run, would do), and what went wrong where."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)  # the first sidecars written (or not)

    @property
    def images(self) -> int:
        return self.created + self.updated + self.unchanged + len(self.failed)


def group_by_image(rows: Iterable[Any]) -> Iterator[list[Any]]:
    """Per-face export rows (ordered by image) as one list per image."""
    for _, image_rows in groupby(rows, key=lambda row: row.image_id):
        yield list(image_rows)


def sidecar_labels(rows: list[Any], size: tuple[int, int] | None) -> SidecarLabels:
    """One image's labels from its per-face rows; `size` (oriented width, height) is needed
    only for a face model's regions."""
    first = rows[0]
    if first.face_count is None:  # a whole-image model
        return SidecarLabels(
            outcome=first.outcome,
            label=first.label,
            confidence=first.confidence,
            model_version=first.model_version,
            runner_up=first.runner_up,
            runner_up_confidence=first.runner_up_confidence,
            human_label=first.human_label,
        )
    if first.face_count == 0:
        return SidecarLabels(
            outcome="no_face", label=None, confidence=None, model_version=first.model_version,
            faces=(),
        )  # fmt: skip
    if size is None:
        raise SidecarError("cannot read the image's size, needed for its face regions")
    width, height = size
    regions = tuple(
        FaceRegion(
            x=row.x / width,
            y=row.y / height,
            width=row.width / width,
            height=row.height / height,
            label=row.human_label or row.label,
            confidence=row.confidence,
            outcome=row.outcome,
        )
        for row in rows
    )
    largest = max(rows, key=lambda row: row.width * row.height)  # the photo's label
    return SidecarLabels(
        outcome=largest.outcome,
        label=largest.label,
        confidence=largest.confidence,
        model_version=largest.model_version,
        runner_up=largest.runner_up,
        runner_up_confidence=largest.runner_up_confidence,
        faces=regions,
        image_width=width,
        image_height=height,
    )


def oriented_size(header: bytes) -> tuple[int, int] | None:
    """(width, height) as displayed (EXIF orientation applied) from an image's first bytes."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(header)) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(EXIF_ORIENTATION)
            except (OSError, ValueError, SyntaxError, EOFError):
                # A PNG's eXIf chunk may lie past the header we read: no orientation known,
                # and a PNG is shown as stored unless it says otherwise.
                orientation = None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    return (height, width) if orientation in QUARTER_TURNS else (width, height)


class SidecarStore:
    """Where each image's sidecar lives and how it is read and written."""

    def __init__(self, settings: XmpSettings, s3_client: Callable[[], Any]) -> None:
        self.settings = settings
        self._s3_client = s3_client
        self._client: Any = None

    def s3(self) -> Any:
        if self._client is None:
            self._client = self._s3_client()
        return self._client

    def header(self, uri: str) -> bytes:
        if uri.startswith(FILE_SCHEME):
            with open(uri_to_path(uri), "rb") as handle:  # noqa: PTH123 (raw bytes path)
                return handle.read(HEADER_BYTES)
        from core.storage.s3 import read_head

        bucket, key = parse_s3_uri(uri)
        return read_head(self.s3(), bucket, key, HEADER_BYTES)

    def write(self, uri: str, labels: SidecarLabels, *, dry_run: bool) -> tuple[str, str]:
        """("created" | "updated" | "unchanged", where) for one image's sidecar."""
        root = self.settings.keyword_root
        if uri.startswith(FILE_SCHEME):
            image = Path(os.fsdecode(uri_to_path(uri)))
            target = sidecar_path(self._mirrored(image.as_posix().lstrip("/"), image), self.naming)
            return self._write_file(target, labels, root, dry_run), str(target)
        if not uri.startswith(S3_SCHEME):
            raise SidecarError(f"no sidecar for a {uri.split(':', 1)[0]}: URI")
        bucket, key = parse_s3_uri(uri)
        if self.settings.mirror is not None:
            target = sidecar_path(self._mirrored(f"{bucket}/{key}", None), self.naming)
            return self._write_file(target, labels, root, dry_run), str(target)
        if not self.settings.s3_beside:
            raise ConfigError(
                "S3 images' sidecars need a place: set EMOLABEL_XMP__MIRROR to a folder, or "
                "EMOLABEL_XMP__S3_BESIDE=true to write them next to the objects"
            )
        sidecar_key = sidecar_path(Path(key), self.naming).as_posix()
        return self._write_object(bucket, sidecar_key, labels, root, dry_run), (
            f"{S3_SCHEME}{bucket}/{sidecar_key}"
        )

    @property
    def naming(self) -> str:
        return self.settings.naming

    def _mirrored(self, relative: str, beside: Path | None) -> Path:
        if self.settings.mirror is None:
            assert beside is not None
            return beside
        parts = [part for part in relative.split("/") if part not in ("", ".", "..")]
        return self.settings.mirror.joinpath(*parts)

    @staticmethod
    def _write_file(target: Path, labels: SidecarLabels, root: str, dry_run: bool) -> str:
        if not dry_run:
            target.parent.mkdir(parents=True, exist_ok=True)
        return write_sidecar(target, labels, root=root, dry_run=dry_run)

    def _write_object(
        self, bucket: str, key: str, labels: SidecarLabels, root: str, dry_run: bool
    ) -> str:
        from botocore.exceptions import ClientError

        client = self.s3()
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            existing: bytes | None = response["Body"].read()
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code", "")) not in ("NoSuchKey", "404"):
                raise
            existing = None
        merged = merge_sidecar(existing, labels, root=root)
        if merged == existing:
            return "unchanged"
        if not dry_run:
            client.put_object(
                Bucket=bucket, Key=key, Body=merged, ContentType="application/rdf+xml"
            )
        return "created" if existing is None else "updated"


def write_back(
    groups: Iterable[list[Any]],
    store: SidecarStore,
    *,
    dry_run: bool,
    on_image: Callable[[], None] = lambda: None,
    examples: int = 5,
) -> Tally:
    """Merge each image's labels into its sidecar; a failure is the image's, never the run's
    (a bad setting, which every image would hit, stops it with a ConfigError)."""
    from botocore.exceptions import BotoCoreError, ClientError

    tally = Tally()
    for rows in groups:
        uri = rows[0].uri
        try:
            size = None
            if rows[0].face_count:
                size = oriented_size(store.header(uri))
            outcome, where = store.write(uri, sidecar_labels(rows, size), dry_run=dry_run)
        except (ValueError, OSError, ClientError, BotoCoreError) as error:  # SidecarError too
            tally.failed.append((uri, str(error) or type(error).__name__))
        else:
            setattr(tally, outcome, getattr(tally, outcome) + 1)
            if outcome != "unchanged" and len(tally.examples) < examples:
                tally.examples.append(f"{outcome}: {where}")
        on_image()
    return tally
