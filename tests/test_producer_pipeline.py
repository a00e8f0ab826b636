"""`producer.pipeline.Writer`: batches written in order, in a thread or not; the first error is
raised in the caller's thread and nothing after it is written."""

from __future__ import annotations

import threading

import pytest

from producer.pipeline import Writer


@pytest.mark.parametrize("threaded", [True, False])
def test_batches_are_written_in_order_and_close_waits_for_all(threaded: bool) -> None:
    written: list[int] = []
    threads: set[str] = set()

    def work(batch: int) -> None:
        threads.add(threading.current_thread().name)
        written.append(batch)

    writer: Writer[int] = Writer(work, threaded=threaded)
    for batch in range(50):
        writer.put(batch)
    writer.close()
    assert written == list(range(50))
    assert threads == ({"scan-writer"} if threaded else {threading.current_thread().name})


def test_the_first_error_is_raised_to_the_caller_and_nothing_after_it_is_written() -> None:
    written: list[int] = []
    failed = threading.Event()

    def work(batch: int) -> None:
        if batch == 3:
            failed.set()
            raise RuntimeError("database gone")
        written.append(batch)

    writer: Writer[int] = Writer(work)
    with pytest.raises(RuntimeError, match="database gone"):
        for batch in range(100):
            writer.put(batch)
            if batch == 3:
                failed.wait(5)
    assert writer.error is not None
    writer.stop()  # raises nothing: the caller is already handling the error
    assert written == [0, 1, 2]


def test_close_raises_an_error_of_the_last_batch() -> None:
    def work(batch: int) -> None:
        raise ValueError(f"bad batch {batch}")

    writer: Writer[int] = Writer(work)
    writer.put(7)
    with pytest.raises(ValueError, match="bad batch 7"):
        writer.close()


def test_stop_after_an_error_of_the_reader_writes_what_was_put() -> None:
    written: list[int] = []
    release = threading.Event()

    def work(batch: int) -> None:
        release.wait(5)
        written.append(batch)

    writer: Writer[int] = Writer(work)
    writer.put(1)
    writer.put(2)
    release.set()
    writer.stop()
    writer.stop()  # twice is harmless
    assert written == [1, 2]


def test_without_a_thread_an_error_is_raised_by_put_itself() -> None:
    def work(batch: int) -> None:
        raise KeyError(batch)

    writer: Writer[int] = Writer(work, threaded=False)
    with pytest.raises(KeyError):
        writer.put(1)
    writer.close()
