"""Process set-up that must happen before Keras is imported, done once by an entry point.

TensorFlow's C++ layer prints start-up chatter (absl and oneDNN notices) straight to file
descriptor 2 before Python logging exists, ignoring `TF_CPP_MIN_LOG_LEVEL` for some lines. A
command-line error must be one clear line, so the first Keras import runs with descriptor 2 sent to
a temporary file; anything Python raises is still reported normally afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType

from core.errors import ConfigError

_import_lock = threading.Lock()


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 (C/C++ writes included) to a scratch file for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def load_keras(backend: str | None = None, threads: int | None = None) -> ModuleType:
    """Import Keras once, quietly, on `backend` (tensorflow, jax or torch); later calls are free.

    Keras reads its backend from the environment at first import and cannot switch afterwards,
    so this is the one place that writes `KERAS_BACKEND`, before that import. On TensorFlow,
    GPU memory growth is switched on so that one process per GPU does not grab all memory.
    `threads` caps the CPU threads of one op and of concurrent ops (TensorFlow's intra- and
    inter-op pools; on JAX, one thread means XLA's single-threaded CPU runtime); None leaves the
    framework's default of one per CPU. It only takes effect on the first import.
    """
    # A worker child preloads its model in a thread; "keras" sits in sys.modules half-imported
    # while that runs, so a second caller must wait for the first import to finish.
    with _import_lock:
        return _load_keras(backend, threads)


def _load_keras(backend: str | None, threads: int | None) -> ModuleType:
    if "keras" in sys.modules:
        keras = sys.modules["keras"]
        if backend is not None and keras.backend.backend() != backend:
            raise ConfigError(
                f"Keras is already running on {keras.backend.backend()}, not {backend}: "
                "set EMOLABEL_KERAS_BACKEND before the process starts"
            )
        return keras
    if backend is not None:
        os.environ["KERAS_BACKEND"] = backend
    if threads == 1 and (backend or os.environ.get("KERAS_BACKEND")) == "jax":
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    with native_stderr_silenced():
        keras = importlib.import_module("keras")
        if keras.backend.backend() == "tensorflow":
            _tensorflow_memory_growth()
            if threads is not None:
                _tensorflow_threads(threads)
    return keras


def _tensorflow_threads(threads: int) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already ran an op in this process: its pools are fixed
        return


def _tensorflow_memory_growth() -> None:
    import tensorflow as tf

    for device in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(device, True)
        except RuntimeError:  # already initialised by someone else: nothing left to set
            return


def pin_gpu(process_index: int, gpus: int) -> None:
    """Give a worker child one GPU of `gpus` (round robin), before it imports any framework."""
    if gpus > 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(process_index % gpus)
