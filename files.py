"""Crash-safe files. A file is written under a temporary name beside its place, fsynced and renamed
into place; a folder is built under a temporary name and renamed. A kill at any moment leaves the
old version or the new one, never part of one. Temporaries are named after their writer (host and
pid), so that one a killed process left behind can be told from one still being written.

Appended files (metrics.jsonl) cannot be written that way: read_records skips a line that a kill
cut short.

Also the checks of the output paths the scripts are given (picture_path, output_path), how to name
a path or a script in a message, and what files start with.
"""
import difflib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

DESKTOP_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}  # what a file browser leaves in a folder it showed

REPO = Path(__file__).resolve().parent  # the repository's folder: its scripts, wherever they run from

RESUMED_CONFIG_RE = re.compile(r"config_resume_(\d+)\.yaml")


PARQUET_MAGIC = b"PAR1"  # the first bytes of a parquet file, whatever its name
ZIP_MAGIC = b"PK\x03\x04"  # of a zip archive, such as torch.save writes
ARROW_MAGICS = (b"ARROW1", b"\xff\xff\xff\xff")  # of an Arrow IPC file, or stream (Hugging Face datasets' .arrow)
UTF_BOMS = {b"\xff\xfe\x00\x00": "utf-32", b"\x00\x00\xfe\xff": "utf-32", b"\xff\xfe": "utf-16",
             b"\xfe\xff": "utf-16"}  # byte-order marks: Windows Notepad's "Unicode", PowerShell's > write UTF-16


def bom_encoding(raw: bytes) -> str | None:
    """The UTF-16 or UTF-32 encoding that the byte-order mark at the start of `raw` names; None without one."""
    return next((UTF_BOMS[bom] for bom in UTF_BOMS if raw.startswith(bom)), None)


def resumed_configs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of a run directory's config_resume_<step>.yaml, the config of each resume (from
    that step) that changed its settings, in step order."""
    found = [(int(m.group(1)), path) for path in Path(run_dir).glob("config_resume_*.yaml")
             if (m := RESUMED_CONFIG_RE.fullmatch(path.name))]
    return sorted(found)


def temporary_suffix() -> str:
    """.tmp<host>-<pid>: the host too, as folders may be shared between machines."""
    return f".tmp{socket.gethostname()}-{os.getpid()}"


def left_by_a_dead_process(name: str) -> bool:
    """Whether a name with temporary_suffix() (or the .tmp<pid> of earlier versions) was written
    by a process of this host that no longer runs."""
    host, _, pid = name.rsplit(".tmp", 1)[-1].rpartition("-")
    if not pid.isdigit() or host not in ("", socket.gethostname()):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def atomic_write(path: Path, write):
    """Call write(file) on a temporary file next to path, fsync it, then rename it into place."""
    tmp = path.with_name(f".{path.name}{temporary_suffix()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only disk: the write's own error is the one to see
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def tell_torchrun(message: str, consequence: bool = False):
    """Under torchrun: the line that says why this rank failed, for the summary torchrun prints when a
    rank fails. Its "traceback" is what the rank wrote to TORCHELASTIC_ERROR_FILE (torch's format, as
    its ErrorHandler writes it); without that file it is a link to its docs, forty lines below the
    error. `consequence`: a failure that follows another rank's (a lost peer), dated a second later,
    since the summary's root cause is the earliest."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    when = str(int(time.time()) + consequence)
    record = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": when}}}
    try:
        atomic_write(Path(path), lambda f: f.write(json.dumps(record).encode()))
    except OSError:  # (a full disk, say): the line is on stderr all the same
        pass


def write_folder(out_dir, write, replace=False, keep_existing=False, written_here=lambda path: False):
    """write(folder) into a temporary sibling of out_dir, then move it into place: out_dir appears
    whole or not at all, and a failure leaves nothing. An out_dir that holds files is refused,
    replaced (replace; only when every entry is one this command writes, by written_here(path), or
    a file browser's: an input file or a run's checkpoints in it are never deleted) or kept (keep_existing: another
    process built it first). Temporary folders of processes that died (killed mid-build) are
    removed first; the folders made for out_dir go with a failure."""
    shown = Path(out_dir)  # (for the messages)
    if shown.name in ("", ".", ".."):
        raise FileExistsError(f"{shown}: give a new folder's name, not the current or a parent folder")
    # where the OS puts it: link/../out beside the link's target (a dangling link is not followed: no folder is
    # made where a disk is not mounted)
    out_dir = Path(os.path.realpath(shown.parent)) / shown.name if shown.parent.exists() else shown
    if out_dir.is_symlink():
        raise FileExistsError(f"{shown}: is a symbolic link; give the folder it points to ({os.path.realpath(out_dir)})")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{shown}: is a file, not a folder; choose another --out")
    clean_up_after_dead_writers(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if keep_existing:
            return None
        check_replaceable(out_dir, shown, replace, written_here)
    tmp = out_dir.with_name(f".{out_dir.name}{temporary_suffix()}")
    # what write(tmp) makes, deepest first (x/../out: x, not the x/.. that stands for a folder that exists)
    made = [folder for folder in out_dir.absolute().parents if not folder.exists() and ".." not in folder.parts]
    try:
        result = write(tmp)
        if out_dir.is_dir() and any(out_dir.iterdir()) and keep_existing:  # another process was faster
            shutil.rmtree(tmp)
            return None
        old = out_dir.with_name(f".{out_dir.name}.old{temporary_suffix()}")
        replaced = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # (empty: one another process filled meanwhile stays)
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    if replaced:
        print(f"replaced what {shown} held: {', '.join(replaced[:3])}{' ...' * (len(replaced) > 3)} "
              f"({len(replaced):,} {'entries' if len(replaced) > 1 else 'entry'})")
    return result


def clean_up_after_dead_writers(out_dir: Path):
    """Removes the temporary folders that write_folder's processes killed mid-build left beside out_dir,
    and finishes a replace killed between its two renames."""
    for stale in (*out_dir.parent.glob(f"{out_dir.name}.tmp*"), *out_dir.parent.glob(f".{out_dir.name}.tmp*")):
        if left_by_a_dead_process(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    for old in out_dir.parent.glob(f".{out_dir.name}.old.tmp*"):
        if left_by_a_dead_process(old.name):
            if out_dir.exists():  # the new folder is in place
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(out_dir)


def check_replaceable(out_dir: Path, shown: Path, replace: bool, written_here):
    """Refuses a folder that holds files: without `replace`, or holding any that this command does not
    write (written_here) and a file browser did not leave."""
    others = sorted(p.name for p in out_dir.iterdir()
                    if not written_here(p) and not (p.name in DESKTOP_FILES and p.is_file()))
    if not replace and not others:
        raise FileExistsError(f"{shown}: the folder holds files already; choose another --out, or add "
                              f"--replace to replace them")
    if others:  # (--replace or not: it would not help)
        held = f"{', '.join(others[:3])}{' ...' if len(others) > 3 else ''}"
        raise FileExistsError(f"{shown}: " + (f"--replace replaces only what this command writes, and the "
                                                f"folder also holds {held}" if replace else
                                                f"the folder holds {held} already") +
                              f"; move {'them' if len(others) > 1 else 'it'} out or choose another --out")


def read_records(path) -> tuple[list[dict], list[int]]:
    """The records of a JSON-lines file with a `step` (metrics.jsonl), and the numbers of the lines
    that are not one (a write cut short by a kill)."""
    records, skipped = [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            skipped.append(n)
    return records, skipped


def picture_path(out: str) -> Path:
    """The --out of a picture (plot.py, neurons.py), checked before any work: a file name whose
    extension matplotlib writes (it would add .png to a name without one), as output_path checks it."""
    from matplotlib.figure import Figure
    formats = set(Figure().canvas.get_supported_filetypes()) - {"pgf"}  # (pgf needs a LaTeX installation)
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name, e.g. {path / 'picture.png'}")
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"--out {out}: give a file name ending in .png (or .{', .'.join(sorted(set(formats) - {'png'}))})")
    return output_path(out, "--out")


def output_path(out: str, option: str) -> Path:
    """A file a script writes at the end, checked before any work (the work is not lost to a typo):
    not a folder, and writable, or its folder can be made (made when the file is written:
    folder_made_for; a command refused meanwhile leaves nothing)."""
    path = Path(out)
    if path.is_dir() or out.endswith(os.sep):  # (Path drops a trailing /)
        raise ValueError(f"{option} {out}: is a folder; give a file name in it")
    if not path.parent.is_dir():
        existing = next(folder for folder in path.absolute().parents if folder.exists())
        try:
            if not existing.is_dir():
                raise NotADirectoryError(f"{existing} is a file")
            os.rmdir(tempfile.mkdtemp(dir=existing))  # can a folder be made there?
        except OSError as e:
            raise ValueError(f"{option} {out}: cannot make its folder {path.parent} ({e.strerror or e})") from None
        return path
    existed = path.exists()
    try:
        with open(path, "ab"):  # can it be written? (a read-only folder, /proc, ...)
            pass
    except OSError as e:
        raise ValueError(f"{option} {out}: cannot write it ({e.strerror or e})")
    if not existed:
        path.unlink()
    return path


def folder_made_for(path) -> Path:
    """The path of a file about to be written (output_path checked it), its folder made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def check_outputs(parser, outputs: dict):
    """{option: its value or None} of the files a script writes at the end: an unwritable one, or one
    file given to two options (the second would overwrite the first), is a usage error now (output_path)."""
    given = {option: os.path.realpath(out) for option, out in outputs.items() if out and not os.path.isdir(out)}
    for option, path in given.items():  # (before output_path makes any folder; a folder: output_path's error)
        if other := next((o for o in given if o != option and given[o] == path), None):
            parser.error(f"{option} and {other} name the same file, {outputs[option]}: give each a file of its own")
    for option, out in outputs.items():
        if out:
            try:
                output_path(out, option)
            except ValueError as e:
                parser.error(str(e))


def does_not_exist(path, keep=Path.is_file, otherwise: str = "") -> str:
    """'does not exist', where a relative path was looked for, and a close name that `keep` takes
    (near_miss) as '; did you mean ...?', else '; ' + `otherwise` where given."""
    near = near_miss(path, keep)
    return (f"does not exist{relative_to_here(path)}"
            + (f"; did you mean {near}?" if near else f"; {otherwise}" if otherwise else ""))


def near_miss(path, keep=lambda entry: True) -> Path | None:
    """For a missing path: the entry of its folder (one that `keep` takes) whose name is so close
    that the path is likely a typo of it (tiny.yml: tiny.yaml), or None."""
    path = Path(path)
    try:
        names = [entry.name for entry in path.parent.iterdir()]
    except OSError:
        return None
    for name in difflib.get_close_matches(path.name, names, 3, 0.92):
        try:
            if keep(path.parent / name):
                return path.parent / name
        except OSError:  # a folder this user cannot list, say
            continue
    return None


def relative_to_here(path) -> str:
    """For a message saying that `path` is missing: where a relative path was looked for."""
    return "" if Path(path).is_absolute() else f" (relative paths start from the current directory, {Path.cwd()})"


def byte_amount(n: int) -> str:
    """n bytes for a message: in MB from 1 MB (2**20 bytes), in KB from 1 KB, else in bytes."""
    if round(n) < 2**10:
        return f"{n:,.0f} byte{'s' * (round(n) != 1)}"
    return f"{n / 2**10:,.0f} KB" if round(n / 2**10) < 2**10 else f"{n / 2**20:,.1f} MB"


def stdout_reader_gone():
    """After a BrokenPipeError: `| head` read what it wanted and left, which is not an error. The rest
    of standard output goes nowhere (Python's flush at exit would fail again, with a traceback)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def script_here(name: str) -> str:
    """The repository's script `name` (train.py) as a command run from the current folder writes
    it: the name alone in the repository's folder, else its full path."""
    path = REPO / name
    return name if path.parent == Path.cwd().resolve() else str(path)
