"""Parquet shards: checking them and reading them.

Every shard (layout.py finds them: a folder, a glob pattern or one file) has one string column holding
one document per row: the Hugging Face datasets layout. A unit of work is one (file, row group);
list_units checks every footer and schema up front.

Reading: read_unit_documents streams one unit's non-empty documents of a split, in parts of about
READ_BYTES. Train/validation split (Holdout): each document goes to validation with probability
dataset.val_fraction, decided by a hash of dataset.split_seed and the document's text: the same for
every training seed, independent of workers, and of where the files are, their names and the order
of their rows (equal documents go to the same side). Runs begun before 0.5.0 hashed the document's
place, (file, row group, row), and keep doing so (dataset.split_by: position).

Writing them: corpus.py.
"""
import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from layout import DataError, shard_files, unreadable_shard_advice  # DataError: raised here too
from runtime import first_line


PROGRESS_EVERY_S = 5.0  # the slow passes over every file (checks, prepare.py) print a line this often
TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary(), pa.string_view())


def text_type(column_type) -> bool:
    """Whether a column of this type holds text (pandas categoricals are read decoded)."""
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    return column_type in TEXT_TYPES


@dataclass(frozen=True)
class Unit:
    path: str
    row_group: int
    num_rows: int
    num_bytes: int  # the row group's, all columns, uncompressed (its parts: rows_per_part)
    file_key: int  # hash of the path relative to parquet_dir: seeds the shuffle (and split_by position's split)
    text_bytes: int  # its text column's alone, uncompressed: what the readers' shares and the passes count


def list_units(parquet_dir, text_column: str, setting: str = "dataset.parquet_dir") -> list[Unit]:
    """Validate every shard's footer and schema up front and list its (file, row group) units.
    `parquet_dir`: a folder, or a glob pattern of files or folders. `setting` names the option in
    errors; a training folder whose files are named for several Hugging Face splits is refused."""
    root, files = shard_files(parquet_dir, setting)
    units, all_null, empty, missing, last_report = [], [], [], [], time.time()
    if len(files) >= 1000:
        print(f"checking the footers and schemas of {len(files):,} parquet files in {root} ...", flush=True)
    for k, path in enumerate(files):
        if time.time() - last_report > PROGRESS_EVERY_S:
            print(f"  {k:,} of {len(files):,} files checked", flush=True)
            last_report = time.time()
        meta, schema = read_footer(path, setting, alone=len(files) == 1)
        strings = [field.name for field in schema if text_type(field.type)]
        has = (f"its string columns are {strings}" if strings else "it has no string column") + (
            f" (all: {schema.names})" if len(schema.names) > len(strings) else "")
        if not meta.num_rows:  # (whatever its columns: nothing to read)
            empty.append(path)
            continue
        if text_column not in schema.names:
            missing.append((path, has))
            continue
        if schema.names.count(text_column) > 1:
            raise DataError(f"{path}: {schema.names.count(text_column)} columns are named {text_column!r}, and "
                            f"the text must be one: write the file again with distinct column names")
        if pa.types.is_null(schema.field(text_column).type):  # a writer's type for a column of only nulls
            all_null.append((path, strings, has))
            continue
        if not text_type(schema.field(text_column).type):
            kind = schema.field(text_column).type
            ids = " (token ids are not read: the shards hold the text)" * (pa.types.is_list(kind)
                                                                              or pa.types.is_large_list(kind))
            raise DataError(f"{path}: column {text_column!r} has type {kind}, expected a string column{ids}; {has}")
        relative = path.relative_to(root).as_posix().encode()
        file_key = int.from_bytes(hashlib.blake2b(relative, digest_size=8).digest(), "little")
        text = next((j for j in range(meta.num_columns)  # (the top-level column: a struct's a.b child is named b)
                     if meta.schema.column(j).path == meta.schema.column(j).name == text_column), None)
        for rg in range(meta.num_row_groups):
            info = meta.row_group(rg)
            if info.num_rows:
                units.append(Unit(str(path), rg, info.num_rows, info.total_byte_size, file_key,
                                  info.total_byte_size if text is None else info.column(text).total_uncompressed_size))
    if missing:
        raise missing_column(text_column, missing, files, setting)
    check_left_out(root, files, units, all_null, empty, text_column)
    return units


def read_footer(path: Path, setting: str, alone: bool):
    """(metadata, schema) of a shard; a DataError with what to do where it is not a readable parquet file."""
    try:
        return pq.read_metadata(path), pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        try:
            advice = unreadable_shard_advice(path, setting, alone=alone)
        except OSError:  # (gone since it was listed)
            advice = "remove or re-create it"
        raise DataError(f"{path}: not a readable parquet file ({first_line(e)}); {advice}")


def check_left_out(root: Path, files: list, units: list, all_null: list, empty: list, text_column: str):
    """The files list_units left out (a column of only nulls, no rows): said, and refused where no file has text."""
    if all_null and not units:
        path, strings, has = all_null[0]
        fix = (f"set dataset.text_column to the column with the text ({has})" if strings else
               "the files hold no text: write the documents into them (python prepare.py --from-text turns text "
               "files into shards)")
        raise DataError(f"{root}: column {text_column!r} holds only nulls (type null) in every file with rows, e.g. "
                        f"{path.name}; {fix}")
    if all_null:
        print(f"{root}: skipped {len(all_null)} file(s) whose column {text_column!r} holds only nulls (type null), "
              f"e.g. {all_null[0][0].name}")
    if empty and units:
        print(f"{root}: skipped {len(empty)} file(s) with no rows, e.g. {empty[0].name}")
    if not units:
        what = f"its {len(files)} parquet files hold" if len(files) > 1 else f"its parquet file {files[0].name} holds"
        raise DataError(f"{root}: {what} no rows: write the documents into {'them' if len(files) > 1 else 'it'} "
                        f"(python prepare.py --from-text turns text files into shards)")


def missing_column(text_column: str, missing: list, files: list, setting: str) -> DataError:
    """The error for the files without text_column ((path, what string columns it has) each): the
    setting to change, or, where other files have it, that the files differ."""
    (path, has), without = missing[0], {path for path, _ in missing}
    if len(missing) == len(files) and setting == "dataset.val_parquet_dir":  # (the training shards have it)
        return DataError(f"{path}: no column {text_column!r}; {has}; dataset.text_column names the column of both "
                         f"folders, and the training shards have {text_column!r}: rename the validation shards' "
                         f"column to {text_column!r}")
    if len(missing) == len(files):
        return DataError(f"{path}: no column {text_column!r}; {has}; set dataset.text_column to the one that holds the "
                         f"documents")
    example = next(f for f in files if f not in without)
    others = f" and {len(missing) - 1} other file(s)" if len(missing) > 1 else ""
    having = len(files) - len(missing)
    return DataError(f"{path}{others}: no column {text_column!r}, which {having} of the {len(files)} files "
                     f"{'has' if having == 1 else 'have'} (e.g. {example}); {has}: the files differ; rename the column in those "
                     f"without it, or set {setting} to a glob pattern that leaves them out")


class ParquetFileCache:
    """Keeps at most `capacity` parquet files open; the least recently used is closed first. A file
    replaced or rewritten on disk since it was opened is opened anew (read_unit_documents then
    tells that it changed, rather than read an old copy or call it corrupt)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.files = OrderedDict()  # path: (the open file, its identity on disk when opened)

    def get(self, path: str) -> pq.ParquetFile:
        identity = on_disk(path)
        if path in self.files:
            parquet, opened_as = self.files.pop(path)
            if opened_as == identity:
                self.files[path] = parquet, opened_as
                return parquet
            parquet.close()
        while len(self.files) >= self.capacity:
            _, (oldest, _) = self.files.popitem(last=False)
            oldest.close()
        # stream column chunks rather than read them whole: memory bounded whatever the row-group size
        self.files[path] = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False), identity
        return self.files[path][0]

    def close(self):
        while self.files:
            self.files.popitem()[1][0].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def on_disk(path: str) -> tuple:
    """What tells a file rewritten in place, or replaced, from the one opened before."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class Holdout:
    """Which documents validation holds out: each with probability `fraction`, by a hash of `seed` and
    the document's text (by "text"), or of its place, (file, row group, row) (by "position")."""
    fraction: float
    seed: int
    by: str = "text"

    def held_out(self, unit: Unit, docs: pa.Array, first_row: int) -> np.ndarray:
        """Which of `docs` (large_binary, the unit's rows from `first_row` on) validation holds out."""
        if self.by == "position":
            return validation_mask(unit, self.seed, self.fraction, first_row, first_row + len(docs))
        key = self.seed.to_bytes(8, "little")
        hashes = np.fromiter((int.from_bytes(hashlib.blake2b(doc or b"", digest_size=8, key=key).digest(), "little")
                              for doc in docs.to_pylist()), np.uint64, count=len(docs))
        return (hashes >> np.uint64(11)).astype(np.float64) / 2.0**53 < self.fraction


def holdout_of(dataset_cfg) -> Holdout:
    return Holdout(dataset_cfg.val_fraction, dataset_cfg.split_seed, dataset_cfg.split_by)


def validation_mask(unit: Unit, split_seed: int, fraction: float, start: int = 0, stop: int | None = None):
    """Which of rows start..stop - 1 (all) of a unit belong to validation by their place: a
    splitmix64 hash of (split_seed, file, rg, row)."""
    rows = np.arange(start, unit.num_rows if stop is None else stop, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = (np.uint64(unit.file_key) ^ np.uint64(split_seed * 0x9E3779B97F4A7C15 % 2**64)
             ^ (np.uint64(unit.row_group) << np.uint64(40))) + rows
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


READ_BYTES = 8 << 20  # a row group is read in parts of about this many bytes (uncompressed, all columns)
PART_TEXT_LIMIT = 4  # x READ_BYTES: a part whose text passes this ends early (rows of unequal or repeated text)
READ_ROWS = 256  # rows decoded at a time: an eighth of a part, at most this many


def rows_per_part(unit: Unit) -> int:
    """The rows of each part that read_unit_documents reads of the unit (about READ_BYTES of the row
    group by its metadata), unless its text passes PART_TEXT_LIMIT x READ_BYTES first."""
    return max(1, READ_BYTES * unit.num_rows // max(1, unit.num_bytes))


def first_documents(unit: Unit, text_column: str, n: int) -> list[str]:
    """Up to n non-empty documents from the start of a unit, as text (for a look at the tokenizer)."""
    with ParquetFileCache(1) as cache:
        docs = next(read_unit_documents(cache, unit, text_column, "all"), pa.array([], pa.large_binary()))
    return [doc.decode("utf-8", errors="replace") for doc in docs[:n].to_pylist()]


def changed_since_listed(parquet: pq.ParquetFile, unit: Unit, text_column: str) -> str:
    """How the file no longer matches its listed unit ("" if it does): a shard rewritten in place."""
    schema, metadata = parquet.schema_arrow, parquet.metadata
    if text_column not in schema.names:
        return f"no column {text_column!r} any more"
    if not text_type(schema.field(text_column).type):
        return f"column {text_column!r} has type {schema.field(text_column).type} now"
    if unit.row_group >= metadata.num_row_groups:
        return f"{metadata.num_row_groups} row group(s), where row group {unit.row_group} was"
    group = metadata.row_group(unit.row_group)
    if group.num_rows != unit.num_rows:
        return f"row group {unit.row_group} has {group.num_rows:,} rows, not {unit.num_rows:,}"
    if group.total_byte_size != unit.num_bytes:
        return f"row group {unit.row_group} has {group.total_byte_size:,} bytes, not {unit.num_bytes:,}"
    return ""


def read_unit_documents(cache: ParquetFileCache, unit: Unit, text_column: str, split: str,
                        holdout: Holdout | None = None):
    """The unit's non-empty documents of `split` (train or val: `holdout`'s; or all), one large_binary array per
    part: rows_per_part rows, about READ_BYTES of the row group by its metadata, or fewer where
    their text passes PART_TEXT_LIMIT x READ_BYTES (a row group sorted by length, or dictionary-
    encoded text, whose metadata counts each repeated text once). Memory follows the part, not the
    row-group size its writer chose. The parts are the same on every read (they follow from the
    file and READ_BYTES)."""
    rows, text_limit = rows_per_part(unit), PART_TEXT_LIMIT * READ_BYTES
    part, part_rows, part_text, first_row = [], 0, 0, 0
    try:
        parquet = cache.get(unit.path)
        if change := changed_since_listed(parquet, unit, text_column):
            raise changed(unit, change)
        for batch in parquet.iter_batches(batch_size=max(1, min(rows // 8, READ_ROWS)), row_groups=[unit.row_group],
                                          columns=[text_column], use_threads=False):
            docs = batch.column(0).cast(pa.large_binary())  # string, binary, views, dictionaries
            lengths = pc.binary_length(docs).fill_null(0).to_numpy(zero_copy_only=False)
            while len(docs):
                # this batch's rows that join the part: until it has `rows`, or its text passes the limit
                fits = int(np.searchsorted(np.cumsum(lengths), text_limit - part_text, side="right"))
                take = min(len(docs), rows - part_rows, fits + 1)
                piece = docs.slice(0, take)
                keep = pc.and_(pc.is_valid(piece), pc.greater(pc.binary_length(piece), 0))
                if split != "all":
                    held_out = holdout.held_out(unit, piece, first_row)
                    keep = pc.and_(keep, pa.array(held_out if split == "val" else ~held_out))
                part.append(pc.filter(piece, keep))
                part_rows, first_row = part_rows + take, first_row + take
                part_text += int(lengths[:take].sum())
                docs, lengths = docs.slice(take), lengths[take:]
                if part_rows == rows or part_text > text_limit:
                    yield pa.concat_arrays(part)
                    part, part_rows, part_text = [], 0, 0
            del batch, docs  # (before the next batch is decoded)
        if part:
            yield pa.concat_arrays(part)
    except (FileNotFoundError, PermissionError) as e:
        gone = isinstance(e, FileNotFoundError)
        what, fix = ("is gone", "restore it") if gone else ("cannot be read", "make it readable")
        raise DataError(f"{unit.path}: the file {what} ({os.strerror(e.errno) if e.errno else first_line(e)}); "
                        f"training needs every shard it started with: {fix}, or resume from the last checkpoint "
                        f"to train on the data as it is now (the data order then changes)")
    except (pa.ArrowException, OSError) as e:
        try:  # rewritten while this unit was read?
            with pq.ParquetFile(unit.path) as parquet:
                change = changed_since_listed(parquet, unit, text_column)
        except (pa.ArrowException, OSError):
            change = ""
        if change:
            raise changed(unit, change) from None
        raise DataError(f"{unit.path}: row group {unit.row_group} cannot be read "
                        f"({first_line(e)}); the file is corrupt or truncated: re-create it")


def changed(unit: Unit, change: str) -> DataError:
    return DataError(f"{unit.path}: the file changed since the run started ({change}); training needs its shards as "
                     f"they were at the start: restore it, or resume from the last checkpoint to train on the data as "
                     f"it is now (the data order then changes)")
