"""files.py: atomic writes, folders that appear whole, temporaries named after their writer."""
import os
import socket

import pytest

import files


def test_temporaries_of_dead_processes_on_this_host_only(monkeypatch):
    dead = 2**22 + 12345  # above the usual pid_max, so no such process
    host = socket.gethostname()
    assert files.temporary_suffix() == f".tmp{host}-{os.getpid()}"
    assert files.left_by_a_dead_process(f".ckpt.pt.tmp{host}-{dead}")
    assert files.left_by_a_dead_process(f".ckpt.pt.tmp{dead}")  # the name earlier versions used
    assert not files.left_by_a_dead_process(f".ckpt.pt{files.temporary_suffix()}")  # alive: this one
    assert not files.left_by_a_dead_process(f".ckpt.pt.tmpother-node-{dead}")  # another host's: unknowable


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    files.atomic_write(path, lambda f: f.write(b"old"))

    def half_then_fail(f):
        f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_write_folder_refuses_replaces_or_keeps_a_folder_that_holds_files(tmp_path):
    out = tmp_path / "out"

    def write(text):
        def into(folder):
            folder.mkdir()
            (folder / "a.txt").write_text(text)
            return text
        return into

    assert files.write_folder(out, write("one")) == "one"
    with pytest.raises(FileExistsError, match="holds files already.*--replace"):
        files.write_folder(out, write("two"))
    assert files.write_folder(out, write("two"), keep_existing=True) is None
    assert (out / "a.txt").read_text() == "one"
    files.write_folder(out, write("three"), replace=True)
    assert (out / "a.txt").read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    def fail_midway(folder):
        write("four")(folder)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        files.write_folder(out, fail_midway, replace=True)
    assert (out / "a.txt").read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
