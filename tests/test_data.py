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
from data import IN_SHUFFLED_ORDER, ParquetBatches, assign_units, read_unit_tokens
from shards import DataError, ParquetFileCache, list_units
from tokenizer import ByteTokenizer, HFTokenizer

BYTES = ByteTokenizer()


@pytest.fixture(params=["bytes", "bpe"])
def tokenizer(request, bpe_json):
    """The tests that take it run with byte tokens and with a byte-level BPE."""
    return BYTES if request.param == "bytes" else HFTokenizer(bpe_json, "bpe")


def batches_of(units, split="train", T=16, B=2, seed=0, val_fraction=0.2, max_cached=4, tokenizer=BYTES, split_seed=0):
    return ParquetBatches(units, split, T, B, seed, split_seed, val_fraction, "text", max_cached, tokenizer)


def split_stream(units, split, split_seed=0, val_fraction=0.2, tokenizer=BYTES):
    cache = ParquetFileCache(8)
    return np.concatenate([part for u in units for part in read_unit_tokens(cache, u, "text", split, split_seed,
                                                                             val_fraction, tokenizer)])


def window_text(x, y, tokenizer):
    return text_of(torch.cat([x, y[-1:]]).tolist(), tokenizer)


def text_of(tokens, tokenizer):
    return tokenizer.decode(tokens).encode()


@pytest.mark.parametrize("n_readers", [1, 2, 3, 5])
def test_every_unit_once_per_epoch_disjoint_across_readers(corpus, n_readers):
    units = list_units(corpus, "text")
    orders = []
    for epoch in range(3):
        assigned = assign_units(units, epoch, seed=7, n_readers=n_readers, shuffle=True)
        flat = [u for reader in assigned for u in reader]
        assert sorted(flat, key=lambda u: (u.path, u.row_group)) == units
        assert assigned == assign_units(units, epoch, seed=7, n_readers=n_readers, shuffle=True)
        orders.append(flat)
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_the_largest_units_are_dealt_first_so_the_shares_are_even():
    """A unit three times the others, dealt in its shuffled turn, could come last and leave one reader a
    whole unit ahead (60 against 30); dealt first, the shares differ by one small unit at most. Each
    reader still reads its units in the epoch's shuffled order, and the big one goes to any reader."""
    from shards import Unit
    units = [Unit("big.parquet", 0, 3, 30, 0, 30)] + [Unit("small.parquet", i, 1, 10, 1, 10) for i in range(12)]
    old_spread, got_big = [], set()
    for epoch in range(20):
        assigned = assign_units(units, epoch, seed=3, n_readers=4, shuffle=True)
        shares = [sum(unit.num_bytes for unit in reader) for reader in assigned]
        assert max(shares) - min(shares) <= 10
        rank = {id(units[i]): k for k, i in enumerate(np.random.default_rng([3, epoch]).permutation(len(units)))}
        assert all([rank[id(u)] for u in reader] == sorted(rank[id(u)] for u in reader) for reader in assigned)
        got_big |= {r for r, reader in enumerate(assigned) if units[0] in reader}
        before_0_4_8 = assign_units(units, epoch, seed=3, n_readers=4, shuffle=True, way=IN_SHUFFLED_ORDER)
        old_spread.append(max(map(sum, ([u.num_bytes for u in reader] for reader in before_0_4_8))) -
                          min(map(sum, ([u.num_bytes for u in reader] for reader in before_0_4_8))))
    assert max(old_spread) >= 20 and got_big == {0, 1, 2, 3}


def test_more_workers_than_cpu_cores_is_said_in_one_line(monkeypatch, capsys):
    from shards import Unit
    units = [Unit("a.parquet", i, 3, 1000, 0, 1000) for i in range(8)]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data.loader_workers(Config.from_dict({"dataloader": {"num_workers": 2}}), units) == 2
    assert capsys.readouterr().out == ""
    assert data.loader_workers(Config.from_dict({"dataloader": {"num_workers": 4}}), units) == 4
    assert capsys.readouterr().out == ("note: dataloader.num_workers 4 is more than the 2 CPU cores this process may "
                                       "use: the workers compete with training for them; dataloader.num_workers=2 or "
                                       "fewer\n")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 processes here, each with its workers
    assert data.loader_workers(Config.from_dict({"dataloader": {"num_workers": 2}}), units, world_size=2) == 2
    assert "num_workers 2 x 2 processes on this machine is more than the 2 CPU cores" in capsys.readouterr().out
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # more processes than cores: none is the fix
    assert data.loader_workers(Config.from_dict({"dataloader": {"num_workers": 1}}), units, world_size=4) == 1
    assert capsys.readouterr().out.endswith("; dataloader.num_workers=0 (the main process reads)\n")


def test_the_readers_share_the_text_not_the_other_columns(tmp_path, capsys):
    """A file whose other column (raw HTML, say) is eight times its text holds a quarter of the text of
    four such files, not three quarters: two readers get two files each, without a warning."""
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)

    def text(n):  # (incompressible: the sizes are what they look like)
        return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), n))
    docs = [text(2000) for _ in range(8)]
    pq.write_table(pa.table({"text": docs, "html": [text(16000) for _ in docs]}), tmp_path / "heavy.parquet")
    for name in "abc":
        pq.write_table(pa.table({"text": [text(2000) for _ in docs]}), tmp_path / f"{name}.parquet")
    units = list_units(tmp_path, "text")
    heavy = next(u for u in units if u.path.endswith("heavy.parquet"))
    assert heavy.num_bytes > 5 * heavy.text_bytes and heavy.text_bytes == pytest.approx(units[0].text_bytes, rel=0.1)
    assert data.loader_workers(Config.from_dict({"dataloader": {"num_workers": 2}}), units) == 2
    assert "WARNING" not in capsys.readouterr().out
    for epoch in range(5):
        assert sorted(map(len, assign_units(units, epoch, seed=1, n_readers=2, shuffle=True))) == [2, 2]


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
    ds = ParquetBatches(units, "all", 16, 4, 18, 1, 0.2, "text", 4, BYTES, rank=0, world_size=2, shuffle=True)
    epochs = [position["epoch"] for _, _, position in itertools.islice(ds, 40)]
    assert sorted(set(epochs)) == [0, 2, 3]
    for rank in (0, 1):  # however many such epochs come in a row later on (4 did for each reader here)
        ds = ParquetBatches(units, "all", 16, 4, 18, 1, 0.2, "text", 4, BYTES, rank=rank, world_size=2, shuffle=True)
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


def test_a_row_group_too_big_for_an_even_share_is_warned_of(capsys, tmp_path, monkeypatch):
    """One row group of 90% of the text and two readers: the other reader's 10% is read again and again
    while the big one is read once, so its documents weigh more: fewer readers or smaller row groups."""
    from shards import Unit
    units = [Unit("big.parquet", 0, 5000, 900_000, 0, 900_000)] + [Unit("small.parquet", i, 3, 1000, 1, 1000)
                                                                  for i in range(100)]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    cfg = Config.from_dict({"dataloader": {"num_workers": 2}, "dataset": {"parquet_dir": "corpus"}})
    assert data.loader_workers(cfg, units) == 2
    assert capsys.readouterr().out == (
        "WARNING: row group 0 of big.parquet holds 90.0% of the training text, more than a reader's even share (even "
        "shares: 50.0% each for 2 readers, dataloader.num_workers=2): the readers' shares cannot be even, those with "
        "less text read theirs again sooner, so their documents weigh more (and the passes over the data logged run "
        "ahead); dataloader.num_workers=1, or smaller row groups even them out: `python prepare.py --from-parquet "
        "corpus --out corpus_small` writes them, then train with dataset.parquet_dir=corpus_small\n")
    assert data.loader_workers(cfg, units, announce=False) == 2 and capsys.readouterr().out == ""
    assert data.uneven_readers(units, 0, 1, cfg.dataset) is None  # one reader: nothing to even out
    assert ("(even shares: 25.0% each for 4 readers, dataloader.num_workers=2 x 2 processes)"
            in data.uneven_readers(units, 2, 2, cfg.dataset))
    # one reader per process is too many already
    assert "; smaller row groups even them out" in data.uneven_readers(units, 2, 2, cfg.dataset)
    assert data.uneven_readers([Unit("a.parquet", i, 3, 1000, 0, 1000) for i in range(10)], 2, 1, cfg.dataset) is None
    five = [Unit("a.parquet", i, 3, 1000, 0, 1000) for i in range(5)]  # 2, 2 and 1 of them: the third reader has half
    assert data.uneven_readers(five, 3, 1, cfg.dataset).startswith(
        "WARNING: the 5 (file, row group) units of the training text, dealt whole, give one reader 2.00 times the "
        "text of another (even shares: 33.3% each for 3 readers, dataloader.num_workers=3): ")
    # 3, 2 for two: still uneven
    assert "; dataloader.num_workers=1, or smaller row groups" in data.uneven_readers(five, 3, 1, cfg.dataset)
    assert data.uneven_readers(five, 5, 1, cfg.dataset) is None


def test_a_start_note_says_when_most_text_is_in_row_groups_read_in_their_order(capsys, tmp_path, monkeypatch):
    from shards import READ_BYTES, Unit
    big = Unit("raw/one.parquet", 0, 4000, 5 * READ_BYTES, 0, 5 * READ_BYTES)  # 5 parts
    small = [Unit("raw/many.parquet", i, 40, 3 * READ_BYTES // 8, 1, 3 * READ_BYTES // 8) for i in range(8)]
    cfg = Config.from_dict({"dataset": {"parquet_dir": "raw/*.parquet", "text_column": "content"}})
    note = data.read_in_order([big, *small], cfg.dataset)
    assert note == (
        "note: 1 row group of more than 24.0 MB holds 62% of the training text (the largest: row group 0 of "
        "raw/one.parquet, 40.0 MB of text): it is read in its order, its windows shuffled 8.0 MB at a time, so "
        "documents sorted in it (by source, date, topic) are trained on in that order; small row groups are shuffled "
        "together: `python prepare.py --from-parquet 'raw/*.parquet' --out raw_small dataset.text_column=content` "
        "writes them, then train with dataset.parquet_dir=raw_small")
    assert data.loader_workers(cfg, [big, *small]) == 2 and note in capsys.readouterr().out
    assert data.read_in_order([big, *small, *small], cfg.dataset) is None  # under half of the text
    four = Unit("raw/one.parquet", 0, 4000, 4 * READ_BYTES - 1, 0, 4 * READ_BYTES)  # 4 parts: still
    three = Unit("raw/one.parquet", 0, 3000, 3 * READ_BYTES, 0, 4 * READ_BYTES)  # 3 parts: mixed enough
    assert data.read_in_order([four], cfg.dataset) and data.read_in_order([three], cfg.dataset) is None
    (tmp_path / "corpus").mkdir()
    monkeypatch.chdir(tmp_path / "corpus")  # the command's --out: beside the data's folder, not in it
    for folder, out in ((".", "../corpus_small"), ("one.parquet", "../corpus_small"),
                        ("..", f"../../{tmp_path.name}_small")):
        cfg = Config.from_dict({"dataset": {"parquet_dir": folder}})
        assert f"--from-parquet {folder} --out {out}` writes them" in data.read_in_order([big], cfg.dataset)
    (tmp_path / "deep").mkdir()
    (tmp_path / "corpus" / "linked").symlink_to(tmp_path / "deep")  # beside the link, not its target
    for folder, out in (("linked", "linked_small"), ("/one.parquet", os.path.relpath("/data_small"))):
        cfg = Config.from_dict({"dataset": {"parquet_dir": folder}})
        assert f"--from-parquet {folder} --out {out}` writes them" in data.read_in_order([big], cfg.dataset)


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
    ds = ParquetBatches(list_units(tmp_path, "text"), "train", 64, 4, 0, 0, 1e-9, "text", 4, BYTES, positions=[made_up])
    with pytest.raises(DataError, match=r"no complete batch of 4 x 65 tokens in passes 5-8 over the training data: "):
        next(iter(ds))
    ds = batches_of(list_units(tmp_path, "text"), T=4, B=1, val_fraction=1e-9)
    _, _, position = next(iter(ds))  # after a batch; then a resume with a batch size the data cannot fill
    ds = batches_of(list_units(tmp_path, "text"), T=4, B=64, val_fraction=1e-9)
    ds.positions = {0: position}
    with pytest.raises(DataError, match=r"no complete batch of 64 x 5 tokens in passes 2-1001 over the training "):
        next(iter(ds))
    write_parquet(tmp_path / "b" / "a.parquet", ["one small text file, cut into one document " * 50], 4)
    ds = batches_of(list_units(tmp_path / "b", "text"), T=16, B=1, val_fraction=0.999999)  # it goes to validation
    with pytest.raises(DataError, match=r"^reader 0 of 1: none of the 1 document of its \(file, row group\) units went "
                                        r"to training .* cut the text into more documents \(python prepare.py "
                                        r"--from-text ... with a smaller --chunk-bytes\), lower dataset.val_fraction"):
        next(iter(ds))


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
    ds = ParquetBatches(units, "train", 16, 2, 0, 0, 0.2, "text", 4, tokenizer, positions=list(positions.values()),
                        rotation=consumed % 2)
    it = iter(DataLoader(ds, batch_size=None, num_workers=2))
    resumed = [next(it) for _ in range(5)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, straight[consumed:]))


MEMORY_PROBE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import shards
from data import ParquetBatches
from shards import ParquetFileCache, list_units
from tokenizer import ByteTokenizer
shards.READ_BYTES = 1 << 20
def kib(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])
for folder in sys.argv[2:]:  # each in a child of its own: what one leaves allocated cannot serve the other
    if os.fork() == 0:
        open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts from here
        start = kib("VmRSS")
        dataset = ParquetBatches(list_units(folder, "text"), "train", 256, 16, 0, 0, 0.01, "text", 4, ByteTokenizer())
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
    from config import Config
    from data import check_enough_units, loader_workers
    units = list_units(corpus, "text")
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(corpus)}, "dataloader": {"num_workers": 4}})
    assert loader_workers(cfg, units[:6], world_size=2) == 3
    assert capsys.readouterr().out.startswith(
        "note: dataloader.num_workers 4 -> 3: only 6 (file, row group) units to share among 2 processes' workers, "
        "and each worker reads units of its own")
    with pytest.raises(DataError, match=r"1 \(file, row group\) unit for 2 processes, .* start at most 1 \(torchrun"):
        check_enough_units(cfg, units[:1], world_size=2)
    check_enough_units(cfg, units[:2], world_size=2)  # one each: enough
