"""Stopping on request: the signal handler, the vote that tells every rank, the resume command.
Whole runs stopped by signals, and under torchrun in tests/test_distributed.py."""
import atexit
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

import pytest
import torch

import distributed
import evaluation
import runtime
import stopping
import train
from checkpoint import load_checkpoint
from conftest import ROOT, losses, only_run, run_dirs, run_ranks, write_config
from distributed import Ranks
from files import script_here
from metrics import MetricsLog
from stopping import SAVING, SIGNALS, GracefulStop, StoppedWhileClosing, report_stopped_at_once

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
NOTHING_SAVED = "\nSIGTERM: stopped at once: before the first checkpoint: nothing was saved\n"  # (SIGTERM's)


@pytest.fixture
def second_signal_at_once(monkeypatch):
    """The tests' second signals come milliseconds after the first: a second Ctrl-C, not the first
    forwarded again (stopping.REPEAT_WITHIN_S)."""
    monkeypatch.setattr(stopping, "REPEAT_WITHIN_S", 0)


@pytest.fixture
def restore_handlers():
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_a_second_ctrl_c_stops_at_once_except_while_a_checkpoint_is_written(restore_handlers, capfd,
                                                                           second_signal_at_once):
    stop = GracefulStop(second_signal_stops=True, announce=True)
    stop.doing = SAVING
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signal_name == "SIGINT"
    os.kill(os.getpid(), signal.SIGINT)  # waits for the checkpoint
    stop.doing = "the step"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert capfd.readouterr().err == ("\nSIGINT: finishing the checkpoint, then stopping\n"
                                      "\nstill saving the checkpoint; the run stops right after it (kill -9 stops at "
                                      "once)\n")


def test_a_third_signal_ends_the_process_where_torch_swallowed_the_second_ones_stop():
    script = ("import os, signal, time, stopping\n"
              "stop = stopping.GracefulStop(second_signal_stops=True, announce=False)\n"
              "for _ in range(3):\n"
              "    stop.heard_at -= 2  # (a second apart: not a wrapper's forwarded copy)\n"
              "    try:\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "        time.sleep(0.2)\n"
              "    except KeyboardInterrupt:  # swallowed, as in a finalizer\n"
              "        print('swallowed', flush=True)\n"
              "print('still running')\n")
    ended = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=60)
    assert (ended.returncode, ended.stdout) == (-signal.SIGTERM, "swallowed\n")


def test_one_signal_forwarded_by_a_wrapper_is_one(restore_handlers, capfd, monkeypatch):
    """`timeout` (or a job script) forwards the Ctrl-C that the terminal sent its whole group too: the
    run got it twice, a moment apart, and stopped at once without saving; in its first step, or while
    it set up, the second KeyboardInterrupt came while the first one's stop unwound, in a traceback. A
    second Ctrl-C a second later stops at once."""
    stop = GracefulStop(second_signal_stops=True, announce=True)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # (each handled before os.kill returns)
    except KeyboardInterrupt:  # (left alone, it would end pytest's session)
        pytest.fail("one Ctrl-C delivered twice stopped the run at once")
    assert stop.signal_name == "SIGINT"
    monkeypatch.setattr(stopping, "REPEAT_WITHIN_S", 0.2)
    time.sleep(0.25)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == stop._handler  # its copy: not the default, which kills at once
    os.kill(os.getpid(), signal.SIGINT)
    assert capfd.readouterr().err == ("\nSIGINT: finishing the step, then saving a checkpoint (Ctrl-C again to stop "
                                      "at once)\n")
    for handler in (stopping.interrupt_at_once, GracefulStop(second_signal_stops=True, announce=True,
                                                         at_once=True)._handler):  # (until the first step is done)
        stopping.heard_at_once.clear()  # (train.main's start)
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            handler(signal.SIGTERM, None)
        try:
            handler(signal.SIGTERM, None)
        except KeyboardInterrupt:
            pytest.fail(f"{handler.__qualname__} raised for the signal forwarded again")
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):  # where the first one was swallowed
            stopping.raise_if_heard()
        time.sleep(0.25)
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):  # a second Ctrl-C, the first one's stop not done
            handler(signal.SIGINT, None)
        try:
            handler(signal.SIGINT, None)  # its copy
        except KeyboardInterrupt:
            pytest.fail(f"{handler.__qualname__} raised for the second signal forwarded again")
    forwarded_in_teardown = ("import os, signal, time, stopping; stopping.tearing_down(True); "
                             "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT); "
                             "time.sleep(0.2)")
    assert subprocess.run([sys.executable, "-c", forwarded_in_teardown], cwd=ROOT, timeout=60).returncode == 0


def test_once_the_last_checkpoint_is_saved_a_second_ctrl_c_stops_at_once_and_still_says_how_to_resume(
        restore_handlers, capfd, second_signal_at_once):
    stop = GracefulStop(second_signal_stops=True, announce=True)
    stop.closing("stopped by SIGINT after step 2. Resume with: ...")
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(StoppedWhileClosing, match=r"^stopped by SIGINT after step 2\. Resume with: \.\.\.$"):
        os.kill(os.getpid(), signal.SIGINT)
    assert capfd.readouterr().err == ("\nSIGINT: the checkpoint is saved; closing the logs, then stopping (Ctrl-C "
                                      "again to stop at once)\n")


def test_a_stop_saves_before_the_evaluation_due_and_a_second_ctrl_c_while_the_logs_close_loses_nothing(
        tmp_path, corpus, monkeypatch, capfd, restore_handlers, second_signal_at_once):
    path = write_config(tmp_path, corpus, max_iters=4, test_freq=3, checkpoint_freq=100, log_freq=1)
    real_write_step_line, real_close = train.write_step_line, MetricsLog.close

    def write_step_line(step_log, step, *args):  # Ctrl-C while step 3's line is written
        real_write_step_line(step_log, step, *args)
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    def close(self):  # an impatient second Ctrl-C while the logs close (W&B uploading, say)
        signal.raise_signal(signal.SIGINT)
        real_close(self)
    monkeypatch.setattr(train, "write_step_line", write_step_line)
    monkeypatch.setattr(MetricsLog, "close", close)
    monkeypatch.setattr(train, "evaluate", lambda *args: pytest.fail("evaluated before saving"))
    assert train.main(["--config", str(path)]) == 0
    out, err = capfd.readouterr()
    assert "SIGINT: saving a checkpoint after step 3 (before the evaluation due at this step, which the resume runs " \
           "first)\n" in out
    assert "\nstopped by SIGINT after step 3. Resume with:\n  " in out
    assert out.endswith("\n(stopped while closing the logs: their last records may be missing)\n")
    assert "interrupted" not in err and "stopped at once" not in err
    run = only_run(tmp_path / "ck")
    assert [p.name for p in run.glob("checkpoint_*.pt")] == ["checkpoint_3.pt"] and list(losses(run)) == [1, 2, 3]
    # the resume runs the evaluation due first: the record of step 3, best.pt, as an uninterrupted run has them;
    # also after a resume that evaluated it and stopped before its first checkpoint (a SIGTERM in its first step)
    monkeypatch.undo()
    real_loader = train.train_loader

    def stopped_in_the_first_step(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs here
        yield from real_loader(*args, **kwargs)
    monkeypatch.setattr(train, "train_loader", stopped_in_the_first_step)
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest"]) == 130
    assert [step for step, _ in validation(run)] == [3]
    monkeypatch.undo()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest"]) == 0
    assert train.main(["--config", str(path), f"training.checkpoint_dir={tmp_path / 'whole'}"]) == 0
    evaluations = [validation(only_run(folder)) for folder in (tmp_path / "ck", tmp_path / "whole")]
    assert [step for step, _ in evaluations[0]] == [3, 4] and evaluations[0] == evaluations[1]
    assert load_checkpoint(run / "best.pt").step in (3, 4) and not load_checkpoint(run / "best.pt").evaluation_due


def validation(run_dir) -> list:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


def test_an_ignored_signal_stays_ignored_nohups_sighup_a_background_jobs_sigint(restore_handlers):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a script's background job)
    GracefulStop(second_signal_stops=True, announce=False)
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    stop = GracefulStop(second_signal_stops=True, announce=False)
    os.kill(os.getpid(), signal.SIGHUP)
    assert stop.signal_name == "SIGHUP"


def test_under_torchrun_repeated_signals_are_the_agent_forwarding_its_own(restore_handlers, capfd,
                                                                         second_signal_at_once):
    """(even where the agent's repeats come more than REPEAT_WITHIN_S apart, one of them while the checkpoint is
    written: no "still saving ... kill -9" for a signal the user did not send)"""
    stop = GracefulStop(second_signal_stops=False, announce=True)
    for doing in ("the step", SAVING, "the step"):
        stop.doing = doing
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signal_name == "SIGTERM"
    assert capfd.readouterr().err == "\nSIGTERM: finishing the step, then saving a checkpoint\n"


VOTE = """
import os, sys, torch.distributed as dist
from distributed import Ranks
from files import script_here
from stopping import StepVote
dist.init_process_group("gloo")
rank = dist.get_rank()
# "cpu_group": a gloo group beside the default one, as distributed.start makes beside NCCL
for group in ("default", "cpu_group"):
    vote = StepVote(Ranks(rank, 2, cpu_group=dist.new_group(backend="gloo") if group == "cpu_group" else None))
    answers = [vote.ask(rank == 1 and step == 3) for step in range(6)]
    print(group, [*answers, vote.settle()])
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as stopping.exit_with ends train.py: gloo's threads, still alive, could abort Python's exit
"""


def test_a_step_vote_gives_every_rank_the_answer_one_step_late():
    outputs = run_ranks(VOTE)
    answers = str([False, False, False, False, True, False, False])
    assert outputs == [f"default {answers}\ncpu_group {answers}\n"] * 2


def test_a_signal_once_the_run_has_ended_keeps_its_status(tmp_path, corpus, restore_handlers, monkeypatch):
    """A Ctrl-C or a scheduler's SIGTERM just after `done:`, while the process tears down and exits, made a
    finished run exit 130 or 143: a job script would take it for a failure, and run it again."""
    monkeypatch.setattr(train, "stop_loader_workers", lambda **_: os.kill(os.getpid(), signal.SIGINT))
    assert train.main(["--config", str(write_config(tmp_path, corpus))]) == 0
    exits_on_sigterm = ("import atexit, os, signal, time; from stopping import exit_with; "
                        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30))); "
                        "exit_with(lambda: 0)")  # (W&B closes its run in an exit function)
    finalizing = ("import os, signal, time; from stopping import exit_with\n"
                  "class Slow:\n    def __del__(self): os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.5)\n"
                  "slow = Slow()\nexit_with(lambda: 0)")  # (Python's finalizing: once its signals are the defaults)
    hangs_in_teardown = ("import os, signal, time, stopping; from stopping import tearing_down; tearing_down(True); "
                         "stopping.REPEAT_WITHIN_S = 0; "
                         "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2); print('still tearing down', flush=True); "
                         "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)")  # a second signal: it ends at once
    forwarded = hangs_in_teardown.replace("tearing_down(True)", "tearing_down(False)").replace("time.sleep(30)",
                                                                                               "time.sleep(0.2)")
    started = time.monotonic()  # (side by side: each takes a second or two to import torch)
    scripts = {"exits on SIGTERM": exits_on_sigterm, "finalizing": finalizing, "hangs in teardown": hangs_in_teardown,
               "forwarded": forwarded}  # (forwarded: torchrun's repeats of one signal)
    ran = {name: subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
           for name, script in scripts.items()}
    ended = {name: (proc.communicate(timeout=60)[0], proc.returncode) for name, proc in ran.items()}
    assert ended == {"exits on SIGTERM": ("", 0), "finalizing": ("", 0),
                     "hangs in teardown": ("still tearing down\n", 130), "forwarded": ("still tearing down\n", 0)}
    assert time.monotonic() - started < 25  # at once, not after the exit function's 30 s


def test_sigterm_finishes_the_step_and_saves_a_resumable_checkpoint(tmp_path, corpus):
    path = write_config(tmp_path, corpus, max_iters=100000, checkpoint_freq=100000, test_freq=100000, log_freq=1000)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(path), "model.dropout=0.1",
                             "model.dropout=0.0"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    read = []
    for line in proc.stdout:
        read.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=60)
    out = "".join(read) + out
    assert proc.returncode == 0, err
    [run] = run_dirs(tmp_path)
    [ckpt] = run.glob("checkpoint_*.pt")
    step = load_checkpoint(ckpt).step
    assert step >= 2 and f"stopped by SIGTERM after step {step}" in out
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == step and f"step {step}/100000 | loss" in out  # the steps since the last line are logged
    assert "SIGTERM: finishing the step, then saving a checkpoint (a second one stops at once)" in err
    # the resume command keeps the run's overrides (a key given twice: its last value)
    # and names the run directory, its newest checkpoint: run again later, it does not go back to this step;
    # train.py's path works from the folder it was started in
    assert f"\n  python {ROOT.resolve() / 'train.py'} --config {path} model.dropout=0.0 " \
           f"training.resume_from_checkpoint={run}\n" in out


def test_a_closed_terminal_stops_with_a_checkpoint_though_the_output_has_no_reader(tmp_path, corpus):
    """SIGHUP to the process group (the loader's worker too), and prints that find no reader: as after
    a closed terminal, or Ctrl-C in `python train.py | tee log`, which ends tee too (each alone fails
    the test)."""
    path = write_config(tmp_path, corpus, max_iters=100000, checkpoint_freq=100000, test_freq=100000, log_freq=1)
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(path), "dataloader.num_workers=1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("step 2/"):
            break
    proc.stdout.close()  # the reader is gone
    proc.stderr.close()
    os.killpg(proc.pid, signal.SIGHUP)
    assert proc.wait(timeout=60) == 0
    [run] = run_dirs(tmp_path)
    [ckpt] = run.glob("checkpoint_*.pt")
    assert load_checkpoint(ckpt).step >= 2


def test_ctrl_c_during_an_evaluation_is_acknowledged_at_once_and_its_step_logged(tmp_path, corpus, monkeypatch,
                                                                               capfd, restore_handlers):
    path = write_config(tmp_path, corpus, max_iters=100, test_freq=3, checkpoint_freq=100, log_freq=100)
    real_validation_loss, said = evaluation.validation_loss, []

    def validation_loss(*args):  # Ctrl-C as the evaluation starts: what is said before it goes on
        signal.raise_signal(signal.SIGINT)
        said.append(capfd.readouterr())
        return real_validation_loss(*args)
    monkeypatch.setattr(evaluation, "validation_loss", validation_loss)
    assert train.main(["--config", str(path)]) == 0
    assert said[0].err == "\nSIGINT: finishing the evaluation, then saving a checkpoint (Ctrl-C again to stop at once)\n"
    out = capfd.readouterr().out
    assert "stopped by SIGINT after step 3." in out  # no step after the evaluation
    assert out.count("best.pt (best validation loss so far)") == 1  # written once, with the checkpoint
    assert "checkpoint_3.pt (a copy of best.pt)" in out
    assert list(losses(only_run(tmp_path / "ck"))) == [1, 2, 3]  # step 3, not a log step: its line all the same


def test_ctrl_c_while_best_pt_is_written_stops_after_that_step(tmp_path, corpus, monkeypatch, capfd, restore_handlers):
    path = write_config(tmp_path, corpus, max_iters=100, test_freq=3, checkpoint_freq=100, log_freq=100)
    real_save = train.save

    def save(*args, **kwargs):
        if kwargs.get("name") == "best.pt":
            signal.raise_signal(signal.SIGINT)
        return real_save(*args, **kwargs)
    monkeypatch.setattr(train, "save", save)
    assert train.main(["--config", str(path)]) == 0
    out = capfd.readouterr().out
    assert "SIGINT: saving a checkpoint after step 3" in out and "stopped by SIGINT after step 3." in out
    assert list(losses(only_run(tmp_path / "ck"))) == [1, 2, 3]  # not one more step


@pytest.mark.parametrize("checkpoint_freq", [2, 1000])
def test_ctrl_c_while_saving_stops_after_the_checkpoint_even_twice(tmp_path, corpus, checkpoint_freq, monkeypatch,
                                                                   capfd, restore_handlers, second_signal_at_once):
    """A periodic checkpoint (a Ctrl-C while it is written: it is the one, the run stops after it),
    or the one a first Ctrl-C after step 2 asked for (a second Ctrl-C waits for it instead of losing it)."""
    path = write_config(tmp_path, corpus, max_iters=1000, test_freq=1000, checkpoint_freq=checkpoint_freq)
    real_save, real_write_step_line = train.save, train.write_step_line

    def save(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real_save(*args, **kwargs)

    def write_step_line(step_log, step, *args):
        real_write_step_line(step_log, step, *args)
        if step == 2 and checkpoint_freq == 1000:
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(train, "save", save)
    monkeypatch.setattr(train, "write_step_line", write_step_line)
    assert train.main(["--config", str(path)]) == 0
    out, err = capfd.readouterr()
    step = int(re.search(r"stopped by SIGINT after step (\d+)\.", out)[1])
    [run] = run_dirs(tmp_path)
    assert [p.name for p in run.glob("checkpoint_*.pt")] == [f"checkpoint_{step}.pt"]
    assert max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()) == step
    assert step == 2  # (a Ctrl-C while step 2's line is written: not one more step)
    if checkpoint_freq == 2:
        assert err == "\nSIGINT: finishing the checkpoint, then stopping\n"
    else:
        assert err == ("\nSIGINT: finishing the step, then saving a checkpoint (Ctrl-C again to stop at once)\n"
                       "\nstill saving the checkpoint; the run stops right after it (kill -9 stops at once)\n")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads which signals a process handles from /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda sig: sig.name)
def test_a_signal_while_torch_imports_stops_in_one_line(sig):
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    caught = 0
    while not caught & 1 << (signal.SIGTERM - 1) and proc.poll() is None:  # its handlers are set: the imports start
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        time.sleep(0.002)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, "", f"\n{sig.name}: stopped while starting, before anything ran\n")


def test_sigterm_while_the_run_sets_up_stops_it_in_one_line(tmp_path, corpus, capsys, monkeypatch):
    """Before the loop hears signals (reading the shards' footers can take minutes), SIGTERM stops the
    run as Ctrl-C does, in one line, instead of ending it without a word."""
    heard = []

    def hear(*args):
        heard.append(args)
    previous = signal.signal(signal.SIGTERM, hear)
    try:
        def setting_up(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
            return 0
        monkeypatch.setattr(train, "train", setting_up)
        assert train.main(["--config", str(write_config(tmp_path, corpus))]) == 130
        assert capsys.readouterr().err == NOTHING_SAVED and not heard
        assert signal.getsignal(signal.SIGTERM) == hear  # the caller's handler is back
        assert train.main(["--config", str(write_config(tmp_path, corpus)), "training.resume_from_checkpoint=latest"]) == 130
        assert capsys.readouterr().err == "\nSIGTERM: stopped at once: before training resumed: nothing new was saved\n"
        assert train.main(["--config", str(write_config(tmp_path, corpus)), "training.resume_from_checkpoint=auto"]) == 130
        assert capsys.readouterr().err == NOTHING_SAVED  # (auto: no run yet, or not decided)
        # run as a script: the handlers from before train.py's import-time ones (which say "before anything ran")
        monkeypatch.setattr(train, "handlers_before_import", {signal.SIGTERM: signal.SIG_DFL})
        assert train.main(["--config", str(write_config(tmp_path, corpus))]) == 130
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_while_the_loader_workers_start_still_stops_the_run(tmp_path, corpus):
    """A signal in the middle of the fork that starts a DataLoader worker was raised inside an at-fork
    hook, where Python prints the KeyboardInterrupt and goes on: the run trained on, and a worker that
    got it printed a traceback. Here each side's hook sends the signal to its own process; with another
    thread (W&B's), which the main thread's held signals go to."""
    in_the_fork = ("import os, signal, sys, threading, time, traceback, train\n"
                   "def signal_self():\n"
                   "    if any(f.filename.endswith('dataloader.py') for f in traceback.extract_stack()):\n"
                   "        os.kill(os.getpid(), signal.SIGTERM)\n"
                   "        time.sleep(0.3)\n"  # (the handler runs here, in the hook, unless the signal waits)
                   "os.register_at_fork(after_in_parent=signal_self, after_in_child=signal_self)\n"
                   "if sys.argv.pop() == 'thread':\n"
                   "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
                   "clip = train.torch.nn.utils.clip_grad_norm_\n"  # (stopped before any step)
                   "train.torch.nn.utils.clip_grad_norm_ = lambda *args: print('a step ran') or clip(*args)\n"
                   "sys.exit(train.main(sys.argv[1:]))\n")
    path = write_config(tmp_path, corpus, max_iters=3, checkpoint_freq=100, test_freq=100)
    for thread in ("", "thread"):
        ended = subprocess.run([sys.executable, "-c", in_the_fork, "--config", str(path), "dataloader.num_workers=1",
                                thread], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert ended.returncode == 130 and ended.stderr.endswith(NOTHING_SAVED), (thread, ended.stderr[-2000:])
        assert ended.stderr == NOTHING_SAVED and "a step ran" not in ended.stdout and not (tmp_path / "ck").exists()


def sigterm_at_batches(monkeypatch) -> list:
    """train_loader's batches: a SIGTERM to this process as batch i is taken, once for each i in the list returned."""
    real, signal_at = train.train_loader, []

    def loader(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            for _ in range(signal_at.count(i)):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)  # the handler runs here
            yield batch
    monkeypatch.setattr(train, "train_loader", loader)
    return signal_at


def test_a_signal_in_the_first_step_stops_at_once_and_one_after_it_saves(tmp_path, corpus, capsys, monkeypatch,
                                                                         second_signal_at_once):
    """The process's first step (a resume's too) is all a save then would keep, and under torchrun its
    compilation can outlast the 30 s the agent waits: a signal during it stops at once, as in setting up."""
    signal_at = sigterm_at_batches(monkeypatch)
    path = write_config(tmp_path, corpus, max_iters=20, checkpoint_freq=100, test_freq=100)
    signal_at[:] = [0]
    assert train.main(["--config", str(path)]) == 130
    assert capsys.readouterr().err == NOTHING_SAVED and not (tmp_path / "ck").exists()
    signal_at[:] = [1]  # the second step's batch
    assert train.main(["--config", str(path)]) == 0
    assert "stopped by SIGTERM after step 2" in capsys.readouterr().out
    signal_at[:] = [4, 4]  # two: the second stops at once, in the step after step 4's checkpoint (or step 5's)
    assert train.main(["--config", str(path), "training.checkpoint_freq=2", "training.max_iters=10",
                       "training.seed=5"]) == 130
    run = sorted(run_dirs(tmp_path))[-1]
    assert capsys.readouterr().err.endswith(
        f"\nSIGTERM: stopped at once: what it trained since the last checkpoint is not saved; resume with:\n  "
        f"python {script_here('train.py')} --config {path} training.checkpoint_freq=2 training.max_iters=10 "
        f"training.seed=5 training.resume_from_checkpoint={run}\n")
    outside = tmp_path / "downloads" / "mine.pt"  # a checkpoint outside a run directory: the file, not its folder
    outside.parent.mkdir()
    shutil.copy(sorted(run.glob("checkpoint_*.pt"))[0], outside)
    signal_at[:] = [0, 0]
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={outside}"]) == 130
    assert capsys.readouterr().err.endswith(  # (it had trained nothing since its checkpoint)
        f"stopped at once: before the first step after resuming was done; resume with:\n  "
        f"python {script_here('train.py')} --config {path} training.resume_from_checkpoint={outside}\n")
    monkeypatch.setenv("RANK", "1")  # under torchrun every rank hears it: rank 0 says so
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    assert report_stopped_at_once(signal_name="SIGTERM") == 130 and capsys.readouterr().err == ""
    # torchrun's summary, which lists each rank that ended otherwise than 0, says why this one did
    assert json.loads((tmp_path / "error.json").read_text())["message"]["message"] == "SIGTERM: stopped at once"


def test_a_signal_in_the_last_step_still_runs_its_evaluation_and_one_in_a_step_not_logged_logs_it(
        tmp_path, corpus, capsys, monkeypatch):
    """At max_iters the run is done as planned: its evaluation is not left to a resume."""
    signal_at = sigterm_at_batches(monkeypatch)
    signal_at[:] = [3]  # step 4 of 4
    path = write_config(tmp_path, corpus, max_iters=4, test_freq=4, checkpoint_freq=4)
    assert train.main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "before the evaluation due" not in out and "stopped by" not in out
    run = only_run(tmp_path / "ck")
    assert [step for step, _ in validation(run)] == [4] and not load_checkpoint(run / "checkpoint_4.pt").evaluation_due
    signal_at[:] = [2]  # step 3 of 20: no step to log, evaluate or save; its line comes before the checkpoint's
    assert train.main(["--config", str(path), "training.max_iters=20", "training.log_freq=100",
                       f"training.checkpoint_dir={tmp_path / 'b'}"]) == 0
    out = capsys.readouterr().out
    assert "stopped by SIGTERM after step 3." in out
    assert -1 < out.index("step 3/20") < out.index("SIGTERM: saving a checkpoint after step 3")


def test_a_signal_in_the_first_step_whose_interrupt_is_swallowed_still_stops_it(tmp_path, corpus, capsys,
                                                                                 monkeypatch):
    """Raised in a weakref callback (torch.compile's), a KeyboardInterrupt is printed and ignored."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)  # the handler runs here
            except KeyboardInterrupt:
                pass
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    path = write_config(tmp_path, corpus, max_iters=20, checkpoint_freq=100, test_freq=100)
    assert train.main(["--config", str(path)]) == 130 and len(calls) == 1
    assert capsys.readouterr().err == NOTHING_SAVED


def test_a_swallowed_stop_is_not_printed_as_an_ignored_exception(monkeypatch):
    """Raised in a weakref callback (torch.compile's) or an at-fork hook, a KeyboardInterrupt is printed
    with a traceback as "Exception ignored in", and the run goes on to stop in its own line
    (raise_if_heard). Other exceptions still go to the hook before, which is put back."""
    class Thing:
        pass

    def ignored(error):
        def callback(_ref):
            raise error
        thing = Thing()
        kept = weakref.ref(thing, callback)  # (the callback runs as the thing goes)
        del thing
        return kept
    printed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: printed.append(repr(unraisable.exc_value)))
    with stopping.swallowed_stops_unsaid():
        ignored(KeyboardInterrupt("SIGTERM"))  # not interrupt_at_once's own
        stopping.heard_at_once.append(("SIGTERM", time.monotonic()))
        ignored(KeyboardInterrupt("SIGTERM"))
        ignored(ValueError("something else"))
    assert printed == ["KeyboardInterrupt('SIGTERM')", "ValueError('something else')"]
    assert sys.unraisablehook.__name__ == "<lambda>"


def test_a_ctrl_c_that_torch_wraps_in_its_own_error_still_stops_in_one_line(tmp_path, corpus, capsys, monkeypatch):
    interrupt = [KeyboardInterrupt()]

    def compiling(*args, **kwargs):
        try:
            raise interrupt[0]
        except KeyboardInterrupt as e:  # as torch._dynamo does: InternalTorchDynamoError from the interrupt
            raise RuntimeError("UnboundLocalError: cannot access local variable 'prior'") from e

    monkeypatch.setattr(train, "train", compiling)
    assert train.main(["--config", str(write_config(tmp_path, corpus))]) == 130
    assert capsys.readouterr().err == NOTHING_SAVED.replace("SIGTERM", "interrupted")  # Python's own: no signal named
    interrupt[0] = KeyboardInterrupt("SIGHUP")  # one of train.py's handlers: the signal is named
    assert train.main(["--config", str(write_config(tmp_path, corpus))]) == 130
    assert capsys.readouterr().err == NOTHING_SAVED.replace("SIGTERM", "SIGHUP")
    assert not runtime.interrupted(RuntimeError("another error"))


@pytest.mark.parametrize("main,peers_lost,status,printed", [
    (lambda: 0, [], 0, ""),
    (lambda: 1 / 0, [], 1, "ZeroDivisionError: division by zero"),  # an error train.py does not expect: its traceback
    (lambda: 1, [1], 1, ""),  # a lost peer: no exit function waits on it
])
def test_a_rank_ends_at_once_once_exit_hooks_and_exit_functions_ran(main, peers_lost, status, printed, monkeypatch,
                                                                    capsys):
    """W&B learns a run's status by hooking sys.exit, and closes the run in an exit function."""
    events = exit_recorded(monkeypatch)
    monkeypatch.setattr(distributed, "_PEERS_LOST", peers_lost)
    monkeypatch.setattr(distributed, "_JOINED", [0])
    with pytest.raises(InterruptedError):
        stopping.exit_with(main)
    assert events == [("signals end at once", status), ("sys.exit", status), *[("exit functions",)] * (not peers_lost),
                      ("os._exit", status)]
    assert printed in capsys.readouterr().err
    monkeypatch.setattr(distributed, "_JOINED", [])  # one process: Python's own exit (a profiler, %run catch it)
    events.clear()
    with pytest.raises(SystemExit):
        stopping.exit_with(main)
    assert events == [("signals end at once", status), ("sys.exit", status)]


def test_a_second_ctrl_c_while_a_rank_closes_still_ends_it_at_once(monkeypatch):
    def main():
        raise KeyboardInterrupt  # (one train.main does not catch: while it reads the command line)
    events = exit_recorded(monkeypatch)
    monkeypatch.setattr(distributed, "_JOINED", [0])
    try:
        with pytest.raises(InterruptedError):
            stopping.exit_with(main)
    except KeyboardInterrupt:  # (left alone, it would end pytest's session)
        pytest.fail("Ctrl-C left exit_with: the rank would end through Python's own exit")
    assert events == [("signals end at once", 130), ("sys.exit", 130), ("exit functions",), ("os._exit", 130)]
    monkeypatch.setattr(distributed, "_JOINED", [])  # one process: as Python ends it
    with pytest.raises(KeyboardInterrupt):
        stopping.exit_with(main)


def exit_recorded(monkeypatch) -> list:
    """What exit_with calls, in order; os._exit raises InterruptedError so the test goes on."""
    events = []

    def sys_exit(status):
        events.append(("sys.exit", status))
        raise SystemExit(status)

    def os_exit(status):
        events.append(("os._exit", status))
        raise InterruptedError
    monkeypatch.setattr(sys, "exit", sys_exit)
    monkeypatch.setattr(os, "_exit", os_exit)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: events.append(("exit functions",)))
    monkeypatch.setattr(stopping, "end_at_once_on_a_signal", lambda status: events.append(("signals end at once",
                                                                                             status)))
    return events


def test_stopping_the_loader_workers_leaves_the_callers_own_processes():
    """train.main may run inside a program with processes of its own: only those started since are killed."""
    context = multiprocessing.get_context("fork")
    own, worker = context.Process(target=time.sleep, args=(60,)), context.Process(target=time.sleep, args=(60,))
    own.start()
    try:
        before = multiprocessing.active_children()
        worker.start()
        stopping.stop_loader_workers(started_before=before)
        assert own.is_alive() and not worker.is_alive()
    finally:
        for process in (own, worker):
            process.kill()
            process.join()


def test_a_benchmark_ends_on_sigterm_as_on_ctrl_c_and_puts_the_handlers_back(capsys):
    heard = []
    host = {signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL),  # (pytest's worker may have its own)
            signal.SIGHUP: signal.signal(signal.SIGHUP, lambda signum, frame: heard.append(signum))}  # the host's own
    try:
        cleaned = []
        with pytest.raises(SystemExit) as ended:
            with stopping.ended_like_ctrl_c():
                os.kill(os.getpid(), signal.SIGHUP)  # the host's handler: kept
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # (the handler runs at once: this is not reached)
                finally:  # a temporary folder's removal, say: a second signal meanwhile is ignored
                    os.kill(os.getpid(), signal.SIGTERM)
                    cleaned.append(True)
        assert (ended.value.code, cleaned, heard) == (128 + signal.SIGTERM, [True], [signal.SIGHUP])
        assert capsys.readouterr().err == "\nSIGTERM: stopped\n"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGHUP) != signal.SIG_DFL
    finally:
        for sig, handler in host.items():
            signal.signal(sig, handler)
    with pytest.raises(SystemExit) as ended:
        with stopping.ended_like_ctrl_c():
            raise KeyboardInterrupt  # Ctrl-C: one line too, not a traceback
    assert ended.value.code == 130 and capsys.readouterr().err == "\nSIGINT: stopped\n"
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:  # a signal another thread took while the loader's workers started: its KeyboardInterrupt swallowed
        with pytest.raises(SystemExit) as ended:
            with stopping.ended_like_ctrl_c():
                with stopping.signals_held():
                    try:
                        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
                    except KeyboardInterrupt:
                        pass
                pytest.fail("the benchmark went on after SIGTERM")
        assert ended.value.code == 128 + signal.SIGTERM and capsys.readouterr().err == "\nSIGTERM: stopped\n"
    finally:
        signal.signal(signal.SIGTERM, host[signal.SIGTERM])


# ---- found by mutating stopping.py: who announces, teardown's clock, SIGCHLD, exit, the first signal named

def test_a_rank_that_does_not_announce_says_nothing_of_any_signal(restore_handlers, capfd, second_signal_at_once):
    """Under torchrun only rank 0 says what a signal does: the others (announce=False) print nothing, the first
    signal or one while the checkpoint is written."""
    stop = GracefulStop(second_signal_stops=True, announce=False)
    stop.doing = SAVING
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # while saving: waits for the checkpoint
    assert stop.signal_name == "SIGTERM" and capfd.readouterr().err == ""


def test_in_teardown_a_second_ctrl_c_is_timed_from_the_first_not_from_forwarded_copies(restore_handlers,
                                                                                      monkeypatch):
    """Ctrl-C pressed again and again (under a second apart, each with a wrapper's copy) while a finished run
    hangs in its teardown: one a second after the first ends it."""
    clock, exits = [100.0], []
    monkeypatch.setattr(stopping, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(os, "_exit", exits.append)
    stopping.tearing_down(second_signal_stops=True)
    handler = signal.getsignal(signal.SIGINT)
    for at, ended in ((100.0, []), (100.6, []), (101.2, [130])):  # the first, a second Ctrl-C's copy..., a third
        clock[0] = at
        handler(signal.SIGINT, None)
        assert exits == ended, at


def test_stopping_the_loader_workers_silences_the_loaders_sigchld_handler_only_when_it_kills_some(restore_handlers):
    """The DataLoader's SIGCHLD handler would report each killed worker as an error: it goes when workers are
    killed, and stays (a calling program's own) when there were none to kill."""
    def own(*_args):
        pass
    before = signal.signal(signal.SIGCHLD, own)
    try:
        stopping.stop_loader_workers(started_before=multiprocessing.active_children())  # none of the loader's
        assert signal.getsignal(signal.SIGCHLD) is own
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        worker.start()
        try:
            stopping.stop_loader_workers()
            assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL and not worker.is_alive()
        finally:
            worker.kill()
            worker.join()
    finally:
        signal.signal(signal.SIGCHLD, before)


def test_at_exit_signals_are_ignored_only_once_the_status_is_decided_and_no_child_is_waited_for(restore_handlers,
                                                                                                 monkeypatch):
    """Before exit_with decided the status (a program that only imported stopping), Ctrl-C still ends its exit;
    and while children live (multiprocessing's exit function waits for them) it must still end that wait."""
    def own(*_args):
        pass
    for sig in SIGNALS:
        signal.signal(sig, own)
    monkeypatch.setattr(stopping, "status_decided", [])
    stopping.ignore_signals_at_exit()
    assert [signal.getsignal(sig) for sig in SIGNALS] == [own] * len(SIGNALS)
    monkeypatch.setattr(stopping, "status_decided", [0])
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    child.start()
    try:
        stopping.ignore_signals_at_exit()
        assert [signal.getsignal(sig) for sig in SIGNALS] == [own] * len(SIGNALS)
    finally:
        child.kill()
        child.join()
    stopping.ignore_signals_at_exit()
    assert [signal.getsignal(sig) for sig in SIGNALS] == [signal.SIG_IGN] * len(SIGNALS)


def test_what_main_printed_comes_out_as_the_process_ends_at_once_signal_or_not():
    """A rank (joined a process group) ends with os._exit, after the exit functions it runs itself; W&B closes its
    run in one, and a SIGTERM then ends the process at once with main's status. Either way what main printed
    (buffered: stdout is a pipe, as under torchrun) still comes out; in one process too."""
    script = ("import atexit, os, signal, sys, time, distributed; from stopping import exit_with\n"
              "distributed._JOINED.append(0) if sys.argv[1] == 'rank' else None\n"
              "if sys.argv[2] == 'signal':\n"
              "    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)))\n"
              "exit_with(lambda: print('done: 4 steps') or 0)\n")
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as train.py's output to a pipe
    cases = [(joined, signalled) for joined in ("rank", "one process") for signalled in ("signal", "no signal")]
    started = [subprocess.Popen([sys.executable, "-c", script, *case], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                env=buffered) for case in cases]  # (side by side: a second each to import torch)
    for case, proc in zip(cases, started):
        assert (proc.communicate(timeout=60)[0], proc.returncode) == ("done: 4 steps\n", 0), case


def test_a_benchmark_after_a_run_stopped_at_once_in_this_process_is_not_stopped_by_that_runs_signal(
        restore_handlers):
    """train.main stopped at once (in IPython, say) leaves its signal in heard_at_once: a benchmark run after it
    in the same process starts afresh."""
    stopping.heard_at_once.append(("SIGTERM", time.monotonic()))
    ran = []
    with stopping.ended_like_ctrl_c():
        with stopping.signals_held():  # (where its loader's workers start)
            ran.append(True)
    assert ran == [True]


def test_a_later_signal_while_stopping_at_once_still_names_the_first(second_signal_at_once):
    """interrupt_at_once raises again for a later signal (the first one's stop swallowed); the stop is still the
    first signal's: raise_if_heard names it."""
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        stopping.interrupt_at_once(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        stopping.interrupt_at_once(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt, match="^SIGTERM$"):
        stopping.raise_if_heard()


def test_in_one_process_the_step_vote_is_the_flag_itself_without_delay():
    vote = stopping.StepVote(Ranks())
    assert [vote.ask(flag) for flag in (False, True, False)] == [False, True, False] and vote.settle() is False


def test_a_benchmark_stopped_by_an_interrupt_that_names_no_signal_ends_as_ctrl_c_does(capsys):
    """A KeyboardInterrupt whose message is not a signal's name (a library's own, StoppedWhileClosing's last words)
    is Python's Ctrl-C: 130 and one line, not a KeyError's traceback."""
    for interrupt in (KeyboardInterrupt("interrupted by the user"), stopping.StoppedWhileClosing("stopped by SIGINT")):
        with pytest.raises(SystemExit) as ended:
            with stopping.ended_like_ctrl_c():
                raise interrupt
        assert ended.value.code == 130 and capsys.readouterr().err == "\nSIGINT: stopped\n"
    assert stopping.signal_of(KeyboardInterrupt("SIGHUP")) == "SIGHUP"
