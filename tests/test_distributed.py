"""torchrun on CPU with gloo: DDP and FSDP against one process, exact resume, a hung rank."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import distributed
import stopping
import train
from checkpoint import load_checkpoint
from config import Config, fsdp_problems
from conftest import ROOT, only_run, rendezvous, run_ranks, write_config
from distributed import Ranks
from model import BDH, BDHConfig

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(n, config, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "train.py", "--config", str(config), *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def two_ranks(config, *overrides):
    """Rank 0's output of 2 ranks started as torchrun starts them, without torchrun's agent (seconds less)."""
    ranks, _store = spawn_ranks(config, *overrides)
    outputs = [proc.communicate(timeout=300) for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0], "".join(out[-2000:] + err[-3000:] for out, err in outputs)
    return outputs[0][0]


def train_losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}, \
        {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, corpus, capsys):
    """1 process x 2 micro-steps x 2 loader workers reads the same batches as 2 processes x 1
    worker: reader r is worker r in the first, rank r in the second."""
    config = write_config(tmp_path, corpus, model={"dropout": 0.0}, max_iters=4, checkpoint_freq=4)
    assert train.main(["--config", str(config), "training.checkpoint_dir=" + str(tmp_path / "one"),
                       "training.gradient_accumulation_steps=2", "dataloader.num_workers=2"]) == 0
    capsys.readouterr()
    one_train, one_val = train_losses(only_run(tmp_path / "one"))
    common = ["dataloader.num_workers=1"]
    out = torchrun(2, config, "training.checkpoint_dir=" + str(tmp_path / "ddp"), *common)
    assert "2 processes (ddp), global batch 4 x 1 x 2" in out and "128 tokens/step" in out
    assert [out.count(f"step {s}/4 |") for s in (1, 2, 3, 4)] == [1, 1, 1, 1]  # rank 0 alone logs
    run = only_run(tmp_path / "ddp")
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events.out.tfevents")) == [
        ".lock", "best.pt", "checkpoint_4.pt", "config.yaml", "metrics.jsonl"]
    assert len(list(run.glob("events.out.tfevents*"))) == 1  # rank 0's TensorBoard file only
    ddp_train, ddp_val = train_losses(run)
    assert ddp_train.keys() == one_train.keys() == {1, 2, 3, 4}
    for step in one_train:
        assert ddp_train[step] == pytest.approx(one_train[step], rel=1e-5, abs=1e-6)
    for step in one_val:  # validation averaged over the ranks' halves of the same batches
        assert ddp_val[step] == pytest.approx(one_val[step], rel=1e-5)

    def passes(run):  # over every rank's readers, as one process over its workers'
        return {r["step"]: r["epochs"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "epochs" in r}
    assert passes(run) == passes(only_run(tmp_path / "one"))
    # the same 2 readers laid out otherwise: 1 process x 2 workers continues the 2 processes' readers exactly
    for directory in ("one", "ddp"):
        assert train.main(["--config", str(config), "training.checkpoint_dir=" + str(tmp_path / directory),
                           "training.resume_from_checkpoint=latest", "training.max_iters=5",
                           "training.gradient_accumulation_steps=2", "dataloader.num_workers=2"]) == 0
    out = capsys.readouterr().out
    assert "still 2 readers (processes x workers), each continues where it stopped" in out
    assert "where the checkpoint has 2" not in out  # no dropout to draw afresh, and a step's tokens stay
    assert "WARNING" not in out
    assert train_losses(run)[0][5] == pytest.approx(train_losses(only_run(tmp_path / "one"))[0][5], rel=1e-5)

    out = two_ranks(config, "training.checkpoint_dir=" + str(tmp_path / "fsdp"), "training.distributed=fsdp", *common)
    assert "2 processes (fsdp)" in out
    full = 8 * sum(t.numel() + 0.5 for t in load_checkpoint(run / "checkpoint_4.pt").model.values()) / 2**20
    assert f"optimizer AdamW, state {full:.2f} MiB in all, {full / 2:.2f} MiB per rank (FSDP shards it)" in out
    fsdp_run = only_run(tmp_path / "fsdp")
    fsdp_train, _ = train_losses(fsdp_run)
    for step in one_train:
        assert fsdp_train[step] == pytest.approx(one_train[step], rel=1e-5, abs=1e-6)
    # FSDP's checkpoint is gathered into the canonical single-file layout
    fsdp_ckpt = load_checkpoint(fsdp_run / "checkpoint_4.pt")
    ddp_ckpt = load_checkpoint(run / "checkpoint_4.pt")
    model = BDH(BDHConfig(**fsdp_ckpt.model_config))
    model.load_state_dict(fsdp_ckpt.model)
    for name, tensor in ddp_ckpt.model.items():
        torch.testing.assert_close(fsdp_ckpt.model[name], tensor, rtol=1e-4, atol=1e-6)
    assert set(fsdp_ckpt.optimizer["state"]) == set(ddp_ckpt.optimizer["state"])
    # ... that one process resumes (another world size: it reads the rest of the epoch, with a warning)
    assert train.main(["--config", str(config), "training.checkpoint_dir=" + str(tmp_path / "fsdp"),
                       "training.resume_from_checkpoint=latest", "training.max_iters=5"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the data order changes" in out and "world_size: 2 -> 1" in out and "dealt anew to" in out
    assert ("note: 1 process where the checkpoint has 2, and a step trains on 64 tokens where it trained on 128; "
            "training.gradient_accumulation_steps=2 keeps 128\n") in out
    assert load_checkpoint(fsdp_run / "checkpoint_5.pt").step == 5


def test_resume_of_a_two_process_run_is_exact(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=3, test_freq=3, keep_last_n=0)
    common = ["dataloader.num_workers=1", "training.gradient_accumulation_steps=2",
              "low_precision.use_4bit_optimizer=true", "low_precision.use_4bit=true",
              "low_precision.qat_start_fraction=0.5"]  # they work under DDP; QAT from step 4
    auto = "training.resume_from_checkpoint=auto"  # the ranks agree on whether a run is there to resume
    assert two_ranks(config, *common, auto).count("auto: no run with a checkpoint in") == 1
    run = only_run(tmp_path / "ck")
    straight = load_checkpoint(run / "checkpoint_6.pt")
    straight_train, straight_val = train_losses(run)
    for newer in ("checkpoint_6.pt", "best.pt"):  # (best.pt: step 6 too) the latest is now checkpoint_3.pt
        (run / newer).unlink()
    out = two_ranks(config, *common, auto)
    assert out.count("resuming from") == 1 and "at step 4" in out
    assert only_run(tmp_path / "ck") == run
    resumed = load_checkpoint(run / "checkpoint_6.pt")
    for name, tensor in straight.model.items():
        assert torch.equal(resumed.model[name], tensor), name
    assert train_losses(run) == (straight_train, straight_val)
    assert len(resumed.rng) == 2 and len(resumed.data_positions) == 2
    assert "exp_avg_4bit" in resumed.optimizer["state"]["encoder"]
    capsys.readouterr()  # one process goes on: with dropout, its masks are drawn afresh
    assert train.main(["--config", str(config), *common, "training.resume_from_checkpoint=latest",
                       "training.max_iters=7"]) == 0
    assert ("note: 1 process where the checkpoint has 2: each rank's random state (dropout masks) is seeded afresh, "
            "and a step trains on") in capsys.readouterr().out


def test_a_hung_rank_stops_the_others_with_a_clear_error(tmp_path, corpus):
    config = write_config(tmp_path, corpus, max_iters=100000, test_freq=100000,
                          checkpoint_freq=1, distributed_timeout_s=15)
    ranks, _store = spawn_ranks(config)
    try:
        for line in ranks[0].stdout:
            if line.startswith("saved "):  # step 1's checkpoint
                ranks[1].send_signal(signal.SIGSTOP)
                stopped_at = time.monotonic()
                break
        else:  # (every collective has the timeout: one while the ranks start, on a loaded machine)
            pytest.fail("rank 0 ended before its first checkpoint: " + ranks[0].stderr.read()[-3000:])
        out, err = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode == 1, err[-3000:]
        assert time.monotonic() - stopped_at < 60
        assert "error (rank 0): communication with the other ranks failed" in err
        assert err.rstrip().endswith(f"once that is fixed, resume with `torchrun --standalone --nproc_per_node=2 "
                                     f"train.py --config {config} "
                                     f"training.resume_from_checkpoint={only_run(tmp_path / 'ck')}`")
        assert "training.distributed_timeout_s = 15 s" in err and "Traceback" not in err
    finally:
        for proc in ranks:
            proc.kill()
            proc.communicate()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_two_gpus_with_nccl(tmp_path, corpus):
    config = write_config(tmp_path, corpus, model={"dropout": 0.0}, device="cuda")
    out = torchrun(2, config, "dataloader.num_workers=1")
    assert "device cuda:0" in out and "2 processes (ddp)" in out
    assert load_checkpoint(only_run(tmp_path / "ck") / "checkpoint_4.pt").step == 4


def spawn_ranks(config, *overrides, n=2):
    """(the processes torchrun would start, the rendezvous store): signals reach exactly one rank."""
    env, store = rendezvous(n)
    return [subprocess.Popen([sys.executable, "train.py", "--config", str(config), *overrides], cwd=ROOT, text=True,
                             env={**ENV, **env, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(n)], store


def test_when_rank_0_refuses_to_start_the_others_point_to_its_error(tmp_path, corpus):
    (tmp_path / "a_file").write_text("")
    config = write_config(tmp_path, corpus, checkpoint_dir=str(tmp_path / "a_file" / "ck"), distributed_timeout_s=30)
    ranks, _store = spawn_ranks(config)
    try:
        errors = [proc.communicate(timeout=120)[1] for proc in ranks]
    finally:
        for proc in ranks:
            proc.kill()
    assert [proc.returncode for proc in ranks] == [1, 1]
    assert errors[0].startswith("error (rank 0): training.checkpoint_dir: ")
    assert errors[1].startswith("error (rank 1): communication with the other ranks failed (")
    assert "refused to start, its error is above" in errors[1]
    assert errors[1].endswith("; once that is fixed, run the same command again (no checkpoint was saved)\n")
    assert errors[1].count("\n") == 1


def test_a_signal_to_one_rank_stops_all_of_them_at_the_same_step(tmp_path, corpus):
    config = write_config(tmp_path, corpus, max_iters=100000, test_freq=100000, checkpoint_freq=100000)
    ranks, _store = spawn_ranks(config)
    try:
        for line in ranks[0].stdout:
            if line.startswith("step 3/"):
                ranks[1].send_signal(signal.SIGTERM)
                break
        out, err = ranks[0].communicate(timeout=120)
        _, err1 = ranks[1].communicate(timeout=60)
        assert (ranks[0].returncode, ranks[1].returncode) == (0, 0), err[-2000:] + err1[-2000:]
    finally:
        for proc in ranks:
            proc.kill()
            proc.communicate()
    [ckpt] = only_run(tmp_path / "ck").glob("checkpoint_*.pt")
    step = load_checkpoint(ckpt).step
    assert f"stopped by a signal to another rank after step {step}" in out
    assert "torchrun --standalone --nproc_per_node=2 train.py" in out


SIGNAL_IN_STEP = """
import os, signal, sys
import model, train
from stopping import exit_with
forward, calls = model.BDH.forward, []
def signalled_forward(self, *args, **kwargs):  # rank 1 hears a SIGTERM in the forward of step {step}
    calls.append(self.training)
    if os.environ["RANK"] == "1" and calls.count(True) == {step} and self.training:
        os.kill(os.getpid(), signal.SIGTERM)
    return forward(self, *args, **kwargs)
model.BDH.forward = signalled_forward
exit_with(lambda: train.main(sys.argv[1:]))  # as train.py ends: gloo's threads could abort the interpreter's exit
"""


def test_a_signal_in_a_step_that_evaluates_saves_before_the_evaluation_on_every_rank(tmp_path, corpus):
    """As in one process: the vote of the step is awaited before its evaluation, not a step later."""
    config = write_config(tmp_path, corpus, max_iters=8, test_freq=4, checkpoint_freq=100)
    (tmp_path / "driver.py").write_text(SIGNAL_IN_STEP.format(step=4))
    env, _store = rendezvous(2)
    ranks = [subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), "--config", str(config)], cwd=ROOT,
                              text=True, env={**ENV, **env, "PYTHONPATH": str(ROOT), "RANK": str(r),
                                              "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    try:
        (out, err), (_, err1) = [proc.communicate(timeout=180) for proc in ranks]
        assert [proc.returncode for proc in ranks] == [0, 0], err[-2000:] + err1[-2000:]
    finally:
        for proc in ranks:
            proc.kill()
    assert "saving a checkpoint after step 4 (before the evaluation due at this step" in out, out
    assert "step 4: val loss" not in out
    assert load_checkpoint(only_run(tmp_path / "ck") / "checkpoint_4.pt").evaluation_due


@pytest.mark.parametrize("low_precision,fragment", [
    ({"use_4bit": True}, "low_precision.use_4bit with training.distributed=fsdp"),
    ({"use_4bit_optimizer": True}, "low_precision.use_4bit_optimizer with training.distributed=fsdp"),
    ({"use_fp8": True}, "low_precision.use_fp8 with training.distributed=fsdp"),
    ({"compute_dtype": "float16"}, "float16 with training.distributed=fsdp"),
])
def test_what_fsdp_cannot_run_is_refused_under_torchrun(low_precision, fragment):
    cfg = Config.from_dict({"training": {"distributed": "fsdp"}, "low_precision": low_precision})
    [problem] = fsdp_problems(cfg)
    assert fragment in problem
    assert fsdp_problems(Config.from_dict({"training": {"distributed": "fsdp"}})) == []


def test_settings_for_several_processes_are_noted_in_one(monkeypatch):
    cfg = Config.from_dict({"training": {"distributed": "fsdp", "distributed_timeout_s": 60}})
    assert cfg.unused_settings() == [
        "training.distributed 'fsdp' is not used in training: one process trains unsharded (torchrun "
        "--nproc_per_node=N, N of 2 or more, shards)",
        "training.distributed_timeout_s 60 is not used in training: one process, no other ranks to wait for"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun both are read
    assert cfg.unused_settings() == []


def test_a_process_given_part_of_torchrun_s_environment_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # left over in a shell, say
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(distributed.DistributedError, match=r"^WORLD_SIZE=2 is set, but RANK, MASTER_ADDR and MASTER_PORT "
                                                           r"are not: start the processes with torchrun \(torchrun "
                                                           r"--nproc_per_node=N train.py ...\), or unset WORLD_SIZE"):
        distributed.start(Config(), torch.device("cpu"))
    for name, value in (("RANK", "5"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.DistributedError, match=r"^RANK=5 with WORLD_SIZE=2: a rank is 0 to WORLD_SIZE - 1"):
        distributed.start(Config(), torch.device("cpu"))


@pytest.mark.parametrize("error,message,lost", [
    (torch.distributed.DistStoreError("wait timeout after 15000ms, keys: /default_pg/0//cpu//0/1"),  # a rank never came
     "joining the other ranks failed (wait timeout after 15000ms, keys: /default_pg/0//cpu//0/1): a rank that "
     "failed to start has its error above", True),
    (torch.distributed.DistNetworkError("The server socket has failed to listen on any local network address. port: "
                                        "29500, useIpv6: false, code: -98, name: EADDRINUSE, message: address already "
                                        "in use"),
     "the rendezvous address is taken (The server socket", False),
    (torch.distributed.DistNetworkError("bind: Address already in use"), "the rendezvous address is taken (bind:",
     False),  # said in words only
    (torch.distributed.DistNetworkError("Connection refused (127.0.0.1, 1)"),  # rank 0's store gone
     "joining the other ranks failed (Connection refused", True),
    (ValueError("invalid literal for int() with base 10: 'abc'"),
     "the process group could not start (invalid literal for int() with base 10: 'abc'); check torchrun's", False),
])
def test_a_rank_that_cannot_join_says_why_in_one_line(monkeypatch, error, message, lost):
    """init_process_group waits for every rank: one that never comes ends it with a store timeout, a
    consequence of another rank's failure; the other failures are this rank's own."""
    monkeypatch.setattr(distributed, "_JOINED", [])
    monkeypatch.setattr(distributed, "_PEERS_LOST", [])
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(torch.distributed, "init_process_group", fail)
    with pytest.raises(distributed.DistributedError) as failure:
        distributed.start(Config.from_dict({"training": {"distributed_timeout_s": 15}}), torch.device("cpu"))
    assert str(failure.value).startswith(message) and distributed.peers_lost() == lost
    assert ("training.distributed_timeout_s = 15 s" in str(failure.value)) == lost


def test_torchrun_s_summary_shows_a_failed_rank_s_error(tmp_path, corpus, monkeypatch, capsys):
    """torchrun's summary of failed ranks reads TORCHELASTIC_ERROR_FILE: torch's own reader and format, here.
    Its root cause is the earliest failure: a rank that lost its peer dates its own a second later."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def summary(status):
        return ChildFailedError("train.py", {0: ProcessFailure(0, 1, status, str(error_file))}).format_msg()
    assert train.main(["--config", str(write_config(tmp_path, corpus)), f"dataset.parquet_dir={tmp_path / 'nope'}"]) == 1
    line = capsys.readouterr().err.rstrip("\n")
    assert line.startswith("error: ") and f"traceback : {line}\n" in summary(1)
    with pytest.raises(SystemExit):
        train.main(["--config", str(write_config(tmp_path, corpus)), "training.lr=1", "model.n_layer=x"])
    assert re.search(r"traceback : config error: .* \(and 1 more\)\n", summary(2))
    with pytest.raises(SystemExit):
        train.main(["--config", str(write_config(tmp_path, corpus)), "--max_iters", "3"])  # argparse's own error
    assert re.search(r"traceback : \S+: error: unrecognized argument --max_iters: settings are given as", summary(2))
    monkeypatch.setattr(train, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("Connection closed by peer")))
    monkeypatch.setattr(distributed, "_PEERS_LOST", [])
    monkeypatch.setattr(distributed, "_JOINED", [])  # (exit_with below: as one process)
    monkeypatch.setattr(train, "start", lambda cfg, device: (Ranks(0, 2), device))
    before = int(time.time())
    assert train.main(["--config", str(write_config(tmp_path, corpus))]) == 1  # a lost peer: the other rank's fault
    assert "communication with the other ranks failed" in summary(1)
    assert ProcessFailure(0, 1, 1, str(error_file)).timestamp >= before + 1
    monkeypatch.setattr(train, "train", lambda *a, **k: 1 / 0)  # what nothing expects: its last line
    monkeypatch.setattr(stopping, "end_at_once_on_a_signal", lambda status: None)  # (pytest's handlers stay)
    with pytest.raises(SystemExit):
        stopping.exit_with(lambda: train.main(["--config", str(write_config(tmp_path, corpus))]))
    assert "traceback : ZeroDivisionError: division by zero\n" in summary(1)


def test_fsdp_refusal_is_one_line_before_training(tmp_path, corpus, monkeypatch, capsys):
    config = write_config(tmp_path, corpus)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets for each rank (torchrun itself: the tests above)
    err = ""
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stop:
            train.main(["--config", str(config), "training.distributed=fsdp", "low_precision.use_4bit_optimizer=true"])
        assert stop.value.code == 2
        err += capsys.readouterr().err
    assert err.count("config error: low_precision.use_4bit_optimizer with training.distributed=fsdp") == 1
    assert not (tmp_path / "ck").exists()


def test_print_config_under_torchrun_prints_it_once(tmp_path, corpus, monkeypatch, capsys):
    out = ""
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert train.main(["--config", str(write_config(tmp_path, corpus)), "--print-config"]) == 0
        out += capsys.readouterr().out
    assert out.count("\nmodel:") + out.startswith("model:") == 1


@pytest.mark.parametrize("text", [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5000",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:43144: Connection reset by peer",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:43144: No route to host",  # a node gone
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Write error [10.0.0.2]:43144: No route to host",  # a node gone
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 6000ms for recv operation",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] send: Broken pipe",
])
def test_a_lost_peer_is_told_in_one_line_and_other_errors_are_not(text, monkeypatch):
    monkeypatch.setattr(distributed, "_PEERS_LOST", [])
    failure = distributed.communication_failure(RuntimeError(f"gloo failed\n{text}"), Ranks(1, 2), 30)
    assert failure.startswith(f"communication with the other ranks failed ({text[:199]}")
    assert distributed._PEERS_LOST == [1]  # the exit will not wait on the lost peer
    assert failure.endswith("once that is fixed, run the same command again (no checkpoint was saved)")
    resumable = distributed.communication_failure(RuntimeError(text), Ranks(1, 2), 30, resume="python train.py x")
    assert resumable.endswith("once that is fixed, resume with `python train.py x`")
    assert distributed.communication_failure(RuntimeError(text), Ranks(), 30) is None  # one process
    assert distributed.communication_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                                             Ranks(1, 2), 30) is None




RANKS = """
import os, sys, torch, torch.distributed as dist
from distributed import Ranks
dist.init_process_group("gloo")
ranks = Ranks(dist.get_rank(), 2)
own = torch.tensor([ranks.rank + 1.0])  # (reduced in a copy: the caller's stays its own)
print(ranks.lowest(ranks.rank + 0.5, "cpu"), ranks.mean(own).item(), ranks.total(own).item(),
      own.item() == ranks.rank + 1, ranks.any(ranks.rank == 1, "cpu"), ranks.any(False, "cpu"),
      ranks.gather(ranks.rank * 10))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as stopping.exit_with ends train.py
"""


def test_what_the_ranks_agree_on_is_the_slowest_the_mean_the_total_and_any():
    assert run_ranks(RANKS) == ["0.5 1.5 3.0 True True False [0, 10]\n"] * 2


@pytest.fixture
def torchrun_env(monkeypatch):
    """The environment torchrun gives rank 1 of 2, with the process group's calls recorded, not made."""
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "_JOINED", [])
    monkeypatch.setattr(distributed, "_PEERS_LOST", [])
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # start() silences a rank other than 0: put it back after
    calls = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.update(init=(backend, kwargs)))
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: calls.setdefault("new_group", kwargs) or "gloo group")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(set_device=device))
    return calls


def test_each_rank_on_a_gpu_node_takes_its_local_gpu_with_nccl_and_a_gloo_group(torchrun_env, monkeypatch):
    """LOCAL_RANK picks the GPU; NCCL carries the tensors with training.distributed_timeout_s, gloo the CPU votes."""
    cfg = Config.from_dict({"training": {"distributed_timeout_s": 42}})
    ranks, device = distributed.start(cfg, torch.device("cuda"))
    assert device == torch.device("cuda", 1) and torchrun_env["set_device"] == device
    backend, kwargs = torchrun_env["init"]
    assert backend == "nccl" and kwargs["device_id"] == device and kwargs["timeout"].total_seconds() == 42
    assert torchrun_env["new_group"]["backend"] == "gloo" and ranks.cpu_group is not None
    assert (ranks.rank, ranks.world_size, ranks.local_rank) == (1, 2, 1)
    monkeypatch.setenv("LOCAL_RANK", "2")  # GPUs 0 and 1
    with pytest.raises(distributed.DistributedError, match=r"^local rank 2 has no GPU: this node has 2; lower"):
        distributed.start(Config(), torch.device("cuda"))


def test_cpu_ranks_use_gloo_only_rank_0_prints_and_mps_is_refused(torchrun_env, monkeypatch):
    out = sys.stdout
    ranks, device = distributed.start(Config(), torch.device("cpu"))
    assert torchrun_env["init"][0] == "gloo" and torchrun_env["init"][1]["device_id"] is None
    assert "new_group" not in torchrun_env and ranks.cpu_group is None
    assert sys.stdout is not out and sys.stdout.name == os.devnull
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "stdout", out)
    distributed.start(Config(), torch.device("cpu"))
    assert sys.stdout is out and distributed.first_process()
    monkeypatch.setenv("RANK", "1")
    assert not distributed.first_process()
    torchrun_env.clear()
    with pytest.raises(distributed.DistributedError, match=r"no distributed backend runs on mps"):
        distributed.start(Config(), torch.device("mps"))
    assert "init" not in torchrun_env


def test_a_process_that_lost_its_peers_does_not_tear_the_group_down(monkeypatch):
    """destroy_process_group waits for the lost peer: the process would hang instead of ending."""
    destroyed = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: destroyed.append(1))
    monkeypatch.setattr(distributed, "_PEERS_LOST", [1])
    distributed.shutdown()
    assert destroyed == []
    monkeypatch.setattr(distributed, "_PEERS_LOST", [])
    distributed.shutdown()
    assert destroyed == [1]


class Wrapped:
    """A DDP or FSDP model's calls, recorded."""
    def __init__(self):
        self.calls = []

    def no_sync(self):
        self.calls.append("no_sync")
        return "no_sync context"

    def set_requires_gradient_sync(self, sync):
        self.calls.append(("sync", sync))

    def unshard(self):
        self.calls.append("unshard")

    def reshard(self):
        self.calls.append("reshard")


def test_gradients_are_reduced_on_the_last_micro_step_only_and_fsdp_reshards_after_a_failed_generation():
    ddp, fsdp = Wrapped(), Wrapped()
    assert distributed.gradient_sync(ddp, Ranks(0, 2, mode="ddp"), sync=False) == "no_sync context"
    assert distributed.gradient_sync(ddp, Ranks(0, 2, mode="ddp"), sync=True) != "no_sync context"
    assert ddp.calls == ["no_sync"]
    distributed.gradient_sync(fsdp, Ranks(0, 2, mode="fsdp"), sync=False)
    distributed.gradient_sync(fsdp, Ranks(0, 2, mode="fsdp"), sync=True)
    assert fsdp.calls == [("sync", False), ("sync", True)]
    model = Wrapped()
    with pytest.raises(ValueError):
        with distributed.full_weights(model, Ranks(0, 2, mode="fsdp")):
            raise ValueError("generation failed")
    assert model.calls == ["unshard", "reshard"]


def test_ddp_on_a_gpu_is_given_this_rank_s_device(monkeypatch):
    made = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda model, device_ids: made.append(device_ids) or model)
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, Ranks(1, 2, 1, "ddp"), torch.device("cuda", 1)) is model
    distributed.wrap(model, Ranks(1, 2, 1, "ddp"), torch.device("cpu"))
    assert made == [[1], None]
