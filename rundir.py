"""Run directories: where a run writes, which checkpoint a name means, one trainer per folder.

A run writes into <checkpoint_dir>/run_YYYYMMDD_HHMMSS/, created only when the first checkpoint
is saved. Checkpoints and config files are written with files.atomic_write, so a crash leaves each
either complete or absent (metrics.jsonl is appended to, a line at a time).
"""
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from checkpoint import (Checkpoint, CheckpointError, is_export, load_checkpoint, load_export, model_from_checkpoint,
                        low_precision_of, saved_step)
from files import atomic_write, left_by_a_dead_process, read_records, relative_to_here, resumed_configs
from model import BDH
from runtime import first_line, tensor_bytes

try:
    import fcntl
except ImportError:  # Windows: run directories are not locked
    fcntl = None

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")
RUN_CONFIG_HEADER = "# the settings this run started with, by train.py (a resume's: config_resume_<step>.yaml)\n"


def checkpoints_in(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files are never matched)."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def train_in(workdir: Path, arguments: list, python_args, note="") -> tuple[Path, list[dict]]:
    """For the benchmark scripts: prints and runs `python *python_args *arguments` (train.py, or a
    -c line that starts it) with its checkpoints in workdir/checkpoints; (its run directory, its
    metrics.jsonl records)."""
    checkpoint_dir = Path(workdir) / "checkpoints"
    arguments = [*arguments, f"training.checkpoint_dir={checkpoint_dir}"]
    print("$ train.py", " ".join(map(str, arguments)), note, flush=True)
    subprocess.run([sys.executable, *python_args, *arguments], check=True, stdout=subprocess.DEVNULL)
    [run] = checkpoint_dir.glob("run_*")  # (W&B, when on, writes its wandb/ beside it)
    return run, read_records(run / "metrics.jsonl")[0]


def resumable_in(run_dir: Path) -> list[Path]:
    """The checkpoints a run continues from, newest first: its checkpoint_<step>.pt, and before them
    best.pt when it is newer (saved after the evaluation of a step that a kill kept from its
    checkpoint, or test_freq below checkpoint_freq): it holds the whole training state too."""
    found = checkpoints_in(run_dir)[::-1]
    best_step = saved_step(run_dir / "best.pt") if (run_dir / "best.pt").is_file() else math.inf
    if best_step < math.inf and (not found or best_step > int(CHECKPOINT_RE.match(found[0].name).group(1))):
        found.insert(0, run_dir / "best.pt")
    return found


def resumable_runs(root: Path) -> list[Path]:
    """The checkpoints of the runs in `root` a resume may continue from, newest run first; a run
    that cannot be listed (another user's, in a shared folder) is skipped with a note."""
    runs = [p for p in sorted(root.glob("run_*")) if p.is_dir()] if root.is_dir() else []
    found = []
    for run in reversed(runs):
        try:
            found += resumable_in(run)
        except OSError as e:
            print(f"note: {run}: cannot be listed ({e.strerror or e}): skipped", file=sys.stderr)
    return found


def is_run_directory(folder: Path) -> bool:
    """Whether a folder is a run's (train.py writes into it): its config.yaml is the one a run wrote
    (its first line says so; runs from before it did: a run_* folder), not a config file that a copied
    checkpoint happens to lie beside, as the repository's own does."""
    config = Path(folder) / "config.yaml"
    if not config.is_file():
        return False
    if Path(folder).name.startswith("run_"):
        return True
    try:
        with open(config, encoding="utf-8", errors="replace") as f:
            return f.readline() == RUN_CONFIG_HEADER
    except OSError:
        return False


def latest_folder(spec: str, checkpoint_dir: str | None, setting: str) -> Path:
    """Where `latest` looks. A script's --checkpoint-dir (None: not given, `checkpoints`) given with
    another --checkpoint is refused: it would be ignored."""
    if setting.startswith("--") and spec != "latest" and checkpoint_dir is not None:
        raise CheckpointError(f"--checkpoint-dir {checkpoint_dir} is where `latest` looks, and --checkpoint {spec} is "
                              f"a path of its own: drop --checkpoint-dir, or give --checkpoint latest")
    return Path(checkpoint_dir or "checkpoints")


def checkpoint_candidates(spec: str, checkpoint_dir: str | None, setting: str) -> list[Path]:
    """The checkpoints spec may mean, newest first (open_checkpoint)."""
    flag = setting.startswith("--")  # a script's --checkpoint, whose folder is --checkpoint-dir
    folder = "--checkpoint-dir" if flag else "training.checkpoint_dir"
    root = latest_folder(spec, checkpoint_dir, setting)
    if spec == "latest":
        found = resumable_runs(root)
        if not found:
            what = "no run with a checkpoint in" if root.is_dir() else "there is no folder"
            raise CheckpointError(f"{setting}: latest: {what} {root}/{relative_to_here(root)}; train a run first, or "
                                  f"set {folder} to the folder that holds the runs")
        last_written = max(found, key=lambda path: path.stat().st_mtime)  # an older run resumed since, perhaps
        if last_written.parent != found[0].parent:
            print(f"note: latest is the newest run, {found[0].parent.name}; {last_written} was written more "
                  f"recently: give it (or its run directory) to {'use it' if flag else 'continue from there'}",
                  file=sys.stderr)  # (sample.py's standard output is the text alone)
        return found
    path = Path(spec)
    if path.is_dir():
        found = resumable_in(path)
        if not found:
            runs = sorted(p.name for p in path.glob("run_*") if p.is_dir() and resumable_in(p))
            with_it = f"--checkpoint-dir {path}" if flag else f"training.checkpoint_dir={path}"
            hint = (f": it holds runs; give one (e.g. {path / runs[-1]}), or `latest` with {with_it}" if runs
                    else ": export.py's output, not a checkpoint" if is_export(path) else "")
            raise CheckpointError(f"{setting}: {path} holds no checkpoint_<step>.pt{hint}")
        return found
    if not path.is_file():
        bare = path.parent == Path(".")  # a run's file named without its run, such as best.pt
        runs = sorted(run for run in root.glob("run_*") if (run / path.name).is_file()) if bare and root.is_dir() else []
        kept = checkpoints_in(path.parent) if not bare and path.parent.is_dir() else []
        removed = (match := CHECKPOINT_RE.match(path.name)) and kept and \
            int(match[1]) < int(CHECKPOINT_RE.match(kept[0].name)[1])  # older than the oldest kept
        words = ("latest",) if flag else ("latest", "auto")
        fix = (f"did you mean {runs[-1] / path.name}?" if runs else
               f"its folder holds {', '.join(p.name for p in kept[::-1])}"
               f"{' (training.keep_last_n keeps the newest only)' * bool(removed)}" if kept else
               f"did you mean {spec.lower()} (in lower case)?" if spec.lower() in words else
               f"give a checkpoint file, a run directory{', `latest`' * (not flag)} or `{words[-1]}`")
        raise CheckpointError(f"{setting}: {path} does not exist{relative_to_here(path)}; {fix}")
    return [path]


def open_checkpoint(spec: str, checkpoint_dir: str | None, setting: str = "training.resume_from_checkpoint"):
    """(path, Checkpoint) of spec: a checkpoint file, a run directory (its newest checkpoint) or
    `latest` (the newest checkpoint of the newest run in checkpoint_dir). For a run directory and
    `latest`, a checkpoint that cannot be read is skipped, with a line saying why, for the next
    newest. `setting` names the option in errors."""
    candidates = checkpoint_candidates(spec, checkpoint_dir, setting)
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            if len(candidates) == 1 and Path(spec).is_file():
                raise CheckpointError(f"{setting}: {e}") from None
            print(f"skipped {e}", file=sys.stderr)
    raise CheckpointError(f"{setting}: {spec}: none of its {len(candidates)} checkpoint(s) can be read (see above)")


def add_checkpoint_arguments(parser, exports: bool = True):
    """--checkpoint and --checkpoint-dir, as sample.py, neurons.py and export.py take them (`exports`:
    a folder export.py wrote is one too)."""
    export = " a folder export.py wrote," if exports else ""
    parser.add_argument("--checkpoint", default="latest",
                        help=f"a run's checkpoint_<step>.pt or best.pt, a run directory,{export} or latest (the "
                             f"default: the newest checkpoint of the newest run in --checkpoint-dir)")
    parser.add_argument("--checkpoint-dir", help="where `latest` looks (default: checkpoints)")


def load_model(spec: str, checkpoint_dir: str | None, setting: str) -> tuple[BDH, str, dict, str, str]:
    """(model, tokenizer as tokenizer.to_str() gives it, the low_precision settings it was trained
    with (exported_in_4bit if its weights are 4-bit already), which file and step it is, the
    dataset.parquet_dir it was trained on: "" for an export, which does not record it) of a checkpoint
    (open_checkpoint) or of a folder that export.py wrote."""
    latest_folder(spec, checkpoint_dir, setting)
    if is_export(spec):
        model, tokenizer, config = load_export(spec)
        recorded = config.get("low_precision", {})  # (an export of version 1 may have none; use_4bit: not known)
        low_precision = {**low_precision_of(config), "use_4bit": recorded.get("use_4bit"),
                         "exported_in_4bit": bool(config.get("weights_4bit"))}
        return model, tokenizer, low_precision, f"{spec} (exported at step {config['bdh_export']['step']})", ""
    source, ckpt = open_checkpoint(spec, checkpoint_dir, setting)
    return (model_from_checkpoint(ckpt), ckpt.tokenizer, ckpt.low_precision(), f"{source} (step {ckpt.step})",
            str(ckpt.config.get("dataset", {}).get("parquet_dir") or ""))


def model_line(origin: str, trained_on: str) -> str:
    """What sample.py and neurons.py say of the model they read: which one, trained on what."""
    return f"model: {origin}" + (f", trained on {trained_on}" if trained_on else "")


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
                lines.append(f"{section}.{key}: {before!r} -> {value!r}")
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
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
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

    def save(self, ckpt: Checkpoint, config_yaml: str, name: str | None = None) -> Path | None:
        """Write checkpoint_<step>.pt (or `name`) atomically; create the run directory first."""
        if not self.writer:
            return None
        try:
            if self.path is None:
                self._create(config_yaml)
            target = self.path / (name or f"checkpoint_{ckpt.step}.pt")
            atomic_write(target, lambda f: torch.save(ckpt.to_dict(), f))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            folder = self.path or self.checkpoint_dir
            why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
            try:
                free, needed = shutil.disk_usage(folder).free, tensor_bytes(ckpt.to_dict())
                if free < needed and not isinstance(e, OSError):  # torch's words: "unexpected pos 576 vs 534"
                    why = f"the disk is full ({first_line(e)})"
                why += f"; {free / 2**20:,.1f} MiB free on its disk, the checkpoint takes {needed / 2**20:,.1f} MiB"
            except OSError:
                pass
            raise CheckpointError(f"cannot write checkpoint for step {ckpt.step} in {folder}: {why}; "
                                  f"earlier checkpoints are intact")
        return target

    def record_resumed_config(self, step: int, saved: dict, config: dict, config_yaml: str) -> list[str]:
        """Keep the run's original config.yaml; if the resumed config differs from the one that wrote
        the checkpoint (`saved`: an earlier resume may have changed it), save it beside as
        config_resume_<step>.yaml and return the differences."""
        if not self.writer:
            return []
        diff = flat_diff(saved, config, ignore=("training.resume_from_checkpoint",))
        path = self.path / f"config_resume_{step}.yaml"
        if diff:
            atomic_write(path, lambda f: f.write(config_yaml.encode()))
        else:  # one left by an earlier resume from this step that saved nothing: not this run's settings
            path.unlink(missing_ok=True)
        return diff

    def set_aside_after(self, step: int) -> tuple[list[str], Path | None]:
        """A resume from an earlier step starts a new branch: the checkpoints after `step` (and a
        best.pt from after it) belong to the abandoned one. They move to a subfolder, so that
        `latest` and keep_last_n see only this branch. Returns (what moved, where)."""
        if not self.writer:
            return [], None
        later = [p for p in checkpoints_in(self.path) if int(CHECKPOINT_RE.match(p.name).group(1)) > step]
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
        if (metrics := self.path / "metrics.jsonl").exists():  # all of its records (this branch keeps those up to step)
            shutil.copy2(metrics, folder / metrics.name)
            moved.append(f"a copy of {metrics.name}")
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


def clean_stale_temporaries(checkpoint_dir) -> int:
    """Remove temporary files left by a process killed mid-write (never a live process's)."""
    removed = 0
    for tmp in Path(checkpoint_dir).glob("run_*/.*.tmp*"):
        if left_by_a_dead_process(tmp.name):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
