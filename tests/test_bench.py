"""bench.py: it measures both implementations and reports what it measured (the figures themselves
are in BENCHMARKS.md; no timing is asserted here)."""
import json
import signal
import subprocess

import pytest
import torch

import bench
from adamw4bit import AdamW4bit
from config import Config
from conftest import write_config


def test_both_implementations_are_timed_probed_and_profiled(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus)
    out, table = tmp_path / "bench.json", tmp_path / "new" / "profile.txt"  # its folder is made
    assert bench.main(["--config", str(config), "--steps", "1", "--skip", "loader", "generation",
                       "--json", str(out), "--profile", str(table)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    for name in ("model.py", "reference"):
        measured = results["training"][name]
        assert measured["tokens_per_s"] > 0 and measured["peak_memory_bytes"] >= measured["baseline_rss_bytes"] > 0
    assert "peak RSS MiB" in printed and "profile of a model.py step: wall" in printed
    assert results["profile"]["wall_ms"] > 0 and "Self CPU" in table.read_text()


def test_a_failed_memory_probe_leaves_the_other_figures(tmp_path, corpus, capsys, monkeypatch):
    def failing_probe(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory.")

    monkeypatch.setattr(bench.subprocess, "run", failing_probe)
    config = write_config(tmp_path, corpus)
    assert bench.main(["--config", str(config), "--steps", "1", "--skip", "loader", "generation"]) == 0
    captured = capsys.readouterr()
    assert "note: the memory probe of model.py failed: torch.OutOfMemoryError: CUDA out of memory." in captured.err
    assert "tokens/s" in captured.out and "peak RSS MiB" not in captured.out


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus)
    for option, out in (("--json", tmp_path), ("--profile", tmp_path / "file.txt" / "profile.txt")):
        (tmp_path / "file.txt").write_text("")
        with pytest.raises(SystemExit) as stop:
            bench.main(["--config", str(config), option, str(out)])
        assert stop.value.code == 2 and f"error: {option} {out}: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        bench.main(["--config", str(config), "--skip", "memory", "loaders"])
    assert stop.value.code == 2 and "--skip: invalid choice: 'loaders'" in capsys.readouterr().err
    args = bench.arguments(["--skip", "memory", "training.seed=2", "--steps", "3", "training.seed=1"])
    assert (args.skip, args.overrides) == (["memory"], ["training.seed=2", "training.seed=1"])  # the last applies
    same = tmp_path / "new" / "b.json"
    with pytest.raises(SystemExit) as stop:  # the table would be overwritten by the JSON
        bench.main(["--config", str(config), "--json", str(same), "--profile", str(same)])
    assert stop.value.code == 2 and (f"error: --json and --profile name the same file, {same}: give each a file of "
                                     f"its own") in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # refused before any folder is made for it


def test_a_signal_ends_it_in_one_line(tmp_path, corpus, capsys, monkeypatch):
    """Ctrl-C, or a scheduler's SIGTERM, while it measures: one line and 128 + the signal, not a traceback."""
    def interrupted(*args, **kwargs):
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL  # (else the signal would end the tests)
        signal.raise_signal(signal.SIGTERM)
    host = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a process starts (a host's handler would be kept)
    monkeypatch.setattr(bench, "bench_training", interrupted)
    try:
        with pytest.raises(SystemExit) as stop:
            bench.main(["--config", str(write_config(tmp_path, corpus)), "--skip", "loader", "generation"])
    finally:
        signal.signal(signal.SIGTERM, host)
    assert stop.value.code == 128 + signal.SIGTERM and capsys.readouterr().err.endswith("\nSIGTERM: stopped\n")


def test_the_step_is_train_py_s_and_modes_it_cannot_compare_are_refused(tmp_path, corpus, capsys, monkeypatch):
    forwards, clipped, optimizers = [], [], []
    real_forward, real_clip, real_optimizer = bench.BDH.forward, torch.nn.utils.clip_grad_norm_, bench.make_optimizer
    monkeypatch.setattr(bench.BDH, "forward", lambda self, *a, **k: forwards.append(1) or real_forward(self, *a, **k))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, max_norm: clipped.append(max_norm) or
                        real_clip(p, max_norm))
    monkeypatch.setattr(bench, "make_optimizer", lambda *a: optimizers.append(real_optimizer(*a)) or optimizers[-1])
    config = write_config(tmp_path, corpus, gradient_accumulation_steps=3, grad_clip=0.5)
    cfg = Config.from_yaml(config, ["low_precision.use_4bit_optimizer=true", "training.compile=false"])
    step = bench.make_step(cfg, torch.device("cpu"), "model.py")
    x = torch.randint(0, 256, (4, 16))
    step(x, x)
    assert (len(forwards), clipped, [type(o) for o in optimizers]) == (3, [0.5], [AdamW4bit])
    for mode in ("use_fp8", "use_4bit"):
        assert bench.main(["--config", str(config), f"low_precision.{mode}=true"]) == 1
        assert f"error: low_precision.{mode}: bench.py times model.py against reference.py" in capsys.readouterr().err


def test_missing_data_is_one_line_before_any_timing(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setattr(bench, "bench_training", lambda *args: pytest.fail("timed before the data was checked"))
    config = write_config(tmp_path, corpus)
    assert bench.main(["--config", str(config), "--skip", "memory", f"dataset.parquet_dir={tmp_path / 'nope'}"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {tmp_path / 'nope'}: dataset.parquet_dir does not exist")
