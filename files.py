"""Crash-safe files. A file is written under a temporary name beside its place, fsynced and renamed
into place; a folder is built under a temporary name and renamed. A kill at any moment leaves the
old version or the new one, never part of one. Temporaries are named after their writer (host and
pid), so that one a killed process left behind can be told from one still being written.
"""
import os
import shutil
import socket
from pathlib import Path


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
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_folder(out_dir, write, replace=False, keep_existing=False):
    """write(folder) into a temporary sibling of out_dir, then move it into place: out_dir appears
    whole or not at all, and a failure leaves nothing. An out_dir that holds files is refused,
    replaced (replace) or kept (keep_existing: another process built it first). Temporary folders
    of processes that died (killed mid-build) are removed first."""
    out_dir = Path(out_dir)
    for stale in (*out_dir.parent.glob(f"{out_dir.name}.tmp*"), *out_dir.parent.glob(f".{out_dir.name}.tmp*")):
        if left_by_a_dead_process(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if keep_existing:
            return None
        if not replace:
            raise FileExistsError(f"{out_dir}: the folder holds files already; choose another --out, or add "
                                  f"--replace to replace them")
    tmp = out_dir.with_name(f".{out_dir.name}{temporary_suffix()}")
    try:
        result = write(tmp)
        if out_dir.is_dir() and any(out_dir.iterdir()) and keep_existing:
            shutil.rmtree(tmp)
            return result
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
