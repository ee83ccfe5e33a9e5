"""metrics.jsonl, TensorBoard and W&B (offline): what a run logs, on resume too, and that logging
changes nothing about training. (The log line's figures: test_step_log.py.)"""
import errno
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

import metrics
import train
from checkpoint import load_checkpoint
from config import Config
from conftest import write_config
from metrics import MetricsLog
from rundir import RunDir
from runtime import config_as_run

CPU = torch.device("cpu")
TRAIN_TAGS = {"train/loss", "train/lr", "train/grad_norm", "speed/tokens_per_s", "speed/ms_per_step", "speed/data_wait",
              "memory/peak_mib", "data/epochs"}
VAL_TAGS = {"val/loss", "val/bits_per_byte", "sparsity/x_layer0", "sparsity/x_layer1", "sparsity/y_layer0",
            "sparsity/y_layer1", "sparsity/x_mean", "sparsity/y_mean"}


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def events(run, as_the_server_reads=False):
    """TensorBoard's events of a run; as_the_server_reads: through the reader of TensorBoard's server
    (scalars as tensors), which takes a run's first session START as its beginning, not a restart."""
    from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
    module = plugin_event_accumulator if as_the_server_reads else event_accumulator
    accumulator = module.EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_evaluations_measured_anew_are_a_tensorboard_run_of_their_own(tmp_path, corpus):
    """A resume that changes what validation measures (eval_iters here): TensorBoard's val/loss does not
    join losses that do not compare; the evaluations since are validation_from_step_<step>, beside the
    run's, cut back as the run's are by a later resume, and gone with a resume from before that step."""
    path = write_config(tmp_path, corpus, max_iters=4, test_freq=2, checkpoint_freq=2)
    assert train.main(["--config", str(path)]) == 0
    [run] = (tmp_path / "ck").iterdir()
    resume = ["--config", str(path), "training.eval_iters=1", "training.max_iters=8"]
    assert train.main([*resume, f"training.resume_from_checkpoint={run}"]) == 0

    def val_steps(folder):
        return [event.step for event in events(folder).Scalars("val/loss")]
    assert val_steps(run) == [2, 4] and val_steps(run / "validation_from_step_6") == [6, 8]
    assert [(r["step"], r.get("measured_anew")) for r in records(run) if "val_loss" in r][2:] == [(6, True), (8, None)]
    assert "train/loss" not in events(run / "validation_from_step_6").Tags()["scalars"]
    assert train.main([*resume, f"training.resume_from_checkpoint={run / 'checkpoint_6.pt'}"]) == 0  # a branch
    assert val_steps(run / "validation_from_step_6") == [6, 8] and val_steps(run) == [2, 4]  # (8 again, once)
    assert train.main(["--config", str(path), "training.max_iters=6",
                       f"training.resume_from_checkpoint={run / 'checkpoint_4.pt'}"]) == 0
    assert not (run / "validation_from_step_6").exists() and val_steps(run) == [2, 4, 6]


def test_a_resume_that_evaluates_its_step_first_redoes_the_validation_run_begun_there(tmp_path, corpus, monkeypatch):
    """A stop saved before the evaluation it was due (evaluation_due) just after a change: the resume
    measures that step anew and begins validation_from_step_<it> there; a branch from that checkpoint
    again redoes that evaluation, so the run begun there goes whole, not kept beside the new points.
    A run's first evaluations, measured anew in a new run directory, have nothing to keep apart."""
    path = write_config(tmp_path, corpus, max_iters=4, test_freq=2, checkpoint_freq=2)
    assert train.main(["--config", str(path)]) == 0
    [run] = (tmp_path / "ck").iterdir()
    real = train.write_step_line

    def stop_at_step_6(step_log, step, lr, progress):
        real(step_log, step, lr, progress)
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # saved after step 6, before its evaluation
    monkeypatch.setattr(train, "write_step_line", stop_at_step_6)
    resume = ["--config", str(path), "training.eval_iters=1", "training.max_iters=8"]
    assert train.main([*resume, f"training.resume_from_checkpoint={run}"]) == 0
    stopped = load_checkpoint(run / "checkpoint_6.pt")
    assert stopped.evaluation_due and stopped.measured_anew
    monkeypatch.setattr(train, "write_step_line", real)
    assert train.main([*resume, f"training.resume_from_checkpoint={run}"]) == 0

    def val_steps(folder):
        return [event.step for event in events(folder).Scalars("val/loss")]
    assert val_steps(run / "validation_from_step_6") == [6, 8] and val_steps(run) == [2, 4]
    assert train.main([*resume, f"training.resume_from_checkpoint={run / 'checkpoint_6.pt'}"]) == 0
    assert val_steps(run / "validation_from_step_6") == [6, 8]  # (once each)
    shutil.copy(run / "checkpoint_4.pt", tmp_path / "copy.pt")  # trains on in a run directory of its own
    assert train.main([*resume, "training.checkpoint_dir=" + str(tmp_path / "other"),
                       f"training.resume_from_checkpoint={tmp_path / 'copy.pt'}"]) == 0
    [other] = (tmp_path / "other").iterdir()
    assert val_steps(other) == [6, 8] and not list(other.glob("validation_from_step_*"))


def hparams_shown(run) -> dict:
    """The settings TensorBoard's HParams tab shows for a run (its server keeps a run's first)."""
    from tensorboard.plugins.hparams import metadata
    content = events(run, as_the_server_reads=True).SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content
    shown = metadata.parse_session_start_info_plugin_data(content).hparams
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in shown.items()}


def test_tensorboard_holds_the_scalars_and_samples_of_metrics_jsonl(tmp_path, corpus):
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=4, compile="auto")
    assert train.main(["--config", str(path)]) == 0
    [run] = (tmp_path / "ck").iterdir()
    logged = events(run)
    assert TRAIN_TAGS | VAL_TAGS <= set(logged.Tags()["scalars"])
    train_records = [r for r in records(run) if "train_loss" in r]
    assert [e.step for e in logged.Scalars("train/loss")] == [1, 2, 3, 4]  # logged before the directory existed too
    assert [(e.step, e.value) for e in logged.Scalars("data/tokens")] == [(s, s * 4 * 16) for s in (1, 2, 3, 4)]
    for event, record in zip(logged.Scalars("train/grad_norm"), train_records):
        assert event.value == pytest.approx(record["grad_norm"], rel=1e-6) and record["grad_norm"] > 0
    val_records = [r for r in records(run) if "val_loss" in r]
    assert [e.step for e in logged.Scalars("val/loss")] == [2, 4]
    for event, record in zip(logged.Scalars("sparsity/x_layer1"), val_records):
        assert event.value == pytest.approx(record["sparsity_x"][1], rel=1e-6) and 0 < event.value < 1
    samples = logged.Tensors("sample/text_summary")
    assert [e.step for e in samples] == [2, 4]
    text = samples[-1].tensor_proto.string_val[0].decode()
    prompt, continuation = val_records[-1]["sample_prompt"], val_records[-1]["sample"]
    assert text == (f"validation text:\n\n    {prompt.replace(chr(10), chr(10) + '    ')}\n\nthe model continues:\n\n"
                    f"    {continuation.replace(chr(10), chr(10) + '    ')}")
    assert all(0 < r["val_bits_per_byte"] and r["tokens"] == r["step"] * 4 * 16 for r in val_records)
    [config] = logged.Tensors("config/text_summary")  # which run this is, in TensorBoard's text tab
    assert config.step == 0 and config.tensor_proto.string_val[0].decode() == (
        "    " + config_as_run(Config.from_yaml(path), CPU).replace("\n", "\n    "))
    settings = Config.from_yaml(path).to_dict()  # and in its HParams tab, every setting but logging's
    shown = hparams_shown(run)
    assert set(shown) == {f"{section}.{key}" for section, values in settings.items() if section != "logging"
                          for key in values}
    assert (shown["model.n_layer"], shown["training.learning_rate"], shown["dataset.parquet_dir"]) == (
        settings["model"]["n_layer"], settings["training"]["learning_rate"], settings["dataset"]["parquet_dir"])
    assert (shown["training.debug"], shown["dataset.val_parquet_dir"]) == ("false", "null")  # as the file writes them
    assert shown["training.compile"] == "false"  # auto, as it resolved: not on a CPU


def test_a_resumed_run_logs_each_step_once(tmp_path, corpus):
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=2, keep_last_n=0)
    assert train.main(["--config", str(path)]) == 0
    [run] = (tmp_path / "ck").iterdir()
    first = records(run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_l')  # a kill cut the last append short: the resume drops it
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run / 'checkpoint_2.pt'}"]) == 0
    assert [r["step"] for r in records(run) if "train_loss" in r] == [1, 2, 3, 4]
    assert [(r["step"], r["train_loss"]) for r in records(run) if "train_loss" in r] == \
        [(r["step"], r["train_loss"]) for r in first if "train_loss" in r]  # exact resume
    assert hparams_shown(run)["training.resume_from_checkpoint"] == "null"  # the settings the run started with
    assert [e.step for e in events(run).Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events(run, as_the_server_reads=True).Tensors("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events(run).Tensors("config/text_summary")] == [0, 3]  # the resume's config too


def test_a_resume_without_metrics_jsonl_says_where_its_records_start(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=2, keep_last_n=0)
    assert train.main(["--config", str(path), "training.max_iters=2"]) == 0
    [run] = (tmp_path / "ck").iterdir()
    (run / "metrics.jsonl").unlink()
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=4"]) == 0
    assert f"note: {run / 'metrics.jsonl'} is missing: the run's records (plot.py) start again at step 3" in \
        capsys.readouterr().out
    assert [r["step"] for r in records(run) if "train_loss" in r] == [3, 4]


def test_tokens_count_what_each_step_trained_on_when_a_resume_changes_the_batch(tmp_path, corpus):
    path = write_config(tmp_path, corpus, max_iters=3, checkpoint_freq=2, keep_last_n=0)
    assert train.main(["--config", str(path)]) == 0
    [run] = (tmp_path / "ck").iterdir()
    per_step = load_checkpoint(run / "checkpoint_2.pt").tokens // 2
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run / 'checkpoint_2.pt'}",
                       "training.gradient_accumulation_steps=2"]) == 0
    assert [(r["step"], r["tokens"]) for r in records(run) if "train_loss" in r] == [
        (1, per_step), (2, 2 * per_step), (3, 4 * per_step)]
    assert load_checkpoint(run / "checkpoint_3.pt").tokens == 4 * per_step


def wandb_log_holds(logs, texts, seconds=30) -> bool:
    """Whether one of W&B's offline record logs holds all the texts. W&B's service process may write
    them a moment after wandb.finish() returns (seen on a busy machine): they get `seconds` to appear."""
    deadline = time.monotonic() + seconds
    while not any(all(text.encode() in log.read_bytes() for text in texts) for log in logs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_logging_changes_no_loss_and_wandb_offline_holds_the_run(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=2, keep_last_n=0, compile="auto")
    assert train.main(["--config", str(path), "training.checkpoint_dir=" + str(tmp_path / "off"),
                       "logging.tensorboard=false"]) == 0
    assert train.main(["--config", str(path), "logging.wandb=true", "logging.wandb_run_name=tiny"]) == 0
    [off], [on] = (tmp_path / "off").iterdir(), [p for p in (tmp_path / "ck").iterdir() if p.name.startswith("run_")]
    assert not list(off.glob("events.out.tfevents*")) and list(on.glob("events.out.tfevents*"))
    assert [r.get("train_loss") for r in records(off)] == [r.get("train_loss") for r in records(on)]
    weights_off, weights_on = load_checkpoint(off / "checkpoint_4.pt").model, load_checkpoint(on / "checkpoint_4.pt").model
    assert all(torch.equal(weights_off[k], weights_on[k]) for k in weights_off)
    run_id = (on / "wandb_run_id").read_text()
    [offline] = (tmp_path / "ck" / "wandb").glob(f"offline-run-*-{run_id}")
    # W&B's offline record log (what `wandb sync` uploads) holds each key and its value as JSON text
    assert wandb_log_holds([offline / f"run-{run_id}.wandb"], TRAIN_TAGS | VAL_TAGS | {"val/sample", "val/sample_prompt"})
    assert wandb_log_holds([offline / f"run-{run_id}.wandb"], [json.dumps(records(on)[-1]["val_loss"])])
    assert wandb_log_holds([offline / f"run-{run_id}.wandb"], ['"compile":false'])  # its config: auto as it resolved
    # a resume continues the same W&B run, in a second folder (W&B adds -1 to one started in the same second)
    assert train.main(["--config", str(path), "logging.wandb=true", f"training.resume_from_checkpoint={on}",
                       "training.max_iters=5"]) == 0
    folders = list((tmp_path / "ck" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f"-{run_id}" in p.name for p in folders), folders
    assert records(on)[-1]["step"] == 5
    assert wandb_log_holds([p / f"run-{run_id}.wandb" for p in folders], [json.dumps(records(on)[-1]["val_loss"])])


def test_a_resume_behind_what_wandb_logged_goes_to_a_new_wandb_run(tmp_path, corpus, monkeypatch, capsys):
    """W&B drops steps below the last one it logged: after a crash at step 7 with the checkpoint at
    step 4, steps 5-7 are trained again and must go to a new W&B run; after a stop at the checkpoint's
    own step, the same W&B run goes on. Online W&B's starting_step says how far it got; offline (0)
    the run's metrics.jsonl does."""
    import sys
    from types import SimpleNamespace
    started = []

    def init(id, resume=None, **settings):
        started.append((id, resume))
        return SimpleNamespace(id=id, name=settings["name"], starting_step=logged.get(id, -1) + 1,
                               finish=lambda: None, log=lambda *args, **kwargs: None)
    from importlib.machinery import ModuleSpec
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init, __spec__=ModuleSpec("wandb", None)))
    cfg = Config.from_yaml(write_config(tmp_path, corpus), ["logging.wandb=true"])
    run = RunDir(str(tmp_path / "ck"), path=tmp_path / "ck" / "run_1")
    run.path.mkdir(parents=True)
    (run.path / "wandb_run_id").write_text("first")
    logged = {"first": 4}
    MetricsLog(run, cfg, CPU, resumed_step=4)
    assert started == [("first", "allow")] and "W&B" not in capsys.readouterr().out
    logged["first"] = 7
    log = MetricsLog(run, cfg, CPU, resumed_step=4)
    [(_, resume), (new_id, fresh)] = started[1:]
    assert resume == "allow" and fresh is None and log.wandb.id == new_id != "first" and (run.path / "wandb_run_id").read_text() == new_id
    assert (f"W&B run first has logged up to step 7, past the checkpoint's step 4: the resumed run logs to a new "
            f"W&B run of the same name, {new_id}") in capsys.readouterr().out
    logged.clear()  # offline
    (run.path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    del started[:]
    assert MetricsLog(run, cfg, CPU, resumed_step=4).wandb.id not in ("first", new_id)
    assert len(started) == 1 and started[0][0] != new_id  # the W&B run it left is not opened (offline: a folder to sync)
    assert [json.loads(line)["step"] for line in (run.path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_wandb_that_cannot_start_stops_before_training_and_leaves_no_folder(tmp_path, corpus, monkeypatch, capsys):
    """No API key (or no network): one line before training; the checkpoint_dir made for W&B's files goes."""
    import sys
    from importlib.machinery import ModuleSpec
    from types import SimpleNamespace

    def init(dir, **settings):
        (Path(dir) / "wandb").mkdir()  # what W&B writes before it fails
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init, __spec__=ModuleSpec("wandb", None)))
    path = write_config(tmp_path, corpus)
    assert train.main(["--config", str(path), "logging.wandb=true", f"training.checkpoint_dir={tmp_path}/a/b/ck"]) == 1
    assert capsys.readouterr().err == ("error: logging.wandb: W&B did not start (No API key configured. Use `wandb "
                                       "login` to log in.); run `wandb login`, set WANDB_MODE=offline, or set "
                                       "logging.wandb=false\n")
    assert not (tmp_path / "a").exists()  # the folders it made, up to the first that was there
    (tmp_path / "ck").mkdir()  # a checkpoint_dir of the user's own stays
    assert train.main(["--config", str(path), "logging.wandb=true"]) == 1
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["wandb"]
    (tmp_path / "ck" / "wandb" / "run-old").mkdir()  # and W&B's files of earlier runs, however the path is written
    assert train.main(["--config", str(path), "logging.wandb=true", f"training.checkpoint_dir={tmp_path}/x/../ck"]) == 1
    assert (tmp_path / "ck" / "wandb" / "run-old").is_dir() and not (tmp_path / "x").exists()


def test_a_missing_logging_package_stops_before_training(tmp_path, corpus, monkeypatch, capsys):
    path = write_config(tmp_path, corpus, max_iters=2, checkpoint_freq=1, keep_last_n=0)
    real = metrics.importlib.util.find_spec
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    assert train.main(["--config", str(path), "logging.wandb=true"]) == 1
    err = capsys.readouterr().err
    assert "logging.wandb: the wandb package is not installed; pip install wandb" in err and err.count("\n") == 1
    assert not (tmp_path / "ck").exists()
    assert train.main(["--config", str(path)]) == 0
    [run] = (tmp_path / "ck").iterdir()
    before = sorted(p.name for p in run.iterdir())
    branch = ["training.resume_from_checkpoint=" + str(run / "checkpoint_1.pt"), "training.learning_rate=0.001"]
    assert train.main(["--config", str(path), *branch, "logging.wandb=true"]) == 1
    assert sorted(p.name for p in run.iterdir()) == before  # nothing moved aside, no config_resume_1.yaml


def test_wandb_names_the_run_after_its_directory_when_another_run_took_the_name(tmp_path, corpus):
    """Two runs started in the same second: the second's directory becomes run_X_2 when it is made
    (after W&B started under run_X), and its W&B run is renamed to match; a name set in the config stays."""
    from types import SimpleNamespace
    for name_setting, expected in ((None, "{run}_2"), ("mine", "mine")):
        cfg = Config.from_yaml(write_config(tmp_path, corpus), [f"logging.wandb_run_name={name_setting or 'null'}"])
        run = RunDir(str(tmp_path / "ck"))
        log = MetricsLog(run, cfg, CPU)
        log.wandb = SimpleNamespace(id="abc123", name=name_setting or run.name, log=lambda *args, **kwargs: None)
        run.path = tmp_path / "ck" / f"{run.name}_2"  # what RunDir._create does when run_X exists
        run.path.mkdir(parents=True, exist_ok=True)
        log.log({"step": 1, "train_loss": 1.0})
        assert log.wandb.name == expected.format(run=run.name)
        shutil.rmtree(run.path)


def test_only_the_writing_process_writes_records(tmp_path, corpus):
    """Under torchrun every rank flushes at a checkpoint: another rank's TensorBoard writer, started at
    a resume's step, would hide the writer's points after it."""
    cfg = Config.from_yaml(write_config(tmp_path, corpus))
    run = RunDir(str(tmp_path / "ck"), path=tmp_path / "ck" / "run_1", writer=False)
    run.path.mkdir(parents=True)
    log = MetricsLog(run, cfg, CPU, resumed_step=4)
    log.flush(sync=True)
    log.close()
    assert list(run.path.iterdir()) == []


def test_records_that_cannot_be_written_are_one_line_and_kept(tmp_path, corpus):
    cfg = Config.from_yaml(write_config(tmp_path, corpus), ["logging.tensorboard=false"])
    run = RunDir(str(tmp_path / "ck"))
    run.path = tmp_path / "ck" / run.name
    (run.path / "metrics.jsonl").mkdir(parents=True)  # not a file: open fails as on a full or read-only disk
    log = MetricsLog(run, cfg, CPU)
    with pytest.raises(metrics.MetricsError, match=r"^.*ck/run_\S+: cannot write the run's records \(Is a directory\); "
                                                   r"the checkpoints written are intact: make room"):
        log.log({"step": 1, "train_loss": 1.0})
    assert log.pending == [{"step": 1, "train_loss": 1.0}]


def test_records_that_cannot_be_cut_back_on_a_resume_are_one_line(tmp_path, corpus, monkeypatch):
    cfg = Config.from_yaml(write_config(tmp_path, corpus), ["logging.tensorboard=false"])
    run = RunDir(str(tmp_path / "ck"))
    run.path = tmp_path / "ck" / run.name
    run.path.mkdir(parents=True)
    (run.path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 1.0}\n{"step": 2, "train_loss": 0.9}\n')

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(metrics, "atomic_write", full_disk)
    with pytest.raises(metrics.MetricsError, match=r"^.*ck/run_\S+/metrics.jsonl: cannot cut the run's records back "
                                                   r"to step 1 \(No space left on device\); the checkpoints are intact"):
        MetricsLog(run, cfg, CPU, resumed_step=1)


def test_a_compiling_step_s_speed_stays_out_of_the_curves():
    record = {"step": 1, "train_loss": 5.5, "tokens_per_s": 300, "ms_per_step": 900.0, "data_wait": 0.0, "mfu": 0.001}
    assert {"speed/tokens_per_s", "speed/ms_per_step", "speed/mfu", "train/loss"} <= set(metrics.scalars(record))
    assert set(metrics.scalars({**record, "compiling": True})) == {"train/loss"}


def test_each_figure_goes_to_its_tag_zeros_included_and_the_sparsity_mean_is_over_the_layers():
    """A value of 0 (no skipped step, no wait for data) is a point of the curve; only None is left out.
    An evaluation's tokens stay with its step's training record (data/tokens once per step)."""
    record = {"step": 3, "train_loss": 2.5, "lr": 0.001, "grad_norm": None, "skipped_steps": 0, "tokens_per_s": 900,
              "ms_per_step": 12.5, "mfu": 0.02, "data_wait": 0.0, "epochs": 0.0, "tokens": 192, "peak_memory_mib": 0.0}
    assert metrics.scalars(record) == {
        "train/loss": 2.5, "train/lr": 0.001, "train/skipped_steps": 0, "speed/tokens_per_s": 900,
        "speed/ms_per_step": 12.5, "speed/mfu": 0.02, "speed/data_wait": 0.0, "data/epochs": 0.0, "data/tokens": 192,
        "memory/peak_mib": 0.0}
    evaluation = {"step": 4, "tokens": 256, "val_loss": 2.0, "val_bits_per_byte": 2.9, "sparsity_x": [0.1, 0.2, 0.6],
                  "sparsity_y": [0.05, 0.15, 0.4], "sample": "bcd", "sample_prompt": "abc"}
    values = metrics.scalars(evaluation)
    assert values["sparsity/x_mean"] == sum([0.1, 0.2, 0.6]) / 3
    assert values["sparsity/y_mean"] == sum([0.05, 0.15, 0.4]) / 3
    assert [values[f"sparsity/x_layer{i}"] for i in range(3)] == [0.1, 0.2, 0.6]
    assert values["val/loss"] == 2.0 and values["val/bits_per_byte"] == 2.9 and "data/tokens" not in values
    values = metrics.wandb_values(evaluation)  # W&B shows the sample beside the validation text it continues
    assert values["val/sample"] == "bcd" and values["val/sample_prompt"] == "abc"


def test_metrics_jsonl_is_synced_at_a_checkpoint_and_at_the_end_not_at_every_line(tmp_path, monkeypatch):
    """An fsync for every line slows a small model's steps: a record is written at once, synced to the
    disk at a checkpoint (flush(sync=True)) and at close, even when nothing waits to be written."""
    synced = []
    monkeypatch.setattr(metrics.os, "fsync", synced.append)
    log, _ = resumed_log(tmp_path, [], None, False)
    log.log({"step": 1, "train_loss": 1.0})
    assert records(log.run.path) == [{"step": 1, "train_loss": 1.0}] and synced == []
    log.flush(sync=True)  # a checkpoint, nothing waiting
    assert len(synced) == 1
    log.log({"step": 2, "train_loss": 0.9})
    log.close()
    assert len(synced) == 2


def resumed_log(tmp_path, logged: list, step, evaluation_due: bool) -> tuple[MetricsLog, list]:
    """(a MetricsLog resuming at `step` a run that logged `logged`, the records it keeps)."""
    cfg = Config()
    cfg.logging.tensorboard = False
    run = RunDir(str(tmp_path / "ck"), path=tmp_path / "ck" / "run_1")
    run.path.mkdir(parents=True, exist_ok=True)
    (run.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    log = MetricsLog(run, cfg, CPU, resumed_step=step, evaluation_due=evaluation_due)
    return log, records(run.path)


def test_a_resume_that_redoes_its_step_s_evaluation_drops_the_earlier_one(tmp_path):
    """Each evaluation once in metrics.jsonl: a resume due to evaluate its step drops that step's
    evaluation record (an earlier resume's) and keeps its training record; later steps go."""
    logged = [{"step": 5, "train_loss": 2.0}, {"step": 6, "train_loss": 1.9}, {"step": 6, "val_loss": 2.1},
              {"step": 7, "train_loss": 1.8}]
    log, kept = resumed_log(tmp_path, logged, 6, evaluation_due=True)
    assert kept == logged[:2] and log.logged_to == 7
    assert resumed_log(tmp_path / "b", logged, 6, evaluation_due=False)[1] == logged[:3]


def test_a_run_s_first_evaluation_measured_anew_is_no_break_in_its_curves(tmp_path):
    """A run whose first evaluation was measured anew (a copied checkpoint, a new run directory): a later
    resume logs its evaluations to the run's own curves; one measured anew after that starts its own."""
    evaluations = [{"step": 2, "val_loss": 2.0, "measured_anew": True}, {"step": 4, "val_loss": 1.9}]
    log, _ = resumed_log(tmp_path, evaluations, 4, evaluation_due=False)
    assert log.measured_anew_at is None and log.evaluated
    later = {"step": 6, "val_loss": 1.5, "measured_anew": True}
    assert resumed_log(tmp_path / "b", [*evaluations, later], 6, evaluation_due=False)[0].measured_anew_at == 6
