import collections
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

import data
import shards
from config import Config
from conftest import ROOT, make_corpus, write_parquet
from data import ParquetBatches, read_unit_tokens
from readers import assign_units
from shards import DataError, Holdout, ParquetFileCache, list_units
from tokenizer import ByteTokenizer, HFTokenizer

BYTES = ByteTokenizer()


@pytest.fixture(params=["bytes", "bpe"])
def tokenizer(request, bpe_json):
    """The tests that take it run with byte tokens and with a byte-level BPE."""
    return BYTES if request.param == "bytes" else HFTokenizer(bpe_json, "bpe")


def batches_of(units, split="train", T=16, B=2, seed=0, val_fraction=0.2, max_cached=4, tokenizer=BYTES, split_seed=0):
    return ParquetBatches(units, split, T, B, seed, Holdout(val_fraction, split_seed), "text", max_cached, tokenizer,
                          shuffle=split == "train")


def split_stream(units, split, split_seed=0, val_fraction=0.2, tokenizer=BYTES):
    cache = ParquetFileCache(8)
    holdout = Holdout(val_fraction, split_seed)
    return np.concatenate([part for u in units for part in read_unit_tokens(cache, u, "text", split, holdout,
                                                                            tokenizer)])


def window_text(x, y, tokenizer):
    return text_of(torch.cat([x, y[-1:]]).tolist(), tokenizer)


def text_of(tokens, tokenizer):
    return tokenizer.decode(tokens).encode()


def test_stream_joins_documents_with_the_separator(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["héllo", None, "", "wörld"], 4)
    units = list_units(tmp_path, "text")
    tokens = split_stream(units, "train", val_fraction=1e-9)
    assert bytes(tokens) == "héllo".encode() + bytes([BYTES.separator]) + "wörld".encode() + bytes([BYTES.separator])


def test_invalid_utf8_bytes_are_taken_as_they_are(tmp_path):
    write_parquet(tmp_path / "a.parquet", [b"ok\xff\xfe"], 4, type_=pa.binary())
    tokens = split_stream(list_units(tmp_path, "text"), "train", val_fraction=1e-9)
    assert bytes(tokens) == b"ok\xff\xfe\x00"


def test_an_epoch_that_deals_a_reader_less_than_a_batch_is_skipped(tmp_path):
    # seed 18, 2 readers: reader 0 gets a.parquet in epochs 0 and 2, the two small files (less than a
    # batch together) in epoch 1
    write_parquet(tmp_path / "a.parquet", ["x" * 50] * 20, 20)
    write_parquet(tmp_path / "b.parquet", ["b" * 30], 4)
    write_parquet(tmp_path / "c.parquet", ["c" * 30], 4)
    units = list_units(tmp_path, "text")
    assert [len(assign_units(units, epoch, 18, 2, shuffle=True)[0]) for epoch in range(3)] == [1, 2, 1]
    ds = ParquetBatches(units, "all", 16, 4, 18, Holdout(0.2, 1), "text", 4, BYTES, rank=0, world_size=2, shuffle=True)
    epochs = [position["epoch"] for _, _, position in itertools.islice(ds, 40)]
    assert sorted(set(epochs)) == [0, 2, 3]
    for rank in (0, 1):  # however many such epochs come in a row later on (4 did for each reader here)
        ds = ParquetBatches(units, "all", 16, 4, 18, Holdout(0.2, 1), "text", 4, BYTES, rank=rank, world_size=2,
                            shuffle=True)
        assert len(list(itertools.islice(ds, 1500))) == 1500


@pytest.mark.parametrize("read_bytes", [8 << 20, 300])  # one part per row group, or several
def test_epoch_windows_partition_the_reader_stream(corpus, tokenizer, read_bytes, monkeypatch):
    monkeypatch.setattr(shards, "READ_BYTES", read_bytes)
    units = list_units(corpus, "text")
    T, B = 16, 2
    ds = batches_of(units, T=T, B=B, tokenizer=tokenizer)
    dropped = 0
    for reader in range(2):
        mine = assign_units(units, 0, 0, 2, shuffle=True)[reader]
        stream = split_stream(mine, "train", tokenizer=tokenizer)
        got = collections.Counter()
        n = 0
        for x, y, _ in ds.epoch_batches(ParquetFileCache(4), reader, 2, epoch=0):
            assert x.shape == (B, T) and torch.equal(x[:, 1:], y[:, :-1])
            for row in x:
                got.update(row.tolist())
                n += 1
        # the windows' inputs are stream[kT:(k+1)T] for consecutive k: a partition of the
        # stream up to a tail shorter than one batch of windows plus one window
        assert n * T > len(stream) - (B + 1) * T - 1
        assert not (got - collections.Counter(stream[: n * T + T].tolist()))
        dropped += len(stream) - n * T
    assert dropped < 2 * ((B + 1) * T + 1)


def test_training_windows_are_shuffled_within_a_part_and_anew_each_epoch(corpus):
    [unit] = list_units(corpus, "text")[:1]
    T, B = 8, 2

    def windows(split, epoch):
        batches = batches_of([unit], split=split, T=T, B=B).epoch_batches(ParquetFileCache(4), 0, 1, epoch)
        return [tuple(row.tolist()) for x, _, _ in batches for row in x]

    def in_order(split):
        stream = split_stream([unit], split)
        return [tuple(stream[k * T:(k + 1) * T].tolist()) for k in range((len(stream) - 1) // T)]

    first, second, stream_windows = windows("train", 0), windows("train", 1), in_order("train")
    for epoch in (first, second):  # the stream's windows (up to the last batch's worth), each once
        assert len(stream_windows) - B < len(epoch) and not collections.Counter(epoch) - collections.Counter(
            stream_windows)
    assert first != stream_windows[:len(first)] and first != second
    validation = windows("val", 0)
    assert len(validation) >= 4 and validation == in_order("val")[:len(validation)]


def test_training_windows_are_shuffled_across_a_reader_s_small_units(corpus, monkeypatch):
    """A corpus written in order (sorted sources, a book's chapters) in small row groups: a batch draws
    from several of them, not from one row group after another."""
    units = list_units(corpus, "text")  # 15 row groups of 8 documents of 70 bytes

    def units_of_batches():  # the (file, row group) units each batch's windows come from (each holds a tag)
        batches = batches_of(units, T=64, B=2).epoch_batches(ParquetFileCache(4), 0, 1, 0)
        return [({(int(f), int(r) // 8) for f, r in re.findall(rb"<(\d\d)-(\d\d\d)>", bytes(x.flatten().tolist()))},
                 position.get("pooled")) for x, _, position in batches]
    pooled = units_of_batches()
    assert len(set().union(*(batch for batch, _ in pooled[:4]))) >= 5 and {n for _, n in pooled} == {15}
    monkeypatch.setattr(data, "POOL_BYTES", 1)  # a pool a unit: within one row group at a time
    one_by_one = units_of_batches()
    assert len(one_by_one[0][0]) == 1 and {n for _, n in one_by_one} == {None}


def test_a_unit_whose_text_outgrows_its_metadata_is_not_pooled(tmp_path, monkeypatch):
    """Repeated documents, which the writer's dictionary stores once: the metadata calls the row groups
    small, but each is read in several parts, so each part is a pool of its own (memory stays bounded)."""
    monkeypatch.setattr(shards, "READ_BYTES", 12_000)  # row groups of 10 KB by the metadata, 100 KB of text
    for f in range(3):
        write_parquet(tmp_path / f"{f}.parquet", [chr(97 + k % 2) * 5000 for k in range(40)], rows_per_group=20)
    make_corpus(tmp_path / "small", n_files=2, docs_per_file=16, rows_per_group=4)  # and small ones: pools
    units = list_units(tmp_path, "text")
    assert all(shards.rows_per_part(unit) >= unit.num_rows for unit in units)  # one part each, by the metadata
    dataset = batches_of(units, T=64, B=4, val_fraction=1e-9)
    batches = list(dataset.epoch_batches(ParquetFileCache(4), 0, 1, 0))
    limit = 2 * shards.PART_TEXT_LIMIT * shards.READ_BYTES  # a part's text and what a window may carry over
    assert max(position["windows"] for _, _, position in batches) * 64 < limit
    assert max(position["part"] for _, _, position in batches) > 0 and any("pooled" in p for _, _, p in batches)
    pools = [(p["unit"], p["part"]) for _, _, p in batches]
    firsts = [k for k in range(len(batches)) if k == 0 or pools[k] != pools[k - 1]]
    for k in sorted({*firsts, *(k + 1 for k in firsts[:-1])}):  # a resume in each pool continues the same batches
        rest = dataset.epoch_batches(ParquetFileCache(4), 0, 1, 0, start=batches[k][2])
        assert [x.tolist() for x, _, _ in rest] == [x.tolist() for x, _, _ in batches[k + 1:]]


def test_validation_stream_is_exact_and_repeatable(corpus, tokenizer):
    units = list_units(corpus, "text")
    T = 16
    stream = split_stream(units, "val", tokenizer=tokenizer)
    first = list(batches_of(units, split="val", T=T, B=1, tokenizer=tokenizer))
    rebuilt = np.concatenate([x[0].numpy() for x, _, _ in first] + [first[-1][1][0, -1:].numpy()])
    assert np.array_equal(rebuilt, stream[: len(rebuilt)])
    assert len(stream) - len(rebuilt) < T + 1
    second = list(batches_of(units, split="val", T=T, B=1, tokenizer=tokenizer))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))


def test_validation_documents_never_appear_in_training(corpus, tokenizer):
    units = list_units(corpus, "text")
    val_heads = set(re.findall(rb"<\d\d-\d\d\d>", text_of(split_stream(units, "val", tokenizer=tokenizer), tokenizer)))
    train_heads = set(re.findall(rb"<\d\d-\d\d\d>", text_of(split_stream(units, "train", tokenizer=tokenizer), tokenizer)))
    assert val_heads and train_heads and not (val_heads & train_heads)
    assert len(val_heads | train_heads) == 3 * 40
    assert 0.05 < len(val_heads) / 120 < 0.4  # val_fraction 0.2
    ds = batches_of(units, T=32, B=1, tokenizer=tokenizer)
    seen = b"".join(window_text(x[0], y[0], tokenizer) for x, y, _ in ds.epoch_batches(ParquetFileCache(4), 0, 1, 0))
    assert not (set(re.findall(rb"<\d\d-\d\d\d>", seen)) & val_heads)


def loader_batches(units, num_workers, n, tokenizer=BYTES):
    loader = DataLoader(batches_of(units, tokenizer=tokenizer), batch_size=None, num_workers=num_workers)
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self/stat").exists(), reason="Linux's")
def test_the_training_stream_s_workers_are_forked_children_whatever_python_s_default(corpus):
    """Python 3.14 starts processes through a forkserver by default: the workers would each import torch anew,
    and outlive a run killed by kill -9 (torch's workers watch their parent: the forkserver, which they keep up)."""
    import multiprocessing
    from distributed import Ranks
    default = multiprocessing.get_start_method()
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        cfg = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}, "dataloader": {"num_workers": 1},
                                "training": {"block_size": 16, "batch_size": 2}})
        tokenizer, units = data.prepare_data(cfg, Ranks())
        before = set(multiprocessing.active_children())
        loader = iter(data.train_loader(cfg, units, tokenizer, 1))
        next(loader)
        [worker] = set(multiprocessing.active_children()) - before
        parent = int(Path(f"/proc/{worker.pid}/stat").read_text().rpartition(")")[2].split()[1])
        assert parent == os.getpid()
        del loader
    finally:
        multiprocessing.set_start_method(default, force=True)


def test_dataloader_workers_read_their_assigned_units_deterministically(corpus):
    units = list_units(corpus, "text")
    got = loader_batches(units, 2, 8)
    again = loader_batches(units, 2, 8)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, again))
    ds = batches_of(units)
    for reader in range(2):  # the DataLoader deals batches round-robin from its workers
        expected = list(ds.epoch_batches(ParquetFileCache(4), reader, 2, 0))[:4]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(got[reader::2], expected))


def test_single_process_loader_covers_epochs_in_order(corpus):
    units = list_units(corpus, "text")
    ds = batches_of(units)
    epoch0 = list(ds.epoch_batches(ParquetFileCache(4), 0, 1, 0))
    epoch1 = list(ds.epoch_batches(ParquetFileCache(4), 0, 1, 1))
    got = loader_batches(units, 0, len(epoch0) + 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, epoch0 + epoch1[:2]))


def open_parquet_fds(root):
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root)) and target.endswith(".parquet"):
            fds.append(target)
    return fds


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_at_most_max_cached_files_are_open(tmp_path):
    root = make_corpus(tmp_path / "many", n_files=6, docs_per_file=8, rows_per_group=2)
    units = list_units(root, "text")
    ds = batches_of(units, max_cached=2, B=1)
    most = 0
    for _ in ds.epoch_batches(cache := ParquetFileCache(2), 0, 1, 0):
        most = max(most, len(open_parquet_fds(root)))
    assert most == 2
    cache.close()
    assert open_parquet_fds(root) == []


def test_corrupt_row_group_names_file_and_row_group(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", ["x" * 100] * 40, 10)
    units = list_units(tmp_path, "text")
    raw = bytearray(path.read_bytes())
    raw[4:200] = b"\x00" * 196  # destroy the first pages, keep the footer
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"c.parquet: row group 0 cannot be read"):
        split_stream(units[:1], "train")


def test_too_little_training_data_is_an_error_not_a_hang(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["tiny"] * 3, 4)
    ds = batches_of(list_units(tmp_path, "text"), T=64, B=4, val_fraction=1e-9)
    with pytest.raises(DataError, match=r"got no complete batch of 4 x 65 tokens in passes 1-4 over the training "
                                        r"data: too little training data; lower training.batch_size or "
                                        r"training.block_size, or add data$"):
        next(iter(ds))
    made_up = {"reader": 0, "epoch": 3, "unit": 0, "part": 0, "consumed": 0, "carry": []}  # resume_point's, dealt anew
    ds = ParquetBatches(list_units(tmp_path, "text"), "train", 64, 4, 0, Holdout(1e-9, 0), "text", 4, BYTES,
                        positions=[made_up], shuffle=True)
    with pytest.raises(DataError, match=r"no complete batch of 4 x 65 tokens in passes 5-8 over the training data: "):
        next(iter(ds))
    ds = batches_of(list_units(tmp_path, "text"), T=4, B=1, val_fraction=1e-9)
    _, _, position = next(iter(ds))  # after a batch; then a resume with a batch size the data cannot fill
    ds = batches_of(list_units(tmp_path, "text"), T=4, B=64, val_fraction=1e-9)
    ds.positions = {0: position}
    with pytest.raises(DataError, match=r"no complete batch of 64 x 5 tokens in passes 2-1001 over the training "):
        next(iter(ds))
    write_parquet(tmp_path / "two" / "a.parquet", ["tiny"] * 2, 1)  # a unit for each of two readers, maybe the cause
    ds = ParquetBatches(list_units(tmp_path / "two", "text"), "train", 64, 4, 0, Holdout(1e-9, 0), "text", 4, BYTES,
                        rank=1, world_size=2, shuffle=True)
    with pytest.raises(DataError, match=r"^reader 1 of 2 got no complete batch .*: too little training data for this "
                                        r"many readers \(processes x workers\); lower dataloader.num_workers, the "
                                        r"number of processes, training.batch_size or training.block_size, or add "
                                        r"data$"):
        next(iter(ds))
    write_parquet(tmp_path / "b" / "a.parquet", ["one small text file, cut into one document " * 50], 4)
    ds = batches_of(list_units(tmp_path / "b", "text"), T=16, B=1, val_fraction=0.999999)  # it goes to validation
    with pytest.raises(DataError, match=r"^reader 0 of 1: none of the 1 document of its \(file, row group\) units went "
                                        r"to training .* cut the text into more documents \(python prepare.py "
                                        r"--from-text ... with a smaller --chunk-bytes\), lower dataset.val_fraction"):
        next(iter(ds))


def test_each_part_of_a_large_unit_is_shuffled_in_an_order_of_its_own(tmp_path, monkeypatch):
    # 32 documents of 16 tokens (with the separator), one row group read in parts of 8 rows: after the first,
    # every part's stream (the carried window and 8 documents) cuts into 8 windows, each starting at a document
    write_parquet(tmp_path / "a.parquet", [f"doc{i:03d}" + "x" * 9 for i in range(32)], 32)
    [unit] = list_units(tmp_path, "text")
    monkeypatch.setattr(shards, "READ_BYTES", -(-8 * unit.num_bytes // unit.num_rows))
    assert shards.rows_per_part(unit) == 8
    batches = batches_of([unit], T=16, B=1, val_fraction=1e-9).epoch_batches(ParquetFileCache(4), 0, 1, 0)
    orders = {}
    for x, _, position in batches:
        orders.setdefault(position["part"], []).append(int(bytes(x[0, 3:6].tolist())))
    assert sorted(orders) == [0, 1, 2, 3] and all(len(orders[part]) == 8 for part in (1, 2, 3))
    relative = [tuple(doc - min(docs) for doc in docs) for part, docs in orders.items() if part > 0]
    assert all(sorted(order) == list(range(8)) for order in relative)  # each part's windows, once each
    assert len(set(relative)) == 3  # not the same permutation in every part of the same size


CARRIED = list(b"CARRIED-TOKENS")


def dealt_anew(first_parts: list[int], carried_to: int, shuffle: bool, units):
    """The stream of a reader that the rest of an epoch was dealt anew to (positions.resume_point): units 0, 1,
    2 from the parts `first_parts`, unit `carried_to` bringing the tokens its old reader had carried."""
    start = {"reader": 0, "epoch": 0, "unit": 0, "part": 0, "consumed": 0, "carry": [], "epoch_done": 0.0,
             "units": [[unit, part, CARRIED if unit == carried_to else []] for unit, part in enumerate(first_parts)]}
    dataset = ParquetBatches(units, "train", 4, 1, 0, Holdout(1e-9, 0), "text", 4, BYTES, shuffle=shuffle)
    return list(dataset.epoch_batches(ParquetFileCache(4), 0, 1, 0, start=start))


def test_tokens_carried_to_a_unit_with_no_part_left_go_on_to_the_next_unit_s_stream(tmp_path):
    # unit 1 holds one part, all of it read (its first part, 1, is past its last): its carried tokens precede unit 2's
    write_parquet(tmp_path / "a.parquet", ["first unit " * 3, "second unit " * 3, "third unit " * 3], 1)
    batches = dealt_anew([0, 1, 0], 1, False, list_units(tmp_path, "text"))
    text = bytes(token for x, _, _ in batches for token in x[0].tolist())
    assert text.startswith(b"first unit ") and b"CARRIED-TOKENSthird unit " in text and b"second" not in text


def test_tokens_carried_to_a_small_unit_within_a_pool_are_trained_on(tmp_path):
    # unit 1, pooled with its neighbours, brings the tokens its old reader carried
    write_parquet(tmp_path / "a.parquet", ["first unit " * 3, "second unit " * 3, "third unit " * 3], 1)
    units = list_units(tmp_path, "text")
    batches = dealt_anew([0, 0, 0], 1, True, units)
    assert {position.get("pooled") for _, _, position in batches} == {3}
    unit_tokens = [np.concatenate(list(read_unit_tokens(ParquetFileCache(4), unit, "text", "train", Holdout(1e-9, 0),
                                                        BYTES))).tolist() for unit in units]
    stream = unit_tokens[0] + CARRIED + unit_tokens[1] + unit_tokens[2]
    n = (len(stream) - 1) // 4
    assert len(batches) == n
    assert sorted(token for x, _, _ in batches for token in x[0].tolist()) == sorted(stream[:n * 4])


def test_tokens_carried_to_a_large_unit_precede_its_first_part_only(tmp_path, monkeypatch):
    # unit 1, read in several parts, brings the tokens its old reader carried
    write_parquet(tmp_path / "a.parquet", ["first unit " * 3], 1)
    write_parquet(tmp_path / "b.parquet", [f"second unit {i} " * 3 for i in range(8)], 8)
    write_parquet(tmp_path / "c.parquet", ["third unit " * 3], 1)
    monkeypatch.setattr(shards, "READ_BYTES", 1)  # a part a row
    batches = dealt_anew([0, 0, 0], 1, False, list_units(tmp_path, "text"))
    assert max(position["part"] for _, _, position in batches) == 7
    text = bytes(token for x, _, _ in batches for token in x[0].tolist())
    assert text.count(b"CARRIED-TOKENS") == 1 and b"CARRIED-TOKENSsecond unit 0 " in text


@pytest.mark.parametrize("read_bytes", [8 << 20, 300])  # one part per row group, or several
def test_a_saved_position_continues_the_same_batches(corpus, tokenizer, read_bytes, monkeypatch):
    monkeypatch.setattr(shards, "READ_BYTES", read_bytes)
    units = list_units(corpus, "text")
    ds = batches_of(units, T=16, B=2, tokenizer=tokenizer)
    cache = ParquetFileCache(4)
    full = list(ds.epoch_batches(cache, 1, 2, epoch=2))
    assert len(full) > 6 and any(b[2]["part"] > 0 for b in full) == (read_bytes == 300)
    for k in range(len(full)):
        position = full[k][2]
        rest = list(ds.epoch_batches(cache, 1, 2, epoch=2, start=position))
        assert len(rest) == len(full) - k - 1
        assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, full[k + 1:]))


def test_dataloader_resumes_with_the_worker_whose_batch_was_due(corpus, tokenizer):
    units = list_units(corpus, "text")
    straight = loader_batches(units, 2, 10, tokenizer)
    consumed = 5  # the next batch comes from reader 5 % 2 = 1
    positions = {}
    for _, _, p in straight[:consumed]:
        positions[p["reader"]] = p
    ds = ParquetBatches(units, "train", 16, 2, 0, Holdout(0.2, 0), "text", 4, tokenizer,
                        positions=list(positions.values()),
                        rotation=consumed % 2, shuffle=True)
    it = iter(DataLoader(ds, batch_size=None, num_workers=2))
    resumed = [next(it) for _ in range(5)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, straight[consumed:]))


def test_a_process_keeps_the_positions_of_its_own_readers_only():
    positions = [{"reader": reader, "epoch": 0} for reader in range(6)]
    assert sorted(data.rank_positions(positions, rank=1, workers=3)) == [3, 4, 5]
    assert sorted(data.rank_positions(positions, rank=0, workers=3)) == [0, 1, 2]
    assert sorted(data.rank_positions(positions, rank=2, workers=0)) == [2]  # no workers: one reader a process


MEMORY_PROBE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import shards
from data import ParquetBatches
from shards import Holdout, ParquetFileCache, list_units
from tokenizer import ByteTokenizer
shards.READ_BYTES = 1 << 20
def kib(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])
for folder in sys.argv[2:]:  # each in a child of its own: what one leaves allocated cannot serve the other
    if os.fork() == 0:
        open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts from here
        start = kib("VmRSS")
        dataset = ParquetBatches(list_units(folder, "text"), "train", 256, 16, 0, Holdout(0.01, 0), "text", 4,
                                 ByteTokenizer(), shuffle=True)
        sum(1 for _ in dataset.epoch_batches(ParquetFileCache(4), 0, 1, 0))
        print(kib("VmHWM") - start, flush=True)
        os._exit(0)
    os.wait()
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads peak RSS from /proc")
def test_memory_does_not_grow_with_the_row_group_size(tmp_path):
    """One row group of 8 MB and one of 32 MB (low-entropy text, so the files stay small): a reader
    whose memory followed the row group would need about 4x more for the second."""
    for mib in (8, 32):
        docs = [(f"{i:06d} " + "abcdefgh" * 1024)[:8192] for i in range(mib * 128)]
        write_parquet(tmp_path / f"{mib}" / "a.parquet", docs, rows_per_group=len(docs))
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(ROOT), str(tmp_path / "8"), str(tmp_path / "32")],
                       capture_output=True, text=True, check=True)
    peaks = dict(zip((8, 32), (int(kib) / 1024 for kib in r.stdout.split())))  # MiB above the start
    assert peaks[32] < 1.5 * peaks[8], peaks  # before reading in parts: 77 and 214 MiB


def test_a_dictionary_encoded_string_column_is_read(tmp_path):
    write_parquet(tmp_path / "a.parquet", pa.array(["cat", "dog", "cat", None, "ému"]).dictionary_encode(), 2)
    tokens = split_stream(list_units(tmp_path, "text"), "train", val_fraction=1e-9)
    assert BYTES.decode(tokens) == "cat\0dog\0cat\0ému\0"


def test_more_processes_than_units_are_refused_up_front(corpus, capsys):
    from data import check_enough_units
    from readers import loader_workers
    units = list_units(corpus, "text")
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}, "dataloader": {"num_workers": 4}})
    assert loader_workers(cfg, units[:6], world_size=2) == 3
    assert capsys.readouterr().out.startswith(
        "note: dataloader.num_workers 4 -> 3: only 6 (file, row group) units to share among 2 processes' workers, "
        "and each worker reads units of its own")
    with pytest.raises(DataError, match=r"1 \(file, row group\) unit for 2 processes, .* start at most 1 \(torchrun"):
        check_enough_units(cfg, units[:1], world_size=2)
    check_enough_units(cfg, units[:2], world_size=2)  # one each: enough


def test_the_note_on_an_oversized_vocabulary_is_not_repeated_on_a_resume(corpus, tmp_path, capsys):
    from distributed import Ranks
    raw = {"dataset": {"parquet_dir": str(corpus)}, "model": {"vocab_size": 50304}}
    data.prepare_data(Config.from_dict(raw), Ranks())
    assert "model.vocab_size 50,304 is larger than" in capsys.readouterr().out
    resumed = Config.from_dict({**raw, "training": {"resume_from_checkpoint": str(tmp_path / "ck.pt")}})
    data.prepare_data(resumed, Ranks())  # (a resume cannot change it)
    assert "model.vocab_size" not in capsys.readouterr().out
