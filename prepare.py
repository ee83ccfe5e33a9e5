"""Prepare data for train.py: your text files as parquet shards, parquet in large row groups
written again in small ones, or a subword tokenizer trained on your shards.

    python prepare.py --from-text FILE [FILE ...] --out DIR   # text files -> parquet shards
    python prepare.py --from-parquet SHARDS [...] --out DIR [dataset.text_column=NAME]   # -> small row groups
    python prepare.py --train-tokenizer --vocab-size N --out tokenizer.json [--config X] [overrides]

--from-text cuts long files at line boundaries into documents (corpus.py writes them); the
tokenizer is a byte-level BPE (Hugging Face tokenizers) trained on the training split of the
config's shards, validation documents excluded.
"""
import argparse
import difflib
import os
import shlex
import stat
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from arguments import add_config_arguments, load_config, parse_arguments
from config import DatasetConfig, all_paths
from corpus import (DOCUMENT_BYTES, ROW_GROUP_BYTES, ensure_builtin_corpus, shards_to_folder, split_text,
                    text_files_to_parquet)
from data import training_split
from files import (ARROW_MAGICS, PARQUET_MAGIC, ZIP_MAGIC, atomic_write, byte_amount, folder_made_for, output_path,
                   script_here)
from layout import PATTERN_CHARACTERS, arrow_advice, data_folder
from shards import PROGRESS_EVERY_S, DataError, ParquetFileCache, holdout_of, list_units, read_unit_documents
from tokenizer import SEPARATOR_TOKEN, HFTokenizer, TokenizerError, model_vocab_size, train_bpe
from validation import validation_batches

FEW_DOCUMENTS = 100  # fewer: the default val_fraction holds out about 5 documents or fewer
MIN_DOCUMENTS = 200  # a shorter text is cut finer than DOCUMENT_BYTES, unless --chunk-bytes is given
SMALLEST_CHUNK = 256
MAX_VOCAB_SIZE = 2**20  # a larger --vocab-size is a typo: tokenizers' trainer would allocate for it and abort
MIN_TEXT_BYTES = 4096  # less: too few documents of the smallest size suggested (256 bytes) to hold some out


def check_can_write_file(out: str, replace: bool) -> Path:
    """--out of a file: refused if it exists (unless replace), and as files.output_path refuses it."""
    try:
        path = output_path(out, "--out")
    except ValueError as e:
        raise DataError(str(e)) from None
    if path.exists() and not replace:
        raise DataError(f"--out {out}: exists already (runs trained with it need it unchanged); choose another "
                        f"--out, or add --replace to overwrite it")
    return path


def shards_above_note(out: str) -> str:
    """A note where --out lies inside a folder that holds parquet shards: training on that folder reads
    its subfolders too, these shards with the others (on purpose, or the same text twice)."""
    for folder in Path(os.path.abspath(out)).parents:
        if any(folder.glob("*.parquet")):
            return (f"\nnote: {folder} holds parquet shards too: training on it reads these with them; "
                    f"dataset.parquet_dir={shlex.quote(out)} reads these alone")
    return ""


def check_text_files(files):
    """Refuse a file given twice (its text would be written twice), and a parquet file or a zip
    archive (a checkpoint), which would be converted as text: by their first bytes, whatever their names."""
    seen = {}
    for f in files:
        if not os.path.lexists(f) and any(c in f for c in PATTERN_CHARACTERS):  # the shell passes it on as it is
            raise DataError(f"{f}: no file matches this pattern; check its folder and extension")
        real = os.path.realpath(f)
        if real in seen:
            also = f" (also as {seen[real]})" if seen[real] != f else ""
            raise DataError(f"{f}: given twice{also}; give each file once")
        seen[real] = f
        try:
            mode = os.stat(f).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # (a folder: text_files_to_parquet says why)
                raise DataError(f"{f}: not a file but a pipe or a device (<(command) in the shell gives one); "
                                f"prepare.py reads each file twice: write it to a file first and give that file")
            with open(f, "rb") as file:
                head = file.read(8)
        except OSError:
            continue  # text_files_to_parquet says why
        if head.startswith(ARROW_MAGICS):
            raise DataError(f"{f}: {arrow_advice(Path(f))}")
        head = head[:4]
        if head == PARQUET_MAGIC:
            use = (f"train on it with dataset.parquet_dir={f}" if f.endswith(".parquet") else
                   "rename it to end in .parquet and point dataset.parquet_dir at it")
            raise DataError(f"{f}: a parquet file, not text; no conversion needed: {use} (or its folder)")
        if head == ZIP_MAGIC:
            raise DataError(f"{f}: a zip archive (a .pt checkpoint is one), not text; leave it out, or unzip it and "
                            f"give the text files in it")


def default_chunk(files) -> int:
    """DOCUMENT_BYTES, or, for a text it would cut into fewer than MIN_DOCUMENTS documents, the
    largest size that makes MIN_DOCUMENTS (at least SMALLEST_CHUNK): validation holds out whole
    documents, about dataset.val_fraction of them, and a book in 40 documents may give it none.
    (A document is at most about 2 x DOCUMENT_BYTES: a text twice MIN_DOCUMENTS of those makes enough.)"""
    try:
        files = [f for f in files if os.path.isfile(f)]
        if not files or sum(os.path.getsize(f) for f in files) >= 2 * MIN_DOCUMENTS * DOCUMENT_BYTES:
            return DOCUMENT_BYTES
        raws = [Path(f).read_bytes() for f in files]
    except OSError:  # text_files_to_parquet names what cannot be read
        return DOCUMENT_BYTES
    if documents_of(raws, DOCUMENT_BYTES) >= MIN_DOCUMENTS:  # many small files
        return DOCUMENT_BYTES
    return min(DOCUMENT_BYTES, chunk_for(raws, MIN_DOCUMENTS) or SMALLEST_CHUNK)


def documents_of(raws: list[bytes], chunk: int) -> int:
    return sum(len(split_text(raw, chunk)) for raw in raws)


def chunk_for(raws: list[bytes], documents: int, smallest: int = SMALLEST_CHUNK) -> int | None:
    """The largest --chunk-bytes (down to `smallest`) that cuts the texts (their bytes) into at least
    `documents` documents, or None (too little text: texts smaller than a chunk stay whole)."""
    if documents_of(raws, smallest) < documents:
        return None
    low, high = smallest, max(smallest, max(map(len, raws)))  # documents_of(low) >= documents
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if documents_of(raws, middle) >= documents else (low, middle - 1)
    return low


def training_texts(cfg, units):
    """The documents of the training split, in file order, as strings; a progress line every
    PROGRESS_EVERY_S seconds."""
    n_docs, n_bytes = 0, 0
    started = last = time.time()
    with ParquetFileCache(cfg.dataset.max_cached_files) as cache:
        for k, unit in enumerate(units):
            for docs in read_unit_documents(cache, unit, cfg.dataset.text_column, training_split(cfg),
                                            holdout_of(cfg.dataset)):
                for doc in docs.to_pylist():
                    yield doc.decode("utf-8", errors="replace")
                n_docs += len(docs)
                n_bytes += pc.sum(pc.binary_length(docs)).as_py() or 0
            if time.time() - last > PROGRESS_EVERY_S or k == len(units) - 1:
                last = time.time()
                print(f"  read {byte_amount(n_bytes)}, {n_docs:,} document{'s' * (n_docs != 1)}, row group "
                      f"{k + 1:,} of {len(units):,} ({(k + 1) / len(units):.0%}) in {last - started:.0f} s", flush=True)


def train_tokenizer(cfg, vocab_size: int, out: str, config_arguments: list, replace: bool = False) -> str:
    """Train a byte-level BPE on the training split of the configured shards; write it to out.
    Returns the command to train with it: train.py with config_arguments (--config and the overrides)."""
    out = check_can_write_file(out, replace)  # before the training, not after it
    ensure_builtin_corpus(cfg)
    units = list_units(cfg.dataset.parquet_dir, cfg.dataset.text_column)
    print(f"training a {vocab_size:,}-token byte-level BPE on the training split of {cfg.dataset.parquet_dir} "
          f"({len(units):,} row group{'s' * (len(units) != 1)})", flush=True)
    tokenizer = HFTokenizer(train_bpe(training_texts(cfg, units), vocab_size), str(out))
    if tokenizer.vocab_size < 258:
        raise DataError(f"{cfg.dataset.parquet_dir}: its training split holds too little text to learn a single "
                        f"merge; add documents (nothing was written)")
    if tokenizer.vocab_size < vocab_size:
        merges = tokenizer.vocab_size - 257
        print(f"note: the training text yields only {merges:,} merge{'s' if merges > 1 else ''}, so the vocabulary "
              f"has {tokenizer.vocab_size:,} tokens, fewer than --vocab-size {vocab_size:,}")
    try:
        atomic_write(folder_made_for(out), lambda f: f.write(tokenizer.to_str().encode()))
    except OSError as e:
        raise DataError(f"--out {out}: cannot write ({e.strerror or e})")
    replaced = ("dataset.tokenizer=", "model.vocab_size=")
    command = [*(a for a in config_arguments if not a.startswith(replaced)), f"dataset.tokenizer={out}",
               f"model.vocab_size={model_vocab_size(tokenizer)}"]
    try:  # fewer tokens than bytes: the validation split may no longer fill a batch
        validation_batches(cfg, units, tokenizer, note_few=False)  # (the training run's note to print)
        problem = ""
    except DataError as e:
        problem = f"\nnote: that run would stop before its first step: {e}"
    return (f"wrote {out}: {tokenizer.vocab_size:,} tokens. Train with it:\n  python "
            f"{shlex.join([script_here('train.py'), *command])}{problem}")


def shards_from_text(paths: list[str], out: str, chunk_setting: int | None, replace: bool):
    """--from-text: the text files as documents in parquet shards in `out`, with a note where they are
    too little text, or too few documents for validation to hold some out (and what to change)."""
    check_text_files(paths)
    chunk_bytes = default_chunk(paths) if chunk_setting is None else chunk_setting
    n = text_files_to_parquet(paths, out, chunk_bytes, replace=replace)
    finer = (f" (of about {chunk_bytes:,} bytes, not {DOCUMENT_BYTES:,}: a text of this size is cut finer, so that "
             f"validation has documents to hold out; --chunk-bytes sets the size)"
             if chunk_bytes < DOCUMENT_BYTES and chunk_setting is None and n > 1 else "")
    print(f"wrote {n:,} document{'s' * (n != 1)} to {out}{finer}{shards_above_note(out)}")
    text_bytes = sum(os.path.getsize(f) for f in paths)
    if text_bytes < MIN_TEXT_BYTES:
        print(f"note: {text_bytes:,} bytes of text is too little to train on and hold validation documents "
              f"out of: give more text (a few hundred KB for a first model)")
    elif n < FEW_DOCUMENTS:
        finer = chunk_for([Path(f).read_bytes() for f in paths], FEW_DOCUMENTS)
        if finer and (finer < chunk_bytes or not chunk_bytes):
            fix = f"cut the text finer (--chunk-bytes {finer})"
        elif not chunk_bytes or chunk_bytes > SMALLEST_CHUNK:  # as fine as can be is still too few: both
            fix = (f"cut the text finer (--chunk-bytes {SMALLEST_CHUNK}) and raise dataset.val_fraction "
                   f"(e.g. 0.2)")
        else:
            fix = "raise dataset.val_fraction (e.g. 0.2)"
        print(f"note: validation holds out each document with probability dataset.val_fraction (default "
              f"{DatasetConfig.val_fraction}): about {n * DatasetConfig.val_fraction:.1f} of these {n}, and "
              f"training needs the rest; {fix}, or give validation a folder of its own "
              f"(dataset.val_parquet_dir)")


def shards_from_parquet(sources: list[str], out: str, text_column: str, replace: bool):
    """--from-parquet: the documents of parquet shards (folders, .parquet files or patterns, as
    dataset.parquet_dir takes them) written again in `out` in small row groups, whose windows
    training shuffles together (a large row group is read in its order, 8 MB at a time). The text
    column keeps its name and its kind (text, or bytes where any file's is binary); the other
    columns are left out."""
    units, seen, folders = [], set(), set()
    for source in sources:
        # training on a source's folder would read what is written into it, or into a folder linked from it
        folders |= {data_folder(source), Path(os.path.realpath(data_folder(source)))}
        for unit in list_units(source, text_column, setting="--from-parquet"):
            real = Path(os.path.realpath(unit.path))
            folders.add(real.parent)
            if (real, unit.row_group) not in seen:  # (a file given twice: read once)
                seen.add((real, unit.row_group))
                units.append(unit)
    files = {real for real, _ in seen}
    for out_path in (Path(os.path.abspath(out)), Path(os.path.realpath(out))):
        if any(out_path in f.parents for f in files) or any(f in (out_path, *out_path.parents) for f in folders):
            raise DataError(f"--out {out}: overlaps the shards it is written from ({' '.join(sources)}): training on "
                            f"their folder would read both; choose an --out outside it")
    binary = any(text_kind(unit.path, text_column) in (pa.binary(), pa.large_binary())
                 for unit in {unit.path: unit for unit in units}.values())
    counts, started = {"text": 0, "not utf-8": 0}, time.time()

    def documents():  # (read once write_folder has checked --out)
        print(f"rewriting {len(units):,} row group{'s' * (len(units) != 1)} of {len(files):,} file"
              f"{'s' * (len(files) != 1)} in {out} ...", flush=True)
        last = time.time()
        with ParquetFileCache(8) as cache:
            for k, unit in enumerate(units):
                for docs in read_unit_documents(cache, unit, text_column, "all"):
                    counts["text"] += pc.sum(pc.binary_length(docs)).as_py() or 0
                    yield from as_strings(docs, counts) if not binary else docs.to_pylist()
                    if time.time() - last > PROGRESS_EVERY_S:
                        last = time.time()
                        print(f"  {byte_amount(counts['text'])} of text, in row group {k + 1:,} of {len(units):,} "
                              f"({last - started:.0f} s)", flush=True)
    nothing = f"{' '.join(sources)}: no documents (every {text_column!r} is null or empty); nothing was written"
    n = shards_to_folder(documents(), out, replace, None, nothing, column=text_column, binary=binary)
    text = byte_amount(counts["text"]) if counts["text"] >= 1024 else f"{counts['text']:,} bytes"
    print(f"wrote {n:,} document{'s' * (n != 1)} ({text} of text"
          f"{', as bytes: a file holds them so' * binary}) to {out} in row groups of at most "
          f"{byte_amount(ROW_GROUP_BYTES)}, in {time.time() - started:.0f} s; train on them with "
          f"dataset.parquet_dir={shlex.quote(out)}"
          + f" dataset.text_column={shlex.quote(text_column)}" * (text_column != "text") + shards_above_note(out))
    if (rows := sum(unit.num_rows for unit in units)) > n:
        print(f"note: {rows - n:,} of the {rows:,} rows had no text (null or empty) and were left out, as training "
              f"leaves them out")
    if counts["not utf-8"]:
        many = counts["not utf-8"] > 1
        print(f"note: {counts['not utf-8']:,} document{'s were' if many else ' was'} not UTF-8: "
              f"{'their' if many else 'its'} invalid bytes became U+FFFD")


def text_kind(path, text_column: str) -> pa.DataType:
    """The type of a file's text column (a dictionary's: that of its values)."""
    kind = pq.read_schema(path).field(text_column).type
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def as_strings(docs: pa.Array, counts: dict) -> list:
    """A part's documents (large_binary) as strings; bytes that are not UTF-8 (in a column of text
    written without checking) become U+FFFD, counted in counts["not utf-8"]."""
    try:
        return docs.cast(pa.large_string()).to_pylist()
    except pa.ArrowInvalid:
        texts = []
        for doc in docs.to_pylist():
            try:
                texts.append(doc.decode("utf-8"))
            except UnicodeDecodeError:
                counts["not utf-8"] += 1
                texts.append(doc.decode("utf-8", errors="replace"))
        return texts


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare data: text files or parquet shards to small-row-group "
                                                 "shards, or a tokenizer.")
    parser.add_argument("--from-text", nargs="+", metavar="FILE", help="text files to convert into shards in --out")
    parser.add_argument("--from-parquet", nargs="+", metavar="SHARDS",
                        help="parquet shards (a folder, .parquet files or a quoted pattern) to write again in --out "
                             "in small row groups, which training shuffles together; dataset.text_column=NAME "
                             "names their text column (default text)")
    parser.add_argument("--replace", action="store_true",
                        help="replace the shards of an --out folder that holds only shards (--from-text, "
                             "--from-parquet), or an existing --out file (--train-tokenizer)")
    parser.add_argument("--chunk-bytes", type=int,
                        help="--from-text: cut long files at line boundaries into documents of about this "
                             f"many bytes (default {DOCUMENT_BYTES}; 0: one document per file)")
    parser.add_argument("--train-tokenizer", action="store_true",
                        help="train a byte-level BPE on the training split of the config's shards, write it to --out")
    parser.add_argument("--vocab-size", type=int, help="--train-tokenizer: tokens in the vocabulary (default 4096)")
    parser.add_argument("--out", help="output: a directory for --from-text and --from-parquet, a tokenizer.json "
                                      "for --train-tokenizer")
    add_config_arguments(parser)
    parser.set_defaults(config=None)  # config.yaml, for --train-tokenizer; given with --from-text: refused
    args = parse_arguments(parser, argv)
    text_column = check_arguments(parser, args)
    try:
        if args.from_text:
            shards_from_text(args.from_text, args.out, args.chunk_bytes, args.replace)
        elif args.from_parquet:
            shards_from_parquet(args.from_parquet, args.out, text_column, args.replace)
        else:
            args.config = args.config or "config.yaml"
            config_arguments = ["--config", args.config, *args.overrides]
            vocab_size = 4096 if args.vocab_size is None else args.vocab_size
            print(train_tokenizer(load_config(args), vocab_size, args.out, config_arguments, args.replace))
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def check_arguments(parser, args) -> str:
    """Refuse what does not go together (parser.error, exit status 2). Returns --from-parquet's text column."""
    for files in (args.from_text, args.from_parquet):  # `--from-text a.txt training.seed=3`: --from-text took it
        for item in list(files or ()):
            if item.partition("=")[0] in all_paths() and not os.path.lexists(item):
                files.remove(item)
                args.overrides.append(item)
    modes = [mode for mode, given in (("--from-text", args.from_text), ("--from-parquet", args.from_parquet),
                                      ("--train-tokenizer", args.train_tokenizer)) if given]
    if len(modes) > 1 and "--train-tokenizer" in modes:
        parser.error(f"{modes[0]} and --train-tokenizer are two steps: make the shards first ({modes[0]} ... "
                     "--out DIR), then train the tokenizer on them (--train-tokenizer --out FILE.json "
                     "dataset.parquet_dir=DIR)")
    if len(modes) > 1:
        parser.error("give --from-text or --from-parquet, not both: write each into a folder of its own, and "
                     "train on both with a pattern of the two folders (dataset.parquet_dir='data/{a,b}' is not one: "
                     "use their parent folder)")
    if not modes:
        files = [item for item in args.overrides if "=" not in item and os.path.lexists(item)]
        shards = files and all(f.endswith(".parquet") or os.path.isdir(f) and next(Path(f).rglob("*.parquet"), None)
                               for f in files)
        given = (f" (did you mean --from-{'parquet' if shards else 'text'} {shlex.join(files)}?)" if files else
                 " (--vocab-size trains a tokenizer: add --train-tokenizer)" if args.vocab_size is not None else "")
        parser.error(f"give --from-text FILE ... --out DIR, --from-parquet SHARDS --out DIR, or --train-tokenizer "
                     f"--out FILE.json{given}")
    if not args.out:
        parser.error(f"--out is required: the {'tokenizer.json' if args.train_tokenizer else 'folder of the shards'} "
                     f"to write")
    text_column = "text"
    if args.from_parquet:
        for item in list(args.overrides):
            key, _, value = item.partition("=")
            if key == "dataset.text_column" and value:
                text_column = value
                args.overrides.remove(item)
            elif key != "dataset.text_column" and difflib.get_close_matches(key, ["dataset.text_column", "text_column"],
                                                                             1, 0.8):  # a typo, not another setting
                parser.error(f"{item}: did you mean dataset.text_column={value or 'NAME'}?")
    shards = modes[0] != "--train-tokenizer"
    if shards and (args.overrides or args.config or args.vocab_size is not None):
        given = " ".join([*(["--config"] * bool(args.config)), *(["--vocab-size"] * (args.vocab_size is not None)),
                          *args.overrides])
        takes = "no config, vocabulary or overrides" if args.from_text else \
            "no config or vocabulary, and of the overrides only dataset.text_column=NAME"
        parser.error(f"{modes[0]} takes {takes} (got {given}): they are for --train-tokenizer")
    if args.vocab_size is not None and not 258 <= args.vocab_size <= MAX_VOCAB_SIZE:
        parser.error(f"--vocab-size must be from 258 (256 bytes, {SEPARATOR_TOKEN} and a merge) to {MAX_VOCAB_SIZE:,} "
                     f"(the largest vocabularies in use have about 256k tokens), got {args.vocab_size:,}")
    if not args.from_text and args.chunk_bytes is not None:
        parser.error("--chunk-bytes applies to --from-text only")
    if args.chunk_bytes is not None and args.chunk_bytes < 0:
        parser.error(f"--chunk-bytes must be >= 0 (0: one document per file), got {args.chunk_bytes}")
    return text_column


if __name__ == "__main__":
    sys.exit(main())
