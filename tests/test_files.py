"""files.py: atomic writes, folders that appear whole, temporaries named after their writer."""
import argparse
import os
import socket

import pytest

import files
from conftest import ROOT


def test_temporaries_of_dead_processes_on_this_host_only(monkeypatch):
    dead = 2**22 + 12345  # above the usual pid_max, so no such process
    host = socket.gethostname()
    assert files.temporary_suffix() == f".tmp{host}-{os.getpid()}"
    assert files.left_by_a_dead_process(f".ckpt.pt.tmp{host}-{dead}")
    assert files.left_by_a_dead_process(f".ckpt.pt.tmp{dead}")  # the name earlier versions used
    assert not files.left_by_a_dead_process(f".ckpt.pt{files.temporary_suffix()}")  # alive: this one
    assert not files.left_by_a_dead_process(f".ckpt.pt.tmpother-node-{dead}")  # another host's: unknowable

    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "kill", kill)  # another user's writer, alive: not signalled, not taken for dead
    assert not files.left_by_a_dead_process(f".ckpt.pt.tmp{host}-12345")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    files.atomic_write(path, lambda f: f.write(b"old"))

    def half_then_fail(f):
        f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_write_folder_that_fails_leaves_no_folder_it_made(tmp_path):
    def fail(folder):
        folder.mkdir(parents=True)
        raise ValueError("no such input")
    with pytest.raises(ValueError, match="no such input"):
        files.write_folder(tmp_path / "new" / "data" / "out", fail)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()  # was there before: stays; x/.. is not made
    with pytest.raises(ValueError, match="no such input"):
        files.write_folder(tmp_path / "x" / ".." / "empty" / "out", fail)
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"]
    (tmp_path / "empty" / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty" / "sub")  # link/.. is empty/, as the OS reads it
    files.write_folder(tmp_path / "link" / ".." / "out", lambda folder: folder.mkdir())
    assert (tmp_path / "empty" / "out").is_dir() and not (tmp_path / "out").exists()


def test_write_folder_refuses_replaces_or_keeps_a_folder_that_holds_files(tmp_path, capsys):
    out = tmp_path / "out"

    def write(text):
        def into(folder):
            folder.mkdir()
            (folder / "a.txt").write_text(text)
            return text
        return into

    assert files.write_folder(out, write("one")) == "one"
    ours = lambda path: path.suffix == ".txt"  # noqa: E731
    with pytest.raises(FileExistsError, match="holds files already.*--replace"):
        files.write_folder(out, write("two"), written_here=ours)
    with pytest.raises(FileExistsError, match="the folder holds a.txt already; move it out"):  # not ours: no
        files.write_folder(out, write("two"))                                                 # --replace suggested
    with pytest.raises(FileExistsError, match="--replace replaces only what this command writes, and the folder also "
                                              "holds a.txt; move it out"):
        files.write_folder(out, write("two"), replace=True)
    assert files.write_folder(out, write("two"), keep_existing=True) is None
    assert (out / "a.txt").read_text() == "one"
    capsys.readouterr()
    files.write_folder(out, write("three"), replace=True, written_here=ours)
    assert (out / "a.txt").read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert capsys.readouterr().out == f"replaced what {out} held: a.txt (1 entry)\n"  # --replace says what went

    def fail_midway(folder):
        write("four")(folder)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        files.write_folder(out, fail_midway, replace=True, written_here=ours)
    assert (out / "a.txt").read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_folder_after_a_replace_killed_between_its_renames_puts_the_old_folder_back(tmp_path):
    dead = f"{socket.gethostname()}-{2**22 + 12345}"  # above the usual pid_max, so no such process
    out, old = tmp_path / "out", tmp_path / f".out.old.tmp{dead}"
    old.mkdir()
    (old / "a.txt").write_text("before")
    with pytest.raises(FileExistsError, match="holds files already"):  # the old shards are back, and count
        files.write_folder(out, lambda folder: folder.mkdir(), written_here=lambda path: True)
    assert (out / "a.txt").read_text() == "before" and not old.exists()
    old.mkdir()  # killed after the new folder was in place: the old one goes
    files.write_folder(tmp_path / "other", lambda folder: folder.mkdir())
    assert old.exists()  # another folder's
    files.write_folder(out, lambda folder: folder.mkdir(), keep_existing=True)
    assert not old.exists() and (out / "a.txt").read_text() == "before"


def test_write_folder_replaces_only_what_its_command_writes_and_only_folders(tmp_path, monkeypatch):
    """--replace never deletes an input file or a run's checkpoints sitting in --out, never turns a
    file into a folder, and never replaces the current or a parent folder."""
    def write(folder):
        folder.mkdir()
        (folder / "part-0.parquet").write_text("new")

    out = tmp_path / "out"
    out.mkdir()
    (out / "part-0.parquet").write_text("old")
    (out / "corpus.txt").write_text("the input")
    (out / ".DS_Store").write_bytes(b"Finder's")  # no reason to refuse
    with pytest.raises(FileExistsError, match="also holds corpus.txt; move it out or choose another --out"):
        files.write_folder(out, write, replace=True, written_here=lambda path: path.suffix == ".parquet")
    assert sorted(p.name for p in out.iterdir()) == [".DS_Store", "corpus.txt", "part-0.parquet"]
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(FileExistsError, match="link: is a symbolic link; give the folder it points to"):
        files.write_folder(tmp_path / "link", write, replace=True, written_here=lambda path: True)
    (out / "corpus.txt").unlink()
    files.write_folder(out, write, replace=True, written_here=lambda path: path.suffix == ".parquet")
    assert sorted(p.name for p in out.iterdir()) == ["part-0.parquet"] and (out / "part-0.parquet").read_text() == "new"
    (out / "corpus.txt").write_text("the input")
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(FileExistsError, match="a_file: is a file, not a folder"):
        files.write_folder(tmp_path / "a_file", write, replace=True, written_here=lambda path: True)
    assert (tmp_path / "a_file").read_text() == "keep"
    monkeypatch.chdir(out)
    for name in (".", "..", "sub/.."):
        with pytest.raises(FileExistsError, match="give a new folder's name"):
            files.write_folder(name, write, replace=True, written_here=lambda path: True)
    assert sorted(p.name for p in out.iterdir()) == ["corpus.txt", "part-0.parquet"]
    (out / "corpus.txt").unlink()
    (out / ".DS_Store").mkdir()  # a folder of that name is no file browser's file
    with pytest.raises(FileExistsError, match="holds .DS_Store"):
        files.write_folder(out, write, replace=True, written_here=lambda path: path.suffix == ".parquet")


def test_a_printed_command_names_the_script_so_that_it_runs_from_here(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert files.script_here("train.py") == "train.py"
    monkeypatch.chdir(tmp_path)  # python /path/to/repo/train.py, run from elsewhere
    assert files.script_here("train.py") == str(ROOT.resolve() / "train.py")


def test_byte_amounts_read_as_what_they_are():
    assert [files.byte_amount(n) for n in (1, 96, 1023, 1023.6, 1024, 2**20 - 1, 5 * 2**20 + 2**19)] == [
        "1 byte", "96 bytes", "1,023 bytes", "1 KB", "1 KB", "1.0 MB", "5.5 MB"]


def test_an_output_path_is_checked_before_the_work(tmp_path, monkeypatch):
    assert files.picture_path("PLOT.PNG").name == "PLOT.PNG"  # matplotlib writes it: the case of .png is no matter
    with pytest.raises(ValueError, match="is a folder; give a file name in it"):  # not a file named results
        files.output_path(f"{tmp_path}/results{os.sep}", "--out")
    with pytest.raises(ValueError, match="cannot make its folder /proc/new"):  # (/proc takes no folders, even root's)
        files.output_path("/proc/new/out.json", "--out")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):  # one file by two names: the second output would overwrite the first
        files.check_outputs(argparse.ArgumentParser(), {"--out": "a.json", "--json": "./a.json"})


def test_records_are_the_lines_with_a_whole_step(tmp_path):
    """metrics.jsonl: a line cut short by a kill, or one without a whole-number step, is skipped and named."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n3\n{"step": "2"}\n{"step": null}\n{"step": 4, "lo\n{"step": 5}\n')
    records, skipped = files.read_records(path)
    assert [r["step"] for r in records] == [1, 5] and skipped == [2, 3, 4, 5]


def test_a_close_name_is_offered_only_where_keep_takes_it(tmp_path):
    """did you mean ...? names a file for a missing file, never a folder of a close name."""
    (tmp_path / "tiny.yaml").mkdir()
    assert files.near_miss(tmp_path / "tiny.yml", keep=lambda p: p.is_file()) is None
    assert "did you mean" not in files.does_not_exist(tmp_path / "tiny.yml")
    (tmp_path / "exp.yaml").write_text("x")
    assert files.near_miss(tmp_path / "exp.yml", keep=lambda p: p.is_file()) == tmp_path / "exp.yaml"


def test_byte_order_marks_name_utf32_before_utf16():
    """UTF-32 LE's mark starts with UTF-16 LE's: the longer one is the encoding."""
    assert files.bom_encoding(b"\xff\xfe\x00\x00a\x00\x00\x00") == "utf-32"
    assert files.bom_encoding(b"\xff\xfea\x00") == "utf-16" and files.bom_encoding(b"abc") is None
