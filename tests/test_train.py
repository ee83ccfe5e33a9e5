"""train.py end to end: the run directory, logging, signals, errors (resume: test_resume.py)."""
import ast
import errno
import json
import math
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

import data
import rundir
import runtime
import sample
import train
from checkpoint import load_checkpoint
from config import Config
from conftest import NEEDS_CUDA, ROOT, losses, only_run, run_dirs, write_config
from files import byte_amount, script_here
from model import BDH
from locate import RUN_CONFIG_HEADER, checkpoints_in
from positions import UNITS
from shards import DataError, list_units
from stopping import SAVING
from tokenizer import load_tokenizer
from validation import validation_batches


def test_run_directory_holds_resolved_config_checkpoints_and_metrics(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus)
    assert train.main(["--config", str(path), "training.batch_size=3"]) == 0
    out = capsys.readouterr().out
    assert "step 4/4" in out and "val loss" in out and "--- sample: validation text ---\n" in out
    assert "\n--- the model continues ---\n" in out
    units = list_units(corpus, "text")  # where the data comes from and where the runs go, resolved
    size, documents = byte_amount(sum(unit.text_bytes for unit in units)), sum(unit.num_rows for unit in units)
    assert (f"data {corpus.resolve()} (3 files, {len(units)} row groups, {documents} rows, {size} in its text column; "
            f"validation 20% of its documents (by text, split_seed 1337), measured on "
            f"2 x 3 windows taken across it) | tokenizer bytes | runs in {(tmp_path / 'ck').resolve()}\n") in out
    [run] = run_dirs(tmp_path)
    assert run.name.startswith("run_")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved == Config.from_yaml(path, ["training.batch_size=3"]).to_dict()
    assert (run / "config.yaml").read_text().splitlines()[1] == (  # what auto would resolve to elsewhere
        "# on this machine: training.device cpu, low_precision.compute_dtype float32, training.compile false")
    assert saved["training"]["batch_size"] == 3
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_2.pt", "checkpoint_4.pt"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]  # incl. before the dir existed
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert {"lr", "tokens_per_s", "ms_per_step", "elapsed_s"} <= set(records[0])
    best, best_step = min((r["val_loss"], r["step"]) for r in records if "val_loss" in r)
    assert (f"; best validation loss {best:.4f} (best.pt, of step {best_step}); final checkpoint "
            f"{run / 'checkpoint_4.pt'}\n") in out
    # and the command that trains it on: this one's settings, the run named, max_iters doubled
    train_on = (f"python {script_here('train.py')} --config {path} training.batch_size=3 training.max_iters=8 "
                f"training.resume_from_checkpoint={run}")
    assert out.endswith(f"the learning rate then rises again: its schedule runs to the new max_iters):\n  {train_on}\n")
    capsys.readouterr()
    assert train.main(train_on.split()[2:]) == 0
    assert "step 8/8" in capsys.readouterr().out


def test_a_run_without_config_names_the_default_it_trains(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setattr(train, "train", lambda *args, **kwargs: 0)
    monkeypatch.chdir(ROOT)
    assert train.main(["training.device=cpu"]) == 0
    assert capsys.readouterr().out.startswith("config config.yaml (no --config given: the default, sized for a GPU; ")
    assert train.main(["--config", str(write_config(tmp_path, corpus))]) == 0
    assert capsys.readouterr().out == ""


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
    # a run resumed from a checkpoint file of its run directory continues there: stopped before its first
    # checkpoint, it is resumed from the run (its newest checkpoint then), not from the file given
    monkeypatch.undo()
    assert train.main(["--config", str(path), "training.max_iters=2"]) == 0
    [run] = run_dirs(tmp_path)
    monkeypatch.setattr(train, "learning_rate", interrupt_at_step_3)
    capsys.readouterr()
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run / 'checkpoint_2.pt'}"]) == 130
    assert capsys.readouterr().err.endswith(f" training.resume_from_checkpoint={run}\n")


def test_leftovers_of_a_run_killed_while_writing_are_removed_and_said(tmp_path, corpus, capsys):
    killed = tmp_path / "ck" / "run_20000101_000000"  # killed while it wrote its first checkpoint
    killed.mkdir(parents=True)
    (killed / ".lock").write_text("x")
    (killed / "config.yaml").write_text(RUN_CONFIG_HEADER + "model: {}\n")
    (killed / ".checkpoint_5.pt.tmp999999999").write_bytes(b"partial")
    for file in killed.iterdir():
        os.utime(file, (time.time() - 120,) * 2)  # (an empty run touched in the last minute may be filling)
    assert train.main(["--config", str(write_config(tmp_path, corpus, max_iters=2))]) == 0
    out = capsys.readouterr().out
    assert "removed 1 temporary file(s) left by an interrupted checkpoint write\n" in out
    assert "removed run_20000101_000000: empty, left by a run killed during its first checkpoint\n" in out
    assert not killed.exists()


def test_the_unmeasured_validation_note_is_for_a_new_run_and_records_say_whether_4bit_weights_were_measured(
        tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setattr(train, "unmeasured_validation", lambda *args: "note: NOT MEASURED")
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path)]) == 0
    assert "note: NOT MEASURED\n" in capsys.readouterr().out
    records = [json.loads(line) for line in (only_run(tmp_path / "ck") / "metrics.jsonl").read_text().splitlines()]
    assert [r["weights_4bit"] for r in records if "val_loss" in r] == [False]
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=3"]) == 0
    assert "NOT MEASURED" not in capsys.readouterr().out  # (said when the run began)


def test_missing_data_is_one_line_error(tmp_path, capsys):
    path = write_config(tmp_path, tmp_path / "no-such-dir")
    assert train.main(["--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_refused(tmp_path, corpus, capsys, monkeypatch):
    path = write_config(tmp_path, corpus, device="cuda")
    assert train.main(["--config", str(path)]) == 1
    assert "training.device: cuda requested but not available" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: refused before the ranks join, tagged all the same
    monkeypatch.setenv("RANK", "1")
    assert train.main(["--config", str(path)]) == 1
    assert capsys.readouterr().err.startswith("error (rank 1): training.device: cuda requested but not available")


def test_data_loader_workers_train(tmp_path, corpus):
    path = write_config(tmp_path, corpus, max_iters=3, checkpoint_freq=3)
    assert train.main(["--config", str(path), "dataloader.num_workers=2"]) == 0
    [run] = run_dirs(tmp_path)
    ckpt = load_checkpoint(run / "checkpoint_3.pt")
    assert [p["reader"] for p in ckpt.data_positions] == [0, 1] and ckpt.batches_consumed == 3  # both took turns


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc")
def test_loader_workers_are_forked_before_the_model_and_without_the_resumed_checkpoint(tmp_path, corpus, monkeypatch):
    """Forked later, on CPU, a worker would keep the pages of the weights and moments it was forked with as the
    steps rewrite them (a copy of each), and the checkpoint's mapping (its disk space, once keep_last_n deletes it)."""
    path = write_config(tmp_path, corpus, max_iters=2, checkpoint_freq=2)
    assert train.main(["--config", str(path), "dataloader.num_workers=1"]) == 0
    [run] = run_dirs(tmp_path)
    checkpoint = str(run / "checkpoint_2.pt")
    events = []

    def noting(name, function):
        def noted(*args, **kwargs):
            events.append((name, any(checkpoint in line for line in Path("/proc/self/maps").read_text().splitlines())))
            return function(*args, **kwargs)
        return noted
    monkeypatch.setattr(train, "train_loader", noting("loader", train.train_loader))
    monkeypatch.setattr(train, "build_model", noting("model", train.build_model))
    monkeypatch.setattr(train, "load_saved_state", noting("weights", train.load_saved_state))
    assert train.main(["--config", str(path), "dataloader.num_workers=1", "training.max_iters=3",
                       f"training.resume_from_checkpoint={run}"]) == 0
    assert events == [("loader", False), ("model", False), ("weights", False)]
    assert [p["step"] for p in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in p] == [1, 2, 3]


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


def test_accumulated_micro_batches_give_the_gradient_of_their_mean_loss(tmp_path, corpus):
    """As one batch of their size: its norm (logged, and what grad_clip clips) is not multiplied by the
    steps accumulated (the windows of the two runs differ a little)."""
    path = write_config(tmp_path, corpus, max_iters=2, test_freq=100, checkpoint_freq=2, log_freq=1)
    norms = []
    for batch, steps in ((8, 1), (4, 2), (2, 4)):
        folder = tmp_path / f"ck{steps}"
        assert train.main(["--config", str(path), f"training.batch_size={batch}",
                           f"training.gradient_accumulation_steps={steps}", f"training.checkpoint_dir={folder}"]) == 0
        [run] = folder.glob("run_*")
        norms.append([json.loads(line)["grad_norm"] for line in (run / "metrics.jsonl").read_text().splitlines()
                      if "grad_norm" in line])
    for accumulated in norms[1:]:
        assert accumulated == pytest.approx(norms[0], rel=0.1)


def test_non_finite_loss_stops_without_saving_a_nan_model(tmp_path, corpus, monkeypatch, capsys):
    path = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2)
    real = train.learning_rate
    monkeypatch.setattr(train, "learning_rate", lambda step, t: float("nan") if step == 3 else real(step, t))
    assert train.main(["--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"not finite at step 4 (nothing saved; the last good checkpoint is {run_dirs(tmp_path)[0]}/checkpoint_2.pt)" \
        in err and "float16" not in err
    assert "lower training.learning_rate (now 0.01) or training.grad_clip (now 1.0), or use training.debug" in err
    [run] = run_dirs(tmp_path)
    assert [p.name for p in run.glob("checkpoint_*.pt")] == ["checkpoint_2.pt"]
    monkeypatch.setattr(train, "learning_rate", lambda step, t: float("inf") if step == 1 else real(step, t))
    assert train.main(["--config", str(path), "low_precision.compute_dtype=float16"]) == 1
    err = capsys.readouterr().err
    assert "not finite at step 2 (no checkpoint was saved): " in err and "in float16, activations past 65,504 overflow" in err
    # the step that saves made the weights NaN, its loss (before the update) finite: the weights are checked too
    monkeypatch.setattr(train, "learning_rate", lambda step, t: float("nan") if step == 2 else real(step, t))
    for test_freq in (2, 4):  # checked before the evaluation; at a step that saves without one, before the save
        folder = tmp_path / f"ck_test_freq_{test_freq}"
        assert train.main(["--config", str(path), f"training.checkpoint_dir={folder}",
                           f"training.test_freq={test_freq}"]) == 1
        assert "error: a weight is not finite at step 2 (no checkpoint was saved)" in capsys.readouterr().err
        assert not list(folder.glob("run_*/checkpoint_*.pt"))


def test_a_shard_that_fails_mid_run_saves_the_steps_before_and_names_the_checkpoint(tmp_path, corpus, monkeypatch,
                                                                                   capsys):
    real = train.train_loader

    def fail_at_batch(n):  # a shard damaged after the start's checks: its n-th batch fails
        def failing_loader(*args, **kwargs):
            batches = iter(real(*args, **kwargs))
            for _ in range(n - 1):
                yield next(batches)
            raise DataError("data/a.parquet: row group 3 cannot be read (Corrupt snappy compressed data.)")
        return failing_loader

    def error(run, step, saved):
        return (f"error: data/a.parquet: row group 3 cannot be read (Corrupt snappy compressed data.) (at step {step}; "
                f"the last checkpoint is {run / f'checkpoint_{saved}.pt'}: resume from it once the data is fixed)\n")

    path = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2, test_freq=100, gradient_accumulation_steps=2)
    monkeypatch.setattr(train, "train_loader", fail_at_batch(9))  # step 5's first batch: step 4 is saved already
    assert train.main(["--config", str(path)]) == 1
    [regular] = run_dirs(tmp_path)
    captured = capsys.readouterr()
    assert captured.err == error(regular, 5, 4) and captured.out.count(f"saved {regular / 'checkpoint_4.pt'}") == 1

    # step 5's second batch, with step 4 not saved: saved now, as a regular checkpoint has it (the random
    # state before step 5's first batch drew its dropout masks; the line of the steps not logged yet, without
    # step 5's first batch); keep_last_n applies
    monkeypatch.setattr(train, "train_loader", fail_at_batch(10))
    assert train.main(["--config", str(path), "training.checkpoint_freq=3", "training.keep_last_n=1",
                       "training.log_freq=100", f"training.checkpoint_dir={tmp_path}/b"]) == 1
    [run] = (tmp_path / "b").glob("run_*")
    captured = capsys.readouterr()
    assert f"saved {run / 'checkpoint_4.pt'}\n" in captured.out and captured.err == error(run, 5, 4)
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_4.pt"]
    on_error, expected = load_checkpoint(run / "checkpoint_4.pt"), load_checkpoint(regular / "checkpoint_4.pt")
    for field in ("step", "tokens", "batches_consumed", "data_positions", "passes", "best_val_loss"):
        assert getattr(on_error, field) == getattr(expected, field), field
    listed = on_error.data_order.pop(UNITS), expected.data_order.pop(UNITS)  # (a tensor)
    assert on_error.data_order == expected.data_order and torch.equal(*listed)
    assert all(torch.equal(on_error.model[k], expected.model[k]) for k in expected.model)
    assert all(torch.equal(a, b) for a, b in zip(on_error.rng[0].values(), expected.rng[0].values())
               if torch.is_tensor(a)) and on_error.rng[0]["numpy"] == expected.rng[0]["numpy"]
    logged = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert list(logged) == [1, 2, 3, 4]  # 3: a checkpoint's step; 4: the steps since, logged before saving
    # step 4 alone in both lines (regular: log_freq 1 in the test config)
    assert logged[4]["train_loss"] == losses(regular)[4]

    def no_room(obj, f, *args, **kwargs):  # that save fails too: both are said
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(rundir.torch, "save", no_room)
    assert train.main(["--config", str(path), "training.checkpoint_freq=6", f"training.checkpoint_dir={tmp_path}/c"]) == 1
    assert capsys.readouterr().err.startswith(
        "error: data/a.parquet: row group 3 cannot be read (Corrupt snappy compressed data.) (at step 5; no checkpoint "
        "was saved); saving step 4 failed too: cannot write checkpoint for step 4 in ")


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
                   f"model, or set training.activation_checkpointing=true; then resume with `python "
                   f"{script_here('train.py')} --config {path} training.resume_from_checkpoint={only_run(tmp_path / 'ck')}` "
                   f"and the new setting\n")
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


def test_debug_logs_every_step_detects_anomalies_and_prints_the_first_batch(tmp_path, corpus, monkeypatch, capsys):
    anomaly_detection = []
    monkeypatch.setattr(torch.autograd, "set_detect_anomaly", anomaly_detection.append)
    path = write_config(tmp_path, corpus, log_freq=100, max_iters=4, test_freq=4, checkpoint_freq=4)
    assert train.main(["--config", str(path)]) == 0
    assert anomaly_detection == [False] and "step 3/4" not in capsys.readouterr().out
    assert train.main(["--config", str(path), "training.debug=true", f"training.checkpoint_dir={tmp_path}/debug",
                       "training.gradient_accumulation_steps=2"]) == 0
    out = capsys.readouterr().out
    assert anomaly_detection == [False, True] and "step 3/4" in out
    # the first window of the first batch (once, not each micro-batch's), as text: 16 bytes of the corpus's
    # documents ("<ff-rrr>abcdefghij...")
    assert out.count("first batch (") == 1
    [start] = re.findall(r"\nfirst batch \(4, 16\), its first window's start: ('.*')\n", out)
    assert len(ast.literal_eval(start)) == 16 and set(ast.literal_eval(start)) <= set("<>-0123456789abcdefghij\0")


def test_grad_clip_scales_the_step_and_0_leaves_the_gradients_as_they_are(tmp_path, corpus):
    weights = {}
    for clip in (0.0, 1000.0, 1e-6):  # none; above the gradient norm (nothing to clip); far below it
        path = write_config(tmp_path, corpus, max_iters=1, test_freq=100, grad_clip=clip,
                            checkpoint_dir=str(tmp_path / f"ck{clip}"))
        assert train.main(["--config", str(path), "logging.tensorboard=false"]) == 0
        [checkpoint] = (tmp_path / f"ck{clip}").glob("run_*/checkpoint_1.pt")
        weights[clip] = load_checkpoint(checkpoint).model
    assert all(torch.equal(weights[0.0][name], weights[1000.0][name]) for name in weights[0.0])
    assert not any(torch.equal(weights[0.0][name], weights[1e-6][name]) for name in ("encoder", "decoder", "lm_head"))


def test_bits_per_byte_is_the_loss_over_the_bytes_of_the_targets(tmp_path, corpus, bpe_file, capsys):
    for tokens, extra in (("bytes", {}), ("bpe", {"tokenizer": str(bpe_file)})):
        path = write_config(tmp_path, corpus, f"{tokens}.yaml", max_iters=2, test_freq=2,
                            checkpoint_dir=str(tmp_path / tokens), model={"vocab_size": 320}, dataset=extra)
        assert train.main(["--config", str(path)]) == 0
        assert "does not give the text back" not in capsys.readouterr().out  # both keep every byte
        [run] = (tmp_path / tokens).iterdir()
        [record] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
        n_bytes, n_tokens = validation_bytes_and_tokens(path)  # ASCII text: decoding counts the bytes exactly
        expected = record["val_loss"] * n_tokens / n_bytes / math.log(2)
        assert record["val_bits_per_byte"] == pytest.approx(expected, rel=1e-9)
        if tokens == "bytes":
            assert n_tokens == n_bytes
        else:
            assert n_bytes > 1.5 * n_tokens


def test_a_tokenizer_that_loses_text_is_warned_of_at_startup(tmp_path, corpus, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # and no decoder: the tokenizers quicktour's
    tok.train_from_iterator(["<00-001>abc some words, and more words."],
                            trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<|endoftext|>"]))
    tok.save(str(tmp_path / "lossy.json"))
    path = write_config(tmp_path, corpus, max_iters=1, dataset={"tokenizer": str(tmp_path / "lossy.json")})
    assert train.main(["--config", str(path)]) == 0
    warning = f"WARNING: dataset.tokenizer {tmp_path / 'lossy.json'} does not give the text back: "
    out = capsys.readouterr().out
    assert warning in out and "bits per byte counts the bytes it gives back (compare them between runs" in out
    assert f"note: model.vocab_size 256 is larger than the 35 tokens of dataset.tokenizer {tmp_path / 'lossy.json'}" in out
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=2"]) == 0
    assert "note: model.vocab_size" not in capsys.readouterr().out  # a resume cannot change it: no advice to


@pytest.mark.parametrize("problem,overrides,message", [
    ("missing", ["dataset.tokenizer=nope.json"],
     "error: dataset.tokenizer: nope.json does not exist (relative paths start from the current directory"),
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


def test_keep_last_n_and_best_checkpoint(tmp_path, corpus, monkeypatch, capsys):
    config = write_config(tmp_path, corpus, max_iters=8, checkpoint_freq=2, test_freq=1, keep_last_n=2)
    val_losses = [3.0, 2.5, 1.0, 2.0, 1.5, 4.0, 5.0, 6.0]  # the best is not the last, nor at a checkpoint's step
    losses, real_evaluate = iter(val_losses), train.evaluate

    def evaluate(*args):
        return {**real_evaluate(*args), "val_loss": next(losses)}
    monkeypatch.setattr(train, "evaluate", evaluate)
    assert train.main(["--config", str(config)]) == 0
    run = only_run(tmp_path / "ck")
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_6.pt", "checkpoint_8.pt"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["val_loss"] for r in records if "val_loss" in r} == dict(enumerate(val_losses, start=1))
    best = load_checkpoint(run / "best.pt")
    assert (best.step, best.best_val_loss) == (3, 1.0)
    out = capsys.readouterr().out
    step_3 = out[out.index("step 3/8"):out.index("step 4/8")]  # best.pt alone, said
    assert f"saved {run / 'best.pt'} (best validation loss so far)\n" in step_3 and "checkpoint_" not in step_3


def test_a_validation_loss_that_is_not_a_number_is_never_the_best(tmp_path, corpus, monkeypatch, capsys):
    config = write_config(tmp_path, corpus, max_iters=8, checkpoint_freq=8, test_freq=2)
    losses, real_evaluate = iter([math.nan, 2.0, math.nan, 3.0]), train.evaluate  # (float16 overflowed, say)
    monkeypatch.setattr(train, "evaluate", lambda *args: {**real_evaluate(*args), "val_loss": next(losses)})
    assert train.main(["--config", str(config)]) == 0
    best = load_checkpoint(only_run(tmp_path / "ck") / "best.pt")
    assert (best.step, best.best_val_loss) == (4, 2.0)
    assert capsys.readouterr().out.count("note: the validation loss is not a number: not taken as the best\n") == 2
    losses = iter([math.nan] * 4)
    assert train.main(["--config", str(config), "low_precision.compute_dtype=float16"]) == 0
    assert ("note: the validation loss is not a number: not taken as the best; in float16, activations past "
            "65,504 overflow: compute_dtype bfloat16 (Ampere and newer GPUs) or float32 has the range\n"
            ) in capsys.readouterr().out


def test_the_weights_are_checked_once_at_a_step_that_evaluates_and_saves(tmp_path, corpus, monkeypatch):
    checked, real = [], train.local_tensor  # (check_weights reads each parameter through it)
    monkeypatch.setattr(train, "local_tensor", lambda p: checked.append(p) or real(p))
    assert train.main(["--config", str(write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=2,
                                                    test_freq=2))]) == 0
    assert len(checked) == 2 * 5  # steps 2 and 4, five parameters each


def test_a_best_at_a_checkpoint_step_is_serialized_once_and_the_checkpoint_copies_it(tmp_path, corpus, monkeypatch,
                                                                                     capsys):
    """best.pt first, then checkpoint_<step>.pt as a copy of its bytes: a file of its own (a script that
    rewrites best.pt leaves the checkpoint alone); a best at a step without a checkpoint is written alone."""
    config = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=4, test_freq=2, keep_last_n=0)
    losses, real_evaluate = iter([2.0, 1.0]), train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *args: {**real_evaluate(*args), "val_loss": next(losses)})
    serialized, real_save, real_paused, doing = [], rundir.torch.save, train.paused, []

    @contextmanager
    def timed(step_log, stop, what, device):  # what the ETA counts the time as
        with real_paused(step_log, stop, what, device):
            doing.append(what)
            yield
            doing.pop()
    monkeypatch.setattr(train, "paused", timed)
    monkeypatch.setattr(rundir.torch, "save", lambda obj, f: serialized.append((Path(f.name).name.split(".tmp")[0],
                                                                                 doing[-1])) or real_save(obj, f))
    assert train.main(["--config", str(config)]) == 0
    run = only_run(tmp_path / "ck")
    assert serialized == [(".best.pt", SAVING), (".best.pt", SAVING)]  # steps 2 and 4: as checkpoints, not evaluations
    assert f"saved {run / 'best.pt'} (best validation loss so far)\nsaved {run / 'checkpoint_4.pt'} (a copy of " \
           f"best.pt)\n" in capsys.readouterr().out
    assert (run / "best.pt").read_bytes() == (run / "checkpoint_4.pt").read_bytes()
    assert not os.path.samefile(run / "best.pt", run / "checkpoint_4.pt")
    assert load_checkpoint(run / "best.pt").best_val_loss == 1.0
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


def test_a_disk_with_less_room_than_a_checkpoint_is_warned_of_at_the_start(tmp_path, corpus, monkeypatch, capsys):
    config = write_config(tmp_path, corpus, max_iters=2)
    weights = sum(p.numel() * 4 for p in BDH(Config.from_yaml(config).to_bdh_config()).parameters())
    real_usage = rundir.shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda folder: real_usage(folder)._replace(free=2 * weights))
    assert train.main(["--config", str(config)]) == 0  # weights and two moments: 3 x
    assert (f"WARNING: {2 * weights / 2**20:,.1f} MiB free on the disk of {tmp_path}, and a checkpoint takes about "
            f"{3 * weights / 2**20:,.1f} MiB: the first checkpoint would fail") in capsys.readouterr().out
    run = only_run(tmp_path / "ck")
    size = (run / "checkpoint_2.pt").stat().st_size  # a resume: the checkpoint's own size
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda folder: real_usage(folder)._replace(free=size))
    assert train.main(["--config", str(config), "training.resume_from_checkpoint=latest", "training.max_iters=3"]) == 0
    assert f"a checkpoint takes about {size / 2**20:,.1f} MiB" in capsys.readouterr().out
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda folder: real_usage(folder)._replace(free=2 * size))
    assert train.main(["--config", str(config), "training.resume_from_checkpoint=latest", "training.max_iters=4"]) == 0
    assert "MiB free on the disk" not in capsys.readouterr().out


# ---- every error path ends the process within seconds, whatever the workers

def corrupt_last_shard(corpus):
    """shard-2's pages destroyed, its footer intact: the run starts, and a loader reading it fails."""
    path = corpus / "shard-2.parquet"
    raw = bytearray(path.read_bytes())
    raw[4:400] = b"\0" * 396
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_data_error_in_the_loader_exits_at_once(tmp_path, corpus, num_workers, capfd, monkeypatch):
    """With workers, train.py as a command: workers left running would keep it from exiting (past
    the subprocess's timeout)."""
    corrupt_last_shard(corpus)  # validation (eval_iters 1) reads shard-0 only; training reaches shard-2
    config = write_config(tmp_path, corpus, max_iters=1000, eval_iters=1, test_freq=1000, checkpoint_freq=1000)
    one_unit_pools = "import data; data.POOL_BYTES = 1"  # a unit at a time: shard-2 is reached after some steps
    if num_workers:
        command = f"{one_unit_pools}; import sys, train; sys.exit(train.main(sys.argv[1:]))"
        r = subprocess.run([sys.executable, "-c", command, "--config", str(config),
                            f"dataloader.num_workers={num_workers}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        returncode, err = r.returncode, r.stderr
    else:
        monkeypatch.setattr(data, "POOL_BYTES", 1)
        returncode, err = train.main(["--config", str(config)]), capfd.readouterr().err
    [line] = err.strip().splitlines()
    match = re.fullmatch(
        re.escape(f"error: {corpus / 'shard-2.parquet'}: row group 0 cannot be read (Couldn't deserialize thrift: "
                  f"TProtocolException: Invalid data); the file is corrupt or truncated: re-create it (at step ")
        + r"(\d+); the last checkpoint is (.*): resume from it once the data is fixed\)", line)
    assert returncode == 1 and match, line
    step, saved = int(match[1]), Path(match[2])  # the steps before the failing one: saved
    assert saved.name == f"checkpoint_{step - 1}.pt" and load_checkpoint(saved).step == step - 1


def test_a_data_error_under_torchrun_ends_every_rank(tmp_path, corpus):
    corrupt_last_shard(corpus)
    config = write_config(tmp_path, corpus, max_iters=1000, eval_iters=1, test_freq=1000, checkpoint_freq=1000)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", "--config", str(config), "dataloader.num_workers=1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0  # (the other rank, left waiting, would outlast the timeout: 600 s by default)
    assert "shard-2.parquet: row group 0 cannot be read" in r.stderr


def test_a_full_disk_while_saving_is_one_line_and_exits(tmp_path, corpus, monkeypatch, capfd):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if obj["step"] == 4:
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    config = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2, test_freq=100)
    assert train.main(["--config", str(config), "dataloader.num_workers=1"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith("error: cannot write checkpoint for step 4 in ") and "unexpected pos 64 vs 0" in line
    assert "MiB free on its disk, the checkpoint takes " in line and line.endswith(
        f"; earlier checkpoints are intact: once that is fixed, resume with `python {script_here('train.py')} --config "
        f"{config} dataloader.num_workers=1 training.resume_from_checkpoint={only_run(tmp_path / 'ck')}`")
    [run] = (tmp_path / "ck").iterdir()
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_2.pt"] and not list(run.glob(".*tmp*"))
    assert train.main(["--config", str(config), "training.checkpoint_freq=4"]) == 1  # its first checkpoint
    assert capfd.readouterr().err.strip().endswith("MiB; no checkpoint was saved before")
    # a best.pt before the first checkpoint: the run resumes from it
    assert train.main(["--config", str(config), "training.checkpoint_freq=4", "training.test_freq=2"]) == 1
    run = run_dirs(tmp_path)[-1]
    assert capfd.readouterr().err.strip().endswith(
        f"MiB; earlier checkpoints are intact: once that is fixed, resume with `python {script_here('train.py')} "
        f"--config {config} training.checkpoint_freq=4 training.test_freq=2 training.resume_from_checkpoint={run}`")
    assert load_checkpoint(run / "best.pt").step == 2


def test_a_best_step_whose_checkpoint_fails_after_best_pt_resumes_from_best_pt(tmp_path, corpus, monkeypatch, capfd):
    def full(*args):  # the checkpoint's copy of best.pt
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(rundir.shutil, "copyfileobj", full)
    config = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2, test_freq=2)
    assert train.main(["--config", str(config)]) == 1
    run = only_run(tmp_path / "ck")
    assert capfd.readouterr().err.strip().endswith(
        f"MiB; best.pt of this step is saved: once that is fixed, resume with `python "
        f"{script_here('train.py')} --config {config} training.resume_from_checkpoint={run}`")
    assert load_checkpoint(run / "best.pt").step == 2 and not checkpoints_in(run)


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
        assert train.main(["--config", str(path), "training.checkpoint_dir=/proc"]) == 1  # the folder itself
        assert capsys.readouterr().err.startswith("error: training.checkpoint_dir: cannot create files in /proc (")


def test_a_warmup_as_long_as_the_run_is_noted(tmp_path, corpus, capsys):
    assert train.main(["--config", str(write_config(tmp_path, corpus, max_iters=2, warmup_iters=4))]) == 0
    assert ("note: training.warmup_iters 4 >= max_iters 2: the learning rate rises only to 0.005 (learning_rate "
            "0.01) and never decays") in capsys.readouterr().out
    assert train.main(["--config", str(write_config(tmp_path, corpus, max_iters=4, warmup_iters=4))]) == 0
    assert "the learning rate rises to 0.01 at the last step and never decays" in capsys.readouterr().out
    assert train.main(["--config", str(write_config(tmp_path, corpus, max_iters=5, warmup_iters=4))]) == 0
    assert "warmup_iters" not in capsys.readouterr().out
