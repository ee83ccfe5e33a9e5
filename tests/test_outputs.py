"""The run's output when its reader is gone (a closed terminal, `| tee` ended by the same Ctrl-C).
Whole runs stopped that way: tests/test_stopping.py."""
import io
import os
import sys

from outputs import OutputWithoutReader, outputs_without_reader, put_back_outputs


def test_output_whose_reader_is_gone_goes_to_stderr_if_it_still_has_one():
    """`python train.py | tee log` and Ctrl-C: tee is gone, the terminal still shows stderr, and with it
    the resume command; with `2>&1 | tee log` stderr is gone too, and the output goes nowhere."""
    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")
    stderr = OutputWithoutReader(io.StringIO())
    stdout = OutputWithoutReader(Gone(), fallback=stderr)
    assert stdout.write("saved checkpoint_3.pt\n") == len("saved checkpoint_3.pt\n")
    print("stopped by SIGINT after step 3. Resume with:", file=stdout)
    assert stdout.gone and stderr.stream.getvalue() == ("saved checkpoint_3.pt\n"
                                                        "stopped by SIGINT after step 3. Resume with:\n")
    stdout = OutputWithoutReader(Gone(), fallback=OutputWithoutReader(Gone()))
    print("stopped", file=stdout, flush=True)
    assert stdout.gone and stdout.fallback.gone
    read, write = os.pipe()  # a real pipe, block-buffered as stdout into `| tee` is: the line it breaks on too
    os.close(read)
    stderr = OutputWithoutReader(io.StringIO())
    stdout = OutputWithoutReader(open(write, "w"), fallback=stderr)
    print("SIGINT: saving a checkpoint after step 3", file=stdout, flush=True)
    print("stopped by SIGINT after step 3", file=stdout)
    assert stderr.stream.getvalue() == "SIGINT: saving a checkpoint after step 3\nstopped by SIGINT after step 3\n"
    stdout.stream.close()  # (its descriptor: /dev/null now)

    class GoesAway(io.StringIO):  # written to, until its reader goes
        gone = False

        def write(self, text):
            if self.gone:
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)
    terminal = OutputWithoutReader(io.StringIO())
    piped = OutputWithoutReader(GoesAway(), fallback=terminal)
    piped.write("loading 50%\r")  # a line ended by a carriage return went through, as one ended by a new line
    piped.stream.gone = True
    piped.write("done\n")
    assert terminal.stream.getvalue() == "done\n"

    class Full(io.StringIO):  # a non-blocking output that cannot take more just now: not gone
        def write(self, text):
            raise BlockingIOError(11, "Resource temporarily unavailable", 0)
    stdout = OutputWithoutReader(Full(), fallback=stderr)
    print("step 4", file=stdout, flush=True)
    assert not stdout.gone and stderr.stream.getvalue().endswith("after step 3\n")


def test_the_outputs_are_given_back_as_they_were(monkeypatch):
    stdout, stderr = io.TextIOWrapper(io.BytesIO()), io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    outputs = outputs_without_reader()
    assert isinstance(sys.stdout, OutputWithoutReader) and stdout.line_buffering and not stderr.line_buffering
    put_back_outputs(outputs)
    assert (sys.stdout, sys.stderr) == (stdout, stderr) and not stdout.line_buffering


def test_a_line_whose_flush_fails_goes_to_the_fallback():
    """A partial line (no newline yet) buffered when `| tee` ends: its flush fails, and it is shown on stderr."""
    class BrokenOnFlush(io.StringIO):
        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")
    stderr = OutputWithoutReader(io.StringIO())
    stdout = OutputWithoutReader(BrokenOnFlush(), fallback=stderr)
    stdout.write("Resume with: python train.py --resume run")
    stdout.flush()
    assert stdout.gone and stderr.stream.getvalue() == "Resume with: python train.py --resume run"
