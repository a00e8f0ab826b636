"""Test-only: the first process to open a file named in `STOP_ONCE_ON_OPEN` stops itself
(SIGSTOP) at that open; any later open of it, by any process, goes on.

Put on a producer's or worker's `PYTHONPATH` by `test_faults_scale.py` (never by production
code): Python imports `sitecustomize` at start-up and the audit hook it installs is inherited by
forked pool processes. `STOP_ONCE_ON_OPEN` holds file names (no folders, `os.pathsep`-separated)
and is matched on the last component of the opened path, so a producer opening a name relative
to its folder's descriptor and a worker opening the full path are both caught. Each name stops
one process only: the first to create `STOP_ONCE_MARKERS/stopped-<name>` (O_EXCL, so across
processes). The test decides what happens to a stopped process: SIGKILL (a crash while holding
a chunk) or SIGCONT (a producer held between two batches while the test acts).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

_NAMES = frozenset(
    os.fsencode(name) for name in os.environ.get("STOP_ONCE_ON_OPEN", "").split(os.pathsep) if name
)
_MARKERS = os.fsencode(os.environ.get("STOP_ONCE_MARKERS", ""))
_inside = threading.local()


def _stop_once_on_open(event: str, arguments: tuple[Any, ...]) -> None:
    if event != "open" or not arguments or getattr(_inside, "hook", False):
        return
    path = arguments[0]
    if not isinstance(path, (str, bytes)):
        return
    name = os.path.basename(os.fsencode(path))  # noqa: PTH119 (bytes paths)
    if name not in _NAMES:
        return
    _inside.hook = True  # the marker's own open raises this event again
    try:
        marker = os.open(
            os.path.join(_MARKERS, b"stopped-" + name),  # noqa: PTH118 (bytes paths)
            os.O_CREAT | os.O_EXCL | os.O_WRONLY,
        )
    except FileExistsError:
        return
    finally:
        _inside.hook = False
    os.close(marker)
    os.kill(os.getpid(), signal.SIGSTOP)


if _NAMES and _MARKERS:
    sys.addaudithook(_stop_once_on_open)
