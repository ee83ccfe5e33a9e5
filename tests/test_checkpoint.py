"""Exact resume and crash safety, with real processes killed by real signals."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import train
from checkpoint import checkpoints_in, clean_stale_temporaries, load_checkpoint
from conftest import ROOT, write_config


def start(config, *overrides):
    return subprocess.Popen([sys.executable, "train.py", "--config", str(config), *overrides], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(config, *overrides):
    r = subprocess.run([sys.executable, "train.py", "--config", str(config), *overrides], cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def only_run(checkpoint_dir):
    [run] = [p for p in checkpoint_dir.iterdir() if p.name.startswith("run_")]
    return run


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_sigkill_is_bit_identical(tmp_path, corpus, num_workers):
    common = dict(max_iters=8, checkpoint_freq=4, test_freq=4, keep_last_n=0)
    workers = f"dataloader.num_workers={num_workers}"
    straight = write_config(tmp_path, corpus, "straight.yaml", checkpoint_dir=str(tmp_path / "a"), **common)
    finish(straight, workers)
    killed = write_config(tmp_path, corpus, "killed.yaml", checkpoint_dir=str(tmp_path / "b"), **common)
    proc = start(killed, workers)
    for line in proc.stdout:
        if line.startswith("saved") and "checkpoint_4.pt" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    out = finish(killed, workers, "training.resume_from_checkpoint=latest")
    assert "resuming from" in out and "at step 5" in out and "WARNING" not in out
    a, b = only_run(tmp_path / "a"), only_run(tmp_path / "b")
    assert losses(a) == losses(b) and sorted(losses(b)) == list(range(1, 9))
    wa, wb = load_checkpoint(a / "checkpoint_8.pt")["model"], load_checkpoint(b / "checkpoint_8.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_changing_the_data_order_on_resume_warns(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(config)]) == 0
    capsys.readouterr()
    assert train.main(["--config", str(config), "training.resume_from_checkpoint=latest",
                       "training.max_iters=3", "training.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the data order changes" in out and "training.batch_size: 4 -> 2" in out


# train.py with a slow disk: torch.save's bytes are written in small chunks with pauses, so that a
# checkpoint write takes about 0.4 s and random kills land inside writes.
SLOW_DISK_TRAIN = """
import io, sys, time
sys.path.insert(0, sys.argv.pop(1))
import torch, train
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    for i in range(0, len(data), 1 << 18):
        f.write(data[i:i + (1 << 18)])
        time.sleep(0.01)
torch.save = slow_save
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path, corpus):
    config = write_config(tmp_path, corpus, model={"n_layer": 1, "n_embd": 64, "n_head": 2,
                                                   "mlp_internal_dim_multiplier": 64},
                          max_iters=30, checkpoint_freq=1, log_freq=1, test_freq=1000, keep_last_n=2)
    rng = random.Random(0)
    ck, kills_inside_a_write = tmp_path / "ck", 0
    for attempt in range(5):
        resume = ["training.resume_from_checkpoint=latest"] if attempt else []
        proc = subprocess.Popen([sys.executable, "-c", SLOW_DISK_TRAIN, str(ROOT), "--config", str(config),
                                 *resume], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if line.startswith("step "):
                break
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        run = only_run(ck)
        kills_inside_a_write += any(".tmp" in p.name for p in run.iterdir())
        found = checkpoints_in(run)
        assert found
        for path in found:
            load_checkpoint(path)  # every checkpoint_<step>.pt is complete
    assert kills_inside_a_write >= 1
    finish(config, "training.resume_from_checkpoint=latest")  # also removes leftover temporaries
    run = only_run(ck)
    final = load_checkpoint(checkpoints_in(run)[-1])
    assert final["step"] == 30
    assert not [p for p in run.iterdir() if ".tmp" in p.name]
    assert len(checkpoints_in(run)) == 2  # keep_last_n
    # and the interrupted run ends exactly where one that was never interrupted does
    finish(config, f"training.checkpoint_dir={tmp_path / 'straight'}")
    straight = load_checkpoint(checkpoints_in(only_run(tmp_path / "straight"))[-1])
    assert all(torch.equal(final["model"][k], straight["model"][k]) for k in straight["model"])
    assert losses(run)[30] == losses(only_run(tmp_path / "straight"))[30]


def test_a_failed_write_is_reported_and_earlier_checkpoints_survive(tmp_path, corpus, monkeypatch, capsys):
    config = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2, test_freq=100)
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        if "checkpoint_4" in getattr(f, "name", ""):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_at_step_4)
    assert train.main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "cannot write checkpoint for step 4" in err and "No space left on device" in err
    run = only_run(tmp_path / "ck")
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_2.pt"]
    assert load_checkpoint(run / "checkpoint_2.pt")["step"] == 2
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


def test_keep_last_n_and_best_checkpoint(tmp_path, corpus):
    config = write_config(tmp_path, corpus, max_iters=8, checkpoint_freq=2, test_freq=2, keep_last_n=2)
    assert train.main(["--config", str(config)]) == 0
    run = only_run(tmp_path / "ck")
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_6.pt", "checkpoint_8.pt"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    best = load_checkpoint(run / "best.pt")
    assert best["best_val_loss"] == min(val.values()) and val[best["step"]] == min(val.values())


def test_stale_temporary_files_are_removed_but_not_a_live_writers(tmp_path):
    run = tmp_path / "run_20260101_000000"
    run.mkdir()
    dead, live = run / ".checkpoint_3.pt.tmp999999999", run / f".checkpoint_4.pt.tmp{os.getpid()}"
    dead.write_bytes(b"partial")
    live.write_bytes(b"partial")
    assert checkpoints_in(run) == []
    assert clean_stale_temporaries(tmp_path) == 1
    assert not dead.exists() and live.exists()
