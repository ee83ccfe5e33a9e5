"""bench_loader.py: a config's training stream taken at the pace of a step (no timing is asserted; the
figures are in BENCHMARKS.md)."""
import multiprocessing
import re
from types import SimpleNamespace

import pytest

import bench_loader
from config import Config
from conftest import write_config


def test_it_says_how_long_the_stream_kept_a_step_waiting_and_where(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus)
    assert bench_loader.main(["--config", str(config), "--step-ms", "1", "--batches", "30",
                              "dataloader.num_workers=1"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(r"1 worker\(s\), steps of 1 ms: the first batch after \d+\.\d\d s; then 30 batches in "
                        r"\d+\.\d s, \d+\.\d s of it waiting for data \(\d+\.\d%\); the longest wait [\d,]+ ms, at "
                        r"batch \d+ \(reader 0, epoch \d+, unit \d+, \d+ of its pool's \d+ windows\)", line), line


@pytest.mark.parametrize("arguments", [["--step-ms", "-1"], ["--batches", "0"]])
def test_it_refuses_a_negative_step_or_no_batches(arguments, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_loader.main(arguments)
    assert stop.value.code == 2 and "--step-ms must be >= 0 and --batches >= 1" in capsys.readouterr().err


def test_bad_data_is_one_line(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus, dataset={"parquet_dir": str(tmp_path / "missing")})
    assert bench_loader.main(["--config", str(config)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'missing'}: dataset.parquet_dir does not exist")


def test_too_little_data_in_a_worker_is_one_line_and_the_command_ends(tmp_path, capsys):
    from conftest import write_parquet
    write_parquet(tmp_path / "few" / "a.parquet", ["tiny"] * 4, rows_per_group=1)
    write_parquet(tmp_path / "val" / "b.parquet", ["held out"] * 4, rows_per_group=1)
    config = write_config(tmp_path, tmp_path / "few")
    assert bench_loader.main(["--config", str(config), "--batches", "3", "dataloader.num_workers=1",
                              f"dataset.val_parquet_dir={tmp_path / 'val'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: reader 0 of 1 got no complete batch") and len(err.splitlines()) == 1, err
    assert not multiprocessing.active_children()  # its worker, which ignores SIGTERM, would keep the process alive


def fake_stream(monkeypatch, waits):
    """A clock that only the stream's waits and the steps' sleeps move; the stream's batches each take the next
    of `waits` seconds (the first: the loader starting). Returns the sleeps taken."""
    now, sleeps = [0.0], []
    monkeypatch.setattr(bench_loader, "time", SimpleNamespace(
        perf_counter=lambda: now[0], sleep=lambda s: sleeps.append(s) or now.__setitem__(0, now[0] + s)))
    monkeypatch.setattr(bench_loader, "prepare_data", lambda cfg, ranks: (None, []))
    monkeypatch.setattr(bench_loader, "loader_workers", lambda cfg, units: 2)

    def stream(*args):
        for n, wait in enumerate(waits):
            now[0] += wait
            yield None, None, {"reader": 1, "epoch": 0, "unit": 7, "consumed": n, "windows": 9}
    monkeypatch.setattr(bench_loader, "train_loader", stream)
    return sleeps


def test_every_batch_after_the_first_is_waited_for_and_paced(tmp_path, corpus, monkeypatch):
    """Three batches after the first: a step's sleep after each, their waits summed, the longest found."""
    sleeps = fake_stream(monkeypatch, [1.0, 0.1, 0.3, 0.2, 5.0])
    result = bench_loader.wait_for_batches(Config.from_yaml(write_config(tmp_path, corpus)), 0.05, 3)
    assert sleeps == [0.05] * 3
    assert result["workers"] == 2 and result["first_batch_s"] == 1.0
    assert abs(result["waited_s"] - 0.6) < 1e-9 and abs(result["seconds"] - 0.75) < 1e-9
    longest = (round(result["longest_wait_s"], 9), result["longest_at_batch"], result["longest_at"]["consumed"])
    assert longest == (0.3, 2, 2)


def test_the_line_gives_the_share_waited_and_the_longest_wait_in_ms(tmp_path, corpus, monkeypatch, capsys):
    """--step-ms is in milliseconds; the share is of the time after the first batch."""
    fake_stream(monkeypatch, [1.0, 0.1, 0.3, 0.2])
    taken = []
    real = bench_loader.wait_for_batches
    monkeypatch.setattr(bench_loader, "wait_for_batches",
                        lambda cfg, step_s, n: taken.append(step_s) or real(cfg, step_s, n))
    config = str(write_config(tmp_path, corpus))
    assert bench_loader.main(["--config", config, "--step-ms", "50", "--batches", "3"]) == 0
    assert taken == [0.05]
    assert capsys.readouterr().out.splitlines()[-1] == (
        "2 worker(s), steps of 50 ms: the first batch after 1.00 s; then 3 batches in 0.8 s, 0.6 s of it waiting for "
        "data (80.0%); the longest wait 300 ms, at batch 2 (reader 1, epoch 0, unit 7, 2 of its pool's 9 windows)")


def test_a_step_of_no_time_is_allowed(tmp_path, corpus, monkeypatch):
    """--step-ms 0: the stream taken as fast as it goes (the usage says >= 0)."""
    fake_stream(monkeypatch, [1.0, 0.1])
    assert bench_loader.main(["--config", str(write_config(tmp_path, corpus)), "--step-ms", "0", "--batches", "1"]) == 0


def test_a_tokenizer_that_cannot_be_loaded_is_one_line(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus, dataset={"tokenizer": str(tmp_path)})
    assert bench_loader.main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: dataset.tokenizer: {tmp_path} is a folder") and len(err.splitlines()) == 1, err
