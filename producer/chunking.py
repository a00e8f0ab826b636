"""Cut a stream into lists: of a fixed size (`itertools.batched` arrived only in Python 3.12), or
into chunks of work closed by a count and a byte budget, whichever comes first."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Yield lists of `size` items in order, the last one shorter; reads `items` lazily.

    When reading `items` raises, the items read before it come out as one last (short) list and
    the error is raised at the next step: a listing that fails after 2,000 files of a 2,048-file
    batch still gets those 2,000 into the ledger.
    """
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    iterator = iter(items)
    while True:
        chunk: list[T] = []
        try:
            chunk.extend(islice(iterator, size))
        except Exception:
            if chunk:
                yield chunk
            raise
        if not chunk:
            return
        yield chunk


def cut_chunks(
    items: Sequence[T], *, size: int, max_bytes: int, weight: Callable[[T], int]
) -> tuple[list[list[T]], list[T]]:
    """Close a chunk at `size` items, or before the item that would take it over `max_bytes`.

    Returns the closed chunks and the items of the chunk still open (to be topped up by the next
    batch, or sent as the last chunk). A chunk always holds at least one item, however large.
    Cutting by bytes as well as by count keeps a chunk's work near constant: 256 face crops are
    5 MB, 256 camera photos 800 MB, one process's minutes while the others wait.
    """
    if size < 1 or max_bytes < 1:
        raise ValueError(f"chunk size and bytes must be at least 1, got {size} and {max_bytes}")
    closed: list[list[T]] = []
    current: list[T] = []
    current_bytes = 0
    for item in items:
        item_bytes = weight(item)
        if current and current_bytes + item_bytes > max_bytes:
            closed.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += item_bytes
        if len(current) == size:
            closed.append(current)
            current, current_bytes = [], 0
    return closed, current
