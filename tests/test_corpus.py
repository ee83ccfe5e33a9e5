"""Writing parquet shards: text files and the built-in corpus."""
import os

import pyarrow.parquet as pq
import pytest

import corpus
from config import Config
from shards import DataError, list_units


def test_text_files_become_documents_in_row_groups_of_bounded_size(tmp_path):
    text = "".join(f"line {i}\n" for i in range(20000))
    (tmp_path / "a.txt").write_text(text)
    n = corpus.text_files_to_parquet([tmp_path / "a.txt"], tmp_path / "out", chunk_bytes=1000)
    [shard] = (tmp_path / "out").iterdir()
    table = pq.read_table(shard)
    assert n == table.num_rows > 100 and "".join(table.column("text").to_pylist()) == text
    meta = pq.read_metadata(shard)
    assert meta.num_row_groups > 1
    assert all(meta.row_group(i).num_rows <= 128 * 1024 // 1000 + 1 for i in range(meta.num_row_groups))


def test_shards_of_short_documents_are_about_the_size_of_their_text(tmp_path):
    """Parquet's default min/max statistics would hold whole documents of a few KB: 3x the file."""
    text = "".join(f"line {i} of a short document, varied enough not to compress away: {i * 7919 % 10007}\n"
                   for i in range(20000))
    (tmp_path / "a.txt").write_text(text)
    corpus.text_files_to_parquet([tmp_path / "a.txt"], tmp_path / "out", chunk_bytes=2000)
    [shard] = (tmp_path / "out").iterdir()
    assert shard.stat().st_size < len(text) / 5  # (compressed, 0.15 of it; with statistics, 0.3)
    assert pq.ParquetFile(shard).metadata.row_group(0).column(0).statistics is None


def test_a_small_text_gets_row_groups_enough_for_several_processes(tmp_path):
    """60 KB of text, 8 documents: a row group each (not one for the whole text, which only one
    process or loader worker could read)."""
    (tmp_path / "a.txt").write_text("".join(f"line {i} of a small text\n" for i in range(2500)))
    assert corpus.text_files_to_parquet([tmp_path / "a.txt"], tmp_path / "out") == 8
    assert len(list_units(tmp_path / "out", "text")) == 8
    text = "".join(f"line {i}\n" for i in range(20000))
    (tmp_path / "b.txt").write_text(text * 8)  # 1.8 MB: 64 row groups or so
    corpus.text_files_to_parquet([tmp_path / "b.txt"], tmp_path / "out_b")
    assert 64 <= len(list_units(tmp_path / "out_b", "text")) <= 70


def test_shards_roll_over_by_their_text_and_keep_every_document_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "SHARD_BYTES", 1000)
    docs = [f"{i:03d}" + "x" * 297 for i in range(10)]
    assert corpus.write_shards(iter(docs), tmp_path / "out", row_group_bytes=700, column="body") == 10
    shards = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(p).num_rows for p in shards] == [4, 4, 2]  # a shard closes once it holds 1000
    assert [pq.read_metadata(shards[0]).row_group(i).num_rows for i in range(2)] == [2, 2]  # groups of 700 at most
    assert [d for p in shards for d in pq.read_table(p).column("body").to_pylist()] == docs


def test_an_unreadable_text_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope.txt: does not exist$"):
        corpus.text_files_to_parquet([tmp_path / "nope.txt"], tmp_path / "out")
    (tmp_path / "tinyshakespeare.txt").write_text("To be")  # a typo of it: named
    with pytest.raises(DataError, match=f"tinyshakespear.txt: does not exist; did you mean {tmp_path}/tinyshakespeare"):
        corpus.text_files_to_parquet([tmp_path / "tinyshakespear.txt"], tmp_path / "out")


def test_sample_corpus_is_deterministic(tmp_path):
    corpus.build_stdlib_corpus(tmp_path / "one", max_bytes=200_000)
    corpus.build_stdlib_corpus(tmp_path / "two", max_bytes=200_000)
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one and one == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert len(list_units(tmp_path / "one", "text")) >= 1


def test_split_text_keeps_every_byte_and_cuts_by_bytes_at_line_ends():
    raw = "".join(f"línea {i} — ü\n" for i in range(3000)).encode()
    pieces = corpus.split_text(raw, 1000)
    assert b"".join(pieces) == raw and len(pieces) > 10
    assert all(p.endswith(b"\n") and 1000 <= len(p) < 1030 for p in pieces[:-1])
    assert all(p.decode() for p in pieces)  # no UTF-8 character cut
    assert corpus.split_text(raw, 0) == [raw] and corpus.split_text(b"", 100) == []


@pytest.mark.parametrize("raw,ends", [
    (("some words " * 3000).encode(), b" "),  # one line (text8-style)
    ("línea ü\r".encode() * 3000, b"\r"),  # old Mac line ends
    ("ü€".encode() * 6000, None),  # no separator at all: cut between characters
])
def test_split_text_cuts_text_without_line_ends_too(raw, ends):
    pieces = corpus.split_text(raw, 1001)  # (odd: a cut at 2 x 1001 bytes falls inside a character of "ü€")
    assert b"".join(pieces) == raw and len(pieces) > 10 and all(len(p) <= 2 * 1001 + 3 for p in pieces)
    assert all(p.decode() for p in pieces) and (ends is None or all(p.endswith(ends) for p in pieces[:-1]))


def test_a_build_killed_midway_leaves_a_folder_that_the_next_build_removes(tmp_path):
    dead, live = tmp_path / "stdlib.tmp999999999", tmp_path / f".stdlib.tmp{os.getppid()}"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "part-00000.parquet").write_bytes(b"half")
    corpus.build_stdlib_corpus(tmp_path / "stdlib", max_bytes=100_000)
    assert not dead.exists() and live.exists()  # a running build's folder is left alone
    assert list_units(tmp_path / "stdlib", "text")


@pytest.mark.parametrize("written", ["data/stdlib", "./data/stdlib/", "ABSOLUTE"])
def test_the_built_in_corpus_is_built_however_its_folder_is_written(tmp_path, monkeypatch, written):
    from config import Config
    monkeypatch.chdir(tmp_path)
    built = []
    monkeypatch.setattr(corpus, "build_stdlib_corpus", lambda folder: built.append(folder))
    folder = str(tmp_path / "data" / "stdlib") if written == "ABSOLUTE" else written
    corpus.ensure_builtin_corpus(Config.from_dict({"dataset": {"parquet_dir": folder}}))
    corpus.ensure_builtin_corpus(Config.from_dict({"dataset": {"parquet_dir": "data/other"}}))
    os.symlink("loop", "loop")  # (its own target: Path.resolve raised, a traceback before the data's checks)
    corpus.ensure_builtin_corpus(Config.from_dict({"dataset": {"parquet_dir": "loop"}}))
    assert built == [folder]


@pytest.mark.parametrize("data", ["a file", "a dangling link"])
def test_a_sample_corpus_that_cannot_be_built_is_a_data_error(tmp_path, monkeypatch, data):
    from config import Config
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lib" / "a.py").parent.mkdir()
    (tmp_path / "lib" / "a.py").write_text("x = 1\n")  # a small standard library: the build fails at once
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path / "lib")})
    if data == "a file":
        (tmp_path / "data").write_text("not a folder")
    else:
        (tmp_path / "data").symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match=r"^dataset.parquet_dir data/stdlib: cannot build the built-in corpus there: "
                                        r".*; run from a folder where it can be written, or set dataset.parquet_dir to"):
        corpus.ensure_builtin_corpus(Config.from_dict({"dataset": {"parquet_dir": "data/stdlib"}}))


# ---- found by mutating corpus.py: what the built-in corpus holds and when it is built, cuts, marks, hints

def corpus_text(folder):
    return [d for p in sorted(folder.iterdir()) for d in pq.read_table(p).column("text").to_pylist()]


@pytest.fixture
def stdlib(tmp_path, monkeypatch):
    """A small standard library: the built-in corpus is built from it."""
    lib = tmp_path / "lib"
    for name, text in {"b.py": "b = 2\n", "a.py": "a = 1\n", "c.py": "c = 3\n", "test/t.py": "in a test\n",
                       "pkg/tests/u.py": "in tests\n", "site-packages/s.py": "installed\n", "idlelib/i.py": "idle\n",
                       "pkg/m.py": "m = 4\n", "notes.txt": "not python\n", "data.npy": "not python either\n"}.items():
        (lib / name).parent.mkdir(parents=True, exist_ok=True)
        (lib / name).write_text(text)
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda: {"stdlib": str(lib)})
    return lib


def test_the_built_in_corpus_is_the_python_sources_without_tests_in_sorted_order(tmp_path, stdlib):
    assert corpus.build_stdlib_corpus(tmp_path / "out") == 4
    assert corpus_text(tmp_path / "out") == ["a = 1\n", "b = 2\n", "c = 3\n", "m = 4\n"]


def test_the_built_in_corpus_is_in_sorted_order_however_the_folder_lists_its_files(tmp_path, stdlib, monkeypatch):
    monkeypatch.setattr(corpus.os, "walk", lambda top: iter([(str(top), [], ["c.py", "b.py", "a.py"])]))
    corpus.build_stdlib_corpus(tmp_path / "out")
    assert corpus_text(tmp_path / "out") == ["a = 1\n", "b = 2\n", "c = 3\n"]


def test_the_built_in_corpus_stops_at_max_bytes_and_cuts_long_files_into_documents(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    long = "".join(f"x_{i} = {i}\n" for i in range(3000))  # 39 KB: documents of about 8 KB
    (lib / "a.py").write_text(long)
    (lib / "b.py").write_text("b" * 40000 + "\n")  # past max_bytes: the corpus ends before it
    (lib / "c.py").write_text("c = 3\n")  # (and after it: not taken either)
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda: {"stdlib": str(lib)})
    n = corpus.build_stdlib_corpus(tmp_path / "out", max_bytes=50_000)
    docs = corpus_text(tmp_path / "out")
    assert "".join(docs) == long and n == len(docs) >= 4
    assert all(corpus.DOCUMENT_BYTES <= len(d) < corpus.DOCUMENT_BYTES + 20 for d in docs[:-1])


def test_a_built_in_corpus_built_already_is_kept(tmp_path, stdlib):
    assert corpus.build_stdlib_corpus(tmp_path / "out") == 4
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (stdlib / "d.py").write_text("d = 5\n")
    assert corpus.build_stdlib_corpus(tmp_path / "out") is None  # (another process built it meanwhile)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_the_built_in_corpus_is_built_only_where_it_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    built = []
    monkeypatch.setattr(corpus, "build_stdlib_corpus", lambda folder: built.append(folder))  # None: built meanwhile
    cfg = Config.from_dict({"dataset": {"parquet_dir": "data/stdlib"}})
    corpus.ensure_builtin_corpus(cfg)
    assert built == ["data/stdlib"]
    assert capsys.readouterr().out == ("building the built-in corpus in data/stdlib from the Python standard library "
                                       "...\n  another process built it meanwhile\n")
    (tmp_path / "data" / "stdlib").mkdir(parents=True)
    corpus.ensure_builtin_corpus(cfg)
    assert built == ["data/stdlib"] and capsys.readouterr().out == ""


def test_split_text_never_cuts_a_character_whose_last_byte_is_0xbf():
    raw = "a¿".encode() * 3000  # 61 C2 BF: no separator, a cut at 2 x 1000 bytes falls on the BF of a character
    pieces = corpus.split_text(raw, 1000)
    assert b"".join(pieces) == raw and len(pieces) > 2
    assert all(p.decode() for p in pieces)


def test_a_text_file_that_starts_with_a_nul_byte_is_refused(tmp_path):
    (tmp_path / "be.txt").write_bytes("plain text\n".encode("utf-16-be"))  # UTF-16 big-endian, no mark: NUL first
    with pytest.raises(DataError, match=r"be.txt: not text \(a NUL byte at byte 0: binary data, or UTF-16 without"):
        corpus.text_files_to_parquet([tmp_path / "be.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_byte_order_mark_that_is_not_followed_by_its_encoding_is_taken_as_bytes(capsys):
    raw = b"\xff\xfeabc"  # the mark of UTF-16 LE, then an odd number of bytes: no UTF-16
    assert corpus.as_utf8(raw, "odd.txt") == raw
    assert "note: odd.txt is not UTF-8 (byte 0: b'\\xff')" in capsys.readouterr().out


def test_a_folder_given_for_its_files_names_a_few_patterns_and_says_there_are_more(tmp_path):
    for suffix in (".a", ".b", ".c", ".d", ".e", ".f", ".g"):
        (tmp_path / f"x{suffix}").write_text("x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "y.txt").write_text("y")
    assert corpus.file_patterns(tmp_path) == ", e.g. " + " ".join(f"{tmp_path}/*.{s}" for s in "abcdef") + " ..."
    assert corpus.file_patterns(tmp_path, most=7) == ", e.g. " + " ".join(f"{tmp_path}/*.{s}" for s in "abcdefg")


def test_adding_to_shards_in_a_subfolder_is_suggested_only_where_it_would_work(tmp_path):
    out = tmp_path / "out"
    corpus.write_shards(["a"], out)
    corpus.write_shards(["b"], out / "more")
    with pytest.raises(DataError) as refused:
        corpus.shards_to_folder(iter(["doc"]), out, False, None, "nothing")
    assert str(refused.value).endswith(f"write them into a new subfolder: --out {out / 'more_2'}")
    with pytest.raises(DataError) as refused:  # --replace refused (a subfolder): no suggestion of another --out
        corpus.shards_to_folder(iter(["doc"]), out, True, None, "nothing")
    assert str(refused.value).endswith("the folder also holds more; move it out or choose another --out")
    (tmp_path / "others" / "sub").mkdir(parents=True)  # subfolders without shards: no shards to add to
    (tmp_path / "others" / "sub" / "x.txt").write_text("x")
    with pytest.raises(DataError) as refused:
        corpus.shards_to_folder(iter(["doc"]), tmp_path / "others", False, None, "nothing")
    assert str(refused.value).endswith("the folder holds sub already; move it out or choose another --out")
