"""A job's review facets, kept a short while per app: the page's per-class thresholds, counts,
labels and versions cost two scans of the job's rows (5.4 s at 10M labels, bench/RESULTS.md),
while the page of labels after them costs 2 s. A reviewer paging through a job reuses them.

Kept for `EMOLABEL_REVIEW__FACETS_SECONDS`: meanwhile workers may add labels, so a total or a
threshold may lag by that long; verdicts never change them (they are stored apart).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from db.repository import ReviewFacets

Key = tuple[int, str | None]


class FacetsCache:
    """(job id, model version filter) -> facets, each reused for `seconds` after it was read."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._kept: dict[Key, tuple[float, ReviewFacets]] = {}
        # The app's sync handlers run in a thread pool.
        self._lock = threading.Lock()

    def get(self, key: Key, read: Callable[[], ReviewFacets]) -> ReviewFacets:
        """The facets kept for `key` if they are fresh enough, else `read()` (and keep them)."""
        now = self.clock()
        with self._lock:
            kept = self._kept.get(key)
        if kept is not None and now - kept[0] < self.seconds:
            return kept[1]
        facets = read()
        with self._lock:
            # Forget what went stale, so that the cache holds only the jobs being looked at.
            self._kept = {
                other: entry for other, entry in self._kept.items() if now - entry[0] < self.seconds
            }
            if self.seconds > 0:
                self._kept[key] = (now, facets)
        return facets

    def keys(self) -> set[Key]:
        """What is kept now."""
        with self._lock:
            return set(self._kept)
