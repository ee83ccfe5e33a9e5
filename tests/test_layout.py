"""Where the data is: folders, patterns, one file, links (through shards.list_units, which lists
what layout.py finds)."""
import glob
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import hub_layout, write_parquet
from shards import DataError, list_units


def test_units_are_listed_recursively_and_sorted(tmp_path):
    write_parquet(tmp_path / "b" / "z.parquet", ["x"] * 5, 2)
    write_parquet(tmp_path / "a.parquet", ["y"] * 3, 2)
    units = list_units(tmp_path, "text")
    assert [(Path(u.path).relative_to(tmp_path).as_posix(), u.row_group) for u in units] == [
        ("a.parquet", 0), ("a.parquet", 1), ("b/z.parquet", 0), ("b/z.parquet", 1), ("b/z.parquet", 2)]


def test_missing_or_empty_directory(tmp_path):
    with pytest.raises(DataError, match=r"does not exist[^;]*; create it with `python prepare.py "
                                        r"--from-text FILE --out .*nope`$"):
        list_units(tmp_path / "nope", "text")
    (tmp_path / "mydata").mkdir()
    with pytest.raises(DataError, match=rf"mydat: dataset.parquet_dir does not exist; did you mean "
                                        rf"{tmp_path / 'mydata'}\? or create it with"):
        list_units(tmp_path / "mydat", "text")  # a typo
    with pytest.raises(DataError, match=r"mybook.txt: dataset.parquet_dir does not exist; it takes a folder of .parquet "
                                        r"shards: write them with `python prepare.py --from-text TEXT_FILE ... --out "
                                        r".*mybook_parquet` and set dataset.parquet_dir=.*mybook_parquet$"):
        list_units(tmp_path / "mybook.txt", "text")  # not a folder to write the shards into
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no .parquet files found \(searched recursively\); convert text with "
                                        r"`python prepare.py --from-text FILE ... --out .*empty`$"):
        list_units(tmp_path / "empty", "text")
    (tmp_path / "empty" / "notes.txt").write_text("hi")  # prepare.py would refuse to write beside it
    with pytest.raises(DataError, match=r"no .parquet files found \(searched recursively\); convert its text with "
                                        r"`python prepare.py --from-text .*empty/\*.txt --out .*empty_parquet` and set "
                                        r"dataset.parquet_dir=.*empty_parquet$"):
        list_units(tmp_path / "empty", "text")
    with pytest.raises(DataError, match=r" and set dataset.val_parquet_dir=.*empty_parquet$"):
        list_units(tmp_path / "empty", "text", setting="dataset.val_parquet_dir")
    (tmp_path / "empty" / "tool.py").write_text("x = 1")  # text of several kinds: all of them
    with pytest.raises(DataError, match=r"--from-text .*empty/\* --out"):
        list_units(tmp_path / "empty", "text")
    (tmp_path / "empty" / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")  # not text: left out
    (tmp_path / "empty" / "notes.txt").write_text("hi", encoding="utf-16")  # text with NUL bytes: prepare.py reads it
    with pytest.raises(DataError, match=r"--from-text \S*empty/\*.py \S*empty/\*.txt --out"):
        list_units(tmp_path / "empty", "text")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    with pytest.raises(DataError, match=r"--from-text FILE \.\.\. --out"):
        list_units(pictures, "text")
    write_parquet(tmp_path / "hidden" / "_0.parquet", ["x"] * 3)  # parquet files, but none taken as data
    write_parquet(tmp_path / "hidden" / "_more" / "1.parquet", ["x"] * 3)
    with pytest.raises(DataError, match=r"hidden: its only .parquet files are in names that start with '.' or '_' "
                                        r"\(_more, ...\), which are not data, as for pyarrow datasets, Spark "
                                        r"and Hugging Face: rename them$"):
        list_units(tmp_path / "hidden", "text")
    shutil.rmtree(tmp_path / "hidden" / "_more")
    with pytest.raises(DataError, match=r"hidden: its only .parquet files are in names that start with '.' or '_' "
                                        r"\(_0.parquet\), which"):
        list_units(tmp_path / "hidden", "text")
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "data.jsonl").write_text('{"text": "hi"}\n')  # --from-text would train on its braces
    with pytest.raises(DataError, match=r"; data.jsonl holds records, not plain text: write them as parquet "
                                        r"\(pyarrow.json.read_json .*set dataset.text_column to the column with the text$"):
        list_units(tmp_path / "records", "text")


def test_hugging_face_datasets_arrow_folders_are_told_how_to_become_parquet(tmp_path):
    """save_to_disk writes a folder of .arrow files (Arrow IPC streams) per split, and dataset_dict.json
    above them; --from-text would take them as text."""
    saved = tmp_path / "saved"
    (saved / "train").mkdir(parents=True)
    with pa.ipc.new_stream(saved / "train" / "data-00000-of-00001.arrow", pa.schema({"text": pa.string()})) as stream:
        stream.write_table(pa.table({"text": ["some text"]}))
    for name in ("train/state.json", "train/dataset_info.json", "dataset_dict.json"):
        (saved / name).write_text("{}")
    with pytest.raises(DataError, match=re.escape(
            f"data-00000-of-00001.arrow is an Arrow file (Hugging Face datasets' save_to_disk or cache), neither text "
            f"nor parquet: write it as parquet, `python -c \"import datasets, os; os.makedirs('{saved}/train_parquet', "
            f"exist_ok=True); datasets.load_from_disk('{saved}/train').to_parquet('{saved}/train_parquet/data.parquet')"
            f"\"`, and set dataset.parquet_dir={saved}/train_parquet") + "$"):
        list_units(saved / "train", "text")
    with pytest.raises(DataError, match=re.escape(
            f"it is a Hugging Face datasets folder (save_to_disk), not parquet: write its splits as parquet, `python -c "
            f"\"import datasets, os; os.makedirs('{saved}_parquet', exist_ok=True); d = datasets.load_from_disk("
            f"'{saved}'); [d[s].to_parquet(f'{saved}_parquet/{{s}}.parquet') for s in d]\"`, and set "
            f"dataset.parquet_dir={saved}_parquet/train.parquet (and dataset.val_parquet_dir to its validation split's "
            f"file)") + "$"):
        list_units(saved, "text")


def test_a_data_folder_given_by_a_link_is_not_left_by_a_link_up_to_the_folder_of_that_link(tmp_path):
    write_parquet(tmp_path / "store" / "mine" / "x.parquet", ["a"] * 3, 2)
    write_parquet(tmp_path / "aliases" / "other" / "sibling.parquet", ["b"] * 3, 2)  # another dataset
    (tmp_path / "aliases" / "mine").symlink_to(tmp_path / "store" / "mine", target_is_directory=True)
    (tmp_path / "store" / "mine" / "up").symlink_to(tmp_path / "aliases", target_is_directory=True)
    assert {Path(u.path).name for u in list_units(tmp_path / "aliases" / "mine", "text")} == {"x.parquet"}


def test_symlinked_folders_are_followed_once_and_names_starting_with_dot_or_underscore_skipped(tmp_path, capsys):
    root = tmp_path / "data"
    write_parquet(root / "a" / "x.parquet", ["a"] * 3, 2)
    write_parquet(tmp_path / "elsewhere" / "y.parquet", ["b"] * 3, 2)
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # followed once, not forever
    (root / "a" / "up").symlink_to(tmp_path, target_is_directory=True)  # above the data: another dataset's too
    (root / "._x.parquet").write_bytes(b"\0\5\0macOS resource fork")
    write_parquet(root / "_temporary" / "z.parquet", ["c"] * 3, 2)
    write_parquet(root / ".cache" / "w.parquet", ["d"] * 3, 2)
    units = list_units(root, "text")
    assert sorted({Path(u.path).relative_to(root).as_posix() for u in units}) == ["a/x.parquet", "linked/y.parquet"]
    assert ("skipped 3 file(s) or folder(s) whose names start with '.' or '_', e.g. ._x.parquet (not data"
            in capsys.readouterr().out)  # (a shard's name first: the one most likely to be data after all)
    only_links = tmp_path / "links"
    only_links.mkdir()
    (only_links / "x.parquet").symlink_to(root / "a" / "x.parquet")
    assert len(list_units(only_links, "text")) == 2
    # two names of one file (a Hugging Face cache's snapshots of two revisions link to one blob): read once,
    # or its held-out documents would train under the other name
    (only_links / "y.parquet").symlink_to(root / "a" / "x.parquet")
    assert [Path(u.path).name for u in list_units(only_links, "text")] == ["x.parquet"] * 2
    assert [Path(u.path).name for u in list_units(f"{only_links}/*.parquet", "text")] == ["x.parquet"] * 2


def test_a_pattern_skips_what_a_folder_skips_and_lists_each_real_file_once(tmp_path, capsys):
    write_parquet(tmp_path / "d" / "part-0.parquet", ["a"])
    write_parquet(tmp_path / "d" / "_temporary" / "0" / "part-0.parquet", ["b"])
    write_parquet(tmp_path / "d" / "sub" / "part-1.parquet", ["c"])
    os.symlink(tmp_path / "d" / "sub", tmp_path / "d" / "link")
    os.symlink(tmp_path / "d", tmp_path / "d" / "sub" / "loop")  # a link back up the tree
    for pattern in ("**/*.parquet", "*", "**"):
        units = list_units(tmp_path / "d" / pattern, "text")
        assert [Path(u.path).relative_to(tmp_path / "d").as_posix() for u in units] == ["link/part-1.parquet",
                                                                                       "part-0.parquet"], pattern
        assert ("skipped 1 file(s) or folder(s) whose names start with '.' or '_', e.g. _temporary (not data"
                in capsys.readouterr().out)  # (no name of a shard among them: a folder's)


def test_a_pattern_finds_a_folder_also_reached_through_links(tmp_path):
    for version in ("v1", "v2"):
        for name in ("a", "b"):
            write_parquet(tmp_path / "data" / version / "train" / f"{name}.parquet", [f"{version} {name}"])
    os.symlink(tmp_path / "data" / "v2" / "train", tmp_path / "data" / "current")
    os.symlink(tmp_path / "data" / "v2", tmp_path / "data" / "latest")  # walked before v2, not matched by v*
    units = list_units(tmp_path / "data" / "v*" / "train" / "*.parquet", "text")
    assert [Path(u.path).relative_to(tmp_path / "data").as_posix() for u in units] == [
        "v1/train/a.parquet", "v1/train/b.parquet", "v2/train/a.parquet", "v2/train/b.parquet"]
    units = list_units(tmp_path / "data" / "*" / "train" / "*.parquet", "text")  # latest/train is v2/train
    assert [Path(u.path).relative_to(tmp_path / "data").as_posix() for u in units] == [
        "latest/train/a.parquet", "latest/train/b.parquet", "v1/train/a.parquet", "v1/train/b.parquet"]
    assert len(list_units(tmp_path / "data" / "**" / "train" / "*.parquet", "text")) == 4  # each real file once
    write_parquet(tmp_path / "data" / "loose.parquet", ["c"])
    assert len(list_units(tmp_path / "data" / "*", "text")) == 5
    assert len(list_units(f"{tmp_path / 'data'}/*/", "text")) == 4  # a trailing / matches folders only


def test_an_escaped_folder_name_keeps_the_folder_s_keys(tmp_path):
    folder = tmp_path / "x[1]"
    write_parquet(folder / "train-0.parquet", ["a"])
    write_parquet(folder / "notes.parquet", ["b"])
    by_folder = [(u.path, u.file_key) for u in list_units(folder, "text")]
    escaped = Path(glob.escape(str(folder)))
    assert [(u.path, u.file_key) for u in list_units(escaped / "*.parquet", "text")] == by_folder
    assert [(u.path, u.file_key) for u in list_units(escaped / "train*.parquet", "text")] == by_folder[1:]


def test_one_parquet_file_is_read_and_another_file_is_refused(tmp_path):
    write_parquet(tmp_path / "one.parquet", ["a", "b"])
    [unit] = list_units(tmp_path / "one.parquet", "text")
    assert unit.num_rows == 2 and unit.file_key == list_units(tmp_path, "text")[0].file_key
    (tmp_path / "notes.txt").write_text("text")
    out = f"{tmp_path / 'notes'}_parquet"
    with pytest.raises(DataError) as info:
        list_units(tmp_path / "notes.txt", "text")
    assert str(info.value).endswith(
        "is a file, not a folder of .parquet shards; give their folder, a .parquet file or a glob pattern; to train "
        f"on this file's text: `python prepare.py --from-text {tmp_path / 'notes.txt'} --out {out}` and "
        f"set dataset.parquet_dir={out}")
    (tmp_path / "pq").mkdir()  # parquet named otherwise: renamed, not converted as text
    (tmp_path / "one.parquet").rename(tmp_path / "pq" / "one.pq")
    with pytest.raises(DataError, match=r"one.pq: a parquet file whose name does not end in .parquet \(only such "
                                        r"names are read as shards\); rename it: `mv .*/one.pq .*/one.parquet`$"):
        list_units(tmp_path / "pq" / "one.pq", "text")
    with pytest.raises(DataError, match=r"pq/one.pq: named like a parquet shard but not ending in .parquet, so "
                                        r"dataset.parquet_dir would leave it out of the data; rename such files"):
        list_units(tmp_path / "pq", "text")
    (tmp_path / "pq" / "one.pq").rename(tmp_path / "pq" / "one.bin")  # known by its bytes
    with pytest.raises(DataError, match=r"no .parquet files found \(searched recursively\); one.bin is a parquet "
                                        r"file whose name does not end in .parquet: rename such files to end in .parquet"):
        list_units(tmp_path / "pq", "text")


def test_shards_named_pq_or_in_capitals_beside_parquet_files_are_refused_not_left_out(tmp_path):
    for name in ("a.parquet", "b.PARQUET", "sub/c.pq", "sub/d.parq"):
        write_parquet(tmp_path / "data" / name, ["text"])
    (tmp_path / "data" / "notes.txt").write_text("not a shard")
    (tmp_path / "data" / "._e.pq").write_bytes(b"")  # a macOS copy: skipped as names starting with '.' are
    (tmp_path / "data" / "query.pq").write_text("let Source = 1 in Source")  # a Power Query script: not a shard
    message = (r"/data/b.PARQUET and 2 more: named like a parquet shard but not ending in .parquet, so "
               r"dataset.parquet_dir would leave them out of the data; rename such files to end in .parquet \(only "
               r"those are read\), or move them out of .*/data$")
    for given in ("data", "data/*", "data/**"):
        with pytest.raises(DataError, match=message):
            list_units(str(tmp_path / given), "text")
    assert [Path(unit.path).name for unit in list_units(str(tmp_path / "data" / "*.parquet"), "text")] == ["a.parquet"]
    with pytest.raises(DataError, match=r"/data/sub/c.pq and 1 more: .* would leave them out"):
        list_units(str(tmp_path / "data" / "*") + "/", "text")  # folders only: sub
    (tmp_path / "data" / "b.PARQUET").rename(tmp_path / "data" / "b.parquet")
    with pytest.raises(DataError, match=r"sub/c.pq and 1 more"):
        list_units(tmp_path / "data", "text")


def test_a_pattern_that_matches_nothing_says_what_the_folder_holds(tmp_path):
    hub_layout(tmp_path / "w")
    folder = tmp_path / "w" / "wikitext-2-raw-v1"
    with pytest.raises(DataError) as e:
        list_units(folder / "valdation-*.parquet", "text")
    assert str(e.value).startswith(f"{folder / 'valdation-*.parquet'}: dataset.parquet_dir matches no .parquet file; "
                                   f"{folder} holds 4 .parquet file(s), such as validation-00000-of-00001.parquet, ")
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'} does not exist"):
        list_units(tmp_path / "nowhere" / "*.parquet", "text")


def hub_snapshot(root, missing=("train-00001-of-00002",)):
    """A Hugging Face cache's snapshot: links into blobs/, of which an interrupted download left some unwritten."""
    data = root / "snapshots" / "abc123" / "data"
    data.mkdir(parents=True)
    for k, name in enumerate(("train-00000-of-00002", "train-00001-of-00002")):
        if name not in missing:
            write_parquet(root / "blobs" / f"blob{k}", [f"doc {k}"] * 3, 2)
        (data / f"{name}.parquet").symlink_to(Path("..") / ".." / ".." / "blobs" / f"blob{k}")
    return data


def test_a_link_to_a_missing_file_is_refused_not_skipped(tmp_path, capsys):
    data = hub_snapshot(tmp_path / "hub")
    link, blob = data / "train-00001-of-00002.parquet", tmp_path / "hub" / "blobs" / "blob1"
    message = (f"{link}: a symbolic link to {blob}, which does not exist; re-download the dataset, or remove the "
               f"link(s) to train without those files")
    for location in (data, tmp_path / "hub", data / "*.parquet", tmp_path / "hub" / "**" / "train-*.parquet"):
        with pytest.raises(DataError) as e:
            list_units(location, "text")
        assert str(e.value) == message, location
    assert len(list_units(data / "train-00000*.parquet", "text")) == 2  # a pattern that leaves it out needs it not
    (data / "_partial.parquet").symlink_to(tmp_path / "nowhere")  # not data, as for a file
    (data / ".hidden.parquet").symlink_to(tmp_path / "nowhere")
    link.unlink()
    assert len(list_units(data, "text")) == 2
    assert "skipped 2 file(s) or folder(s) whose names start with '.' or '_'" in capsys.readouterr().out


def test_a_folder_of_only_missing_links_says_so(tmp_path):
    data = hub_snapshot(tmp_path / "hub", missing=("train-00000-of-00002", "train-00001-of-00002"))
    with pytest.raises(DataError, match=r"^\S+/train-00000-of-00002.parquet: a symbolic link to \S+/blobs/blob0, which "
                                        r"does not exist \(and 1 more such link\(s\)\); re-download the dataset, or "
                                        r"remove the link\(s\) to train without those files$"):
        list_units(data, "text")
    only = tmp_path / "only"
    only.mkdir()
    (only / "b.parquet").symlink_to("/nonexist.parquet")
    with pytest.raises(DataError, match=r"b.parquet: a symbolic link to /nonexist.parquet, which does not exist;"):
        list_units(only, "text")
    (only / "b.parquet").unlink()
    (only / "b.parquet").symlink_to("a.parquet")
    (only / "a.parquet").symlink_to("b.parquet")
    for location, what in ((only, ""), (only / "a.parquet", "dataset.parquet_dir is ")):
        with pytest.raises(DataError, match=f"a.parquet: {what}a symbolic link that leads back to itself \\(links in a "
                                            f"loop\\)"):
            list_units(location, "text")


def test_a_setting_that_is_a_link_to_nothing_says_so(tmp_path):
    for name, target in (("data", tmp_path / "gone"), ("b.parquet", tmp_path / "gone.parquet")):
        (tmp_path / name).symlink_to(target)
        with pytest.raises(DataError) as e:
            list_units(tmp_path / name, "text", setting="dataset.val_parquet_dir")
        assert str(e.value) == (f"{tmp_path / name}: dataset.val_parquet_dir is a symbolic link to {target}, which "
                                f"does not exist; restore its target (re-download it) or set dataset.val_parquet_dir "
                                f"to where the data is")


# ---- found by mutating layout.py: patterns, missing and empty files, what conversion advice names

def test_a_pattern_with_only_brackets_is_a_glob_pattern(tmp_path):
    for name in ("part-0.parquet", "part-1.parquet", "part-2.parquet"):
        write_parquet(tmp_path / "d" / name, ["a"])
    units = list_units(tmp_path / "d" / "part-[01].parquet", "text")
    assert sorted({u.path.rsplit("/", 1)[1] for u in units}) == ["part-0.parquet", "part-1.parquet"]


def test_a_missing_parquet_file_is_offered_prepare_into_that_name_or_a_shard_its_name_is_a_typo_of(tmp_path):
    with pytest.raises(DataError, match=r"gone.parquet: dataset.parquet_dir does not exist; create it with `python "
                                        r"prepare.py --from-text FILE --out \S*/gone.parquet`$"):
        list_units(tmp_path / "gone.parquet", "text")
    write_parquet(tmp_path / "train_000.parquet", ["some text"])
    with pytest.raises(DataError, match=rf"train_00.parquet: dataset.parquet_dir does not exist; did you mean "
                                        rf"{tmp_path / 'train_000.parquet'}\? or create it with"):
        list_units(tmp_path / "train_00.parquet", "text")


def test_an_empty_parquet_file_is_to_be_re_created_not_converted_as_text(tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.parquet: not a readable parquet file \(.*\); remove or re-create it$"):
        list_units(tmp_path, "text")


def test_a_folder_of_empty_folders_is_told_to_convert_into_one_beside_it(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no .parquet files found \(searched recursively\); convert its text with "
                                        r"`python prepare.py --from-text FILE ... --out \S*/data_parquet` and set "
                                        r"dataset.parquet_dir=\S*/data_parquet$"):
        list_units(tmp_path / "data", "text")


def test_conversion_advice_ignores_names_starting_with_dot_or_underscore(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("some text")
    (tmp_path / "data" / "_log.jsonl").write_text('{"a": 1}\n')  # not data: sorted first, but not the advice's
    with pytest.raises(DataError, match=r"convert its text with `python prepare.py --from-text \S*data/\*.txt --out"):
        list_units(tmp_path / "data", "text")


@pytest.mark.parametrize("name", ["data.tsv", "DATA.JSONL", "data.CSV"])
def test_records_of_every_kind_and_case_are_not_taken_for_text(tmp_path, name):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / name).write_text("text\thi\n")
    with pytest.raises(DataError, match=rf"; {name} holds records, not plain text: write them as parquet"):
        list_units(tmp_path / "records", "text")


def test_a_saved_dataset_dict_tells_the_validation_setting_its_validation_file(tmp_path):
    (tmp_path / "saved" / "train").mkdir(parents=True)
    (tmp_path / "saved" / "dataset_dict.json").write_text("{}")
    with pytest.raises(DataError, match=r"for s in d\]\"`, and set dataset.val_parquet_dir="
                                        r"\S*saved_parquet/validation.parquet$"):
        list_units(tmp_path / "saved", "text", setting="dataset.val_parquet_dir")


def test_a_pattern_that_matches_only_skipped_names_says_how_many(tmp_path):
    write_parquet(tmp_path / "d" / "_part-0.parquet", ["a"])
    write_parquet(tmp_path / "d" / ".part-1.parquet", ["a"])
    write_parquet(tmp_path / "d" / "other.parquet", ["a"])
    with pytest.raises(DataError, match=r"part-\*.parquet: dataset.parquet_dir matches no .parquet file \(2 name\(s\) "
                                        r"starting with '.' or '_' skipped\)"):
        list_units(tmp_path / "d" / "*part-*.parquet", "text")
