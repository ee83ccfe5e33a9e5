"""Which checkpoint a name means: a file, a run directory, `latest` (the newest run, past a
checkpoint that cannot be read, to a best.pt newer than the last checkpoint), and which folders are
run directories."""
import os
import re

import pytest
import torch

import train
from checkpoint import Checkpoint, CheckpointError, load_checkpoint
from conftest import ROOT, run_dirs, write_config
from distributed import Ranks
from locate import checkpoints_in, export_source, is_run_directory, load_model, open_checkpoint
from resume import resolve_auto
from rundir import RunDir, release_run_directories


def test_open_checkpoint_takes_the_newest_that_loads_and_names_the_setting(tmp_path, capsys):
    run = tmp_path / "run_20260101_000000"
    run.mkdir()
    with pytest.raises(CheckpointError, match=r"^--checkpoint: latest: no run with a checkpoint in"):
        open_checkpoint("latest", str(tmp_path), setting="--checkpoint")
    with pytest.raises(CheckpointError, match=r"^--checkpoint: latest: there is no folder .*/nope/; train a run first"
                                              r", or set --checkpoint-dir to"):
        open_checkpoint("latest", str(tmp_path / "nope"), setting="--checkpoint")
    (tmp_path / "mine.pt").write_bytes(b"")  # a checkpoint given for the folder of runs
    with pytest.raises(CheckpointError, match=r"^--checkpoint: latest: --checkpoint-dir \S+/mine.pt is a file, not a "
                                              r"folder of runs; give the file itself: --checkpoint \S+/mine.pt$"):
        open_checkpoint("latest", str(tmp_path / "mine.pt"), setting="--checkpoint")
    with pytest.raises(CheckpointError, match=r"or set training.checkpoint_dir to the folder that holds the runs "
                                              r"\(a job that may restart before its first checkpoint: training.resume_"
                                              r"from_checkpoint=auto starts a new run where there is none\)$"):
        open_checkpoint("latest", str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match=r"^training.resume_from_checkpoint: .* holds no checkpoint_<step>.pt$"):
        open_checkpoint(str(run), str(tmp_path))
    (run / "config.yaml").write_text("")  # a run killed while it wrote its first checkpoint
    with pytest.raises(CheckpointError, match=r"holds no checkpoint_<step>.pt: its run stopped before its first "
                                              r"checkpoint; start it again without training.resume_from_checkpoint$"):
        open_checkpoint(str(run), str(tmp_path))
    (run / "config.yaml").unlink()
    (run / "best.pt").write_bytes(b"cut short")  # alone and unreadable: nothing to resume (auto starts anew)
    with pytest.raises(CheckpointError, match=r"holds no checkpoint_<step>.pt$"):
        open_checkpoint(str(run), str(tmp_path))
    (run / "best.pt").unlink()
    for step in (2, 10):
        torch.save(Checkpoint(step=step, model={}, model_config={}).to_dict(), run / f"checkpoint_{step}.pt")
    assert open_checkpoint(str(run), str(tmp_path))[0] == run / "checkpoint_10.pt"  # by step, not by name
    (run / "config.yaml").write_text("")  # given as the folder of runs: it is one run's
    with pytest.raises(CheckpointError, match=r"^--checkpoint: latest: .*run_20260101_000000 is a run directory, not "
                                              r"a folder of runs: give it as --checkpoint .*run_20260101_000000, "
                                              r"instead of --checkpoint-dir$"):
        open_checkpoint("latest", str(run), setting="--checkpoint")
    with pytest.raises(CheckpointError, match=r"^training.resume_from_checkpoint: auto: .*run_20260101_000000 is a "
                                              r"run directory, not a folder of runs: give it to "
                                              r"training.resume_from_checkpoint$"):
        resolve_auto(str(run), Ranks(), torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"run_20260101_000000 is a run directory, not a folder of runs: give it "
                                              r"to training.resume_from_checkpoint$"):
        open_checkpoint("latest", str(run))
    assert not (run / ".auto.lock").exists()
    (run / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint_10.pt does not exist .*; did you mean {run}/checkpoint_10.pt"):
        open_checkpoint("checkpoint_10.pt", str(tmp_path))  # a run's file by its name alone
    with pytest.raises(CheckpointError, match=f"checkpoint_10 does not exist .*; did you mean {run}/checkpoint_10.pt"):
        open_checkpoint("checkpoint_10", str(tmp_path))  # ... without .pt (as sample.py --checkpoint best)
    with pytest.raises(CheckpointError, match=f"{run}/checkpoint_10 does not exist; did you mean "
                                              f"{run}/checkpoint_10.pt\\?$"):
        open_checkpoint(str(run / "checkpoint_10"), str(tmp_path))  # in its run, without .pt (run/best)
    with pytest.raises(CheckpointError, match=f"{run}0 does not exist; did you mean {run}\\?$"):
        open_checkpoint(f"{run}0", str(tmp_path))  # the run directory's name mistyped
    (tmp_path / f"{run.name}.tar").write_bytes(b"")  # a file named closer still: not a run, passed over
    with pytest.raises(CheckpointError, match=f"{run}.ta does not exist; did you mean {run}\\?$"):
        open_checkpoint(f"{run}.ta", str(tmp_path))
    (tmp_path / f"{run.name}.tar").unlink()
    with pytest.raises(CheckpointError, match="; give a checkpoint file, a run directory, `latest` or `auto`$"):
        open_checkpoint(str(tmp_path / "gone" / "checkpoint_10.pt"), str(tmp_path))  # another run's, moved: no guess
    with pytest.raises(CheckpointError, match="; give a checkpoint file, a run directory or `latest`$"):
        open_checkpoint(str(tmp_path / "gone" / "checkpoint_10.pt"), None, setting="--checkpoint")
    if os.path.exists("/dev/null"):  # there, but not a file
        with pytest.raises(CheckpointError, match="^--checkpoint: /dev/null is not a file; give a checkpoint file, a "
                                                  "run directory or `latest`$"):
            open_checkpoint("/dev/null", None, setting="--checkpoint")
    with pytest.raises(CheckpointError, match=r"; did you mean auto \(in lower case\)\?$"):
        open_checkpoint("Auto", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"None does not exist .*; for a new run, leave it out or give null "):
        open_checkpoint("None", str(tmp_path))  # Python's word
    with pytest.raises(CheckpointError, match=r"lastest does not exist .*; did you mean `latest`\? \(give a checkpoint "
                                              r"file, a run directory, `latest` or `auto`\)$"):
        open_checkpoint("lastest", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"Lates does not exist .*; did you mean `latest`\? \(give a checkpoint "
                                              r"file, a run directory or `latest`\)$"):
        open_checkpoint("Lates", None, setting="--checkpoint")
    with pytest.raises(CheckpointError, match=r"latest.pt does not exist .*; give a checkpoint file"):
        open_checkpoint("latest.pt", str(tmp_path))  # a file's name: no guess at a word
    with pytest.raises(CheckpointError, match=r"checkpoint_1.pt does not exist; its folder holds checkpoint_10.pt, "
                                              r"checkpoint_2.pt \(if it was saved, it went: training.keep_last_n keeps "
                                              r"the newest only\)$"):
        open_checkpoint(str(run / "checkpoint_1.pt"), str(tmp_path))
    with pytest.raises(CheckpointError, match=r"chekpoint_10.pt does not exist; its folder holds checkpoint_10.pt, "
                                              r"checkpoint_2.pt$"):  # a typo: keep_last_n did not remove it
        open_checkpoint(str(run / "chekpoint_10.pt"), str(tmp_path))
    with pytest.raises(CheckpointError, match=f"holds no checkpoint_<step>.pt: it holds runs; give one .e.g. {run}., "
                                              f"or `latest` with training.checkpoint_dir={tmp_path}$"):
        open_checkpoint(str(tmp_path), str(tmp_path))  # the folder of the runs
    with pytest.raises(CheckpointError, match=f"or `latest` with --checkpoint-dir {tmp_path}$"):
        open_checkpoint(str(tmp_path), None, setting="--checkpoint")
    ignored = f"^--checkpoint-dir ck is where `latest` looks, and --checkpoint {run} is a path of its own: drop"
    with pytest.raises(CheckpointError, match=ignored):  # a script's --checkpoint-dir beside a path: not ignored
        open_checkpoint(str(run), "ck", setting="--checkpoint")
    export = tmp_path / "export"  # export.py's files (empty: refused before they are read)
    export.mkdir()
    (export / "model.safetensors").touch()
    (export / "config.json").touch()
    with pytest.raises(CheckpointError, match=ignored.replace(str(run), str(export))):
        load_model(str(export), "ck", "--checkpoint")
    good = (run / "checkpoint_10.pt").read_bytes()
    (run / "checkpoint_10.pt").write_bytes(good[: len(good) // 2])  # truncated: a disk that filled up, say
    for spec in ("latest", str(run)):
        path, ckpt = open_checkpoint(spec, str(tmp_path))
        assert (path, ckpt.step) == (run / "checkpoint_2.pt", 2)
        assert capsys.readouterr().err.startswith(f"skipped {run / 'checkpoint_10.pt'}: not a readable checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint_10.pt: not a readable checkpoint \(cut short or corrupt: "):
        open_checkpoint(str(run / "checkpoint_10.pt"), str(tmp_path))  # asked for by name: no other
    (run / "checkpoint_2.pt").write_bytes(b"cut short")  # none left: `latest`, or `auto`, which a requeue repeats
    with pytest.raises(CheckpointError, match=rf"^training.resume_from_checkpoint: the runs in {tmp_path}: none of "
                                              r"their 2 checkpoint\(s\) can be read \(see above\); to train anew, set "
                                              r"training.resume_from_checkpoint=null, or move those runs out of it"):
        open_checkpoint("latest", str(tmp_path))
    with pytest.raises(CheckpointError, match=rf"^--checkpoint: the runs in {tmp_path}: none of their 2 "
                                              r"checkpoint\(s\) can be read \(see above\)$"):
        open_checkpoint("latest", str(tmp_path), setting="--checkpoint")
    with pytest.raises(CheckpointError, match=rf"^training.resume_from_checkpoint: {run}: none of its 2 checkpoint"):
        open_checkpoint(str(run), str(tmp_path))


def cannot_be_listed(folder, monkeypatch):
    """Listing `folder` is refused, as for another user's run in a shared folder (chmod does not stop root)."""
    real_iterdir = type(folder).iterdir

    def iterdir(path):
        if path == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real_iterdir(path)
    monkeypatch.setattr(type(folder), "iterdir", iterdir)


def test_latest_is_the_newest_run_and_names_an_older_run_written_since(tmp_path, capsys, monkeypatch):
    older, newer = tmp_path / "run_20260101_000000", tmp_path / "run_20260102_000000"
    for run, step in ((older, 80), (newer, 8)):
        run.mkdir()
        torch.save(Checkpoint(step=step, model={}, model_config={}, config={"training": {"max_iters": 100}}).to_dict(),
                   run / f"checkpoint_{step}.pt")
    os.utime(newer / "checkpoint_8.pt", (1e9, 1e9))  # the older run was resumed after the newer one stopped
    assert open_checkpoint("latest", str(tmp_path))[0] == newer / "checkpoint_8.pt"
    assert capsys.readouterr().err == (f"note: latest is the newest run, {newer.name}; {older / 'checkpoint_80.pt'} was "
                                       f"written more recently: give it (or its run directory) to continue from there\n")
    open_checkpoint("latest", str(tmp_path), setting="--checkpoint")  # sample.py, export.py: not training
    err = capsys.readouterr().err  # (the older run, named once: not again as the one that trained further)
    assert err.endswith("give it (or its run directory) to use it\n") and err.count("note:") == 1
    os.utime(older / "checkpoint_80.pt", (1e8, 1e8))
    assert open_checkpoint("latest", str(tmp_path))[0] == newer / "checkpoint_8.pt"
    assert capsys.readouterr().err == ""
    cannot_be_listed(newer, monkeypatch)
    assert open_checkpoint("latest", str(tmp_path))[0] == older / "checkpoint_80.pt"
    assert capsys.readouterr().err == f"note: {newer}: cannot be listed (Permission denied): skipped\n"
    with pytest.raises(CheckpointError, match=re.escape(f"holds no checkpoint_<step>.pt: it holds runs; give one "
                                                        f"(e.g. {older}), or `latest` with")):
        open_checkpoint(str(tmp_path), str(tmp_path))  # the folder of runs given for one: the run that can be listed
    with pytest.raises(CheckpointError, match=re.escape(f"did you mean {older}?")):
        open_checkpoint(str(tmp_path / "run_20260101_00000"), str(tmp_path))  # a run's name mistyped


def test_a_scripts_latest_names_an_older_run_that_trained_further(tmp_path, capsys):
    finished, stopped = tmp_path / "run_20260101_000000", tmp_path / "run_20260102_000000"
    for run, steps, max_iters in ((finished, (400, 500), 500), (stopped, (20,), 500)):
        run.mkdir()
        for step in steps:
            torch.save(Checkpoint(step=step, model={}, model_config={}, config={"training": {"max_iters": max_iters}})
                       .to_dict(), run / f"checkpoint_{step}.pt")
    os.utime(finished / "checkpoint_500.pt", (1e8, 1e8))  # written before the stopped run: no other note
    assert open_checkpoint("latest", str(tmp_path), setting="--checkpoint")[0] == stopped / "checkpoint_20.pt"
    assert capsys.readouterr().err == (f"note: latest is the newest run, {stopped.name}, stopped at step 20; "
                                       f"{finished.name} trained further (step 500): give --checkpoint {finished} to "
                                       f"use it\n")
    open_checkpoint("latest", str(tmp_path))  # a resume continues the newest run: nothing to say
    assert capsys.readouterr().err == ""
    torch.save(Checkpoint(step=600, model={}, model_config={}, config={"training": {"max_iters": 800}}).to_dict(),
               stopped / "best.pt")  # its step is read: past the other run's
    assert open_checkpoint("latest", str(tmp_path), setting="--checkpoint")[0] == stopped / "best.pt"
    assert capsys.readouterr().err == ""
    (stopped / "best.pt").unlink()
    torch.save(Checkpoint(step=20, model={}, model_config={}, config={"training": {"max_iters": 20}}).to_dict(),
               stopped / "checkpoint_20.pt")  # a shorter experiment, finished: what it is
    open_checkpoint("latest", str(tmp_path), setting="--checkpoint")
    assert capsys.readouterr().err == ""
    for other in ({"model_config": {"n_layer": 2}}, {"tokenizer": "{}"},  # another model: not offered for this one
                  {"config": {"training": {"max_iters": 500}, "dataset": {"parquet_dir": "data/other"}}}):
        torch.save(Checkpoint(**{"step": 20, "model": {}, "model_config": {},
                                 "config": {"training": {"max_iters": 500}}, **other}).to_dict(),
                   stopped / "checkpoint_20.pt")
        open_checkpoint("latest", str(tmp_path), setting="--checkpoint")
        assert capsys.readouterr().err == "", other


def test_a_folder_of_experiments_names_its_folders_of_runs(tmp_path):
    for experiment in ("bpe", "bytes"):
        run = tmp_path / experiment / "run_20260101_000000"
        run.mkdir(parents=True)
        (run / "config.yaml").touch()
        torch.save(Checkpoint(step=2, model={}, model_config={}).to_dict(), run / "checkpoint_2.pt")
    (tmp_path / "notes").mkdir()  # no runs in it: not named
    experiments = f"{tmp_path / 'bpe'}, {tmp_path / 'bytes'}"
    with pytest.raises(CheckpointError, match=re.escape(f"; set --checkpoint-dir to one of its folders of runs: "
                                                        f"{experiments}")):
        open_checkpoint("latest", str(tmp_path), setting="--checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(f"; set training.checkpoint_dir to one of its folders of runs: "
                                                        f"{experiments}")):
        open_checkpoint("latest", str(tmp_path))
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path} holds no checkpoint_<step>.pt: it holds folders "
                                                        f"of runs ({experiments}): give a run of one, or `latest` with "
                                                        f"--checkpoint-dir set to one")):
        open_checkpoint(str(tmp_path), None, setting="--checkpoint")


def test_latest_past_an_unreadable_checkpoint_says_why_it_is_set_aside(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, keep_last_n=0, test_freq=100)
    assert train.main(["--config", str(path)]) == 0
    [run] = (tmp_path / "ck").iterdir()
    cut = (run / "checkpoint_4.pt").read_bytes()[:5000]  # a disk that filled up
    (run / "checkpoint_4.pt").write_bytes(cut)
    capsys.readouterr()
    # best.pt of the same step (its evaluation's) holds that step's whole state: the newest to resume from
    assert load_checkpoint(run / "best.pt").step == 4
    assert open_checkpoint("latest", str(tmp_path / "ck"))[0] == open_checkpoint(str(run), "")[0] == run / "best.pt"
    assert capsys.readouterr().err.count(f"skipped {run / 'checkpoint_4.pt'}") == 2
    (run / "best.pt").unlink()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest"]) == 0
    out = capsys.readouterr().out  # set aside in place: not an abandoned branch
    assert "the checkpoint(s) that could not be read are now checkpoint_4.pt.unreadable" in out and "abandoned" not in out
    assert (run / "checkpoint_4.pt.unreadable").read_bytes() == cut and not (run / "abandoned_after_step_2").exists()
    assert load_checkpoint(run / "checkpoint_4.pt").step == 4  # trained again


def test_a_resume_past_an_unreadable_checkpoint_of_the_same_step_sets_it_aside(tmp_path, corpus, capsys):
    """best.pt stands in for the step's cut-short checkpoint; left there, keep_last_n would count it as kept.
    Asked for by name, the unreadable checkpoint's error names the run directory, which gives the newest readable."""
    path = write_config(tmp_path, corpus, keep_last_n=0, test_freq=100)
    assert train.main(["--config", str(path)]) == 0
    [run] = (tmp_path / "ck").iterdir()
    cut = (run / "checkpoint_4.pt").read_bytes()[:5000]
    (run / "checkpoint_4.pt").write_bytes(cut)
    with pytest.raises(CheckpointError, match=f"cut short or corrupt: .*; its run directory, {run}, gives the newest "
                                              f"checkpoint that can be read$"):
        open_checkpoint(str(run / "checkpoint_4.pt"), "")
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=5"]) == 0
    assert ("the checkpoint(s) that could not be read are now checkpoint_4.pt.unreadable (keep_last_n no longer counts "
            "them; delete them once you have looked)") in capsys.readouterr().out
    assert (run / "checkpoint_4.pt.unreadable").read_bytes() == cut
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_2.pt", "checkpoint_5.pt"]
    (run / "best.pt").write_bytes(cut)  # a best.pt that cannot be read: set aside too, not taken for a later branch
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=6",
                       "training.learning_rate=1e-12", "training.min_lr=0"]) == 0  # (no better loss to earn a best.pt)
    assert "could not be read are now best.pt.unreadable" in capsys.readouterr().out
    assert (run / "best.pt.unreadable").read_bytes() == cut and not list(run.glob("abandoned*"))
    assert load_checkpoint(run / "best.pt").step == 6  # the next evaluation's: the set-aside one's loss is not the bar


def test_latest_resumes_from_a_best_pt_newer_than_the_newest_checkpoint(tmp_path, corpus, capsys):
    """Killed between the evaluation's best.pt and the step's checkpoint (or test_freq below
    checkpoint_freq): best.pt holds the whole state of a later step, and `latest` continues from it."""
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=2, test_freq=4, keep_last_n=0)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    (run / "checkpoint_4.pt").unlink()
    assert open_checkpoint("latest", str(tmp_path / "ck"))[0] == open_checkpoint(str(run), "")[0] == run / "best.pt"
    (run / "checkpoint_2.pt").unlink()  # killed before its first periodic checkpoint
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=5"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / 'best.pt'} at step 5 (the newest run in {tmp_path / 'ck'}, which had " \
           f"ended)\n" in out and not list(run.glob("abandoned*"))
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_5.pt"] and (run / "best.pt").exists()


def test_a_run_directory_is_told_by_its_config_not_by_any_config_file(tmp_path):
    """A checkpoint copied beside the repository's config.yaml must not make that folder a run to
    write checkpoints, records and locks into (and to prune)."""
    renamed = tmp_path / "baseline"  # a run's folder, renamed: its config.yaml's first line tells it
    RunDir(tmp_path / "ck", writer=True)._create("model: {}\n")
    [created] = (tmp_path / "ck").iterdir()
    created.rename(renamed)
    old = tmp_path / "ck" / "run_20260101_000000"  # written before the first line said so: its name tells it
    old.mkdir()
    (old / "config.yaml").write_text("model: {}\n")
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    assert [is_run_directory(folder) for folder in (renamed, old, repository, tmp_path)] == [True, True, False, False]
    release_run_directories()


def test_a_resume_from_a_name_that_does_not_exist_stops_before_the_data_is_read(tmp_path, corpus, capsys, monkeypatch):
    """Reading the data may first build the built-in corpus: a typo is told before that."""
    monkeypatch.setattr(train, "prepare_data", lambda *a: pytest.fail("the data was read"))
    path = write_config(tmp_path, corpus)
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=lastest"]) == 1
    assert capsys.readouterr().err.startswith("error: training.resume_from_checkpoint: lastest does not exist")
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest"]) == 1  # no run yet
    assert capsys.readouterr().err.startswith("error: training.resume_from_checkpoint: latest: there is no folder")


# ---- found by mutating locate.py: the default folder of runs, which run an example names, a folder of
# checkpoints that is not a run, notes that must not be printed, words and names near a meaning

def save(path, step, **config):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(Checkpoint(step=step, model={}, model_config={}, config=config).to_dict(), path)


def test_a_scripts_latest_without_checkpoint_dir_looks_in_checkpoints(tmp_path, monkeypatch):
    save(tmp_path / "checkpoints" / "run_20260101_000000" / "checkpoint_2.pt", 2)
    monkeypatch.chdir(tmp_path)
    path = open_checkpoint("latest", None, setting="--checkpoint")[0]
    assert path.resolve() == tmp_path / "checkpoints" / "run_20260101_000000" / "checkpoint_2.pt"


def test_latest_notes_no_other_run_where_the_newest_run_holds_the_file_written_last(tmp_path, capsys):
    run = tmp_path / "run_20260101_000000"
    for step in (2, 4):
        save(run / f"checkpoint_{step}.pt", step)
    os.utime(run / "checkpoint_4.pt", (1e8, 1e8))  # its older checkpoint written after it (copied back, say)
    assert open_checkpoint("latest", str(tmp_path))[0] == run / "checkpoint_4.pt"
    assert capsys.readouterr().err == ""


def test_a_folder_of_checkpoints_that_is_not_a_run_is_not_taken_for_a_run_directory(tmp_path):
    """Checkpoint files copied into a folder without a run's config.yaml: neither `latest` nor `auto` calls
    it a run directory given for the folder of runs."""
    save(tmp_path / "copied" / "checkpoint_2.pt", 2)
    with pytest.raises(CheckpointError, match=r"^--checkpoint: latest: no run with a checkpoint in .*copied"):
        open_checkpoint("latest", str(tmp_path / "copied"), setting="--checkpoint")
    assert resolve_auto(str(tmp_path / "copied"), Ranks(), torch.device("cpu")) is None  # a new run


def test_a_folder_of_runs_given_for_a_checkpoint_names_its_newest_run_with_checkpoints(tmp_path):
    for name in ("run_20260101_000000", "run_20260102_000000"):
        save(tmp_path / name / "checkpoint_2.pt", 2)
    (tmp_path / "run_20260103_000000").mkdir()  # stopped before its first checkpoint: not one to give
    with pytest.raises(CheckpointError, match=re.escape(f"it holds runs; give one (e.g. "
                                                        f"{tmp_path / 'run_20260102_000000'}), or `latest` with")):
        open_checkpoint(str(tmp_path), str(tmp_path))
    empty = tmp_path / "empty"
    (empty / "run_20260101_000000").mkdir(parents=True)  # runs, none with a checkpoint: none offered
    with pytest.raises(CheckpointError, match=r"empty holds no checkpoint_<step>.pt$"):
        open_checkpoint(str(empty), str(tmp_path))


def test_a_bare_file_name_is_looked_for_in_the_newest_run_that_holds_it(tmp_path):
    for name in ("run_20260101_000000", "run_20260102_000000"):
        save(tmp_path / name / "best.pt", 2)
    (tmp_path / "run_20260103_000000").mkdir()  # newer, without one
    newest = tmp_path / "run_20260102_000000" / "best.pt"
    with pytest.raises(CheckpointError, match=re.escape(f"did you mean {newest}?")):
        open_checkpoint("best", str(tmp_path))


def test_a_missing_checkpoint_of_the_oldest_kept_step_is_not_said_to_be_pruned(tmp_path):
    run = tmp_path / "run_20260101_000000"
    for step in (2, 10):
        save(run / f"checkpoint_{step}.pt", step)
    with pytest.raises(CheckpointError, match=r"checkpoint_02.pt does not exist; its folder holds checkpoint_10.pt, "
                                              r"checkpoint_2.pt$"):  # step 2 is kept: keep_last_n removed nothing
        open_checkpoint(str(run / "checkpoint_02.pt"), str(tmp_path))


def test_words_for_no_checkpoint_are_told_to_leave_it_out_for_training_only(tmp_path):
    for word in ("no", "false", "off", "new", "NEW"):
        with pytest.raises(CheckpointError, match=rf"{word} does not exist .*; for a new run, leave it out or give "
                                                  r"null "):
            open_checkpoint(word, str(tmp_path))
        with pytest.raises(CheckpointError, match=r"; give a checkpoint file, a run directory or `latest`$"):
            open_checkpoint(word, None, setting="--checkpoint")  # a script: no new run to start


def test_a_name_only_loosely_like_latest_is_not_taken_for_a_typo_of_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"best does not exist .*; give a checkpoint file, a run directory, "
                                              r"`latest` or `auto`$"):  # (no run holds a best.pt)
        open_checkpoint("best", str(tmp_path))


def test_a_scripts_latest_names_no_older_run_that_stopped_at_the_same_step(tmp_path, capsys):
    older, newer = tmp_path / "run_20260101_000000", tmp_path / "run_20260102_000000"
    for run in (older, newer):
        save(run / "checkpoint_20.pt", 20, training={"max_iters": 500})
    os.utime(older / "checkpoint_20.pt", (1e8, 1e8))
    assert open_checkpoint("latest", str(tmp_path), setting="--checkpoint")[0] == newer / "checkpoint_20.pt"
    assert capsys.readouterr().err == ""  # not further than the newest run


def test_an_exports_config_json_that_records_no_checkpoint_path_names_none(tmp_path):
    """A config.json edited by hand or by another tool: its bdh_export.checkpoint not a path is not named."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").touch()
    (export / "config.json").write_text('{"bdh_export": {"checkpoint": 5}}')
    with pytest.raises(CheckpointError, match=r"holds no checkpoint_<step>.pt: export.py's output, not a checkpoint$"):
        open_checkpoint(str(export), str(tmp_path))
    (export / "model.safetensors").unlink()  # not an export, nor known to be one
    with pytest.raises(CheckpointError, match=r"export holds no checkpoint_<step>.pt$"):
        open_checkpoint(str(export), str(tmp_path))
    assert export_source(export) is None


def test_a_runs_only_checkpoint_unreadable_is_skipped_for_a_run_or_latest_and_refused_by_name(tmp_path, capsys):
    run = tmp_path / "run_20260101_000000"
    run.mkdir()
    (run / "config.yaml").write_text("")
    save(run / "checkpoint_2.pt", 2)
    good = (run / "checkpoint_2.pt").read_bytes()
    (run / "checkpoint_2.pt").write_bytes(good[: len(good) // 2])  # truncated: a disk that filled up, say
    skipped = []
    with pytest.raises(CheckpointError, match=r"^training.resume_from_checkpoint: the runs in .*: none of their 1 "
                                              r"checkpoint\(s\) can be read \(see above\); to train anew"):
        open_checkpoint("latest", str(tmp_path), skipped=skipped)
    assert skipped == [run / "checkpoint_2.pt"]
    assert capsys.readouterr().err.startswith(f"skipped {run / 'checkpoint_2.pt'}: not a readable checkpoint")
    with pytest.raises(CheckpointError, match=r"^--checkpoint: .*run_20260101_000000: none of its 1 checkpoint"):
        open_checkpoint(str(run), None, setting="--checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint_2.pt: not a readable checkpoint \(cut short or corrupt: "
                                              r"[^;]*$"):  # no other in its run directory to point to
        open_checkpoint(str(run / "checkpoint_2.pt"), None, setting="--checkpoint")


def test_a_folder_of_experiments_names_its_folders_of_runs_past_a_run_that_cannot_be_listed(tmp_path, monkeypatch):
    for experiment in ("bpe", "bytes"):
        run = tmp_path / experiment / "run_20260101_000000"
        save(run / "checkpoint_2.pt", 2)
        (run / "config.yaml").touch()
    cannot_be_listed(tmp_path / "bpe" / "run_20260101_000000", monkeypatch)
    with pytest.raises(CheckpointError, match=re.escape(f"; set --checkpoint-dir to one of its folders of runs: "
                                                        f"{tmp_path / 'bytes'}")):
        open_checkpoint("latest", str(tmp_path), setting="--checkpoint")
