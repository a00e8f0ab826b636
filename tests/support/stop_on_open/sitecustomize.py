"""Test-only: a process that opens the file named by `STOP_ON_OPEN` stops itself (SIGSTOP).

Put on a worker's `PYTHONPATH` by `test_faults.py` (never by production code): Python imports
`sitecustomize` at start-up, and the audit hook it installs is inherited by every forked pool
process. `os.open` raises the `open` audit event before the system call, so a pool process is
stopped, deterministically, at the moment it opens the poison image, before a byte of it is
decoded; the test then kills it with SIGKILL (a decoder crash, played without a race against
decoding speed).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

_TARGET = os.environ.get("STOP_ON_OPEN", "")


def _stop_on_open(event: str, arguments: tuple[Any, ...]) -> None:
    if event != "open" or not arguments:
        return
    path = arguments[0]
    if isinstance(path, (str, bytes)) and os.fsencode(path) == os.fsencode(_TARGET):
        os.kill(os.getpid(), signal.SIGSTOP)


if _TARGET:
    sys.addaudithook(_stop_on_open)
