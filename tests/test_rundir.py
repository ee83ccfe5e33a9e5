"""Run directories: their names, temporaries left by a kill, the hold of a run directory; whole runs
resumed from an earlier step, while another process holds the run."""
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import rundir
import train
from checkpoint import Checkpoint, CheckpointError, load_checkpoint
from conftest import ROOT, run_dirs, write_config
from locate import RUN_CONFIG_HEADER, checkpoints_in, open_checkpoint
from plot import run_settings
from rundir import RunDir, clean_stale_temporaries, release_run_directories, unused


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
    elsewhere = tmp_path / "moved" / "baseline"  # a run resumed by its folder, outside training.checkpoint_dir
    elsewhere.mkdir(parents=True)
    (elsewhere / ".best.pt.tmp999999999").write_bytes(b"partial")
    assert clean_stale_temporaries(tmp_path / "ck", elsewhere) == 1 and not list(elsewhere.iterdir())


def test_a_run_killed_during_its_first_checkpoint_leaves_no_empty_directory(tmp_path):
    checkpoint_dir = tmp_path / "ck"

    def run_with(name, *files, age_s=120, where=checkpoint_dir, config=RUN_CONFIG_HEADER):
        run = where / name
        run.mkdir(parents=True)
        for file in (".lock", "config.yaml", *files):
            (run / file).write_text(config if file == "config.yaml" else "x")
            os.utime(run / file, (time.time() - age_s,) * 2)
        return run
    killed = run_with("run_20260101_000000", ".checkpoint_5.pt.tmp999999999")
    with_records = run_with("run_20260101_000001", "metrics.jsonl")
    just_created = run_with("run_20260101_000002", age_s=0)  # another process is about to write its checkpoint
    held = run_with("run_20260101_000003")
    rundir.hold(held / ".lock", "{holder}")
    os.utime(held / ".lock", (time.time() - 120,) * 2)
    by_hand = run_with("run_baseline", config="model:\n  n_layer: 4\n")  # a user's config, not a run's
    (checkpoint_dir / "run_20260101_000004").symlink_to(run_with("elsewhere", where=tmp_path))
    try:
        assert clean_stale_temporaries(checkpoint_dir) == 1
        assert rundir.remove_empty_runs(checkpoint_dir) == ["run_20260101_000000"]
    finally:
        release_run_directories()
    assert not killed.exists() and with_records.exists() and just_created.exists() and held.exists()
    assert (by_hand / "config.yaml").exists() and (tmp_path / "elsewhere" / "config.yaml").exists()


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


def test_a_new_run_is_told_of_a_stopped_run_but_not_of_one_still_training(tmp_path):
    run = RunDir(str(tmp_path))
    run.save(Checkpoint(step=3, model={}, model_config={}, config={"training": {"max_iters": 10}}), "model: {}\n")
    try:
        assert rundir.held(run.path / ".lock") and rundir.unfinished_run(str(tmp_path)) == ""  # it trains still
    finally:
        release_run_directories()
    assert not rundir.held(run.path / ".lock")
    assert rundir.unfinished_run(str(tmp_path)) == (
        f"note: the newest run in {tmp_path} stopped at step 3 of 10; this starts a new run (to continue that one "
        f"instead: training.resume_from_checkpoint={run.path})")


def test_latest_finding_a_finished_run_is_told_of_an_older_one_that_stopped(tmp_path):
    for name, step in (("run_20260101_000000", 3), ("run_20260102_000000", 10), ("run_20260103_000000", 4)):
        (tmp_path / name).mkdir()
        torch.save(Checkpoint(step=step, model={}, model_config={}, config={"training": {"max_iters": 10}}).to_dict(),
                   tmp_path / name / f"checkpoint_{step}.pt")
    finished = tmp_path / "run_20260102_000000"  # (the newer one stopped too: not what latest found)
    assert rundir.unfinished_older_run(str(tmp_path), finished) == (
        f"note: an older run, {tmp_path / 'run_20260101_000000'}, stopped at step 3 of 10: to continue it, "
        f"training.resume_from_checkpoint={tmp_path / 'run_20260101_000000'}")
    assert rundir.unfinished_older_run(str(tmp_path), tmp_path / "run_20260101_000000") == ""
    assert rundir.stopped_early(finished) is None  # at its max_iters: finished
    assert rundir.stopped_early(tmp_path / "run_20260103_000000") == (
        tmp_path / "run_20260103_000000" / "checkpoint_4.pt", 4, 10)


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
    assert set_aside == (["best.pt", "checkpoint_6.pt"] if best_step > 4 else ["checkpoint_6.pt"]) + [
        "config.yaml", "metrics.jsonl"]
    assert "a new branch from step 4: the abandoned branch's checkpoint_6.pt" in out
    assert "copies of metrics.jsonl, config.yaml moved to" in out
    assert run_settings(run / "abandoned_after_step_4")["training.max_iters"] == 6  # plot.py labels the branch
    abandoned_records = (run / "abandoned_after_step_4" / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line)["step"] for line in abandoned_records) == 6  # its curve, whole
    assert open_checkpoint("latest", str(tmp_path / "ck"))[0] == run / "checkpoint_5.pt"
    assert [p.name for p in checkpoints_in(run)] == ["checkpoint_4.pt", "checkpoint_5.pt"]
    assert max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()) == 5
    assert (run / "config_resume_4.yaml").is_file()  # max_iters 6 -> 5
    # back to step 4 with the run's first settings: that branch's changed settings go aside with its checkpoints
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run / 'checkpoint_4.pt'}"]) == 0
    set_aside = {p.name for p in (run / "abandoned_after_step_4_2").iterdir()}
    assert set_aside - {"best.pt"} == {"checkpoint_5.pt", "config_resume_4.yaml", "config.yaml", "metrics.jsonl"}
    assert run_settings(run / "abandoned_after_step_4_2")["training.max_iters"] == "6→5"  # (its resume's change)
    assert not list(run.glob("config_resume_*.yaml"))


def test_a_resume_records_its_changed_settings_and_drops_a_stale_record_of_the_same_step(tmp_path):
    run = RunDir(str(tmp_path), path=tmp_path / "run_20260101_000000", writer=True)
    run.path.mkdir()
    saved = {"training": {"max_iters": 4, "resume_from_checkpoint": None}}
    resumed = {"training": {"max_iters": 6, "resume_from_checkpoint": "latest"}}
    assert run.record_resumed_config(3, saved, resumed, "training: {max_iters: 6}\n") == ["training.max_iters: 4 -> 6"]
    assert (run.path / "config_resume_3.yaml").read_text() == (
        "# the settings this run was resumed with from step 3, by train.py\ntraining: {max_iters: 6}\n")
    # resumed from step 3 again, as saved: the earlier resume (which saved nothing after it) no longer applies
    assert run.record_resumed_config(3, saved, {"training": {**saved["training"], "resume_from_checkpoint": "x"}},
                                     "") == []
    assert not (run.path / "config_resume_3.yaml").exists()


def test_a_full_disk_is_called_so(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):  # what torch.save says when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(rundir.torch, "save", full_disk)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda folder: SimpleNamespace(free=2**20))
    ckpt = Checkpoint(step=3, model={"w": torch.zeros(1024, 1024)}, model_config={})
    with pytest.raises(CheckpointError, match=r"^cannot write checkpoint for step 3 in .*: the disk is full; 1.0 MiB "
                                              r"free on its disk, the checkpoint takes 4.0 MiB$"):
        RunDir(str(tmp_path / "ck")).save(ckpt, "{}")
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda folder: SimpleNamespace(free=2**30))  # room: a limit
    with pytest.raises(CheckpointError, match=r": \[enforce fail .* unexpected pos 576 vs 534 \(the file was cut short "
                                              r"as it was written: a limit on file size, ulimit -f, or a quota\?\); "
                                              r"1,024.0 MiB free on its disk, the checkpoint takes 4.0 MiB$"):
        RunDir(str(tmp_path / "ck")).save(ckpt, "{}")

    def refused(*args, **kwargs):  # not the disk's fault, even on a nearly full disk: its own reason
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(rundir.torch, "save", refused)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda folder: SimpleNamespace(free=2**20))
    with pytest.raises(CheckpointError, match=r"^cannot write checkpoint for step 3 in .*: Permission denied; 1.0 MiB "
                                              r"free on its disk, the checkpoint takes 4.0 MiB$"):
        RunDir(str(tmp_path / "ck")).save(ckpt, "{}")


# ---- found by mutating rundir.py: which run the notes name, a process that does not write, a file system
# without locks, what a resume records and sets aside, when an empty run directory is settled

def stopped_run(root, name, step, max_iters=10):
    """A run directory whose only checkpoint is at `step` of `max_iters`."""
    (root / name).mkdir(parents=True)
    torch.save(Checkpoint(step=step, model={}, model_config={}, config={"training": {"max_iters": max_iters}}).to_dict(),
               root / name / f"checkpoint_{step}.pt")
    return root / name


def test_the_notes_name_the_newest_stopped_run_past_runs_without_checkpoints_and_stray_files(tmp_path):
    stopped_run(tmp_path, "run_20260101_000000", 3)
    newest = stopped_run(tmp_path, "run_20260102_000000", 5)
    (tmp_path / "run_20260103_000000").mkdir()  # no checkpoint (yet): not a run to continue
    (tmp_path / "run_notes.txt").write_text("a file, sorted after the runs")
    assert rundir.unfinished_run(str(tmp_path)) == (
        f"note: the newest run in {tmp_path} stopped at step 5 of 10; this starts a new run (to continue that one "
        f"instead: training.resume_from_checkpoint={newest})")
    finished = stopped_run(tmp_path, "run_20260104_000000", 10)
    assert rundir.unfinished_older_run(str(tmp_path), finished).startswith(
        f"note: an older run, {newest}, stopped at step 5 of 10")  # the newest of the older ones


def test_auto_start_creates_a_checkpoint_dir_whose_parents_do_not_exist(tmp_path):
    rundir.hold_auto_start(str(tmp_path / "studies" / "a" / "ck"))
    try:
        assert rundir.held(tmp_path / "studies" / "a" / "ck" / ".auto.lock")
    finally:
        release_run_directories()


def test_a_run_directory_is_named_by_the_second_it_started(tmp_path):
    run = RunDir(str(tmp_path))
    before = time.strftime("run_%Y%m%d_%H%M%S")
    assert re.fullmatch(r"run_\d{8}_\d{6}", run.name) and run.name <= before
    assert run.save(Checkpoint(step=1, model={}, model_config={}), "model: {}\n").parent == tmp_path / run.name


def test_a_process_that_does_not_write_saves_prunes_and_sets_aside_nothing(tmp_path):
    assert RunDir(str(tmp_path / "ck"), writer=False).save(Checkpoint(step=1, model={}, model_config={}), "{}") is None
    assert not (tmp_path / "ck").exists()
    run = RunDir(str(tmp_path / "ck"))
    for step in (2, 4, 6):
        run.save(Checkpoint(step=step, model={}, model_config={}), "model: {}\n")
    other = RunDir(str(tmp_path / "ck"), path=run.path, writer=False)  # another rank of the same run
    other.prune(1)
    assert other.set_aside_after(2) == ([], None)
    assert [p.name for p in checkpoints_in(run.path)] == ["checkpoint_2.pt", "checkpoint_4.pt", "checkpoint_6.pt"]


def test_a_file_system_without_locks_trains_without_the_hold(tmp_path, monkeypatch):
    def no_locks(handle, operation):  # some network file systems
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    run = RunDir(str(tmp_path))
    assert run.save(Checkpoint(step=1, model={}, model_config={}), "model: {}\n") == run.path / "checkpoint_1.pt"
    RunDir(str(tmp_path), path=run.path).lock()  # a resume: not refused
    assert not rundir.held(run.path / ".lock")


def test_a_resume_with_another_checkpoint_dir_records_no_changed_settings(tmp_path):
    run = RunDir(str(tmp_path), path=tmp_path / "run_20260101_000000")
    run.path.mkdir()
    saved = {"training": {"max_iters": 4, "checkpoint_dir": "/old/ck"}}
    resumed = {"training": {"max_iters": 4, "checkpoint_dir": "/new/ck"}}  # the run goes on in its own folder
    assert run.record_resumed_config(3, saved, resumed, "training: {}\n") == []
    assert not list(run.path.glob("config_resume_*.yaml"))


def test_only_the_runs_own_unreadable_checkpoints_are_renamed(tmp_path):
    run = RunDir(str(tmp_path / "ck"))
    path = run.save(Checkpoint(step=2, model={}, model_config={}), "model: {}\n")
    elsewhere = tmp_path / "copies" / "checkpoint_2.pt"  # not this run's: left as it is
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"cut short")
    assert run.set_aside_unreadable([path, elsewhere]) == ["checkpoint_2.pt.unreadable"]
    assert elsewhere.exists() and not path.exists()


def test_a_branch_set_aside_says_a_copy_of_one_shared_file_and_copies_of_several(tmp_path):
    run = RunDir(str(tmp_path))
    for step in (2, 4, 6):
        run.save(Checkpoint(step=step, model={}, model_config={}), "model: {}\n")
    assert run.set_aside_after(4) == (["checkpoint_6.pt", "a copy of config.yaml"],
                                      run.path / "abandoned_after_step_4")
    (run.path / "metrics.jsonl").write_text('{"step": 2}\n')
    assert run.set_aside_after(2) == (["checkpoint_4.pt", "copies of metrics.jsonl, config.yaml"],
                                      run.path / "abandoned_after_step_2")


def test_an_empty_run_directory_is_settled_after_a_minute(tmp_path):
    for name, age_s in (("run_20260101_000000", 70), ("run_20260101_000001", 50)):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".lock").write_text("")
        (tmp_path / name / "config.yaml").write_text(RUN_CONFIG_HEADER + "model: {}\n")
        for file in (tmp_path / name).iterdir():
            os.utime(file, (time.time() - age_s,) * 2)
    assert rundir.remove_empty_runs(tmp_path) == ["run_20260101_000000"]
    assert (tmp_path / "run_20260101_000001").is_dir()
