"""read_ahead.py: items made by a thread ahead of their use, in order, with the error where it was,
and the thread ended with the stream."""
import itertools
import threading
import time

import pytest

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
