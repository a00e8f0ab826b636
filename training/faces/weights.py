"""MTCNN's trained weights, read from the `mtcnn` wheel's files without running its code.

The `mtcnn` 1.0 wheel (MIT) ships `mtcnn/assets/weights/{pnet,rnet,onet}.lz4`: each an LZ4 frame
holding a joblib pickle of a list of float32 arrays (its TensorFlow models' `get_weights()`, in
layer order). Importing `mtcnn` would import TensorFlow, so the package is only located, never
imported; and a pickle can run code, so the stream is read by an unpickler that accepts nothing
but joblib's array records, numpy's ndarray and dtype, and lists: anything else is refused.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray

from core.errors import ModelError

NETWORKS = ("pnet", "rnet", "onet")
_INSTALL_HINT = "install emolabel's dependencies (the `mtcnn>=1.0,<2` package ships the weights)"


def weights_directory() -> Path:
    """Where the installed `mtcnn` package keeps its weight files (the package is not imported)."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the face detector's weights are not installed: {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "weights"


def read_weights(network: str) -> list[NDArray[np.float32]]:
    """The arrays of one network ("pnet", "rnet" or "onet"), in the order its layers use them."""
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}: one of {', '.join(NETWORKS)}")
    import lz4.frame  # a dependency of `mtcnn`, needed only here

    path = weights_directory() / f"{network}.lz4"
    try:
        data = lz4.frame.decompress(path.read_bytes())
    except (OSError, RuntimeError) as error:
        raise ModelError(f"cannot read the face detector's weights {path}: {error}") from None
    try:
        arrays = _ArrayListUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ModelError(f"{path} is not a list of weight arrays: {error}") from None
    if not isinstance(arrays, list) or not all(isinstance(a, np.ndarray) for a in arrays):
        raise ModelError(f"{path} is not a list of weight arrays")
    return [np.asarray(array, dtype=np.float32) for array in arrays]


class _ArrayRecord:
    """Stands in for joblib's `NumpyArrayWrapper`: the header of an array whose bytes follow."""

    shape: tuple[int, ...]
    order: str
    dtype: np.dtype[Any]
    numpy_array_alignment_bytes: int | None = None


class _ArrayListUnpickler(pickle._Unpickler):
    """A pure-Python unpickler that builds only arrays, reading joblib's raw array bytes.

    joblib writes each array as a `NumpyArrayWrapper` object followed, outside the pickle opcodes,
    by a padding-length byte, that much padding, and the array's bytes; its own unpickler reads
    them right after the wrapper's BUILD opcode, which is what `_build` does here.
    """

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("joblib.numpy_pickle", "NumpyArrayWrapper"): _ArrayRecord,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._raw = file

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in a weights file") from None

    def _build(self) -> None:
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]
        stack: list[Any] = self.stack  # type: ignore[attr-defined]
        if isinstance(stack[-1], _ArrayRecord):
            stack[-1] = self._read_array(stack[-1])

    def _read_array(self, record: _ArrayRecord) -> NDArray[Any]:
        dtype = np.dtype(record.dtype)
        if dtype.hasobject:
            raise pickle.UnpicklingError("refusing an array of Python objects in a weights file")
        if record.numpy_array_alignment_bytes is not None:
            padding = self._raw.read(1)
            self._raw.read(int.from_bytes(padding, "little"))
        shape = tuple(int(side) for side in record.shape)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        data = self._raw.read(size)
        if len(data) != size:
            raise EOFError("a weights file ends inside an array")
        order: Literal["C", "F"] = "F" if record.order == "F" else "C"
        array: NDArray[Any] = np.frombuffer(data, dtype=dtype).reshape(shape, order=order)
        return array.copy()

    dispatch: ClassVar[dict[int, Any]] = {
        **pickle._Unpickler.dispatch,
        pickle.BUILD[0]: _build,
    }
