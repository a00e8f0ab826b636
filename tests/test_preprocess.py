"""The one preprocessing function on real encoded images, hostile ones included."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from core.errors import ImageError
from core.reasons import Reason
from core.settings import LimitSettings
from tests.support.images import bomb_png
from training.preprocess import (
    ImageHeader,
    InputSpec,
    _decode_plain_jpeg,
    _pillow_header,
    _plain_jpeg_header,
    decode,
    jpeg_reduction,
    load_image,
    read_header,
    to_model_input,
)

SPEC = InputSpec(32, 32, "rgb")
LIMITS = LimitSettings()


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def red_square(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    colours = {"RGB": (255, 0, 0), "RGBA": (255, 0, 0, 255), "L": 128, "CMYK": (0, 255, 255, 0)}
    return Image.new(mode, size, colours[mode])


def test_rgb_order_is_red_first() -> None:
    pixels = load_image(encode(red_square(), "PNG"), SPEC, LIMITS)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels[..., 0].min() > 250 and pixels[..., 2].max() < 5


def test_grayscale_source_becomes_three_channels() -> None:
    pixels = load_image(encode(red_square("L"), "PNG"), SPEC, LIMITS)
    assert pixels.shape == (32, 32, 3)
    assert np.all(pixels == pixels[..., :1])


def test_grayscale_model_gets_one_channel_from_colour() -> None:
    pixels = load_image(encode(red_square(), "JPEG"), InputSpec(16, 16, "grayscale"), LIMITS)
    assert pixels.shape == (16, 16, 1)


def test_transparent_pixels_compose_over_white() -> None:
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    pixels = load_image(encode(image, "PNG"), SPEC, LIMITS)
    assert pixels.min() >= 250


def test_sixteen_bit_png_is_scaled_to_eight_bits() -> None:
    array = np.full((40, 40, 3), 65535, dtype=np.uint16)
    ok, data = cv2.imencode(".png", array)
    assert ok
    pixels = load_image(data.tobytes(), SPEC, LIMITS)
    assert pixels.min() >= 250


def test_cmyk_jpeg_decodes_to_rgb() -> None:
    pixels = load_image(encode(red_square("CMYK"), "JPEG"), SPEC, LIMITS)
    assert pixels.shape == (32, 32, 3)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 60


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(red_square(size=(80, 40)), "JPEG", exif=exif.tobytes())
    header = read_header(data)
    image = decode(data, header, InputSpec(80, 80))
    assert image.shape[:2] == (80, 40)  # stored 80 wide, 40 high; shown rotated


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (40, 40), (0, 0, 255)), Image.new("RGB", (40, 40), (255, 0, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert read_header(data).frames == 2
    pixels = load_image(data, SPEC, LIMITS)
    assert pixels[..., 2].mean() > 200


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.EMPTY),
        (b"hello, I am text named photo.jpg\n", Reason.NOT_AN_IMAGE),
        (b"%PDF-1.4\n" + b"0" * 200, Reason.NOT_AN_IMAGE),
        (bomb_png(20000, 20000), Reason.TOO_MANY_PIXELS),
    ],
)
def test_hostile_bytes_are_refused_with_a_reason(data: bytes, reason: Reason) -> None:
    with pytest.raises(ImageError) as caught:
        load_image(data, SPEC, LIMITS)
    assert caught.value.reason == reason


def test_truncated_jpeg_is_corrupt() -> None:
    data = encode(Image.effect_noise((256, 256), 60).convert("RGB"), "JPEG")
    with pytest.raises(ImageError) as caught:
        load_image(data[: len(data) // 2], SPEC, LIMITS)
    assert caught.value.reason == Reason.CORRUPT


def test_corrupt_png_body_is_corrupt() -> None:
    data = bytearray(encode(Image.effect_noise((64, 64), 60).convert("RGB"), "PNG"))
    data[60:200] = b"\x00" * 140
    with pytest.raises(ImageError) as caught:
        load_image(bytes(data), SPEC, LIMITS)
    assert caught.value.reason == Reason.CORRUPT


def test_limits_refuse_before_decoding() -> None:
    data = encode(red_square(size=(300, 300)), "PNG")
    with pytest.raises(ImageError) as caught:
        load_image(data, SPEC, LimitSettings(max_pixels=300 * 299))
    assert caught.value.reason == Reason.TOO_MANY_PIXELS
    with pytest.raises(ImageError) as caught:
        load_image(data, SPEC, LimitSettings(max_file_bytes=len(data) - 1))
    assert caught.value.reason == Reason.TOO_LARGE
    with pytest.raises(ImageError) as caught:
        load_image(encode(red_square(size=(4, 40)), "PNG"), SPEC, LIMITS)
    assert caught.value.reason == Reason.TOO_SMALL


def test_large_jpeg_decodes_at_reduced_scale_to_the_same_picture() -> None:
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), (1600, 1200))
    ok, encoded = cv2.imencode(".jpg", base)
    assert ok
    data = encoded.tobytes()
    header = read_header(data)
    spec = InputSpec(128, 128)
    assert jpeg_reduction(header, spec) == 8
    assert jpeg_reduction(header, InputSpec(256, 256)) == 4
    reduced = load_image(data, spec, LIMITS).astype(np.float32)
    full = cv2.resize(
        cv2.cvtColor(base, cv2.COLOR_BGR2RGB), (128, 128), interpolation=cv2.INTER_AREA
    )
    assert np.abs(reduced - full.astype(np.float32)).mean() < 6


def test_model_input_scaling() -> None:
    batch = np.full((2, 4, 4, 3), 255, dtype=np.uint8)
    assert to_model_input(batch, SPEC).max() == 255.0
    scaled = to_model_input(batch, InputSpec(4, 4, "rgb", pixel_scale=2 / 255, pixel_offset=-1))
    assert np.allclose(scaled, 1.0)


def _textured(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    return Image.fromarray(cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC))


def _with_orientation(image: Image.Image, image_format: str) -> bytes:
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encode(image, image_format, exif=exif)


DECODE_CASES = {
    "jpeg": lambda image: encode(image, "JPEG", quality=90),
    "jpeg 4:4:4": lambda image: encode(image, "JPEG", quality=95, subsampling=0),
    "jpeg progressive": lambda image: encode(image, "JPEG", progressive=True),
    "jpeg grey": lambda image: encode(image.convert("L"), "JPEG"),
    "jpeg cmyk": lambda image: encode(image.convert("CMYK"), "JPEG"),
    "jpeg exif-rotated": lambda image: _with_orientation(image, "JPEG"),
    "png": lambda image: encode(image, "PNG"),
    "png palette": lambda image: encode(image.convert("P"), "PNG"),
    "png exif-rotated": lambda image: _with_orientation(image, "PNG"),
    "bmp": lambda image: encode(image, "BMP"),
    "gif": lambda image: encode(image, "GIF"),
    "webp": lambda image: encode(image, "WEBP", quality=80),
    "tiff": lambda image: encode(image, "TIFF"),
}


REDUCED = {
    "rgb": {
        1: cv2.IMREAD_COLOR,
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    },
    "grayscale": {
        1: cv2.IMREAD_GRAYSCALE,
        2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
        4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
        8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
    },
}
# Sides that make jpeg_reduction pick each DCT scale for a 64x64 model input.
SIDES = {64: 1, 170: 2, 300: 4, 520: 8}


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
@pytest.mark.parametrize("side", sorted(SIDES))
@pytest.mark.parametrize("mode", ["rgb", "grayscale"])
def test_decoding_matches_opencv_bgr_then_convert(case: str, side: int, mode: str) -> None:
    # Plain JPEGs go to TurboJPEG, the rest to OpenCV asked for RGB directly: served and trained
    # pixels must stay exactly what OpenCV's BGR decoding + cvtColor gave (PREPROCESS_VERSION 1),
    # at full and at every reduced JPEG scale, in colour and in grey.
    data = DECODE_CASES[case](_textured(side + 40, side))
    spec = InputSpec(64, 64, mode)  # type: ignore[arg-type]
    header = read_header(data)
    factor = jpeg_reduction(header, spec)
    assert header.image_type != "jpeg" or factor == SIDES[side]
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), REDUCED[mode][factor])
    if mode == "rgb":
        reference = cv2.cvtColor(reference, cv2.COLOR_BGR2RGB)
    else:
        reference = reference[:, :, np.newaxis]
    np.testing.assert_array_equal(decode(data, header, spec), reference)


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_plain_jpegs_and_only_those_take_turbojpeg(case: str) -> None:
    data = DECODE_CASES[case](_textured(300, 260))
    header = read_header(data)
    plain = case in {"jpeg", "jpeg 4:4:4", "jpeg progressive", "jpeg grey", "jpeg exif-rotated"}
    if header.image_type == "jpeg":
        assert (_decode_plain_jpeg(data, header, 1, grayscale=False) is not None) == plain
    # Where TurboJPEG cannot take it (CMYK), OpenCV decodes it: everything still decodes.
    assert decode(data, header, SPEC).ndim == 3


def test_exif_orientation_is_read_with_the_header() -> None:
    image = _textured(80, 40)
    assert read_header(encode(image, "JPEG")).orientation == 1
    assert read_header(_with_orientation(image, "JPEG")).orientation == 6
    rotated = decode(
        _with_orientation(image, "JPEG"),
        read_header(_with_orientation(image, "JPEG")),
        InputSpec(80, 40, "rgb"),
    )
    assert rotated.shape == (80, 40, 3)  # the rotation was applied


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["rgb", "grayscale"])
def test_every_exif_orientation_is_applied_as_opencv_applies_it(
    orientation: int, mode: str
) -> None:
    # TurboJPEG decodes (strictly) and the image is turned here: OpenCV's pixels, at every scale.
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(_textured(340, 180), "JPEG", quality=90, exif=exif.tobytes())
    header = read_header(data)
    assert header.orientation == orientation
    spec = InputSpec(64, 64, mode)  # type: ignore[arg-type]
    factor = jpeg_reduction(header, spec)
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), REDUCED[mode][factor])
    if mode == "rgb":
        reference = cv2.cvtColor(reference, cv2.COLOR_BGR2RGB)
    else:
        reference = reference[:, :, np.newaxis]
    assert _decode_plain_jpeg(data, header, factor, grayscale=mode == "grayscale") is not None
    np.testing.assert_array_equal(decode(data, header, spec), reference)


def test_a_jpeg_libjpeg_warns_about_is_refused_as_corrupt_not_handed_to_opencv() -> None:
    data = encode(_textured(120, 100), "JPEG", quality=90)
    # Cut inside the entropy-coded data, end-of-image marker put back: libjpeg warns and fills.
    damaged = data[: len(data) * 2 // 3] + b"\xff\xd9"
    assert cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(ImageError) as caught:
        _decode_plain_jpeg(damaged, read_header(damaged), 1, grayscale=False)
    assert caught.value.reason == Reason.CORRUPT
    assert "libjpeg" in str(caught.value)
    with pytest.raises(ImageError) as caught:
        load_image(damaged, InputSpec(64, 64, "rgb"), LIMITS)
    assert caught.value.reason == Reason.CORRUPT


def test_corrupted_jpegs_are_refused_or_decode_exactly_as_opencv_decodes_them() -> None:
    # Damage inside the entropy-coded data either makes libjpeg warn (TurboJPEG's strict mode
    # refuses: corrupt, and OpenCV's lenient decode is never tried) or passes unnoticed (both
    # decode it, and the pixels must be OpenCV's, as they were before TurboJPEG took plain JPEGs).
    data = encode(_textured(256, 256), "JPEG", quality=90)
    scan_start = data.index(b"\xff\xda") + 16
    rng = np.random.default_rng(7)
    spec = InputSpec(256, 256, "rgb")
    refused = 0
    for _ in range(60):
        damaged = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            damaged[int(rng.integers(scan_start, len(data) - 2))] = int(rng.integers(0, 256))
        damaged_bytes = bytes(damaged)
        reference = cv2.imdecode(np.frombuffer(damaged_bytes, np.uint8), cv2.IMREAD_COLOR)
        assert reference is not None  # libjpeg fills what it cannot decode
        header = read_header(damaged_bytes)
        slot = np.full(spec.shape, 7, dtype=np.uint8)
        try:
            decoded = decode(damaged_bytes, header, spec)
        except ImageError as error:
            assert error.reason == Reason.CORRUPT
            with pytest.raises(ImageError):
                load_image(damaged_bytes, spec, LIMITS, out=slot)
            refused += 1
            continue
        expected = cv2.cvtColor(reference, cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(decoded, expected)
        np.testing.assert_array_equal(load_image(damaged_bytes, spec, LIMITS, out=slot), expected)
    assert 0 < refused < 60  # both outcomes were exercised


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
@pytest.mark.parametrize("size", [(64, 64), (104, 64), (560, 520)])
@pytest.mark.parametrize("mode", ["rgb", "grayscale"])
def test_loading_into_a_batch_slot_gives_the_same_pixels_and_touches_no_other_slot(
    case: str, size: tuple[int, int], mode: str
) -> None:
    # The worker decodes each image straight into its slot of a batch array: exactly what
    # load_image returns on its own, whichever decoder and resize path the image takes.
    data = DECODE_CASES[case](_textured(*size))
    spec = InputSpec(64, 64, mode)  # type: ignore[arg-type]
    batch = np.full((3, *spec.shape), 7, dtype=np.uint8)
    slot = batch[1]
    assert load_image(data, spec, LIMITS, out=slot) is slot
    np.testing.assert_array_equal(slot, load_image(data, spec, LIMITS))
    assert (batch[0] == 7).all() and (batch[2] == 7).all()


@pytest.mark.parametrize("mode", ["rgb", "grayscale"])
def test_a_jpeg_at_the_model_size_is_decoded_in_place(mode: str) -> None:
    data = encode(_textured(64, 64), "JPEG", quality=90)
    spec = InputSpec(64, 64, mode)  # type: ignore[arg-type]
    slot = np.zeros(spec.shape, dtype=np.uint8)
    assert decode(data, read_header(data), spec, out=slot) is slot  # no array of its own
    np.testing.assert_array_equal(slot, decode(data, read_header(data), spec))
    # A slot that is not contiguous cannot be written by TurboJPEG: decoded, then copied in.
    strided = np.zeros((64, 128, spec.channels), dtype=np.uint8)[:, ::2]
    assert load_image(data, spec, LIMITS, out=strided) is strided
    np.testing.assert_array_equal(strided, slot)


def _jpeg_variants() -> dict[str, bytes]:
    image = _textured(120, 90)
    plain = encode(image, "JPEG", quality=90)
    second = _textured(120, 90).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    xmp = b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>"
    comment = b"\xff\xfe" + (2 + 5).to_bytes(2, "big") + b"hello"
    return {
        "plain": plain,
        "grey": encode(image.convert("L"), "JPEG"),
        "cmyk": encode(image.convert("CMYK"), "JPEG"),
        "progressive": encode(image, "JPEG", progressive=True),
        "icc profile": encode(image, "JPEG", icc_profile=b"\0" * 3000),
        "xmp": encode(image, "JPEG", xmp=xmp),
        "comment": plain[:2] + comment + plain[2:],
        "fill bytes": plain[:2] + b"\xff\xff" + plain[2:],
        "exif, not rotated": encode(image, "JPEG", exif=Image.Exif().tobytes()),
        "exif-rotated": _with_orientation(image, "JPEG"),
        "mpo": encode(image, "MPO", save_all=True, append_images=[second]),
        "junk between segments": plain[:2] + b"junk" + plain[2:],
        "cut in the header": plain[:40],
        "cut after the header": plain[: plain.index(b"\xff\xda") + 20],
    }


@pytest.mark.parametrize("case", sorted(_jpeg_variants()))
def test_a_jpeg_header_says_what_pillow_says(case: str) -> None:
    # Plain JPEGs skip Pillow for libjpeg's header parser; what only Pillow reads (EXIF, MPO)
    # or what libjpeg refuses still goes to Pillow. Either way: Pillow's answer, or its refusal.
    data = _jpeg_variants()[case]
    fast = _plain_jpeg_header(data)
    takes_fast_path = case not in {
        "exif, not rotated", "exif-rotated", "mpo", "junk between segments", "cut in the header"
    }  # fmt: skip
    assert (fast is not None) == takes_fast_path
    try:
        expected: ImageHeader | Reason = _pillow_header(data)
    except ImageError as error:
        expected = error.reason
    assert fast in (None, expected)
    try:
        got: ImageHeader | Reason = read_header(data)
    except ImageError as error:
        got = error.reason
    assert got == expected
    if case == "mpo":
        assert isinstance(got, ImageHeader) and got.frames == 2
