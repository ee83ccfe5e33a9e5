"""Run directories: where a run writes, one trainer per folder.

A run writes into <checkpoint_dir>/run_YYYYMMDD_HHMMSS/, created only when the first checkpoint
is saved. Checkpoints and config files are written with files.atomic_write, so a crash leaves each
either complete or absent (metrics.jsonl is appended to, a line at a time). Which checkpoint a name
means is locate.py's job.
"""
import math
import os
import shlex
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from checkpoint import Checkpoint, CheckpointError, peek_checkpoint, saved_step, stopped_short
from config_file import as_yaml
from files import atomic_write, left_by_a_dead_process, resumed_configs
from locate import RUN_CONFIG_HEADER, checkpoint_step, checkpoints_in, resumable_in
from runtime import first_line, tensor_bytes

try:
    import fcntl
except ImportError:  # Windows: run directories are not locked
    fcntl = None


def check_writable(checkpoint_dir: str):
    """Fail now, not at the first checkpoint hours later, if run directories cannot be created in
    training.checkpoint_dir: a file of that name, a folder without write permission, a read-only disk."""
    folder = Path(checkpoint_dir)
    if folder.is_symlink() and not folder.exists():
        raise CheckpointError(f"training.checkpoint_dir: {folder} is a symbolic link to {os.readlink(folder)}, "
                              f"which does not exist; create that folder or set training.checkpoint_dir to another")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise CheckpointError(f"training.checkpoint_dir: {existing} is a file, not a folder; set "
                              f"training.checkpoint_dir to a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        what = f"files in {existing}" if existing == folder else f"{folder} inside {existing}"
        raise CheckpointError(f"training.checkpoint_dir: cannot create {what} ({e.strerror or e}); set "
                              f"training.checkpoint_dir to a folder you can write")


def flat_diff(old: dict, new: dict, ignore=()) -> list[str]:
    lines = []
    for section in new:
        for key, value in new[section].items():
            before = old.get(section, {}).get(key)
            if f"{section}.{key}" not in ignore and before != value:
                lines.append(f"{section}.{key}: {as_yaml(before)} -> {as_yaml(value)}")
    return lines


_LOCKED = []  # the open lock files of the run directories this process trains in


def release_run_directories():
    """Release this process's run directory locks (RunDir.lock): its training is over."""
    while _LOCKED:
        handle = _LOCKED.pop()
        try:
            fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            handle.close()


def hold(lock_file: Path, refusal: str):
    """Lock lock_file for the rest of this process (release_run_directories ends it sooner), writing
    which process holds it; held by another process: CheckpointError(refusal, its {holder} filled
    in). The operating system releases the lock when the process ends, however it ends."""
    if fcntl is None:
        return
    try:
        handle = open(lock_file, "a+")
    except OSError:
        return  # a folder this process cannot write to: saving the checkpoint will say so
    try:
        for attempt in range(3):  # (held() looks with a shared lock for an instant: the last try counts)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 2:
                    raise
                time.sleep(0.05)
    except OSError as e:
        if not isinstance(e, BlockingIOError):  # a file system without locks (some network ones)
            handle.close()
            return
        handle.seek(0)
        holder = handle.read().strip() or "a process"
        handle.close()
        raise CheckpointError(refusal.format(holder=holder))
    handle.truncate(0)
    handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _LOCKED.append(handle)


def held(lock_file: Path) -> bool:
    """Whether a process holds lock_file (hold; this one's own hold counts too)."""
    if fcntl is None or not lock_file.is_file():
        return False
    try:
        with open(lock_file) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # (closing the file releases it)
    except BlockingIOError:
        return True
    except OSError:  # unreadable, or a file system without locks
        return False
    return False


def unfinished_run(checkpoint_dir: str) -> str:
    """For a new run: a note when the newest run in checkpoint_dir stopped before its max_iters (the
    same command run again after a crash starts afresh, and `latest` then finds the new run). A run
    that another process is training is not stopped."""
    try:
        newest = next((run for run in runs_newest_first(checkpoint_dir) if resumable_in(run)), None)
    except OSError:  # a run that cannot be listed (another user's, in a shared folder): nothing to say
        return ""
    if newest is None or not (stopped := stopped_early(newest)):
        return ""
    checkpoint, step, max_iters = stopped
    return (f"note: the newest run in {checkpoint_dir} stopped at step {step} of {max_iters}; this starts a new run "
            f"(to continue that one instead: {shlex.quote(f'training.resume_from_checkpoint={checkpoint.parent}')})")


def unfinished_older_run(checkpoint_dir: str, finished: Path) -> str:
    """For `latest` or `auto`, which found the newest run finished: a note naming the newest of the
    older runs that stopped before its max_iters, which may be the one meant."""
    for run in runs_newest_first(checkpoint_dir):
        if run.name < finished.name and (stopped := stopped_early(run)):
            _, step, max_iters = stopped
            return (f"note: an older run, {run}, stopped at step {step} of {max_iters}: to continue it, "
                    f"{shlex.quote(f'training.resume_from_checkpoint={run}')}")
    return ""


def runs_newest_first(checkpoint_dir: str) -> list[Path]:
    """The run directories in checkpoint_dir, newest first; none where it cannot be listed."""
    root = Path(checkpoint_dir)
    try:
        return sorted((p for p in root.glob("run_*") if p.is_dir()), reverse=True) if root.is_dir() else []
    except OSError:
        return []


def stopped_early(run: Path) -> tuple[Path, int, int] | None:
    """(its newest checkpoint, that step, max_iters) of a run that stopped before its max_iters; None
    for a finished run, one without a checkpoint, one that another process is training, or one that
    cannot be read (another user's, in a shared folder)."""
    try:
        newest = resumable_in(run)
    except OSError:
        return None
    if not newest or held(run / ".lock"):
        return None
    saved = peek_checkpoint(newest[0]) or {}
    if not stopped_short(saved):
        return None
    return newest[0], saved["step"], saved["config"]["training"]["max_iters"]


def hold_auto_start(checkpoint_dir: str):
    """resume_from_checkpoint=auto: one job at a time decides, and trains, in checkpoint_dir. Two
    copies of a job started together would otherwise both find no run (a run directory appears at
    its first checkpoint) and train twice."""
    try:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"training.checkpoint_dir: cannot create {checkpoint_dir} ({e.strerror or e}); set "
                              f"training.checkpoint_dir to a folder you can write") from None
    hold(Path(checkpoint_dir) / ".auto.lock",
         f"{checkpoint_dir}: {{holder}} is running with training.resume_from_checkpoint=auto in this "
         f"checkpoint_dir (a copy of this job?); wait for it to end, or give this experiment a checkpoint_dir of "
         f"its own")


def _forget_locks_in_child():
    """A forked child (a DataLoader worker) closes its copies of the lock files, without unlocking
    (that would free the parent's hold): a trainer killed with kill -9 frees its run directory at
    once, not when its workers notice."""
    while _LOCKED:
        _LOCKED.pop().close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


class RunDir:
    """The run's folder, created lazily by the first save() (metrics.py writes its records there).
    Only one process of a run writes (writer=True); for the others every method does nothing."""

    def __init__(self, checkpoint_dir: str, path: Path | None = None, writer: bool = True):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.writer = writer
        self.name = path.name if path is not None else time.strftime("run_%Y%m%d_%H%M%S")
        self.path = path

    def _create(self, config_yaml: str):
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        while True:
            path = unused(self.checkpoint_dir / self.name)  # run_X_2: another run started in the same second
            try:
                path.mkdir()
                break
            except FileExistsError:  # taken meanwhile by a run starting now too
                continue
        self.path = path
        self.lock()
        atomic_write(path / "config.yaml", lambda f: f.write((RUN_CONFIG_HEADER + config_yaml).encode()))

    def lock(self):
        """Hold the run directory while this process trains in it: a second process resuming the
        same run (a job submitted twice, a resume while the run still goes) is refused, instead of
        interleaving its records and checkpoints with the first's."""
        if self.writer:
            hold(self.path / ".lock", f"{self.path}: {{holder}} is training in this run directory; wait for it to "
                                      f"end (or stop it), then resume")

    def save(self, ckpt: Checkpoint, config_yaml: str, name: str | None = None, best=False) -> Path | None:
        """Write checkpoint_<step>.pt (or `name`) atomically; create the run directory first. `best`:
        write best.pt first, then the checkpoint as a copy of its bytes (serialized once; stopped
        between the two, best.pt is the newer checkpoint, which `latest` takes)."""
        if not self.writer:
            return None
        try:
            if self.path is None:
                self._create(config_yaml)
            target = self.path / (name or f"checkpoint_{ckpt.step}.pt")
            first = self.path / "best.pt" if best else target
            atomic_write(first, lambda f: torch.save(ckpt.to_dict(), f))
            if best:
                with open(first, "rb") as source:
                    atomic_write(target, lambda f: shutil.copyfileobj(source, f, 16 << 20))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            folder = self.path or self.checkpoint_dir
            why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
            try:
                free, needed = shutil.disk_usage(folder).free, tensor_bytes(ckpt.to_dict())
                if free < needed and not isinstance(e, OSError):  # torch's words: "unexpected pos 576 vs 534"
                    why = "the disk is full"
                elif "unexpected pos" in why:  # a write cut short, not for want of space
                    why += " (the file was cut short as it was written: a limit on file size, ulimit -f, or a quota?)"
                why += f"; {free / 2**20:,.1f} MiB free on its disk, the checkpoint takes {needed / 2**20:,.1f} MiB"
            except OSError:
                pass
            raise CheckpointError(f"cannot write checkpoint for step {ckpt.step} in {folder}: {why}")
        return target

    def space_warning(self, checkpoint_bytes: int) -> str | None:
        """A warning at the start where the disk of the run's folder has less free space than one
        checkpoint: the first checkpoint would fail after training up to it."""
        if not self.writer:
            return None
        folder = self.path or self.checkpoint_dir
        while not folder.exists() and folder != folder.parent:  # (checkpoint_dir is created with the run)
            folder = folder.parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return None
        if free >= checkpoint_bytes * 1.05:
            return None
        return (f"WARNING: {free / 2**20:,.1f} MiB free on the disk of {folder}, and a checkpoint takes about "
                f"{checkpoint_bytes / 2**20:,.1f} MiB: the first checkpoint would fail after the steps before it; make "
                f"room, or set training.checkpoint_dir to another disk")

    def record_resumed_config(self, step: int, saved: dict, config: dict, config_yaml: str) -> list[str]:
        """Keep the run's original config.yaml; if the resumed config differs from the one that wrote
        the checkpoint (`saved`: an earlier resume may have changed it), save it beside as
        config_resume_<step>.yaml and return the differences."""
        if not self.writer:
            return []
        # (checkpoint_dir: the run goes on in its own directory whatever it says)
        diff = flat_diff(saved, config, ignore=("training.resume_from_checkpoint", "training.checkpoint_dir"))
        path = self.path / f"config_resume_{step}.yaml"
        if diff:
            header = f"# the settings this run was resumed with from step {step}, by train.py\n"
            try:
                atomic_write(path, lambda f: f.write((header + config_yaml).encode()))
            except OSError as e:  # a full disk
                raise CheckpointError(f"cannot write {path} ({e.strerror or e}); the checkpoints are intact: make "
                                      f"room (or fix the folder), then resume again") from None
        else:  # one left by an earlier resume from this step that saved nothing: not this run's settings
            path.unlink(missing_ok=True)
        return diff

    def set_aside_after(self, step: int) -> tuple[list[str], Path | None]:
        """A resume from an earlier step starts a new branch: the checkpoints after `step` (and a
        best.pt from after it) belong to the abandoned one. They move to a subfolder, so that
        `latest` and keep_last_n see only this branch. Returns (what moved, where)."""
        if not self.writer:
            return [], None
        later = [p for p in checkpoints_in(self.path) if checkpoint_step(p) > step]
        best = self.path / "best.pt"
        if best.exists() and saved_step(best) > step:
            later.append(best)
        if not later:
            return [], None
        later += [path for at, path in resumed_configs(self.path) if at >= step]  # that branch's settings
        folder = unused(self.path / f"abandoned_after_step_{step}")
        folder.mkdir()
        for path in later:
            path.rename(folder / path.name)
        moved = [p.name for p in later]
        # copies of what the two branches share: all of the records (this branch keeps those up to
        # step), and the settings before step, so that the folder describes its branch (plot.py's labels)
        shared = [self.path / "metrics.jsonl", self.path / "config.yaml",
                  *(path for at, path in resumed_configs(self.path) if at < step)]
        copied = [path.name for path in shared if path.exists()]
        for name in copied:
            shutil.copy2(self.path / name, folder / name)
        if copied:
            moved.append(f"copies of {', '.join(copied)}" if len(copied) > 1 else f"a copy of {copied[0]}")
        return moved, folder

    def set_aside_best(self, step: int) -> str | None:
        """The run's best.pt, renamed best_until_step_<step>.pt: a resume whose validation losses
        measure something else starts best.pt afresh, and the old best model stays. Returns the new name."""
        best = self.path / "best.pt" if self.writer and self.path is not None else None
        if best is None or not best.exists():
            return None
        kept = unused(self.path / f"best_until_step_{step}.pt")
        best.rename(kept)
        return kept.name

    def set_aside_unreadable(self, paths) -> list[str]:
        """The run's checkpoints among `paths` that a resume could not read, and its best.pt if it
        cannot be read, renamed <name>.unreadable: keep_last_n would count them as kept, and a branch
        would take them for its later steps. Returns the new names."""
        if not self.writer or self.path is None:
            return []
        renamed, best = [], self.path / "best.pt"
        for path in [*paths, *[best] * (best.is_file() and saved_step(best) == math.inf)]:
            if path.parent == self.path and path.exists():
                aside = unused(path.with_name(path.name + ".unreadable"))
                path.rename(aside)
                renamed.append(aside.name)
        return renamed

    def prune(self, keep_last_n: int):
        """Delete all but the newest keep_last_n checkpoint_<step>.pt (0 keeps all); best.pt stays."""
        if self.writer and keep_last_n > 0 and self.path is not None:
            for old in checkpoints_in(self.path)[:-keep_last_n]:
                old.unlink(missing_ok=True)


def unused(path: Path) -> Path:
    """`path`, or the first of path_2, path_3, ... (the number before its suffix) that does not exist."""
    candidate, n = path, 2
    while os.path.lexists(candidate):  # a dangling link's name is taken too
        candidate, n = path.with_name(f"{path.stem}_{n}{path.suffix}"), n + 1
    return candidate


def clean_stale_temporaries(checkpoint_dir, run_dir: Path | None = None) -> int:
    """Remove temporary files left by a process killed mid-write (never a live process's) in the runs
    of checkpoint_dir, and in run_dir (a run resumed by its folder may lie elsewhere)."""
    removed = 0
    found = set(Path(checkpoint_dir).glob("run_*/.*.tmp*")) | set(Path(run_dir).glob(".*.tmp*") if run_dir else ())
    for tmp in found:
        if left_by_a_dead_process(tmp.name):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


EMPTY_RUN_SETTLED_S = 60  # an empty run directory untouched this long is not one another process is filling


def remove_empty_runs(checkpoint_dir) -> list[str]:
    """Remove the run directories of checkpoint_dir that hold only the .lock and config.yaml that
    train.py wrote, untouched for EMPTY_RUN_SETTLED_S and not held: a run killed while it wrote its
    first checkpoint (clean_stale_temporaries took the partial file). Returns their names."""
    removed = []
    for run in runs_newest_first(checkpoint_dir):
        try:
            entries = list(run.iterdir())
            if run.is_symlink() or {p.name for p in entries} != {".lock", "config.yaml"}:
                continue
            settled = all(time.time() - p.stat().st_mtime > EMPTY_RUN_SETTLED_S for p in entries)
            written_by_train = (run / "config.yaml").read_text(errors="replace").startswith(RUN_CONFIG_HEADER)
            if settled and written_by_train and not held(run / ".lock"):  # (not a folder a user made)
                for p in entries:
                    p.unlink()
                run.rmdir()
                removed.append(run.name)
        except OSError:  # another user's run, or one that changed meanwhile: left as it is
            continue
    return removed
