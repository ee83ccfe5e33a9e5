"""Stopping on request: the signal handler, the vote that tells every rank, the resume command.
(Whole runs stopped by signals: tests/test_train.py and tests/test_distributed.py.)"""
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, free_port
from distributed import Ranks
from stopping import GracefulStop, launcher

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def restore_handlers():
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_a_second_ctrl_c_stops_at_once_except_while_a_checkpoint_is_written(restore_handlers, capfd):
    stop = GracefulStop(second_signal_stops=True, announce=True)
    stop.doing = "the checkpoint"
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signal_name == "SIGINT"
    os.kill(os.getpid(), signal.SIGINT)  # waits for the checkpoint
    stop.doing = "the step"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert capfd.readouterr().err == ("\nSIGINT: finishing the checkpoint, then stopping\n"
                                      "\nstill saving the checkpoint; the run stops right after it (kill -9 stops at "
                                      "once)\n")


def test_under_torchrun_repeated_signals_are_the_agent_forwarding_its_own(restore_handlers, capfd):
    stop = GracefulStop(second_signal_stops=False, announce=True)
    for doing in ("the step", "the checkpoint", "the step"):
        stop.doing = doing
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signal_name == "SIGTERM"
    assert capfd.readouterr().err == "\nSIGTERM: finishing the step, then saving a checkpoint\n"


VOTE = """
import sys, torch.distributed as dist
from distributed import Ranks
from stopping import StepVote
dist.init_process_group("gloo")
rank = dist.get_rank()
# "cpu_group": a gloo group beside the default one, as distributed.start makes beside NCCL
vote = StepVote(Ranks(rank, 2, cpu_group=dist.new_group(backend="gloo") if sys.argv[1] == "cpu_group" else None))
answers = [vote.ask(rank == 1 and step == 3) for step in range(6)]
print([*answers, vote.settle()])
dist.barrier()
dist.destroy_process_group()  # as train.py ends: both groups (gloo's threads abort an exit that skips this)
"""


@pytest.mark.parametrize("group", ["default", "cpu_group"])
def test_a_step_vote_gives_every_rank_the_answer_one_step_late(group):
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, "-c", VOTE, group], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              env={**env, "RANK": str(r)}) for r in range(2)]
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in ranks]
    finally:
        for proc in ranks:
            proc.kill()
    assert [proc.returncode for proc in ranks] == [0, 0]
    assert outputs == [str([False, False, False, False, True, False, False]) + "\n"] * 2


def test_the_resume_command_starts_the_run_as_it_was_started(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert launcher(Ranks()) == "python "
    assert launcher(Ranks(0, 4)) == "torchrun --standalone --nproc_per_node=4 "
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 nodes of 2
    assert launcher(Ranks(0, 4)) == "torchrun <the same rendezvous flags> "
