"""Where the training stream stands (positions.py): the passes logged, the rest of an epoch dealt
to other readers, the data order and where a resume starts."""
import dataclasses
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import shards
import train
from checkpoint import load_checkpoint
from config import Config
from conftest import make_corpus, only_run, run_dirs, unit_of_tag, write_config, write_parquet
from data import ParquetBatches, read_unit_tokens
from positions import (DEALING_KEY, POOL_KEY, SHARDS, SHARDS_SEEN, UNITS, WORKERS_KEY, bytes_left, data_order,
                       epochs_read, order_changes, pool_read, rest_dealt, rest_of_epoch, resume_point, saved_units)
from readers import EVEN_TEXT, IN_SHUFFLED_ORDER, LARGEST_FIRST, assign_units
from shards import Holdout, ParquetFileCache, Unit, list_units
from tokenizer import ByteTokenizer

BYTES = ByteTokenizer()


def window_bytes(x, y):
    return bytes(torch.cat([x, y[-1:]]).tolist())


def training_stream(units, seed=0, val_fraction=0.2, shuffle=True, **kwargs):
    """The tests' training stream: windows of 16 tokens, batches of 2."""
    return ParquetBatches(units, "train", 16, 2, seed, Holdout(val_fraction, 0), "text", 4, BYTES, shuffle=shuffle,
                          **kwargs)


def test_passes_count_the_finished_parts_of_a_large_row_group():
    from shards import READ_BYTES
    # 4 parts each; a quarter of the bytes is text
    units = [Unit(f"{name}.parquet", 0, 1000, 4 * READ_BYTES, k, READ_BYTES) for k, name in enumerate("ab")]
    passes = lambda **position: epochs_read([{"reader": 0, **position}], units, 0, 1, {})  # noqa: E731
    assert passes(epoch=0, unit=0, part=0) == 0.0
    assert passes(epoch=0, unit=0, part=2) == 0.25  # half of the first of two units
    assert passes(epoch=1, unit=1, part=1) == 1.625
    assert passes(epoch=0, unit=0, part=2, consumed=30, windows=40) == 0.25 + 0.75 / 8  # and 3/4 of the third part


def test_passes_follow_the_bytes_read_when_one_row_group_holds_most_of_the_data(tmp_path):
    """Two readers, one of them dealt the big row group: the other goes through its small share
    several times meanwhile. The passes logged are the batches read over an epoch's batches (each
    reader weighed by the bytes it was dealt), not the mean of the readers' epochs; a reader with
    no batch yet counts as not started."""
    write_parquet(tmp_path / "data/big.parquet", [f"{k:05d} " + "big text " * 20 for k in range(200)], rows_per_group=200)
    for name in "abcd":
        write_parquet(tmp_path / f"data/{name}.parquet", [f"{k:05d} " + "small " * 20 for k in range(10)], rows_per_group=10)
    units = list_units(tmp_path / "data", "text")  # seed 5: reader 0 has the small ones in epochs 0, 1
    stream = training_stream(units, seed=5, val_fraction=0.0)
    cache = ParquetFileCache(8)
    per_epoch = sum(len(list(stream.epoch_batches(cache, reader, 2, 0))) for reader in range(2))

    def endless(reader):
        for epoch in range(20):
            yield from stream.epoch_batches(cache, reader, 2, epoch)
    readers, positions, dealings = [endless(0), endless(1)], {}, {}
    first = next(readers[0])[2]
    alone = epochs_read([first], units, 5, 2, {})
    assert epochs_read([first], units, 5, 2, {}, readers=range(2)) == pytest.approx(alone / 2)
    positions[0], errors, epochs_apart = first, [], 0
    for read in range(2, int(1.5 * per_epoch)):
        position = next(readers[(read + 1) % 2])[2]
        positions[position["reader"]] = position
        errors.append(epochs_read(positions.values(), units, 5, 2, dealings) - read / per_epoch)
        epochs_apart = max(epochs_apart, abs(positions[0]["epoch"] - positions[1]["epoch"]))
    assert epochs_apart >= 2  # (the mean of the readers' epochs would be a pass ahead)
    assert max(map(abs, errors)) < 0.05


def test_passes_are_whole_at_the_start_of_an_epoch_and_go_on_smoothly_past_a_rest_of_epoch_dealt_anew():
    """Every reader at the start of epoch E: E exactly, not 0.999... below it (whatever the sizes); after a
    resume that dealt the rest of an epoch to other readers, a reader going on to the next epoch neither
    jumps nor goes back."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        units = [Unit(f"{k}.parquet", 0, 10, int(size), k, int(size) // 2)
                 for k, size in enumerate(rng.integers(1, 10**7, 7))]
        n_readers, epoch = int(rng.integers(2, 8)), int(rng.integers(1, 4))
        at_start = [{"reader": r, "epoch": epoch, "unit": 0, "part": 0} for r in range(n_readers)]
        assert epochs_read(at_start, units, trial, n_readers, {}) == epoch
    units = [Unit("a.parquet", 0, 1000, 1_000_000, 1, 1_000_000)] + [Unit("a.parquet", i, 100, 100_000, 1, 100_000)
                                                                     for i in range(1, 10)]
    saved = [{"reader": r, "epoch": 3, "unit": r, "part": 0, "consumed": 0, "windows": 0, "carry": []} for r in (0, 1)]
    order = {WORKERS_KEY: 2, "world_size": 1, "training.seed": 1, DEALING_KEY: LARGEST_FIRST}
    positions, _, epoch, _ = rest_of_epoch(units, order, saved, 4)
    whole_before, dealings = epoch + 1, {}
    now = {p["reader"]: dict(p) for p in positions}
    passes = [epochs_read(now.values(), units, 1, 4, dealings, whole_before=whole_before)]
    for reader in range(4):  # each finishes its share of the rest, then starts the next epoch
        now[reader]["unit"] = len(now[reader]["units"])
        passes.append(epochs_read(now.values(), units, 1, 4, dealings, whole_before=whole_before))
        now[reader] = {"reader": reader, "epoch": epoch + 1, "unit": 0, "part": 0}
        assert epochs_read(now.values(), units, 1, 4, dealings, whole_before=whole_before) == pytest.approx(passes[-1])
    assert passes == sorted(passes) and passes[-1] == pytest.approx(epoch + 1)


def test_passes_grow_with_every_batch_of_a_row_group(corpus):
    """A corpus of a few row groups, each read in one part: the passes logged move at every batch,
    not only when a row group is finished."""
    units = list_units(corpus, "text")
    stream = training_stream(units)
    batches = list(stream.epoch_batches(ParquetFileCache(4), 0, 1, 0))
    first_unit = [position for _, _, position in batches if position["unit"] == 0]
    assert len(first_unit) > 2 and {position["part"] for position in first_unit} == {0}
    passes = [epochs_read([position], units, 0, 1, {}) for _, _, position in batches]
    assert 0 < passes[0] and all(a < b for a, b in zip(passes, passes[1:])) and passes[-1] == pytest.approx(1, abs=0.05)


def test_the_rest_of_an_epoch_is_dealt_to_other_readers(corpus, monkeypatch):
    """Two readers stop at different points of epoch 0; three readers take over exactly the units
    neither finished (the two being read from the part they were in), balanced, and read them (their
    documents, not others), resumably, before epoch 1; the passes logged go on from where they were."""
    monkeypatch.setattr(shards, "READ_BYTES", 300)  # several parts per unit
    units = list_units(corpus, "text")
    ds, cache = training_stream(units), ParquetFileCache(4)
    old = assign_units(units, 0, seed=0, n_readers=2, shuffle=True)
    saved = [list(ds.epoch_batches(cache, reader, 2, 0))[n][2] for reader, n in ((0, 5), (1, 40))]
    assert saved[1]["unit"] > 0 and any(p["part"] > 0 for p in saved)
    order = {WORKERS_KEY: 2, "world_size": 1, "training.seed": 0, DEALING_KEY: LARGEST_FIRST}
    positions, (left, gone, added), epoch, _ = rest_of_epoch(units, order, saved, n_readers=3)
    index = {(u.file_key, u.row_group): i for i, u in enumerate(units)}
    finished = {index[(u.file_key, u.row_group)] for p in saved for u in old[p["reader"]][:p["unit"]]}
    being_read = {index[(u.file_key, u.row_group)]: p["part"] for p in saved for u in [old[p["reader"]][p["unit"]]]}
    dealt = [entry for p in positions for entry in p["units"]]
    assert epoch == 0 and left == len(dealt) == len(units) - len(finished) and gone == added == 0
    assert sorted(i for i, *_ in dealt) == sorted(set(range(len(units))) - finished)
    assert all(part == being_read.get(i, 0) for i, part, _ in dealt)
    loads = [sum(bytes_left(units[i], part) for i, part, _ in p["units"]) for p in positions]
    assert max(loads) - min(loads) <= max(u.num_bytes for u in units)
    passes_before = epochs_read(saved, units, 0, 2, {})
    assert epochs_read(positions, units, 0, 3, {}) == pytest.approx(positions[0]["epoch_done"])
    # what was read of the parts read again counts as read: no step back in what is logged
    assert positions[0]["epoch_done"] > 1 - sum(loads) / sum(u.num_bytes for u in units)
    assert 0 < positions[0]["epoch_done"] == pytest.approx(passes_before, abs=0.05)  # nor a jump
    one_reader = list(ds.epoch_batches(cache, 0, 1, 0))[20][2]  # a lone reader: the passes go on exactly
    again = rest_of_epoch(units, {**order, WORKERS_KEY: 1}, [one_reader], n_readers=2)[0]
    assert again[0]["epoch_done"] == pytest.approx(epochs_read([one_reader], units, 0, 1, {}))
    tag_unit = unit_of_tag(units)
    for position in positions:
        rest = list(ds.epoch_batches(cache, position["reader"], 3, 0, start=position))
        assert rest and all(b[2]["units"] == position["units"] for b in rest)
        read = {tag_unit(int(f), int(r)) for x, y, _ in rest
                for f, r in re.findall(rb"<(\d\d)-(\d\d\d)>", window_bytes(x[0], y[0]) + window_bytes(x[1], y[1]))}
        assert read == {i for i, *_ in position["units"]}  # the documents of its units, and only those
        passes = [epochs_read([b[2]], units, 0, 3, {}) for b in rest]
        # from what was read before (and the first batch's windows: parts of 300 bytes are coarse) to about 1
        assert passes == sorted(passes) and position["epoch_done"] < passes[0] < position["epoch_done"] + 0.05
        assert passes[-1] == pytest.approx(1, abs=0.1)
        middle = len(rest) // 2
        again = list(ds.epoch_batches(cache, position["reader"], 3, 0, start=rest[middle][2]))
        assert len(again) == len(rest) - middle - 1
        assert all(torch.equal(a[0], b[0]) for a, b in zip(again, rest[middle + 1:]))
    stream = training_stream(units, positions=positions)
    next_epoch = next(b[2] for b in stream if b[2]["epoch"] == 1)  # reader 0 of 1: then the usual dealing
    assert "units" not in next_epoch


def test_the_rest_of_an_epoch_keeps_the_tokens_its_stopped_readers_carried(tmp_path, monkeypatch):
    """The stream's tokens before the part a stopped reader was in (its previous part's tail, not yet
    a target) go on before that part in the stream of the reader that takes it over, once."""
    monkeypatch.setattr(shards, "READ_BYTES", 300)
    letters = np.random.default_rng(0).choice(list("abcdefghijklmnopqrstuvwxyz "), size=(3, 40, 60))
    for f in range(3):  # text that does not repeat: a carry read twice shows
        write_parquet(tmp_path / f"shard-{f}.parquet", ["".join(doc) for doc in letters[f]], rows_per_group=8)
    units = list_units(tmp_path, "text")
    ds, cache = training_stream(units), ParquetFileCache(4)
    # (carries of more than a separator: a separator alone follows every document, and would be seen "twice")
    saved = [next(p for _, _, p in list(ds.epoch_batches(cache, reader, 3, 0))[n:] if len(p["carry"]) > 1)
             for reader, n in ((0, 5), (1, 12), (2, 20))]
    order = {WORKERS_KEY: 3, "world_size": 1, "training.seed": 0, DEALING_KEY: LARGEST_FIRST}
    positions = rest_of_epoch(units, order, saved, n_readers=2)[0]
    in_order = training_stream(units, shuffle=False)  # the stream as it is
    streams = [b"".join(bytes(row.tolist()) for x, _, _ in in_order.epoch_batches(cache, p["reader"], 2, 0, start=p)
                        for row in x) for p in positions]
    old = assign_units(units, 0, seed=0, n_readers=3, shuffle=True)
    for p in saved:
        part = next(read_unit_tokens(cache, old[p["reader"]][p["unit"]], "text", "train", Holdout(0.2, 0),
                                     BYTES, p["part"]))
        assert sum(bytes(p["carry"]) + bytes(part[:8].tolist()) in stream for stream in streams) == 1
        assert not any(bytes(p["carry"]) * 2 + bytes(part[:8].tolist()) in stream for stream in streams)  # once


def test_the_rest_of_an_epoch_goes_on_over_shards_added_removed_and_rewritten(tmp_path, monkeypatch, capsys):
    """After a checkpoint a shard is removed, one rewritten and one added: the readers go on with the
    units of the epoch that no reader finished and that are still there (from the part they were in),
    and the new units (whole), each read once, mixed; the next epoch deals every unit."""
    monkeypatch.setattr(shards, "READ_BYTES", 300)
    corpus = make_corpus(tmp_path / "data", n_files=4, docs_per_file=32, rows_per_group=8, doc_len=60)
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}, "training": {"seed": 0}})
    units = list_units(corpus, "text")
    ds, cache = training_stream(units), ParquetFileCache(4)
    saved = [next(p for _, _, p in list(ds.epoch_batches(cache, reader, 2, 0))[n:] if p["part"] > 0)
             for reader, n in ((0, 5), (1, 30))]
    cache.close()
    old = assign_units(units, 0, seed=0, n_readers=2, shuffle=True)
    unfinished = {(Path(u.path).name, u.row_group): p["part"] * (k == p["unit"])
                  for p in saved for k, u in enumerate(old[p["reader"]]) if k >= p["unit"]}
    assert len(unfinished) < len(units) and any(unfinished.values())
    order = data_order(cfg, units, 2)
    (corpus / "shard-1.parquet").unlink()
    write_parquet(corpus / "shard-2.parquet", [f"<02-{r:03d}>" + "klmnopqrst" * 7 for r in range(24)], 8)
    make_corpus(tmp_path / "more", n_files=5, docs_per_file=16, rows_per_group=8, doc_len=60)
    (tmp_path / "more/shard-4.parquet").rename(corpus / "shard-4.parquet")
    now = list_units(corpus, "text")
    positions, consumed = resume_point(cfg, now, 2, 1, order, saved, 35)
    kept = {key: part for key, part in unfinished.items() if key[0] in ("shard-0.parquet", "shard-3.parquet")}
    new = {(Path(u.path).name, u.row_group): 0 for u in now
           if Path(u.path).name in ("shard-2.parquet", "shard-4.parquet")}
    dealt = {(Path(now[i].path).name, now[i].row_group): part for p in positions for i, part, _ in p["units"]}
    assert consumed == 0 and dealt == {**kept, **new} and len(dealt) == sum(len(p["units"]) for p in positions)
    out = capsys.readouterr().out
    assert (f"the {len(unfinished)} of {len(units)} (file, row group) units that epoch 0 has not finished "
            f"({len(unfinished) - len(kept)} of them gone now) and the {len(new)} new or rewritten ones (read whole) "
            f"are dealt anew to 2 readers") in out
    is_new = [[(Path(now[i].path).name, now[i].row_group) in new for i, *_ in p["units"]] for p in positions]
    assert any(a and not b for flags in is_new for a, b in zip(flags, flags[1:]))  # new text mixed in, not last
    stream = training_stream(now, positions=positions)
    with ParquetFileCache(4) as cache:
        for position in positions:
            rest = list(stream.epoch_batches(cache, position["reader"], 2, 0, start=position))
            read = {(f, int(r) // 8) for x, y, _ in rest
                    for f, r in re.findall(rb"<(\d\d)-(\d\d\d)>", window_bytes(x[0], y[0]) + window_bytes(x[1], y[1]))}
            assert read == {(f"{int(Path(now[i].path).stem[-1]):02d}".encode(), now[i].row_group)
                            for i, *_ in position["units"]}  # the documents of its units, and only those
    next_epoch = [b[2] for b in itertools.islice(stream, 400) if b[2]["epoch"] == 1]
    assert next_epoch and "units" not in next_epoch[0]  # then the usual dealing, of every unit


def test_what_was_read_of_a_pool_counts_only_its_units_still_there():
    old = [Unit(f"{k}.parquet", 0, 10, 1000, k, 1000) for k in range(6)]
    order = {WORKERS_KEY: 0, "world_size": 1, "training.seed": 0, DEALING_KEY: EVEN_TEXT}
    pool = assign_units(old, 0, 0, 1, shuffle=True)[0][:3]  # 90% of its windows used: 900 bytes of each unit read
    position = {"reader": 0, "epoch": 0, "unit": 0, "part": 0, "consumed": 9, "windows": 10, "pooled": 3, "carry": []}
    read_again = lambda now: rest_of_epoch(now, order, [position], 1, old=old)[3]  # noqa: E731
    assert read_again(old) == pytest.approx(2700)
    assert read_again([unit for unit in old if unit != pool[0]]) == pytest.approx(1800)
    assert read_again([unit for unit in old if unit not in pool[1:]]) == pytest.approx(900)


def test_where_no_unit_of_the_epoch_is_left_the_next_one_starts(corpus, capsys):
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}, "training": {"seed": 0}})
    units = list_units(corpus, "text")
    read = assign_units(units, 0, 0, 1, shuffle=True)[0][:5]
    saved = [{"reader": 0, "epoch": 0, "unit": 5, "part": 0, "consumed": 1, "windows": 4, "carry": []}]
    positions, _ = resume_point(cfg, read, 0, 1, data_order(cfg, units, 0), saved, 7)  # the other units are gone
    assert [p["units"] for p in positions] == [[]]
    assert (f"no (file, row group) unit of epoch 0 is left to read (the {len(units) - 5} it had not finished are gone "
            f"now): training goes on with epoch 1") in capsys.readouterr().out
    stream = training_stream(read, val_fraction=0.0, positions=positions)
    assert next(iter(stream))[2]["epoch"] == 1


def test_a_checkpoint_maps_the_units_its_data_order_lists(tmp_path):
    units = [Unit("a.parquet", 3, 10, 1000, 2**64 - 1, 900), Unit("b.parquet", 0, 7, 2**40, 5, 2**39)]
    order = data_order(Config(), units, 0)
    torch.save({"data": {"order": order}}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True, mmap=True)["data"]["order"]
    assert [dataclasses.replace(unit, path="") for unit in units] == saved_units(loaded)


def test_the_rest_of_an_epoch_skips_readers_ahead_and_counts_missing_ones_whole(corpus):
    units = list_units(corpus, "text")
    order = {WORKERS_KEY: 3, "world_size": 1, "training.seed": 5, DEALING_KEY: LARGEST_FIRST}
    old = assign_units(units, 2, seed=5, n_readers=3, shuffle=True)
    index = {(u.file_key, u.row_group): i for i, u in enumerate(units)}
    saved = [{"reader": 0, "epoch": 3, "unit": 1, "part": 0, "consumed": 1, "carry": []},  # ahead: done with 2
             {"reader": 1, "epoch": 2, "unit": 1, "part": 0, "consumed": 1, "carry": []}]  # reader 2: none saved
    positions, (left, _, _), epoch, read_again = rest_of_epoch(units, order, saved, n_readers=2)
    expected = {index[(u.file_key, u.row_group)] for u in old[1][1:] + old[2]}
    assert epoch == 2 and left == len(expected) and {i for p in positions for i, *_ in p["units"]} == expected
    # reader 0's first unit of epoch 3, which is dealt anew after epoch 2; of the part reader 1 is in,
    # without a count of its windows (positions of older versions), no share is known to be read
    ahead = assign_units(units, 3, seed=5, n_readers=3, shuffle=True)[0][0].num_bytes
    assert read_again == ahead
    further = [{**saved[0], "epoch": 4}, saved[1]]  # epoch 3 finished too: its whole share is read again
    share_3 = sum(u.num_bytes for u in assign_units(units, 3, seed=5, n_readers=3, shuffle=True)[0])
    first_of_4 = assign_units(units, 4, seed=5, n_readers=3, shuffle=True)[0][0].num_bytes
    assert rest_of_epoch(units, order, further, n_readers=2)[3] == share_3 + first_of_4
    with_windows = [{**saved[1], "windows": 4}]  # reader 1 had used 1 of its part's 4 windows
    read_again = rest_of_epoch(units, order, saved[:1] + with_windows, n_readers=2)[3]
    assert read_again == pytest.approx(ahead + pool_read([old[1][1]], with_windows[0])) and read_again > ahead


def test_val_fraction_leaves_the_data_order_while_validation_has_its_own_folder(tmp_path):
    train_dir = make_corpus(tmp_path / "train", n_files=2)
    raw = {"dataset": {"parquet_dir": str(train_dir), "val_parquet_dir": str(tmp_path / "val")}}
    units = list_units(train_dir, "text")
    order = data_order(Config.from_dict(raw), units, 0)
    raw["dataset"]["val_fraction"] = 0.5  # splits nothing while validation has its own folder
    without_units = lambda order: {k: v for k, v in order.items() if k != UNITS}  # noqa: E731 (a tensor)
    assert without_units(data_order(Config.from_dict(raw), units, 0)) == without_units(order)
    assert "dataset.val_fraction" not in order
    del raw["dataset"]["val_parquet_dir"]
    assert data_order(Config.from_dict(raw), units, 0)["dataset.val_fraction"] == 0.5


def test_changed_shards_are_told_by_their_counts(corpus):
    cfg, units = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}}), list_units(corpus, "text")
    order = data_order(cfg, units, 0)
    assert order_changes(order, data_order(cfg, units, 0)) == ([], [])
    fewer = data_order(cfg, units[:-1], 0)
    assert order_changes(order, fewer)[1] == [f"the shards: 3 files, 15 row groups, 120 rows, "
                                              f"{sum(u.num_bytes for u in units) / 2**20:,.1f} MiB -> 3 files, 14 row "
                                              f"groups, 112 rows, {sum(u.num_bytes for u in units[:-1]) / 2**20:,.1f} MiB"]
    rewritten = data_order(cfg, [dataclasses.replace(units[0], file_key=1), *units[1:]], 0)
    assert order_changes(order, rewritten)[1] == [f"the shards renamed, moved or rewritten: {order[SHARDS_SEEN]}"]
    before_0_4_3 = {k: v for k, v in order.items() if k != SHARDS_SEEN}  # its fingerprint only
    assert order_changes(before_0_4_3, fewer) == ([SHARDS], [f"{SHARDS}: {order[SHARDS]!r} -> {fewer[SHARDS]!r}"])
    assert order_changes(before_0_4_3, order) == ([], [])


def test_the_same_readers_laid_out_otherwise_continue_where_they_stopped(corpus, capsys):
    """2 processes x 1 worker, then 1 process x 2 workers (and back, and 0 workers then 1): reader r
    is the same reader, so every position is kept; only another number of readers deals anew."""
    cfg, units = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}}), list_units(corpus, "text")
    saved = [{"reader": r, "epoch": r, "unit": 1 + r, "part": 0, "consumed": 3 + r, "carry": [1, 2]} for r in (0, 1)]
    two_processes = data_order(cfg, units, 1, world_size=2)
    assert resume_point(cfg, units, 2, 1, two_processes, saved, 6) == (saved, 12)
    assert "still 2 readers (processes x workers), each continues where it stopped" in capsys.readouterr().out
    one_process = data_order(cfg, units, 2, world_size=1)
    assert resume_point(cfg, units, 1, 2, one_process, saved, 12) == (saved, 6)
    no_workers = data_order(cfg, units, 0)
    assert resume_point(cfg, units, 1, 1, no_workers, saved[:1], 5) == (saved[:1], 5)
    dealt, _ = resume_point(cfg, units, 3, 1, one_process, saved, 12)
    out = capsys.readouterr().out
    assert len(dealt) == 3 and all("units" in p for p in dealt) and "dealt anew" in out
    assert "; dataloader.num_workers=2 would keep its 2 readers, each continuing where it stopped): " in out
    resume_point(cfg, units, 3, 1, {**one_process, "training.seed": 7}, saved, 12)  # another seed too: no such hint
    assert "would keep" not in capsys.readouterr().out
    resume_point(cfg, units, 2, 1, no_workers, saved[:1], 5)  # from the process's own reader (no workers)
    assert "; dataloader.num_workers=0 would keep its 1 reader, each continuing where it stopped): " in (
        capsys.readouterr().out)


def test_a_checkpoint_that_shuffled_within_each_unit_deals_the_rest_of_its_epoch_anew(corpus, capsys):
    """Before 0.4.13 windows were shuffled within each unit: a position there is not one in a pool of
    units. The units its readers had not finished are read on, pooled, from the parts they were in."""
    cfg, units = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}}), list_units(corpus, "text")
    saved = [{"reader": 0, "epoch": 1, "unit": 3, "part": 0, "consumed": 2, "windows": 9, "carry": [1, 2]}]
    older = {k: v for k, v in data_order(cfg, units, 0).items() if k != POOL_KEY}
    [position], consumed = resume_point(cfg, units, 0, 1, older, saved, 12)
    assert (consumed, position["epoch"], len(position["units"]), position["carry"]) == (0, 1, len(units) - 3, [1, 2])
    assert ("WARNING: the data order changes on this resume (windows are now shuffled across a reader's small (file, "
            "row group) units, not within each): the 12 of 15 (file, row group) units that epoch 1 has not finished "
            "are dealt anew to 1 reader") in capsys.readouterr().out
    assert resume_point(cfg, units, 0, 1, data_order(cfg, units, 0), saved, 12) == (saved, 12)  # this version's


@pytest.mark.parametrize("change", [{"val_fraction": 0.2}, {"text_column": "body"}])
def test_other_documents_start_every_reader_at_the_epoch_after_the_furthest(corpus, capsys, change):
    """Another split or text column makes other units: their parts cannot be dealt on, so every
    reader starts a fresh shuffle, numbered after every epoch read (not one of them again)."""
    cfg, units = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}}), list_units(corpus, "text")
    saved = [{"reader": r, "epoch": 2 + r, "unit": 1, "part": 0, "consumed": 3, "carry": [1, 2]} for r in (0, 1)]
    order = data_order(cfg, units, 2)
    changed = Config.from_dict({"dataset": {"parquet_dir": str(corpus), **change}})
    positions, consumed = resume_point(changed, units, 2, 1, order, saved, 12)
    assert consumed == 0 and [(p["reader"], p["epoch"], p["unit"], p["part"], p["carry"]) for p in positions] == \
        [(0, 4, 0, 0, []), (1, 4, 0, 0, [])]
    assert "training continues at the start of a new pass over the data, freshly shuffled" in capsys.readouterr().out


# Resumes that change how the data is read: train.py end to end

def test_changing_the_data_order_on_resume_warns(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(config)]) == 0
    capsys.readouterr()
    assert train.main(["--config", str(config), "training.resume_from_checkpoint=latest",
                       "training.max_iters=3", "training.block_size=8"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the data order changes" in out and "training.block_size: 16 -> 8" in out


def test_fewer_loader_workers_on_resume_read_the_rest_of_the_epoch(tmp_path, corpus, capsys, monkeypatch):
    """2 workers for 20 steps, then one process without workers: it reads on the units that neither
    worker had finished (from the pools they were in: here a unit each), not a new shuffle of all of them."""
    monkeypatch.setattr(data, "POOL_BYTES", 1)
    config = write_config(tmp_path, corpus, max_iters=20, checkpoint_freq=20, test_freq=100, keep_last_n=0)
    assert train.main(["--config", str(config), "dataloader.num_workers=2"]) == 0
    capsys.readouterr()
    assert train.main(["--config", str(config), "training.resume_from_checkpoint=latest", "training.max_iters=24",
                       "training.checkpoint_freq=24", "dataloader.num_workers=0"]) == 0
    out = capsys.readouterr().out
    assert "dataloader.num_workers (effective): 2 -> 0" in out
    left, n_units = map(int, re.search(r"the (\d+) of (\d+) \(file, row group\) units that epoch 0 has not "
                                       r"finished are dealt anew to 1 reader,", out).groups())
    read_twice = float(re.search(r"the pools being read start again, so about [\d.,]+ (?:[KM]B|bytes?) "
                                 r"\(([\d.]+)% of the epoch\) is read twice\n", out)[1])
    assert 0 < read_twice < 100 * 2 / n_units  # at most the two units the workers were in
    run = only_run(tmp_path / "ck")
    before = load_checkpoint(run / "checkpoint_20.pt").data_positions
    [after] = load_checkpoint(run / "checkpoint_24.pt").data_positions
    assert n_units - left == sum(p["unit"] for p in before) > 0  # the units the two workers had finished
    assert after["epoch"] == 0 and len(after["units"]) == left
    assert sorted(part for _, part, _ in after["units"] if part) == sorted(p["part"] for p in before if p["part"])


def test_another_batch_size_continues_the_same_windows(tmp_path, corpus, capsys):
    """Batches of 4, 4, then 2, 2 read the windows that batches of 4, 4, 4 read."""
    for name, steps in (("resumed", 2), ("straight", 3)):
        config = write_config(tmp_path, corpus, f"{name}.yaml", checkpoint_dir=str(tmp_path / name), max_iters=steps,
                              checkpoint_freq=1, test_freq=100)
        assert train.main(["--config", str(config)]) == 0
    capsys.readouterr()
    assert train.main(["--config", str(tmp_path / "resumed.yaml"), "training.resume_from_checkpoint=latest",
                       "training.max_iters=4", "training.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "data order" not in out and "WARNING: the validation batches change" in out  # the first 2 x 4, now 2 x 2
    resumed = load_checkpoint(only_run(tmp_path / "resumed") / "checkpoint_4.pt")
    straight = load_checkpoint(only_run(tmp_path / "straight") / "checkpoint_3.pt")
    assert resumed.data_positions == straight.data_positions and resumed.tokens == straight.tokens


def test_a_second_resume_after_a_changed_data_order_continues_exactly(tmp_path, corpus, capsys):
    """A resume that changes the block size deals the rest of the epoch to the readers anew. A
    checkpoint written before one of them handed over a batch (here: one step, two workers) must
    still start it there, as the same run without that checkpoint does."""
    common = dict(max_iters=2, checkpoint_freq=1, test_freq=100, keep_last_n=0)
    workers = "dataloader.num_workers=2"
    for name in ("once", "twice"):
        config = write_config(tmp_path, corpus, f"{name}.yaml", checkpoint_dir=str(tmp_path / name), **common)
        assert train.main(["--config", str(config), workers]) == 0
    smaller = ["training.block_size=8", "training.max_iters=5", workers]
    for name in ("once", "twice"):
        assert train.main(["--config", str(tmp_path / f"{name}.yaml"), *smaller,
                           "training.resume_from_checkpoint=latest"]) == 0
    capsys.readouterr()
    step_3 = only_run(tmp_path / "twice") / "checkpoint_3.pt"  # one step after the change
    assert train.main(["--config", str(tmp_path / "twice.yaml"), *smaller,
                       f"training.resume_from_checkpoint={step_3}"]) == 0
    assert "WARNING" not in capsys.readouterr().out
    once, twice = (load_checkpoint(only_run(tmp_path / name) / "checkpoint_5.pt") for name in ("once", "twice"))
    assert sorted(p["epoch"] for p in twice.data_positions) == [0, 0] and all("units" in p for p in twice.data_positions)
    assert once.data_positions == twice.data_positions
    assert all(torch.equal(once.model[k], twice.model[k]) for k in once.model)


def test_a_checkpoint_dealt_in_shuffled_order_resumes_with_the_rest_of_its_epoch(corpus, capsys):
    """Before 0.4.8 units were dealt in their shuffled turn: a resume deals the units that epoch had not
    finished, found by that dealing, with the new one (one reader: the same dealing, no change)."""
    cfg, units = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}}), list_units(corpus, "text")
    old_order = {k: v for k, v in data_order(cfg, units, 2).items() if k != DEALING_KEY}
    [(epoch, old)] = itertools.islice(((e, dealt) for e in range(10) if (dealt := assign_units(
        units, e, cfg.training.seed, 2, shuffle=True, way=IN_SHUFFLED_ORDER)) != assign_units(
        units, e, cfg.training.seed, 2, shuffle=True)), 1)  # an epoch the two dealings differ in
    saved = [{"reader": r, "epoch": epoch, "unit": 1 + 2 * r, "part": 0, "consumed": 0, "carry": []} for r in (0, 1)]
    dealt, _ = resume_point(cfg, units, 2, 1, old_order, saved, 12)
    assert (f"WARNING: the data order changes on this resume (units dealt to the readers: '{IN_SHUFFLED_ORDER}' -> "
            f"'{EVEN_TEXT}'): the ") in capsys.readouterr().out
    index = {(u.file_key, u.row_group): i for i, u in enumerate(units)}
    unfinished = {index[(u.file_key, u.row_group)] for r, reader in enumerate(old) for u in reader[1 + 2 * r:]}
    assert sorted(i for p in dealt for i, *_ in p["units"]) == sorted(unfinished)
    one_reader = {k: v for k, v in data_order(cfg, units, 0).items() if k != DEALING_KEY}
    assert resume_point(cfg, units, 0, 1, one_reader, saved[:1], 5) == (saved[:1], 5)
    assert capsys.readouterr().out == ""


def test_a_checkpoint_from_before_0_4_1_resumes_exactly_with_the_documents_its_folders_named(tmp_path, corpus, capsys):
    """Before 0.4.1 the data order named the folders instead of "documents trained on": without a
    validation folder the run trained on the split's training documents, with one on all of them."""
    cfg, units = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}}), list_units(corpus, "text")
    saved = [{"reader": r, "epoch": 2, "unit": 1, "part": 0, "consumed": 0, "carry": []} for r in (0, 1)]
    for cfg in (cfg, Config.from_dict({"dataset": {"parquet_dir": str(corpus), "val_parquet_dir": str(tmp_path)}})):
        before_0_4_1 = {**{k: v for k, v in data_order(cfg, units, 2).items() if k != "documents trained on"},
                        "dataset.parquet_dir": str(corpus), "dataset.val_parquet_dir": cfg.dataset.val_parquet_dir}
        assert resume_point(cfg, units, 2, 1, before_0_4_1, saved, 12) == (saved, 12)
        assert capsys.readouterr().out == ""


def test_a_checkpoint_dealt_by_all_columns_bytes_resumes_exactly_where_the_text_deals_alike(tmp_path, corpus,
                                                                                              capsys):
    """From 0.4.8 to 0.4.11 units were dealt by the bytes of all their columns. Shards of text alone deal
    alike: the resume goes on as it was. A file with a heavy other column was dealt alone to one reader:
    the resume deals the units that epoch had not finished, found by that dealing, by their text."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    cfg, units = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}}), list_units(corpus, "text")
    saved = [{"reader": r, "epoch": 2, "unit": 1, "part": 0, "consumed": 0, "carry": []} for r in (0, 1)]
    before_0_4_12 = {**data_order(cfg, units, 2), DEALING_KEY: LARGEST_FIRST}
    assert resume_point(cfg, units, 2, 1, before_0_4_12, saved, 12) == (saved, 12)
    assert capsys.readouterr().out == ""
    (tmp_path / "mixed").mkdir()
    for name, columns in (("h", {"html": [f"<p>{i}" * 3000 for i in range(4)]}), ("a", {}), ("b", {}), ("c", {})):
        pq.write_table(pa.table({"text": [f"{name} {i} " * 100 for i in range(4)], **columns}),
                       tmp_path / "mixed" / f"{name}.parquet")
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(tmp_path / "mixed")}})
    units = list_units(tmp_path / "mixed", "text")
    old = assign_units(units, 2, cfg.training.seed, 2, shuffle=True, way=LARGEST_FIRST)
    assert sorted(map(len, old)) == [1, 3]  # h, with its html, alone
    saved = [{"reader": r, "epoch": 2, "unit": 2 if len(old[r]) == 3 else 0, "part": 0, "consumed": 0, "carry": []}
             for r in (0, 1)]
    dealt, _ = resume_point(cfg, units, 2, 1, {**data_order(cfg, units, 2), DEALING_KEY: LARGEST_FIRST}, saved, 12)
    assert (f"WARNING: the data order changes on this resume (units dealt to the readers: '{LARGEST_FIRST}' -> "
            f"'{EVEN_TEXT}'): the 2 of 4 ") in capsys.readouterr().out
    index = {(u.file_key, u.row_group): i for i, u in enumerate(units)}
    unfinished = {index[(u.file_key, u.row_group)] for r, reader in enumerate(old) for u in reader[saved[r]["unit"]:]}
    assert sorted(i for p in dealt for i, *_ in p["units"]) == sorted(unfinished)


def test_the_same_folder_written_another_way_is_the_same_data(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path)]) == 0
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=3",
                       f"dataset.parquet_dir={corpus}/"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "WARNING" not in out


def test_shards_changed_in_the_same_folder_change_the_data_order(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2, checkpoint_freq=2)
    assert train.main(["--config", str(path)]) == 0
    (corpus / "shard-0.parquet").unlink()  # where the validation batches came from (file order)
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=3"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the data order changes on this resume (the shards: 3 files, 15 row groups, 120 rows, " in out
    assert " -> 2 files, 10 row groups, 80 rows, " in out
    assert (f"WARNING: the validation batches change on this resume (dataset.parquet_dir {str(corpus)!r}: its "
            f"shards changed): no document trained on is held out now (documents are held out by their text), but "
            f"the batches are taken from the shards as they are now, so losses from here on are not comparable") in out
    assert "units that epoch 0 has not finished (5 of them gone now) are dealt anew to 1 reader" in out
    # the epoch goes on over the units still there, and the passes logged go on from where they were
    [run] = run_dirs(tmp_path)
    epochs = [r["epochs"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epochs" in r]
    assert len(epochs) == 3 and 0 < epochs[1] < epochs[2] < epochs[1] + 0.2


def test_other_shards_since_a_checkpoint_that_did_not_list_its_units_start_a_new_pass(corpus, capsys):
    cfg, units = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}}), list_units(corpus, "text")
    saved = [{"reader": 0, "epoch": 2, "unit": 1, "part": 0, "consumed": 3, "carry": [1, 2]}]
    before_0_5_1 = {k: v for k, v in data_order(cfg, units, 0).items() if k != UNITS}
    positions, _ = resume_point(cfg, units[:-1], 0, 1, before_0_5_1, saved, 12)
    assert [(p["epoch"], p["unit"], "units" in p) for p in positions] == [(3, 0, False)]
    assert "training continues at the start of a new pass over the data" in capsys.readouterr().out


def test_a_rest_whose_old_units_are_all_gone_still_deals_the_new_ones():
    """Every unfinished unit gone, but shards added: the new units are dealt, not 'training goes on with epoch 1'."""
    said = rest_dealt(10, 3, 3, 2, 0, 2, 0.0, 0.0)
    assert "no (file, row group) unit of epoch 0 is left" not in said
    assert "the 3 of 10 (file, row group) units that epoch 0 has not finished (gone now) and the 2 new or " \
           "rewritten ones (read whole) are dealt anew to 2 readers" in said
    assert rest_dealt(10, 3, 3, 0, 0, 2, 0.0, 0.0).startswith("no (file, row group) unit of epoch 0 is left")


def test_no_workers_hint_where_no_count_keeps_the_saved_readers_over_the_processes(corpus, capsys):
    """3 saved readers cannot be laid out over 2 processes: no 'num_workers=... would keep' hint."""
    cfg, units = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}}), list_units(corpus, "text")
    saved = [{"reader": r, "epoch": 0, "unit": 1, "part": 0, "consumed": 0, "carry": []} for r in range(3)]
    resume_point(cfg, units, 1, 2, data_order(cfg, units, 3), saved, 12)
    out = capsys.readouterr().out
    assert "dealt anew to 2 readers" in out and "would keep" not in out


@pytest.mark.parametrize("missing, split", [("dataset.split_seed", {"split_seed": 7}),
                                            ("dataset.split_by", {"split_by": "position"})])
def test_a_checkpoint_from_before_the_split_settings_resumes_exactly_with_the_split_it_used(corpus, capsys, missing,
                                                                                            split):
    """Before 0.4.6 the split's seed was training.seed; before 0.5.0 documents were split by place."""
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(corpus), **split}, "training": {"seed": 7}})
    units = list_units(corpus, "text")
    saved = [{"reader": 0, "epoch": 1, "unit": 2, "part": 0, "consumed": 1, "carry": []}]
    older = {k: v for k, v in data_order(cfg, units, 0).items() if k != missing}
    assert resume_point(cfg, units, 0, 1, older, saved, 9) == (saved, 9)
    assert capsys.readouterr().out == ""


def test_passes_count_the_whole_pool_of_small_units_a_reader_is_in():
    """A reader that used 9 of the 10 windows of a pool of 3 small units (of 6 alike) has read 0.45 of a pass."""
    units = [Unit(f"{k}.parquet", 0, 10, 1000, k, 1000) for k in range(6)]
    position = {"reader": 0, "epoch": 0, "unit": 0, "part": 0, "consumed": 9, "windows": 10, "pooled": 3}
    assert epochs_read([position], units, 0, 1, {}) == pytest.approx(0.45)
    assert epochs_read([{**position, "epoch": 2, "unit": 3}], units, 0, 1, {}) == pytest.approx(2.95)


def test_a_reader_dealt_nothing_of_the_rest_of_an_epoch_has_finished_it():
    """One unit left of the epoch, two readers: the one dealt nothing counts as through the epoch, and
    once the other is through too, the passes are whole."""
    units = [Unit(f"{k}.parquet", 0, 10, 1000, k, 1000) for k in range(4)]
    order = {WORKERS_KEY: 0, "world_size": 1, "training.seed": 0, DEALING_KEY: EVEN_TEXT}
    saved = [{"reader": 0, "epoch": 1, "unit": 3, "part": 0, "consumed": 0, "windows": 4, "carry": []}]
    positions, _, epoch, _ = rest_of_epoch(units, order, saved, 2)
    assert sorted(len(p["units"]) for p in positions) == [0, 1] and epoch == 1
    finished = [{**p, "unit": len(p["units"])} for p in positions]
    assert epochs_read(finished, units, 0, 2, {}, whole_before=2) == pytest.approx(2.0)


def test_a_second_change_of_readers_deals_on_the_units_left_of_the_rest_dealt_before(corpus):
    """A rest of an epoch dealt to 3 readers, each 1 unit into its share; then 2 readers: they get exactly
    the units of those shares not finished, not the ones a fresh dealing of the epoch would name."""
    units = list_units(corpus, "text")
    saved = [{"reader": r, "epoch": 0, "unit": 2, "part": 0, "consumed": 0, "carry": []} for r in range(2)]
    order = {WORKERS_KEY: 2, "world_size": 1, "training.seed": 0, DEALING_KEY: EVEN_TEXT}
    first = rest_of_epoch(units, order, saved, 3)[0]
    on = [{**p, "unit": 1, "part": 0} for p in first]
    assert all(len(p["units"]) > 1 for p in on)
    again, (left, gone, added), epoch, _ = rest_of_epoch(units, {**order, WORKERS_KEY: 3}, on, 2)
    expected = sorted(i for p in on for i, *_ in p["units"][1:])
    assert epoch == 0 and sorted(i for p in again for i, *_ in p["units"]) == expected and left == len(expected)


def test_a_checkpoint_without_its_readers_count_starts_a_new_pass_instead_of_failing(corpus, capsys):
    cfg, units = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}}), list_units(corpus, "text")
    saved = [{"reader": 0, "epoch": 1, "unit": 2, "part": 0, "consumed": 1, "carry": []}]
    older = {k: v for k, v in data_order(cfg, units, 0).items() if k not in (WORKERS_KEY, "world_size")}
    positions, consumed = resume_point(cfg, units, 0, 1, older, saved, 9)
    assert consumed == 0 and [(p["epoch"], p["unit"], "units" in p) for p in positions] == [(2, 0, False)]
    assert "training continues at the start of a new pass over the data" in capsys.readouterr().out
