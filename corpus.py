"""Writing parquet shards: the user's text files (python prepare.py --from-text) and the built-in
corpus, both in the layout shards.py reads (one `text` column, one document per row).
"""
import itertools
import os
import shlex
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from config import BUILTIN_CORPUS_DIR
from files import DESKTOP_FILES, bom_encoding, does_not_exist, write_folder
from shards import DataError


DOCUMENT_BYTES = 8192  # long files are cut into documents of about this size, for the split and the shuffle
# Each process and loader worker reads row groups of its own: text files too small for MIN_ROW_GROUPS
# row groups of ROW_GROUP_BYTES get smaller ones (a row group holds one document at least; sized from the
# files' bytes, counted in characters: text of multi-byte characters gets fewer).
ROW_GROUP_BYTES = 128 * 1024
SHARD_BYTES = 128 << 20
MIN_ROW_GROUPS = 64


def split_text(raw: bytes | str, chunk: int) -> list:
    """Cut a file's bytes (or a text) into pieces of about `chunk` bytes (characters), 0: keep whole:
    at the first line end (\n) past `chunk`; in a line longer than another `chunk` (text without
    line ends, or with old Mac \r ones), at a \r, else a space, else any character boundary. Nothing
    is lost: the pieces concatenate back to the file, and none cuts a UTF-8 character (\n, \r and a
    space are never part of one; a boundary is a byte that does not continue one)."""
    if chunk <= 0 or len(raw) <= chunk:
        return [raw] if raw else []
    symbol = (lambda c: c.encode()) if isinstance(raw, bytes) else (lambda c: c)
    pieces, start = [], 0
    while start < len(raw):
        lo, hi = start + chunk, start + 2 * chunk
        end = -1
        for separator in ("\n", "\r", " "):
            if (end := raw.find(symbol(separator), lo, hi)) >= 0:
                end += 1
                break
        if end < 0:  # no separator in the window: a character boundary at its end
            end = hi
            while isinstance(raw, bytes) and end < len(raw) and 0x80 <= raw[end] < 0xC0:
                end += 1
        pieces.append(raw[start:end])
        start = end
    return pieces


def write_shards(documents, out_dir, row_group_bytes: int | None = ROW_GROUP_BYTES, column="text",
                 binary=False) -> int:
    """Write an iterable of strings (`binary`: bytes) as parquet shards part-00000.parquet, ... with
    one column and row groups of about row_group_bytes, a new shard after SHARD_BYTES (both counted
    in characters: bytes for ASCII text). row_group_bytes None: sized from the documents
    (row_group_size), read ahead up to MIN_ROW_GROUPS row groups of ROW_GROUP_BYTES. Memory holds
    one row group (or that read-ahead). Returns the number of documents."""
    if row_group_bytes is None:
        documents, ahead, size = iter(documents), [], 0
        for doc in documents:
            ahead.append(doc)
            size += len(doc)
            if size >= MIN_ROW_GROUPS * ROW_GROUP_BYTES:
                break
        documents, row_group_bytes = itertools.chain(ahead, documents), row_group_size(size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = pa.binary() if binary else pa.string()
    schema = pa.schema([(column, kind)])
    writer, group, group_size, shard_size, n_docs, n_shards = None, [], 0, 0, 0, 0
    try:
        for doc in documents:
            if writer is None:
                # no min/max statistics: for documents under a few KB they hold whole documents (a file 3x its text)
                writer = pq.ParquetWriter(out_dir / f"part-{n_shards:05d}.parquet", schema, write_statistics=False)
            if group and group_size + len(doc) > row_group_bytes:
                writer.write_table(pa.table([pa.array(group, kind)], schema=schema))
                group, group_size = [], 0
            group.append(doc)
            group_size, shard_size, n_docs = group_size + len(doc), shard_size + len(doc), n_docs + 1
            if shard_size >= SHARD_BYTES:
                writer.write_table(pa.table([pa.array(group, kind)], schema=schema))
                writer.close()
                writer, group, group_size, shard_size, n_shards = None, [], 0, 0, n_shards + 1
        if group:
            writer.write_table(pa.table([pa.array(group, kind)], schema=schema))
    finally:
        if writer is not None:
            writer.close()
    return n_docs


def as_utf8(raw: bytes, name) -> bytes:
    """A text file's bytes as UTF-8: UTF-16 or UTF-32 with a byte-order mark decoded (noted); NUL
    bytes refused (binary data, or UTF-16 without a mark: each would read as the byte tokenizer's
    document separator); other bytes that are not UTF-8 kept, noted (they read as U+FFFD)."""
    encoding = bom_encoding(raw)
    if encoding:
        try:
            raw = raw.decode(encoding).encode("utf-8")
            print(f"note: {name} is {encoding.upper()} (its byte-order mark says so): converted to UTF-8")
        except UnicodeDecodeError:
            pass  # not that encoding after all: taken as bytes
    if (nul := raw.find(b"\0")) >= 0:
        raise DataError(f"{name}: not text (a NUL byte at byte {nul:,}: binary data, or UTF-16 without a byte-order "
                        f"mark); leave it out, or convert it to UTF-8 first (Windows' UTF-16: iconv -f utf-16le -t "
                        f"utf-8)")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        print(f"note: {name} is not UTF-8 (byte {e.start:,}: {raw[e.start:e.start + 1]!r}): its invalid bytes "
              f"become U+FFFD; if it is text in another encoding, convert it first (iconv -f <encoding> "
              f"-t utf-8); if it is not text, leave it out")
    return raw


def file_patterns(folder: Path, most=6) -> str:
    """', e.g. data/*.txt data/*.md data/notes/*.txt': patterns that name every file in a folder, by
    subfolder and suffix (hidden ones left out), for a folder given in place of its files."""
    patterns = sorted({str(path.parent / f"*{path.suffix}") for path in folder.rglob("*") if path.is_file()
                       and not any(part.startswith(".") for part in path.relative_to(folder).parts)})
    if not patterns:
        return " (it holds none)"
    return f", e.g. {' '.join(patterns[:most])}{' ...' * (len(patterns) > most)}"


def text_files_to_parquet(files, out_dir, chunk_bytes=DOCUMENT_BYTES, replace=False) -> int:
    sizes = [Path(f).stat().st_size if Path(f).is_file() else 0 for f in files]  # (unreadable ones: said below)
    row_group_bytes = row_group_size(sum(sizes))

    def documents():
        for f in files:
            try:
                raw = Path(f).read_bytes()
            except IsADirectoryError:
                raise DataError(f"{f}: a folder; give the text files in it{file_patterns(Path(f))}")
            except FileNotFoundError:
                raise DataError(f"{f}: {does_not_exist(f)}")
            except OSError as e:
                raise DataError(f"{f}: cannot read ({e.strerror})")
            raw = as_utf8(raw, f)
            yield from (piece.decode("utf-8", errors="replace") for piece in split_text(raw, chunk_bytes))

    return shards_to_folder(documents(), out_dir, replace, row_group_bytes,
                            nothing=f"{' '.join(map(str, files))}: no text (empty files); nothing was written")


def row_group_size(text_bytes: int) -> int:
    """ROW_GROUP_BYTES, or less for text too small to make MIN_ROW_GROUPS of those."""
    return min(ROW_GROUP_BYTES, max(1, text_bytes // MIN_ROW_GROUPS))


def adding_to(folder: Path, shard) -> str:
    """For a folder of shards (and subfolders) refused as --out: how to add documents to them, a new
    subfolder (training on a folder reads its subfolders too); "" for a folder that holds other files."""
    try:
        entries = [p for p in folder.iterdir() if p.name not in DESKTOP_FILES]
    except OSError:
        return ""
    if folder.is_symlink() or not any(map(shard, entries)) or not all(shard(p) or p.is_dir() for p in entries):
        return ""  # (its subfolders: documents added before)
    more = next(folder / name for name in ("more", *(f"more_{k}" for k in range(2, 1000)))
                if not (folder / name).exists())
    return (f"; or, to add these documents to the shards there (the same text column), write them into a new "
            f"subfolder: --out {shlex.quote(str(more))}")


def shards_to_folder(documents, out_dir, replace: bool, row_group_bytes: int | None, nothing: str, column="text",
                     binary=False) -> int:
    """write_shards into out_dir, which appears whole or not at all (files.write_folder); `nothing`:
    the error where there are no documents. Returns the number of documents."""
    def write(folder):
        n = write_shards(documents, folder, row_group_bytes=row_group_bytes, column=column, binary=binary)
        if n == 0:
            raise DataError(nothing)
        return n

    def shard(path):
        return path.is_file() and path.suffix == ".parquet"
    try:
        return write_folder(out_dir, write, replace=replace, written_here=shard)
    except FileExistsError as e:
        raise DataError(f"{e}{adding_to(Path(out_dir), shard) * (not replace)}")
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write ({e.strerror or e})")


def build_stdlib_corpus(out_dir, max_bytes=8 * 1024 * 1024) -> int | None:
    """The built-in corpus: this machine's Python standard library sources (tests
    excluded), in sorted order, up to max_bytes. Returns the number of documents, or None if
    another process (another node's first rank) built the folder meanwhile."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
    sources = []
    for folder, subfolders, names in os.walk(stdlib):  # skipped folders are not entered: site-packages is big
        subfolders[:] = [name for name in subfolders if name not in skip]
        sources += [Path(folder, name) for name in names if name.endswith(".py")]
    sources.sort()
    docs, total = [], 0
    for p in sources:
        text = p.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > max_bytes:
            break
        docs.extend(split_text(text, DOCUMENT_BYTES))  # in characters: the corpus stays as it was built before
        total += len(text)
    return write_folder(out_dir, lambda folder: write_shards(docs, folder), keep_existing=True)


def ensure_builtin_corpus(cfg):
    """Build the built-in corpus when dataset.parquet_dir is its default place and is missing."""
    folder = cfg.dataset.parquet_dir
    if os.path.realpath(folder) == os.path.realpath(BUILTIN_CORPUS_DIR) and not Path(folder).exists():
        print(f"building the built-in corpus in {folder} from the Python standard library ...")
        try:
            n = build_stdlib_corpus(folder)
        except OSError as e:  # a file named data here, a dangling link, a folder not writable
            raise DataError(f"dataset.parquet_dir {folder}: cannot build the built-in corpus there: "
                            f"{e.strerror or e}; run from a folder where it can be written, or set "
                            f"dataset.parquet_dir to your data") from None
        print(f"  {n:,} documents" if n is not None else "  another process built it meanwhile")
