"""Versioned, self-describing model artifacts: `<models_dir>/<name>/<version>/`.

An artifact is `model.keras` plus `metadata.json` (and plots, the split manifest, TensorBoard
logs). The metadata says everything serving needs: class names in output order, input size,
colour mode, outside-the-model pixel scaling, the preprocessing version, and how it was made.
`load_artifact` refuses, with a `ModelError`, a model file with a code-carrying layer
(`training.trust`), a file whose hash is missing or disagrees with its metadata (or with the hashes
the registry recorded, when the caller passes them), and an output width or input shape that
disagrees with the metadata: no silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import ModelError
from training.metadata import (
    PREPROCESS_VERSION,
    InputMetadata,
    ModelMetadata,
    read_metadata,
    write_metadata,
)
from training.preprocess import InputSpec
from training.trust import METADATA_FILE as METADATA_FILE
from training.trust import MODEL_FILE as MODEL_FILE
from training.trust import REGISTRY, ArtifactHashes, check_hash, check_model_file
from training.trust import file_sha256 as file_sha256

if TYPE_CHECKING:
    import keras


def input_spec(metadata: InputMetadata) -> InputSpec:
    """The preprocessing spec that `metadata` describes."""
    return InputSpec(
        metadata.height,
        metadata.width,
        metadata.color_mode,
        metadata.pixel_scale,
        metadata.pixel_offset,
    )


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: the Keras model and the metadata that describes it."""

    path: Path
    metadata: ModelMetadata
    model: keras.Model

    @property
    def spec(self) -> InputSpec:
        return input_spec(self.metadata.input)


def save_artifact(model: keras.Model, metadata: ModelMetadata, directory: Path) -> Path:
    """Save the model and its metadata into `directory` (created); returns the directory."""
    check_output_width(model, metadata)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    write_metadata(directory, metadata)
    return directory


def resolve_artifact_dir(reference: str | Path | None, models_dir: Path, name: str) -> Path:
    """Find an artifact folder from a folder, a model.keras / metadata.json path, or the latest.

    With no reference, the newest version under `<models_dir>/<name>/` is used.
    """
    if reference is None:
        family = models_dir / name
        versions = sorted(
            (child for child in family.glob("*") if (child / METADATA_FILE).is_file()),
            key=lambda child: child.name,
        )
        if not versions:
            raise ModelError(
                f"no trained model under {family}; run `emolabel train DATA_DIR` or pass --model"
            )
        return versions[-1]
    path = Path(reference)
    if path.is_file() and path.name in {MODEL_FILE, METADATA_FILE}:
        path = path.parent
    if not path.exists():
        candidate = models_dir / name / str(reference)
        if candidate.is_dir():
            return candidate
        raise ModelError(f"{reference}: no such model artifact")
    if not path.is_dir():
        raise ModelError(
            f"{reference}: not a model artifact folder; wrap a bare Keras file with "
            "`emolabel import-model`"
        )
    return path


def check_output_width(model: keras.Model, metadata: ModelMetadata) -> None:
    """Refuse a model whose output width or input shape disagrees with its metadata."""
    output_shape = tuple(model.outputs[0].shape)
    if len(output_shape) != 2 or output_shape[-1] != metadata.output_width:
        raise ModelError(
            f"model output shape {output_shape} does not match metadata: "
            f"{len(metadata.class_names)} classes with a {metadata.head} head need "
            f"(None, {metadata.output_width})"
        )
    input_shape = tuple(model.inputs[0].shape)
    expected = input_spec(metadata.input).shape
    if len(input_shape) != 4 or any(
        got is not None and got != want for got, want in zip(input_shape[1:], expected, strict=True)
    ):
        raise ModelError(
            f"model input shape {input_shape} does not match metadata (None, {expected[0]}, "
            f"{expected[1]}, {expected[2]})"
        )


def load_keras_model(path: Path) -> keras.Model:
    """Load a `.keras` or legacy `.h5` file for inference, with one clear error if it can't be."""
    import keras

    check_model_file(path)
    try:
        # safe_mode explicitly, though it is the default: never load bytecode from a file.
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except (ValueError, OSError, TypeError, KeyError, AttributeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"{path}: cannot load Keras model ({reason[:300]})") from None
    if not isinstance(model, keras.Model):
        raise ModelError(f"{path}: does not hold a Keras model")
    return model


def load_artifact(
    reference: str | Path | None,
    models_dir: Path,
    name: str,
    *,
    expected: ArtifactHashes | None = None,
) -> Artifact:
    """Load an artifact for serving; verify its hashes, layers, output width and input shape.

    The model file must match the hash in its metadata; with `expected` (the registry's hashes),
    both files must match those too, so a changed `metadata.json` is refused as well.
    """
    directory = resolve_artifact_dir(reference, models_dir, name)
    metadata = read_metadata(directory, expected)
    if metadata.preprocess_version > PREPROCESS_VERSION:
        raise ModelError(
            f"{directory}: made with preprocessing v{metadata.preprocess_version}, newer than this "
            f"emolabel (v{PREPROCESS_VERSION}); upgrade emolabel"
        )
    model_file = directory / MODEL_FILE
    if not model_file.is_file():
        raise ModelError(f"{model_file}: no such model file")
    actual = file_sha256(model_file)
    check_hash(model_file, actual, metadata.model_sha256, METADATA_FILE)
    if expected is not None:
        check_hash(model_file, actual, expected.model_sha256, REGISTRY)
    model = load_keras_model(model_file)
    check_output_width(model, metadata)
    return Artifact(directory, metadata, model)
