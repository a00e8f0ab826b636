"""A third-party Keras model, built without our code, is wrapped and served like ours."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
from keras import layers

from core.errors import ModelError
from tests.support.cli import run_cli
from training.artifacts import load_artifact
from training.importing import import_model, parse_scale

SEVEN = "angry,disgust,fear,happy,neutral,sad,surprise"


def third_party_grayscale_model(path: Path) -> Path:
    """Like a FER-2013 model: 64x64 grey input, no Rescaling layer, 7-way softmax, legacy .h5."""
    inputs = keras.Input((64, 64, 1))
    x = layers.Conv2D(8, 3, activation="relu")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(7, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.save(path)
    return path


def rgb_photo(path: Path) -> Path:
    rng = np.random.default_rng(1)
    photo = cv2.resize(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), (640, 480))
    cv2.imwrite(str(path), photo)
    return path


def test_import_and_predict_on_rgb_photo(tmp_path: Path) -> None:
    source = third_party_grayscale_model(tmp_path / "fer.h5")
    photo = rgb_photo(tmp_path / "photo.jpg")
    env = {"EMOLABEL_MODELS_DIR": str(tmp_path / "models"), "EMOLABEL_MODEL_NAME": "fer"}
    imported = run_cli(
        ["import-model", str(source), "--classes", SEVEN, "--color", "grayscale"], env=env
    )
    assert imported.returncode == 0, imported.stderr
    artifact = load_artifact(None, tmp_path / "models", "fer")
    assert artifact.metadata.source == "imported"
    assert artifact.metadata.input.color_mode == "grayscale"
    assert artifact.metadata.input.pixel_scale == pytest.approx(1 / 255)
    assert artifact.spec.shape == (64, 64, 1)
    predicted = run_cli(["predict", "--json", str(photo)], env=env)
    assert predicted.returncode == 0, predicted.stderr
    row = json.loads(predicted.stdout.strip().splitlines()[-1])
    assert row["label"] in SEVEN.split(",")
    assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert set(row["scores"]) == set(SEVEN.split(","))


def test_class_count_must_match_outputs(tmp_path: Path) -> None:
    source = third_party_grayscale_model(tmp_path / "fer.h5")
    with pytest.raises(ModelError, match="7 output"):
        import_model(source, ["a", "b", "c"], tmp_path, "x")
    with pytest.raises(ModelError, match="channel"):
        import_model(source, SEVEN.split(","), tmp_path, "x", color_mode="rgb")
    assert not any((tmp_path / "x").glob("*"))


def test_keras_format_with_rescaling_keeps_raw_pixels(tmp_path: Path) -> None:
    inputs = keras.Input((32, 32, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = layers.Flatten()(x)
    outputs = layers.Dense(1, activation="sigmoid")(x)
    path = tmp_path / "binary.keras"
    keras.Model(inputs, outputs).save(path)
    directory = import_model(path, ["cat", "dog"], tmp_path, "pets")
    artifact = load_artifact(directory, tmp_path, "pets")
    assert artifact.metadata.head == "sigmoid"
    assert artifact.metadata.input.pixel_scale == 1.0


@pytest.mark.parametrize(("text", "value"), [("1/255", 1 / 255), ("none", 1.0), ("0.5", 0.5)])
def test_parse_scale(text: str, value: float) -> None:
    assert parse_scale(text) == pytest.approx(value)


def test_parse_scale_refuses_nonsense() -> None:
    with pytest.raises(ModelError):
        parse_scale("1/0")
    with pytest.raises(ModelError):
        parse_scale("-2")
