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
from collections.abc import Iterator
from types import ModuleType


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


def load_keras() -> ModuleType:
    """Import Keras (and its backend) once, quietly; later imports are free."""
    with native_stderr_silenced():
        return importlib.import_module("keras")
