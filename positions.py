"""Where the training stream stands: the data order a checkpoint records, about how many passes
over the data the readers have made, and where a resume starts (data.py's ParquetBatches
continues from the positions).
"""
import hashlib

import numpy as np
import torch

import data
import shards
from data import training_split
from files import byte_amount
from readers import EVEN_TEXT, IN_SHUFFLED_ORDER, LARGEST_FIRST, assign_units, deal, reader_count
from shards import Unit, rows_per_part

# Settings that decide the order of the training windows: resuming with other values cannot
# continue the same sequence. The batch size is not one (the windows continue, in batches of the
# new size), nor is the folder's name: the shards' fingerprint (data_order) stands for them,
# wherever they are and however the path is written.
DATA_ORDER_FIELDS = ("training.block_size", "training.seed", "dataset.text_column", "dataset.val_fraction",
                     "dataset.split_seed", "dataset.split_by")
HOLDOUT_FIELDS = ("dataset.val_fraction", "dataset.split_seed", "dataset.split_by")  # which documents are held out
SHARDS = "the shards (files, row groups, rows, bytes)"  # data_order's key of their fingerprint
SHARDS_SEEN = "the shards"  # data_order's key of their counts, for messages only (SHARDS decides)
# data_order's key of the units themselves, in their order: where the shards change, a resume deals on the epoch's
# unfinished units that are still there (rest_of_epoch), since 0.5.1. A tensor, one row a unit: a checkpoint maps it
# (a list of a million units would take seconds to unpickle)
UNITS = "units (file key, row group, rows, bytes, text bytes)"
WORKERS_KEY = "dataloader.num_workers (effective)"
# (a key that checkpoints hold: it keeps the name of the module READ_BYTES was in then, data.py, now shards.py,
# and its words from before pools: windows are now shuffled within pools, POOL_KEY)
READ_BYTES_KEY = "data.READ_BYTES (windows are shuffled within parts of this many bytes)"
DEALING_KEY = "units dealt to the readers"  # readers.assign_units' way
POOL_KEY = "data.POOL_BYTES (windows are shuffled across a reader's small units whose tokens take this many bytes)"
# Unchanged, these keep every unit and its parts as they were: a resume that changes only the
# readers (workers, processes), the block size, the seed or the pool size finishes the epoch that was in
# progress; one that also changes the shards finishes it on the units still there, with the new ones (UNITS).
SAME_UNITS = (SHARDS, "dataset.text_column", *HOLDOUT_FIELDS, "documents trained on", READ_BYTES_KEY)


def data_order(cfg, units, num_workers, world_size=1) -> dict:
    """What decides the order of the training batches: settings, and the shards themselves (a
    fingerprint of every unit's file, row group, rows and bytes: shards added, removed or rewritten
    in the same folder change it)."""
    order = {path: cfg.get(path) for path in DATA_ORDER_FIELDS}
    if cfg.dataset.val_parquet_dir:  # validation has a folder of its own: val_fraction splits nothing
        for path in HOLDOUT_FIELDS:
            del order[path]
    order["documents trained on"] = training_split(cfg)
    fingerprint = hashlib.blake2b(repr([(u.file_key, u.row_group, u.num_rows, u.num_bytes) for u in units]).encode(),
                                  digest_size=8).hexdigest()
    order.update({WORKERS_KEY: num_workers, "world_size": world_size, DEALING_KEY: EVEN_TEXT,
                  READ_BYTES_KEY: shards.READ_BYTES, POOL_KEY: data.POOL_BYTES,
                  SHARDS: fingerprint, SHARDS_SEEN: shards_seen(units),
                  UNITS: units_listed(units)})
    return order


def units_listed(units) -> torch.Tensor:
    """UNITS: (file key, row group, rows, bytes, text bytes) of each unit, int64 (the file key's 64 bits as they are)."""
    rows = np.array([(u.file_key, u.row_group, u.num_rows, u.num_bytes, u.text_bytes) for u in units],
                    dtype=np.uint64).reshape(-1, 5)
    return torch.from_numpy(rows.view(np.int64))


def saved_units(saved_order) -> list[Unit]:
    """The units a data order lists (UNITS), as far as dealing and sizing them goes (their paths are not saved)."""
    rows = saved_order[UNITS].numpy().view(np.uint64).tolist()
    return [Unit("", row_group, num_rows, num_bytes, file_key, text_bytes)
            for file_key, row_group, num_rows, num_bytes, text_bytes in rows]


def identity(unit: Unit) -> tuple:
    """What the shards' fingerprint (SHARDS) knows a unit by."""
    return unit.file_key, unit.row_group, unit.num_rows, unit.num_bytes


def shards_seen(units) -> str:
    counts = (len({u.path for u in units}), "file"), (len(units), "row group"), (sum(u.num_rows for u in units), "row")
    return ", ".join(f"{n:,} {word}{'s' * (n != 1)}" for n, word in counts) + \
        f", {sum(u.num_bytes for u in units) / 2**20:,.1f} MiB"


def order_changes(saved_order: dict, order: dict) -> tuple[list[str], list[str]]:
    """(the keys of data_order whose values differ, a line for each); the shards by their counts
    where the checkpoint has them."""
    keys = [k for k, v in order.items() if k not in (SHARDS_SEEN, UNITS) and saved_order.get(k) != v]
    lines = []
    for k in keys:
        if k == POOL_KEY and k not in saved_order:  # (written before 0.4.13)
            lines.append("windows are now shuffled across a reader's small (file, row group) units, not within each")
        elif k == SHARDS and SHARDS_SEEN in saved_order:  # (written before 0.4.3: its fingerprint only)
            before, after = saved_order[SHARDS_SEEN], order[SHARDS_SEEN]
            lines.append(f"the shards: {before} -> {after}" if before != after
                         else f"the shards renamed, moved or rewritten: {after}")
        else:
            lines.append(f"{k}: {saved_order.get(k)!r} -> {order[k]!r}")
    return keys, lines


def epochs_read(positions, units: list[Unit], seed: int, n_readers: int, dealings: dict, readers=(),
                whole_before: int = 0) -> float:
    """About how many passes over the training units the readers have made: the bytes each reader
    has read, over its fair share of the units' bytes (1 / n_readers), averaged over the readers
    whose positions are given (a rank knows its own) and the `readers` without one yet (not
    started: 0). A reader's bytes are its fair share of each epoch before `whole_before` (those that
    every reader finished before this stream began: a resume may have dealt them otherwise), what it
    was dealt in each epoch since, and what it has read of the one it is in: the units before the one
    it is in, the parts of that unit finished (a row group may hold gigabytes) and the share of
    windows used of the pool it is in (that part, or a run of small units: data.py). By bytes, not
    epochs: a reader dealt a small share (one row group holds most of the data) goes through its
    epochs fast while the others are in their first.
    `dealings` keeps the epochs' dealings from call to call."""
    positions = list(positions)
    given = {position["reader"] for position in positions}
    n_missing = sum(reader not in given for reader in readers)
    if not positions:
        return 0.0
    total = max(1, sum(unit.text_bytes for unit in units))
    dealt, loads = dealings.setdefault("dealt", {}), dealings.setdefault("loads", {whole_before - 1: np.zeros(n_readers)})
    oldest = min(position["epoch"] for position in positions)
    for epoch in [epoch for epoch in dealt if epoch < oldest]:
        del dealt[epoch]  # no reader is in it any more

    def dealing(epoch):
        if epoch not in dealt:
            dealt[epoch] = dealing_with_bytes(units, epoch, seed, n_readers)
        return dealt[epoch]
    read = 0.0  # in bytes x n_readers: each reader's fair share is `total` of them, exactly
    for position in positions:
        epoch = position["epoch"]
        if "units" in position:  # the rest of an epoch, dealt anew: what was done of it, and of this share
            share = sum(bytes_left(units[index], part) for index, part, *_ in position["units"])
            rest = still_to_read(position["units"], position)
            left = sum(bytes_left(units[index], part) for index, part, *_ in rest)
            left -= pool_read(pool_of(units, rest, position), position) if rest else 0
            done = 1 - left / share if share else 1.0
            read += (epoch + position["epoch_done"] + (1 - position["epoch_done"]) * done) * total
            continue
        for later in range(max(loads) + 1, epoch):  # each reader's bytes in each epoch since, their running sum
            loads[later] = loads[later - 1] + [cumulative[-1] for _, cumulative in dealing(later)]
        assigned, cumulative = dealing(epoch)[position["reader"]]
        reader_bytes = loads[max(epoch, whole_before) - 1][position["reader"]] + bytes_read(assigned, cumulative, position)
        read += min(epoch, whole_before) * total + n_readers * reader_bytes
    return float(read / (total * (len(positions) + n_missing)))


def dealing_with_bytes(units: list[Unit], epoch: int, seed: int, n_readers: int, way: str = EVEN_TEXT) -> list:
    """Each reader's units in `epoch` (readers.assign_units), with their text's cumulative bytes from 0."""
    return [(assigned, np.cumsum([0] + [unit.text_bytes for unit in assigned]))
            for assigned in assign_units(units, epoch, seed, n_readers, shuffle=True, way=way)]


def bytes_read(assigned: list[Unit], cumulative, position) -> float:
    """About the bytes a reader at `position` has read of its epoch's units (`assigned`, with their
    `cumulative` bytes): the units before the pool it is in (the one it is in, and the parts of that one
    before the part it is in), and of that pool."""
    done, k = cumulative[position["unit"]], position["unit"]
    if k < len(assigned):
        done += assigned[k].text_bytes - bytes_left(assigned[k], position.get("part", 0))
        done += pool_read(assigned[k:k + position.get("pooled", 1)], position)
    return float(done)


def bytes_left(unit: Unit, part: int) -> float:
    """About the text's bytes of `unit` from part `part` on."""
    return unit.text_bytes * (1 - min(1.0, part * rows_per_part(unit) / max(1, unit.num_rows)))


def pool_read(pool: list[Unit], position, kept=None) -> float:
    """About the bytes read of the pool a reader at `position` is in (data.py: a part of a unit, or
    the small units `pool`): the pool's share of windows used (positions saved before they counted
    the windows: none), of each unit alike (its windows are shuffled together); of the units that
    `kept` (a flag for each) says are still there."""
    part = position.get("part", 0)
    share = position["consumed"] / position["windows"] if position.get("windows") else 0.0
    sizes = [bytes_left(pool[0], part) - (bytes_left(pool[0], part + 1) if len(pool) == 1 else 0)]
    sizes += [unit.text_bytes for unit in pool[1:]]
    return sum(size for size, still_there in zip(sizes, kept or [True] * len(pool)) if still_there) * share


def pool_of(units: list[Unit], rest: list, position) -> list[Unit]:
    """The units of the pool a reader at `position` is in, the first of `rest` (still_to_read's)."""
    return [units[index] for index, *_ in rest[:position.get("pooled", 1)]]


def still_to_read(assigned, position) -> list:
    """[index in units, first part, carry] of the units of `assigned` (such entries, the carry
    optional) that a reader at `position` has not finished: from the one it is in, at the part it
    is in, after the stream's tokens before that part (no window has had them as targets yet, but
    for the first: the last target of the window before it, where there was one; a re-deal that puts
    the unit after another reader's makes that one token a target again)."""
    rest = [[index, part, carry[0] if carry else []] for index, part, *carry in assigned[position["unit"]:]]
    if rest:
        rest[0][1:] = [position.get("part", 0), position.get("carry", [])]
    return rest


def rest_of_epoch(units, saved_order, saved_positions, n_readers, old=None) -> tuple[list, list, int, float]:
    """(start positions, [units left, of them gone, units added], epoch, about the bytes read again): the
    units of the oldest epoch a saved reader is in that no reader has finished, dealt to n_readers
    (balancing bytes) in positions that carry them (a reader's pool restarts: a part of a large unit,
    or the first of a run of small units; what was read of it is read again). Readers that had gone on
    to the next epoch had finished this one; what they read of the next is read again (the next epoch
    is dealt anew), and counted. `old`: the units the saved readers were dealt, where the shards changed
    since (saved_units): their unfinished units still there are dealt with those new since (with_new_units)."""
    old = units if old is None else old
    now = {identity(unit): i for i, unit in enumerate(units)}
    old_readers = reader_count(saved_order[WORKERS_KEY], saved_order["world_size"])
    way = saved_order[DEALING_KEY]  # how the saved epochs were dealt
    saved = {p["reader"]: p for p in saved_positions}
    # a reader that had not handed over a batch yet: at the start of the oldest epoch (a fresh run's first)
    start = {"epoch": min((p["epoch"] for p in saved_positions), default=0), "unit": 0, "part": 0}
    epoch = min(saved.get(reader, start)["epoch"] for reader in range(old_readers))
    index = {(unit.file_key, unit.row_group): i for i, unit in enumerate(old)}
    dealing = None
    left = []  # [index in old, first part, the stream's tokens before it]
    read_of_pools = 0.0  # of the pools being read, which are read again from their start: counted as read
    read_in_later_epochs, later = 0.0, {}  # what readers already in later epochs had read of them
    for reader in range(old_readers):
        position = saved.get(reader, start)
        if position["epoch"] > epoch:
            if "units" not in position:  # (a dealt rest of an epoch is never ahead: all readers share its epoch)
                for ahead in range(epoch + 1, position["epoch"] + 1):
                    if ahead not in later:
                        later[ahead] = dealing_with_bytes(old, ahead, saved_order["training.seed"], old_readers, way)
                    assigned, cumulative = later[ahead][reader]
                    read_in_later_epochs += (bytes_read(assigned, cumulative, position) if ahead == position["epoch"]
                                             else float(cumulative[-1]))  # an epoch it finished: its whole share
            continue
        if "units" in position:
            assigned = position["units"]
        else:
            dealing = dealing or assign_units(old, epoch, saved_order["training.seed"], old_readers, shuffle=True,
                                              way=way)
            assigned = [[index[(unit.file_key, unit.row_group)], 0] for unit in dealing[reader]]
        rest = still_to_read(assigned, position)
        if rest:  # (of a pool's units that are gone, nothing is read again)
            pool = pool_of(old, rest, position)
            read_of_pools += pool_read(pool, position, kept=[identity(unit) in now for unit in pool])
        left += rest
    entries = [[now[identity(old[index])], *rest] for index, *rest in left if identity(old[index]) in now]
    counts = [len(left), len(left) - len(entries), 0]
    if old is not units:
        entries, counts[2] = with_new_units(units, old, entries, saved_order["training.seed"], epoch)
    dealt, loads = deal(entries, [bytes_left(units[index], part) for index, part, *_ in entries], n_readers)
    done = 1 - (sum(loads) - read_of_pools) / max(1, sum(unit.text_bytes for unit in units))  # for epochs_read
    positions = [{"reader": reader, "epoch": epoch, "unit": 0, "part": entries[0][1] if entries else 0,
                  "consumed": 0, "carry": entries[0][2] if entries else [], "units": entries, "epoch_done": done}
                 for reader, entries in enumerate(dealt)]
    return positions, counts, epoch, read_of_pools + read_in_later_epochs


def with_new_units(units, old, entries, seed: int, epoch: int) -> tuple[list, int]:
    """(`entries` (the rest of an epoch, [index in units, first part, carry]) with the units that are
    not among `old`, the units it was dealt from: those of shards added, renamed or rewritten since,
    read whole, in a shuffled order (new text mixed with the rest, not after it), how many were added)."""
    known = {identity(unit) for unit in old}
    added = [[i, 0, []] for i, unit in enumerate(units) if identity(unit) not in known]
    together = entries + added
    order = np.random.default_rng([seed, epoch, len(units)]).permutation(len(together))
    return [together[i] for i in order], len(added)


def rest_dealt(n_units: int, left: int, gone: int, added: int, epoch: int, n_readers: int, read_again: float,
               share: float) -> str:
    """What rest_of_epoch did: `left` units of `n_units` unfinished, `gone` of them, `added` new."""
    if left == gone and not added:
        gone = f" (the {gone} it had not finished are gone now)" * bool(gone)
        return (f"no (file, row group) unit of epoch {epoch} is left to read{gone}: training goes on with "
                f"epoch {epoch + 1}")
    gone = "" if not gone else " (gone now)" if gone == left else f" ({gone} of them gone now)"
    new = f" and the {added} new or rewritten one{'s' * (added != 1)} (read whole)" * bool(added)
    return (f"the {left} of {n_units} (file, row group) units that epoch {epoch} has not finished{gone}{new} are "
            f"dealt anew to {n_readers} reader{'s' * (n_readers != 1)}, then the epochs continue as usual; the pools "
            f"being read start again, so about {byte_amount(read_again)} ({share:.1%} of the epoch) is read twice"
            + ", as is whatever had been read of any shard renamed or rewritten" * bool(added))


def dealt_alike(units, saved_order, saved_positions) -> bool:
    """Whether the epochs that the saved readers are in were dealt as this version deals them, by
    their text's bytes: always for one reader, and mostly for shards whose text is all or most of
    their bytes (prepare.py's)."""
    if "training.seed" not in saved_order or WORKERS_KEY not in saved_order:
        return False
    n_readers = reader_count(saved_order[WORKERS_KEY], saved_order.get("world_size", 1))
    epochs = {p["epoch"] for p in saved_positions if "units" not in p}  # (the rest of an epoch dealt anew: its own)
    if len(saved_positions) < n_readers:  # a reader without a position is at the start of the oldest epoch
        epochs.add(min((p["epoch"] for p in saved_positions), default=0))
    seed, way = saved_order["training.seed"], saved_order[DEALING_KEY]
    return all(assign_units(units, epoch, seed, n_readers, shuffle=True, way=way)
               == assign_units(units, epoch, seed, n_readers, shuffle=True) for epoch in epochs)


def resume_point(cfg, units, workers, world_size=1, saved_order=None, saved_positions=(), batches_consumed=0,
                 order=None):
    """Where the training stream starts: (reader positions, batches consumed), from a checkpoint's
    data order, reader positions and batch count (none: the start). With the same data order the
    stream continues exactly, and so it does with the same number of readers laid out otherwise (2
    processes x 1 worker, 1 x 2). With other readers, block size, seed or shards but the same split and
    text column, the rest of the epoch in progress (its unfinished units still there, and the units new
    since) is dealt to the new readers (rest_of_epoch): no document is skipped. Otherwise (other
    documents, or other shards since a checkpoint that did not list its units, before 0.5.1) every
    reader starts afresh at the epoch after the furthest one reached. Either way it says so. Those
    start positions are saved with the next checkpoint like any other: a reader that has not yet
    handed over a batch then still resumes there. `order`: this run's data_order, where the caller has it."""
    if saved_order is None:
        return [], 0
    if "documents trained on" not in saved_order:  # written before 0.4.1: it named the folders instead
        saved_order = {**saved_order, "documents trained on": "all" if saved_order.get("dataset.val_parquet_dir")
                       else "train"}
    if "dataset.val_fraction" in saved_order and "dataset.split_seed" not in saved_order:  # before 0.4.6: the seed's
        saved_order = {**saved_order, "dataset.split_seed": saved_order.get("training.seed")}
    if "dataset.val_fraction" in saved_order and "dataset.split_by" not in saved_order:  # before 0.5.0: by place
        saved_order = {**saved_order, "dataset.split_by": "position"}
    if DEALING_KEY not in saved_order:  # before 0.4.8 (for one reader, the same dealing)
        one_reader = reader_count(saved_order.get(WORKERS_KEY, 0), saved_order.get("world_size", 1)) == 1
        saved_order = {**saved_order, DEALING_KEY: LARGEST_FIRST if one_reader else IN_SHUFFLED_ORDER}
    if saved_order[DEALING_KEY] != EVEN_TEXT and dealt_alike(units, saved_order, saved_positions):
        saved_order = {**saved_order, DEALING_KEY: EVEN_TEXT}  # (the positions hold as they are)
    order = data_order(cfg, units, workers, world_size) if order is None else order
    changed_keys, changed = order_changes(saved_order, order)
    if not changed:
        return saved_positions, batches_consumed
    n_readers = reader_count(workers, world_size)
    old_workers = max(1, saved_order.get(WORKERS_KEY, 0))
    if (set(changed_keys) <= {WORKERS_KEY, "world_size"} and WORKERS_KEY in saved_order
            and old_workers * saved_order.get("world_size", 0) == n_readers):
        # reader r is rank r // workers, worker r % workers either way: each continues where it stopped
        print(f"note: {'; '.join(changed)}: still {n_readers} readers (processes x workers), each continues "
              f"where it stopped")
        return saved_positions, batches_consumed // old_workers * max(1, workers)
    saved_readers = old_workers * saved_order.get("world_size", 0)
    if set(changed_keys) <= {WORKERS_KEY, "world_size"} and saved_readers and saved_readers % world_size == 0:
        keeps = saved_order[WORKERS_KEY] if saved_order.get("world_size") == world_size else saved_readers // world_size
        changed[-1] += (f"; dataloader.num_workers={keeps} would keep its {saved_readers} "
                        f"reader{'s' * (saved_readers != 1)}, each continuing where it stopped")
    same_documents = all(k in saved_order and saved_order[k] == order.get(k) for k in SAME_UNITS
                         if k != SHARDS and (k in order or k in saved_order))
    other_shards = saved_order.get(SHARDS) != order[SHARDS]
    if (same_documents and (not other_shards or UNITS in saved_order)
            and all(k in saved_order for k in (WORKERS_KEY, "world_size", "training.seed"))):
        old = saved_units(saved_order) if other_shards else units
        positions, (left, gone, added), epoch, read_again = rest_of_epoch(units, saved_order, saved_positions,
                                                                          n_readers, old)
        share = read_again / max(1, sum(unit.text_bytes for unit in units))
        print(f"WARNING: the data order changes on this resume ({'; '.join(changed)}): "
              + rest_dealt(len(old), left, gone, added, epoch, n_readers, read_again, share))
        return positions, 0
    first_epoch = 1 + max((p["epoch"] for p in saved_positions), default=-1)
    print(f"WARNING: the data order changes on this resume ({'; '.join(changed)}): training continues at the "
          f"start of a new pass over the data, freshly shuffled (the rest of the pass it was in is not read; the "
          f"count of passes keeps what was read of it)")
    return [{"reader": reader, "epoch": first_epoch, "unit": 0, "part": 0, "consumed": 0, "carry": []}
            for reader in range(n_readers)], 0
