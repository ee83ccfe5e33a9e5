"""Stopping a run when asked: SIGINT, SIGTERM (what schedulers send before they kill) or SIGHUP (the
terminal or ssh connection closed) to any process finishes what runs, saves a checkpoint and prints
the command that resumes the run. GracefulStop hears the signal; under torchrun StepVote tells every
rank at the same step (outputs.py keeps the run going when its output has no reader left); the
DataLoader workers leave the signals to the main process, which stops them; exit_with ends the
process with the run's status, which a late signal no longer changes.
"""
import atexit
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager

import torch
import torch.distributed as dist

from distributed import Ranks, first_process, joined, peers_lost
from files import tell_torchrun
from outputs import flush_outputs


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STEPPING = "the step"  # GracefulStop.doing while the run trains
SAVING = "the checkpoint"  # GracefulStop.doing while a checkpoint is written: a second signal waits for it
EVALUATING = "the evaluation"  # GracefulStop.doing while the model is evaluated
CLOSING = "closing the logs"  # GracefulStop.doing at the end, the last checkpoint saved (closing may upload to W&B)
# a signal this soon after the first is the same one again: a wrapper (timeout, a job script) forwards the Ctrl-C
# that the terminal sent to its whole group, the run too
REPEAT_WITHIN_S = 1.0


def handle_signals(handler):
    """`handler` for SIGNALS, except those ignored: nohup's SIGHUP, the SIGINT of a job a script
    started in the background. They stay ignored, as Python leaves them."""
    for sig in SIGNALS:
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, handler)


class StoppedWhileClosing(KeyboardInterrupt):
    """A second Ctrl-C while the logs close, the last checkpoint saved: its args[0] is the line
    that would have ended the run (done, or how to resume)."""


class GracefulStop:
    """SIGINT/SIGTERM/SIGHUP: finish what runs (`doing`: the step, the evaluation, the checkpoint),
    save a checkpoint, exit 0. In a single process a second Ctrl-C stops at once, except while a
    checkpoint is written (that would lose it), and says how to resume once one is saved (closing());
    one within REPEAT_WITHIN_S of the first is that one again, forwarded by a wrapper (`timeout`);
    under torchrun the agent forwards the signal it got itself, so repeats are expected and ignored
    (the agent kills the ranks 30 s later anyway). The handler says at once that it heard, with
    os.write: print() could re-enter a print the loop is in. An ignored signal stays ignored
    (handle_signals)."""

    def __init__(self, second_signal_stops: bool, announce: bool, at_once: bool = False):
        """at_once: a signal stops at once (KeyboardInterrupt) until the caller sets .at_once False. train.py
        keeps it until the process's first step is done: that step is all a save would keep, and its
        compilation (a minute) would outlast torchrun's 30 s before it kills."""
        self.signal_name, self.doing, self.last_words = None, STEPPING, ""
        self.heard_at = -math.inf  # time.monotonic() of the first signal (of the second, once it stopped at once)
        self.stopped_at_once = False  # a second signal has raised KeyboardInterrupt
        self.at_once = at_once
        self.second_signal_stops, self.announce = second_signal_stops, announce
        handle_signals(self._handler)

    @property
    def heard(self) -> bool:
        """Whether a signal has come."""
        return self.signal_name is not None

    def closing(self, last_words: str):
        """The last checkpoint is saved: what is left (the last log line, closing the logs) may be cut
        short by a second Ctrl-C, which then still says last_words (main catches StoppedWhileClosing)."""
        self.doing, self.last_words = CLOSING, last_words

    def _handler(self, signum, _frame):
        if self.at_once:  # (heard: for the caller, where the KeyboardInterrupt is swallowed, as in a weakref callback)
            self.signal_name = self.signal_name or signal.Signals(signum).name
            interrupt_at_once(signum, _frame)
            return  # (heard before: the stop is under way)
        if time.monotonic() - self.heard_at < REPEAT_WITHIN_S:
            return
        saving, closing = self.doing == SAVING, self.doing == CLOSING
        if self.signal_name is None:
            self.signal_name, self.heard_at = signal.Signals(signum).name, time.monotonic()
            if self.announce:
                again = "" if not self.second_signal_stops or saving else (
                    " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else " (a second one stops at once)")
                doing = ("the checkpoint is saved; closing the logs, then stopping" if closing else
                         f"finishing {self.doing}, then {'stopping' if saving else 'saving a checkpoint'}")
                say(f"\n{self.signal_name}: {doing}{again}\n")
        elif saving:  # stopping now would lose the checkpoint the first signal asked for, and the records after it
            if self.announce and self.second_signal_stops:
                say("\nstill saving the checkpoint; the run stops right after it (kill -9 stops at once)\n")
        elif self.second_signal_stops:
            if self.stopped_at_once:  # torch may swallow its KeyboardInterrupt (in a finalizer, say): a third kills
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self.stopped_at_once, self.heard_at = True, time.monotonic()  # (its forwarded copy: ignored)
            raise StoppedWhileClosing(self.last_words) if closing else KeyboardInterrupt(signal.Signals(signum).name)


def say(text: str):
    """To stderr from a signal handler; nothing if it has no reader left (| tee ended by the same Ctrl-C)."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class StepVote:
    """Whether a flag is set on any rank, asked at every step without waiting for the GPU: ask()
    starts the all-reduce of this step's flag and returns the answer for the previous step's. Every
    rank gets the same answer at the same step, one step late. The votes are CPU tensors, reduced
    over gloo (ranks.cpu_group beside NCCL): a GPU tensor would be read behind the step's queued
    kernels. Every rank must ask at every step, and settle() at the end."""

    def __init__(self, ranks: Ranks):
        self.enabled, self.group, self.pending = ranks.enabled, ranks.cpu_group, None

    def ask(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        previous = self.settle()
        votes = torch.tensor([float(flag)])
        self.pending = votes, dist.all_reduce(votes, group=self.group, async_op=True)
        return previous

    def settle(self) -> bool:
        """The answer of the vote in flight, if any (False if none)."""
        if self.pending is None:
            return False
        votes, work = self.pending
        self.pending = None
        work.wait()
        return bool(votes.item())


# the command that resumes from this process's newest checkpoint (saved or resumed from): what a run
# that ends abruptly says, after train() is gone (a second Ctrl-C, a lost peer)
resume_command = []


heard_at_once = []  # the signal interrupt_at_once raised for, if any, and when (train.main clears it)


def interrupt_at_once(signum, _frame):
    """A signal handler: KeyboardInterrupt, which names the signal (signal_of). Once it has raised
    one, the run is stopping: a signal within REPEAT_WITHIN_S is ignored (the same one forwarded by a
    wrapper, which would end the stop in a traceback); a later one raises again (the first one's
    stop was swallowed, say: raise_if_heard raises it again where the run looks)."""
    if not heard_at_once or time.monotonic() - heard_at_once[0][1] >= REPEAT_WITHIN_S:
        first = heard_at_once[0][0] if heard_at_once else signal.Signals(signum).name
        heard_at_once[:] = [(first, time.monotonic())]  # (the window starts again: this one's copy comes too)
        raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def swallowed_stops_unsaid():
    """Within it, a KeyboardInterrupt of interrupt_at_once that Python swallowed (raised in an at-fork hook
    or a weakref callback) is not printed as "Exception ignored in ..." with a traceback: the run
    stops in one line where raise_if_heard raises it again. Anything else goes to the hook before."""
    before = sys.unraisablehook

    def hook(unraisable):
        if not (heard_at_once and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            before(unraisable)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = before


def raise_if_heard():
    """KeyboardInterrupt if interrupt_at_once has raised one: where it was swallowed, raised in an at-fork
    hook or a weakref callback (torch.compile's), which Python prints and goes on from."""
    if heard_at_once:
        raise KeyboardInterrupt(heard_at_once[0][0])


def signal_of(interrupt: KeyboardInterrupt) -> str | None:
    """The signal a KeyboardInterrupt was raised for (interrupt_at_once, GracefulStop), or None (Python's own,
    for a SIGINT)."""
    name = interrupt.args[0] if interrupt.args else None
    return name if name in signal.Signals.__members__ else None


def report_stopped_at_once(resuming_a_run: bool = False, signal_name: str | None = None) -> int:
    """`resuming_a_run`: the run resumes a checkpoint (the signal may come before it is read)."""
    if first_process():  # (under torchrun every rank heard the signal: once)
        # (interrupt_at_once raised it: no step of this process was done, a resumed run's first one at most)
        lost = ("before the first step after resuming was done" if heard_at_once else
                "what it trained since the last checkpoint is not saved")
        print(f"\n{signal_name or 'interrupted'}: stopped at once: " + (
            f"{lost}; resume with:\n  {resume_command[0]}" if resume_command
            else "before training resumed: nothing new was saved" if resuming_a_run else
            "before the first checkpoint: nothing was saved"), file=sys.stderr)
    # (torchrun's summary of each rank that ended so; dated as a consequence: where torchrun stopped the ranks after
    # another one failed, that failure is the root cause it names)
    tell_torchrun(f"{signal_name or 'interrupted'}: stopped at once", consequence=True)
    return 130


def tearing_down(second_signal_stops: bool):
    """A run that has ended tears down (its loader workers, the process group): a signal then (a
    Ctrl-C just after `done:`) does not change its status; in a single process a second one
    (something hangs; not the first one forwarded again: REPEAT_WITHIN_S) ends it at once. (Under
    torchrun the agent forwards its signals, repeats included, and kills a rank that hangs.)"""
    heard_at = []  # time.monotonic() of the first signal

    def handler(_signum, _frame):
        if heard_at and second_signal_stops and time.monotonic() - heard_at[0] >= REPEAT_WITHIN_S:
            os._exit(130)
        heard_at[:] = heard_at or [time.monotonic()]
    handle_signals(handler)


def leave_signals_to_main(_worker_id):
    """A DataLoader worker's start: Ctrl-C, SIGTERM and a closed terminal's SIGHUP reach the whole
    process group; the main process decides how to stop (finish the step, checkpoint) and then shuts
    the workers down itself (stop_loader_workers). What came while the worker started (held, by
    signals_held) is dropped here."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextmanager
def signals_held():
    """SIGINT, SIGTERM and SIGHUP wait while the DataLoader workers start (fork): the main process
    hears one that came meanwhile as the block ends. In the middle of a fork its KeyboardInterrupt
    would be raised inside an at-fork hook, where Python prints it and goes on (the run would go on
    training), and a worker would get it before it ignores the signals (a traceback). The workers
    inherit the held signals and drop them (leave_signals_to_main). Where threads cannot hold signals
    (Windows), nothing is held; nor are those another thread takes: where interrupt_at_once heard one, it is
    raised again as the block ends (raise_if_heard)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    raise_if_heard()  # (one another thread took, its KeyboardInterrupt swallowed in an at-fork hook)


def stop_loader_workers(started_before=()):
    """Kill the DataLoader workers still running: the multiprocessing children not in
    `started_before` (a caller's own, when train.main runs inside another program). After an error
    the loader can outlive train(): the exception's traceback holds it in a reference cycle that is
    collected only after multiprocessing's exit handler, which sends the workers SIGTERM, which they
    ignore (above), and then waits for them forever. Their state is not needed: the checkpoint has
    the data position. The DataLoader's SIGCHLD handler would report each killed worker as an error,
    then or at any later SIGCHLD: it goes for good."""
    children = [child for child in multiprocessing.active_children() if child not in started_before]
    if children and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
        child.join(timeout=10)


def exit_with(main):
    """Run the script's `main` and end the process with its status (an exception it lets through:
    the traceback and 1, as Python's own exit gives; Ctrl-C: 130). A process that joined a process
    group exits at once (os._exit, its output flushed) rather than through the interpreter's own
    exit: gloo's worker threads outlive destroy_process_group (a DistributedDataParallel model keeps
    the group), and one still releasing a finished collective's tensors while the interpreter
    finalizes takes the GIL and aborts the process (SIGABRT, exit -6, after a run that went well).
    sys.exit and the exit functions (atexit) run first, as at a normal exit: W&B hooks the one to
    learn the status and closes its run in the other. After a failed collective the exit functions
    are left out: they could wait on the lost peer. A single process ends through sys.exit, which a
    host (a profiler, IPython's %run) catches; the last of its exit functions then ignores the
    signals (ignore_signals_at_exit)."""
    try:
        status = main()
    except KeyboardInterrupt:  # a second Ctrl-C while the run closes
        if not joined():
            raise
        status = 130
    except Exception as e:
        sys.excepthook(*sys.exc_info())
        tell_torchrun("".join(traceback.format_exception_only(e)).strip().splitlines()[-1])
        status = 1
    end_at_once_on_a_signal(status)
    if joined():
        try:
            sys.exit(status)
        except SystemExit:
            pass
        if not peers_lost():
            atexit._run_exitfuncs()
        flush_outputs()
        os._exit(status)
    sys.exit(status)


def end_at_once_on_a_signal(status: int):
    """The script's status is decided: a signal while the process exits (W&B closing its run in an
    exit function) ends it at once with that status, not 130 or 143 for a run that finished."""
    status_decided.append(status)

    def end(_signum, _frame):
        flush_outputs()
        os._exit(status)
    handle_signals(end)


status_decided = []  # end_at_once_on_a_signal's status


@atexit.register  # at stopping's import: run after the exit functions registered later (W&B's)
def ignore_signals_at_exit():
    """One of the last exit functions of a process whose status is decided: Python then sets the
    signals back to their defaults and finalizes (a second or more with torch loaded), where a signal
    would end a finished run with 130 or 143. An ignored signal stays ignored. Not while child
    processes live: multiprocessing's exit function, which runs after this one, waits for them, and a
    Ctrl-C must still end that wait."""
    if status_decided and not multiprocessing.active_children():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


@contextmanager
def ended_like_ctrl_c():
    """For the benchmarks: within it, SIGTERM and SIGHUP (a scheduler, a closed terminal) end the
    program as Ctrl-C does, through the `with` blocks inside it (their temporary folder of runs is
    removed, the three signals ignored meanwhile), and any of the three in one line with status
    128 + the signal, not a traceback. Handlers of the host's own are kept; all are put back after."""
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    heard_at_once.clear()

    def stop(signum, _frame):
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        heard_at_once[:] = [(signal.Signals(signum).name, time.monotonic())]  # (signals_held: where swallowed)
        raise KeyboardInterrupt(heard_at_once[0][0])
    for sig, handler in before.items():
        if handler in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, stop)
    try:
        yield
    except KeyboardInterrupt as e:
        name = signal_of(e) or "SIGINT"
        print(f"\n{name}: stopped", file=sys.stderr)
        raise SystemExit(128 + signal.Signals[name]) from None
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
