"""Wrap a third-party Keras image classifier (`.keras` or legacy `.h5`) as an emolabel artifact.

Whatever its input size, channel count or number of classes: the input shape and head are read
from the model, the class names and pixel scaling come from the user, and anything that does not
fit (class count vs output width, colour mode vs channels) is refused with a clear message.

The file comes from outside, so it is never parsed in the operator's process: a child Python
(`python -I`, a scratch HOME, no GPU, limits on memory, CPU time and file size) checks that its
architecture carries no code (`training.trust`), loads it with `safe_mode=True` and saves it again
as a plain `.keras`. Only that re-saved file, checked again, is loaded here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from core.errors import ModelError
from training.artifacts import file_sha256, load_keras_model, save_artifact
from training.metadata import (
    MAX_CLASS_NAME,
    Head,
    InputMetadata,
    ModelMetadata,
    Subject,
    library_versions,
    new_version,
    overlong_class_names,
)
from training.preprocess import ColorMode

# Limits of the child that parses an imported file: enough for any image classifier one would
# import (TensorFlow itself takes about 2.2 GB of address space), not for a file built to exhaust.
SANDBOX_MEMORY_BYTES = 8 << 30
SANDBOX_CPU_SECONDS = 300
SANDBOX_FILE_BYTES = 4 << 30
SANDBOX_WALL_SECONDS = 600
MODEL_ERROR_EXIT = 3
# `-I` ignores PYTHON* variables, the user's site-packages and the current folder; the project
# root is put on the path by hand, so the child runs this very code.
_SANDBOX_SCRIPT = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({SANDBOX_MEMORY_BYTES}, {SANDBOX_MEMORY_BYTES}))
resource.setrlimit(resource.RLIMIT_CPU, ({SANDBOX_CPU_SECONDS}, {SANDBOX_CPU_SECONDS}))
resource.setrlimit(resource.RLIMIT_FSIZE, ({SANDBOX_FILE_BYTES}, {SANDBOX_FILE_BYTES}))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.path.insert(0, sys.argv[1])
from training.importing import _convert_in_sandbox
sys.exit(_convert_in_sandbox(sys.argv[2], sys.argv[3]))
"""


def _convert_in_sandbox(source: str, target: str) -> int:
    """In the child: check, load safely and re-save `source` as `target`; exit status."""
    from training.runtime import load_keras

    load_keras()
    try:
        load_keras_model(Path(source)).save(target)
    except ModelError as error:
        print(error, file=sys.stderr)
        return MODEL_ERROR_EXIT
    return 0


def convert_untrusted(source: Path, target: Path, backend: str) -> None:
    """Re-save a third-party `.keras`/`.h5` file as a plain `.keras`, parsed only in a child."""
    project_root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="emolabel-import-") as scratch:
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": scratch,
            "KERAS_HOME": scratch,
            "KERAS_BACKEND": backend,
            "CUDA_VISIBLE_DEVICES": "",
            "TF_CPP_MIN_LOG_LEVEL": "3",
        }
        try:
            completed = subprocess.run(
                [sys.executable, "-I", "-c", _SANDBOX_SCRIPT, str(project_root),
                 str(source.resolve()), str(target.resolve())],
                cwd=scratch, env=environment, stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=SANDBOX_WALL_SECONDS, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ModelError(
                f"{source}: reading the model took over {SANDBOX_WALL_SECONDS} s; refused"
            ) from None
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    if completed.returncode == MODEL_ERROR_EXIT and lines:
        raise ModelError(lines[-1])
    if completed.returncode != 0 or not target.is_file():
        last = lines[-1][:300] if lines else "no message"
        raise ModelError(
            f"{source}: the sandboxed reader failed (exit status {completed.returncode}: {last})"
        )


def parse_scale(text: str) -> float:
    """'1/255', '0.0039', '1' or 'none' (=1) -> a float multiplier for 0..255 pixels."""
    cleaned = text.strip().lower()
    if cleaned in {"none", "1", ""}:
        return 1.0
    try:
        value = float(Fraction(cleaned))
    except (ValueError, ZeroDivisionError):
        raise ModelError(f"--scale {text!r}: give a number or a fraction such as 1/255") from None
    if value <= 0:
        raise ModelError(f"--scale {text!r}: must be positive")
    return value


def _head(output_width: int, num_classes: int) -> Head:
    if output_width == 1 and num_classes == 2:
        return "sigmoid"
    if output_width == num_classes:
        return "softmax"
    raise ModelError(
        f"the model has {output_width} output unit(s) but {num_classes} class names were given; "
        "pass one name per output (or two names for a single sigmoid output)"
    )


def import_model(
    source: Path,
    class_names: Sequence[str],
    models_dir: Path,
    name: str,
    *,
    color_mode: ColorMode | None = None,
    scale: str | None = None,
    offset: float = 0.0,
    image_size: int | None = None,
    subject: Subject = "image",
) -> Path:
    """Load `source`, check it against the given classes, and save it as a new artifact.

    `subject` says what the model's input shows: `face` for a face-crop classifier (served on
    detected faces), `image` for a whole-picture one.
    """
    names = [name_.strip() for name_ in class_names if name_.strip()]
    if len(names) < 2:
        raise ModelError("--classes needs at least two comma-separated names")
    too_long = overlong_class_names(names)
    if too_long:
        raise ModelError(
            f"class names must be at most {MAX_CLASS_NAME} characters: {too_long[0]!r}"
        )
    import keras

    if not source.is_file():
        raise ModelError(f"{source}: no such model file")
    with tempfile.TemporaryDirectory(prefix="emolabel-import-") as converted:
        plain = Path(converted) / "converted.keras"
        convert_untrusted(source, plain, keras.backend.backend())
        model = load_keras_model(plain)
    input_shape = tuple(model.inputs[0].shape)
    if len(model.inputs) != 1 or len(input_shape) != 4:
        raise ModelError(
            f"expected one image input (batch, height, width, channels); got {input_shape}"
        )
    _, height, width, channels = input_shape
    if height is None or width is None:
        if image_size is None:
            raise ModelError("the model accepts any image size; pass --image-size")
        height = width = image_size
    if channels not in (1, 3):
        raise ModelError(f"the model takes {channels} channels; only 1 (grey) or 3 (RGB) work")
    implied: ColorMode = "grayscale" if channels == 1 else "rgb"
    if color_mode is not None and color_mode != implied:
        raise ModelError(
            f"--color {color_mode} does not fit a model input with {channels} channel(s)"
        )
    output_shape = tuple(model.outputs[0].shape)
    if len(model.outputs) != 1 or len(output_shape) != 2:
        raise ModelError(f"expected one (batch, classes) output; got {output_shape}")
    head = _head(int(output_shape[1]), len(names))

    # A model that starts with its own Rescaling layer wants raw 0..255 pixels.
    rescales_itself = any(type(layer).__name__ == "Rescaling" for layer in model.layers[:3])
    pixel_scale = parse_scale(scale) if scale is not None else (1.0 if rescales_itself else 1 / 255)
    version = new_version()
    metadata = ModelMetadata(
        name=name,
        version=version,
        class_names=names,
        head=head,
        source="imported",
        subject=subject,
        input=InputMetadata(
            height=int(height),
            width=int(width),
            color_mode=implied,
            pixel_scale=pixel_scale,
            pixel_offset=offset,
            scaling_in_model=rescales_itself,
        ),
        training={"imported_from": str(source.resolve()), "source_sha256": file_sha256(source)},
        libraries=library_versions(),
    )
    directory = models_dir / name / version
    staging = models_dir / name / f".{version}.partial"
    try:
        save_artifact(model, metadata, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.rename(directory)
    return directory
