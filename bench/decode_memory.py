"""Peak memory of one image's decode, per type, against the estimate the decode budget checks.

    python -m bench decode_memory [--width 4000] [--height 3000]

Each (type, colour mode) decodes in a fresh process through `preprocess.load_image`; the peak
resident size is reset just before (`/proc/self/clear_refs`, Linux) and read after (`VmHWM`), so
the growth is what that decode alone needed. `training.preprocess`'s per-type tables come from
this; rerun it after an OpenCV or libjpeg-turbo upgrade: an "over" row means an estimate is low.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

_CHILD = """
import json, sys, time
from core.settings import LimitSettings
from training.preprocess import InputSpec, decode_cost, load_image, read_header

def resident(field):
    line = next(line for line in open("/proc/self/status") if line.startswith(field))
    return int(line.split()[1]) * 1024

data = open(sys.argv[1], "rb").read()
spec = InputSpec(256, 256, sys.argv[2])
limits = LimitSettings(max_decode_bytes=1 << 40)
estimate = decode_cost(data, read_header(data), spec, limits).memory_bytes
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = resident("VmRSS")
started = time.process_time()
load_image(data, spec, limits)
seconds = time.process_time() - started
print(json.dumps({"grew": resident("VmHWM") - before, "estimate": estimate, "cpu": seconds}))
"""


def _encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _cases(width: int, height: int) -> dict[str, Callable[[], bytes]]:
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (max(1, height // 50), max(1, width // 50), 4), dtype=np.uint8)
    rgba = cv2.resize(blocks, (width, height), interpolation=cv2.INTER_NEAREST)
    image = Image.fromarray(rgba, "RGBA")
    rgb = image.convert("RGB")
    rotated = Image.Exif()
    rotated[0x0112] = 6  # turned 90 degrees to display

    def png16(channels: int) -> bytes:
        deep = rgba[:, :, :channels].astype(np.uint16) * 257
        return bytes(cv2.imencode(".png", deep, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1])

    return {
        "png rgba": lambda: _encode(image, "PNG", compress_level=1),
        "png rgb": lambda: _encode(rgb, "PNG", compress_level=1),
        "png rgba 16-bit": lambda: png16(4),
        "png rgb 16-bit": lambda: png16(3),
        "webp rgba": lambda: _encode(image, "WEBP", quality=50),
        "webp rgb": lambda: _encode(rgb, "WEBP", quality=50),
        "tiff rgba": lambda: _encode(image, "TIFF"),
        "tiff rgb": lambda: _encode(rgb, "TIFF"),
        "gif": lambda: _encode(rgb.convert("P"), "GIF"),
        "bmp": lambda: _encode(rgb, "BMP"),
        "jpeg": lambda: _encode(rgb, "JPEG"),
        "jpeg progressive": lambda: _encode(rgb, "JPEG", progressive=True),
        "jpeg progressive 4:4:4": lambda: _encode(rgb, "JPEG", progressive=True, subsampling=0),
        "jpeg cmyk": lambda: _encode(image.convert("CMYK"), "JPEG"),
        "jpeg exif-rotated": lambda: _encode(rgb, "JPEG", exif=rotated.tobytes()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    options = parser.parse_args()
    pixels = options.width * options.height
    print(f"{options.width}x{options.height}: peak growth and estimate in bytes per pixel")
    print(f"{'type':24} {'mode':9} {'peak':>6} {'estimate':>8} {'cpu s':>6}")
    over = 0
    with tempfile.TemporaryDirectory() as folder:
        for name, make in _cases(options.width, options.height).items():
            path = Path(folder) / "image"
            path.write_bytes(make())
            for mode in ("rgb", "grayscale"):
                completed = subprocess.run(
                    [sys.executable, "-c", _CHILD, str(path), mode],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                result = json.loads(completed.stdout.strip().splitlines()[-1])
                late = result["grew"] > result["estimate"]
                over += late
                print(
                    f"{name:24} {mode:9} {result['grew'] / pixels:6.2f} "
                    f"{result['estimate'] / pixels:8.2f} {result['cpu']:6.2f}"
                    f"{'  over' if late else ''}"
                )
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
