"""Serve a float32 artifact in bfloat16: a copy of the model whose layers compute in bfloat16.

bfloat16 keeps float32's exponent range with an 8-bit mantissa, so a CNN trained in float32 runs
in it without rescaling or calibration. Where the hardware has bfloat16 units (AMX or AVX512-BF16
on Intel CPUs since Cooper Lake, tensor cores on GPUs), convolutions and matrix products take half
the time or less. The copy uses Keras' `mixed_bfloat16` policy, so its variables stay the
artifact's float32 weights and each layer casts them as it computes; the last layer stays float32,
so confidences come out of a float32 sigmoid or softmax.

Why a copy and not TensorFlow's global auto-mixed-precision switch: the copy is local to the
runner (the rest of the process, training included, stays float32) and works on every Keras
backend, JAX included.
"""

from __future__ import annotations

import logging
from typing import Any, get_args

from core.settings import Precision

logger = logging.getLogger(__name__)

PRECISIONS: tuple[Precision, ...] = get_args(Precision)


def bfloat16_copy(model: Any) -> Any | None:
    """The model with every layer but the input and the last computing in bfloat16.

    None when the model cannot be rebuilt layer by layer (a subclassed model, a custom layer
    whose config does not round-trip): the caller then serves the float32 model.
    """
    import keras

    last = model.layers[-1].name if model.layers else None

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if layer.name != last and not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = "mixed_bfloat16"
        return layer.__class__.from_config(config)

    try:
        copy = keras.models.clone_model(model, clone_function=clone)
        copy.set_weights(model.get_weights())
    except (ValueError, TypeError, NotImplementedError) as error:
        logger.warning("model %s cannot run in bfloat16 (%s): serving float32", model.name, error)
        return None
    return copy
