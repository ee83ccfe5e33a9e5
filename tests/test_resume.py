"""resume.py through train.py: a run continues where its checkpoint left it, exactly (also after
kill -9 at any moment), across changed settings it names, and refuses what cannot continue."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import data
import export
import sample
import train
from checkpoint import load_checkpoint
from config import Config
from conftest import (DEVICES, ROOT, losses, make_corpus, only_run, run_dirs, start, write_config,
                      write_parquet)
from distributed import Ranks
from evaluation import validation_fingerprint
from resume import (Progress, checkpoint_size, launcher, load_saved_state, resolve_auto, resume_command_for, rng_state,
                    set_rng_state, state_notes, with_max_iters, without_unused_checkpoint_dir)
from locate import checkpoints_in, open_checkpoint
from runtime import tensor_bytes
from tokenizer import load_tokenizer
from validation import validation_batches


def test_what_the_run_s_command_line_gave_is_given_again_and_a_new_run_beside_a_stopped_one_says_so(
        tmp_path, corpus, capsys):
    """The two ways a crash costs hours: a resume that forgot the run's overrides, and the same command run
    again, which starts afresh (and `latest` then finds the new run). A config file edited since is a change."""
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=2, test_freq=100)
    started = ["--config", str(path), "training.learning_rate=0.003", "training.max_iters=6"]
    assert train.main(started) == 0
    [run] = run_dirs(tmp_path)
    for after_step_4 in ("checkpoint_6.pt", "best.pt"):  # as if killed after step 4's checkpoint
        (run / after_step_4).unlink()
    capsys.readouterr()
    # (this config's max_iters, 4, would have nothing left to do: the run's own, 6, has)
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest"]) == 1
    assert (f"{run / 'checkpoint_4.pt'}: the run was given training.learning_rate=0.003 training.max_iters=6 on its "
            f"command line, and this command leaves them out (the config file has 0.01, 4): add them to resume the "
            f"run as it was") in capsys.readouterr().err
    assert train.main(started) == 0
    assert (f"note: the newest run in {tmp_path / 'ck'} stopped at step 4 of 6; this starts a new run (to continue that "
            f"one instead: training.resume_from_checkpoint={run})\n") in capsys.readouterr().out
    write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2, test_freq=100, learning_rate=0.002)  # edited
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run}"]) == 0
    assert "config changed: training.learning_rate: 0.003 -> 0.002" in capsys.readouterr().out
    resumed = load_checkpoint(run / "checkpoint_6.pt")
    assert resumed.config["training"]["learning_rate"] == 0.002
    assert resumed.command_line["settings"] == {"training.max_iters": 6}  # still the run's: carried for the next resume


def test_resume_continues_at_the_next_step_in_the_same_directory(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    original = (run / "config.yaml").read_text()
    capsys.readouterr()
    ckpt2 = run / "checkpoint_2.pt"
    assert 0 < load_checkpoint(ckpt2).seconds < 600
    torch.save({**torch.load(ckpt2, weights_only=True), "seconds": 3600.0}, ckpt2)  # an hour trained before
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={ckpt2}",
                       "training.max_iters=6", "training.log_freq=2"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {ckpt2} at step 3" in out and f"| continues in {run.resolve()}\n" in out
    assert "step 3/6" in out and "step 1/6" not in out and "step 2/6" not in out
    assert re.search(r"\ndone: 6 steps \([\d.]+ passes over the training data\), the last 4 in this process in "
                     r"0:0\d:\d\d \(the whole run: 1:0\d:\d\d\)", out)
    assert 3600 < load_checkpoint(run / "checkpoint_6.pt").seconds < 4200  # the run's time, to that checkpoint
    assert "config changed: training.max_iters: 4 -> 6" in out
    assert "is not used" not in out
    assert run_dirs(tmp_path) == [run]
    assert (run / "config.yaml").read_text() == original
    assert yaml.safe_load((run / "config_resume_2.yaml").read_text())["training"]["max_iters"] == 6
    assert load_checkpoint(run / "checkpoint_6.pt").step == 6
    # a run directory and `latest` resolve to the newest checkpoint
    assert open_checkpoint(str(run), str(tmp_path / "ck"))[0] == run / "checkpoint_6.pt"
    assert open_checkpoint("latest", str(tmp_path / "ck"))[0] == run / "checkpoint_6.pt"
    # the next resume's changes are those from the config that wrote its checkpoint: a setting of the
    # earlier resume left out is named too
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=7"]) == 0
    changes = [line for line in capsys.readouterr().out.splitlines() if "config changed" in line]
    assert changes == ["  config changed: training.max_iters: 6 -> 7", "  config changed: training.log_freq: 2 -> 1"]
    # another checkpoint_dir on the command line (a separate run was meant): said, not taken
    elsewhere = tmp_path / "elsewhere"
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run}", "training.max_iters=8",
                       f"training.checkpoint_dir={elsewhere}"]) == 0
    out = capsys.readouterr().out
    assert (f"  training.checkpoint_dir {elsewhere} is not used: a resume continues in its run's directory, {run} (for a "
            f"separate run from this checkpoint, copy the checkpoint file out of the run directory and resume the "
            f"copy)\n") in out
    assert not elsewhere.exists() and load_checkpoint(run / "checkpoint_8.pt").step == 8
    assert "config changed: training.checkpoint_dir" not in out  # the run's records: where it is, not was told
    assert str(elsewhere) not in out.split("is not used")[1]  # nor the command that trains it on
    assert f"checkpoint_dir: {tmp_path / 'ck'}\n" in (run / "config_resume_7.yaml").read_text()
    assert load_checkpoint(run / "checkpoint_8.pt").config["training"]["checkpoint_dir"] == str(tmp_path / "ck")
    # another config file's checkpoint_dir (the default, say): taken as the run's folder too, without a word
    other = write_config(tmp_path, corpus, name="other.yaml", max_iters=9, checkpoint_dir=str(tmp_path / "other"))
    assert train.main(["--config", str(other), f"training.resume_from_checkpoint={run}"]) == 0
    assert "is not used" not in capsys.readouterr().out and not (tmp_path / "other").exists()
    assert load_checkpoint(run / "checkpoint_9.pt").config["training"]["checkpoint_dir"] == str(tmp_path / "ck")
    # an older checkpoint of the run, with another checkpoint_dir on the command line: a branch would take the run
    # over (a study's baseline, set aside): refused before anything moves
    before = sorted(p.name for p in run.iterdir())
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run / 'checkpoint_8.pt'}",
                       "training.max_iters=12", f"training.checkpoint_dir={elsewhere}"]) == 1
    assert (f"error: {run / 'checkpoint_8.pt'} (step 8) is not the newest checkpoint of its run, which went on to "
            f"checkpoint_9.pt: a resume from it continues in {run} as a new branch and sets the later checkpoints "
            f"aside, while training.checkpoint_dir {elsewhere} asks for another folder; for a run of its own there, "
            f"copy the checkpoint out (mkdir -p {elsewhere} && cp {run / 'checkpoint_8.pt'} {elsewhere}/) and resume "
            f"the copy; to branch in the run itself, leave training.checkpoint_dir out") in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before and not elsewhere.exists()


def test_a_checkpoint_the_config_file_names_is_refused_once_its_run_has_gone_on(tmp_path, corpus, capsys):
    """The config file pins checkpoint_2.pt and the run goes on from it; raising max_iters in the file
    and running again would branch from step 2 again and set steps 3-4 aside: refused, with both ways on.
    On the command line, the same name is a branch asked for."""
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["training"].update(resume_from_checkpoint=str(run / "checkpoint_2.pt"), max_iters=6)
    path.write_text(yaml.safe_dump(raw))
    assert train.main(["--config", str(path)]) == 0  # nothing after it yet: resumed (to checkpoints 4 and 6)
    raw["training"]["max_iters"] = 8
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert train.main(["--config", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"error: {path}: training.resume_from_checkpoint names {run / 'checkpoint_2.pt'} (step 2), and its run has "
        f"gone on to checkpoint_6.pt: a resume from it again would start a new branch and set the later checkpoints "
        f"aside; to continue the run, write its directory ({run}) there instead; to branch from step 2 on "
        f"purpose, give training.resume_from_checkpoint={run / 'checkpoint_2.pt'} on the command line\n")
    assert load_checkpoint(run / "checkpoint_6.pt").step == 6 and not list(run.glob("abandoned*"))
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run / 'checkpoint_2.pt'}"]) == 0
    assert "a new branch from step 2" in capsys.readouterr().out


def test_a_checkpoint_outside_a_run_directory_continues_in_a_new_one(tmp_path, corpus, capsys, monkeypatch):
    """A checkpoint copied elsewhere (downloads/, beside other files): the run continues exactly,
    but in a new run directory of checkpoint_dir; nothing is written into or pruned from that folder."""
    path = write_config(tmp_path, corpus, keep_last_n=0)
    assert train.main(["--config", str(path)]) == 0
    [straight] = run_dirs(tmp_path)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "notes.txt").write_text("mine")
    (downloads / "config.yaml").write_text((ROOT / "config.yaml").read_text())  # as in the repository's folder
    (downloads / "checkpoint_1.pt").write_bytes(b"an older download")
    (downloads / "checkpoint_2.pt").write_bytes((straight / "checkpoint_2.pt").read_bytes())
    before = {p.name: p.read_bytes() for p in downloads.iterdir()}
    capsys.readouterr()
    real_evaluate = train.evaluate  # worse than the checkpoint's best: the new directory gets a best.pt all the same
    monkeypatch.setattr(train, "evaluate", lambda *args: {**real_evaluate(*args), "val_loss": 99.0})
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={downloads / 'checkpoint_2.pt'}",
                       "training.keep_last_n=1"]) == 0
    out = capsys.readouterr().out
    assert (f"{downloads} is not a run directory (no config.yaml that a run wrote): the run continues in a new one "
            f"in") in out
    assert "config changed" not in out
    assert {p.name: p.read_bytes() for p in downloads.iterdir()} == before
    [new] = [run for run in run_dirs(tmp_path) if run != straight]
    assert (new / "best.pt").exists() and (new / "config.yaml").exists()
    resumed, expected = load_checkpoint(new / "checkpoint_4.pt"), load_checkpoint(straight / "checkpoint_4.pt")
    assert all(torch.equal(resumed.model[name], tensor) for name, tensor in expected.model.items())

    # a run directory that cannot be written (a read-only mount, another user's run): the same
    real_access = os.access
    monkeypatch.setattr("resume.os.access", lambda p, mode: Path(p) != straight and real_access(p, mode))
    written = sorted(straight.iterdir())
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={straight / 'checkpoint_2.pt'}"]) == 0
    assert f"{straight} cannot be written: the run continues in a new one in" in capsys.readouterr().out
    assert sorted(straight.iterdir()) == written and len(run_dirs(tmp_path)) == 3


def test_a_checkpoint_holds_the_run_and_a_resume_with_nothing_to_do_changes_nothing(tmp_path, corpus, capsys):
    """(The restored state itself: the SIGKILL tests and test_adamw4bit's exact resume.)"""
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=auto"]) == 0  # nothing to resume
    assert f"resume_from_checkpoint auto: no run with a checkpoint in {tmp_path / 'ck'} yet: a new run\n" in \
        capsys.readouterr().out
    [run] = run_dirs(tmp_path)
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["resume_from_checkpoint"] is None
    ckpt = load_checkpoint(run / "checkpoint_2.pt")
    assert set(ckpt.model) == {"embed.weight", "encoder", "encoder_v", "decoder", "lm_head"}
    assert ckpt.optimizer["state"] and ckpt.versions["torch"] == torch.__version__
    assert ckpt.config["training"]["max_iters"] == 2
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=auto",  # latest, as there is one
                       "training.max_iters=2", "training.block_size=8"]) == 0
    out = capsys.readouterr().out  # no warning of what would change, and best.pt stays
    assert out.startswith(f"nothing to do: the checkpoint {run / 'checkpoint_2.pt'} is at step 2 and ")  # no "resuming"
    assert "WARNING" not in out and "best.pt" not in out
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "checkpoint_2.pt"]
    older = tmp_path / "ck" / "run_20000101_000000"  # an older run that stopped early: maybe the one meant
    older.mkdir()
    stopped = torch.load(run / "checkpoint_2.pt", weights_only=True)
    stopped["config"]["training"]["max_iters"] = 5
    torch.save(stopped, older / "checkpoint_2.pt")
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=auto", "training.max_iters=2",
                       "training.block_size=8"]) == 0
    assert capsys.readouterr().out.endswith(f"note: an older run, {older}, stopped at step 2 of 5: to continue it, "
                                            f"training.resume_from_checkpoint={older}\n")
    shutil.rmtree(older)
    bare = tmp_path / "ck2" / "run_20300101_000000"  # a run folder without its config.yaml: not continued in place
    bare.mkdir(parents=True)
    shutil.copy(run / "checkpoint_2.pt", bare)
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=2",
                       "training.block_size=8", f"training.checkpoint_dir={tmp_path / 'ck2'}"]) == 0
    assert capsys.readouterr().out.startswith(f"nothing to do: the checkpoint {bare / 'checkpoint_2.pt'} is at step 2")
    # auto in a folder that does not exist yet, named much as one that holds runs: a new run, the typo told
    shutil.copytree(tmp_path / "ck", tmp_path / "checkpoints")
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=auto", "training.max_iters=1",
                       f"training.checkpoint_dir={tmp_path / 'checkpoint'}"]) == 0
    assert (f"auto: no run with a checkpoint in {tmp_path / 'checkpoint'} yet: a new run (did you mean "
            f"training.checkpoint_dir={tmp_path / 'checkpoints'}? It holds runs)\n") in capsys.readouterr().out


def test_a_resume_in_place_keeps_the_run_s_data_unless_the_command_line_gives_other_data(tmp_path, corpus, capsys):
    """The run was started with its data on the command line; a resume command without it would read
    the config file's folder instead, in the same run directory."""
    other = make_corpus(tmp_path / "other", n_files=2, docs_per_file=8)
    path = write_config(tmp_path, other, max_iters=2)
    assert train.main(["--config", str(path), f"dataset.parquet_dir={corpus}"]) == 0
    [run] = run_dirs(tmp_path)
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    resume = ["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=3"]
    assert train.main(resume) == 1
    err = capsys.readouterr().err
    newest = (f" (that run is the newest in training.checkpoint_dir {tmp_path / 'ck'}, which `latest` and `auto` "
              f"resume: to resume another, give its directory, or set training.checkpoint_dir to the folder that "
              f"holds it)\n")
    assert err.endswith(f"the run trained on dataset.parquet_dir {str(corpus)!r}, and this command reads {str(other)!r}: "
                        f"a resume continues on the run's data: add dataset.parquet_dir={corpus} (the run was given it "
                        f"on its command line), or, to train this run on {str(other)!r} from here, name "
                        f"the run on the command line with it: training.resume_from_checkpoint={run} "
                        f"dataset.parquet_dir={other}"
                        + newest) and err.count("\n") == 1
    # `latest` finds a run; other data on the command line may mean another experiment's run: refused the same way
    assert train.main([*resume, f"dataset.parquet_dir={other}"]) == 1
    assert capsys.readouterr().err == err
    assert sorted(p.name for p in run.iterdir()) == before  # nothing set aside, recorded or pruned
    moved = corpus.rename(tmp_path / "moved")  # the same shards elsewhere, named by the config file: the same data
    path.write_text(path.read_text().replace(str(other), str(moved)))
    assert train.main(resume) == 0 and "WARNING" not in capsys.readouterr().out
    named = ["--config", str(path), f"training.resume_from_checkpoint={run}", "training.max_iters=4"]
    assert train.main([*named, f"dataset.parquet_dir={other}"]) == 0  # the run named, other data said: taken
    assert "WARNING: the data order changes on this resume" in capsys.readouterr().out


def test_a_resume_that_left_out_both_settings_and_data_is_told_both_at_once(tmp_path, corpus, capsys):
    other = make_corpus(tmp_path / "other", n_files=2, docs_per_file=8)
    path = write_config(tmp_path, other, max_iters=2)
    assert train.main(["--config", str(path), f"dataset.parquet_dir={corpus}", "training.eval_iters=1"]) == 0
    [run] = run_dirs(tmp_path)
    capsys.readouterr()
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run}", "training.max_iters=3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'checkpoint_2.pt'}: the run was given training.eval_iters=1 on its command "
                          f"line, and this command leaves it out (the config file has 2): add it to resume the run as "
                          f"it was, or give the new value on the command line to change it; "
                          f"and the run trained on dataset.parquet_dir {str(corpus)!r}, and this command reads "
                          f"{str(other)!r}: a resume continues on the run's data: add dataset.parquet_dir={corpus} ")
    assert err.count("\n") == 1 and err.count(str(run / "checkpoint_2.pt")) == 1


def test_latest_continues_on_its_folder_written_otherwise_after_shards_were_added(tmp_path, corpus, capsys):
    """The data is the folder, wherever it is written from: data/x/ is data/x, new shards or not."""
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path), f"dataset.parquet_dir={corpus}"]) == 0
    make_corpus(corpus / "more", n_files=1, docs_per_file=8)
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=3",
                       f"dataset.parquet_dir={corpus}/"]) == 0
    assert "WARNING: the data order changes on this resume" in capsys.readouterr().out


def test_resume_refuses_a_different_model_shape(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path)]) == 0
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest",
                       "model.n_embd=64", "model.n_layer=3"]) == 1
    err = capsys.readouterr().err
    assert "different model shape; add model.n_layer=2 model.n_embd=32 to match it, or start a new run" in err
    assert "n_embd: checkpoint 32, config 64" in err
    assert "n_layer: checkpoint 2, config 3" in err and len(err.strip().splitlines()) == 1


def test_a_compiled_run_resumes_bit_for_bit_and_its_checkpoints_resume_plain(tmp_path, corpus, capsys, two_threads):
    """On CPU the compiled step adds the embedding's gradient from two threads: in a fixed order
    (runtime.compile_repeatably), or the resumed run would differ in the last bits."""
    path = write_config(tmp_path, corpus, max_iters=4, batch_size=16, block_size=32, test_freq=100, keep_last_n=0,
                        compile=True)
    assert train.main(["--config", str(path)]) == 0
    assert "compile True" in capsys.readouterr().out
    [run] = run_dirs(tmp_path)
    copy = tmp_path / "copy" / run.name  # a copy of the run directory continues in the copy
    copy.mkdir(parents=True)
    for name in ("config.yaml", "checkpoint_2.pt"):
        shutil.copy(run / name, copy / name)
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={copy / 'checkpoint_2.pt'}"]) == 0
    resumed, straight = load_checkpoint(copy / "checkpoint_4.pt"), load_checkpoint(run / "checkpoint_4.pt")
    assert all(torch.equal(resumed.model[name], tensor) for name, tensor in straight.model.items())
    for folder, first_step in ((run, 1), (copy, 3)):  # each process compiles in its first step: not a speed
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r.get("compiling")] == [first_step]
    # saved under the model's own names (not the compiled wrapper's), so a plain run resumes from them
    assert set(straight.model) == {"embed.weight", "encoder", "encoder_v", "decoder", "lm_head"}
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=5",
                       "training.compile=false"]) == 0
    assert load_checkpoint(run / "checkpoint_5.pt").step == 5


def test_checkpoint_of_version_0_1_still_resumes(tmp_path, corpus, capsys):
    """Version 0.1 keyed the optimizer state by position and kept one RNG state."""
    path = write_config(tmp_path, corpus, max_iters=2, test_freq=100)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    old = torch.load(run / "checkpoint_2.pt", weights_only=True)
    order = [name for group in old["optimizer"]["param_groups"] for name in group["params"]]
    old["optimizer"] = {"state": {order.index(n): s for n, s in old["optimizer"]["state"].items()},
                        "param_groups": [{**g, "params": [order.index(n) for n in g["params"]]}
                                         for g in old["optimizer"]["param_groups"]]}
    old["rng"] = old["rng"][0]
    tokens = old.pop("tokens")  # counted from version 0.4.0 on
    del old["seconds"]  # from 0.4.10 on
    torch.save(old, run / "checkpoint_2.pt")
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest",
                       "training.max_iters=3", "training.gradient_accumulation_steps=2"]) == 0
    assert "the whole run" not in capsys.readouterr().out  # not known: not guessed
    resumed = load_checkpoint(run / "checkpoint_3.pt")
    assert resumed.step == 3 and resumed.seconds is None
    assert resumed.tokens == 2 * tokens  # 2 steps at its batch, one of 2 batches


def test_a_checkpoint_whose_split_followed_the_training_seed_keeps_it_with_split_seed(tmp_path, corpus, capsys):
    """Before 0.4.6 training.seed also drew the validation documents: such a checkpoint's split is that seed's."""
    path = write_config(tmp_path, corpus, max_iters=2, test_freq=100)
    assert train.main(["--config", str(path), "training.seed=5", "dataset.split_seed=5"]) == 0  # as 0.4.5 split
    [run] = run_dirs(tmp_path)
    old = torch.load(run / "checkpoint_2.pt", weights_only=True)
    del old["config"]["dataset"]["split_seed"], old["data"]["order"]["dataset.split_seed"]
    old["versions"]["project"] = "0.4.5"
    torch.save(old, run / "checkpoint_2.pt")
    torch.save(old, tmp_path / "old.pt")
    capsys.readouterr()
    resume = ["--config", str(path), "training.seed=5", "training.max_iters=3", "training.resume_from_checkpoint=latest"]
    assert train.main(resume) == 1  # in its own directory the run keeps its split, unless the command line says
    assert (f"the run held out its validation documents by dataset.split_seed 5 (its training.seed drew them, as up "
            f"to version 0.4.5; this command has 1337): add dataset.split_seed=5 to keep them, or, to measure this run "
            f"on others from here, name the run on the command line with it: training.resume_from_checkpoint={run} "
            f"dataset.split_seed=1337") in capsys.readouterr().err
    assert train.main([*resume, "dataset.split_seed=1337"]) == 1  # found by `latest`, not named: perhaps another's
    assert f"name the run on the command line with it: training.resume_from_checkpoint={run} " in capsys.readouterr().err
    assert train.main([*resume, "dataset.split_seed=5"]) == 0
    out = capsys.readouterr().out
    assert "WARNING" not in out and "changed: dataset.split_seed" not in out, out  # (only max_iters changed)
    assert train.main(["--config", str(path), "training.seed=5", "training.max_iters=3",
                       f"training.resume_from_checkpoint={tmp_path / 'old.pt'}"]) == 0
    assert ("WARNING: the validation documents change on this resume (dataset.split_seed: 5 -> 1337): some of those "
            "held out now may have been trained on") in capsys.readouterr().out


def test_a_run_begun_before_split_by_resumes_holding_out_by_position(tmp_path, corpus, capsys):
    """Before 0.5.0 the split hashed a document's (file, row group, row): a resume of such a run keeps
    that split, saying so (by text, some documents trained on would be held out), unless the command
    line that names the run says otherwise; a change of shards then warns that the loss may read low."""
    path = write_config(tmp_path, corpus, max_iters=2, test_freq=100)
    assert train.main(["--config", str(path), "dataset.split_by=position"]) == 0  # as 0.4 split
    [run] = run_dirs(tmp_path)
    old = torch.load(run / "checkpoint_2.pt", weights_only=True)
    del old["config"]["dataset"]["split_by"], old["data"]["order"]["dataset.split_by"]
    del old["command_line"]["settings"]["dataset.split_by"]
    old["versions"]["project"] = "0.4.16"
    torch.save(old, run / "checkpoint_2.pt")
    torch.save(old, tmp_path / "old.pt")
    (run / "checkpoint_9.pt").write_bytes(b"cut short")  # skipped: the resume reads checkpoint_2.pt
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.max_iters=3", "training.resume_from_checkpoint=latest"]) == 0
    out = capsys.readouterr().out
    assert (f"note: the run of {run / 'checkpoint_2.pt'} held its validation documents out by their place in the "
            f"shards (file, row group, row), as every run did before version 0.5.0: so does this one, "
            f"dataset.split_by=position") in out
    assert "WARNING" not in out and "measured anew" not in out, out
    assert load_checkpoint(run / "checkpoint_3.pt").config["dataset"]["split_by"] == "position"
    for shard in sorted(corpus.iterdir()):
        shard.rename(corpus / f"renamed-{shard.name}")  # by position: re-drawn
    assert train.main(["--config", str(path), "training.max_iters=4", "training.resume_from_checkpoint=latest"]) == 0
    assert ("held out by their place in the shards (dataset.split_by=position, as runs before 0.5.0), some of those "
            "held out now may have been trained on") in capsys.readouterr().out
    assert train.main(["--config", str(path), "training.max_iters=5", f"training.resume_from_checkpoint={run}",
                       "dataset.split_by=text"]) == 0
    out = capsys.readouterr().out
    assert "place in the shards" not in out.split("WARNING")[0]  # (no note: the command line says)
    assert ("WARNING: the validation documents change on this resume (dataset.split_by: 'position' -> 'text'): some "
            "of those held out now may have been trained on") in out
    for shard in corpus.iterdir():
        shard.rename(corpus / shard.name.removeprefix("renamed-"))
    assert train.main(["--config", str(path), "training.max_iters=3",
                       f"training.resume_from_checkpoint={tmp_path}/old.pt",
                       "training.batch_size=2"]) == 0  # (a file of its own: another run)
    warning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING: the validation"))
    assert "(training.batch_size: 4 -> 2)" in warning and "split_by" not in warning  # the old run's split: position
    assert export.main(["--checkpoint", str(tmp_path / "old.pt"), "--out", str(tmp_path / "export")]) == 0
    config_json = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config_json["bdh_export"].pop("split_by") == "position"  # and an export before 0.5.0 does not say
    (tmp_path / "export" / "config.json").write_text(json.dumps(config_json))
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.max_iters=2", "training.checkpoint_dir=" + str(tmp_path / "ft"),
                       f"training.resume_from_checkpoint={tmp_path / 'export'}"]) == 0  # a fine-tune: a new run
    assert f"note: the run of {tmp_path / 'export'} held its validation documents out by" in capsys.readouterr().out
    assert load_checkpoint(only_run(tmp_path / "ft") / "checkpoint_2.pt").config["dataset"]["split_by"] == "position"
    assert train.main(["--config", str(path), "training.checkpoint_dir=" + str(tmp_path / "new")]) == 0  # by text
    assert export.main(["--checkpoint", str(only_run(tmp_path / "new")), "--out", str(tmp_path / "export_new")]) == 0
    assert json.loads((tmp_path / "export_new" / "config.json").read_text())["bdh_export"]["split_by"] == "text"
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.checkpoint_dir=" + str(tmp_path / "ft_new"),
                       f"training.resume_from_checkpoint={tmp_path / 'export_new'}"]) == 0
    assert "place in the shards" not in capsys.readouterr().out
    assert load_checkpoint(only_run(tmp_path / "ft_new") / "checkpoint_2.pt").config["dataset"]["split_by"] == "text"


def test_a_bpe_run_resumes_samples_with_its_tokenizer_and_refuses_another(tmp_path, corpus, bpe_file, capsys):
    path = write_config(tmp_path, corpus, max_iters=2, model={"vocab_size": 320}, dataset={"tokenizer": str(bpe_file)})
    assert train.main(["--config", str(path)]) == 0
    [run] = (tmp_path / "ck").iterdir()
    assert load_checkpoint(run / "checkpoint_2.pt").tokenizer == load_tokenizer(str(bpe_file)).to_str()
    bpe_file.unlink()  # the checkpoint carries its tokenizer
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(run), "--prompt", "<00-", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("<00-")
    bytes_run = [str(path), "dataset.tokenizer=bytes", "model.vocab_size=256", "training.resume_from_checkpoint=latest",
                 "training.max_iters=3"]
    assert train.main(["--config", *bytes_run]) == 1
    err = capsys.readouterr().err  # one message naming both settings, not the model shape first
    assert (f"checkpoint_2.pt: the model was trained with another tokenizer.json, not dataset.tokenizer bytes; set "
            f"dataset.tokenizer=DIR/tokenizer.json model.vocab_size=320, DIR being where `python export.py "
            f"--checkpoint {run / 'checkpoint_2.pt'} --out DIR` writes the one the checkpoint carries ({bpe_file} no "
            f"longer holds it); or start a new run") in err
    bpe_file.write_text(load_checkpoint(run / "checkpoint_2.pt").tokenizer)  # the file is back: it is named
    assert train.main(["--config", *bytes_run]) == 1
    assert (f"not dataset.tokenizer bytes; set dataset.tokenizer={bpe_file} model.vocab_size=320; or start a new "
            f"run") in capsys.readouterr().err


def test_resume_after_sigkill_is_bit_identical(tmp_path, corpus, bpe_file, capsys):
    """With 2 loader workers and a BPE (no workers and bytes: the test of kills at random moments)."""
    common = dict(max_iters=8, checkpoint_freq=4, test_freq=4, keep_last_n=0)
    workers = ["dataloader.num_workers=2", f"dataset.tokenizer={bpe_file}", "model.vocab_size=320"]
    straight = write_config(tmp_path, corpus, "straight.yaml", checkpoint_dir=str(tmp_path / "a"), **common)
    assert train.main(["--config", str(straight), *workers]) == 0  # in-process: the killed run is the subprocess
    killed = write_config(tmp_path, corpus, "killed.yaml", checkpoint_dir=str(tmp_path / "b"), **common)
    proc = start(killed, *workers)
    for line in proc.stdout:
        if line.startswith("saved") and "checkpoint_4.pt" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    capsys.readouterr()
    assert train.main(["--config", str(killed), *workers, "training.resume_from_checkpoint=latest"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "at step 5" in out and "WARNING" not in out
    a, b = only_run(tmp_path / "a"), only_run(tmp_path / "b")
    assert losses(a) == losses(b) and sorted(losses(b)) == list(range(1, 9))
    wa, wb = load_checkpoint(a / "checkpoint_8.pt").model, load_checkpoint(b / "checkpoint_8.pt").model
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_validation_batches_decide_whether_validation_changed(tmp_path, corpus, capsys):
    held_out = make_corpus(tmp_path / "held_out", n_files=1, docs_per_file=12, rows_per_group=4, doc_len=60)
    path = write_config(tmp_path, corpus, max_iters=2, dataset={"val_parquet_dir": str(held_out)})
    assert train.main(["--config", str(path)]) == 0
    moved = held_out.rename(tmp_path / "moved")  # the same files elsewhere: the same losses
    capsys.readouterr()
    resume = ["--config", str(path), "training.resume_from_checkpoint=latest", f"dataset.val_parquet_dir={moved}"]
    assert train.main(resume + ["training.max_iters=3"]) == 0
    assert "WARNING" not in capsys.readouterr().out
    write_parquet(moved / "shard-0.parquet", ["other text " * 10] * 12, 4)  # rewritten where it is
    assert train.main(resume + ["training.max_iters=4"]) == 0
    assert (f"WARNING: the validation documents change on this resume (dataset.val_parquet_dir {str(moved)!r}: its "
            f"shards changed)") in capsys.readouterr().out


def test_a_checkpoint_of_a_version_that_left_out_the_short_last_validation_batch_starts_best_afresh(
        tmp_path, corpus, capsys):
    """Up to 0.4.12 validation text that ran out before eval_iters batches lost the windows short of a
    last batch: the same validation documents, so not "its shards changed"."""
    held_out = tmp_path / "held_out"
    write_parquet(held_out / "v.parquet", [f"<{r:02d}>" + "y" * 11 for r in range(8)])  # 7 windows: 4 + 3
    path = write_config(tmp_path, corpus, max_iters=2, dataset={"val_parquet_dir": str(held_out)})
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    batches = validation_batches(Config.from_dict(yaml.safe_load(path.read_text())), [], load_tokenizer("bytes"))
    assert [len(x) for x, _ in batches] == [4, 3]
    old = torch.load(run / "checkpoint_2.pt", weights_only=True)
    old["versions"]["project"], old["validation_batches"] = "0.4.12", validation_fingerprint(batches[:1])
    torch.save(old, run / "checkpoint_2.pt")
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.max_iters=3", "training.resume_from_checkpoint=latest"]) == 0
    out = capsys.readouterr().out
    assert ("note: the validation loss now measures the validation text to its last window, 3 windows more than the "
            "checkpoint's version did (a short last batch): best.pt starts afresh\n") in out
    assert "WARNING" not in out and (run / "best_until_step_2.pt").exists()


def test_a_resume_from_best_pt_that_starts_best_afresh_sets_it_aside_after_reading_it(tmp_path, corpus, capsys):
    """The checkpoint is read again once the model exists (load_saved_state): the best.pt that validation
    measuring something else sets aside is renamed after that, not from under it."""
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.max_iters=3", "training.eval_iters=1",
                       f"training.resume_from_checkpoint={run / 'best.pt'}"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "is now best_until_step_2.pt" in out
    assert load_checkpoint(run / "best_until_step_2.pt").step == 2 and load_checkpoint(run / "best.pt").step == 3
    assert sorted(losses(run)) == [1, 2, 3]


def test_a_checkpoint_marked_measured_anew_by_an_earlier_resume_leaves_best_pt_where_it_is(tmp_path, corpus, capsys):
    """A checkpoint saved after a resume that changed what validation measures, before an evaluation ran (a
    stop, say), carries the mark; a best.pt written since (the evaluation due, then a kill) measures what this
    resume measures too: it stays."""
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    marked = torch.load(run / "checkpoint_2.pt", weights_only=True)
    marked["measured_anew"] = True
    torch.save(marked, run / "checkpoint_2.pt")
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.max_iters=3",
                       f"training.resume_from_checkpoint={run / 'checkpoint_2.pt'}"]) == 0
    assert "is now best_until_step" not in capsys.readouterr().out and not list(run.glob("best_until_step_*"))


# train.py with a slow disk: torch.save's bytes are written in small chunks with pauses, so that a
# checkpoint write takes about 0.4 s and random kills land inside writes. With "hold" first, the
# second write stops halfway, for the test to kill it there.
SLOW_DISK_TRAIN = """
import io, sys, time
sys.path.insert(0, sys.argv.pop(1))
hold = sys.argv[1] == "hold" and sys.argv.pop(1)
import torch, train
real_save = torch.save
writes = 0
def slow_save(obj, f, *args, **kwargs):
    global writes
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    writes += 1
    for i in range(0, len(data), 1 << 18):
        f.write(data[i:i + (1 << 18)])
        time.sleep(0.01)
        if hold and writes == 2 and i >= len(data) // 2:
            print("HELD INSIDE A WRITE", flush=True)
            time.sleep(600)
torch.save = slow_save
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path, corpus):
    config = write_config(tmp_path, corpus, model={"n_layer": 1, "n_embd": 64, "n_head": 2,
                                                   "mlp_internal_dim_multiplier": 64},
                          max_iters=20, checkpoint_freq=1, log_freq=1, test_freq=1000, keep_last_n=2)
    rng = random.Random(0)
    ck, kills_inside_a_write = tmp_path / "ck", 0
    for attempt in range(2):  # the first kill lands inside a write; the second at a random moment
        hold = ["hold"] if attempt == 0 else []
        resume = ["training.resume_from_checkpoint=latest"] if attempt else []
        proc = subprocess.Popen([sys.executable, "-c", SLOW_DISK_TRAIN, str(ROOT), *hold, "--config", str(config),
                                 *resume], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if line.startswith("HELD INSIDE A WRITE" if attempt == 0 else "step "):
                break
        time.sleep(0 if attempt == 0 else rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        run = only_run(ck)
        kills_inside_a_write += any(".tmp" in p.name for p in run.iterdir())
        found = checkpoints_in(run)
        assert found
        for path in found:
            load_checkpoint(path)  # every checkpoint_<step>.pt is complete
    assert kills_inside_a_write >= 1
    assert train.main(["--config", str(config), "training.resume_from_checkpoint=latest"]) == 0  # removes temporaries
    run = only_run(ck)
    final = load_checkpoint(checkpoints_in(run)[-1])
    assert final.step == 20
    assert not [p for p in run.iterdir() if ".tmp" in p.name]
    assert len(checkpoints_in(run)) == 2  # keep_last_n
    # and the interrupted run ends exactly where one that was never interrupted does
    assert train.main(["--config", str(config), f"training.checkpoint_dir={tmp_path / 'straight'}",
                       "training.checkpoint_freq=20"]) == 0  # (saving changes nothing the run computes)
    straight = load_checkpoint(checkpoints_in(only_run(tmp_path / "straight"))[-1])
    assert all(torch.equal(final.model[k], straight.model[k]) for k in straight.model)
    assert losses(run) == losses(only_run(tmp_path / "straight")) and sorted(losses(run)) == list(range(1, 21))


def test_a_resume_may_switch_to_float16(tmp_path, corpus):
    """A float32 run's checkpoint holds no GradScaler state; a float16 resume starts a fresh scaler."""
    path = write_config(tmp_path, corpus, max_iters=2, checkpoint_freq=2)
    assert train.main(["--config", str(path)]) == 0
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=3",
                       "low_precision.compute_dtype=float16"]) == 0
    [run] = run_dirs(tmp_path)
    assert not load_checkpoint(run / "checkpoint_2.pt").scaler
    assert load_checkpoint(run / "checkpoint_3.pt").scaler["scale"] > 0  # a fresh scaler, kept from here on


def test_extending_a_finished_run_says_that_the_learning_rate_jumps_and_takes_the_new_settings(tmp_path, corpus,
                                                                                                capsys):
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=2, test_freq=100, warmup_iters=0, min_lr=0.001)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    capsys.readouterr()
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run / 'checkpoint_2.pt'}"]) == 0
    assert "learning-rate schedule changed" not in capsys.readouterr().out  # the same schedule
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=8",
                       "training.weight_decay=0.5", "model.dropout=0.0"]) == 0  # (dropout: not the model's shape)
    assert load_checkpoint(run / "checkpoint_8.pt").model_config["dropout"] == 0.0  # the model built with it
    decay, no_decay = load_checkpoint(run / "checkpoint_8.pt").optimizer["param_groups"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.5, 0.0)  # the config's, not the checkpoint's 0.1
    out = capsys.readouterr().out
    assert re.search(r"note: the learning-rate schedule changed \(max_iters 4 -> 8\): step 5 runs at lr 3\.78e-03, "
                     r"where the checkpoint's schedule had 1\.00e-03; the loss may rise for a while after this "
                     r"jump up\n", out)
    from config import TrainingConfig
    from resume_checks import schedule_jump
    saved = SimpleNamespace(step=4, config={"training": {"learning_rate": 0.01, "min_lr": 0.001, "max_iters": 100}})
    lower = schedule_jump(saved, TrainingConfig(learning_rate=0.002, min_lr=0.0001, max_iters=100))
    assert lower == ("  note: the learning-rate schedule changed (learning_rate 0.01 -> 0.002, min_lr 0.001 -> "
                     "0.0001): step 5 runs at lr 1.00e-04, where the checkpoint's schedule had 5.00e-04")
    slightly = schedule_jump(saved, TrainingConfig(learning_rate=0.0105, min_lr=0.001, max_iters=100))
    assert "runs at lr" in slightly and "jump up" not in slightly  # 5% up: said, without the alarm


def test_a_checkpoint_without_random_states_is_resumed_with_a_note(capsys):
    """A checkpoint written by hand from other weights (step, model, model_config): no process count to compare."""
    cfg = Config.from_dict({"model": {"dropout": 0.1}})
    ckpt = SimpleNamespace(rng=[], config={"training": {"batch_size": cfg.training.batch_size}},
                           low_precision=lambda: {"use_4bit_optimizer": False})
    state_notes(cfg, ckpt, Ranks())
    assert capsys.readouterr().out == ("note: 1 process where the checkpoint has no random state: each rank's random "
                                       "state (dropout masks) is seeded afresh\n")


@pytest.mark.parametrize("device", DEVICES + [pytest.param("mps", marks=pytest.mark.skipif(
    not torch.backends.mps.is_available(), reason="needs an Apple GPU"))])
def test_the_random_state_of_the_device_comes_back(device):
    device = torch.device(device)
    state = rng_state(device)
    drawn = [torch.rand(4, device=device), torch.rand(4), random.random(), np.random.rand(3)]
    set_rng_state(state, device)
    again = [torch.rand(4, device=device), torch.rand(4), random.random(), np.random.rand(3)]
    assert all(torch.equal(a, b) for a, b in zip(drawn[:2], again[:2]))
    assert drawn[2] == again[2] and (drawn[3] == again[3]).all()  # Python's and numpy's come back too


def test_a_resume_that_leaves_out_the_run_s_data_builds_no_sample_corpus(tmp_path, corpus, capsys, monkeypatch):
    """The config file's parquet_dir is the built-in corpus's place, the run was given its data on the
    command line: the resume without it is refused with the run's folder, before anything is built."""
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, corpus, max_iters=2)
    raw = yaml.safe_load(path.read_text())
    del raw["dataset"]["parquet_dir"]  # the default, data/stdlib: built when missing
    path.write_text(yaml.safe_dump(raw))
    assert train.main(["--config", str(path), f"dataset.parquet_dir={corpus}", "training.eval_iters=3"]) == 0
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=4"]) == 1
    captured = capsys.readouterr()
    assert "building the built-in corpus" not in captured.out and not (tmp_path / "data" / "stdlib").exists()
    assert "prepare.py" not in captured.err  # (not: create the config file's folder)
    assert f"add dataset.parquet_dir={corpus} (the run was given it on its command line)" in captured.err
    assert "the run was given training.eval_iters=3 on its command line" in captured.err  # in the same line
    assert len(captured.err.strip().splitlines()) == 1
    # a copy outside its run starts a new run, on the config's data: the built-in corpus is built for it
    [run] = run_dirs(tmp_path)
    (tmp_path / "downloads").mkdir()
    shutil.copy(run / "checkpoint_2.pt", tmp_path / "downloads" / "ck.pt")
    built = []
    monkeypatch.setattr(data, "ensure_builtin_corpus", lambda cfg: built.append(cfg.dataset.parquet_dir))
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={tmp_path / 'downloads' / 'ck.pt'}",
                       "training.max_iters=4"]) == 1  # (no folder built: the error that follows)
    assert built == ["data/stdlib"]


def test_a_resume_whose_data_cannot_be_set_up_names_the_checkpoint_s_settings(tmp_path, corpus, bpe_file, capsys):
    content = tmp_path / "content"
    for shard in corpus.glob("*.parquet"):  # the documents in a column named otherwise
        content.mkdir(exist_ok=True)
        pq.write_table(pq.read_table(shard).rename_columns(["content"]), content / shard.name, row_group_size=8)
    path = write_config(tmp_path, content, max_iters=2)
    started_with = ["dataset.text_column=content", "dataset.split_seed=3", f"dataset.tokenizer={bpe_file}",
                    "model.vocab_size=320"]
    assert train.main(["--config", str(path), *started_with]) == 0
    resume_latest = ["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=4"]
    capsys.readouterr()
    assert train.main(resume_latest) == 1  # without the command line's settings
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    newest = (f" (that run is the newest in training.checkpoint_dir {tmp_path / 'ck'}, which `latest` and `auto` "
              f"resume: to resume another, give its directory, or set training.checkpoint_dir to the folder that "
              f"holds it)")
    assert err.rstrip().endswith(f"; the checkpoint's run had dataset.text_column=content dataset.split_seed=3 "
                                 f"dataset.tokenizer={bpe_file} model.vocab_size=320: if the change was not meant, "
                                 f"give those again{newest}")
    assert train.main(resume_latest + started_with + [f"dataset.val_parquet_dir={tmp_path / 'nope'}"]) == 1
    assert capsys.readouterr().err.rstrip().endswith(
        f"; the checkpoint's run had dataset.val_parquet_dir=null: if the change was not meant, give it again{newest}")
    bpe_file.rename(tmp_path / "elsewhere.json")
    # with them, but the tokenizer file is gone (the same shards by a pattern are beside the point); or
    # another missing file given instead: the run's is not the one to point to
    [run] = run_dirs(tmp_path)
    export_hint = (f"; the checkpoint carries its tokenizer ({bpe_file} is not found): `python export.py --checkpoint "
                   f"{run / 'checkpoint_2.pt'} --out DIR` writes it to DIR/tokenizer.json, for "
                   f"dataset.tokenizer=DIR/tokenizer.json")
    assert train.main(resume_latest + started_with + [f"dataset.parquet_dir={content / '*.parquet'}"]) == 1
    assert capsys.readouterr().err.rstrip().endswith(export_hint)
    assert train.main(resume_latest + started_with + [f"dataset.tokenizer={tmp_path / 'other.json'}"]) == 1
    assert capsys.readouterr().err.rstrip().endswith(export_hint)


def test_a_stop_before_the_first_evaluation_keeps_the_mark_of_a_changed_validation(tmp_path, corpus, monkeypatch):
    """measured_anew (plot.py breaks the validation line there) is saved until an evaluation carries it."""
    path = write_config(tmp_path, corpus, max_iters=4, test_freq=2, checkpoint_freq=4)
    assert train.main(["--config", str(path), "logging.tensorboard=false"]) == 0
    real = train.write_step_line

    def stop_at_step_5(step_log, step, lr, progress):
        real(step_log, step, lr, progress)
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the run saves a checkpoint and stops (after step 6: the vote)
    monkeypatch.setattr(train, "write_step_line", stop_at_step_5)
    changed = ["--config", str(path), "logging.tensorboard=false", "training.eval_iters=1", "training.max_iters=8",
               "training.test_freq=4", "training.resume_from_checkpoint=latest"]
    assert train.main(changed) == 0
    [run] = run_dirs(tmp_path)
    stopped = load_checkpoint(checkpoints_in(run)[-1])
    assert stopped.step < 8 and stopped.measured_anew
    monkeypatch.setattr(train, "write_step_line", real)
    assert train.main(changed) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("measured_anew")) for r in records if "val_loss" in r] == [(2, None), (4, None), (8, True)]
    assert not load_checkpoint(run / "checkpoint_8.pt").measured_anew


def test_a_checkpoint_whose_best_loss_is_not_a_number_gets_a_best_again(tmp_path, corpus):
    """Up to 0.4.10 a NaN validation loss was taken as the best: no loss is below it."""
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=4, test_freq=2)
    assert train.main(["--config", str(path)]) == 0
    run = only_run(tmp_path / "ck")
    saved = torch.load(run / "checkpoint_4.pt", weights_only=False)
    torch.save({**saved, "best_val_loss": float("nan")}, run / "checkpoint_4.pt")
    (run / "best.pt").unlink()
    assert train.main(["--config", str(path), "training.max_iters=6", f"training.resume_from_checkpoint={run}"]) == 0
    assert load_checkpoint(run / "best.pt").step == 6


def test_the_resume_command_starts_the_run_as_it_was_started(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert launcher(Ranks()) == "python "
    assert launcher(Ranks(0, 4)) == "torchrun --standalone --nproc_per_node=4 "
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 nodes of 2
    assert launcher(Ranks(0, 4)) == "torchrun <the same rendezvous flags> "


def test_the_command_that_trains_a_run_on_sets_max_iters_once():
    assert with_max_iters("train.py --config my.yaml training.max_iters=10 training.seed=3", 20) == (
        "train.py --config my.yaml training.seed=3 training.max_iters=20")


def test_loading_a_checkpoint_keeps_none_of_the_file_s_mapped_pages(tmp_path, corpus):
    """The checkpoint is mapped: what the optimizer keeps must be copied off it, or a file copied over
    (in place, as cp does) would change the moments under the resumed run."""
    path = write_config(tmp_path, corpus, max_iters=2, checkpoint_freq=2)
    assert train.main(["--config", str(path)]) == 0
    checkpoint = run_dirs(tmp_path)[0] / "checkpoint_2.pt"
    cfg = Config.from_yaml(path, [f"training.resume_from_checkpoint={checkpoint}"])
    model = train.build_model(cfg, torch.device("cpu"))[0]
    optimizer = train.make_optimizer(model, cfg, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    load_saved_state(cfg, None, model, optimizer, scaler, load_tokenizer("bytes"), Progress(last_saved=checkpoint),
                     Ranks(), torch.device("cpu"))
    def moments():
        return [t.clone() for state in optimizer.state.values() for t in state.values() if t.dim()]
    loaded = moments()
    assert len(loaded) == 2 * len(list(model.parameters())) and all(t.abs().sum() > 0 for t in loaded)
    with open(checkpoint, "r+b") as f:  # copied over in place
        f.write(bytes(checkpoint.stat().st_size))
    assert all(torch.equal(a, b) for a, b in zip(loaded, moments()))


# ---- found by mutating resume.py: the size a checkpoint is expected to take, the commands
# printed, auto's hold, what a resume carries on (tokens, the scaler's scale) and where it continues

def test_the_checkpoint_size_is_the_last_checkpoint_s_or_the_weights_and_adamw_s_moments(tmp_path):
    """What the free-space warning expects a checkpoint to take: the last one written, else the weights and
    AdamW's two moments (float32: twice the weights; 4-bit: a quarter of them together)."""
    model = torch.nn.Linear(64, 32)
    weights = tensor_bytes(model.state_dict())
    assert checkpoint_size(model, SimpleNamespace(use_4bit_optimizer=False), None) == 3 * weights
    assert checkpoint_size(model, SimpleNamespace(use_4bit_optimizer=True), None) == weights + weights // 4
    last = tmp_path / "checkpoint_2.pt"
    last.write_bytes(bytes(12345))
    assert checkpoint_size(model, SimpleNamespace(use_4bit_optimizer=False), last) == 12345
    # a last checkpoint since pruned or set aside: the estimate again
    assert checkpoint_size(model, SimpleNamespace(use_4bit_optimizer=False), tmp_path / "gone.pt") == 3 * weights


def test_the_resume_command_quotes_a_checkpoint_path_with_spaces(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    where = Path("/runs/my run/checkpoint_4.pt")
    assert resume_command_for(Ranks(), "train.py --config exp.yaml", where) == (
        "python train.py --config exp.yaml 'training.resume_from_checkpoint=/runs/my run/checkpoint_4.pt'")


def test_an_auto_job_holds_its_checkpoint_dir_so_that_a_second_copy_is_refused(tmp_path):
    """Two copies of an auto job started together would both find no run and train twice."""
    folder = str(tmp_path / "ck")
    assert resolve_auto(folder, Ranks(), torch.device("cpu")) is None  # a new run, the folder held
    second = subprocess.run([sys.executable, "-c", f"import torch, resume, distributed; "
                             f"resume.resolve_auto({folder!r}, distributed.Ranks(), torch.device('cpu'))"],
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    assert second.returncode != 0
    assert "is running with training.resume_from_checkpoint=auto in this checkpoint_dir" in second.stderr


def test_the_tokens_a_checkpoint_counted_carry_on_across_a_resume(tmp_path, corpus):
    """The run's count (which a resume that changed the batch made other than steps x batch) is kept."""
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    saved = torch.load(run / "checkpoint_2.pt", weights_only=True)
    per_step = saved["tokens"] // 2
    torch.save({**saved, "tokens": 1000 * per_step}, run / "checkpoint_2.pt")
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=3"]) == 0
    assert load_checkpoint(run / "checkpoint_3.pt").tokens == 1001 * per_step


def test_on_another_number_of_processes_each_resumed_step_draws_its_own_dropout_masks(tmp_path, corpus):
    """The saved RNG states are one per rank: reseeded, by the seed and the step (resumes from two steps
    do not repeat each other's masks), the same way each time."""
    path = write_config(tmp_path, corpus, max_iters=4)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)

    def state_after_loading(name):
        checkpoint = run / name
        saved = torch.load(checkpoint, weights_only=True)
        torch.save({**saved, "rng": saved["rng"] * 2}, checkpoint)  # as if 2 processes had saved it
        cfg = Config.from_yaml(path, [f"training.resume_from_checkpoint={checkpoint}"])
        model = train.build_model(cfg, torch.device("cpu"))[0]
        optimizer = train.make_optimizer(model, cfg, torch.device("cpu"))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        torch.manual_seed(0)
        load_saved_state(cfg, None, model, optimizer, scaler, None, Progress(last_saved=checkpoint), Ranks(),
                         torch.device("cpu"))
        return torch.get_rng_state()

    at_2 = state_after_loading("checkpoint_2.pt")
    assert torch.equal(at_2, state_after_loading("checkpoint_2.pt"))
    assert not torch.equal(at_2, state_after_loading("checkpoint_4.pt"))


def test_a_float16_run_resumes_with_its_gradient_scaler_s_scale(tmp_path, corpus):
    """The scale a float16 run has settled on (lowered after overflows, say) comes back, not a fresh one's."""
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path), "low_precision.compute_dtype=float16"]) == 0
    [run] = run_dirs(tmp_path)
    saved = torch.load(run / "checkpoint_2.pt", weights_only=True)
    assert saved["scaler"]["scale"] > 0
    torch.save({**saved, "scaler": {**saved["scaler"], "scale": 128.0}}, run / "checkpoint_2.pt")
    assert train.main(["--config", str(path), "low_precision.compute_dtype=float16", "training.max_iters=3",
                       "training.resume_from_checkpoint=latest"]) == 0
    assert load_checkpoint(run / "checkpoint_3.pt").scaler["scale"] in (64.0, 128.0)  # (halved after an overflow)


def test_a_resume_with_nothing_to_do_says_nothing_of_converting_the_optimizer_state(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path)]) == 0
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest",
                       "low_precision.use_4bit_optimizer=true"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nothing to do: the checkpoint ") and "converting" not in out


def test_a_run_named_with_another_checkpoint_dir_past_an_unreadable_newer_checkpoint_continues(tmp_path, corpus,
                                                                                                capsys):
    """A checkpoint cut short (kill -9 inside a write) is not a later checkpoint of the run: the newest one that
    loads continues it, even where the command line names another checkpoint_dir (said not to be used)."""
    path = write_config(tmp_path, corpus, max_iters=4)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    (run / "checkpoint_6.pt").write_bytes(b"cut short")
    elsewhere = tmp_path / "elsewhere"
    capsys.readouterr()
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run}", "training.max_iters=5",
                       f"training.checkpoint_dir={elsewhere}"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / 'checkpoint_4.pt'} at step 5" in out and "is not used" in out
    assert load_checkpoint(run / "checkpoint_5.pt").step == 5 and not elsewhere.exists()


def test_an_older_checkpoint_of_a_moved_run_given_its_own_checkpoint_dir_branches_in_the_run(tmp_path, corpus, capsys):
    """The run's folder moved; the command that started it (training.checkpoint_dir=ck) names an older
    checkpoint of it: a branch in the run itself, not another study's folder taking it over."""
    path = write_config(tmp_path, corpus, max_iters=4)
    ck = tmp_path / "ck"
    assert train.main(["--config", str(path), f"training.checkpoint_dir={ck}"]) == 0
    [run] = run_dirs(tmp_path)
    moved = tmp_path / "moved" / run.name
    moved.parent.mkdir()
    run.rename(moved)
    capsys.readouterr()
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={moved / 'checkpoint_2.pt'}",
                       f"training.checkpoint_dir={ck}"]) == 0
    out = capsys.readouterr().out
    assert "a new branch from step 2" in out and load_checkpoint(moved / "checkpoint_4.pt").step == 4


def test_a_run_resumed_in_place_keeps_its_checkpoint_dir_as_it_was_written(tmp_path, corpus, monkeypatch):
    """A relative training.checkpoint_dir stays relative in the run's records when another config's
    checkpoint_dir is given (it names the run's folder all the same)."""
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, corpus, max_iters=2, checkpoint_dir="ck")
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    other = write_config(tmp_path, corpus, name="other.yaml", max_iters=3, checkpoint_dir=str(tmp_path / "other"))
    assert train.main(["--config", str(other), f"training.resume_from_checkpoint={run}"]) == 0
    assert load_checkpoint(run / "checkpoint_3.pt").config["training"]["checkpoint_dir"] == "ck"


def test_the_printed_commands_keep_a_checkpoint_dir_that_is_the_run_s_own(tmp_path):
    """Only another folder, one a resume in place did not use, is left out: the run's own stays, or the
    printed command's `latest` would look in the config file's folder."""
    ck = tmp_path / "ck"
    command = f"train.py --config exp.yaml training.checkpoint_dir={ck} training.seed=3"
    assert without_unused_checkpoint_dir(command, str(ck)) == command
    other = str(tmp_path / "other")
    assert without_unused_checkpoint_dir(command, other) == "train.py --config exp.yaml training.seed=3"
