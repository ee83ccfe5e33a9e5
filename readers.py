"""The training data's readers: each process's DataLoader workers (or the process itself, with
none), numbered rank x max(1, workers) + worker. How many there are (loader_workers), which
(file, row group) units each reads in an epoch (assign_units: shuffled per epoch, then dealt by their
text's bytes), and the notes at the start where their shares cannot be even or large row groups are
read in their order. data.ParquetBatches reads a reader's units; positions.py saves where it stands.
"""
import os
import shlex

import numpy as np

from files import byte_amount
from layout import data_folder
from shards import READ_BYTES, Unit, rows_per_part

# row groups that read in this many parts or more (more than 3 x shards.READ_BYTES) are trained on in their order:
# where they hold most of the text, a note at the start says so (read_in_order)
IN_ORDER_PARTS = 4

# how the units are dealt to the readers (positions.DEALING_KEY): since 0.4.12 by their text's bytes; earlier
# ways, for the resume of their checkpoints, by the bytes of all columns
EVEN_TEXT = "largest first, by the bytes of their text (even shares of text)"
LARGEST_FIRST, IN_SHUFFLED_ORDER = "largest first (even shares)", "in shuffled order (before 0.4.8)"


def reader_count(workers: int, world_size: int) -> int:
    """The training data's readers: each process's DataLoader workers, or the process itself with none."""
    return max(1, workers) * world_size


def assign_units(units: list[Unit], epoch: int, seed: int, n_readers: int, shuffle: bool, way: str = EVEN_TEXT):
    """Deal the units to n_readers: shuffled per epoch, balancing their text's bytes (`way`: also
    the dealings of earlier versions' checkpoints, for their resume)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(units)) if shuffle else range(len(units))
    largest_first = way != IN_SHUFFLED_ORDER
    sizes = [units[i].text_bytes if way == EVEN_TEXT else units[i].num_bytes for i in order]
    dealt = deal([units[i] for i in order], sizes, n_readers, largest_first)[0]
    if shuffle and largest_first:  # (the first reader would get the largest unit in every epoch)
        dealt = [dealt[reader] for reader in rng.permutation(n_readers)]
    return dealt


def deal(items: list, sizes: list, n_readers: int, largest_first=True) -> tuple[list[list], list]:
    """(each reader's items, in their given order, and each reader's total size): the largest item
    first (among equal sizes, in the given order) goes to the reader with the least so far, and so
    on. Dealt in the given order instead, a large item that comes late leaves one reader a whole
    item ahead: its share is read more slowly, the others' again sooner."""
    loads, dealt = [0] * n_readers, [[] for _ in range(n_readers)]
    for i in sorted(range(len(items)), key=lambda i: -sizes[i]) if largest_first else range(len(items)):
        reader = loads.index(min(loads))
        dealt[reader].append(i)
        loads[reader] += sizes[i]
    return [[items[i] for i in sorted(indices)] for indices in dealt], loads


def loader_workers(cfg, units, world_size=1, announce=True) -> int:
    """The DataLoader workers of each process: dataloader.num_workers, or fewer where there are
    fewer units to share. `announce`: say so (and warn of readers' shares that cannot be even)."""
    workers = min(cfg.dataloader.num_workers, len(units) // world_size)
    if workers < cfg.dataloader.num_workers and announce:
        among = f" among {world_size} processes' workers" if world_size > 1 else ""
        units_word = "unit" if len(units) == 1 else "units"
        print(f"note: dataloader.num_workers {cfg.dataloader.num_workers} -> {workers}: only "
              f"{len(units)} (file, row group) {units_word} to share{among}, and each worker reads units of its own")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # the processes on this machine, each with its workers
    if announce and cpus and workers * here > cpus:
        processes = f" x {here} processes on this machine" if here > 1 else ""
        print(f"note: dataloader.num_workers {workers}{processes} is more than the {cpus} CPU cores this process may "
              f"use: the workers compete with training for them; dataloader.num_workers={cpus // here}"
              + (" or fewer" if cpus // here else " (the main process reads)"))
    if announce and (warning := uneven_readers(units, workers, world_size, cfg)):
        print(warning)
    if announce and (note := read_in_order(units, cfg.dataset)):
        print(note)
    return workers


def read_in_order(units, dataset) -> str | None:
    """A note where row groups of IN_ORDER_PARTS parts or more hold most of the training text: each
    is read in its order, a part at a time, its windows shuffled within the part alone, so documents
    sorted in it are trained on in that order (pools mix small row groups from the whole corpus)."""
    large = [unit for unit in units if unit.num_rows > (IN_ORDER_PARTS - 1) * rows_per_part(unit)]
    total, in_large = sum(unit.text_bytes for unit in units), sum(unit.text_bytes for unit in large)
    if not large or in_large <= total / 2:
        return None
    biggest, one = max(large, key=lambda unit: unit.text_bytes), len(large) == 1
    return (f"note: {len(large):,} row group{'' if one else 's'} of more than "
            f"{byte_amount((IN_ORDER_PARTS - 1) * READ_BYTES)} hold{'s' if one else ''} {in_large / total:.0%} of the "
            f"training text (the largest: row group {biggest.row_group} of {biggest.path}, "
            f"{byte_amount(biggest.text_bytes)} of text): {'it is' if one else 'each is'} read in its order, its "
            f"windows shuffled {byte_amount(READ_BYTES)} at a time, so documents sorted in {'it' if one else 'them'} "
            f"(by source, date, topic) are trained on in that order; small row groups are shuffled together: "
            f"{rewrite_command(dataset)}")


def rewrite_command(dataset) -> str:
    """'`python prepare.py --from-parquet DATA --out DATA_small` writes them, then train with
    dataset.parquet_dir=DATA_small': the training data in small row groups, beside its folder."""
    source, folder = dataset.parquet_dir, data_folder(dataset.parquet_dir)
    out = shlex.quote(os.path.relpath(folder.parent / f"{folder.name or 'data'}_small"))  # (not inside the data's)
    column = f" dataset.text_column={shlex.quote(dataset.text_column)}" * (dataset.text_column != "text")
    return (f"`python prepare.py --from-parquet {shlex.quote(source)} --out {out}{column}` writes them, then train "
            f"with dataset.parquet_dir={out}")


def short_of_a_batch(units, cfg, n_readers: int) -> str:
    """Where the reader dealt the least training text gets less than a batch's tokens (batch_size
    windows of block_size + 1 that share a token with the next), how much it gets ("" otherwise), by
    the text's size in the metadata: a token is a byte or more with bytes and byte-level BPEs, but
    dictionary-encoded text counts once per value."""
    held_out = 0 if cfg.dataset.val_parquet_dir else cfg.dataset.val_fraction
    least = min(deal(units, [unit.text_bytes for unit in units], n_readers)[1]) * (1 - held_out)
    batch = cfg.training.batch_size * cfg.training.block_size + 1
    return f"about {byte_amount(least)} of text, less than a batch of {batch:,} tokens" if least < batch else ""


def uneven_readers(units, workers: int, world_size: int, cfg) -> str | None:
    """A warning where the readers' shares of the text, dealt a (file, row group) unit at a time,
    cannot be even (one more than 1.25 times another): a unit well past a reader's even share, or
    too few units for the readers. Those with less text read theirs again sooner (or, with less
    than a batch, may never train on it)."""
    total, sizes = sum(unit.text_bytes for unit in units), [unit.text_bytes for unit in units]

    def spread(readers: int) -> float:  # the largest share over the smallest
        shares = deal(units, sizes, readers)[1]
        return max(shares) / max(1, min(shares))
    n_readers = reader_count(workers, world_size)
    if n_readers == 1 or (uneven := spread(n_readers)) <= 1.25:
        return None
    big = max(units, key=lambda unit: unit.text_bytes)
    why = (f"row group {big.row_group} of {big.path} holds {big.text_bytes / total:.1%} of the training text, more "
           f"than a reader's even share" if big.text_bytes > 1.25 * total / n_readers else
           f"the {len(units)} (file, row group) units of the training text, dealt whole, give one reader "
           f"{uneven:.2f} times the text of another")
    fitting = next((w for w in range(max(1, workers) - 1, 0, -1) if spread(w * world_size) <= 1.25), None)
    return (f"WARNING: {why} (even shares: {1 / n_readers:.1%} each for {n_readers} readers, "
            f"dataloader.num_workers={workers}"
            f"{f' x {world_size} processes' if world_size > 1 else ''}): the readers' shares cannot be even, "
            + (f"the smallest holds {short}, and a reader trains only on whole batches of its own share: that "
               f"text may never be trained on; " if (short := short_of_a_batch(units, cfg, n_readers)) else
               "those with less text read theirs again sooner, so their documents weigh more (and the passes over "
               "the data logged run ahead); ")
            + (f"dataloader.num_workers={fitting}, or " if fitting else "") +
            f"smaller row groups even them out: {rewrite_command(cfg.dataset)}")
