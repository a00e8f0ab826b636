"""The review page's facets cache, on a clock the test turns: a job's facets are read once per
`seconds`, per job and model version filter, and never kept when `seconds` is 0."""

from __future__ import annotations

import functools

from db.repository import ReviewFacets
from emolabel.review.facets import FacetsCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def facets(total: int) -> ReviewFacets:
    return ReviewFacets({("v1", "happy"): 0.8}, {("v1", "happy"): total}, {}, ["happy"], ["v1"])


def test_facets_are_read_once_per_period_and_per_job_and_version() -> None:
    clock = Clock()
    cache = FacetsCache(30, clock)
    reads: list[tuple[int, str | None]] = []

    def read(key: tuple[int, str | None], total: int) -> ReviewFacets:
        reads.append(key)
        return facets(total)

    assert cache.get((1, None), lambda: read((1, None), 10)).counts[("v1", "happy")] == 10
    clock.now += 29
    # Within the period the kept facets are served, even if the job has grown since.
    assert cache.get((1, None), lambda: read((1, None), 11)).counts[("v1", "happy")] == 10
    assert cache.get((1, "v1"), lambda: read((1, "v1"), 5)).counts[("v1", "happy")] == 5
    assert cache.get((2, None), lambda: read((2, None), 7)).counts[("v1", "happy")] == 7
    clock.now += 1
    assert cache.get((1, None), lambda: read((1, None), 12)).counts[("v1", "happy")] == 12
    assert reads == [(1, None), (1, "v1"), (2, None), (1, None)]
    # What went stale is forgotten when something is read again.
    clock.now += 31
    cache.get((3, None), lambda: read((3, None), 1))
    assert cache.keys() == {(3, None)}


def test_zero_seconds_reads_every_time() -> None:
    cache = FacetsCache(0, Clock())
    reads: list[int] = []

    def read(total: int) -> ReviewFacets:
        reads.append(total)
        return facets(total)

    for total in (1, 2, 3):
        got = cache.get((1, None), functools.partial(read, total))
        assert got.counts[("v1", "happy")] == total
    assert reads == [1, 2, 3] and cache.keys() == set()
