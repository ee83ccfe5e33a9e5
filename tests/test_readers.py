"""The readers of the training data: how many (loader_workers), which units each reads in an epoch
(assign_units), and the start's notes where their shares cannot be even or row groups are read in order."""
import os

import numpy as np
import pyarrow as pa
import pytest

from config import Config
from readers import (IN_SHUFFLED_ORDER, assign_units, loader_workers, read_in_order, short_of_a_batch,
                     uneven_readers)
from shards import READ_BYTES, Unit, list_units


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
    units = [Unit("a.parquet", i, 3, 1000, 0, 1000) for i in range(8)]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(Config.from_dict({"dataloader": {"num_workers": 2}}), units) == 2
    assert capsys.readouterr().out == ""
    assert loader_workers(Config.from_dict({"dataloader": {"num_workers": 4}}), units) == 4
    assert capsys.readouterr().out == ("note: dataloader.num_workers 4 is more than the 2 CPU cores this process may "
                                       "use: the workers compete with training for them; dataloader.num_workers=2 or "
                                       "fewer\n")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 processes here, each with its workers
    assert loader_workers(Config.from_dict({"dataloader": {"num_workers": 2}}), units, world_size=2) == 2
    assert "num_workers 2 x 2 processes on this machine is more than the 2 CPU cores" in capsys.readouterr().out
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # more processes than cores: none is the fix
    assert loader_workers(Config.from_dict({"dataloader": {"num_workers": 1}}), units, world_size=4) == 1
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
    assert loader_workers(Config.from_dict({"dataloader": {"num_workers": 2}}), units) == 2
    assert "WARNING" not in capsys.readouterr().out
    for epoch in range(5):
        assert sorted(map(len, assign_units(units, epoch, seed=1, n_readers=2, shuffle=True))) == [2, 2]


def test_a_row_group_too_big_for_an_even_share_is_warned_of(capsys, tmp_path, monkeypatch):
    """One row group of 90% of the text and two readers: the other reader's 10% is read again and again
    while the big one is read once, so its documents weigh more: fewer readers or smaller row groups."""
    units = [Unit("big.parquet", 0, 5000, 900_000, 0, 900_000)] + [Unit("small.parquet", i, 3, 1000, 1, 1000)
                                                                  for i in range(100)]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    cfg = Config.from_dict({"dataloader": {"num_workers": 2}, "dataset": {"parquet_dir": "corpus"}})
    assert loader_workers(cfg, units) == 2
    assert capsys.readouterr().out == (
        "WARNING: row group 0 of big.parquet holds 90.0% of the training text, more than a reader's even share (even "
        "shares: 50.0% each for 2 readers, dataloader.num_workers=2): the readers' shares cannot be even, those with "
        "less text read theirs again sooner, so their documents weigh more (and the passes over the data logged run "
        "ahead); dataloader.num_workers=1, or smaller row groups even them out: `python prepare.py --from-parquet "
        "corpus --out corpus_small` writes them, then train with dataset.parquet_dir=corpus_small\n")
    assert loader_workers(cfg, units, announce=False) == 2 and capsys.readouterr().out == ""
    assert uneven_readers(units, 0, 1, cfg) is None  # one reader: nothing to even out
    assert ("(even shares: 25.0% each for 4 readers, dataloader.num_workers=2 x 2 processes)"
            in uneven_readers(units, 2, 2, cfg))
    # one reader per process is too many already
    assert "; smaller row groups even them out" in uneven_readers(units, 2, 2, cfg)
    assert uneven_readers([Unit("a.parquet", i, 3, 1000, 0, 1000) for i in range(10)], 2, 1, cfg) is None
    five = [Unit("a.parquet", i, 3, 1000, 0, 1000) for i in range(5)]  # 2, 2 and 1 of them: the third reader has half
    assert uneven_readers(five, 3, 1, cfg).startswith(
        "WARNING: the 5 (file, row group) units of the training text, dealt whole, give one reader 2.00 times the "
        "text of another (even shares: 33.3% each for 3 readers, dataloader.num_workers=3): ")
    # 3, 2 for two: still uneven; and 1,000 bytes a reader is less than a batch (8 x 512 + 1 tokens)
    assert ("cannot be even, the smallest holds about 950 bytes of text, less than a batch of 4,097 tokens, and a "
            "reader trains only on whole batches of its own share: that text may never be trained on; "
            "dataloader.num_workers=1, or smaller row groups") in uneven_readers(five, 3, 1, cfg)
    assert uneven_readers(five, 5, 1, cfg) is None


def test_a_start_note_says_when_most_text_is_in_row_groups_read_in_their_order(capsys, tmp_path, monkeypatch):
    big = Unit("raw/one.parquet", 0, 4000, 5 * READ_BYTES, 0, 5 * READ_BYTES)  # 5 parts
    small = [Unit("raw/many.parquet", i, 40, 3 * READ_BYTES // 8, 1, 3 * READ_BYTES // 8) for i in range(8)]
    cfg = Config.from_dict({"dataset": {"parquet_dir": "raw/*.parquet", "text_column": "content"}})
    note = read_in_order([big, *small], cfg.dataset)
    assert note == (
        "note: 1 row group of more than 24.0 MB holds 62% of the training text (the largest: row group 0 of "
        "raw/one.parquet, 40.0 MB of text): it is read in its order, its windows shuffled 8.0 MB at a time, so "
        "documents sorted in it (by source, date, topic) are trained on in that order; small row groups are shuffled "
        "together: `python prepare.py --from-parquet 'raw/*.parquet' --out raw_small dataset.text_column=content` "
        "writes them, then train with dataset.parquet_dir=raw_small")
    assert loader_workers(cfg, [big, *small]) == 2 and note in capsys.readouterr().out
    assert read_in_order([big, *small, *small], cfg.dataset) is None  # under half of the text
    four = Unit("raw/one.parquet", 0, 4000, 4 * READ_BYTES - 1, 0, 4 * READ_BYTES)  # 4 parts: still
    three = Unit("raw/one.parquet", 0, 3000, 3 * READ_BYTES, 0, 4 * READ_BYTES)  # 3 parts: mixed enough
    assert read_in_order([four], cfg.dataset) and read_in_order([three], cfg.dataset) is None
    (tmp_path / "corpus").mkdir()
    monkeypatch.chdir(tmp_path / "corpus")  # the command's --out: beside the data's folder, not in it
    for folder, out in ((".", "../corpus_small"), ("one.parquet", "../corpus_small"),
                        ("..", f"../../{tmp_path.name}_small")):
        cfg = Config.from_dict({"dataset": {"parquet_dir": folder}})
        assert f"--from-parquet {folder} --out {out}` writes them" in read_in_order([big], cfg.dataset)
    (tmp_path / "deep").mkdir()
    (tmp_path / "corpus" / "linked").symlink_to(tmp_path / "deep")  # beside the link, not its target
    for folder, out in (("linked", "linked_small"), ("/one.parquet", os.path.relpath("/data_small"))):
        cfg = Config.from_dict({"dataset": {"parquet_dir": folder}})
        assert f"--from-parquet {folder} --out {out}` writes them" in read_in_order([big], cfg.dataset)


def test_the_in_order_note_names_the_largest_of_several_large_row_groups():
    units = [Unit("raw/one.parquet", 0, 4000, 5 * READ_BYTES, 0, 5 * READ_BYTES),
             Unit("raw/two.parquet", 0, 8000, 9 * READ_BYTES, 0, 9 * READ_BYTES)]
    note = read_in_order(units, Config.from_dict({"dataset": {"parquet_dir": "raw"}}).dataset)
    assert "(the largest: row group 0 of raw/two.parquet, 72.0 MB of text)" in note


def test_a_separate_validation_folder_holds_nothing_out_of_the_readers_shares():
    units = [Unit("a.parquet", i, 3, 4100, 0, 4100) for i in range(2)]  # a batch: 8 x 512 + 1 = 4,097 tokens
    assert short_of_a_batch(units, Config.from_dict({}), 2)  # 95% of 4,100 bytes each
    assert short_of_a_batch(units, Config.from_dict({"dataset": {"val_parquet_dir": "val"}}), 2) == ""


def test_the_warning_suggests_the_most_workers_that_share_evenly_and_counts_every_process_s_readers():
    cfg = Config.from_dict({"dataset": {"parquet_dir": "corpus"}})
    six = [Unit("a.parquet", i, 3, 100_000, 0, 100_000) for i in range(6)]  # 4 readers: 2, 2, 1, 1; 3 readers: even
    assert "; dataloader.num_workers=3, or smaller row groups" in uneven_readers(six, 4, 1, cfg)
    five = [Unit("a.parquet", i, 3, 1000, 0, 1000) for i in range(5)]  # 4 readers of 2 processes: 2, 1, 1, 1
    assert "the smallest holds about 950 bytes of text, less than a batch" in uneven_readers(five, 2, 2, cfg)


def test_a_row_group_only_a_little_past_an_even_share_is_not_blamed():
    units = [Unit("a.parquet", 0, 3, 40_000, 0, 40_000)] + [Unit("a.parquet", i, 3, 30_000, 0, 30_000)
                                                             for i in (1, 2)]
    assert uneven_readers(units, 3, 1, Config.from_dict({})).startswith(
        "WARNING: the 3 (file, row group) units of the training text, dealt whole, give one reader 1.33 times")
