"""read_ahead.py: items made by a thread ahead of their use, in order, with the error where it was,
and the thread ended with the stream."""
import itertools
import threading
import time

import pytest

import read_ahead as reading
from read_ahead import read_ahead
from shards import DataError


def test_pools_are_made_ahead_by_a_thread_in_order_and_its_error_where_it_was_and_it_ends_with_the_stream():
    """A subword tokenizer takes seconds for a pool of 8 MB: made in turn, each one stalled training."""
    made, threads = [], threading.active_count()

    def items(stop):
        for i in itertools.count():
            made.append(i)
            if i == 6:
                raise DataError("shard gone")
            yield i
    stream = read_ahead(items, depth=2)
    assert next(stream) == 0
    deadline = time.time() + 10
    while len(made) < 4 and time.time() < deadline:  # made while 0 is used: 1 and 2 wait, 3 waits for room
        time.sleep(0.01)
    time.sleep(0.3)
    assert made == [0, 1, 2, 3] and threading.active_count() == threads + 1
    assert [next(stream) for _ in range(5)] == [1, 2, 3, 4, 5]
    with pytest.raises(DataError, match="shard gone"):  # after the items made before it
        next(stream)
    assert threading.active_count() == threads

    def slow(stop):  # an item that takes long, given up once not wanted
        for i in itertools.count():
            while i > 0 and not stop.is_set():
                time.sleep(0.01)
            yield i
    endless = read_ahead(slow)
    assert next(endless) == 0
    endless.close()  # not wanted any more: its thread has ended (not left inside a library at exit)
    assert threading.active_count() == threads


def test_a_stream_given_up_closes_its_generator_in_its_thread_and_is_forgotten():
    """The generator's clean-up (its open files) runs in the reading thread as the stream closes."""
    closed_in = []

    def items(stop):
        try:
            yield from itertools.count()
        finally:
            closed_in.append(threading.current_thread())
    before = set(reading.READING_AHEAD)
    stream = read_ahead(items)
    assert next(stream) == 0 and len(reading.READING_AHEAD) == len(before) + 1
    stream.close()
    assert len(closed_in) == 1 and closed_in[0] is not threading.current_thread()
    assert reading.READING_AHEAD == before


def test_at_exit_a_stream_nobody_closed_has_its_thread_stopped():
    """A stream left open (an error elsewhere) does not hang the process at exit: its thread ends."""
    stream = read_ahead(lambda stop: iter(range(10**9)), depth=1)
    assert next(stream) == 0
    stopper = threading.Thread(target=reading.stop_reading_ahead, daemon=True)
    stopper.start()
    stopper.join(timeout=5)
    hung = stopper.is_alive()
    left = [thread for _, thread in reading.READING_AHEAD if thread.is_alive()]  # (stop_reading_ahead's, joined)
    for stop, _ in list(reading.READING_AHEAD):  # (release it, whatever happened)
        stop.set()
    stream.close()
    assert not hung and left == []
