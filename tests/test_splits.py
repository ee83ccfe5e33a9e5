"""Hugging Face split names in the shards' paths (splits.py), through shards.list_units: a
training folder that mixes held-out splits with others is refused with the settings that fix it."""
import re
from pathlib import Path

import pytest

from conftest import hub_layout, write_parquet
from shards import DataError, list_units
from splits import every_file


def test_training_on_a_held_out_split_alone_is_noted(tmp_path, capsys):
    """A slip of tab completion, or train and test swapped: accepted (it may be meant), but said."""
    write_parquet(tmp_path / "wikitext" / "test" / "data.parquet", ["x"] * 3)
    write_parquet(tmp_path / "flat" / "test-00000-of-00001.parquet", ["x"] * 3)
    write_parquet(tmp_path / "flat" / "train-00000-of-00001.parquet", ["x"] * 3)
    for location in (tmp_path / "wikitext" / "test", tmp_path / "flat" / "test-00000-of-00001.parquet",
                     f"{tmp_path}/flat/te*.parquet"):
        list_units(location, "text")
        assert capsys.readouterr().out == (f"note: {location}: dataset.parquet_dir's files are named for the test split, "
                                           f"and training reads them; if that is not meant, point it at the training "
                                           f"split\n")
    list_units(f"{tmp_path}/flat/train-*.parquet", "text")
    list_units(tmp_path / "wikitext" / "test", "text", setting="dataset.val_parquet_dir")
    assert capsys.readouterr().out == ""


def test_a_training_folder_holding_held_out_splits_is_refused_with_the_patterns_that_fix_it(tmp_path):
    root = tmp_path / "wikitext"
    hub_layout(root)
    with pytest.raises(DataError) as e:
        list_units(root, "text")
    train, val = root / "wikitext-103-raw-v1" / "train*.parquet", root / "wikitext-103-raw-v1" / "validation*.parquet"
    assert str(e.value) == (f"{root}: its files have paths named for several Hugging Face splits (test: 2, train: 4, "
                            f"validation: 2 files), and training would read them all, held-out ones too; set "
                            f"'dataset.parquet_dir={train}' and 'dataset.val_parquet_dir={val}' (the train split of "
                            f"one of 2 folders; of all of them: 'dataset.parquet_dir={root / '**' / 'train*.parquet'}'); "
                            f"to train on every file anyway: 'dataset.parquet_dir={root / '**' / '*.parquet'}'")
    assert [Path(u.path).name for u in list_units(train, "text")] == ["train-00000-of-00002.parquet",
                                                                      "train-00001-of-00002.parquet"]
    assert [Path(u.path).name for u in list_units(val, "text", setting="dataset.val_parquet_dir")] == [
        "validation-00000-of-00001.parquet"]
    assert [Path(u.path).relative_to(root).as_posix() for u in list_units(root / "**" / "train*.parquet", "text")] == [
        f"{config}/train-0000{k}-of-00002.parquet" for config in ("wikitext-103-raw-v1", "wikitext-2-raw-v1")
        for k in (0, 1)]  # sorted as a folder's files are, in every process
    # every file, each once, in the folder's order, with the folder's keys (they seed the split and the shuffle)
    as_folder = [(u.path, u.file_key) for u in list_units(root, "text", setting="dataset.val_parquet_dir")]
    assert [(u.path, u.file_key) for u in list_units(root / "**" / "*.parquet", "text")] == as_folder
    only = root / "wikitext-2-raw-v1"
    by_folder = [(u.path, u.file_key) for u in list_units(only, "text", setting="dataset.val_parquet_dir")]
    assert [(u.path, u.file_key) for u in list_units(only / "**" / "*.parquet", "text")] == by_folder
    for folders in (root / "**", root / "*-2-*"):  # a folder the pattern matches is checked as a folder given
        with pytest.raises(DataError, match="named for several Hugging Face splits"):
            list_units(folders, "text")
    # and the files of a pattern without `**` together: side by side, or in folders it matches one split each
    with pytest.raises(DataError, match=re.escape(f"{only / '*.parquet'}: the files it matches have paths named for "
                                                  f"several Hugging Face splits (test: 1, train: 2, validation: 1 "
                                                  f"files)")):
        list_units(only / "*.parquet", "text")
    with pytest.raises(DataError) as e:  # of these files only: not the other configuration's beside them
        list_units(root / "*-2-*" / "*.parquet", "text")
    assert str(e.value).endswith(f"to train on every file anyway: 'dataset.parquet_dir={root}/*-2-*/**/*.parquet'")
    assert len(list_units(root / "*-2-*", "text", setting="dataset.val_parquet_dir")) == 4


def test_splits_in_folders_and_names_that_only_contain_a_keyword(tmp_path):
    write_parquet(tmp_path / "a" / "train" / "0000.parquet", ["x"])
    write_parquet(tmp_path / "a" / "dev" / "0000.parquet", ["x"])
    with pytest.raises(DataError, match=r"\(train: 1, validation: 1 files\).*; set dataset.parquet_dir=\S+/a/train "
                                        r"and dataset.val_parquet_dir=\S+/a/dev; to train"):
        list_units(tmp_path / "a", "text")
    write_parquet(tmp_path / "v" / "train.parquet", ["x"])
    write_parquet(tmp_path / "v" / "book_val_01.parquet", ["x"])
    with pytest.raises(DataError, match=r"\(train: 1, validation: 1 files\)"):
        list_units(tmp_path / "v", "text")
    for name in ("interval-0.parquet", "latest.parquet", "train-0.parquet", "training_1.parquet"):
        write_parquet(tmp_path / "b" / name, ["x"])  # words, not substrings: one split (train) and none
    assert len(list_units(tmp_path / "b", "text")) == 4
    write_parquet(tmp_path / "c" / "part-0.parquet", ["x"])
    write_parquet(tmp_path / "c" / "eval" / "part-0.parquet", ["x"])  # no train split named: the held-out one is
    with pytest.raises(DataError, match=r"\(no split: 1, test: 1 files\).*; \S+/c/eval look like held-out splits \(by "
                                        r"their names\): move them out of the folder, or give dataset.parquet_dir a "
                                        r"pattern of the training files only: "
                                        r"'dataset.parquet_dir=\S+/c/\*.parquet'; "):
        list_units(tmp_path / "c", "text")
    assert len(list_units(tmp_path / "c" / "*.parquet", "text")) == 1  # (what it offers works)
    write_parquet(tmp_path / "c" / "test.parquet", ["x"])  # a held-out file beside them: no such pattern
    with pytest.raises(DataError, match=r"pattern of the training files only; to train on every file anyway"):
        list_units(tmp_path / "c", "text")


def test_every_file_of_a_pattern_in_the_current_folder_stays_relative():
    """dataset.parquet_dir=*.parquet: the suggestion is **/*.parquet, not /**/*.parquet (the whole disk)."""
    assert every_file("*.parquet") == "**/*.parquet"
    assert every_file("data/*.parquet") == "data/**/*.parquet"
    assert every_file("/d/wiki/") == "/d/**/wiki"
