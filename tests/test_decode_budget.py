"""Files inside the byte and pixel limits that would cost gigabytes or minutes to decode.

Every check here is on an outcome (labeled, or refused with which reason) or on memory, never on
seconds: a refusal happens before any decoder runs, and the capped children below die, or fail
to allocate, if a decode takes more memory than it should.
"""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import Image

import training.preprocess as preprocess
from core.errors import ImageError
from core.reasons import Reason
from core.settings import LimitSettings
from tests.support.images import HOSTILE, flat_png, repeated_scan_jpeg
from training.clean import scan_dataset
from training.preprocess import (
    InputSpec,
    _high_bytes,
    check_decode_budget,
    count_jpeg_scans,
    decode_cost,
    load_image,
    read_header,
    resize,
)

REPO = Path(__file__).resolve().parents[1]
SPEC = InputSpec(64, 64, "rgb")
LIMITS = LimitSettings()
ADDRESS_SPACE_CAP = 2 * 1024**3


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _noise(width: int, height: int, mode: str = "RGBA") -> Image.Image:
    rng = np.random.default_rng(5)
    array = rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    return Image.fromarray(array, mode)


# --- scans ---------------------------------------------------------------------------------------


def test_scans_are_counted_as_libjpeg_reads_them() -> None:
    image = _noise(120, 90, "RGB")
    plain = encode(image, "JPEG")
    progressive = encode(image, "JPEG", progressive=True)
    assert count_jpeg_scans(plain) == 1
    assert count_jpeg_scans(progressive) == progressive.count(b"\xff\xda") >= 6
    # An MPO's second picture is not part of the first one, which is all that is decoded.
    mpo = encode(image, "MPO", save_all=True, append_images=[image])
    assert mpo.count(b"\xff\xda") == 2 and count_jpeg_scans(mpo) == 1
    # A segment whose bytes happen to hold FF DA (a comment here) is skipped by its length.
    comment = b"\xff\xfe" + (2 + 8).to_bytes(2, "big") + b"\xff\xda\xff\xda\xff\xda\xff\xda"
    assert count_jpeg_scans(plain[:2] + comment + plain[2:]) == 1
    # Junk between segments (libjpeg skips it with a warning) cannot hide a scan.
    repeated = repeated_scan_jpeg(64, 64, 80)
    junk = repeated[:2] + b"junk" + repeated[2:]
    assert count_jpeg_scans(junk) == 80


def test_a_jpeg_with_hundreds_of_scans_is_refused_before_any_decoder_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = repeated_scan_jpeg(2048, 2048, 300)
    assert len(data) < 64 * 1024  # small, and inside every byte and pixel limit

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("a decoder ran")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", no_decoding)
    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(ImageError) as caught:
        load_image(data, SPEC, LIMITS)
    assert caught.value.reason == Reason.UNSUPPORTED_TYPE
    assert "65 scans or more, over the 64 limit" in str(caught.value)  # counting stopped there
    assert count_jpeg_scans(data) == 300


def test_the_scan_limit_is_a_setting_and_real_progressive_jpegs_are_far_below_it() -> None:
    progressive = encode(_noise(300, 200, "RGB"), "JPEG", progressive=True)
    assert load_image(progressive, SPEC, LimitSettings(max_jpeg_scans=10)).shape == SPEC.shape
    with pytest.raises(ImageError) as caught:
        load_image(progressive, SPEC, LimitSettings(max_jpeg_scans=5))
    assert caught.value.reason == Reason.UNSUPPORTED_TYPE
    # 64 scans is the default: the repeats past libjpeg's script are refused by strict decoding.
    with pytest.raises(ImageError) as caught:
        load_image(repeated_scan_jpeg(256, 256, 64), SPEC, LIMITS)
    assert caught.value.reason == Reason.CORRUPT


def test_extra_scans_after_a_complete_sequential_scan_cost_nothing_and_are_refused() -> None:
    # libjpeg decodes a baseline JPEG's one interleaved scan and refuses a second one outright,
    # so such a file is one pass however many scans follow (and its scans are not even counted).
    data = encode(_noise(400, 300, "RGB"), "JPEG", quality=90)
    scan, end = data.index(b"\xff\xda"), data.rindex(b"\xff\xd9")
    repeated = data[:end] + data[scan:end] * 200 + data[end:]
    cost = decode_cost(repeated, read_header(repeated), SPEC, LIMITS)
    assert cost.scans == 1 and cost.work == 400 * 300
    with pytest.raises(ImageError) as caught:
        load_image(repeated, SPEC, LIMITS)
    assert caught.value.reason == Reason.CORRUPT
    assert "more than one scan" in str(caught.value)


def _with_dimensions(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG bytes with the frame header claiming another size (never decoded)."""
    frame = data.index(b"\xff\xc2")
    size = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return data[: frame + 5] + size + data[frame + 9 :]


def test_passes_over_a_large_image_are_bounded_by_the_work_budget() -> None:
    # 40 scans are fine at 2 megapixels, not at 100: each scan is a pass over every pixel.
    data = repeated_scan_jpeg(1600, 1200, 40)
    cost = decode_cost(data, read_header(data), SPEC, LIMITS)
    assert cost.scans == 40 and cost.work == 40 * 1600 * 1200
    check_decode_budget(data, read_header(data), SPEC, LIMITS)
    huge = _with_dimensions(data, 10_000, 10_000)
    with pytest.raises(ImageError) as caught:
        check_decode_budget(huge, read_header(huge), SPEC, LIMITS)
    assert caught.value.reason == Reason.TOO_LARGE
    assert "pixel passes" in str(caught.value)


def test_a_damaged_progressive_jpeg_is_corrupt_not_decoded_leniently() -> None:
    data = repeated_scan_jpeg(512, 512, 30)  # under every limit; libjpeg warns on the repeats
    with pytest.raises(ImageError) as caught:
        load_image(data, SPEC, LIMITS)
    assert caught.value.reason == Reason.CORRUPT
    assert "libjpeg" in str(caught.value)


@pytest.mark.parametrize("kind", ["cmyk", "exif-rotated"])
def test_jpegs_opencv_used_to_take_are_checked_strictly_too(kind: str) -> None:
    image = _noise(200, 150, "RGB")
    if kind == "cmyk":
        data = encode(image.convert("CMYK"), "JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = 8
        data = encode(image, "JPEG", exif=exif.tobytes())
    assert load_image(data, SPEC, LIMITS).shape == SPEC.shape
    damaged = data[: len(data) * 2 // 3] + b"\xff\xd9"  # libjpeg warns; OpenCV would fill it
    assert cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(ImageError) as caught:
        load_image(damaged, SPEC, LIMITS)
    assert caught.value.reason == Reason.CORRUPT


# --- memory estimates ----------------------------------------------------------------------------


def test_memory_estimate_follows_bits_alpha_and_progressive_coefficients() -> None:
    rgba = flat_png(1000, 1000)
    rgba16 = flat_png(1000, 1000, bits=16)
    rgb = flat_png(1000, 1000, channels=3)
    assert read_header(rgba16).bits_per_sample == 16 and read_header(rgba16).has_alpha

    def memory(data: bytes) -> int:
        return decode_cost(data, read_header(data), SPEC, LIMITS).memory_bytes

    overhead = preprocess._DECODE_OVERHEAD_BYTES
    assert memory(rgba16) - overhead == 2 * (memory(rgba) - overhead)
    assert memory(rgb) < memory(rgba)
    # A progressive JPEG keeps every coefficient, whatever scale it is decoded at.
    image = _noise(2000, 1600, "RGB")
    baseline = encode(image, "JPEG", subsampling=0)
    progressive = encode(image, "JPEG", subsampling=0, progressive=True)
    assert memory(progressive) - memory(baseline) == 2000 * 1600 * 3 * 2
    with pytest.raises(ImageError) as caught:
        check_decode_budget(
            rgba16, read_header(rgba16), SPEC, LimitSettings(max_decode_bytes=2**24)
        )
    assert caught.value.reason == Reason.TOO_LARGE and "MiB" in str(caught.value)


def test_a_sixteen_bit_rgba_png_over_the_memory_budget_is_refused_unread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 16-bit RGBA at the pixel limit: ~2 GiB to decode through OpenCV, refused by its header.
    data = flat_png(10_950, 10_950, bits=16)
    monkeypatch.setattr(cv2, "imdecode", None)  # would raise TypeError if called
    with pytest.raises(ImageError) as caught:
        load_image(data, SPEC, LIMITS)
    assert caught.value.reason == Reason.TOO_LARGE


# --- alpha: same pixels, no full-size copies -----------------------------------------------------


def _composed_at_full_size(data: bytes, spec: InputSpec) -> np.ndarray:
    """PREPROCESS_VERSION 1's alpha path: full-size float32 composition, then resize."""
    image: Any = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGRA)
    if image.shape[2] == 2:
        grey, alpha_channel = image[:, :, 0], image[:, :, 1]
        image = np.dstack([grey, grey, grey, alpha_channel])
    if image.shape[2] == 3:
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    else:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        colour = image[:, :, :3].astype(np.float32)
        composed = np.clip(colour * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
        rgb = cv2.cvtColor(composed, cv2.COLOR_BGR2RGB)
    if spec.color_mode == "grayscale":
        rgb = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, np.newaxis]
    return resize(np.ascontiguousarray(rgb), spec)


def _alpha_cases(width: int, height: int) -> dict[str, bytes]:
    image = _noise(width, height)
    rng = np.random.default_rng(11)
    deep = rng.integers(0, 65536, (height, width, 4), dtype=np.uint16)
    return {
        "png rgba": encode(image, "PNG"),
        "png grey + alpha": encode(image.convert("LA"), "PNG"),
        "png palette + transparency": encode(
            image.convert("RGB").convert("P"), "PNG", transparency=3
        ),
        "png rgba 16-bit": cv2.imencode(".png", deep)[1].tobytes(),
        "webp rgba": encode(image, "WEBP", lossless=True),
        "tiff rgba": encode(image, "TIFF"),
    }


@pytest.mark.parametrize("size", [(64, 64), (300, 71), (40, 30), (560, 520)])
@pytest.mark.parametrize("mode", ["rgb", "grayscale"])
def test_alpha_images_give_the_pixels_of_full_size_composition(
    size: tuple[int, int], mode: str
) -> None:
    spec = InputSpec(64, 64, mode)  # type: ignore[arg-type]
    for case, data in _alpha_cases(*size).items():
        assert read_header(data).has_alpha, case
        expected = _composed_at_full_size(data, spec)
        np.testing.assert_array_equal(load_image(data, spec, LIMITS), expected, err_msg=case)


def test_sixteen_bit_samples_are_narrowed_in_their_own_buffer() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 65536, (123, 457, 4), dtype=np.uint16)
    expected = (image >> 8).astype(np.uint8)
    narrowed = _high_bytes(image.copy())
    np.testing.assert_array_equal(narrowed, expected)
    big = np.full((1500, 1000, 4), 0xABCD, dtype=np.uint16)  # several blocks
    narrowed = _high_bytes(big)
    assert narrowed.base is not None and np.shares_memory(narrowed, big)
    assert (narrowed == 0xAB).all()


def test_transparent_gif_and_many_frame_gif_are_labeled_from_the_first_frame() -> None:
    first = Image.new("P", (400, 300), 0)
    first.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    transparent = encode(first, "GIF", transparency=1)
    assert load_image(transparent, SPEC, LIMITS)[..., 2].mean() > 200
    later = Image.new("P", (400, 300), 1)
    later.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    # Frames that differ (identical ones are merged by the encoder); only the first is decoded.
    animated = encode(first, "GIF", save_all=True, append_images=[later, first] * 150)
    assert read_header(animated).frames > 100
    assert load_image(animated, SPEC, LIMITS)[..., 2].mean() > 200


# --- the same guards in clean (and so in train, which loads what clean passes) ---------------


def test_clean_refuses_what_decoding_would_refuse(tmp_path: Path) -> None:
    (tmp_path / "happy").mkdir()
    (tmp_path / "happy" / "scans.jpg").write_bytes(repeated_scan_jpeg(1024, 1024, 300))
    (tmp_path / "happy" / "deep.png").write_bytes(flat_png(400, 400, bits=16))
    (tmp_path / "happy" / "ok.png").write_bytes(flat_png(400, 400))
    report = scan_dataset(tmp_path, LimitSettings(max_decode_bytes=2**24 + 2 * 1024 * 1024))
    reasons = {finding.path.name: finding.reason for finding in report.findings}
    assert reasons == {"scans.jpg": Reason.UNSUPPORTED_TYPE, "deep.png": Reason.TOO_LARGE}
    assert [good.path.name for good in report.good] == ["ok.png"]


# --- hostile files, decoded as the worker decodes them, in a process capped at 2 GiB -----------

_CAPPED_WORKER = textwrap.dedent(
    """
    import json, sys
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    from core.settings import LimitSettings
    from training.preprocess import InputSpec, decode_cost, read_header
    from worker.predict import label_images
    from core.storage.reader import Reader

    class FixedRunner:
        version = "fixed"
        spec = InputSpec(64, 64, "rgb")
        class_names = ("happy", "sad")
        thresholds = None

        def predict(self, images):
            return np.tile(np.array([[0.75, 0.25]], np.float32), (len(images), 1))

    path, root = sys.argv[1], sys.argv[2]
    limits = LimitSettings()
    reader = Reader(limits.max_file_bytes)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak resident size starts again from here
    def resident(field):
        line = next(l for l in open("/proc/self/status") if l.startswith(field))
        return int(line.split()[1]) * 1024
    before = resident("VmRSS")
    with ThreadPoolExecutor(2) as pool:
        (outcome,) = label_images(
            [path], read=lambda uri: reader.read(uri, root), runner=FixedRunner(),
            limits=limits, pool=pool, batch_size=4,
        )
    grew = resident("VmHWM") - before
    data = reader.read(path, root)
    try:
        estimate = decode_cost(data, read_header(data), FixedRunner.spec, limits).memory_bytes
    except Exception:
        estimate = None
    label = outcome.prediction.label if outcome.prediction else None
    print(json.dumps({"reason": outcome.reason, "message": outcome.message, "label": label,
                      "grew": grew, "estimate": estimate}))
    """
)


def _cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))


def _decode_capped(path: Path) -> dict[str, object]:
    completed = subprocess.run(
        [sys.executable, "-c", _CAPPED_WORKER, path.as_uri(), path.parent.as_uri()],
        capture_output=True,
        text=True,
        cwd=REPO,
        preexec_fn=_cap_address_space,  # the cap only: no threads exist yet
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_file_is_labeled_or_refused_by_a_worker_capped_at_2_gib(
    name: str, tmp_path: Path
) -> None:
    make, expected = HOSTILE[name]
    path = tmp_path / name
    data = make()
    assert (
        len(data) <= LIMITS.max_file_bytes
        and read_header(data).width * read_header(data).height <= LIMITS.max_pixels
    )
    path.write_bytes(data)
    result = _decode_capped(path)
    if expected is None:
        assert result["reason"] is None, result
        assert result["label"] == "happy"
        # The estimate the budget checked bounds what the decode really took.
        assert isinstance(result["estimate"], int) and isinstance(result["grew"], int)
        assert result["grew"] <= result["estimate"], result
    else:
        assert expected is not None and result["reason"] == expected.value, result
