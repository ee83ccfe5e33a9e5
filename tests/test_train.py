"""train.py end to end: the run directory, logging, signals, errors (resume: test_resume.py)."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import metrics
import rundir
import runtime
import sample
import train
from checkpoint import load_checkpoint
from config import Config
from conftest import NEEDS_CUDA, ROOT, losses, only_run, run_dirs, write_config
from data import validation_batches
from model import BDH
from rundir import checkpoints_in
from shards import list_units
from tokenizer import load_tokenizer


def test_run_directory_holds_resolved_config_checkpoints_and_metrics(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus)
    assert train.main(["--config", str(path), "training.batch_size=3"]) == 0
    out = capsys.readouterr().out
    assert "step 4/4" in out and "val loss" in out and "--- sample ---" in out
    units = len(list_units(corpus, "text"))  # where the data comes from and where the runs go, resolved
    assert (f"data {corpus.resolve()} (3 files, {units} row groups; validation 20% of its documents) | tokenizer bytes | "
            f"runs in {(tmp_path / 'ck').resolve()}\n") in out
    [run] = run_dirs(tmp_path)
    assert run.name.startswith("run_")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved == Config.from_yaml(path, ["training.batch_size=3"]).to_dict()
    assert saved["training"]["batch_size"] == 3
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_2.pt", "checkpoint_4.pt"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]  # incl. before the dir existed
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert {"lr", "tokens_per_s", "ms_per_step", "elapsed_s"} <= set(records[0])


def test_no_run_directory_before_the_first_checkpoint(tmp_path, corpus, monkeypatch, capsys):
    path = write_config(tmp_path, corpus, checkpoint_freq=100, test_freq=100, max_iters=50)
    real = train.learning_rate

    def interrupt_at_step_3(step, t):
        if step == 3:
            raise KeyboardInterrupt
        return real(step, t)

    monkeypatch.setattr(train, "learning_rate", interrupt_at_step_3)
    assert train.main(["--config", str(path)]) == 130
    captured = capsys.readouterr()
    assert "step 2/50" in captured.out and "Traceback" not in captured.err
    assert run_dirs(tmp_path) == []


def test_missing_data_is_one_line_error(tmp_path, capsys):
    path = write_config(tmp_path, tmp_path / "no-such-dir")
    assert train.main(["--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_refused(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, device="cuda")
    assert train.main(["--config", str(path)]) == 1
    assert "training.device: cuda requested but not available" in capsys.readouterr().err


def test_data_loader_workers_train(tmp_path, corpus):
    path = write_config(tmp_path, corpus, max_iters=3, checkpoint_freq=3)
    assert train.main(["--config", str(path), "dataloader.num_workers=2"]) == 0
    [run] = run_dirs(tmp_path)
    ckpt = load_checkpoint(run / "checkpoint_3.pt")
    assert [p["reader"] for p in ckpt.data_positions] == [0, 1] and ckpt.batches_consumed == 3  # both took turns


@NEEDS_CUDA
@pytest.mark.parametrize("flags", [[], ["low_precision.use_4bit_optimizer=true"],
                                   ["low_precision.use_4bit=true", "low_precision.qat_start_fraction=0"]],
                         ids=["adamw", "4bit-optimizer", "qat"])
def test_a_cuda_run_trains_compiled_in_bf16_and_resumes(tmp_path, corpus, capsys, flags):
    """What a GPU user runs: CUDA, torch.compile, bf16 autocast, fused AdamW (or the 4-bit optimizer,
    or 4-bit QAT), pinned batches from 2 loader workers. Its resume reads the same batches and
    repeats its losses (to rounding: CUDA adds the embedding's gradient rows with atomics, in no
    fixed order), and sample.py generates from its checkpoint on CUDA."""
    path = write_config(tmp_path, corpus, device="cuda", compile=True, max_iters=8, checkpoint_freq=4,
                        test_freq=4, keep_last_n=0, batch_size=8, block_size=64, learning_rate=3e-3)
    common = ["--config", str(path), "low_precision.compute_dtype=bfloat16", "dataloader.num_workers=2",
              "dataloader.pin_memory=true", *flags]
    assert train.main(common) == 0
    assert "device cuda" in capsys.readouterr().out
    [run] = run_dirs(tmp_path)
    straight_losses, straight = losses(run), load_checkpoint(run / "checkpoint_8.pt")
    assert straight_losses[8] < straight_losses[1]
    assert train.main([*common, f"training.resume_from_checkpoint={run / 'checkpoint_4.pt'}"]) == 0
    resumed_losses, resumed = losses(run), load_checkpoint(run / "checkpoint_8.pt")
    assert resumed.data_positions == straight.data_positions
    for step in range(5, 9):
        assert resumed_losses[step] == pytest.approx(straight_losses[step], rel=2e-3), step
    assert sample.main(["--checkpoint", str(run / "checkpoint_8.pt"), "--prompt", "<01",
                        "--max-new-tokens", "20", "--device", "cuda"]) == 0


def test_sigterm_finishes_the_step_and_saves_a_resumable_checkpoint(tmp_path, corpus):
    path = write_config(tmp_path, corpus, max_iters=100000, checkpoint_freq=100000, test_freq=100000, log_freq=1000)
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(path), "model.dropout=0.0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    [run] = run_dirs(tmp_path)
    [ckpt] = run.glob("checkpoint_*.pt")
    step = load_checkpoint(ckpt).step
    assert step >= 2 and f"stopped by SIGTERM after step {step}" in out
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == step and f"step {step}/100000 | loss" in out  # the steps since the last line are logged
    assert "SIGTERM: finishing the step, then saving a checkpoint (a second one stops at once)" in err
    # the resume command keeps the run's overrides
    assert f"train.py --config {path} model.dropout=0.0 training.resume_from_checkpoint={ckpt}" in out


def test_non_finite_loss_stops_without_saving_a_nan_model(tmp_path, corpus, monkeypatch, capsys):
    path = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2)
    real = train.learning_rate
    monkeypatch.setattr(train, "learning_rate", lambda step, t: float("nan") if step == 3 else real(step, t))
    assert train.main(["--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "not finite at step 4" in err and "checkpoint_2.pt" in err
    [run] = run_dirs(tmp_path)
    assert [p.name for p in run.glob("checkpoint_*.pt")] == ["checkpoint_2.pt"]


@pytest.mark.parametrize("error,asked", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 83886080000 bytes. Error code 12 (Cannot allocate memory)"), "78.1 GiB"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.8 GiB"),
     "20.00 GiB"),
])
def test_out_of_memory_is_one_line_naming_the_settings(tmp_path, corpus, monkeypatch, capsys, error, asked):
    path = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2)
    real, modes = BDH.forward, []

    def forward(self, *args, **kwargs):  # the third training step's forward fails
        modes.append(self.training)
        if modes.count(True) == 3:
            raise error
        return real(self, *args, **kwargs)
    monkeypatch.setattr(BDH, "forward", forward)
    assert train.main(["--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: out of memory on cpu (asked for {asked}): lower training.batch_size 4 (raising "
                   f"training.gradient_accumulation_steps keeps the tokens per step), training.block_size 16, the "
                   f"model, or set training.activation_checkpointing=true; checkpoints written before are intact\n")
    assert [p.name for p in run_dirs(tmp_path)[0].glob("checkpoint_*.pt")] == ["checkpoint_2.pt"]


def test_a_model_too_large_for_the_memory_is_refused_before_the_data_is_read(tmp_path, corpus, monkeypatch, capsys):
    path = write_config(tmp_path, corpus)
    monkeypatch.setattr(runtime, "available_host_memory", lambda: 2**30)
    monkeypatch.setattr(train, "prepare_data", lambda *args: pytest.fail("the data was read"))
    assert train.main(["--config", str(path), "model.n_embd=1024", "model.mlp_internal_dim_multiplier=128"]) == 1
    assert capsys.readouterr().err == (
        "error: the model's 403M parameters need at least 6.0 GiB for weights, gradients and optimizer state, and "
        "this machine has 1.0 GiB available: make the model smaller (model.n_embd, model.mlp_internal_dim_multiplier; "
        "the layers share one set of weights)\n")  # the 4-bit optimizer would not make it fit (3.4 GiB): not suggested
    assert not (tmp_path / "ck").exists()


def test_activation_checkpointing_reaches_the_model(tmp_path, corpus, monkeypatch):
    seen = []
    real_apply = train.BDH.forward

    def spy(self, idx, targets=None, observe=None):
        seen.append(self.activation_checkpointing)
        return real_apply(self, idx, targets, observe)

    monkeypatch.setattr(train.BDH, "forward", spy)
    path = write_config(tmp_path, corpus, max_iters=1, test_freq=100)
    assert train.main(["--config", str(path), "training.activation_checkpointing=true"]) == 0
    assert seen and all(seen)


def validation_bytes_and_tokens(path):
    cfg = Config.from_yaml(path)
    tokenizer = load_tokenizer(cfg.dataset.tokenizer)
    batches = validation_batches(cfg, list_units(cfg.dataset.parquet_dir, "text"), tokenizer)
    targets = [row.tolist() for _, y in batches for row in y]
    separators = sum(t.count(tokenizer.separator) for t in targets)  # one byte each, as 0x00 is for bytes
    text = [[token for token in t if token != tokenizer.separator] for t in targets]
    return sum(len(tokenizer.decode(t).encode()) for t in text) + separators, sum(len(t) for t in targets)


def test_bits_per_byte_is_the_loss_over_the_bytes_of_the_targets(tmp_path, corpus, bpe_file):
    for tokens, extra in (("bytes", {}), ("bpe", {"tokenizer": str(bpe_file)})):
        path = write_config(tmp_path, corpus, f"{tokens}.yaml", max_iters=2, test_freq=2,
                            checkpoint_dir=str(tmp_path / tokens), model={"vocab_size": 320}, dataset=extra)
        assert train.main(["--config", str(path)]) == 0
        [run] = (tmp_path / tokens).iterdir()
        [record] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
        n_bytes, n_tokens = validation_bytes_and_tokens(path)  # ASCII text: decoding counts the bytes exactly
        expected = record["val_loss"] * n_tokens / n_bytes / math.log(2)
        assert record["val_bits_per_byte"] == pytest.approx(expected, rel=1e-9)
        if tokens == "bytes":
            assert n_tokens == n_bytes
        else:
            assert n_bytes > 1.5 * n_tokens


@pytest.mark.parametrize("problem,overrides,message", [
    ("missing", ["dataset.tokenizer=nope.json"], "error: dataset.tokenizer: cannot read nope.json"),
    ("too small", ["model.vocab_size=256"], "set model.vocab_size=320"),
])
def test_tokenizer_problems_stop_before_training_in_one_line(tmp_path, corpus, bpe_file, capsys, problem, overrides, message):
    path = write_config(tmp_path, corpus, model={"vocab_size": 320}, dataset={"tokenizer": str(bpe_file)})
    assert train.main(["--config", str(path), *overrides]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "ck").exists()


# ---- checkpoints that cannot be written, how many are kept

def test_a_failed_write_is_reported_and_earlier_checkpoints_survive(tmp_path, corpus, monkeypatch, capsys):
    config = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2, test_freq=100)
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        if "checkpoint_4" in getattr(f, "name", ""):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(rundir.torch, "save", disk_full_at_step_4)
    assert train.main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "cannot write checkpoint for step 4" in err and "No space left on device" in err
    run = only_run(tmp_path / "ck")
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_2.pt"]
    assert load_checkpoint(run / "checkpoint_2.pt").step == 2
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


def test_keep_last_n_and_best_checkpoint(tmp_path, corpus):
    config = write_config(tmp_path, corpus, max_iters=8, checkpoint_freq=2, test_freq=2, keep_last_n=2)
    assert train.main(["--config", str(config)]) == 0
    run = only_run(tmp_path / "ck")
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_6.pt", "checkpoint_8.pt"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    best = load_checkpoint(run / "best.pt")
    assert best.best_val_loss == min(val.values()) and val[best.step] == min(val.values())


# ---- every error path ends the process within seconds, whatever the workers

def corrupt_last_shard(corpus):
    """shard-2's pages destroyed, its footer intact: the run starts, and a loader reading it fails."""
    path = corpus / "shard-2.parquet"
    raw = bytearray(path.read_bytes())
    raw[4:400] = b"\0" * 396
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_a_data_error_in_the_loader_exits_at_once(tmp_path, corpus, num_workers):
    corrupt_last_shard(corpus)  # validation (eval_iters 1) reads shard-0 only; training reaches shard-2
    config = write_config(tmp_path, corpus, max_iters=1000, eval_iters=1, test_freq=1000, checkpoint_freq=1000)
    started = time.monotonic()
    r = subprocess.run([sys.executable, "train.py", "--config", str(config), f"dataloader.num_workers={num_workers}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 30
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {corpus / 'shard-2.parquet'}: row group 0 cannot be read (Couldn't deserialize thrift: "
        f"TProtocolException: Invalid data); the file is corrupt or truncated: re-create it"]


def test_a_data_error_under_torchrun_ends_every_rank(tmp_path, corpus):
    corrupt_last_shard(corpus)
    config = write_config(tmp_path, corpus, max_iters=1000, eval_iters=1, test_freq=1000, checkpoint_freq=1000)
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", "--config", str(config), "dataloader.num_workers=1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and time.monotonic() - started < 60
    assert "shard-2.parquet: row group 0 cannot be read" in r.stderr


DISK_FULL_AT_STEP_4 = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import torch, train
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if obj["step"] == 4:
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_full_disk_while_saving_is_one_line_and_exits(tmp_path, corpus):
    config = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2, test_freq=100)
    r = subprocess.run([sys.executable, "-c", DISK_FULL_AT_STEP_4, str(ROOT), "--config", str(config),
                        "dataloader.num_workers=1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("error: cannot write checkpoint for step 4 in ") and "unexpected pos 64 vs 0" in line
    assert "MiB free on its disk; earlier checkpoints are intact" in line
    [run] = (tmp_path / "ck").iterdir()
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_2.pt"] and not list(run.glob(".*tmp*"))


# ---- mistakes and states that used to show only hours in

def test_a_checkpoint_dir_that_cannot_be_written_stops_before_training(tmp_path, corpus, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    for where in ("taken", "taken/runs"):
        path = write_config(tmp_path, corpus, checkpoint_dir=str(tmp_path / where))
        assert train.main(["--config", str(path)]) == 1
        captured = capsys.readouterr()
        assert captured.err == (f"error: training.checkpoint_dir: {tmp_path / 'taken'} is a file, not a folder; "
                                f"set training.checkpoint_dir to a folder\n")
        assert "step 1/" not in captured.out
    if Path("/proc/self").is_dir():  # a folder no one can create files in, even root
        assert train.main(["--config", str(path), "training.checkpoint_dir=/proc/bdh/runs"]) == 1
        assert capsys.readouterr().err.startswith("error: training.checkpoint_dir: cannot create /proc/bdh/runs inside "
                                                  "/proc (")


def test_the_first_steps_are_logged_whatever_log_freq_says(tmp_path, corpus, capsys):
    """Of a resumed run too: its first step compiles, and is logged alone."""
    path = write_config(tmp_path, corpus, max_iters=12, log_freq=100, test_freq=100, checkpoint_freq=100)

    def logged():
        return [int(line.split()[1].split("/")[0]) for line in capsys.readouterr().out.splitlines()
                if line.startswith("step ") and "| loss" in line]
    assert train.main(["--config", str(path)]) == 0
    assert logged() == [1, 2, 5, 10, 12]
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=30"]) == 0
    assert logged() == [13, 14, 17, 22, 30]


def test_a_warmup_as_long_as_the_run_is_noted(tmp_path, corpus, capsys):
    assert train.main(["--config", str(write_config(tmp_path, corpus, max_iters=2, warmup_iters=4))]) == 0
    assert ("note: training.warmup_iters 4 >= max_iters 2: the learning rate rises to 0.005 of 0.01 and never "
            "decays") in capsys.readouterr().out
    assert train.main(["--config", str(write_config(tmp_path, corpus, max_iters=5, warmup_iters=4))]) == 0
    assert "warmup_iters" not in capsys.readouterr().out


SLOW_EVALUATION = """
import sys, time
sys.path.insert(0, sys.argv.pop(1))
import evaluation, train
real_validation_loss = evaluation.validation_loss
def validation_loss(*args):
    print("EVALUATING", flush=True)
    time.sleep(4)
    return real_validation_loss(*args)
evaluation.validation_loss = validation_loss
sys.exit(train.main(sys.argv[1:]))
"""


def test_ctrl_c_during_an_evaluation_is_acknowledged_at_once_and_its_step_logged(tmp_path, corpus):
    path = write_config(tmp_path, corpus, max_iters=100, test_freq=3, checkpoint_freq=100, log_freq=100)
    proc = subprocess.Popen([sys.executable, "-u", "-c", SLOW_EVALUATION, str(ROOT), "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("EVALUATING"):
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            break
    acknowledged = None
    for line in proc.stdout:
        lines.append(line)
        if "SIGINT: finishing the evaluation, then saving a checkpoint (Ctrl-C again to stop at once)" in line:
            acknowledged = time.monotonic() - sent
            break
    out, _ = proc.communicate(timeout=60)
    assert acknowledged is not None and acknowledged < 2, "".join(lines)
    assert proc.returncode == 0 and "stopped by SIGINT after step 3." in out  # no step after the evaluation
    assert list(losses(only_run(tmp_path / "ck"))) == [1, 2, 3]  # step 3, not a log step: its line all the same


HELD_SAVE = """
import os, sys, time
sys.path.insert(0, sys.argv.pop(1))
release = sys.argv.pop(1)
import train
real_save = train.save
def save(*args, **kwargs):  # the first save waits for the test to send its signals (30 s at most)
    print("SAVING", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
    return real_save(*args, **kwargs)
train.save = save
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("checkpoint_freq", [2, 1000])
def test_ctrl_c_while_saving_stops_after_the_checkpoint_even_twice(tmp_path, corpus, checkpoint_freq):
    """A periodic checkpoint (a Ctrl-C while it is written: it is the one, the run stops after it),
    or the one a first Ctrl-C asked for (a second Ctrl-C waits for it instead of losing it)."""
    path = write_config(tmp_path, corpus, max_iters=1000, test_freq=1000, checkpoint_freq=checkpoint_freq)
    release = tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-u", "-c", HELD_SAVE, str(ROOT), str(release), "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    signals = ["step 2/", "SAVING", "still saving"] if checkpoint_freq == 1000 else ["SAVING", "SIGINT: finishing"]
    lines = []
    for line in proc.stdout:  # a signal at each of these lines; the last one acknowledges the last signal
        lines.append(line)
        if line.strip().startswith(signals[0]):
            signals.pop(0)
            if not signals:
                break
            proc.send_signal(signal.SIGINT)
    release.touch()
    out, _ = proc.communicate(timeout=60)
    out = "".join(lines) + out
    assert proc.returncode == 0 and not signals, out
    step = int(re.search(r"stopped by SIGINT after step (\d+)\.", out)[1])
    [run] = run_dirs(tmp_path)
    assert [p.name for p in run.glob("checkpoint_*.pt")] == [f"checkpoint_{step}.pt"]
    assert max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()) == step
    if checkpoint_freq == 2:
        assert step == 2 and "SIGINT: finishing the checkpoint, then stopping\n" in out
    else:
        assert "still saving the checkpoint; the run stops right after it (kill -9 stops at once)" in out


def test_the_share_of_time_spent_waiting_for_batches_is_logged(tmp_path, corpus, capsys, monkeypatch):
    real = train.train_loader

    def slow_loader(*args, **kwargs):
        for batch in real(*args, **kwargs):
            time.sleep(1.0)  # far longer than a step of the tiny model, even on a loaded machine
            yield batch

    monkeypatch.setattr(train, "train_loader", slow_loader)
    path = write_config(tmp_path, corpus, max_iters=2, test_freq=100)
    assert train.main(["--config", str(path)]) == 0
    assert "waiting for data" in capsys.readouterr().out
    [run] = (tmp_path / "ck").iterdir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.5 < r["data_wait"] <= 1 for r in records if "data_wait" in r) and len(records) >= 2


def test_a_cpu_run_of_many_hours_points_at_the_cpu_config(tmp_path, corpus, capsys, monkeypatch):
    real = train.train_loader

    monkeypatch.setattr(metrics, "SLOW_CPU_STEP_S", 0.1)

    def slow_loader(*args, **kwargs):  # 0.2 s a step: 20,000 steps take 67 minutes
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt  # seen what we came for: stop
            time.sleep(0.2)
            yield batch

    monkeypatch.setattr(train, "train_loader", slow_loader)
    path = write_config(tmp_path, corpus, max_iters=20000, test_freq=100000)
    assert train.main(["--config", str(path)]) == 130
    out = capsys.readouterr().out
    ms_per_step = float(re.search(r"step 2/20000 .*\| ([\d.]+) ms/step", out).group(1))
    hours = re.search(r"note: at this speed the run takes about ([\d.]+) hours on this CPU: model and batch are sized "
                      r"for a GPU; configs/tiny.yaml", out).group(1)
    assert abs(float(hours) - ms_per_step / 1000 * 20000 / 3600) < 0.051 and ms_per_step >= 200  # the loader's 0.2 s


def test_the_passes_over_the_training_data_are_counted(tmp_path, corpus, capsys):
    """The corpus's training split holds about 5,300 tokens: 64 per step, so a pass takes about 80 steps."""
    from data import ParquetBatches
    from shards import list_units
    from tokenizer import ByteTokenizer
    path = write_config(tmp_path, corpus, max_iters=200, log_freq=10, test_freq=1000, checkpoint_freq=1000)
    assert train.main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    [run] = (tmp_path / "ck").iterdir()
    epochs = [r["epochs"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epochs" in r]
    assert epochs == sorted(epochs) and epochs[0] < 0.2
    cfg = Config.from_yaml(path)
    one_pass = sum(1 for _ in ParquetBatches(list_units(corpus, "text"), "train", 16, 4, cfg.training.seed, 0.2, "text",
                                             2, ByteTokenizer(), shuffle=False))  # batches in one pass
    assert abs(epochs[-1] - 200 / one_pass) < 0.5
    assert "passes over the training data done: its documents are read again" in out and f"done: 200 steps ({epochs[-1]:.2f} passes" in out


def test_float16_steps_the_loss_scaler_skips_are_counted_not_averaged_into_the_grad_norm(tmp_path, corpus, capsys,
                                                                                         monkeypatch):
    """A scale of 2^40 overflows float16 gradients: the scaler skips the step and halves the scale,
    until about step 22. The skipped steps' infinite norms must not turn the logged mean into NaN."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *args, **kwargs: real(*args, init_scale=2.0 ** 40, **kwargs))
    path = write_config(tmp_path, corpus, max_iters=40, log_freq=20, checkpoint_freq=40, test_freq=40)
    assert train.main(["--config", str(path), "low_precision.compute_dtype=float16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"step 1/40 \| .* grad norm - \| .* \| 1 step\(s\) skipped by the float16 loss scaler", out)
    [run] = run_dirs(tmp_path)
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "train_loss" in r}
    assert steps[1]["grad_norm"] is None and steps[1]["skipped_steps"] == 1
    assert 0 < steps[40]["skipped_steps"] < 20 and math.isfinite(steps[40]["grad_norm"])  # steps 21 to 40


def test_a_ctrl_c_that_torch_wraps_in_its_own_error_still_stops_in_one_line(tmp_path, corpus, capsys, monkeypatch):
    def compiling(*args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:  # as torch._dynamo does: InternalTorchDynamoError from the interrupt
            raise RuntimeError("UnboundLocalError: cannot access local variable 'prior'") from e

    monkeypatch.setattr(train, "train", compiling)
    assert train.main(["--config", str(write_config(tmp_path, corpus))]) == 130
    assert capsys.readouterr().err == train.STOPPED_AT_ONCE + "\n"
    assert not train.interrupted(RuntimeError("another error"))
