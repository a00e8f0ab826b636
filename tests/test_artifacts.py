"""Artifacts describe themselves and refuse to load when they disagree with their model."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import pytest

from core.errors import ModelError
from training.artifacts import file_sha256, load_artifact, resolve_artifact_dir, save_artifact
from training.metadata import InputMetadata, ModelMetadata, read_metadata
from training.model import make_model


def metadata_for(classes: list[str], size: int = 24, version: str = "v1") -> ModelMetadata:
    return ModelMetadata(
        name="m",
        version=version,
        class_names=classes,
        head="sigmoid" if len(classes) == 2 else "softmax",
        input=InputMetadata(height=size, width=size, color_mode="rgb"),
        training={"seed": 1},
        metrics={"test": {"accuracy": 0.5}},
    )


def test_round_trip(tmp_path: Path) -> None:
    model = make_model((24, 24, 3), 3)
    original = metadata_for(["a", "b", "c"])
    directory = save_artifact(model, original, tmp_path / "m" / "v1")
    loaded = load_artifact(directory, tmp_path, "m")
    assert loaded.metadata.class_names == ["a", "b", "c"]
    assert loaded.metadata.training == {"seed": 1}
    assert loaded.metadata.model_sha256 and len(loaded.metadata.model_sha256) == 64
    assert loaded.spec.shape == (24, 24, 3)
    assert read_metadata(directory).model_dump() == loaded.metadata.model_dump()


def test_latest_version_is_default(tmp_path: Path) -> None:
    model = make_model((24, 24, 3), 2)
    save_artifact(model, metadata_for(["x", "y"], version="a"), tmp_path / "m" / "20260101-a")
    save_artifact(model, metadata_for(["x", "y"], version="b"), tmp_path / "m" / "20260102-b")
    (tmp_path / "m" / ".20260103.partial").mkdir()
    assert resolve_artifact_dir(None, tmp_path, "m").name == "20260102-b"
    assert resolve_artifact_dir("20260101-a", tmp_path, "m").name == "20260101-a"


def test_metadata_disagreeing_with_output_width_is_refused(tmp_path: Path) -> None:
    model = make_model((24, 24, 3), 3)
    directory = save_artifact(model, metadata_for(["a", "b", "c"]), tmp_path / "m" / "v1")
    raw = json.loads((directory / "metadata.json").read_text())
    raw["class_names"] = ["a", "b", "c", "d"]
    (directory / "metadata.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="output shape"):
        load_artifact(directory, tmp_path, "m")


def test_save_refuses_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="output shape"):
        save_artifact(make_model((24, 24, 3), 2), metadata_for(["a", "b", "c"]), tmp_path / "x")


def test_changed_file_is_refused(tmp_path: Path) -> None:
    directory = save_artifact(
        make_model((24, 24, 3), 2), metadata_for(["a", "b"]), tmp_path / "m" / "v"
    )
    with (directory / "model.keras").open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ModelError, match="hash"):
        load_artifact(directory, tmp_path, "m")


def test_unreadable_model_file_is_refused(tmp_path: Path) -> None:
    directory = save_artifact(
        make_model((24, 24, 3), 2), metadata_for(["a", "b"]), tmp_path / "m" / "v"
    )
    (directory / "model.keras").write_bytes(b"not a zip file")
    raw = json.loads((directory / "metadata.json").read_text())
    # The hash matches, so it is the file's content that is refused (an empty hash is refused too).
    raw["model_sha256"] = file_sha256(directory / "model.keras")
    (directory / "metadata.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="cannot load"):
        load_artifact(directory, tmp_path, "m")


def test_invalid_metadata_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "m" / "v"
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text(json.dumps({"name": "m", "class_names": ["only"]}))
    with pytest.raises(ModelError, match="invalid metadata"):
        load_artifact(directory, tmp_path, "m")
    with pytest.raises(ModelError, match="no trained model"):
        load_artifact(None, tmp_path, "other")


def test_sigmoid_head_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="two classes"):
        ModelMetadata(
            name="m",
            version="v",
            class_names=["a", "b", "c"],
            head="sigmoid",
            input=InputMetadata(height=8, width=8, color_mode="rgb"),
        )


def test_a_class_name_must_fit_the_results_label_column() -> None:
    from db.models import NAME_LENGTH
    from training.metadata import MAX_CLASS_NAME

    assert MAX_CLASS_NAME == NAME_LENGTH
    for name in ("", "x" * (NAME_LENGTH + 1)):
        with pytest.raises(ValueError, match="1 to 128 characters"):
            ModelMetadata(
                name="m",
                version="v",
                class_names=["a", name],
                head="sigmoid",
                input=InputMetadata(height=8, width=8, color_mode="rgb"),
            )


def test_model_shape_follows_the_seeds() -> None:
    model = make_model((256, 256, 3), 6)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == [
        "InputLayer", "Rescaling", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D",
        "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense",
    ]  # fmt: skip
    assert [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)] == [
        16,
        32,
        16,
    ]
    assert model.output_shape == (None, 6)
    assert make_model((64, 64, 1), 2).output_shape == (None, 1)
