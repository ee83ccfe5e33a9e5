"""The training steps' log lines (step_log.py): which steps get one, and their figures: speed, MFU,
the wait for data, the passes over the data, skipped steps and the time left."""
import collections
import json
import math
import re
import time

import pytest
import torch

import step_log as step_log_module
import train
from config import Config
from conftest import run_dirs, write_config
from metrics import MetricsLog
from shards import Holdout, list_units
from step_log import StepLog


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_eta_counts_the_evaluations_and_checkpoints_still_to_come():
    """On a small run they take most of the time: each at what the last one took."""
    from types import SimpleNamespace
    cfg = Config.from_dict({"training": {"max_iters": 105, "test_freq": 20, "checkpoint_freq": 50}})
    log = SimpleNamespace(cfg=cfg, took={})
    assert StepLog.pauses_left(log, 40) == (0, True)  # none measured yet: the ETA is a lower bound
    log.took = {"the evaluation": 3.0}
    assert StepLog.pauses_left(log, 40) == (3.0 * 5, True)  # the checkpoints' time still unknown
    log.took = {"the evaluation": 3.0, "the checkpoint": 0.5}
    assert StepLog.pauses_left(log, 40) == (3.0 * 5 + 0.5 * 3, False)  # evaluations at 40 (after its line),
    assert StepLog.pauses_left(log, 41) == (3.0 * 4 + 0.5 * 3, False)  # 60, 80, 100, 105; saves at 50, 100, 105
    assert StepLog.pauses_left(log, 105) == (3.0 + 0.5, False)  # the last line: the end's evaluation and save
    log.took = {"the checkpoint": 0.5}
    cfg.training.test_freq = 200  # no evaluation left before the end's... which is still due: unknown
    assert StepLog.pauses_left(log, 104) == (0.5, True)


def test_the_eta_goes_at_the_speed_of_the_last_lines_not_of_one():
    from types import SimpleNamespace
    cfg = Config.from_dict({"training": {"max_iters": 1000, "test_freq": 2000, "checkpoint_freq": 2000}})
    log = SimpleNamespace(cfg=cfg, took={}, steps=10, recent=collections.deque(), recent_total=[0.0, 0], opening=None,
                          pauses_left=lambda step: (0.0, False))

    def eta(step, ms_per_step, first=False, **record):
        return StepLog.eta(log, {"step": step, "ms_per_step": ms_per_step, **record}, first)[0]
    assert eta(10, 900.0, first=True) == pytest.approx(0.9 * 990)  # the loader starting: until there is another
    assert eta(20, 100.0) == pytest.approx(0.1 * 980)  # the first line left out
    assert eta(30, 300.0) == pytest.approx(0.2 * 970)  # a busy interval: the mean of the last lines
    assert eta(40, 100.0, compiling=True) is None and len(log.recent) == 2  # a compiling line is no speed
    for step in range(50, 450, 10):  # 40 lines of 2 s: the last minute holds more than ETA_LINES of them
        eta(step, 200.0)
    assert eta(450, 200.0) == pytest.approx(0.2 * 550)  # the busy and fast intervals have left the window
    assert len(log.recent) == 60 / 2
    log.steps, log.recent, log.recent_total = 1, collections.deque(), [0.0, 0]  # log_freq 1: lines too short
    cfg.training.max_iters = 10_000
    for step in range(1, 3001):  # a minute of them
        eta(step, 20.0)
    # one slow step moves it by its share of the minute (the last 20 lines' speed: 69 ms a step, not 20)
    assert eta(3001, 1000.0) == pytest.approx((20.0 * 2999 + 1000.0) / 3000 / 1000 * (10_000 - 3001), rel=1e-3)
    log.steps, log.recent, log.recent_total = 10, collections.deque(), [0.0, 0]  # lines longer than the minute's
    eta(10, 1000.0, first=True)
    for step, ms in zip(range(20, 320, 10), [1000.0] * 20 + [100.0] * 10):  # 20 lines of 10 s, then 10 of 1 s
        last = eta(step, ms)
    assert last == pytest.approx(110 / 200 * (10_000 - 310)) and len(log.recent) == 20  # the last 20 lines


def test_the_first_steps_are_logged_whatever_log_freq_says(tmp_path, corpus, capsys):
    """Of a resumed run too: its first step compiles, and is logged alone."""
    path = write_config(tmp_path, corpus, max_iters=12, log_freq=100, test_freq=100, checkpoint_freq=100)

    def logged():
        return [int(line.split()[1].split("/")[0]) for line in capsys.readouterr().out.splitlines()
                if line.startswith("step ") and "| loss" in line]
    assert train.main(["--config", str(path)]) == 0
    assert logged() == [1, 2, 5, 10, 12]
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=30"]) == 0
    assert logged() == [13, 14, 17, 22, 30]
    [run] = run_dirs(tmp_path)  # each record says how many steps its figures are the mean of (plot.averaged_at)
    assert [(r["step"], r["interval_steps"]) for r in records(run) if "train_loss" in r] == [
        (1, 1), (2, 1), (5, 3), (10, 5), (12, 2), (13, 1), (14, 1), (17, 3), (22, 5), (30, 8)]
    from types import SimpleNamespace
    debug = SimpleNamespace(cfg=Config.from_dict({"training": {"log_freq": 100, "debug": True}}), first_step=1)
    assert all(StepLog.due(debug, step, ends_a_stretch=False) for step in range(1, 40))  # debug: every step


def test_the_share_of_time_spent_waiting_for_batches_is_logged(tmp_path, corpus, capsys, monkeypatch):
    real = train.train_loader

    def slow_loader(*args, **kwargs):
        for batch in real(*args, **kwargs):
            time.sleep(1.0)  # far longer than a step of the tiny model, even on a loaded machine
            yield batch

    monkeypatch.setattr(train, "train_loader", slow_loader)
    path = write_config(tmp_path, corpus, max_iters=2, test_freq=100)
    assert train.main(["--config", str(path)]) == 0
    assert "waiting for data" in capsys.readouterr().out
    [run] = (tmp_path / "ck").iterdir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # (0.25, not more: on a loaded machine the tiny model's step can take as long as the 1 s wait)
    assert all(0.25 < r["data_wait"] <= 1 for r in records if "data_wait" in r) and len(records) >= 2


def test_a_cpu_run_of_many_hours_points_at_the_cpu_config(tmp_path, corpus, capsys, monkeypatch):
    real = train.train_loader

    monkeypatch.setattr(step_log_module, "SLOW_CPU_STEP_S", 0.1)

    def slow_loader(*args, **kwargs):  # 0.2 s a step: 20,000 steps take 67 minutes
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt  # seen what we came for: stop
            time.sleep(0.2)
            yield batch

    monkeypatch.setattr(train, "train_loader", slow_loader)
    path = write_config(tmp_path, corpus, max_iters=20000, test_freq=100000)
    assert train.main(["--config", str(path)]) == 130
    out = capsys.readouterr().out
    ms_per_step = float(re.search(r"step 2/20000 .*\| ([\d.]+) ms/step", out).group(1))
    hours = re.search(r"note: at this speed the run takes about ([\d.]+) hours on this CPU: model and batch are sized "
                      r"for a GPU; configs/tiny.yaml", out).group(1)
    assert abs(float(hours) - ms_per_step / 1000 * 20000 / 3600) < 0.051 and ms_per_step >= 200  # the loader's 0.2 s


def test_the_passes_logged_after_the_rest_of_an_epoch_on_other_shards_reach_its_end_with_it():
    """Shards added since the checkpoint (its count 3.7 passes): the 40% of epoch 3 read is now a smaller
    share of the data (epochs_read: 3.4). The count goes on from 3.7, reaches 4 as the epoch ends, and
    counts what is read from then on as it is."""
    from distributed import Ranks
    from shards import Unit
    units = [Unit(f"{k}.parquet", 0, 10, 1000, k, 1000) for k in range(10)]
    start = {"reader": 0, "epoch": 3, "unit": 0, "part": 0, "consumed": 0, "carry": [],
             "units": [[k, 0, []] for k in range(4, 10)], "epoch_done": 0.4}  # 6 units left of 10

    def passes_logged(saved_passes, start, *positions):
        log = StepLog(Config(), None, Ranks(), torch.device("cpu"), units, 0, [start], first_step=1,
                      compiling_steps=(), loss_scaled=False, peak=0, saved_passes=saved_passes)
        return [log.passes_logged] + [log.passes([position]) for position in positions]
    halfway, done = {**start, "unit": 3}, {**start, "unit": 6}
    next_epoch = {"reader": 0, "epoch": 4, "unit": 5, "part": 0, "consumed": 0, "carry": []}
    assert passes_logged(3.7, start, halfway, done, next_epoch) == pytest.approx([3.7, 3.85, 4, 4.5])
    assert passes_logged(3.4, start, halfway, done) == pytest.approx([3.4, 3.7, 4])  # the same shards: as read
    assert passes_logged(None, start, halfway) == pytest.approx([3.4, 3.7])  # a checkpoint before 0.4.2: as read
    nothing_left = {**start, "units": []}  # every unit epoch 3 had not finished is gone: epoch 4 is next
    assert passes_logged(3.7, nothing_left, next_epoch) == pytest.approx([4, 4.5])
    # a resume on other documents starts epoch 4 afresh: the 70% read of epoch 3 counts as such, not as a pass
    assert passes_logged(3.7, {**next_epoch, "unit": 0}, next_epoch) == pytest.approx([3.7, 4.2])


def test_the_passes_over_the_training_data_are_counted(tmp_path, corpus, capsys):
    """The corpus's training split holds about 5,600 tokens: 256 per step, so a pass takes about 22 steps."""
    from data import ParquetBatches
    from tokenizer import ByteTokenizer
    path = write_config(tmp_path, corpus, max_iters=60, batch_size=16, log_freq=5, test_freq=1000,
                        checkpoint_freq=1000)
    assert train.main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    [run] = (tmp_path / "ck").iterdir()
    epochs = [r["epochs"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epochs" in r]
    assert epochs == sorted(epochs) and epochs[0] < 0.2
    cfg = Config.from_yaml(path)
    one_pass = sum(1 for _ in ParquetBatches(list_units(corpus, "text"), "train", 16, 16, cfg.training.seed,
                                             Holdout(0.2, cfg.dataset.split_seed), "text", 2, ByteTokenizer(),
                                             shuffle=False))  # batches in one pass
    assert abs(epochs[-1] - 60 / one_pass) < 0.5
    assert "  pass 1 over the training data is done: the documents are read again, reshuffled\n" in out
    assert "  pass 2 over the training data is done" in out
    assert f"done: 60 steps ({epochs[-1]:.2f} passes" in out
    # passes shorter than log_freq: the line says how many ended since the last one
    assert train.main(["--config", str(path), "training.log_freq=1000",
                       f"training.checkpoint_dir={tmp_path / 'ck2'}"]) == 0
    assert "  passes 1 to 2 over the training data are done: the documents are read again, reshuffled\n" in \
        capsys.readouterr().out


def test_float16_steps_the_loss_scaler_skips_are_counted_not_averaged_into_the_grad_norm(tmp_path, corpus, capsys,
                                                                                         monkeypatch):
    """A scale of 2^40 overflows float16 gradients: the scaler skips the step and halves the scale,
    until about step 22. The skipped steps' infinite norms must not turn the logged mean into NaN."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *args, **kwargs: real(*args, init_scale=2.0 ** 40, **kwargs))
    path = write_config(tmp_path, corpus, max_iters=40, log_freq=20, checkpoint_freq=40, test_freq=40)
    assert train.main(["--config", str(path), "low_precision.compute_dtype=float16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"step 1/40 \| .* grad norm - \| .* \| 1 step\(s\) skipped by the float16 loss scaler", out)
    [run] = run_dirs(tmp_path)
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "train_loss" in r}
    assert steps[1]["grad_norm"] is None and steps[1]["skipped_steps"] == 1
    assert 0 < steps[40]["skipped_steps"] < 20 and math.isfinite(steps[40]["grad_norm"])  # steps 21 to 40


def test_writing_lines_evaluating_and_saving_are_not_counted_in_the_speed(tmp_path, corpus, monkeypatch):
    """On a clock that moves 1 ms a reading, and 2 s in the first call of each slow thing: the
    speeds do not depend on how loaded the machine is."""
    clock = [1000.0]

    def perf_counter():
        clock[0] += 1e-3
        return clock[0]

    def slowed(real):  # the first call: a slow disk, TensorBoard starting, W&B's network, a long evaluation
        calls = []

        def slow(*args, **kwargs):
            result = real(*args, **kwargs)
            if not calls:
                clock[0] += 2.0
            calls.append(1)
            return result
        return slow

    monkeypatch.setattr(time, "perf_counter", perf_counter)
    monkeypatch.setattr(MetricsLog, "log", slowed(MetricsLog.log))
    monkeypatch.setattr(train, "evaluate", slowed(train.evaluate))
    monkeypatch.setattr(train, "save", slowed(train.save))
    path = write_config(tmp_path, corpus, max_iters=4, test_freq=2, checkpoint_freq=4)
    assert train.main(["--config", str(path), "logging.tensorboard=false"]) == 0
    [run] = run_dirs(tmp_path)
    speeds = [r["ms_per_step"] for r in records(run) if "ms_per_step" in r]
    # counted, a pause would add 2000 ms to a step's interval (4000 at step 2)
    assert len(speeds) == 4 and max(speeds) < 1000, speeds


def test_mfu_is_the_achieved_training_flops_over_the_peak(monkeypatch):
    from distributed import Ranks
    cfg = Config.from_dict({"training": {"batch_size": 4, "block_size": 64, "gradient_accumulation_steps": 2}})
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    step_log = StepLog(cfg, None, Ranks(), torch.device("cpu"), [], 0, [], first_step=1,
                       compiling_steps=(1, 4), loss_scaled=False, peak=1e12)
    for _ in range(2):  # two steps of two micro-batches in 3 s
        step_log.add_micro_batch(torch.tensor(2.0))
        step_log.add_micro_batch(torch.tensor(2.0))
        step_log.add_step(torch.tensor(0.5))
    clock[0] += 3.0
    record = step_log.measure(2, 1e-3, 1024, [])
    assert record["compiling"]  # its steps 1-2 hold a compiling one (the first; QAT's first is step 4)
    tokens_per_step = 4 * 64 * 2
    assert record["ms_per_step"] == 1500 and record["tokens_per_s"] == round(tokens_per_step / 1.5)
    assert record["mfu"] == pytest.approx(cfg.model.training_flops_per_token(64) * tokens_per_step / 1.5 / 1e12)
    assert record["train_loss"] == 2.0 and record["grad_norm"] == 0.5
    compiling = []
    for step in (3, 4, 5):  # a line a step: only step 4's compiles
        step_log._next_line()
        step_log.add_micro_batch(torch.tensor(2.0))
        step_log.add_step(torch.tensor(0.5))
        clock[0] += 1.0
        compiling.append(step_log.measure(step, 1e-3, 1024, []).get("compiling", False))
    assert compiling == [False, True, False]

    class TwoRanksAlike(Ranks):  # the other rank measured the same: the mean is this rank's
        def mean(self, values):
            return values

        def lowest(self, value, device):
            return value

        def any(self, flag, device):
            return flag
    step_log = StepLog(cfg, None, TwoRanksAlike(world_size=2), torch.device("cpu"), [], 0, [], first_step=1,
                       compiling_steps=(), loss_scaled=False, peak=1e12)
    step_log.add_micro_batch(torch.tensor(2.0))
    step_log.add_step(torch.tensor(0.5))
    clock[0] += 1.5
    record = step_log.measure(1, 1e-3, 2048, [])  # both GPUs' tokens in 1.5 s; MFU is each GPU's share of its peak
    assert record["tokens_per_s"] == round(2 * tokens_per_step / 1.5) and record["mfu"] == pytest.approx(
        cfg.model.training_flops_per_token(64) * tokens_per_step / 1.5 / 1e12)


def test_a_line_of_several_steps_averages_the_applied_steps_grad_norms_and_shares_its_wait(monkeypatch):
    from distributed import Ranks
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    step_log = StepLog(Config(), None, Ranks(), torch.device("cpu"), [], 0, [], first_step=1, compiling_steps=(),
                       loss_scaled=True, peak=0)
    for norm in (float("inf"), 0.5, 1.5, 2.0):  # float16: the scaler skipped the first
        step_log.add_micro_batch(torch.tensor(2.0))
        step_log.add_step(torch.tensor(norm))
    step_log.data_wait_s, clock[0] = 1.0, clock[0] + 4.0
    record = step_log.measure(4, 1e-3, 1024, [])
    assert record["skipped_steps"] == 1 and record["grad_norm"] == pytest.approx(4.0 / 3)
    assert record["data_wait"] == 0.25  # 1 s of the line's 4


def test_the_passes_follow_every_reader_of_a_rest_of_an_epoch_and_a_pass_ends_with_the_slowest():
    from distributed import Ranks
    from shards import Unit
    units = [Unit(f"{k}.parquet", 0, 10, size, k, size) for k, size in enumerate((1000, 2000, 7000))]
    redealt = [{"reader": r, "epoch": 3, "unit": 0, "part": 0, "consumed": 0, "carry": [], "units": [[r, 0, []]],
                "epoch_done": 0.5} for r in (0, 1)]
    step_log = StepLog(Config(), None, Ranks(), torch.device("cpu"), units, 2, redealt, first_step=1,
                       compiling_steps=(), loss_scaled=False, peak=0)
    ahead = {"reader": 0, "epoch": 4, "unit": 0, "part": 0, "consumed": 0, "carry": []}  # epoch 3 done, 4 begun
    assert step_log.passes([ahead, {**redealt[1], "unit": 1}]) == pytest.approx(4)
    assert step_log.epoch == 3 and step_log.epoch_all_are_in([ahead, redealt[1]]) == 3  # (the slower one's)


def test_only_the_first_line_s_wait_for_data_is_the_loader_starting(monkeypatch, capsys):
    from types import SimpleNamespace
    from distributed import Ranks
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    step_log = StepLog(Config(), SimpleNamespace(log=lambda record: None), Ranks(), torch.device("cpu"), [], 0,
                       [], first_step=5, compiling_steps=(), loss_scaled=False, peak=0)  # resumed at step 4
    for step in (5, 6):
        step_log.add_micro_batch(torch.tensor(2.0))
        step_log.add_step(torch.tensor(0.5))
        step_log.data_wait_s, clock[0] = 0.5, clock[0] + 1.0
        step_log.write(step_log.measure(step, 1e-3, 1024, []))
    first, second = capsys.readouterr().out.splitlines()
    assert " | waiting for data 50% (the loader starting) | " in first and " | waiting for data 50% | " in second


def test_a_step_that_evaluates_or_saves_has_its_line(tmp_path, corpus):
    path = write_config(tmp_path, corpus, max_iters=13, log_freq=5, test_freq=4, checkpoint_freq=6, keep_last_n=0)
    assert train.main(["--config", str(path), "logging.tensorboard=false"]) == 0
    [run] = run_dirs(tmp_path)
    logged = [r["step"] for r in records(run) if "train_loss" in r]
    # log_freq: 5, 10; the first steps: 1, 2, 5, 10; evaluations: 4, 8, 12; checkpoints: 6, 12; the end: 13
    assert logged == [1, 2, 4, 5, 6, 8, 10, 12, 13]
