"""Parquet shards: the layout the data lives in, read and written.

Layout: every `*.parquet` file under a folder (recursively, sorted; names that start with '.' or
'_' are not data) or matched by a glob pattern, one string column holding one document per row: the
Hugging Face datasets layout. A unit of work is one (file, row group); list_units checks every footer
and schema up front, and refuses a training folder that mixes a held-out split's files with others.

Reading: read_unit_documents streams one unit's non-empty documents of a split, in parts of about
READ_BYTES. Train/validation split: each document goes to validation with probability
dataset.val_fraction, decided by a hash of (seed, file, row group, row): fixed by the seed,
independent of workers.

Writing: the user's text files (python prepare.py --from-text) and the built-in sample corpus.
"""
import glob
import hashlib
import os
import re
import shlex
import sysconfig
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from config import DEFAULT_SAMPLE_DIR
from files import relative_to_here, write_folder
from runtime import first_line


PATTERN_CHARACTERS = "*?["  # dataset.parquet_dir with one of these (and no such folder) is a glob pattern
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
               "evaluation": "test"}  # the Hugging Face Hub's split keywords in file and folder names


class DataError(Exception):
    """A problem with the user's data or shards, with a one-line message naming the file."""


# ---------------------------------------------------------------- listing and reading

TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary(), pa.string_view())


@dataclass(frozen=True)
class Unit:
    path: str
    row_group: int
    num_rows: int
    num_bytes: int
    file_key: int  # hash of the path relative to parquet_dir: seeds the split and the shuffle


def list_units(parquet_dir, text_column: str, setting: str = "dataset.parquet_dir") -> list[Unit]:
    """Validate every shard's footer and schema up front and list its (file, row group) units.
    `parquet_dir`: a folder, or a glob pattern of files or folders. `setting` names the option in
    errors; a training folder whose files are named for several Hugging Face splits is refused."""
    root, files = shard_files(parquet_dir, setting)
    if setting == "dataset.parquet_dir" and Path(parquet_dir).is_dir() and (mixed := mixed_splits(root, files)):
        raise DataError(mixed)
    units, last_report = [], time.time()
    if len(files) >= 1000:
        print(f"checking the footers and schemas of {len(files):,} parquet files in {root} ...", flush=True)
    for k, path in enumerate(files):
        if time.time() - last_report > 5:
            print(f"  {k:,} of {len(files):,} files checked", flush=True)
            last_report = time.time()
        try:
            meta = pq.read_metadata(path)
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file ({first_line(e)}); "
                            f"remove or re-create it")
        if text_column not in schema.names:
            raise DataError(f"{path}: no column {text_column!r}; columns are {schema.names}; "
                            f"set dataset.text_column to one of them")
        column_type = schema.field(text_column).type
        if pa.types.is_dictionary(column_type):  # pandas categoricals: read decoded
            column_type = column_type.value_type
        if column_type not in TEXT_TYPES:
            raise DataError(f"{path}: column {text_column!r} has type {column_type}, expected a "
                            f"string column")
        relative = path.relative_to(root).as_posix().encode()
        file_key = int.from_bytes(hashlib.blake2b(relative, digest_size=8).digest(), "little")
        for rg in range(meta.num_row_groups):
            info = meta.row_group(rg)
            if info.num_rows:
                units.append(Unit(str(path), rg, info.num_rows, info.total_byte_size, file_key))
    if not units:
        raise DataError(f"{root}: the parquet files hold no rows")
    return units


def shard_files(location, setting: str) -> tuple[Path, list[Path]]:
    """(the folder that the files' keys are relative to, the parquet files) of a folder or a pattern."""
    root = Path(location)
    if root.is_dir():
        files, skipped = parquet_files(root)
    elif any(c in str(location) for c in PATTERN_CHARACTERS):
        root, files, skipped = pattern_files(str(location), setting)
    else:
        raise DataError(f"{root}: {setting} does not exist or is not a directory{relative_to_here(root)}; "
                        f"create it with `python prepare.py --from-text FILE --out {root}`")
    if skipped:
        print(f"{location}: skipped {skipped} file(s) or folder(s) whose names start with '.' or '_' (not data, as "
              f"for pyarrow datasets, Spark and Hugging Face)")
    if not files:
        raise DataError(f"{root}: no .parquet files found (searched recursively); "
                        f"convert text with `python prepare.py --from-text FILE --out {root}`")
    return root, files


def pattern_files(pattern: str, setting: str) -> tuple[Path, list[Path], int]:
    """(the folder before the first wildcard, the .parquet files the glob pattern matches, sorted,
    the files of the folders it matches included; how many names were skipped). `**` spans folders."""
    parts = Path(pattern).parts
    root = Path(*parts[:next(i for i, part in enumerate(parts) if any(c in part for c in PATTERN_CHARACTERS))])
    found, skipped = set(), 0
    for match in map(Path, glob.glob(pattern, recursive=True)):
        if match.is_dir():
            inside, hidden = parquet_files(match)
            found.update(inside)
            skipped += hidden
        elif match.name.endswith(".parquet") and match.is_file():
            skipped += match.name.startswith((".", "_"))
            if not match.name.startswith((".", "_")):
                found.add(match)
    if not found:
        there = parquet_files(root)[0] if root.is_dir() else []
        holds = (f"{root} holds {len(there):,} .parquet file(s), such as "
                 f"{', '.join(p.relative_to(root).as_posix() for p in there[:3])}" if there
                 else f"{root} holds no .parquet file" if root.is_dir() else f"{root} does not exist")
        raise DataError(f"{pattern}: {setting} matches no .parquet file{relative_to_here(root)}; {holds}")
    return root, sorted(found, key=lambda p: p.relative_to(root).parts), skipped


def split_of(root: Path, path: Path) -> tuple:
    """(the Hugging Face split a file's path names: train, validation, test or None; the folder or the
    pattern that selects that split's files beside it). As the Hub reads names: the first word of
    the folders' or the file's name that is a split keyword, words being runs of letters."""
    relative = path.relative_to(root)
    for depth, part in enumerate(relative.parts):
        for word in re.finditer(r"[a-z]+", part.lower()):
            if word.group() in SPLIT_WORDS:
                folder = root.joinpath(*relative.parts[:depth])
                is_file = depth == len(relative.parts) - 1
                return SPLIT_WORDS[word.group()], folder / (f"{part[:word.end()]}*.parquet" if is_file else part)
    return None, None


def mixed_splits(root: Path, files: list[Path]) -> str | None:
    """The error for a training folder that holds a held-out split's files beside others' (a Hugging
    Face dataset's train-*, validation-*, test-* files), or None."""
    counts, selects = {}, {}
    for path in files:
        split, selector = split_of(root, path)
        counts[split] = counts.get(split, 0) + 1
        selects.setdefault(split, selector)
    if len(counts) == 1 or not {"validation", "test"} & counts.keys():
        return None
    found = ", ".join(f"{split or 'no split'}: {n:,}" for split, n in sorted(counts.items(), key=lambda kv: str(kv[0])))

    def override(name, value):  # as the command line wants it: a pattern in quotes, or the shell expands it
        return shlex.quote(f"dataset.{name}={value}")
    if "train" in counts:
        fix = f"set {override('parquet_dir', selects['train'])}"
        if "validation" in counts:
            fix += f" and {override('val_parquet_dir', selects['validation'])}"
    else:
        fix = "give dataset.parquet_dir a folder or a pattern of the training files only"
    return (f"{root}: its files are named for several Hugging Face splits ({found} files), and training would read "
            f"them all, held-out ones too; {fix} (to train on every file anyway: {override('parquet_dir', root / '**' / '*.parquet')})")


def parquet_files(root: Path) -> tuple[list[Path], int]:
    """(every *.parquet file under root, sorted; how many names were skipped). Symbolic links to
    folders are followed, each real folder once; names starting with '.' or '_' are not data (a
    macOS ._ copy, Spark's _SUCCESS and _temporary/) and are skipped."""
    found, skipped, seen = [], 0, set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or a second link to the same folder
            subfolders[:] = []
            continue
        seen.add(real)
        skipped += sum(name.startswith((".", "_")) for name in subfolders)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith((".", "_")))
        for name in names:
            if name.endswith(".parquet") and name.startswith((".", "_")):
                skipped += 1
            elif name.endswith(".parquet") and os.path.isfile(os.path.join(folder, name)):
                found.append(Path(folder) / name)
    return sorted(found, key=lambda p: p.relative_to(root).parts), skipped  # as sorted(Path) orders them


class ParquetFileCache:
    """Keeps at most `capacity` parquet files open; the least recently used is closed first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.files = OrderedDict()

    def get(self, path: str) -> pq.ParquetFile:
        if path in self.files:
            self.files.move_to_end(path)
            return self.files[path]
        while len(self.files) >= self.capacity:
            _, oldest = self.files.popitem(last=False)
            oldest.close()
        # stream column chunks rather than read them whole: memory bounded whatever the row-group size
        self.files[path] = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        return self.files[path]

    def close(self):
        while self.files:
            self.files.popitem()[1].close()


def validation_mask(unit: Unit, seed: int, fraction: float):
    """Which rows of a unit belong to validation: a splitmix64 hash of (seed, file, rg, row)."""
    with np.errstate(over="ignore"):
        h = (np.uint64(unit.file_key) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
             ^ (np.uint64(unit.row_group) << np.uint64(40))) + np.arange(unit.num_rows, dtype=np.uint64)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


READ_BYTES = 8 << 20  # a row group is read in parts of about this much text


def rows_per_part(unit: Unit) -> int:
    """The rows of each part that read_unit_documents reads of the unit (about READ_BYTES of text)."""
    return max(1, READ_BYTES * unit.num_rows // max(1, unit.num_bytes))


def read_unit_documents(cache: ParquetFileCache, unit: Unit, text_column: str, split: str, seed: int,
                        val_fraction: float):
    """The unit's non-empty documents of `split` (train, val or all), one large_binary array per
    part: the row group is read in record batches of about READ_BYTES, so memory does not grow with
    the row-group size its writer chose. The parts are the same on every read (they follow from
    the file's metadata)."""
    if split == "all":
        in_split = np.ones(unit.num_rows, dtype=bool)
    else:
        in_split = validation_mask(unit, seed, val_fraction)
        in_split = ~in_split if split == "train" else in_split
    rows = rows_per_part(unit)
    first_row = 0
    try:
        for batch in cache.get(unit.path).iter_batches(batch_size=rows, row_groups=[unit.row_group],
                                                       columns=[text_column], use_threads=False):
            docs = batch.column(0).cast(pa.large_binary())  # string, binary, views, dictionaries
            keep = pc.and_(pc.and_(pc.is_valid(docs), pc.greater(pc.binary_length(docs), 0)),
                           pa.array(in_split[first_row:first_row + len(docs)]))
            first_row += len(docs)
            yield pc.filter(docs, keep)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{unit.path}: row group {unit.row_group} cannot be read "
                        f"({first_line(e)}); the file is corrupt or truncated: re-create it")


# ---------------------------------------------------------------- writing

def split_text(raw: bytes | str, chunk: int) -> list:
    """Cut a file's bytes (or a text) at line ends into pieces of about `chunk` bytes (characters),
    0: keep whole. Nothing is lost: the pieces concatenate back to the file, and none cuts a UTF-8
    character (a line end, 0x0A, is never part of one)."""
    if chunk <= 0 or len(raw) <= chunk:
        return [raw] if raw else []
    pieces, start = [], 0
    while start < len(raw):
        end = raw.find(b"\n" if isinstance(raw, bytes) else "\n", start + chunk)
        end = len(raw) if end < 0 else end + 1
        pieces.append(raw[start:end])
        start = end
    return pieces


def write_shards(documents, out_dir, docs_per_shard=16384, row_group_bytes=128 * 1024) -> int:
    """Write an iterable of strings as parquet shards part-00000.parquet, ... with a `text`
    column and row groups of about row_group_bytes. Returns the number of documents."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard, n_docs, n_shards = [], 0, 0

    def flush():
        nonlocal shard, n_shards
        if not shard:
            return
        writer = pq.ParquetWriter(out_dir / f"part-{n_shards:05d}.parquet", pa.schema([("text", pa.string())]))
        group, size = [], 0
        for doc in shard + [None]:
            if doc is None or (group and size + len(doc) > row_group_bytes):
                writer.write_table(pa.table({"text": pa.array(group, pa.string())}))
                group, size = [], 0
            if doc is not None:
                group.append(doc)
                size += len(doc)
        writer.close()
        shard, n_shards = [], n_shards + 1

    for doc in documents:
        shard.append(doc)
        n_docs += 1
        if len(shard) == docs_per_shard:
            flush()
    flush()
    return n_docs


def text_files_to_parquet(files, out_dir, chunk_bytes=8192, replace=False) -> int:
    def documents():
        for f in files:
            try:
                raw = Path(f).read_bytes()
            except IsADirectoryError:
                raise DataError(f"{f}: a folder; give the text files in it, e.g. {Path(f) / '*.txt'}")
            except OSError as e:
                raise DataError(f"{f}: cannot read ({e.strerror})")
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                print(f"note: {f} is not UTF-8 (byte {e.start:,}: {raw[e.start:e.start + 1]!r}): its invalid bytes "
                      f"become U+FFFD; if it is text in another encoding, convert it first (iconv -f <encoding> "
                      f"-t utf-8); if it is not text, leave it out")
            yield from (piece.decode("utf-8", errors="replace") for piece in split_text(raw, chunk_bytes))

    def write(folder):
        n = write_shards(documents(), folder)
        if n == 0:
            raise DataError(f"{' '.join(map(str, files))}: no text (empty files); nothing was written")
        return n
    try:
        return write_folder(out_dir, write, replace=replace,
                            written_here=lambda path: path.is_file() and path.suffix == ".parquet")
    except FileExistsError as e:
        raise DataError(str(e))
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write ({e.strerror or e})")


def build_stdlib_corpus(out_dir, max_bytes=8 * 1024 * 1024) -> int:
    """The built-in sample corpus: this machine's Python standard library sources (tests
    excluded), in sorted order, up to max_bytes. Returns the number of documents, or None if
    another process (another node's first rank) built the folder meanwhile."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
    sources = sorted(p for p in stdlib.rglob("*.py")
                     if not skip.intersection(p.relative_to(stdlib).parts))
    docs, total = [], 0
    for p in sources:
        text = p.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > max_bytes:
            break
        docs.extend(split_text(text, 8192))  # in characters: the corpus stays as it was built before
        total += len(text)
    return write_folder(out_dir, lambda folder: write_shards(docs, folder), keep_existing=True)


def ensure_sample_corpus(cfg):
    """Build the built-in corpus when dataset.parquet_dir is its default place and is missing."""
    folder = cfg.dataset.parquet_dir
    if folder == DEFAULT_SAMPLE_DIR and not Path(folder).exists():
        print(f"building the sample corpus in {folder} from the Python standard library ...")
        n = build_stdlib_corpus(folder)
        print(f"  {n} documents" if n is not None else "  another process built it meanwhile")
