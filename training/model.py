"""The seeds' CNN: three Conv2D + MaxPooling blocks, Dense 256, and a sigmoid or softmax head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.metadata import Head

if TYPE_CHECKING:
    import keras


def head_for(num_classes: int) -> Head:
    """Two classes get one sigmoid unit (as in the notebooks); more get a softmax."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    return "sigmoid" if num_classes == 2 else "softmax"


def make_model(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """Return the uncompiled CNN; it takes 0..255 pixels and rescales them to [0, 1] itself."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    # Scaling lives in the model so that every caller feeds raw pixels the same way.
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for index, filters in enumerate((16, 32, 16), start=1):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{index}")(x)
        x = layers.MaxPooling2D(name=f"pool{index}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="dense")(x)
    if head_for(num_classes) == "sigmoid":
        outputs = layers.Dense(1, activation="sigmoid", name="probability")(x)
    else:
        outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="emotion_cnn")


def compile_model(model: keras.Model, num_classes: int, learning_rate: float) -> None:
    """Adam and the cross-entropy that matches the head, with accuracy, precision and recall."""
    import keras

    if head_for(num_classes) == "sigmoid":
        loss: str = "binary_crossentropy"
        metrics: list[object] = [
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ]
    else:
        loss = "sparse_categorical_crossentropy"
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate), loss=loss, metrics=metrics
    )
