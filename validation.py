"""The validation batches: the held-out windows every evaluation of a run measures (evaluation.py),
read once at the start, from dataset.val_fraction of the training documents or from the separate
dataset.val_parquet_dir; with the checks and notes about them that a run prints before it trains."""
import itertools
import math
import os

import pyarrow.compute as pc
import torch

from config import step_tokens
from data import ParquetBatches, count_documents, read_unit_tokens
from files import byte_amount
from shards import DataError, ParquetFileCache, holdout_of, list_units, read_unit_documents


def validation_batches(cfg, units, tokenizer, note_few: bool = True) -> list:
    """The eval_iters validation batches, read once: the same set at every evaluation. They come
    from the validation documents of `units`, or from dataset.val_parquet_dir, taken across them
    rather than from the first file's: the units, in file order, are cut into up to eval_iters
    stretches of neighbours, and about as many windows come from the start of each (more from the
    others where some run short; too little validation text for that is read whole, as one stream).
    Validation text that runs out first is measured whole: the last batch may hold fewer windows.
    note_few: a note when they fill fewer than eval_iters batches."""
    training, dataset_cfg = cfg.training, cfg.dataset
    split, folder = "val", dataset_cfg.parquet_dir
    if dataset_cfg.val_parquet_dir:
        split, folder = "all", dataset_cfg.val_parquet_dir
        units = check_held_out(list_units(folder, dataset_cfg.text_column, setting="dataset.val_parquet_dir"), units)
    wanted = training.eval_iters * training.batch_size
    n_stretches = min(len(units), training.eval_iters)
    starts = [len(units) * k // n_stretches for k in range(n_stretches)] + [len(units)]
    stretches = [units[a:b] for a, b in zip(starts, starts[1:])]

    def first_windows(cache, stretch, n):  # the first n windows of the stretch's validation documents, one stream
        stream = ParquetBatches(stretch, split, training.block_size, 1, training.seed, holdout_of(dataset_cfg),
                                dataset_cfg.text_column, 1, tokenizer,
                                shuffle=False).epoch_batches(cache, 0, 1, 0)
        return [(x, y) for x, y, _ in itertools.islice(stream, n)]
    with ParquetFileCache(dataset_cfg.max_cached_files) as cache:
        per_stretch = -(-wanted // n_stretches)
        while True:
            taken = [first_windows(cache, stretch, per_stretch) for stretch in stretches]
            short, full = wanted - sum(map(len, taken)), sum(len(t) == per_stretch for t in taken)
            if short <= 0 or not full:
                break
            per_stretch += -(-short // full)
        if short > 0 and n_stretches > 1:  # stretches too short for a window lose their text: one stream of it all
            whole = first_windows(cache, units, wanted)
            taken = [whole] if len(whole) > wanted - short else taken
    for stretch in sorted(taken, key=len, reverse=True)[:max(0, -short)]:  # the overshoot: one less from the fullest
        stretch.pop()
    windows, size = [window for stretch in taken for window in stretch], training.batch_size
    if len(windows) < size:
        raise too_little_validation(cfg, units, folder, split, tokenizer)
    batches = [(torch.cat([x for x, _ in windows[k:k + size]]), torch.cat([y for _, y in windows[k:k + size]]))
               for k in range(0, len(windows), size)]  # the last one short where the text runs out: all is measured
    if len(windows) < wanted and note_few:
        full, rest = divmod(len(windows), size)
        filled = f"{full} batch{'es' * (full != 1)}" + (f" and {rest} window{'s' * (rest != 1)}" if rest else "")
        print(f"note: the validation documents of {folder} fill {filled}, fewer than training.eval_iters "
              f"{training.eval_iters}: every evaluation measures all of them")
    return batches


def too_little_validation(cfg, units, folder, split: str, tokenizer) -> DataError:
    """Why the validation documents of `units` (split "val", or "all" of dataset.val_parquet_dir's)
    fill no batch: no documents in the column, none drawn for validation, or too few tokens."""
    training, dataset_cfg = cfg.training, cfg.dataset
    with ParquetFileCache(1) as cache:
        documents, val_documents = (count_documents(cache, units, dataset_cfg.text_column, which,
                                                    holdout_of(dataset_cfg))
                                    for which in ("all", "val"))
        if not documents:
            return DataError(f"{folder}: column {dataset_cfg.text_column!r} holds no documents: every row of the "
                             f"{len({u.path for u in units})} file(s) is null or empty; set dataset.text_column to "
                             f"the column with the text")
        if not val_documents and not dataset_cfg.val_parquet_dir:
            fraction = "" if documents == 1 else " raise dataset.val_fraction,"
            texts = distinct_texts(cache, units, dataset_cfg.text_column) if dataset_cfg.split_by == "text" else None
            if texts is not None and texts < documents:  # copies of one text: more of them cannot help
                return DataError(f"{folder}: none of its {documents:,} documents went to validation: they hold "
                                 f"{texts:,} distinct text{'s' * (texts != 1)}, and the copies of a text fall on one "
                                 f"side of the split (dataset.split_by text: validation measures no text the model "
                                 f"trains on); add documents of other texts,{fraction * (texts > 1)} or set "
                                 f"dataset.val_parquet_dir")
            return DataError(f"{folder}: none of its {documents:,} document{'s' * (documents != 1)} went to "
                             f"validation (each goes with probability dataset.val_fraction "
                             f"{dataset_cfg.val_fraction}); cut the text into more documents (python prepare.py "
                             f"--from-text ... with a smaller --chunk-bytes),{fraction} or set dataset.val_parquet_dir")
        tokens = sum(len(part) for unit in units for part in read_unit_tokens(
            cache, unit, dataset_cfg.text_column, split, holdout_of(dataset_cfg), tokenizer))
    what = "documents hold" if dataset_cfg.val_parquet_dir else f"split (val_fraction {dataset_cfg.val_fraction}) holds"
    more = "add validation documents" if dataset_cfg.val_parquet_dir else "raise dataset.val_fraction, or add documents"
    return DataError(f"{folder}: the validation {what} {tokens:,} tokens, less than one batch: {training.batch_size} "
                     f"windows of {training.block_size + 1} tokens, each sharing one with the next, "
                     f"{training.batch_size * training.block_size + 1:,} in all; lower training.block_size or "
                     f"training.batch_size, or {more}")


def distinct_texts(cache, units, text_column: str, limit: int = 10_000) -> int | None:
    """How many distinct texts the non-empty documents of `units` hold, or None past `limit` (for a message)."""
    seen = set()
    for unit in units:
        for docs in read_unit_documents(cache, unit, text_column, "all"):
            seen.update(pc.unique(docs).to_pylist())
            if len(seen) > limit:
                return None
    return len(seen)


def check_held_out(val_units: list, train_units: list) -> list:
    """dataset.val_parquet_dir's units, refused if any of its files is a training file too."""
    training_files = {os.path.realpath(unit.path) for unit in train_units}
    shared = sorted({unit.path for unit in val_units if os.path.realpath(unit.path) in training_files})
    if shared:
        raise DataError(f"dataset.val_parquet_dir: {len(shared)} of its {len({u.path for u in val_units})} file(s) "
                        f"are training files too ({shared[0]}{', ...' if len(shared) > 1 else ''}): validation would "
                        f"measure documents the model trains on; point it at held-out files only, or set "
                        f"dataset.val_parquet_dir=null to hold out dataset.val_fraction of the training documents")
    return val_units


def unmeasured_validation(cfg, units, val_batches, tokens_per_byte: float, world_size: int) -> str | None:
    """A note for a new run whose validation share holds out more than 1,000 times the text its
    evaluations measure (val_fraction's default on a large corpus) while the run means to read all
    the rest: a val_fraction that holds out about 100 times what is measured would train on the rest."""
    dataset, training = cfg.dataset, cfg.training
    text = sum(unit.text_bytes for unit in units)
    held_out, measured = dataset.val_fraction * text, sum(y.numel() for _, y in val_batches) / tokens_per_byte
    planned = training.max_iters * step_tokens(training, world_size) / tokens_per_byte  # bytes of training text
    passes = planned / ((1 - dataset.val_fraction) * text)
    if dataset.val_parquet_dir or held_out <= 1000 * measured or passes < 1:
        return None
    enough = 100 * measured / text  # (100 times what is measured: spread over many documents)
    scale = 10 ** math.floor(math.log10(enough))
    smaller = math.floor(enough / scale) * scale
    return (f"note: validation holds out about {byte_amount(held_out)} of the text (dataset.val_fraction "
            f"{dataset.val_fraction:g}) and its evaluations measure {byte_amount(measured)} of it, while training "
            f"plans {passes:.1f} passes over the rest: dataset.val_fraction={smaller:.1g} would train on about "
            f"{byte_amount(held_out - smaller * text)} more (set it for a new run: it changes which documents are "
            f"held out)")
