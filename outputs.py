"""The run's output when it has no reader left: sys.stdout and sys.stderr wrapped so that a print
that finds its pipe or terminal gone (`python train.py | tee log` and Ctrl-C, a closed ssh
connection) does not stop the run before it saves its checkpoint (stopping.py).
"""
import os
import sys


class OutputWithoutReader:
    """sys.stdout or sys.stderr that outlives its reader. With `python train.py | tee log`, a Ctrl-C
    ends tee too, and the next print would raise BrokenPipeError instead of saving the checkpoint; a
    closed terminal (SIGHUP) fails writes with EIO. The first failed write points the stream's file
    descriptor at /dev/null, and the run goes on: its output goes to `fallback` (stdout's: stderr,
    still the terminal after `| tee log`, so the resume command is seen) or nowhere (metrics.jsonl
    keeps the record). The stream is made line-buffered, so that the line whose write failed is
    known (`pending`: the text since the last complete line) and goes to `fallback` too."""

    def __init__(self, stream, fallback=None):
        self.stream, self.fallback, self.gone, self.pending = stream, fallback, False, ""
        # what restore() gives back (None: not a stream whose buffering can change, as a StringIO)
        self.line_buffering = getattr(stream, "line_buffering", None) if hasattr(stream, "reconfigure") else None
        if fallback and self.line_buffering is False:
            self.reconfigure(line_buffering=True)

    def restore(self):
        if self.line_buffering is False:
            self.reconfigure(line_buffering=False)

    def reconfigure(self, **settings):
        if not self.gone:
            try:  # (it flushes what is buffered)
                self.stream.reconfigure(**settings)
            except OSError:
                self.drop()

    def write(self, text: str) -> int:
        if not self.gone:
            self.pending += text
            try:
                written = self.stream.write(text)
                if "\n" in text or "\r" in text:  # line-buffered: all of it is written through
                    self.pending = ""
                return written
            except BlockingIOError:  # a non-blocking output, full for now: not gone
                return len(text)
            except OSError:
                self.drop()
                text, self.pending = self.pending, ""
        return self.fallback.write(text) if self.fallback else len(text)

    def flush(self):
        if not self.gone:
            try:
                self.stream.flush()
                self.pending = ""
            except BlockingIOError:
                pass
            except OSError:
                self.drop()
                if self.fallback:
                    self.fallback.write(self.pending)
                self.pending = ""
        if self.gone and self.fallback:
            self.fallback.flush()

    def drop(self):
        self.gone = True
        try:  # what is still buffered, and the interpreter's flush at exit, then go nowhere without an error
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # (a stream without a descriptor: a test's capture)
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def outputs_without_reader() -> tuple:
    """Wraps sys.stdout and sys.stderr (OutputWithoutReader); returns what put_back_outputs needs."""
    streams = sys.stdout, sys.stderr
    sys.stderr = OutputWithoutReader(sys.stderr)
    sys.stdout = OutputWithoutReader(sys.stdout, fallback=sys.stderr)
    return streams, (sys.stdout, sys.stderr)


def put_back_outputs(wrapped: tuple):
    """sys.stdout and sys.stderr as they were before outputs_without_reader, stdout's buffering too."""
    streams, wrappers = wrapped
    for wrapper in wrappers:
        wrapper.restore()
    sys.stdout, sys.stderr = streams


def flush_outputs():
    """Before os._exit: what is printed reaches the terminal (or nowhere, if it has no reader left)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # no reader left, or closed
            pass
