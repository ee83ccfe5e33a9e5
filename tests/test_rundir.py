"""Run directories: their names, which checkpoint a name means, temporaries left by a kill, the hold
of a run directory; whole runs resumed with `latest`, from an earlier step, while another process
holds the run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import rundir
import train
from checkpoint import Checkpoint, CheckpointError, load_checkpoint
from conftest import ROOT, run_dirs, write_config
from rundir import (RunDir, checkpoints_in, clean_stale_temporaries, is_run_directory, load_model, open_checkpoint,
                    release_run_directories, unused)


def test_two_runs_started_in_the_same_second_get_different_directories(tmp_path):
    a, b = RunDir(str(tmp_path)), RunDir(str(tmp_path))
    b.name = a.name
    ckpt = Checkpoint(step=1, model={}, model_config={})
    pa = a.save(ckpt, "model: {}\n").parent
    pb = b.save(ckpt, "model: {}\n").parent
    assert pa != pb and pa.exists() and pb.exists()
    assert RunDir(str(tmp_path), path=pb).name == pb.name  # a resumed run keeps its name (W&B's run name)


def test_stale_temporary_files_are_removed_but_not_a_live_writers(tmp_path):
    run = tmp_path / "run_20260101_000000"
    run.mkdir()
    dead, live = run / ".checkpoint_3.pt.tmp999999999", run / f".checkpoint_4.pt.tmp{os.getpid()}"
    dead.write_bytes(b"partial")
    live.write_bytes(b"partial")
    assert checkpoints_in(run) == []
    assert clean_stale_temporaries(tmp_path) == 1
    assert not dead.exists() and live.exists()


def test_open_checkpoint_takes_the_newest_that_loads_and_names_the_setting(tmp_path, capsys):
    run = tmp_path / "run_20260101_000000"
    run.mkdir()
    with pytest.raises(CheckpointError, match=r"^--checkpoint: latest: no run with a checkpoint in"):
        open_checkpoint("latest", str(tmp_path), setting="--checkpoint")
    with pytest.raises(CheckpointError, match=r"^--checkpoint: latest: there is no folder .*/nope/; train a run first"
                                              r", or set --checkpoint-dir to"):
        open_checkpoint("latest", str(tmp_path / "nope"), setting="--checkpoint")
    with pytest.raises(CheckpointError, match=r"or set training.checkpoint_dir to the folder that holds the runs$"):
        open_checkpoint("latest", str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match=r"^training.resume_from_checkpoint: .* holds no checkpoint_<step>.pt"):
        open_checkpoint(str(run), str(tmp_path))
    for step in (2, 10):
        torch.save(Checkpoint(step=step, model={}, model_config={}).to_dict(), run / f"checkpoint_{step}.pt")
    assert open_checkpoint(str(run), str(tmp_path))[0] == run / "checkpoint_10.pt"  # by step, not by name
    with pytest.raises(CheckpointError, match=f"checkpoint_10.pt does not exist .*; did you mean {run}/checkpoint_10.pt"):
        open_checkpoint("checkpoint_10.pt", str(tmp_path))  # a run's file by its name alone
    with pytest.raises(CheckpointError, match="; give a checkpoint file, a run directory, `latest` or `auto`$"):
        open_checkpoint(str(tmp_path / "gone" / "checkpoint_10.pt"), str(tmp_path))  # another run's, moved: no guess
    with pytest.raises(CheckpointError, match="; give a checkpoint file, a run directory or `latest`$"):
        open_checkpoint(str(tmp_path / "gone" / "checkpoint_10.pt"), None, setting="--checkpoint")
    with pytest.raises(CheckpointError, match=r"; did you mean auto \(in lower case\)\?$"):
        open_checkpoint("Auto", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"checkpoint_1.pt does not exist; its folder holds checkpoint_10.pt, "
                                              r"checkpoint_2.pt \(training.keep_last_n keeps the newest only\)$"):
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


def test_latest_is_the_newest_run_and_names_an_older_run_written_since(tmp_path, capsys, monkeypatch):
    older, newer = tmp_path / "run_20260101_000000", tmp_path / "run_20260102_000000"
    for run, step in ((older, 80), (newer, 8)):
        run.mkdir()
        torch.save(Checkpoint(step=step, model={}, model_config={}).to_dict(), run / f"checkpoint_{step}.pt")
    os.utime(newer / "checkpoint_8.pt", (1e9, 1e9))  # the older run was resumed after the newer one stopped
    assert open_checkpoint("latest", str(tmp_path))[0] == newer / "checkpoint_8.pt"
    assert capsys.readouterr().err == (f"note: latest is the newest run, {newer.name}; {older / 'checkpoint_80.pt'} was "
                                       f"written more recently: give it (or its run directory) to continue from there\n")
    open_checkpoint("latest", str(tmp_path), setting="--checkpoint")  # sample.py, export.py: not training
    assert capsys.readouterr().err.endswith("give it (or its run directory) to use it\n")
    os.utime(older / "checkpoint_80.pt", (1e8, 1e8))
    assert open_checkpoint("latest", str(tmp_path))[0] == newer / "checkpoint_8.pt"
    assert capsys.readouterr().out == ""
    real_iterdir = type(newer).iterdir

    def iterdir(path):  # another user's run in a shared folder (chmod does not stop root)
        if path == newer:
            raise PermissionError(13, "Permission denied", str(path))
        return real_iterdir(path)
    monkeypatch.setattr(type(newer), "iterdir", iterdir)
    assert open_checkpoint("latest", str(tmp_path))[0] == older / "checkpoint_80.pt"
    assert capsys.readouterr().err == f"note: {newer}: cannot be listed (Permission denied): skipped\n"


def test_best_set_aside_keeps_every_earlier_best(tmp_path):
    run = RunDir(str(tmp_path))
    run.save(Checkpoint(step=4, model={}, model_config={}), "model: {}\n", name="best.pt")
    assert run.set_aside_best(4) == "best_until_step_4.pt"
    assert not (run.path / "best.pt").exists() and run.set_aside_best(4) is None  # nothing to keep
    run.save(Checkpoint(step=5, model={}, model_config={}), "model: {}\n", name="best.pt")
    assert run.set_aside_best(4) == "best_until_step_4_2.pt"  # a second resume from step 4: both kept
    assert load_checkpoint(run.path / "best_until_step_4.pt").step == 4
    assert load_checkpoint(run.path / "best_until_step_4_2.pt").step == 5
    assert checkpoints_in(run.path) == []  # not checkpoints for `latest` or keep_last_n


def test_a_run_directory_is_held_until_released(tmp_path):
    run = RunDir(str(tmp_path))
    run.save(Checkpoint(step=1, model={}, model_config={}), "model: {}\n")  # creating it takes the hold
    try:
        with pytest.raises(CheckpointError, match=rf"^{run.path}: process {os.getpid()} on .+ is training in this run"):
            RunDir(str(tmp_path), path=run.path).lock()
        RunDir(str(tmp_path), path=run.path, writer=False).lock()  # only the writing rank holds it
    finally:
        release_run_directories()
    RunDir(str(tmp_path), path=run.path).lock()
    release_run_directories()


def test_a_forked_child_does_not_keep_the_hold_of_a_killed_trainer(tmp_path):
    run = RunDir(str(tmp_path))
    run.save(Checkpoint(step=1, model={}, model_config={}), "model: {}\n")
    started, say_started = os.pipe()
    child = os.fork()  # as a DataLoader worker is
    if child == 0:
        os.write(say_started, b"1")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"1"  # (fork's hooks have run in the child)
        rundir._LOCKED.pop().close()  # the trainer dies (kill -9): its file closes, nothing unlocks
        RunDir(str(tmp_path), path=run.path).lock()  # the worker still alive does not hold the folder
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(started)
        os.close(say_started)


def test_unused_numbers_a_taken_name_before_its_suffix(tmp_path):
    assert unused(tmp_path / "best.pt") == tmp_path / "best.pt"
    (tmp_path / "best.pt").touch()
    (tmp_path / "best_2.pt").touch()
    assert unused(tmp_path / "best.pt") == tmp_path / "best_3.pt"
    (tmp_path / "abandoned_after_step_4").mkdir()
    assert unused(tmp_path / "abandoned_after_step_4") == tmp_path / "abandoned_after_step_4_2"
    (tmp_path / "run_x").symlink_to(tmp_path / "gone")  # a dangling link: its name is taken all the same
    assert unused(tmp_path / "run_x") == tmp_path / "run_x_2"


# ---- whole runs: the hold, `latest`, branches

def test_a_run_directory_another_process_trains_in_is_refused(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", f"from rundir import RunDir; RunDir('', path=__import__("
                               f"'pathlib').Path({str(run)!r})).lock(); print('held', flush=True); input()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        capsys.readouterr()
        resume = ["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=6"]
        assert train.main(resume) == 1
        captured = capsys.readouterr()
        err = captured.err
        assert err.startswith(f"error: {run}: process {holder.pid} on ") and "is training in this run directory" in err
        assert "resuming from" not in captured.out  # refused before it says it resumes
        assert sorted(p.name for p in checkpoints_in(run)) == ["checkpoint_2.pt", "checkpoint_4.pt"]  # untouched
    finally:
        holder.kill()
        holder.wait()
    assert train.main(resume) == 0  # the holder's end released the directory
    assert train.main(resume[:2] + ["training.resume_from_checkpoint=latest", "training.max_iters=7"]) == 0  # and ours


def test_auto_jobs_in_one_checkpoint_dir_run_one_at_a_time(tmp_path, corpus, capsys):
    """Two copies of a job with resume_from_checkpoint=auto started together: before the first one's first
    checkpoint there is no run to resume, and both would train a new one."""
    path = write_config(tmp_path, corpus)
    auto = ["--config", str(path), "training.resume_from_checkpoint=auto"]
    first = subprocess.Popen([sys.executable, "-c", f"import rundir; rundir.hold_auto_start({str(tmp_path / 'ck')!r}); "
                              f"print('held', flush=True); input()"],  # the first copy, still running
                             cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "held\n"
        assert train.main(auto) == 1
        assert capsys.readouterr().err == (
            f"error: {tmp_path / 'ck'}: process {first.pid} on {socket.gethostname()} is running with "
            f"training.resume_from_checkpoint=auto in this checkpoint_dir (a copy of this job?); wait for it to end, "
            f"or give this experiment a checkpoint_dir of its own\n")
        assert run_dirs(tmp_path) == []
    finally:
        first.kill()
        first.wait()
    assert train.main(auto) == 0 and len(run_dirs(tmp_path)) == 1  # the first one ended: this one starts
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # a checkpoint_dir that is a dangling link: one line
    assert train.main([*auto, f"training.checkpoint_dir={tmp_path / 'gone'}"]) == 1
    assert capsys.readouterr().err == (f"error: training.checkpoint_dir: {tmp_path / 'gone'} is a symbolic link to "
                                       f"{tmp_path / 'nowhere'}, which does not exist; create that folder or set "
                                       f"training.checkpoint_dir to another\n")


def test_latest_past_an_unreadable_checkpoint_says_why_it_is_set_aside(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, keep_last_n=0, test_freq=100)
    assert train.main(["--config", str(path)]) == 0
    [run] = (tmp_path / "ck").iterdir()
    cut = (run / "checkpoint_4.pt").read_bytes()[:5000]  # a disk that filled up
    (run / "checkpoint_4.pt").write_bytes(cut)
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest"]) == 0
    out = capsys.readouterr().out
    assert "step 2 is the newest checkpoint that can be read: the later checkpoint_4.pt" in out
    assert (run / "abandoned_after_step_2" / "checkpoint_4.pt").read_bytes() == cut
    assert load_checkpoint(run / "checkpoint_4.pt").step == 4  # trained again


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
    assert f"resuming from {run / 'best.pt'} at step 5" in out and not list(run.glob("abandoned*"))
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_5.pt"] and (run / "best.pt").exists()


def test_a_resume_from_an_earlier_step_sets_the_abandoned_branch_aside(tmp_path, corpus, capsys):
    """The workflow 'it diverged late: go back to an earlier checkpoint': afterwards `latest` and
    keep_last_n see the new branch only, and metrics.jsonl matches the checkpoints on disk."""
    path = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2, test_freq=2, keep_last_n=2)
    assert train.main(["--config", str(path)]) == 0
    [run] = (tmp_path / "ck").iterdir()
    best_step = load_checkpoint(run / "best.pt").step
    capsys.readouterr()
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run / 'checkpoint_4.pt'}",
                       "training.max_iters=5"]) == 0
    out = capsys.readouterr().out
    set_aside = sorted(p.name for p in (run / "abandoned_after_step_4").iterdir())
    assert set_aside == (["best.pt", "checkpoint_6.pt"] if best_step > 4 else ["checkpoint_6.pt"]) + ["metrics.jsonl"]
    assert "a new branch from step 4: the abandoned branch's checkpoint_6.pt" in out
    abandoned_records = (run / "abandoned_after_step_4" / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line)["step"] for line in abandoned_records) == 6  # its curve, whole
    assert open_checkpoint("latest", str(tmp_path / "ck"))[0] == run / "checkpoint_5.pt"
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_4.pt", "checkpoint_5.pt"]
    assert max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()) == 5
    assert (run / "config_resume_4.yaml").is_file()  # max_iters 6 -> 5
    # back to step 4 with the run's first settings: that branch's changed settings go aside with its checkpoints
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run / 'checkpoint_4.pt'}"]) == 0
    set_aside = {p.name for p in (run / "abandoned_after_step_4_2").iterdir()}
    assert set_aside - {"best.pt"} == {"checkpoint_5.pt", "config_resume_4.yaml", "metrics.jsonl"}  # (best.pt: if step 5's was best)
    assert not list(run.glob("config_resume_*.yaml"))


def test_a_resume_records_its_changed_settings_and_drops_a_stale_record_of_the_same_step(tmp_path):
    run = RunDir(str(tmp_path), path=tmp_path / "run_20260101_000000", writer=True)
    run.path.mkdir()
    saved = {"training": {"max_iters": 4, "resume_from_checkpoint": None}}
    resumed = {"training": {"max_iters": 6, "resume_from_checkpoint": "latest"}}
    assert run.record_resumed_config(3, saved, resumed, "training: {max_iters: 6}\n") == ["training.max_iters: 4 -> 6"]
    assert (run.path / "config_resume_3.yaml").read_text() == "training: {max_iters: 6}\n"
    # resumed from step 3 again, as saved: the earlier resume (which saved nothing after it) no longer applies
    assert run.record_resumed_config(3, saved, {"training": {**saved["training"], "resume_from_checkpoint": "x"}},
                                     "") == []
    assert not (run.path / "config_resume_3.yaml").exists()


def test_a_full_disk_is_called_so(tmp_path, monkeypatch):
    from types import SimpleNamespace

    def full_disk(*args, **kwargs):  # what torch.save says when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(rundir.torch, "save", full_disk)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda folder: SimpleNamespace(free=2**20))
    ckpt = Checkpoint(step=3, model={"w": torch.zeros(1024, 1024)}, model_config={})
    with pytest.raises(CheckpointError, match=r"^cannot write checkpoint for step 3 in .*: the disk is full \(\[enforce "
                                              r"fail at inline_container.cc:672\] . unexpected pos 576 vs 534\); 1.0 MiB "
                                              r"free on its disk, the checkpoint takes 4.0 MiB; earlier checkpoints are "
                                              r"intact$"):
        RunDir(str(tmp_path / "ck")).save(ckpt, "{}")


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
