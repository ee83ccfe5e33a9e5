"""plot.py: curves of one or several runs from metrics.jsonl."""
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

import plot
import train
from conftest import write_config


def write_run(folder, records, config=None):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_plots_one_and_two_runs_and_refuses_a_folder_without_metrics(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=4)
    for seed in (1, 2):
        assert train.main(["--config", str(path), f"training.seed={seed}", "logging.tensorboard=false"]) == 0
    runs = sorted((tmp_path / "ck").iterdir())
    assert len(runs) == 2
    for chosen, out in ((runs[:1], tmp_path / "one.png"), (runs, tmp_path / "two.png")):
        assert plot.main([*map(str, chosen), "--out", str(out)]) == 0
        assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 20_000
    assert "note: these runs measure" not in capsys.readouterr().err  # two seeds, the same validation batches
    assert plot.main([str(corpus), "--out", str(tmp_path / "none.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {corpus}: no metrics.jsonl, nor a run directory") and err.count("\n") == 1
    assert not (tmp_path / "none.png").exists()
    assert plot.main([str(tmp_path / "ck"), "--out", str(tmp_path / "all.png")]) == 0  # a folder of runs: all of them
    assert plot.runs_in(tmp_path / "ck") == plot.runs_in(tmp_path) == runs  # (a folder of checkpoint_dirs too)
    assert plot.runs_of([runs[1], tmp_path / "ck", runs[1] / "metrics.jsonl"]) == [runs[1], runs[0]]  # each once
    empty = tmp_path / "ck" / "run_99990101_000000"  # a run with nothing logged yet: left out, not the picture
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    capsys.readouterr()
    assert plot.main([str(tmp_path / "ck"), "--out", str(tmp_path / "all.png")]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"note: {empty / 'metrics.jsonl'}: holds no training or validation records yet; left out\n"
    assert str(empty) not in captured.out
    assert plot.main([str(empty), "--out", str(tmp_path / "all.png")]) == 1  # alone: refused
    assert capsys.readouterr().err.startswith(f"error: {empty / 'metrics.jsonl'}: holds no training")
    assert plot.main([str(runs[0]), f"{runs[1]}x", "--out", str(tmp_path / "all.png")]) == 1  # a typo: refused
    assert capsys.readouterr().err == f"error: {runs[1]}x: does not exist; did you mean {runs[1]}?\n"
    for given, fix in ((runs[0] / "checkpoint_4.pt", f"a file; give its run directory, {runs[0]}"),
                       (tmp_path / "ck" / "run_nope", "does not exist; give a run directory")):
        assert plot.main([str(given), "--out", str(tmp_path / "all.png")]) == 1
        assert capsys.readouterr().err.startswith(f"error: {given}: {fix}")
    export = tmp_path / "export"  # what export.py writes: no metrics
    export.mkdir()
    (export / "model.safetensors").touch()
    (export / "config.json").write_text(json.dumps({"bdh_export": {"checkpoint": str(runs[0] / "checkpoint_4.pt")}}))
    assert plot.main([str(export), "--out", str(tmp_path / "all.png")]) == 1
    assert capsys.readouterr().err == (f"error: {export}: a folder export.py wrote, which holds no metrics; give "
                                       f"the run directory it came from, {runs[0]}\n")
    shutil.rmtree(empty)
    assert train.main(["--config", str(path), "training.batch_size=2", f"training.checkpoint_dir={tmp_path / 'b2'}",
                       "logging.tensorboard=false"]) == 0
    capsys.readouterr()
    assert plot.main([*map(str, runs), str(tmp_path / "b2"), "--out", str(tmp_path / "three.png")]) == 0
    assert "note: these runs measure their validation loss on different batches" in capsys.readouterr().err


def test_out_is_checked_first_and_damaged_records_are_skipped(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path), "logging.tensorboard=false"]) == 0
    [run] = (tmp_path / "ck").iterdir()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"train_loss": 1.0, "lr": 0.1}\n[1, 2]\n{"step": 3, "train_l')
    capsys.readouterr()
    (tmp_path / "taken").write_text("a file")
    for out, message in ((tmp_path / "curves", "give a file name ending in .png (or"),
                         (tmp_path / "curves.pgf", "give a file name ending in .png (or"),  # LaTeX's: not here
                         (tmp_path, "is a folder; give a file name"),
                         (tmp_path / "taken" / "curves.png", "cannot make its folder"),
                         *[("/proc/curves.png", "cannot write it (")] * Path("/proc/self").is_dir()):
        with pytest.raises(SystemExit) as usage_error:
            plot.main([str(run), "--out", str(out)])
        assert usage_error.value.code == 2
        err = capsys.readouterr().err
        assert f": error: --out {out}: " in err and message in err
    assert not (tmp_path / "curves").exists() and not (tmp_path / "curves.png").exists()
    assert plot.main([str(tmp_path / "no_run"), "--out", str(tmp_path / "figs" / "curves.png")]) == 1
    assert not (tmp_path / "figs").exists()  # a refused command leaves nothing, not the folder of its --out
    out = tmp_path / "new" / "folder" / "curves.svg"  # a folder that does not exist yet; another format
    assert plot.main([str(run / "metrics.jsonl"), "--out", str(out)]) == 0  # the file itself is accepted too
    assert out.read_text().lstrip().startswith("<?xml")
    assert capsys.readouterr().err.count("is not a metrics record") == 3
    hand_made = tmp_path / "elsewhere" / "run_1"  # records of another program: a step and a loss, no lr
    hand_made.mkdir(parents=True)
    (hand_made / "metrics.jsonl").write_text('{"step": 1, "train_loss": 3.0}\n{"step": 2, "train_loss": 2.5}\n')
    assert plot.main([str(hand_made), "--out", str(tmp_path / "hand_made.png")]) == 0


def test_the_runs_are_named_once_under_the_panels_and_a_run_without_evaluations_has_no_validation_legend(
        tmp_path, figures):
    run = write_run(tmp_path / "run_a", [{"step": s, "tokens": 64 * s, "train_loss": 5.0 - s, "lr": 1e-3,
                                          "tokens_per_s": 1000} for s in (1, 2)])
    assert plot.main([str(run), "--out", str(tmp_path / "a.png")]) == 0
    legends = [axes.get_legend() for axes in figures[0].axes]
    assert [[text.get_text() for text in legend.get_texts()] if legend else None for legend in legends] == [
        ["train"], ["train"], None, None, None, None]  # no validation nor sparsity entries
    assert [[text.get_text() for text in legend.get_texts()] for legend in figures[0].legends] == [["run_a"]]


def test_validation_lines_break_where_a_resume_changed_what_they_measure(tmp_path, corpus, figures, capsys):
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=2, test_freq=1)
    assert train.main(["--config", str(path), "logging.tensorboard=false"]) == 0
    [run] = (tmp_path / "ck").iterdir()
    assert train.main(["--config", str(path), "logging.tensorboard=false", "training.max_iters=6",
                       "training.eval_iters=1", f"training.resume_from_checkpoint={run / 'checkpoint_2.pt'}"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [(r["step"], r.get("measured_anew")) for r in records if "val_loss" in r]
    assert evaluations == [(1, None), (2, None), (3, True), (4, None), (5, None), (6, None)]
    capsys.readouterr()
    assert plot.main([str(run), "--out", str(tmp_path / "a.png")]) == 0
    assert (f"note: {run.name}: a resume changed what validation measures (the evaluations from step 3): its "
            f"validation lines break there\n") in capsys.readouterr().err
    loss_steps = figures[0].axes[0]
    validation = [list(line.get_xdata()) for line in loss_steps.get_lines() if line.get_linestyle() == "--"]
    assert validation == [[1, 2], [3, 4, 5, 6]]
    assert [t.get_text() for t in loss_steps.get_legend().get_texts()] == ["train", "validation"]
    bits_per_byte = [x for line in figures[0].axes[2].get_lines() for x in line.get_xdata()]
    assert bits_per_byte == pytest.approx([r["tokens"] for r in records if "val_loss" in r])  # bytes: a token a byte


def test_a_training_loss_is_drawn_at_the_middle_of_the_steps_it_is_the_mean_of():
    train = [{"step": 1, "interval_steps": 1, "tokens": 10}, {"step": 100, "interval_steps": 99, "tokens": 1000},
             {"step": 101, "interval_steps": 1, "tokens": 1020},  # a resume with twice the batch: its first line
             {"step": 104, "interval_steps": 3, "tokens": 1080}, {"step": 7, "tokens": 70}]  # (before 0.4.11: none)
    steps, tokens = plot.averaged_at(train)
    assert steps == [1, 51, 101, 103, 7]
    assert tokens == pytest.approx([10, 510, 1020, 1060, 70])
    assert plot.averaged_at([{"step": 50, "interval_steps": 10, "tokens": 500}]) == ([50], [500])  # its start: unknown


def test_bits_per_byte_is_drawn_against_the_text_read_whatever_the_tokens():
    """A BPE of 4 bytes a token has read 4 times the text of a byte run at the same tokens."""
    assert plot.text_read({"tokens": 1000, "val_loss": 2.0, "val_bits_per_byte": 2.0 / math.log(2)}) == pytest.approx(1000)
    assert plot.text_read({"tokens": 1000, "val_loss": 4.0, "val_bits_per_byte": 1.0 / math.log(2)}) == pytest.approx(4000)
    assert plot.text_read({"step": 3, "val_loss": 2.0, "val_bits_per_byte": 2.9}) is None  # (no tokens recorded)


def test_the_panels_draw_what_the_records_say(tmp_path, figures):
    """A mean over 10 steps at the middle of them; the speed without a compiling step's (a single point
    still shows); the active latents as the mean over the layers, x and y; bits per byte against bytes;
    one tokenizer: the loss in nats per token."""
    run = write_run(tmp_path / "run_a", [
        {"step": 1, "interval_steps": 1, "tokens": 64, "train_loss": 5.0, "lr": 1e-3, "tokens_per_s": 10,
         "compiling": True},
        {"step": 11, "interval_steps": 10, "tokens": 704, "train_loss": 4.0, "lr": 2e-3, "tokens_per_s": 1000},
        {"step": 11, "tokens": 704, "val_loss": 3.5, "val_bits_per_byte": 5.0, "sparsity_x": [0.1, 0.3],
         "sparsity_y": [0.2, 0.6]}], config={"dataset": {"tokenizer": "bytes"}})
    assert plot.main([str(run), "--out", str(tmp_path / "a.png")]) == 0
    loss_steps, _, bits_per_byte, lr, sparsity, speed = figures[0].axes[:6]
    [train_line] = [line for line in loss_steps.get_lines() if line.get_linestyle() == "-"]
    assert list(train_line.get_xdata()) == [1, 6.5] and loss_steps.get_ylabel() == "loss (nats per token)"
    [speed_line] = speed.get_lines()
    assert list(speed_line.get_xdata()) == [11] and list(speed_line.get_ydata()) == [1000]
    assert speed_line.get_marker() == "o"  # one point: a marker, or nothing shows
    assert [list(line.get_ydata()) for line in lr.get_lines()] == [[1e-3, 2e-3]]
    assert [list(line.get_ydata()) for line in sparsity.get_lines()] == [[pytest.approx(0.2)], [pytest.approx(0.4)]]
    assert bits_per_byte.xaxis.get_major_formatter().unit == "B"


def test_a_run_with_only_evaluations_is_plotted(tmp_path, figures):
    """A run that has evaluated and written no training line yet is not 'nothing logged'."""
    evaluation = {"step": 0, "tokens": 0, "val_loss": 5.5, "val_bits_per_byte": 8.0}
    run = write_run(tmp_path / "run_a", [evaluation])
    assert plot.read_metrics(run) == ([], [evaluation])
    assert plot.main([str(run), "--out", str(tmp_path / "a.png")]) == 0


def test_the_note_names_each_resume_that_changed_validation_not_the_run_s_first_evaluation(tmp_path, figures, capsys):
    run = write_run(tmp_path / "run_a", [{"step": s, "tokens": 64 * s, "val_loss": 3.0, "val_bits_per_byte": 4.0,
                                          **({"measured_anew": True} if s in (1, 3, 5) else {})} for s in range(1, 6)])
    assert plot.main([str(run), "--out", str(tmp_path / "a.png")]) == 0
    assert ("note: run_a: resumes changed what validation measures (the evaluations from steps 3, 5): its "
            "validation lines break there\n") in capsys.readouterr().err


def test_runs_are_labelled_by_the_settings_they_differ_in(tmp_path, figures):
    for name, tokenizer, lr in (("run_a", "bytes", 0.01), ("run_b", "bpe.json", 0.01), ("run_c", "bytes", 0.02)):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 64, "train_loss": 5.0, "lr": lr}) + "\n")
        config = {"dataset": {"tokenizer": tokenizer},  # (train.py writes every setting: a new run starts from none)
                  "training": {"learning_rate": lr, "checkpoint_dir": name, "resume_from_checkpoint": None}}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "a.png")]) == 0
    loss_steps, [runs] = figures[0].axes[0], figures[0].legends
    assert [text.get_text() for text in runs.get_texts()] == [  # (not checkpoint_dir: no learning)
        "run_a (tokenizer=bytes, learning_rate=0.01)", "run_b (tokenizer=bpe.json, learning_rate=0.01)",
        "run_c (tokenizer=bytes, learning_rate=0.02)"]
    assert loss_steps.get_ylabel() == "loss (nats/token: not across tokenizers)"
    assert plot.labels(["a", "b"], [{"training.seed": 1}, {"training.seed": 2, "training.compile": True}]) == [
        "a (seed=1)", "b (seed=2)"]
    assert plot.labels(["a", "b", "c"], [{"training.seed": 1}, {}, {"training.seed": 1}]) == ["a", "b", "c"]
    workers = [{"dataloader.num_workers": n, "dataloader.prefetch_factor": n} for n in (1, 2)]  # the order of batches
    assert plot.labels(["a", "b"], workers) == ["a (num_workers=1)", "b (num_workers=2)"]
    assert plot.labels(["a"], [{"training.seed": 1}]) == ["a"]  # one run: its name
    # a setting an older version did not write is no difference (nor are the settings of runs without any)
    assert plot.labels(["old", "new", "x"], [{"training.seed": 1}, {"training.seed": 2, "dataset.split_seed": 1337},
                                             {}]) == ["old (seed=1)", "new (seed=2)", "x"]
    assert plot.labels(["a"], [{"training.seed": 1, "training.max_iters": plot.Changed("40→60")}]) == [
        "a (max_iters=40→60)"]  # ... and what its resumes changed
    assert plot.labels(["a"], [{"dataset.parquet_dir": "data/en→de"}]) == ["a"]  # (an arrow of its own: no change)
    sweep = [{"dataset.tokenizer": tokenizer, "model.vocab_size": vocab, "model.n_layer": layers, "training.batch_size": 16,
              "training.learning_rate": lr, "training.eval_iters": 20} for tokenizer, vocab, layers, lr in (
        ("bytes", 256, 1, 1e-3), ("bytes", 256, 1, 3e-3), ("bytes", 256, 2, 1e-2), ("bpe.json", 512, 1, 3e-2))]
    sweep[3]["training.batch_size"], sweep[3]["training.eval_iters"] = 8, 4
    assert plot.labels(list("abcd"), sweep) == [  # more than 4 differ: where each departs from the most common value
        "a (learning_rate=0.001)", "b (learning_rate=0.003)", "c (learning_rate=0.01, n_layer=2)",
        "d (tokenizer=bpe.json, learning_rate=0.03, batch_size=8, eval_iters=4)"]  # (vocab_size follows the tokenizer)
    base = {"model.dropout": 0.0, "training.batch_size": 4, "training.learning_rate": 0.005,
            "training.weight_decay": 0.1, "training.seed": 0, "fp8.format": "hybrid"}
    one_at_a_time = [base] + [{**base, key: value} for key, value in (
        ("model.dropout", 0.1), ("training.batch_size", 8), ("training.learning_rate", 0.01),
        ("training.weight_decay", 0.5), ("training.seed", 1), ("fp8.format", "e4m3"))]
    assert plot.labels(list("abcdefg"), one_at_a_time)[1:] == [
        "b (dropout=0.1)", "c (batch_size=8)", "d (learning_rate=0.01)", "e (weight_decay=0.5)", "f (seed=1)",
        "g (fp8.format=e4m3)"]  # (the baseline: its first four values, then ...)
    assert plot.labels(list("abcdefg"), one_at_a_time)[0] == "a (dropout=0.0, batch_size=4, learning_rate=0.005, "\
                                                              "weight_decay=0.1, ...)"
    assert plot.labels(["a", "b"], [{"training.seed": 1, "training.learning_rate": 0.1}, {"training.seed": 2,
                       "training.learning_rate": 0.1}]) == ["a (seed=1)", "b (seed=2)"]
    assert plot.shared_settings(one_at_a_time) == (  # the terminal's last line: what the labels leave unnamed
        "dropout=0.0, batch_size=4, learning_rate=0.005, weight_decay=0.1, seed=0, fp8.format=hybrid")
    assert plot.shared_settings(sweep[:2]) == ""  # (few settings differ: every label names all of them)
    assert plot.labels(["a", "b"], [{"training.resume_from_checkpoint": None, "low_precision.use_4bit": True},
                                    {"training.resume_from_checkpoint": "x", "low_precision.use_4bit": False}]) == [
        "a (resume_from_checkpoint=null, use_4bit=true)", "b (resume_from_checkpoint=x, use_4bit=false)"]  # as YAML
    assert plot.labels(["d"], sweep[3:], limit=None) == ["d"]
    assert plot.labels(list("abcd"), sweep, limit=None)[3] == (
        "d (tokenizer=bpe.json, learning_rate=0.03, batch_size=8, eval_iters=4)")  # (validation differs)
    sweep[0]["model.vocab_size"] = 320  # not implied by the tokenizer any more
    assert "vocab_size=320" in plot.labels(list("abcd"), sweep, limit=None)[0]
    resumed = tmp_path / "run_a"  # resumed twice with other settings: the values it had, in turn
    for step, lr in ((10, 0.005), (20, 0.002)):
        (resumed / f"config_resume_{step}.yaml").write_text(yaml.safe_dump({"training": {"learning_rate": lr}}))
    assert plot.run_settings(resumed)["training.learning_rate"] == "0.01→0.005→0.002"
    (resumed / "config_resume_30.yaml").write_text(yaml.safe_dump({"training": {"learning_rate": 0.001}}))
    many = plot.run_settings(resumed)
    assert plot.labels(["a"], [many]) == ["a (learning_rate=0.01→…→0.001)"]  # a legend of many resumes fits
    assert plot.labels(["a"], [many], limit=None) == ["a (learning_rate=0.01→0.005→0.002→0.001)"]  # the terminal's
    assert plot.run_settings(resumed)["dataset.tokenizer"] == "bytes"
    old = tmp_path / "run_old"  # 0.4.5 and older: training.seed drew the validation documents
    old.mkdir()
    (old / "config.yaml").write_text(yaml.safe_dump({"training": {"seed": 5}, "dataset": {"val_parquet_dir": None}}))
    assert plot.run_settings(old)["dataset.split_seed"] == 5
    tuned = tmp_path / "run_d"  # fine-tuned from an export, then resumed: labelled by the export it started from
    tuned.mkdir()
    (tuned / "config.yaml").write_text(yaml.safe_dump({"training": {"resume_from_checkpoint": "exports/a"}}))
    (tuned / "config_resume_10.yaml").write_text(yaml.safe_dump(
        {"training": {"resume_from_checkpoint": str(tuned / "checkpoint_10.pt")}}))
    assert plot.run_settings(tuned)["training.resume_from_checkpoint"] == "exports/a"
    assert "resume_from_checkpoint=exports/a)" in plot.labels(
        ["c", "d"], [plot.run_settings(tmp_path / "run_c"), plot.run_settings(tuned)])[1]


def test_run_settings_are_what_the_run_used_as_it_ran(tmp_path):
    import torch
    from config import Config
    from runtime import config_as_run, resolve_compute_dtype
    cfg = Config()
    cfg.fp8.format, cfg.low_precision.compute_dtype = "e4m3", "auto"
    run = tmp_path / "run_a"
    run.mkdir()
    (run / "config.yaml").write_text(config_as_run(cfg, torch.device("cpu")))
    settings = plot.run_settings(run)
    assert settings["low_precision.compute_dtype"] == resolve_compute_dtype(torch.device("cpu"), "auto") != "auto"
    assert "fp8.format" not in settings and "low_precision.qat_start_fraction" not in settings  # (not used: off)
    assert settings["model.n_layer"] == cfg.model.n_layer
    cfg.low_precision.use_fp8 = True
    (run / "config_resume_10.yaml").write_text(config_as_run(cfg, torch.device("cpu")))
    assert plot.run_settings(run)["fp8.format"] == "e4m3"  # used by one of its configs
    (run / "config_resume_10.yaml").write_text("model: {n_layer: 1}")  # (a hand-written one: as it says)
    assert "fp8.format" not in plot.run_settings(run)
    old = tmp_path / "run_old"  # written before the comment: what auto computed in is not known, not "auto"
    old.mkdir()
    (old / "config.yaml").write_text(cfg.to_yaml())
    assert "low_precision.compute_dtype" not in plot.run_settings(old)
    (old / "config_resume_10.yaml").write_text(config_as_run(cfg, torch.device("cpu")))  # resumed by this version:
    assert plot.run_settings(old)["low_precision.compute_dtype"] == resolve_compute_dtype(  # what it ran in, not a
        torch.device("cpu"), "auto")  # change from auto


def test_experiments_of_their_own_folders_are_plotted_together_and_their_names_fit(tmp_path, figures, capsys):
    """checkpoint_dir=ck/<experiment> for each: `plot.py ck` finds their runs, names them by
    experiment, and the legend of long names stays inside the picture."""
    for experiment, vocab in (("bytes", 256), ("bpe512", 512), ("bpe2048", 2048)):
        run = tmp_path / "ck" / experiment / "run_20261124_023835"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens": 64 * s, "train_loss": 5.0 - s,
                                                               "lr": 1e-3}) + "\n" for s in (1, 2, 3))
                                           + json.dumps({"step": 3, "tokens": 192, "val_loss": 2.0, "val_bits_per_byte": 2.9}) + "\n")
        config = {"model": {"vocab_size": vocab}, "training": {"max_iters": 40 + vocab, "warmup_iters": vocab},
                  "dataset": {"tokenizer": f"tokenizers/{experiment}.json"}}
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert plot.main([str(tmp_path / "ck"), "--out", str(tmp_path / "a.png")]) == 0
    [figure], [runs] = figures, figures[0].legends
    names = [text.get_text() for text in runs.get_texts()]
    assert names[0] == ("bpe2048/run_20261124_023835 (tokenizer=tokenizers/bpe2048.json, max_iters=2088, "
                        "warmup_iters=2048)")  # (not the vocab_size each tokenizer implies)
    assert capsys.readouterr().out == f"wrote {tmp_path / 'a.png'}:\n" + "".join(f"  {name}\n" for name in names)
    figure.canvas.draw()
    box, width = runs.get_window_extent(), figure.bbox.width
    assert 0 <= box.x0 and box.x1 <= width and box.y0 >= 0
    for panel in figure.axes[:6]:  # steps, not 1.5; one evaluation (bits per byte): not 2.95, 3.0, 3.05
        assert all(tick == int(tick) for tick in panel.get_xticks()) or panel.get_xlabel() in (
            "tokens", "training text read (bytes)")


def test_a_setting_a_resume_changed_back_shows_every_value(tmp_path):
    run = write_run(tmp_path / "run_a", [{"step": 1, "train_loss": 1.0}], config={"training": {"learning_rate": 0.01}})
    for step, lr in ((10, 0.005), (20, 0.01)):
        (run / f"config_resume_{step}.yaml").write_text(yaml.safe_dump({"training": {"learning_rate": lr}}))
    assert plot.run_settings(run)["training.learning_rate"] == "0.01→0.005→0.01"
    assert plot.labels(["a"], [plot.run_settings(run)]) == ["a (learning_rate=0.01→0.005→0.01)"]  # three: not cut


def test_up_to_four_differing_settings_are_named_in_every_label_and_beyond_what_most_runs_share_is_printed(
        tmp_path, figures, capsys):
    settings = [{"training.seed": seed, "training.learning_rate": lr, "training.batch_size": batch, "model.dropout": p}
                for seed, lr, batch, p in ((1, 0.1, 4, 0.0), (2, 0.1, 4, 0.0), (3, 0.2, 8, 0.1))]
    assert plot.labels(list("abc"), settings)[0] == "a (seed=1, learning_rate=0.1, batch_size=4, dropout=0.0)"
    assert plot.shared_settings(settings) == ""
    for setting, weight_decay in zip(settings, (0.1, 0.1, 0.5)):
        setting["training.weight_decay"] = weight_decay
    assert plot.labels(list("abc"), settings)[0] == "a (seed=1)"
    assert plot.shared_settings(settings) == "learning_rate=0.1, batch_size=4, dropout=0.0, weight_decay=0.1"
    base = {"training": {"seed": 0, "learning_rate": 0.1, "batch_size": 4, "weight_decay": 0.1},
            "model": {"dropout": 0.0}}
    for name, section, key, value in (("run_a", "training", "seed", 0), ("run_b", "training", "seed", 1),
                                      ("run_c", "training", "learning_rate", 0.2),
                                      ("run_d", "training", "batch_size", 8),
                                      ("run_e", "training", "weight_decay", 0.5), ("run_f", "model", "dropout", 0.1)):
        config = json.loads(json.dumps(base))
        config[section][key] = value
        write_run(tmp_path / "ck" / name, [{"step": 1, "train_loss": 1.0}], config)
    assert plot.main([str(tmp_path / "ck"), "--out", str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "  most runs: dropout=0.0, batch_size=4, learning_rate=0.1, seed=0, weight_decay=0.1")  # (config.yaml's order)
