"""Streaming token batches from parquet shards (shards.py lists the (file, row group) units and
reads their documents).

Each document becomes its tokens (tokenizer.py) followed by the separator token. Null and empty
documents are skipped.

Each epoch the units are shuffled from the seed and the epoch number, then dealt to the (rank,
worker) readers, balancing their text's bytes (readers.py); together the readers cover every unit
exactly once per epoch. A reader joins its documents into one stream and cuts windows of block_size + 1 tokens with
stride block_size (consecutive windows share one token, so every token is a target exactly once).
Windows are shuffled within a pool and packed into batches: a pool is a run of a reader's small
units (in the epoch's shuffled order) whose tokens take about POOL_BYTES, or one part of a large unit,
so that a corpus of small row groups written in order (sorted sources, a book's chapters) is not
trained on one row group at a time. Nothing is padded or truncated; per reader and epoch only the
tail that does not fill a last batch is dropped. Where each reader stands is its position
(ParquetBatches): resume.py saves them, positions.resume_point says where a resume starts.
"""
import itertools
import sys
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from corpus import MIN_ROW_GROUPS, ensure_builtin_corpus
from read_ahead import read_ahead
from readers import assign_units
from shards import (DataError, Holdout, ParquetFileCache, Unit, first_documents, holdout_of, list_units,
                    read_unit_documents, rows_per_part)
from stopping import leave_signals_to_main
from tokenizer import check_vocab_size, load_tokenizer, lost_text, separator_in_text

# more workers than CPU cores: readers.loader_workers' note says so in one line, in the run's terms
warnings.filterwarnings("ignore", message="This DataLoader will create")

# a training reader that got no complete batch in its first this many epochs stops the run; once it
# has had one, an epoch without one (its units dealt that way) is skipped, as an epoch's last partial
# batch is, up to EMPTY_EPOCHS_AFTER_A_BATCH in a row (a resume with a batch_size too large for the data)
EMPTY_EPOCHS_BEFORE_A_BATCH = 4
EMPTY_EPOCHS_AFTER_A_BATCH = 1000
# training windows are shuffled across a run of a reader's small units (each read whole, in one part:
# shards.READ_BYTES of the row group or less) until their tokens take this many bytes (as many bytes of text
# with bytes tokens); a large unit's parts are pools each
POOL_BYTES = 8 << 20


def read_unit_tokens(cache: ParquetFileCache, unit: Unit, text_column: str, split: str, holdout: Holdout, tokenizer,
                     skip: int = 0):
    """The unit's parts as token arrays: each part's documents of `split`, each followed by the
    separator. The first `skip` parts are read but not tokenized (a resume within the unit)."""
    for part, docs in enumerate(read_unit_documents(cache, unit, text_column, split, holdout)):
        if part >= skip:
            yield tokenizer.encode_documents(docs) if len(docs) else np.empty(0, dtype=tokenizer.dtype)


def count_documents(cache: ParquetFileCache, units: list[Unit], text_column: str, split: str,
                    holdout: Holdout) -> int:
    """The non-empty documents of `split` in `units` (for the messages of too little data)."""
    return sum(len(docs) for unit in units
               for docs in read_unit_documents(cache, unit, text_column, split, holdout))


class Pool(NamedTuple):
    """A run of a reader's small units whose windows are shuffled together, or one part of a large unit."""
    first_unit: int  # the index of its first unit in the reader's epoch
    part: int  # that unit's first part
    lead: list  # token arrays to add to the stream before it (a re-dealt unit's from its old reader)
    pieces: list  # its token arrays, in stream order
    pooled: int  # how many units it holds


class ParquetBatches(IterableDataset):
    """Yields (x, y, position): int64 batches of shape (batch_size, block_size) and the reader's
    position after the batch, from the documents of `split` (train, val or all: read_unit_documents).
    shuffle (training): endless epochs, shuffled; otherwise one pass in file order (validation
    reads its windows through epoch_batches).

    A position {reader, epoch, unit, part, consumed, windows, carry[, pooled]} says: in this epoch the
    reader is in the pool that starts at part `part` of unit number `unit` of its assignment (and
    holds `pooled` units, where more than one: epoch_pools), `consumed` of the pool's `windows`
    shuffled windows are used, and `carry` holds the stream tokens that precede the pool. Its
    assignment is the epoch's dealing, or, where the position has `units` (a list of [index in
    `units`, first part, the tokens before that part in the stream of the reader that had it]),
    those: the rest of an epoch dealt anew on a resume (positions.resume_point;
    `epoch_done`: the share of the epoch's bytes read before). Passing the positions back as
    `positions` continues the exact same sequence of batches; `rotation` makes DataLoader worker i
    play reader (i + rotation) % num_workers, so that the reader whose batch was due next comes
    first again.
    """

    def __init__(self, units, split, block_size, batch_size, seed, holdout, text_column,
                 max_cached_files, tokenizer, rank=0, world_size=1, positions=(), rotation=0, *, shuffle: bool):
        self.units, self.split, self.tokenizer = units, split, tokenizer
        self.shuffle = shuffle  # (given: training with val_parquet_dir reads split "all", shuffled)
        self.block_size, self.batch_size = block_size, batch_size
        self.seed = seed  # the shuffle's
        self.text_column = text_column
        self.holdout = holdout  # the train/validation split
        self.max_cached_files = max_cached_files
        self.rank, self.world_size = rank, world_size
        self.positions = {p["reader"]: p for p in positions}
        self.rotation = rotation

    def __iter__(self):
        worker = get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        reader = self.rank * num_workers + (worker_id + self.rotation) % num_workers
        n_readers = self.world_size * num_workers
        resumed_at = self.positions.get(reader)
        cache = ParquetFileCache(self.max_cached_files)
        # an epoch may deal a reader less than a batch; a position after a batch has consumed windows (one
        # that resume_point makes up for a reader dealt anew has none)
        empty_epochs, had_a_batch = 0, bool(resumed_at and resumed_at.get("consumed"))

        def all_pools(stop):  # per epoch: (epoch, (its units, where it starts)), then (epoch, pool) for each pool
            first_epoch = resumed_at["epoch"] if resumed_at else 0
            for epoch, units, start in self.epochs_dealt(reader, n_readers, first_epoch, resumed_at):
                yield epoch, (units, start)
                for pool in self.epoch_pools(cache, units, start, stop):
                    yield epoch, pool
        # the next pools are read while this one is used, also across an epoch's end
        stream = read_ahead(all_pools)
        try:
            for epoch, items in itertools.groupby(stream, key=lambda item: item[0]):
                _, (units, start) = next(items)
                pools = (pool for _, pool in items)
                produced = False
                for batch in self.epoch_batches(cache, reader, n_readers, epoch, start, (units, pools)):
                    produced = True
                    yield batch
                if not self.shuffle:
                    return
                had_a_batch = had_a_batch or produced
                # (the rest of a resumed epoch may hold no batch: it does not count)
                empty_epochs = 0 if produced or start is not None else empty_epochs + 1
                limit = EMPTY_EPOCHS_AFTER_A_BATCH if had_a_batch else EMPTY_EPOCHS_BEFORE_A_BATCH
                if empty_epochs == limit:  # not forever
                    raise DataError(self.too_little_data(reader, n_readers, epoch, empty_epochs))
        finally:
            stream.close()  # (its thread ends before the files it reads are closed)
            cache.close()

    def epochs_dealt(self, reader, n_readers, epoch, start):
        """(epoch, its units, where it starts) from `epoch` on, endlessly (one epoch without shuffle)."""
        while True:
            yield epoch, self.epoch_units(reader, n_readers, epoch, start), start
            if not self.shuffle:
                return
            epoch, start = epoch + 1, None

    def epoch_units(self, reader, n_readers, epoch, start) -> list:
        """[unit, first part, the tokens before that part] of a reader's epoch: as the epoch deals them,
        or the rest of an epoch dealt anew, where `start` has them (its `units`: resume_point)."""
        redealt = start.get("units") if start else None
        if redealt is None:
            dealt = assign_units(self.units, epoch, self.seed, n_readers, shuffle=self.shuffle)[reader]
            return [(unit, 0, []) for unit in dealt]
        # [index, first part, the tokens before that part in its old reader's stream (not saved before 0.4.5)]
        return [(self.units[entry[0]], entry[1], entry[2] if len(entry) > 2 else []) for entry in redealt]

    def too_little_data(self, reader, n_readers, epoch, empty_epochs) -> str:
        """Why a reader got no batch in an epoch, and what to change."""
        units = assign_units(self.units, epoch, self.seed, n_readers, shuffle=self.shuffle)[reader]
        with ParquetFileCache(1) as cache:  # (not the reader's: its read-ahead thread may be using that one)
            documents = {split: count_documents(cache, units, self.text_column, split, self.holdout)
                         for split in (self.split, "all")}
        if self.split == "train" and not documents["train"]:
            plural = "s" * (documents["all"] != 1)
            return (f"reader {reader} of {n_readers}: none of the {documents['all']:,} document{plural} of its (file, "
                    f"row group) units went to training (each goes to validation with probability dataset.val_fraction "
                    f"{self.holdout.fraction}); cut the text into more documents (python prepare.py --from-text ... "
                    f"with a smaller --chunk-bytes), lower dataset.val_fraction, or set dataset.val_parquet_dir")
        readers = ("" if n_readers == 1 else " for this many readers (processes x workers); lower "
                   "dataloader.num_workers, the number of processes,")
        return (f"reader {reader} of {n_readers} got no complete batch of {self.batch_size} x {self.block_size + 1} "
                f"tokens in passes {epoch - empty_epochs + 2}-{epoch + 1} over the training data: too little "
                f"training data{readers or '; lower'} training.batch_size or "
                f"training.block_size, or add data")

    def epoch_batches(self, cache, reader, n_readers, epoch, start=None, read=None):
        """One epoch of one reader (from `start` if given): its units joined into a stream, cut
        into windows, shuffled within each pool (epoch_pools), packed into batches. `read`: (its
        units, its pools) as __iter__ reads them ahead; else they are read here."""
        T, B = self.block_size, self.batch_size
        redealt = start.get("units") if start else None  # the rest of an epoch, dealt anew (resume_point)
        if read is None:
            units = self.epoch_units(reader, n_readers, epoch, start)
            read = units, self.epoch_pools(cache, units, start)
        units, pools = read
        carry = np.array(start["carry"] if start else [], dtype=self.tokenizer.dtype)
        pending = []
        resumed_at = (start["unit"], start.get("part", 0)) if start else None
        for k, part, lead, pieces, pooled in pools:  # k: the pool's first unit
            carry_in = np.concatenate([carry, *lead]) if lead else carry
            stream = np.concatenate([carry_in, *pieces])
            n_windows = max(0, (len(stream) - 1) // T)
            carry = stream[n_windows * T:].copy()
            if n_windows == 0:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(stream, T + 1)[::T][:n_windows]
            order = np.arange(n_windows)  # windows are copied a batch at a time, in this order
            if self.shuffle:
                first = units[k][0]
                order = np.random.default_rng([self.seed, epoch, first.file_key, first.row_group, part]).permutation(
                    n_windows)
            used = start["consumed"] if (k, part) == resumed_at else 0
            while n_windows - used >= B - len(pending):
                take = B - len(pending)
                pending.extend(windows[order[used:used + take]])
                used += take
                batch = torch.from_numpy(np.stack(pending).astype(np.int64))
                pending = []
                position = {"reader": reader, "epoch": epoch, "unit": k, "part": part, "consumed": used,
                            "windows": n_windows, "carry": carry_in.tolist()}
                if pooled > 1:
                    position["pooled"] = pooled
                if redealt is not None:
                    position.update(units=redealt, epoch_done=start["epoch_done"])
                yield batch[:, :-1], batch[:, 1:], position
            pending.extend(windows[order[used:]])  # (copies)
            del stream, windows, pieces, lead, carry_in  # freed before the next pool is read

    def epoch_pools(self, cache, units, start=None, stop=None):
        """The Pools of an epoch's `units` ([unit, first part, tokens before it in an old reader's
        stream]) from `start`'s on. A pool is a run of small units (read whole, in one part) whose
        tokens reach POOL_BYTES, or one part of a large unit; validation's stream is read a part at a
        time. What is small is decided by what is read, not by the metadata alone (dictionary-encoded
        text counts each repeated text once), so that a resume at a pool's first unit finds the same
        pools. `stop`: an Event that, once set, gives up the pool being read (read_ahead's)."""
        first = start["unit"] if start else 0

        def read(i, skip):
            """Unit i from part `skip`: (the tokens to put before it in the stream, where a re-deal gave
            it those of its old reader (the start position's carry holds the first unit's), its parts'
            token arrays, whether it reads whole in one part: then it may join a pool)."""
            unit, _, carried = units[i]
            lead = [np.array(carried, dtype=self.tokenizer.dtype)] if carried and i > first else []
            tokens = read_unit_tokens(cache, unit, self.text_column, self.split, self.holdout,
                                      self.tokenizer, skip)
            one_part_by_metadata = self.shuffle and skip == 0 and rows_per_part(unit) >= unit.num_rows
            ahead = list(itertools.islice(tokens, 2)) if one_part_by_metadata else []
            return lead, itertools.chain(ahead, tokens), one_part_by_metadata and len(ahead) == 1
        k = first
        while k < len(units):
            skip = start.get("part", 0) if start and k == first else units[k][1]
            lead, parts, one_part = read(k, skip)
            if not one_part:  # a large unit (or validation's stream): a pool per part
                for part, piece in enumerate(parts, start=skip):
                    yield Pool(k, part, lead, [piece], 1)
                    lead = []
                if lead:  # (no part left to read: its tokens go on to the next unit's stream)
                    yield Pool(k, skip, lead, [], 1)
                k += 1
                continue
            pieces, end = list(parts), k + 1
            size = sum(piece.nbytes for piece in pieces)
            while end < len(units) and size < POOL_BYTES:
                if stop is not None and stop.is_set():  # not wanted any more (read_ahead)
                    return
                inner_lead, parts, one_part = read(end, units[end][1])
                if not one_part:  # it starts the next pool (read again there: the rare unit that outgrows its metadata)
                    parts = None  # (not held in memory meanwhile)
                    break
                more = inner_lead + list(parts)
                pieces.extend(more)
                size, end = size + sum(piece.nbytes for piece in more), end + 1
            yield Pool(k, skip, lead, pieces, end - k)
            k = end


def training_split(cfg) -> str:
    """The documents training reads: all of parquet_dir's when validation has its own folder."""
    return "all" if cfg.dataset.val_parquet_dir else "train"


def check_enough_units(cfg, units, world_size: int):
    """Every process reads (file, row group) units of its own: refuse more processes than units."""
    if len(units) < world_size:
        raise DataError(f"{cfg.dataset.parquet_dir}: {len(units)} (file, row group) unit{'s' * (len(units) != 1)} "
                        f"for {world_size} processes, and each process reads units of its own: start at most "
                        f"{len(units)} (torchrun --nproc_per_node), or write the data in more row groups (prepare.py "
                        f"--from-text writes a small text in about {MIN_ROW_GROUPS} row groups, of one document at "
                        f"least: --chunk-bytes cuts smaller documents; your own parquet: "
                        f"pyarrow.parquet.write_table(..., row_group_size=fewer rows))")


def prepare_data(cfg, ranks):
    """(tokenizer, the training shards' units), checked before any training: the tokenizer against
    model.vocab_size, every shard's footer and schema.
    Builds the built-in corpus first if the config points at it and it is missing (`ranks`, a
    distributed.Ranks: the first process of each machine builds it, the others wait)."""
    tokenizer = load_tokenizer(cfg.dataset.tokenizer)
    too_large = check_vocab_size(tokenizer, cfg.model.vocab_size)
    if ranks.main and too_large and not cfg.training.resume_from_checkpoint:  # (a resume cannot change it)
        print(too_large)
    if ranks.main and (note := separator_in_text(tokenizer)):
        print(note)
    if ranks.main and tokenizer.turned_off:
        print(f"note: dataset.tokenizer {cfg.dataset.tokenizer}: its {' and '.join(tokenizer.turned_off)} turned off "
              f"(saved in the file for inference): training reads whole documents, without pad tokens")
    if ranks.local_rank == 0:
        ensure_builtin_corpus(cfg)
    ranks.barrier()
    units = list_units(cfg.dataset.parquet_dir, cfg.dataset.text_column)
    check_enough_units(cfg, units, ranks.world_size)
    if ranks.main and (warning := lost_text(tokenizer, first_documents(units[0], cfg.dataset.text_column, 20))):
        print(warning)
    return tokenizer, units


def train_loader(cfg, units, tokenizer, workers, positions=(), batches_consumed=0, pin_memory=False, rank=0,
                 world_size=1) -> DataLoader:
    """The endless training stream, yielding (x, y, position), from a positions.resume_point()."""
    training, dataset_cfg = cfg.training, cfg.dataset
    dataset = ParquetBatches(units, training_split(cfg), training.block_size, training.batch_size, training.seed,
                             holdout_of(dataset_cfg), dataset_cfg.text_column,
                             dataset_cfg.max_cached_files, tokenizer, rank=rank, world_size=world_size,
                             positions=positions, rotation=batches_consumed % max(1, workers), shuffle=True)
    # forked on Linux, whatever Python's default (forkserver since 3.14): a forkserver's workers each import torch
    # anew, and they outlive a run killed by kill -9 or the OOM killer (they watch the forkserver, which they keep
    # running); macOS and Windows spawn them
    context = "fork" if workers and sys.platform.startswith("linux") else None
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=cfg.dataloader.prefetch_factor if workers else None,
                      worker_init_fn=leave_signals_to_main if workers else None, multiprocessing_context=context,
                      generator=torch.Generator())  # keeps the global RNG (dropout) untouched


def rank_positions(positions, rank: int, workers: int) -> dict:
    """{reader: position} of the readers of this rank among `positions`: readers are numbered
    rank x max(1, workers) + worker (ParquetBatches)."""
    return {p["reader"]: p for p in positions if p["reader"] // max(1, workers) == rank}


if __name__ == "__main__":
    sys.exit("data.py is the training data loader; the data commands are in prepare.py (python prepare.py --help)")
