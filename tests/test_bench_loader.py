"""bench_loader.py: a config's training stream taken at the pace of a step (no timing is asserted; the
figures are in BENCHMARKS.md)."""
import multiprocessing
import re

import pytest

import bench_loader
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
