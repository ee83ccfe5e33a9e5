"""Parquet shards: checking them (footers, schemas, text columns), the split, reading."""
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shards
from conftest import write_parquet
from shards import DataError, Holdout, first_documents, list_units, validation_mask


def test_a_file_whose_column_holds_only_nulls_is_skipped_with_a_note(tmp_path, capsys):
    write_parquet(tmp_path / "a.parquet", ["x"] * 5, 2)
    write_parquet(tmp_path / "b.parquet", [None] * 3, 2, type_=pa.null())  # what an all-None column is written as
    assert [Path(u.path).name for u in list_units(tmp_path, "text")] == ["a.parquet"] * 3
    assert f"{tmp_path}: skipped 1 file(s) whose column 'text' holds only nulls (type null), e.g. b.parquet" in \
        capsys.readouterr().out
    write_parquet(tmp_path / "c.parquet", [], 2)  # a file without rows: left out too, and said
    list_units(tmp_path, "text")
    assert f"{tmp_path}: skipped 1 file(s) with no rows, e.g. c.parquet" in capsys.readouterr().out
    with pytest.raises(DataError, match=r": column 'text' holds only nulls \(type null\) in every file with rows, e.g. "
                                        r"b.parquet; the files hold no text: write the documents into them"):
        list_units(tmp_path / "b.parquet", "text")
    pq.write_table(pa.table({"text": pa.nulls(3), "content": ["x", "y", "z"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"e.g. d.parquet; set dataset.text_column to the column with the text \(its "
                                        r"string columns are \['content'\]"):
        list_units(tmp_path / "d.parquet", "text")
    pq.write_table(pa.table({"text": []}), tmp_path / "e.parquet")  # no rows, no type: empty, not nulls
    with pytest.raises(DataError, match=r"its parquet file e.parquet holds no rows: write the documents into it"):
        list_units(tmp_path / "e.parquet", "text")


def test_split_depends_on_the_seed_the_file_and_the_row_group_not_on_where_the_file_is():
    u = shards.Unit("x.parquet", 3, 1000, 0, 12345, 0)
    assert np.array_equal(validation_mask(u, 1, 0.1), validation_mask(shards.Unit("/elsewhere/x.parquet", 3, 1000, 0,
                                                                                  12345, 0), 1, 0.1))
    assert not np.array_equal(validation_mask(u, 1, 0.1), validation_mask(u, 2, 0.1))
    assert 50 < validation_mask(u, 1, 0.1).sum() < 150
    # another file, another row group of the same rows: other rows held out (not the same positions everywhere)
    for other in (shards.Unit("y.parquet", 3, 1000, 0, 54321, 0), shards.Unit("x.parquet", 4, 1000, 0, 12345, 0)):
        assert (validation_mask(u, 1, 0.1) & validation_mask(other, 1, 0.1)).sum() < 30  # ~10 by chance


def held_out_texts(folder, split_by="text", seed=1337, fraction=0.2) -> list[str]:
    cache = shards.ParquetFileCache(4)
    return sorted(doc.decode() for unit in list_units(folder, "text") for part in shards.read_unit_documents(
        cache, unit, "text", "val", Holdout(fraction, seed, split_by)) for doc in part.to_pylist())


def test_the_split_by_text_follows_the_documents_wherever_and_in_whatever_order_the_shards_hold_them(tmp_path):
    """Renamed, moved into a subfolder, rewritten shuffled in other row groups (prepare.py --from-parquet),
    joined by another shard: the same documents held out; by position, a rename alone re-draws them."""
    docs = [f"document {i} " + "words " * (i % 7) for i in range(300)]
    write_parquet(tmp_path / "a" / "shard-0.parquet", docs[:150], 16)
    write_parquet(tmp_path / "a" / "shard-1.parquet", docs[150:], 16)
    held = held_out_texts(tmp_path / "a")
    assert 30 < len(held) < 90 and set(held) < set(docs)
    write_parquet(tmp_path / "b" / "renamed.parquet", docs[:150], 16)
    write_parquet(tmp_path / "b" / "sub" / "moved.parquet", docs[150:], 16)
    assert held_out_texts(tmp_path / "b") == held
    shuffled = [docs[i] for i in np.random.default_rng(0).permutation(300)]
    write_parquet(tmp_path / "c" / "all.parquet", shuffled, 7)
    write_parquet(tmp_path / "c" / "new.parquet", [f"new document {i}" for i in range(100)], 16)
    assert [doc for doc in held_out_texts(tmp_path / "c") if not doc.startswith("new")] == held
    assert held_out_texts(tmp_path / "a", seed=1) != held  # split_seed draws another split
    assert held_out_texts(tmp_path / "a", "position") != held_out_texts(tmp_path / "b", "position")
    write_parquet(tmp_path / "d" / "copies.parquet", docs[:10] * 10, 16)  # equal documents: all on one side
    held = held_out_texts(tmp_path / "d", fraction=0.5)
    assert 0 < len(set(held)) < 10 and all(held.count(doc) == 10 for doc in held)


def test_the_documents_held_out_stay_the_same_from_version_to_version(tmp_path):
    """A resumed run (or one compared with an older run) must hold out the documents it held out
    before: a change to the hash or to the file's key would train on the validation documents."""
    u = shards.Unit("x.parquet", 3, 1000, 0, 12345, 0)
    assert np.flatnonzero(validation_mask(u, 1337, 0.05)).tolist() == [
        7, 23, 59, 85, 97, 165, 172, 198, 199, 235, 251, 261, 264, 287, 310, 417, 456, 494, 503, 507, 567, 625, 643,
        650, 674, 711, 713, 719, 748, 754, 797, 800, 833, 836, 882, 912, 977, 989]
    write_parquet(tmp_path / "a" / "part-00000.parquet", ["one", "two"])
    [unit] = list_units(tmp_path, "text")  # the key: a hash of the path below parquet_dir
    assert unit.file_key == 2182301152958970292
    docs = pa.array([f"doc {i}".encode() for i in range(200)], pa.large_binary())  # by text (0.5.0 on)
    assert np.flatnonzero(Holdout(0.05, 1337).held_out(unit, docs, 0)).tolist() == [57, 79, 83, 103, 104, 145, 146,
                                                                                    175, 179]
    assert np.array_equal(Holdout(0.05, 1337, "position").held_out(u, docs, 100), validation_mask(u, 1337,
                                                                                                  0.05)[100:300])


def test_file_that_is_not_parquet(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"\x00\x01 binary, not parquet")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable parquet file \(.*\); remove or re-create it$"):
        list_units(tmp_path, "text")
    (tmp_path / "bad.parquet").write_text("a text file named as a shard")  # what to do with it instead
    out = tmp_path / "bad_parquet"
    with pytest.raises(DataError, match=rf"bad.parquet: not a readable parquet file \(.*\); it holds text: convert it "
                                        rf"with `python prepare.py --from-text {tmp_path}/bad.parquet --out {out}` and "
                                        rf"set dataset.parquet_dir={out}$"):
        list_units(tmp_path, "text")
    write_parquet(tmp_path / "good.parquet", ["some text"])  # beside shards: converted among them, then removed
    with pytest.raises(DataError, match=rf"bad.parquet: not a readable parquet file \(.*\); it holds text: convert it "
                                        rf"into shards beside the others with `python prepare.py --from-text "
                                        rf"{tmp_path}/bad.parquet --out {tmp_path}/bad_text`, then delete it"):
        list_units(tmp_path, "text")
    # what a clone of a dataset without git-lfs holds in place of each shard
    (tmp_path / "bad.parquet").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 99\n")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable parquet file \(.*\); it is a Git LFS pointer, "
                                        r"not the data: fetch the files \(`git lfs pull` in the dataset's clone\)$"):
        list_units(tmp_path, "text")


def test_a_shard_removed_while_it_is_checked_is_one_line(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "a.parquet", ["some text"])

    def gone(where):
        path.unlink()
        raise FileNotFoundError(2, "No such file or directory", str(where))
    monkeypatch.setattr(pq, "read_metadata", gone)
    with pytest.raises(DataError, match=r"a.parquet: not a readable parquet file \(.*No such file.*\); remove or "
                                        r"re-create it$"):
        list_units(tmp_path, "text")


def test_truncated_file(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", ["some text"] * 50, 10)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"t.parquet: not a readable parquet file"):
        list_units(tmp_path, "text")


def test_missing_text_column_names_the_string_columns(tmp_path):
    pq.write_table(pa.table({"id": [1], "content": ["x"], "lang": pa.array(["en"]).dictionary_encode()}),
                   tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"no column 'text'; its string columns are \['content', 'lang'\] \(all: "
                                        r"\['id', 'content', 'lang'\]\); set dataset.text_column to the one that holds"):
        list_units(tmp_path, "text")
    with pytest.raises(DataError, match=r"column 'id' has type int64, expected a string column; its string columns "
                                        r"are \['content', 'lang'\]"):
        list_units(tmp_path, "id")
    assert len(list_units(tmp_path, "lang")) == 1
    # the validation folder's: text_column is both folders' setting, so the advice is to rename its column
    with pytest.raises(DataError, match=r"no column 'text'; .*; dataset.text_column names the column of both folders, "
                                        r"and the training shards have 'text': rename the validation shards' column "
                                        r"to 'text'$"):
        list_units(tmp_path, "text", setting="dataset.val_parquet_dir")


def test_files_that_differ_in_their_text_column_are_named_as_such(tmp_path):
    """Setting dataset.text_column to either file's column would send the user to the other's."""
    for name in ("a", "b", "c"):
        pq.write_table(pa.table({"content": ["x"], "url": ["u"]}), tmp_path / f"{name}.parquet")
    pq.write_table(pa.table({"text": ["y"], "meta": ["m"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError) as info:
        list_units(tmp_path, "content")
    assert str(info.value) == (f"{tmp_path / 'd.parquet'}: no column 'content', which 3 of the 4 files have "
                               f"(e.g. {tmp_path / 'a.parquet'}); its string columns are ['text', 'meta']: the files "
                               f"differ; rename the column in those without it, or set dataset.parquet_dir to a glob "
                               f"pattern that leaves them out")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'a.parquet'))} and 2 other file\(s\): no column "
                                        rf"'text', which 1 of the 4 files has \(e.g. .*d.parquet\); its "
                                        rf"string columns are \['content', 'url'\]: the files differ"):
        list_units(tmp_path, "text")
    with pytest.raises(DataError, match=r"set dataset.val_parquet_dir to a glob pattern that leaves them out$"):
        list_units(tmp_path, "text", setting="dataset.val_parquet_dir")


def test_non_string_column_is_refused(tmp_path):
    write_parquet(tmp_path / "a.parquet", [1, 2], type_=pa.int64())
    with pytest.raises(DataError, match=r"has type int64, expected a string column; it has no string column \(all: \[.text.\]\)$"):
        list_units(tmp_path, "text")
    write_parquet(tmp_path / "a.parquet", [[1, 2], [3]], type_=pa.list_(pa.int32()))  # pre-tokenized
    with pytest.raises(DataError, match=r"has type list<.*int32>, expected a string column \(token ids are not "
                                        r"read: the shards hold the text\); it has no string column"):
        list_units(tmp_path, "text")


def test_a_file_with_two_text_columns_is_refused_in_one_line(tmp_path):
    import pyarrow.parquet as pq
    texts = pa.array(["some text"] * 4)
    pq.write_table(pa.Table.from_arrays([texts, texts], names=["text", "text"]), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet: 2 columns are named 'text', and the text must be one: write the "
                                        r"file again with distinct column names$"):
        list_units(tmp_path, "text")


def test_a_shard_gone_unreadable_or_rewritten_while_training_is_not_called_corrupt(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", ["x"] * 8, 4)
    [unit, second] = list_units(tmp_path, "text")
    path.unlink()
    with pytest.raises(DataError) as e:
        list(shards.read_unit_documents(shards.ParquetFileCache(1), unit, "text", "train", Holdout(0.1, 0)))
    assert str(e.value) == (f"{path}: the file is gone (No such file or directory); training needs every shard it "
                            f"started with: restore it, or resume from the last checkpoint to train on the data as it "
                            f"is now (the data order then changes)")

    for rewritten, change in [(dict(docs=["y"] * 8, rows_per_group=8), "1 row group(s), where row group 1 was"),
                              (dict(docs=["y"] * 6, rows_per_group=3), "row group 1 has 3 rows, not 4"),
                              (dict(docs=["yy"] * 8), "row group 1 has 60 bytes, not 57"),  # as many rows
                              (dict(docs=["y"] * 8, column="body"), "no column 'text' any more"),
                              (dict(docs=pa.array([1] * 8)), "column 'text' has type int64 now")]:
        write_parquet(path, docs=["x"] * 8, rows_per_group=4)
        cache = shards.ParquetFileCache(1)
        list(shards.read_unit_documents(cache, unit, "text", "train", Holdout(0.1, 0)))  # a reader has the file open
        write_parquet(path, **rewritten)  # in place, after the start listed it
        with pytest.raises(DataError) as e:
            list(shards.read_unit_documents(cache, second, "text", "train", Holdout(0.1, 0)))
        assert str(e.value) == (f"{path}: the file changed since the run started ({change}); training needs its shards "
                                f"as they were at the start: restore it, or resume from the last checkpoint to train "
                                f"on the data as it is now (the data order then changes)")

    class OpenedBefore:  # the file rewritten while a unit of it is read
        def __init__(self):
            self.parquet = pq.ParquetFile(path)

        def get(self, _path):
            return self.parquet
    write_parquet(path, docs=["x" * 100] * 8, rows_per_group=4)
    [unit, second] = list_units(tmp_path, "text")
    opened_before = OpenedBefore()
    write_parquet(path, docs=["y"] * 6, rows_per_group=3)
    with pytest.raises(DataError, match=r"the file changed since the run started \(row group 1 has 3 rows, not 4\)"):
        list(shards.read_unit_documents(opened_before, second, "text", "train", Holdout(0.1, 0)))

    class Unreadable:  # chmod does not stop root
        def get(self, path):
            raise PermissionError(13, "Permission denied", path)
    with pytest.raises(DataError, match=r"a.parquet: the file cannot be read \(Permission denied\); training needs "
                                        r"every shard it started with: make it readable, or resume"):
        list(shards.read_unit_documents(Unreadable(), unit, "text", "train", Holdout(0.1, 0)))


def test_the_file_cache_keeps_files_open_until_rewritten_or_least_recently_used(tmp_path):
    for name in "abc":
        write_parquet(tmp_path / f"{name}.parquet", [name] * 4, 2)
    a, b, c = (str(tmp_path / f"{name}.parquet") for name in "abc")
    cache = shards.ParquetFileCache(2)
    first = cache.get(a)
    assert cache.get(a) is first  # unchanged on disk: the same open file
    cache.get(b)
    cache.get(a)  # a is now the most recently used: c's opening closes b
    cache.get(c)
    assert list(cache.files) == [a, c]
    os.replace(write_parquet(tmp_path / "new" / "a.parquet", ["A"] * 6, 3), a)  # replaced (prepare.py --replace)
    reopened = cache.get(a)
    assert reopened is not first and reopened.metadata.num_rows == 6
    cache.close()
    assert cache.files == {}


def test_a_part_ends_early_where_its_text_outgrows_what_the_metadata_promised(tmp_path, monkeypatch):
    """Parts are sized from the row group's metadata; where the text is far larger than it says (a few
    long documents repeated, which the writer's dictionary stores once; a row group sorted by length)
    a part ends once its text passes PART_TEXT_LIMIT x READ_BYTES, so memory stays bounded."""
    monkeypatch.setattr(shards, "READ_BYTES", 4096)
    long_docs = [chr(97 + k % 4) * 20_000 for k in range(400)]  # 8 MB of text, in a file of a few KB
    path = write_parquet(tmp_path / "a.parquet", long_docs, rows_per_group=400)
    [unit] = list_units(tmp_path, "text")
    assert pq.ParquetFile(path).metadata.row_group(0).total_byte_size < 200_000  # the dictionary: each text once
    parts = list(shards.read_unit_documents(shards.ParquetFileCache(1), unit, "text", "all", Holdout(0.1, 0)))
    limit = shards.PART_TEXT_LIMIT * shards.READ_BYTES
    assert sum(len(part) for part in parts) == 400 and len(parts) > 1
    assert all(sum(map(len, part.to_pylist())) <= limit + 20_000 for part in parts)  # (the row that passed it)
    sorted_docs = ["x" * n for n in range(1, 800)]  # short first: the average row is far from the last rows
    write_parquet(tmp_path / "b" / "b.parquet", sorted_docs, rows_per_group=800)
    [unit] = list_units(tmp_path / "b", "text")
    parts = list(shards.read_unit_documents(shards.ParquetFileCache(1), unit, "text", "all", Holdout(0.1, 0)))
    assert [doc for part in parts for doc in part.to_pylist()] == [doc.encode() for doc in sorted_docs]
    assert max(sum(map(len, part.to_pylist())) for part in parts) <= limit + 800


def test_the_text_bytes_are_the_top_level_text_columns_not_a_struct_field_of_the_same_path(tmp_path):
    """A struct column `a` with a field `b` and a column named `a.b` have the same parquet path, a.b."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"a": pa.array([{"b": "x" * 1000}] * 3), "a.b": ["short"] * 3})
    pq.write_table(table, tmp_path / "dotted.parquet")
    [unit] = shards.list_units(tmp_path, "a.b")
    assert unit.text_bytes < 100 < 1000 < unit.num_bytes


def test_the_split_by_position_holds_out_the_same_rows_in_every_part_of_a_row_group(tmp_path, monkeypatch):
    """A row group read in several parts: each row keeps its own place (row index from the start of the
    row group), so validation holds out exactly validation_mask's rows and training the rest."""
    monkeypatch.setattr(shards, "READ_BYTES", 2048)
    docs = [f"document {i:04d} " + "w" * (i % 13) for i in range(600)]
    write_parquet(tmp_path / "a.parquet", docs, rows_per_group=600)
    [unit] = list_units(tmp_path, "text")
    holdout = Holdout(0.3, 7, "position")
    with shards.ParquetFileCache(1) as cache:
        val_parts = list(shards.read_unit_documents(cache, unit, "text", "val", holdout))
        train = [d.decode() for part in shards.read_unit_documents(cache, unit, "text", "train", holdout)
                 for d in part.to_pylist()]
    assert len(val_parts) > 2  # several parts
    mask = validation_mask(unit, 7, 0.3)
    assert [d.decode() for part in val_parts for d in part.to_pylist()] == [d for d, m in zip(docs, mask) if m]
    assert train == [d for d, m in zip(docs, mask) if not m]


def test_rows_per_part_is_read_bytes_worth_of_the_row_group():
    unit = shards.Unit("x.parquet", 0, 1000, 4 * shards.READ_BYTES, 0, 0)
    assert shards.rows_per_part(unit) == 250
    assert shards.rows_per_part(shards.Unit("x.parquet", 0, 10, 100 * shards.READ_BYTES, 0, 0)) == 1
    assert shards.rows_per_part(shards.Unit("x.parquet", 0, 10, 0, 0, 0)) == 10 * shards.READ_BYTES


def test_a_part_that_spans_batches_still_ends_once_its_text_passes_the_limit(tmp_path, monkeypatch):
    """Short repeated documents (dictionary-encoded: the metadata counts them once): each batch is under
    the limit, so a part gathers several batches and must stop at the first row whose text passes it."""
    monkeypatch.setattr(shards, "READ_BYTES", 4096)
    docs = [chr(97 + k % 4) * 20 for k in range(5000)]
    write_parquet(tmp_path / "a.parquet", docs, rows_per_group=5000)
    [unit] = list_units(tmp_path, "text")
    with shards.ParquetFileCache(1) as cache:
        parts = list(shards.read_unit_documents(cache, unit, "text", "all"))
    limit = shards.PART_TEXT_LIMIT * shards.READ_BYTES
    assert [d for part in parts for d in part.to_pylist()] == [d.encode() for d in docs]
    sizes = [sum(map(len, part.to_pylist())) for part in parts]
    assert all(limit < size <= limit + 20 for size in sizes[:-1]), sizes


def test_the_text_bytes_are_the_top_level_columns_not_a_struct_field_of_the_same_name(tmp_path):
    table = pa.table({"meta": pa.array([{"text": "x" * 1000}] * 3), "text": ["short"] * 3})
    pq.write_table(table, tmp_path / "a.parquet")
    [unit] = list_units(tmp_path, "text")
    assert unit.text_bytes < 100 < 1000 < unit.num_bytes


def test_an_empty_row_group_is_no_unit(tmp_path):
    with pq.ParquetWriter(tmp_path / "a.parquet", pa.schema([("text", pa.string())])) as writer:
        writer.write_table(pa.table({"text": ["a", "b"]}))
        writer.write_table(pa.table({"text": pa.array([], pa.string())}))
        writer.write_table(pa.table({"text": ["c"]}))
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.num_row_groups == 3  # (the empty one is written)
    assert [(u.row_group, u.num_rows) for u in list_units(tmp_path, "text")] == [(0, 2), (2, 1)]


def test_the_look_at_the_tokenizer_takes_only_the_first_n_documents_with_text(tmp_path):
    """The start-up check of what the tokenizer loses reads a few documents, not a whole part (up to 8 MB)."""
    write_parquet(tmp_path / "a.parquet", [None, "", "one", "two", None, "three", "four", "five"], 8)
    assert first_documents(list_units(tmp_path, "text")[0], "text", 3) == ["one", "two", "three"]
