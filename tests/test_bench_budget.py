"""bench_budget.py: a variant trains on the first 90% of a text and its checkpoints are measured on the
rest (no timing is asserted; the figures are in BENCHMARKS.md)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bench_budget
from conftest import ROOT, write_config

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(100))


def test_a_variant_gives_a_held_out_curve_from_any_directory(tmp_path, corpus, monkeypatch, capsys):
    """...and its results are written before the next variant, which here fails."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    config = write_config(tmp_path, corpus, max_iters=4, warmup_iters=8)
    out = tmp_path / "results.json"
    monkeypatch.chdir(tmp_path)  # train.py is found beside bench_budget.py, not in the working directory
    assert bench_budget.main(["--config", str(config), "--text", str(text), "--seconds", "0", "--variant", "plain",
                              "--variant", "failing", "training.resume_from_checkpoint=nothing.pt",
                              "--json", str(out)]) == 1
    said = capsys.readouterr().out
    assert "\n  step 4/4 | loss " in said  # train.py's progress, passed on, and its notes
    assert "\n  note: training.warmup_iters 8 >= max_iters 4: the learning rate rises only to " in said
    assert json.loads(out.read_text())["complete"] is False
    [(name, result)] = json.loads(out.read_text())["variants"].items()
    assert name == "plain" and result["max_iters"] == 4
    assert [len(point) for point in result["curve"]] == [2] * 4  # (seconds, held-out loss) at every step
    assert result["heldout_loss"] == result["curve"][-1][1] < 5.55  # ln 256: it learned something


def refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        bench_budget.main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_bad_arguments_are_refused_before_any_variant_trains(tmp_path, corpus, monkeypatch, capsys):
    calls = fake_variants(monkeypatch)
    config = write_config(tmp_path, corpus)
    assert "error: --variant a is given twice: give each variant its own name" in refused(
        capsys, ["--config", str(config), "--text", str(ROOT / "README.md"), "--variant", "a", "--variant", "a",
                 "model.n_layer=2"])
    assert f"error: --text {ROOT / 'READM.md'}: does not exist; did you mean {ROOT / 'README.md'}?\n" in refused(
        capsys, ["--config", str(config), "--text", str(ROOT / "READM.md")])
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert "error: --seconds must be >= 0 (0: the config's own max_iters), got -0.5" in refused(
        capsys, ["--config", str(config), "--text", str(text), "--seconds", "-0.5"])
    assert "model.n_layer" in refused(capsys, ["--config", str(config), "--text", str(text), "--seconds", "0",
                                               "--variant", "a", "--variant", "b", "model.n_layer=two"])
    text.write_text("x" * 50)
    assert f"error: --text {text}: 50 characters; give a text to train on" in refused(
        capsys, ["--config", str(config), "--text", str(text)])
    text.write_bytes(b"\xff\xfe" + b"\x80" * 200)
    assert f"error: --text {text}: cannot read it as UTF-8 text (" in refused(
        capsys, ["--config", str(config), "--text", str(text)])
    assert calls == []


def running(text: str) -> dict[int, str]:
    """pid -> session id of the processes whose command line holds `text` (Linux)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found[int(entry.name)] = os.getsid(int(entry.name))
        except OSError:  # a process that ended meanwhile
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads the processes' command lines in /proc")
def test_a_benchmark_stopped_by_sigterm_removes_its_folder_of_runs_and_stops_its_training(tmp_path, corpus):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    config = write_config(tmp_path, corpus, max_iters=100000, log_freq=1)
    folder = tmp_path / "tmp"  # where the benchmark's runs are: their train.py's command lines name it
    folder.mkdir()
    command = [sys.executable, str(ROOT / "bench_budget.py"), "--config", str(config), "--text", str(text),
               "--seconds", "0"]
    env = {**os.environ, "TMPDIR": str(folder), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert any(line.startswith("  step 1/") for line in bench.stdout)  # train.py is training
        [(pid, session)] = running(str(folder)).items()
        assert session == pid != bench.pid  # a session of its own: the benchmark kills it with its loader workers
        bench.send_signal(signal.SIGTERM)  # the benchmark alone, as a scheduler may: it stops train.py itself
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 3  # (a process killed may take a moment to go)
        while running(str(folder)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running(str(folder)) == {}
        assert bench.stderr.read().endswith("\nSIGTERM: stopped\n")
    finally:
        bench.kill()
        bench.stdout.close()
        bench.stderr.close()
    assert list(folder.iterdir()) == []


def test_calibration_takes_the_start_up_and_the_seconds_per_step_of_the_second_half(monkeypatch):
    # the loop starts after 10 s, then 0.5 s a step; the first steps are slower (compilation)
    records = [{"step": s, "elapsed_s": 10 + 0.5 * s + (3.0 if s < 30 else 0.0)} for s in range(10, 61, 10)]
    seen = []
    monkeypatch.setattr(bench_budget, "train_in", lambda workdir, args, python: seen.append(args) or (None, records))
    startup, per_step = bench_budget.calibrate("c.yaml", ["x.y=1"], None)
    assert per_step == pytest.approx(0.5) and startup == pytest.approx(10.0)
    assert "training.max_iters=60" in seen[0] and "x.y=1" in seen[0]


class ZeroLogits(torch.nn.Module):
    """Uniform over 256 tokens (a loss of ln 256 on every token); records the batches it is given."""
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(*x.shape, 256), None


def test_heldout_loss_is_the_mean_over_every_token_after_the_first(monkeypatch):
    model = ZeroLogits()
    ckpt = SimpleNamespace(tokenizer="bytes", config={"training": {"block_size": 4}})
    monkeypatch.setattr(bench_budget, "load_checkpoint", lambda path: ckpt)
    monkeypatch.setattr(bench_budget, "model_from_checkpoint", lambda c: model)
    text = "abcdefghijklm"  # 13 tokens: 12 predicted in windows of 4, 4, 4 (none shorter); 11 tokens: 4, 4, 2
    assert bench_budget.heldout_loss("ck.pt", text) == pytest.approx(math.log(256))
    assert sum(batch.numel() for batch in model.seen) == 12
    model.seen.clear()
    assert bench_budget.heldout_loss("ck.pt", text[:11]) == pytest.approx(math.log(256))
    assert sorted(batch.shape[1] for batch in model.seen) == [2, 4]  # the stacked full windows, the shorter last
    assert sum(batch.numel() for batch in model.seen) == 10
    model.seen.clear()
    assert bench_budget.heldout_loss("ck.pt", text[:12]) == pytest.approx(math.log(256))
    assert sum(batch.numel() for batch in model.seen) == 11  # windows of 4, 4 and 3 predictions


def fake_training(monkeypatch, tmp_path, rates=(100.0, 200.0, 300.0, 400.0)):
    """train_in writes empty checkpoint files at every checkpoint_freq and returns records logged then."""
    calls = []

    def train_in(workdir, args, python):
        given = dict(a.split("=", 1) for a in args if "=" in a)
        calls.append(given)
        max_iters, every = int(given["training.max_iters"]), int(given["training.checkpoint_freq"])
        run = tmp_path / f"run{len(calls)}"
        run.mkdir()
        steps = sorted({*range(every, max_iters + 1, every), max_iters})
        for s in steps:
            (run / f"checkpoint_{s}.pt").write_bytes(b"")
        log = sorted({*range(0, max_iters + 1, int(given["training.log_freq"])), max_iters})
        records = [{"step": s, "elapsed_s": 2.0 * s + 1, "tokens_per_s": rates[i % len(rates)]}
                   for i, s in enumerate(log)]
        return run, records
    monkeypatch.setattr(bench_budget, "train_in", train_in)
    monkeypatch.setattr(bench_budget, "load_checkpoint", lambda path: SimpleNamespace(
        config={"training": {"batch_size": 4, "block_size": 16, "gradient_accumulation_steps": 3}},
        model_config={"n_layer": 2, "n_embd": 32, "n_head": 2, "mlp_internal_dim_multiplier": 4}))
    monkeypatch.setattr(bench_budget, "heldout_loss", lambda path, text: 5.0 - 0.01 * int(path.stem.split("_")[1]))
    return calls


def test_a_budget_gives_the_steps_that_fill_it_and_reports_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    calls = fake_training(monkeypatch, tmp_path)
    monkeypatch.setattr(bench_budget, "calibrate", lambda config, overrides, workdir: (10.0, 0.5))
    result = bench_budget.run_variant("c.yaml", ["a.b=1"], 30, tmp_path / "data", "held out", tmp_path / "w")
    assert result["max_iters"] == 40 == int(calls[0]["training.max_iters"])  # (30 - 10) / 0.5
    assert calls[0]["training.checkpoint_freq"] == "5" == calls[0]["training.log_freq"]  # 40 // 8
    assert result["startup_s"] == 10.0 and result["ms_per_step"] == 500.0
    assert result["tokens"] == 40 * 4 * 16 * 3  # max_iters x batch x block x gradient accumulation
    assert len(result["curve"]) == 8 and result["curve"][-1] == (81.0, 4.6)  # (elapsed at step 40, its loss)
    assert result["heldout_loss"] == 4.6 and result["seconds"] == 81.0
    assert result["parameters"] > 0
    # the logged rates at steps 0, 5, ..., 40, the first left out: 200, 300, 400, 100, ... -> median 250
    assert result["tokens_per_s"] == 250.0
    said = capsys.readouterr().out
    assert "  checkpoint_40.pt: held-out loss 4.6000\n" in said and "note:" not in said


def test_a_budget_too_short_for_the_curve_trains_its_points_and_says_so(tmp_path, monkeypatch, capsys):
    fake_training(monkeypatch, tmp_path)
    monkeypatch.setattr(bench_budget, "calibrate", lambda config, overrides, workdir: (10.0, 0.5))
    result = bench_budget.run_variant("c.yaml", [], 12, tmp_path / "data", "held out", tmp_path / "w")
    assert result["max_iters"] == 8  # (12 - 10) / 0.5 = 4 steps: fewer than a point a step of the curve
    assert ("note: 12 s hold fewer than 8 steps after the start-up (10 s, then 0.50 s a step): this variant "
            "trains 8 steps, past the budget") in capsys.readouterr().out


def test_seconds_0_keeps_the_configs_max_iters_and_a_checkpoint_every_eighth(tmp_path, corpus, monkeypatch):
    calls = fake_training(monkeypatch, tmp_path)
    config = write_config(tmp_path, corpus, max_iters=16)
    result = bench_budget.run_variant(str(config), [], 0, tmp_path / "data", "held out", tmp_path / "w")
    assert result["max_iters"] == 16 and calls[0]["training.checkpoint_freq"] == "2"
    assert result["startup_s"] is None and result["ms_per_step"] is None and len(result["curve"]) == 8


def fake_variants(monkeypatch):
    """run_variant faked: (overrides, seconds, held-out text, whether the training data is there) of each call;
    a variant's work folder is checked to lie in the benchmark's temporary folder, which is removed at the end."""
    calls = []

    def run_variant(config, overrides, seconds, data, heldout, workdir):
        assert workdir.resolve().parent == data.parent.resolve()
        calls.append((overrides, seconds, heldout, (data / "train").is_dir()))
        return {"overrides": overrides, "max_iters": 8, "tokens": 1234,
                "tokens_per_s": 99.0 if len(calls) == 1 else None, "curve": [(1.0, 4.5), (2.0, 3.25)],
                "heldout_loss": 3.25, "seconds": 2.0}
    monkeypatch.setattr(bench_budget, "run_variant", run_variant)
    return calls


def test_the_text_is_cut_at_90_percent_and_each_variant_adds_to_the_common_overrides(tmp_path, corpus, monkeypatch,
                                                                                     capsys):
    calls = fake_variants(monkeypatch)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "r.json"
    config = write_config(tmp_path, corpus)
    assert bench_budget.main(["--config", str(config), "--text", str(text), "--seconds", "5", "--variant", "a",
                              "model.n_layer=1", "--variant", "../b", "--json", str(out), "training.max_iters=8"]) == 0
    cut = math.floor(len(TEXT) * 0.9)
    assert calls == [(["training.max_iters=8", "model.n_layer=1"], 5.0, TEXT[cut:], True),
                     (["training.max_iters=8"], 5.0, TEXT[cut:], True)]
    said = capsys.readouterr().out
    assert "a: held-out loss 3.2500 after 2 s, 8 steps, 1,234 tokens, 99.0 tok/s; curve " in said
    # a run of one step has no rate after its first (train.py's first steps are no interval)
    assert "../b: held-out loss 3.2500 after 2 s, 8 steps, 1,234 tokens, tok/s not measured (too few steps)" in said
    results = json.loads(out.read_text())
    assert results["complete"] is True and list(results["variants"]) == ["a", "../b"]
