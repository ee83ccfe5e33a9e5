"""Parquet shards: listing and checking them, the split, writing text files and the built-in corpus."""
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shards
from conftest import write_parquet
from shards import DataError, list_units, validation_mask


def test_text_files_become_documents_in_row_groups_of_bounded_size(tmp_path):
    text = "".join(f"line {i}\n" for i in range(20000))
    (tmp_path / "a.txt").write_text(text)
    n = shards.text_files_to_parquet([tmp_path / "a.txt"], tmp_path / "out", chunk_bytes=1000)
    [shard] = (tmp_path / "out").iterdir()
    table = pq.read_table(shard)
    assert n == table.num_rows > 100 and "".join(table.column("text").to_pylist()) == text
    meta = pq.read_metadata(shard)
    assert meta.num_row_groups > 1
    assert all(meta.row_group(i).num_rows <= 128 * 1024 // 1000 + 1 for i in range(meta.num_row_groups))


def test_an_unreadable_text_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope.txt: cannot read"):
        shards.text_files_to_parquet([tmp_path / "nope.txt"], tmp_path / "out")


def test_sample_corpus_is_deterministic(tmp_path):
    shards.build_stdlib_corpus(tmp_path / "one", max_bytes=200_000)
    shards.build_stdlib_corpus(tmp_path / "two", max_bytes=200_000)
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one and one == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert len(list_units(tmp_path / "one", "text")) >= 1


def test_split_text_keeps_every_byte_and_cuts_by_bytes_at_line_ends():
    raw = "".join(f"línea {i} — ü\n" for i in range(3000)).encode()
    pieces = shards.split_text(raw, 1000)
    assert b"".join(pieces) == raw and len(pieces) > 10
    assert all(p.endswith(b"\n") and 1000 <= len(p) < 1030 for p in pieces[:-1])
    assert all(p.decode() for p in pieces)  # no UTF-8 character cut
    assert shards.split_text(raw, 0) == [raw] and shards.split_text(b"", 100) == []


def test_a_build_killed_midway_leaves_a_folder_that_the_next_build_removes(tmp_path):
    dead, live = tmp_path / "stdlib.tmp999999999", tmp_path / f".stdlib.tmp{os.getppid()}"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "part-00000.parquet").write_bytes(b"half")
    shards.build_stdlib_corpus(tmp_path / "stdlib", max_bytes=100_000)
    assert not dead.exists() and live.exists()  # a running build's folder is left alone
    assert list_units(tmp_path / "stdlib", "text")


def test_units_are_listed_recursively_and_sorted(tmp_path):
    write_parquet(tmp_path / "b" / "z.parquet", ["x"] * 5, 2)
    write_parquet(tmp_path / "a.parquet", ["y"] * 3, 2)
    units = list_units(tmp_path, "text")
    assert [(Path(u.path).relative_to(tmp_path).as_posix(), u.row_group) for u in units] == [
        ("a.parquet", 0), ("a.parquet", 1), ("b/z.parquet", 0), ("b/z.parquet", 1), ("b/z.parquet", 2)]


def test_split_depends_on_the_seed_only():
    u = shards.Unit("x.parquet", 3, 1000, 0, file_key=12345)
    assert np.array_equal(validation_mask(u, 1, 0.1), validation_mask(u, 1, 0.1))
    assert not np.array_equal(validation_mask(u, 1, 0.1), validation_mask(u, 2, 0.1))
    assert 50 < validation_mask(u, 1, 0.1).sum() < 150


def test_missing_or_empty_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_units(tmp_path / "nope", "text")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no .parquet files found"):
        list_units(tmp_path / "empty", "text")


def test_file_that_is_not_parquet(tmp_path):
    (tmp_path / "bad.parquet").write_text("this is not parquet at all")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable parquet file"):
        list_units(tmp_path, "text")


def test_truncated_file(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", ["some text"] * 50, 10)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"t.parquet: not a readable parquet file"):
        list_units(tmp_path, "text")


def test_missing_text_column_lists_the_columns(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["x"], column="content")
    with pytest.raises(DataError, match=r"no column 'text'; columns are \['content'\]"):
        list_units(tmp_path, "text")


def test_non_string_column_is_refused(tmp_path):
    write_parquet(tmp_path / "a.parquet", [1, 2], type_=pa.int64())
    with pytest.raises(DataError, match="expected a string column"):
        list_units(tmp_path, "text")


def test_symlinked_folders_are_followed_once_and_names_starting_with_dot_or_underscore_skipped(tmp_path, capsys):
    root = tmp_path / "data"
    write_parquet(root / "a" / "x.parquet", ["a"] * 3, 2)
    write_parquet(tmp_path / "elsewhere" / "y.parquet", ["b"] * 3, 2)
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # followed once, not forever
    (root / "._x.parquet").write_bytes(b"\0\5\0macOS resource fork")
    write_parquet(root / "_temporary" / "z.parquet", ["c"] * 3, 2)
    write_parquet(root / ".cache" / "w.parquet", ["d"] * 3, 2)
    units = list_units(root, "text")
    assert sorted({Path(u.path).relative_to(root).as_posix() for u in units}) == ["a/x.parquet", "linked/y.parquet"]
    assert "skipped 3 file(s) or folder(s) whose names start with '.' or '_'" in capsys.readouterr().out
    only_links = tmp_path / "links"
    only_links.mkdir()
    (only_links / "x.parquet").symlink_to(root / "a" / "x.parquet")
    assert len(list_units(only_links, "text")) == 2


def hub_layout(root):
    """A Hugging Face dataset's files: two configurations, each with train, validation and test files."""
    for config in ("wikitext-103-raw-v1", "wikitext-2-raw-v1"):
        for name in ("train-00000-of-00002", "train-00001-of-00002", "validation-00000-of-00001", "test-00000-of-00001"):
            write_parquet(root / config / f"{name}.parquet", [f"{config} {name} doc {i}" for i in range(3)])


def test_a_training_folder_holding_held_out_splits_is_refused_with_the_patterns_that_fix_it(tmp_path):
    root = tmp_path / "wikitext"
    hub_layout(root)
    with pytest.raises(DataError) as e:
        list_units(root, "text")
    train, val = root / "wikitext-103-raw-v1" / "train*.parquet", root / "wikitext-103-raw-v1" / "validation*.parquet"
    assert str(e.value) == (f"{root}: its files are named for several Hugging Face splits (test: 2, train: 4, "
                            f"validation: 2 files), and training would read them all, held-out ones too; set "
                            f"'dataset.parquet_dir={train}' and 'dataset.val_parquet_dir={val}' (to train on every "
                            f"file anyway: 'dataset.parquet_dir={root / '**' / '*.parquet'}')")
    assert {Path(u.path).name for u in list_units(train, "text")} == {"train-00000-of-00002.parquet",
                                                                      "train-00001-of-00002.parquet"}
    assert {Path(u.path).name for u in list_units(val, "text", setting="dataset.val_parquet_dir")} == {
        "validation-00000-of-00001.parquet"}
    assert len(list_units(root / "**" / "*.parquet", "text")) == 8
    # the same files listed by a pattern keep their keys: the split and the shuffle do not change
    folder = root / "wikitext-2-raw-v1"
    by_folder = {u.path: u.file_key for u in list_units(folder, "text", setting="dataset.val_parquet_dir")}
    by_pattern = {u.path: u.file_key for u in list_units(folder / "*.parquet", "text", setting="dataset.val_parquet_dir")}
    assert by_folder == by_pattern
    # a validation folder is not a training folder: reading its test files too is no leak into training
    assert len(list_units(root, "text", setting="dataset.val_parquet_dir")) == 8


def test_splits_in_folders_and_names_that_only_contain_a_keyword(tmp_path):
    write_parquet(tmp_path / "a" / "train" / "0000.parquet", ["x"])
    write_parquet(tmp_path / "a" / "dev" / "0000.parquet", ["x"])
    with pytest.raises(DataError, match=r"\(train: 1, validation: 1 files\).*; set dataset.parquet_dir=\S+/a/train "):
        list_units(tmp_path / "a", "text")
    for name in ("interval-0.parquet", "latest.parquet", "train-0.parquet", "training_1.parquet"):
        write_parquet(tmp_path / "b" / name, ["x"])  # words, not substrings: one split (train) and none
    assert len(list_units(tmp_path / "b", "text")) == 4
    write_parquet(tmp_path / "c" / "part-0.parquet", ["x"])
    write_parquet(tmp_path / "c" / "eval" / "part-0.parquet", ["x"])  # no train split named: no pattern to give
    with pytest.raises(DataError, match=r"\(no split: 1, test: 1 files\).*; give dataset.parquet_dir a folder or a "
                                        r"pattern of the training files only"):
        list_units(tmp_path / "c", "text")


def test_a_pattern_that_matches_nothing_says_what_the_folder_holds(tmp_path):
    hub_layout(tmp_path / "w")
    folder = tmp_path / "w" / "wikitext-2-raw-v1"
    with pytest.raises(DataError) as e:
        list_units(folder / "trian-*.parquet", "text")
    assert str(e.value) == (f"{folder / 'trian-*.parquet'}: dataset.parquet_dir matches no .parquet file; {folder} "
                            f"holds 4 .parquet file(s), such as test-00000-of-00001.parquet, "
                            f"train-00000-of-00002.parquet, train-00001-of-00002.parquet")
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'} does not exist"):
        list_units(tmp_path / "nowhere" / "*.parquet", "text")
