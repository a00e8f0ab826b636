"""Generated folder trees for the end-to-end tests: synthetic faces in nested folders, the
hostile files of issue 3, and how each file must end in the ledger (`Expected`)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image as PillowImage

from core.uris import path_to_uri
from tests.support.images import bomb_png
from training.sample_data import generate_sample_data

MiB = 1024 * 1024
CLASSES = ("happy", "sad")


@dataclass(frozen=True)
class Expected:
    """How a file must end: its ledger state and reason (None for labeled)."""

    state: str
    reason: str | None = None


LABELED = Expected("labeled")


@dataclass
class Archive:
    """A generated folder tree and how each file in it must end, by URI."""

    root: Path
    expected: dict[str, Expected] = field(default_factory=dict)
    generated: list[str] = field(default_factory=list)
    # Deleted by the test between the scan and the worker.
    doomed: Path | None = None
    non_utf8_path: bytes | None = None
    long_name_path: Path | None = None
    outside_file: Path | None = None

    def labeled(self) -> set[str]:
        return {uri for uri, want in self.expected.items() if want == LABELED}


def generate_images(root: Path, total: int, *, seed: int = 11) -> list[Path]:
    """`total` small synthetic faces spread over folders at depths 2 to 5."""
    folders = [root / "shallow", root / "a" / "b", root / "a" / "b" / "c" / "d", root / "x" / "y"]
    per_folder = [total // len(folders)] * len(folders)
    per_folder[0] += total - sum(per_folder)
    for index, (folder, count) in enumerate(zip(folders, per_folder, strict=True)):
        per_class, extra = divmod(count, len(CLASSES))
        if per_class:
            generate_sample_data(folder, CLASSES, per_class, seed + index, min_size=64, max_size=72)
        if extra:
            generate_sample_data(
                folder / "extra", CLASSES[:1], extra, seed + 100 + index, min_size=64, max_size=72
            )
    paths = sorted(path for path in root.rglob("*") if path.is_file())
    assert len(paths) == total
    return paths


def encode(image: PillowImage.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def noise(mode: str = "RGB", size: tuple[int, int] = (64, 56)) -> PillowImage.Image:
    return PillowImage.effect_noise(size, 50).convert(mode)


def write_bytes(path: Path | bytes, content: bytes) -> None:
    with open(path, "wb") as handle:  # noqa: PTH123 (bytes paths: names that are not UTF-8)
        handle.write(content)


def add_hostile_files(archive: Archive, outside: Path) -> None:
    """Write the hostile files of issue 3 (and a few more) under `archive.root / "hostile"`."""
    folder = archive.root / "hostile"
    folder.mkdir(parents=True)
    expected = archive.expected

    def put(name: str, content: bytes, want: Expected) -> Path:
        path = folder / name
        write_bytes(path, content)
        expected[path_to_uri(path)] = want
        return path

    jpeg = encode(noise(), "JPEG", quality=90)
    put("zero.jpg", b"", Expected("skipped", "empty"))
    put("notes.jpg", b"meeting notes, not a photo\n" * 4, Expected("skipped", "not_an_image"))
    put("truncated.jpg", jpeg[: len(jpeg) // 2], Expected("failed", "corrupt"))
    put("png-content.jpg", encode(noise(), "PNG"), LABELED)
    put("jpeg-content.txt", jpeg, LABELED)
    put("grayscale.png", encode(noise("L"), "PNG"), LABELED)
    rgba = noise("RGBA")
    rgba.putalpha(PillowImage.linear_gradient("L").resize(rgba.size))
    put("rgba.png", encode(rgba, "PNG"), LABELED)
    sixteen = (np.random.default_rng(1).integers(0, 65535, (56, 64, 3))).astype(np.uint16)
    put("sixteen-bit.png", cv2.imencode(".png", sixteen)[1].tobytes(), LABELED)
    put("cmyk.jpg", encode(noise("CMYK"), "JPEG"), LABELED)
    exif = PillowImage.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    put("exif-rotated.jpg", encode(noise(size=(80, 48)), "JPEG", exif=exif.tobytes()), LABELED)
    frames = [noise(), noise(), noise()]
    animated = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    put("animated.gif", animated, LABELED)
    put("bomb.png", bomb_png(20000, 20000), Expected("failed", "too_many_pixels"))
    put("tiny.png", encode(noise(size=(4, 4)), "PNG"), Expected("failed", "too_small"))
    put(
        "garbage.png",
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        Expected("failed", "not_an_image"),
    )
    put("too-big.jpg", jpeg[:64] + b"\x00" * (MiB + 1), Expected("skipped", "too_large"))
    put("bitmap.bmp", encode(noise(), "BMP"), LABELED)
    put("photo.webp", encode(noise(), "WEBP"), LABELED)
    put("scan.tiff", encode(noise(), "TIFF"), LABELED)
    put("odd name %41 #1?.jpg", jpeg, LABELED)
    put(".hidden.png", encode(noise(), "PNG"), LABELED)
    archive.doomed = put("doomed.jpg", jpeg, Expected("failed", "missing"))

    # A name that is not UTF-8 and one of 200 characters, both kept byte for byte.
    raw = os.fsencode(folder) + b"/caf\xe9-\xff\xfe.jpg"
    write_bytes(raw, jpeg)
    expected[path_to_uri(raw)] = LABELED
    archive.non_utf8_path = raw
    archive.long_name_path = put("n" * 196 + ".jpg", jpeg, LABELED)

    # A folder named like an image is walked into; only what is inside it is listed.
    (folder / "folder.jpg").mkdir()
    put("folder.jpg/inside.png", encode(noise(), "PNG"), LABELED)

    os.mkfifo(folder / "pipe.jpg")
    expected[path_to_uri(folder / "pipe.jpg")] = Expected("skipped", "not_a_file")
    (folder / "loop-a.jpg").symlink_to("loop-b.jpg")
    (folder / "loop-b.jpg").symlink_to("loop-a.jpg")
    for name in ("loop-a.jpg", "loop-b.jpg"):
        expected[path_to_uri(folder / name)] = Expected("skipped", "symlink_loop")
    outside.mkdir(parents=True, exist_ok=True)
    secret = outside / "secret.jpg"
    write_bytes(secret, jpeg)
    archive.outside_file = secret
    (folder / "escape.jpg").symlink_to(secret)
    expected[path_to_uri(folder / "escape.jpg")] = Expected("skipped", "symlink_outside_root")
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    expected[path_to_uri(folder / "dangling.jpg")] = Expected("skipped", "missing")
    (folder / "alias.png").symlink_to(folder / "png-content.jpg")
    expected[path_to_uri(folder / "alias.png")] = Expected("skipped", "duplicate")


def build_archive(root: Path, images: int, *, outside: Path | None = None) -> Archive:
    """`images` generated faces in nested folders, plus the hostile files when `outside` is set."""
    archive = Archive(root=root)
    for path in generate_images(root, images):
        uri = path_to_uri(path)
        archive.generated.append(uri)
        archive.expected[uri] = LABELED
    if outside is not None:
        add_hostile_files(archive, outside)
    return archive
