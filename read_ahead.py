"""Reading ahead: the items of a generator made by a thread while the ones before are used. The
training stream reads and tokenizes its next pools this way (data.py), since a subword tokenizer
takes seconds for a pool.
"""
import atexit
import queue
import threading

# pools that wait, read and tokenized, while a reader's thread reads the one after them: with 1, the
# thread works up to two pools ahead of the one served, so that a short pool (an epoch's last) does not
# stall the next
READ_AHEAD = 1

READING_AHEAD = set()  # (stop, thread) of each read_ahead running in this process


def read_ahead(make_items, depth: int = READ_AHEAD):
    """The items of make_items(stop), made by a thread ahead of their use: `depth` of them wait, and
    the thread makes the next one meanwhile. Once they are not wanted any more (the reader stopped),
    `stop` is set, and the thread is waited for: it ends after the item it is making (make_items may
    look at `stop` to end it sooner), so that it is never left inside a library as the process exits."""
    made, stop, done = queue.Queue(maxsize=depth), threading.Event(), object()
    items = make_items(stop)

    def offer(item) -> bool:  # whether it was queued (not: no longer wanted)
        while not stop.is_set():
            try:
                made.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def make():
        try:
            for item in items:
                if not offer(item):
                    return
            offer(done)
        except BaseException as e:  # (raised where the items are used)
            offer(e)
        finally:
            if hasattr(items, "close"):
                items.close()  # (a generator: its clean-up, in this thread)
    thread = threading.Thread(target=make, daemon=True)
    thread.start()
    READING_AHEAD.add((stop, thread))
    try:
        while (item := made.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        READING_AHEAD.discard((stop, thread))
        stop.set()
        thread.join()


@atexit.register
def stop_reading_ahead():
    """At exit, before the interpreter is torn down: the threads still reading ahead (a stream nobody
    closed) end after the item they are making, rather than be stopped inside a library, which aborts."""
    for stop, thread in list(READING_AHEAD):
        stop.set()
        thread.join()
