"""Celery workers: `celery -A worker worker` or `emolabel worker`.

`worker.app` is built on first access (module `__getattr__`), from the environment, so importing
`worker.predict` in a test or the producer has no side effect and loads no TensorFlow.
"""

from __future__ import annotations

from typing import Any

_app: Any = None


def __getattr__(name: str) -> Any:
    global _app
    if name in {"app", "celery"}:
        if _app is None:
            from core.settings import load_settings
            from worker.celery_app import make_celery

            _app = make_celery(load_settings())
        return _app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
