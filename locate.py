"""Which checkpoint a name means: a checkpoint file, a run directory (its newest checkpoint) or
`latest` (the newest run's), as training.resume_from_checkpoint and the scripts' --checkpoint take
them; the model the scripts read from one (an export.py folder too); the run a benchmark's training
wrote.
"""
import contextlib
import difflib
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from checkpoint import (CheckpointError, is_export, load_checkpoint, load_export, low_precision_of,
                        model_from_checkpoint, peek_checkpoint, saved_step, stopped_short)
from config_file import config_value
from files import near_miss, read_records, relative_to_here
from model import BDH

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")
RUN_CONFIG_HEADER = "# the settings this run started with, by train.py (a resume's: config_resume_<step>.yaml)\n"


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint_<step>.pt file's name; None for any other name."""
    return int(match[1]) if (match := CHECKPOINT_RE.match(path.name)) else None


def continues_in_place(path: Path) -> bool:
    """Whether a resume from this checkpoint writes into its run directory (resume.reopen_run)."""
    return is_run_directory(path.parent) and os.access(path.parent, os.W_OK)


def checkpoints_in(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files are never matched)."""
    found = [(step, p) for p in run_dir.iterdir() if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def resumable_in(run_dir: Path) -> list[Path]:
    """The checkpoints a run continues from, newest first: its checkpoint_<step>.pt, and best.pt
    among them by its step, after a checkpoint of the same step. It holds the whole training state
    too: newer than the newest checkpoint where a kill came between the evaluation's best.pt and
    the step's checkpoint (or test_freq is below checkpoint_freq), and the step's state still where
    that checkpoint cannot be read."""
    found = checkpoints_in(run_dir)[::-1]
    best = run_dir / "best.pt"
    if best.is_file() and (best_step := saved_step(best)) < math.inf:  # (inf: it cannot be read)
        older = (i for i, path in enumerate(found) if checkpoint_step(path) < best_step)
        found.insert(next(older, len(found)), best)
    return found


def holds_checkpoints(folder: Path) -> bool:
    """Whether a folder holds checkpoints a run continues from; False where it cannot be listed (another
    user's run, in a shared folder)."""
    try:
        return bool(resumable_in(folder))
    except OSError:
        return False


def is_run_with_checkpoints(folder: Path) -> bool:
    """Whether a folder is one run's directory, with checkpoints to continue from."""
    try:
        return is_run_directory(folder) and holds_checkpoints(folder)
    except OSError:  # its config.yaml cannot be looked at
        return False


def one_run_given(root: Path, setting: str, word: str) -> CheckpointError:
    """`latest` or `auto` (`word`), where the folder of runs given is one run's directory."""
    fix = f"as --checkpoint {root}, instead of --checkpoint-dir" if setting.startswith("--") else f"to {setting}"
    return CheckpointError(f"{setting}: {word}: {root} is a run directory, not a folder of runs: give it {fix}")


def found_newest(training) -> bool:
    """Whether a resume's checkpoint was found, not named: resume_from_checkpoint `latest`, or `auto`,
    which resume.resume_target has made `latest` by then. Perhaps another experiment's run."""
    return training.resume_from_checkpoint == "latest"


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


def folders_of_runs(folder: Path) -> list[Path]:
    """The folders in `folder` that hold runs with checkpoints (each an experiment's checkpoint_dir);
    none where a folder cannot be listed."""
    try:
        return sorted(sub for sub in folder.iterdir() if sub.is_dir() and any(
            is_run_with_checkpoints(run) for run in sub.glob("run_*")))
    except OSError:  # not a folder, or one that cannot be listed
        return []


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
    root = latest_folder(spec, checkpoint_dir, setting)
    if spec == "latest":
        return newest_run_checkpoints(root, setting)
    path = Path(spec)
    if path.is_dir():
        if not (found := resumable_in(path)):
            raise CheckpointError(f"{setting}: {path} holds no checkpoint_<step>.pt{why_no_checkpoint(path, setting)}")
        return found
    if path.exists() and not path.is_file():  # a device, a pipe
        raise CheckpointError(f"{setting}: {path} is not a file; give {what_to_give(setting)}")
    if not path.is_file():
        raise not_found(spec, root, setting)
    return [path]


def newest_run_checkpoints(root: Path, setting: str) -> list[Path]:
    """`latest`: the resumable checkpoints in the folder of runs, the newest run's first; notes on an
    older run written since (and, for a script, one that trained further)."""
    flag = setting.startswith("--")  # a script's --checkpoint, whose folder is --checkpoint-dir
    folder = "--checkpoint-dir" if flag else "training.checkpoint_dir"
    found = resumable_runs(root)
    if not found:
        if is_run_with_checkpoints(root):  # the folder of one run, given for the folder that holds them
            raise one_run_given(root, setting, "latest")
        if root.is_file():  # (a checkpoint file given for the folder of runs)
            raise CheckpointError(f"{setting}: latest: {folder} {root} is a file, not a folder of runs; give the file "
                                  f"itself: {setting}{' ' if flag else '='}{root}")
        what = "no run with a checkpoint in" if root.is_dir() else "there is no folder"
        fix = (f"set {folder} to one of its folders of runs: {', '.join(map(str, experiments))}"
               if (experiments := folders_of_runs(root)) else
               f"train a run first, or set {folder} to the folder that holds the runs"
               + ("" if flag else " (a job that may restart before its first checkpoint: "
                                  "training.resume_from_checkpoint=auto starts a new run where there is none)"))
        raise CheckpointError(f"{setting}: latest: {what} {root}/{relative_to_here(root)}; {fix}")
    last_written = max(found, key=lambda path: path.stat().st_mtime)  # an older run resumed since, perhaps
    if last_written.parent != found[0].parent:
        print(f"note: latest is the newest run, {found[0].parent.name}; {last_written} was written more "
              f"recently: give it (or its run directory) to {'use it' if flag else 'continue from there'}",
              file=sys.stderr)  # (sample.py's standard output is the text alone)
    if flag:
        trained_further(found, named=last_written.parent)
    return found


def why_no_checkpoint(path: Path, setting: str) -> str:
    """What a folder given for a checkpoint, and holding none, is instead: a folder of runs, of
    experiments, an export, a run stopped before its first checkpoint."""
    flag = setting.startswith("--")  # a script's --checkpoint, whose folder is --checkpoint-dir
    folder = "--checkpoint-dir" if flag else "training.checkpoint_dir"
    runs = sorted(p.name for p in path.glob("run_*") if p.is_dir() and holds_checkpoints(p))
    with_it = f"--checkpoint-dir {path}" if flag else f"training.checkpoint_dir={path}"
    experiments = [] if runs else folders_of_runs(path)
    return (f": it holds runs; give one (e.g. {path / runs[-1]}), or `latest` with {with_it}" if runs
            else f": it holds folders of runs ({', '.join(map(str, experiments))}): give a run of one, or "
                 f"`latest` with {folder} set to one" if experiments
            else f": export.py's output, not a checkpoint{exported_from(path)}" if is_export(path) else
            f": a folder export.py wrote, without its model.safetensors (copied in part?): copy that file into it"
            f"{exported_from(path)}" if export_source(path) else
            ": its run stopped before its first checkpoint" + ("" if flag else f"; start it again without {setting}")
            if is_run_directory(path) else "")


def what_to_give(setting: str) -> str:
    """What a checkpoint setting takes: a script's --checkpoint, or training.resume_from_checkpoint."""
    return ("a checkpoint file, a run directory or `latest`" if setting.startswith("--") else
            "a checkpoint file, a run directory, `latest` or `auto`")


def not_found(spec: str, root: Path, setting: str) -> CheckpointError:
    """The error for a checkpoint file that does not exist, with the likeliest meaning."""
    flag = setting.startswith("--")  # a script's --checkpoint
    path = Path(spec)
    bare = path.parent == Path(".")  # a run's file named without its run, such as best.pt (or best)
    name = path.name if path.suffix else f"{path.name}.pt"
    runs = sorted(run for run in root.glob("run_*") if (run / name).is_file()) if bare and root.is_dir() else []
    kept = checkpoints_in(path.parent) if not bare and path.parent.is_dir() else []
    step = checkpoint_step(path)
    removed = step is not None and kept and step < checkpoint_step(kept[0])  # older than the oldest kept
    words = ("latest",) if flag else ("latest", "auto")
    near = (near_miss(path, keep=lambda entry: entry.is_dir() and holds_checkpoints(entry))  # a run's name mistyped
            if not bare and not kept else None)
    with_pt = Path(f"{path}.pt") if not path.suffix and Path(f"{path}.pt").is_file() else None  # run/best
    fix = (f"did you mean {with_pt}?" if with_pt else f"did you mean {runs[-1] / name}?" if runs else
           f"did you mean {near}?" if near else
           f"its folder holds {', '.join(p.name for p in kept[::-1])}"
           f"{' (if it was saved, it went: training.keep_last_n keeps the newest only)' * bool(removed)}" if kept else
           f"did you mean {spec.lower()} (in lower case)?" if spec.lower() in words else
           "for a new run, leave it out or give null (YAML's word for none)"
           if not flag and spec.lower() in ("none", "no", "false", "off", "new") else
           f"give {what_to_give(setting)}")
    close = difflib.get_close_matches(spec.lower(), words, 1, 0.75) if not re.search(r"[/.]", spec) else []
    fix = f"did you mean `{close[0]}`? ({fix})" if close and fix.startswith("give") else fix
    return CheckpointError(f"{setting}: {path} does not exist{relative_to_here(path)}; {fix}")


def trained_further(found: list[Path], named: Path):
    """For a script's `latest` (the newest run's newest checkpoint, found[0]): a note naming an older
    run of the same model (shape, tokenizer and training data) that trained further, where the newest run
    stopped before its max_iters (a finished run of a shorter experiment is what it is; a checkpoint that
    records no max_iters gets no note). `named`: a run a note has named already."""
    newest = peek_checkpoint(found[0]) or {}
    if not stopped_short(newest):
        return
    step = newest["step"]
    older = sorted(((checkpoint_step(path) or saved_step(path), path) for path in found
                    if path.parent not in (found[0].parent, named)), key=lambda step_path: step_path[0], reverse=True)
    for further, path in older:
        if further <= step:
            return
        if further < math.inf and same_model(peek_checkpoint(path) or {}, newest):  # (inf: a best.pt not readable)
            print(f"note: latest is the newest run, {found[0].parent.name}, stopped at step {step}; {path.parent.name} "
                  f"trained further (step {further}): give --checkpoint {path.parent} to use it", file=sys.stderr)
            return


def same_model(saved: dict, other: dict) -> bool:
    """Whether two checkpoints' dicts (peek_checkpoint) are of one model: its shape, tokenizer and training data."""
    return (saved.get("model_config") == other.get("model_config")
            and saved.get("tokenizer", "bytes") == other.get("tokenizer", "bytes")
            and config_value(saved.get("config") or {}, "dataset.parquet_dir")
            == config_value(other.get("config") or {}, "dataset.parquet_dir"))


def export_source(folder: Path) -> str | None:
    """The checkpoint a folder export.py wrote came from, as its config.json records it (None: not known)."""
    try:
        source = json.loads((Path(folder) / "config.json").read_text())["bdh_export"]["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return source if isinstance(source, str) else None


def exported_from(folder: Path) -> str:
    """'(exported from <checkpoint>: give that checkpoint)', or "" where it is not known."""
    source = export_source(folder)
    return f" (exported from {source}: give that checkpoint)" if source else ""


def open_checkpoint(spec: str, checkpoint_dir: str | None, setting: str = "training.resume_from_checkpoint",
                    skipped: list | None = None):
    """(path, Checkpoint) of spec: a checkpoint file, a run directory (its newest checkpoint) or
    `latest` (the newest checkpoint of the newest run in checkpoint_dir). For a run directory and
    `latest`, a checkpoint that cannot be read is skipped, with a line saying why, for the next
    newest (and added to `skipped`). `setting` names the option in errors."""
    candidates = checkpoint_candidates(spec, checkpoint_dir, setting)
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            if len(candidates) == 1 and Path(spec).is_file():
                folder = Path(spec).parent
                if is_export(folder):  # its model.safetensors or config.json
                    raise CheckpointError(f"{setting}: {spec} is a file of {folder}, a folder export.py wrote: "
                                          f"give that folder (to export again, the checkpoint it came from)") from None
                try:
                    others = len(resumable_in(folder)) > 1 and is_run_directory(folder)
                except OSError:  # a folder that cannot be listed
                    others = False
                raise CheckpointError(f"{setting}: {e}" + (f"; its run directory, {folder}, gives the newest "
                                                           f"checkpoint that can be read") * others) from None
            print(f"skipped {e}", file=sys.stderr)
            if skipped is not None:
                skipped.append(path)
    if spec != "latest":
        raise CheckpointError(f"{setting}: {spec}: none of its {len(candidates)} checkpoint(s) can be read (see above)")
    root, restart = latest_folder(spec, checkpoint_dir, setting), ""
    if not setting.startswith("--"):  # (`auto` too, which a requeued job would otherwise repeat)
        restart = ("; to train anew, set training.resume_from_checkpoint=null, or move those runs out of it (auto "
                   "then starts a new run)")
    raise CheckpointError(f"{setting}: the runs in {root}: none of their {len(candidates)} checkpoint(s) can be read "
                          f"(see above){restart}")


def add_checkpoint_arguments(parser, exports: bool = True):
    """--checkpoint and --checkpoint-dir, as sample.py, neurons.py and export.py take them (`exports`:
    a folder export.py wrote is one too)."""
    export = " a folder export.py wrote," if exports else ""
    parser.add_argument("--checkpoint", default="latest",
                        help=f"a run's checkpoint_<step>.pt or best.pt, a run directory,{export} or latest (the "
                             f"default: the newest checkpoint of the newest run in --checkpoint-dir)")
    parser.add_argument("--checkpoint-dir", help="where `latest` looks (default: checkpoints)")


def load_model(spec: str, checkpoint_dir: str | None,
               setting: str) -> tuple[BDH, str, dict, str, str, int | None]:
    """(model, tokenizer as tokenizer.to_str() gives it, the low_precision settings it was trained
    with (exported_in_4bit if its weights are 4-bit already), which file and step it is, the
    dataset.parquet_dir it was trained on ("" for an export, which does not record it), the
    block_size it was trained with (None: not recorded)) of a checkpoint (open_checkpoint) or of a
    folder that export.py wrote."""
    latest_folder(spec, checkpoint_dir, setting)
    if is_export(spec):
        model, tokenizer, config = load_export(spec)
        recorded = config.get("low_precision", {})  # (an export of version 1 may have none; use_4bit: not known)
        low_precision = {**low_precision_of(config), "use_4bit": recorded.get("use_4bit"),
                         "exported_in_4bit": bool(config.get("weights_4bit"))}
        return (model, tokenizer, low_precision, f"{spec} (exported at step {config['bdh_export']['step']})", "",
                config.get("trained_block_size"))
    source, ckpt = open_checkpoint(spec, checkpoint_dir, setting)
    return (model_from_checkpoint(ckpt), ckpt.tokenizer, ckpt.low_precision(), f"{source} (step {ckpt.step})",
            str(config_value(ckpt.config, "dataset.parquet_dir") or ""),
            config_value(ckpt.config, "training.block_size"))


def model_line(origin: str, trained_on: str) -> str:
    """What sample.py and neurons.py say of the model they read: which one, trained on what."""
    return f"model: {origin}" + (f", trained on {trained_on}" if trained_on else "")


def train_in(workdir: Path, arguments: list, python_args, note="") -> tuple[Path, list[dict]]:
    """For the benchmark scripts: prints and runs `python *python_args *arguments` (train.py, or a
    -c line that starts it) with its checkpoints in workdir/checkpoints, passing on its step and
    evaluation lines (indented) as its progress, and its notes and warnings (a warmup longer than the
    run, say); (its run directory, its metrics.jsonl records)."""
    checkpoint_dir = Path(workdir) / "checkpoints"
    arguments = [*arguments, f"training.checkpoint_dir={checkpoint_dir}"]
    print("$ train.py", " ".join(map(str, arguments)), note, flush=True)
    # in a session of its own: a signal stops the benchmark, which then stops train.py and its loader workers
    with subprocess.Popen([sys.executable, *python_args, *arguments], stdout=subprocess.PIPE, text=True,
                          errors="replace", start_new_session=True) as process:
        try:
            for line in process.stdout:
                # "step 100/2000 | loss ... | eta", "step 100: val loss ...", "note: ...", "WARNING: ..."
                if line.startswith(("step ", "note: ", "WARNING: ")):
                    print("  " + line, end="", flush=True)
        except BaseException:  # before the benchmark's folder of runs goes
            with contextlib.suppress(ProcessLookupError):  # (it ended meanwhile)
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, process.args)
    [run] = checkpoint_dir.glob("run_*")  # (W&B, when on, writes its wandb/ beside it)
    return run, read_records(run / "metrics.jsonl")[0]
