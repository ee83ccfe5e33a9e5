"""bench.py: it measures both implementations and reports what it measured (the figures themselves
are in BENCHMARKS.md; no timing is asserted here)."""
import json
import math
import signal
import subprocess

import pytest
import torch

import bench
from adamw4bit import AdamW4bit
from config import Config
from conftest import ROOT, write_config


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
    out, err = capsys.readouterr()
    assert stop.value.code == 128 + signal.SIGTERM and err.endswith("\nSIGTERM: stopped\n")
    assert "sized for a GPU" not in out  # (a model for a CPU)


def test_a_model_sized_for_a_gpu_is_said_on_a_cpu_before_the_timing(capsys, monkeypatch):
    class Timing(Exception):
        pass

    def timing(*args):
        raise Timing
    monkeypatch.setattr(bench, "bench_training", timing)
    with pytest.raises(Timing):
        bench.main(["--config", str(ROOT / "config.yaml"), "--skip", "loader", "generation", "memory",
                    "training.device=cpu"])
    assert ("TFLOP per process, seconds to minutes on a CPU (bench.py times 10 of them after 2 warm-up steps, for each "
            "of the two implementations): this model is sized for a GPU; configs/tiny.yaml") in capsys.readouterr().out


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


def fake_clock(monkeypatch):
    """bench.device_clock reads `now[0]`, which only the test's stand-ins move."""
    now = [0.0]
    monkeypatch.setattr(bench, "device_clock", lambda device: now[0])
    return now


def step_norms(tmp_path, corpus, monkeypatch, **training):
    """The gradient norm of one step of model.py (the norm clip_grad_norm_ measures), and the max_norm it was given."""
    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, max_norm: seen.append(
        (float(real_clip(p, max_norm)), max_norm)) or seen[-1][0])
    cfg = Config.from_yaml(write_config(tmp_path, corpus, model={"dropout": 0.0}, **training),
                           ["training.compile=false"])
    step = bench.make_step(cfg, torch.device("cpu"), "model.py")
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    step(x, x)
    return seen


def test_accumulated_gradients_are_averaged_and_no_clip_is_no_limit(tmp_path, corpus, monkeypatch):
    """As train.py: 3 micro-steps on one batch give its gradient (not 3 times it); grad_clip 0 clips nothing."""
    [(one, limit)] = step_norms(tmp_path, corpus, monkeypatch, gradient_accumulation_steps=1, grad_clip=0.0)
    [(three, _)] = step_norms(tmp_path, corpus, monkeypatch, gradient_accumulation_steps=3, grad_clip=0.0)
    assert limit == math.inf and three == pytest.approx(one, rel=1e-4)


def test_the_loss_scaler_is_on_in_float16_alone(tmp_path, corpus, monkeypatch):
    seen = []
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler",
                        lambda device, enabled: seen.append(enabled) or real(device, enabled=False))
    config = write_config(tmp_path, corpus)
    for dtype in ("float32", "bfloat16", "float16"):
        bench.make_step(Config.from_yaml(config, [f"low_precision.compute_dtype={dtype}"]), torch.device("cpu"),
                        "model.py")
    assert seen == [False, False, True]


def test_tokens_per_second_count_every_micro_step(tmp_path, corpus, monkeypatch):
    """A step of 10 ms over batches of 4 x 16 tokens, accumulated twice: 12,800 tokens/s, the median step 10 ms."""
    now = fake_clock(monkeypatch)
    monkeypatch.setattr(bench, "make_step", lambda cfg, device, name: lambda x, y: now.__setitem__(0, now[0] + 0.01))
    cfg = Config.from_yaml(write_config(tmp_path, corpus, gradient_accumulation_steps=2))
    out = bench.bench_training(cfg, torch.device("cpu"), steps=3)
    for name in bench.IMPLEMENTATIONS:
        assert out[name]["ms_per_step"] == pytest.approx(10) and out[name]["tokens_per_s"] == pytest.approx(12_800)


def test_full_recompute_is_timed_for_every_token_it_would_generate(tmp_path, corpus, monkeypatch):
    """A forward pass whose time grows with its context as T ms: generating 9 tokens after a 10-token prompt by
    full recompute runs passes over 10, 11, ... 18 tokens, 126 ms in all; the recurrent model is timed on the prompt."""
    now, prompts = fake_clock(monkeypatch), []

    class Model:
        def __init__(self, config):
            pass

        def to(self, device):
            return self

        def eval(self):
            return self

        def generate(self, prompt, new_tokens, temperature):
            prompts.append(prompt.shape[1])
            now[0] += 0.5

    monkeypatch.setattr(bench, "BDH", Model)
    monkeypatch.setattr(bench, "reference_forward", lambda model, idx: now.__setitem__(0, now[0] + idx.shape[1] / 1000))
    cfg = Config.from_yaml(write_config(tmp_path, corpus))
    out = bench.bench_generation(cfg, torch.device("cpu"), prompt_len=10, new_tokens=9, samples=5)
    assert prompts == [8, 10]
    assert out["recurrent_tokens_per_s"] == pytest.approx(18)
    assert out["full_recompute_tokens_per_s"] == pytest.approx(9 / 0.126)
    assert list(out["full_recompute_forward_s"]) == [10, 12, 14, 16, 18]


def test_the_profile_gives_the_wall_time_of_one_step(tmp_path, corpus, monkeypatch):
    now = fake_clock(monkeypatch)
    monkeypatch.setattr(bench, "make_step", lambda cfg, device, name: lambda x, y: now.__setitem__(0, now[0] + 0.01))
    cfg = Config.from_yaml(write_config(tmp_path, corpus))
    out = bench.profile_training(cfg, torch.device("cpu"), tmp_path / "table.txt", steps=3)
    assert out["wall_ms"] == pytest.approx(10) and (tmp_path / "table.txt").is_file()


def test_the_loader_is_compared_with_the_batches_the_model_takes(tmp_path, corpus, monkeypatch):
    """40 ms a step of 2 micro-steps: the model takes 50 batches a second."""
    monkeypatch.setattr(bench, "loader_workers", lambda cfg, units: 1)
    monkeypatch.setattr(bench, "train_loader", lambda *args: iter(lambda: 1, None))
    cfg = Config.from_yaml(write_config(tmp_path, corpus, gradient_accumulation_steps=2))
    out = bench.loader_throughput(cfg, [], None, model_ms_per_step=40, seconds=0.05)
    assert out["model_batches_per_s"] == pytest.approx(50)
    assert out["loader_over_model"] == pytest.approx(out["batches_per_s"] / 50)


def test_the_table_gives_model_py_over_reference(capsys):
    """model.py twice as fast, half the memory above the start: ratios 2.00x and 0.50x."""
    mib = 2**20
    training = {"model.py": {"tokens_per_s": 2000, "ms_per_step": 5, "peak_memory_bytes": 300 * mib,
                             "baseline_rss_bytes": 200 * mib},
                "reference": {"tokens_per_s": 1000, "ms_per_step": 10, "peak_memory_bytes": 400 * mib,
                              "baseline_rss_bytes": 200 * mib}}
    bench.print_training(training, torch.device("cpu"), None)
    out = capsys.readouterr().out
    assert f"{'tokens/s':<16}{'2,000':>14}{'1,000':>14}{'2.00':>9}x" in out
    assert f"{'step MiB':<16}{'100':>14}{'200':>14}{'0.50':>9}x" in out


def test_no_timed_steps_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.arguments(["--steps", "0"])
    assert stop.value.code == 2 and "--steps must be at least 1, got 0" in capsys.readouterr().err


def test_skip_memory_starts_no_probe(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(bench, "memory_probe", lambda *args: pytest.fail("a memory probe was started"))
    monkeypatch.setattr(bench, "bench_training", lambda cfg, device, steps: {
        name: {"ms_per_step": 1.0, "tokens_per_s": 1.0} for name in bench.IMPLEMENTATIONS})
    config = write_config(tmp_path, corpus)
    assert bench.main(["--config", str(config), "--skip", "memory", "loader", "generation"]) == 0
