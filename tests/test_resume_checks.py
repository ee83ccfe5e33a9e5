"""What a resume compares: the validation documents a run holds out, the settings the run's command line
gave, the tokens of a step on another number of processes. (Resuming itself, end to end: test_resume.py.)"""
import os
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

import resume_checks
from checkpoint import CheckpointError
from config import Config, DatasetConfig, TrainingConfig
from model import BDHConfig
from resume_checks import (carried_forward, check_given_again, check_run_given_again, check_same_data, check_same_model,
                           check_same_split, command_line_record, continues_run, global_batch_change, override,
                           same_setting, tokens_before)
from tokenizer import TokenizerError


def test_a_resume_in_place_keeps_the_run_s_validation_documents_unless_the_command_line_naming_it_changes_them():
    def check(saved, dataset, command_line=(), named=True):
        check_same_split(saved, dataset, set(command_line), Path("ck/run_1/checkpoint_5.pt"), named, seed_split=False)
    by_folder = {"val_parquet_dir": "data/val", "val_fraction": 0.05, "split_seed": 1337}
    with pytest.raises(CheckpointError, match=r"by dataset.val_parquet_dir 'data/val' \(this command has none\): add "
                                              r"dataset.val_parquet_dir=data/val to keep them"):
        check(by_folder, DatasetConfig())  # the run started with it on the command line
    for moved in ("./data/val/", "elsewhere/val"):  # another folder: the validation batches decide (a warning)
        check(by_folder, DatasetConfig(val_parquet_dir=moved))
    check(by_folder, DatasetConfig(), ["dataset.val_parquet_dir"])  # asked for
    by_fraction = {"val_parquet_dir": None, "val_fraction": 0.1, "split_seed": 1337}
    with pytest.raises(CheckpointError, match="by dataset.val_fraction 0.1 \\(this command has 0.05\\)"):
        check(by_fraction, DatasetConfig())
    with pytest.raises(CheckpointError, match=r"name the run on the command line with it: training.resume_from_checkpoint=ck/run_1 "
                                              r"dataset.val_fraction=0.05$"):
        check(by_fraction, DatasetConfig(), ["dataset.val_fraction"], named=False)  # found by latest
    check(by_fraction, DatasetConfig(val_fraction=0.1, split_seed=3), ["dataset.split_seed"])


def test_a_resume_gives_again_what_the_run_s_command_line_gave_to_what_it_trains():
    """Started with training.batch_size=4 on the command line, resumed without it: the config file's 32 would
    change the run silently. Unless the same config file had another value then (edited since: a change); how
    the run runs (log_freq, the device) may go back to the config file's."""
    saved = {"training": {"batch_size": 4, "learning_rate": 0.01, "log_freq": 5, "max_iters": 80},
             "low_precision": {"use_4bit": True}}
    ckpt = SimpleNamespace(step=8, config=saved, command_line={"config": "/my.yaml", "settings": {
        "low_precision.use_4bit": False, "training.batch_size": 32, "training.log_freq": 100, "training.max_iters": 2000}})
    config_file = {"training": {"batch_size": 32, "learning_rate": 0.01, "log_freq": 100, "max_iters": 3000},
                   "low_precision": {"use_4bit": False}}
    this_command = {"config": "/my.yaml", "settings": {}}
    with pytest.raises(CheckpointError) as refused:
        check_given_again(ckpt, config_file, this_command, Path("ck/run_1/checkpoint_8.pt"))
    assert str(refused.value) == (
        "ck/run_1/checkpoint_8.pt: the run was given low_precision.use_4bit=true training.batch_size=4 on its "
        "command line, and this command leaves them out (the config file has False, 32): add them to resume the run "
        "as it was, or give the new values on the command line to change them")
    # max_iters: 2000 in the file then, 3000 now: edited since, a change (printed, as any other)
    given = {"config": "/my.yaml", "settings": {"training.batch_size": "4", "low_precision.use_4bit": "true"}}
    check_given_again(ckpt, config_file, given, Path("x"))
    check_given_again(ckpt, {**config_file, "low_precision": {"use_4bit": True}, "training": saved["training"]},
                      this_command, Path("x"))  # the config file has the run's values
    with pytest.raises(CheckpointError, match=r"was given training.batch_size=4 training.max_iters=80 .* and this "
                                              r"command leaves them out \(the config file has 32, 3000\)"):
        check_given_again(ckpt, {**config_file, "low_precision": {"use_4bit": True}},
                          {"config": "/other.yaml", "settings": {}}, Path("x"))  # another file: nothing to tell
    before_0_4_7 = SimpleNamespace(step=8, config=saved, command_line={})
    check_given_again(before_0_4_7, config_file, this_command, Path("x"))


def test_a_finished_run_extended_by_its_config_file_and_a_forgotten_shape_are_told_apart():
    saved = {"training": {"max_iters": 10, "keep_last_n": 0}, "model": {"n_layer": 2}}
    given = {"config": "/a.yaml", "settings": {"training.max_iters": 20, "training.keep_last_n": 3, "model.n_layer": 6}}
    file_now = {"training": {"max_iters": 20, "keep_last_n": 3}, "model": {"n_layer": 6}}
    finished = SimpleNamespace(step=10, config=saved, command_line=given)
    with pytest.raises(CheckpointError) as refused:  # max_iters from the file extends it; keep_last_n 0 is kept
        check_given_again(finished, file_now, {"config": "/b.yaml", "settings": {}}, Path("x"))
    assert str(refused.value) == (
        "x: the run was given training.keep_last_n=0 model.n_layer=2 on its command line, and this command leaves them "
        "out (the config file has 3, 6): add them to resume the run as it was (the model's shape cannot change; the "
        "others can, given anew)")
    stopped = SimpleNamespace(step=5, config=saved, command_line=given)
    with pytest.raises(CheckpointError, match=r"given training.max_iters=10 training.keep_last_n=0 model.n_layer=2 "):
        check_given_again(stopped, file_now, {"config": "/b.yaml", "settings": {}}, Path("x"))


def test_the_record_of_the_command_line_knows_the_file_s_values_and_carries_the_run_s_forward(tmp_path):
    """A file that is not a valid config alone (its values unknown) never counts as edited; a resume with the run's
    own config.yaml keeps the earlier command line's settings in the record, for the resume after it."""
    valid = tmp_path / "valid.yaml"
    valid.write_text("training:\n  batch_size: 32\n")
    assert command_line_record(str(valid), ["training.batch_size=4", "training.resume_from_checkpoint=latest"]) == {
        "config": str(valid.resolve()), "settings": {"training.batch_size": 32}}
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("model:\n  n_head: 3\n")  # n_embd 256 is not a multiple: valid only with model.n_head=4
    record = command_line_record(str(invalid), ["model.n_head=4", "training.batch_size=4"])
    assert record["config"] is None
    ckpt = SimpleNamespace(step=1, config={"training": {"batch_size": 4}, "model": {"n_head": 4}}, command_line=record)
    with pytest.raises(CheckpointError, match=r"was given training.batch_size=4 on its command line"):
        check_given_again(ckpt, {"training": {"batch_size": 8}, "model": {"n_head": 4}},
                          {**record, "settings": {"model.n_head": 4}}, Path("x"))
    run_config = {"training": {"batch_size": 4}, "model": {"n_head": 4}}  # --config <run>/config.yaml, nothing given
    carried = carried_forward(ckpt, run_config, {"config": "/run/config.yaml", "settings": {}})
    assert carried == {"config": "/run/config.yaml", "settings": {"training.batch_size": 4, "model.n_head": 4}}
    assert carried_forward(ckpt, {"training": {"batch_size": 8}, "model": {"n_head": 4}},
                           {"config": "/my.yaml", "settings": {"training.batch_size": 8}})["settings"] == {
        "model.n_head": 4, "training.batch_size": 8}  # given anew: this command's value then


def test_another_number_of_processes_is_told_what_keeps_the_tokens_of_a_step():
    one_process = SimpleNamespace(config={"training": {"batch_size": 32, "block_size": 64}}, rng=[{}])
    training = TrainingConfig(batch_size=32, block_size=64)
    assert global_batch_change(one_process, training, 1) == ""
    no_states = SimpleNamespace(config=one_process.config, rng=[])  # written by hand from other weights: one process's
    assert global_batch_change(no_states, training, 2) == global_batch_change(one_process, training, 2) != ""
    assert global_batch_change(one_process, training, 2) == (  # more processes: a smaller batch each
        ", and a step trains on 4,096 tokens where it trained on 2,048; training.batch_size=16 keeps 2,048")
    two_processes = SimpleNamespace(config=one_process.config, rng=[{}, {}])
    assert global_batch_change(two_processes, training, 1).endswith(
        "; training.gradient_accumulation_steps=2 keeps 4,096")
    assert global_batch_change(one_process, TrainingConfig(batch_size=3, block_size=48), 2) == (
        ", and a step trains on 288 tokens where it trained on 2,048; no whole batch_size and "
        "gradient_accumulation_steps keep 2,048 on 2 processes (training.gradient_accumulation_steps=7 gives 2,016)")
    two_of_32 = SimpleNamespace(config=one_process.config, rng=[{}, {}])  # 2 -> 3 processes of 32 x 64
    assert global_batch_change(two_of_32, training, 3).endswith(
        "; no whole batch_size and gradient_accumulation_steps keep 4,096 on 3 processes (training.batch_size=21 "
        "gives 4,032)")
    six_by_two = SimpleNamespace(config={"training": {"batch_size": 6, "gradient_accumulation_steps": 2,
                                                      "block_size": 64}}, rng=[{}])
    assert global_batch_change(six_by_two, TrainingConfig(batch_size=6, gradient_accumulation_steps=2,
                                                          block_size=64), 4).endswith(
        "; training.batch_size=3 training.gradient_accumulation_steps=1 keeps 768")  # both change
    eight = SimpleNamespace(config=one_process.config, rng=[{}] * 8)  # no batch_size above today's (its memory)
    assert global_batch_change(eight, training, 3).endswith(
        "; no whole batch_size and gradient_accumulation_steps keep 16,384 on 3 processes (training.batch_size=17 "
        "training.gradient_accumulation_steps=5 gives 16,320)")
    eight_by_4 = SimpleNamespace(config={"training": {"batch_size": 32, "gradient_accumulation_steps": 4,
                                                      "block_size": 64}}, rng=[{}] * 8)
    assert global_batch_change(eight_by_4, TrainingConfig(batch_size=8, gradient_accumulation_steps=2,
                                                          block_size=64), 3).endswith(
        "(training.gradient_accumulation_steps=43 gives 66,048)")  # not batch_size=1 x 341: 0.8% off, 8 x fewer steps
    three_of_4 = SimpleNamespace(config={"training": {"batch_size": 4, "block_size": 64}}, rng=[{}] * 3)
    assert global_batch_change(three_of_4, TrainingConfig(batch_size=4, block_size=64), 2).endswith(
        "; training.batch_size=3 training.gradient_accumulation_steps=2 keeps 768")
    eight_of_16x8 = SimpleNamespace(config={"training": {"batch_size": 16, "gradient_accumulation_steps": 8,
                                                         "block_size": 1024}}, rng=[{}] * 8)
    assert global_batch_change(eight_of_16x8, TrainingConfig(batch_size=24, gradient_accumulation_steps=8,
                                                             block_size=1024), 1).endswith(
        "; training.batch_size=16 training.gradient_accumulation_steps=64 keeps 1,048,576")  # exact, not 24 x 43
    assert global_batch_change(two_of_32, TrainingConfig(batch_size=21, block_size=64), 3).endswith(
        "keep 4,096 on 3 processes")  # the batch_size given is the nearest already


def test_a_checkpoint_continues_its_run_only_before_the_run_s_end(tmp_path, monkeypatch):
    run = tmp_path / "run_20260101_000000"
    run.mkdir()
    (run / "config.yaml").write_text("training: {}\n")
    ends_at = {"training": {"max_iters": 10}}
    assert continues_run(run / "checkpoint_9.pt", 9, ends_at, max_iters=10)
    assert not continues_run(run / "checkpoint_10.pt", 10, ends_at, max_iters=10)  # finished: nothing to continue
    assert continues_run(run / "checkpoint_10.pt", 10, ends_at, max_iters=20)  # max_iters raised
    assert not continues_run(tmp_path / "checkpoint_9.pt", 9, ends_at, max_iters=10)  # not in a run directory
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (a read-only run: root writes anyway)
    assert not continues_run(run / "checkpoint_9.pt", 9, ends_at, max_iters=10)


# ---- found by mutating resume_checks.py: which messages name what, the settings given again, the hints

PATH = Path("ck/run_1/checkpoint_5.pt")


def run_checkpoint(project="0.4.10", command_line=None, **dataset):
    return SimpleNamespace(step=5, config={"dataset": {"val_parquet_dir": None, "split_seed": 1337, "val_fraction": 0.05,
                                                       **dataset}, "training": {"max_iters": 100}},
                           validation_batches="abc", data_order={}, versions={"project": project},
                           command_line={"config": "/a.yaml", "settings": {}} if command_line is None else command_line)


def test_the_run_s_split_is_compared_only_where_the_validation_batches_differ_and_a_found_run_never_takes_other_data():
    ckpt = run_checkpoint(val_fraction=0.1)
    check_same_data(ckpt, DatasetConfig(), None, "abc", set(), PATH, named=True)  # the very same batches: not compared
    with pytest.raises(CheckpointError, match=r"^ck/run_1/checkpoint_5.pt: the run held out its validation documents "
                                              r"by dataset.val_fraction 0.1 \(this command has 0.05\)"):
        check_same_data(ckpt, DatasetConfig(), None, "other", set(), PATH, named=True)
    # found by latest: the command line's value does not continue (perhaps) another experiment's run
    with pytest.raises(CheckpointError, match="to measure this run on others from here, name the run"):
        check_same_data(ckpt, DatasetConfig(), None, "other", {"dataset.val_fraction"}, PATH, named=False)
    data = run_checkpoint(text_column="body")
    with pytest.raises(CheckpointError, match=r"\(was it given on the command line when the run started\?\), or, to "
                                              r"train this run on 'text' from here, name the run"):
        check_same_data(SimpleNamespace(**{**vars(data), "command_line": {}}), DatasetConfig(), None, "abc",
                        {"dataset.text_column"}, PATH, named=False)
    with pytest.raises(CheckpointError, match=r"\(the run's config file had it\), or, to train on 'text' from here, "
                                              r"give that on the command line"):
        check_same_data(data, DatasetConfig(), None, "abc", set(), PATH, named=True)


def test_a_split_drawn_by_the_training_seed_is_told_only_for_checkpoints_before_0_4_6():
    def refusal(project):
        with pytest.raises(CheckpointError) as refused:
            check_same_data(run_checkpoint(project, split_seed=7), DatasetConfig(), None, "other", set(), PATH, True)
        return str(refused.value)
    assert "its training.seed drew them, as up to version 0.4.5; this command has 1337" in refusal("0.4.5")
    assert "(this command has 1337)" in refusal("0.4.6")


def test_a_refusal_of_both_settings_and_data_names_the_checkpoint_once():
    cfg = Config()
    cfg.training.resume_from_checkpoint = "ck/run_1"
    ckpt = run_checkpoint(command_line={"config": "/a.yaml", "settings": {"training.batch_size": 32}},
                          text_column="body")
    ckpt.config["training"]["batch_size"] = 4
    with pytest.raises(CheckpointError) as refused:
        check_run_given_again(cfg, PATH, ckpt, None, "abc", {"config": "/b.yaml", "settings": {}})
    message = str(refused.value)
    assert message.startswith("ck/run_1/checkpoint_5.pt: the run was given training.batch_size=4 ")
    assert "; and the run trained on dataset.text_column 'body'" in message and message.count(str(PATH)) == 1


def test_dropout_and_the_warmup_are_given_again_but_dropout_is_no_shape():
    ckpt = SimpleNamespace(step=5, config={"model": {"dropout": 0.0},
                                           "training": {"warmup_iters": 10, "max_iters": 100}},
                           command_line={"config": "/a.yaml", "settings": {"model.dropout": 0.1,
                                                                           "training.warmup_iters": 100}})
    with pytest.raises(CheckpointError) as refused:
        check_given_again(ckpt, {"model": {"dropout": 0.1}, "training": {"warmup_iters": 100, "max_iters": 100}},
                          {"config": "/b.yaml", "settings": {}}, Path("x"))
    assert str(refused.value).startswith("x: the run was given model.dropout=0.0 training.warmup_iters=10 on its")
    assert str(refused.value).endswith("or give the new values on the command line to change them")
    saved = asdict(BDHConfig())
    check_same_model({**saved, "dropout": 0.5}, BDHConfig(), PATH)  # dropout: not a shape
    with pytest.raises(CheckpointError, match="add model.n_layer=2 to match it"):
        check_same_model({**saved, "n_layer": 2}, BDHConfig(), PATH)


def test_overrides_are_quoted_for_the_shell_and_paths_compared_by_where_they_are():
    assert override("dataset.parquet_dir", "my data") == "'dataset.parquet_dir=my data'"
    assert override("training.compile", False) == "training.compile=false"
    assert same_setting("dataset.parquet_dir", "data/x/", "./data/x")
    assert not same_setting("dataset.text_column", "x", "./x")


def test_tokens_before_counting_are_the_checkpoint_s_steps_of_its_own_batch():
    ckpt = SimpleNamespace(step=10, config={"training": {"batch_size": 4, "block_size": 64}}, rng=[{}, {}])
    assert tokens_before(ckpt, TrainingConfig(batch_size=32, block_size=64)) == 10 * 4 * 64 * 2


def test_a_run_whose_own_max_iters_is_beyond_its_step_continues_whatever_this_command_s(monkeypatch):
    monkeypatch.setattr(resume_checks, "continues_in_place", lambda path: True)  # (any run directory)
    assert continues_run(Path("run/checkpoint_10.pt"), 10, {"training": {"max_iters": 20}}, max_iters=5)
    assert not continues_run(Path("run/checkpoint_20.pt"), 20, {"training": {"max_iters": 20}}, max_iters=5)


def test_a_hint_for_data_that_cannot_be_set_up_names_only_the_settings_that_matter(monkeypatch):
    saved = {"dataset": {"parquet_dir": "run_data", "tokenizer": "bytes", "val_parquet_dir": "run_val",
                         "val_fraction": 0.2}, "model": {"vocab_size": 300}}
    monkeypatch.setattr(resume_checks, "resumed_checkpoint", lambda cfg: (PATH, {"config": saved}))
    cfg = Config()
    cfg.training.resume_from_checkpoint = "ck/run_1"
    assert resume_checks.data_settings_hint(cfg, TokenizerError("no such file")) == (
        "; the checkpoint's run had model.vocab_size=300: if the change was not meant, give it again")
    assert resume_checks.data_settings_hint(cfg, FileNotFoundError("run_data")) == (  # nothing split: no val_fraction
        "; the checkpoint's run had dataset.parquet_dir=run_data dataset.val_parquet_dir=run_val model.vocab_size=300: "
        "if the change was not meant, give those again")


def test_a_missing_folder_of_the_run_s_data_is_refused_before_reading_unless_given_or_there(tmp_path, monkeypatch):
    saved = {"step": 5, "model": {}, "model_config": {}, "validation_batches": "abc",
             "config": {"dataset": {"parquet_dir": str(tmp_path)}, "training": {"max_iters": 100}}}
    monkeypatch.setattr(resume_checks, "resumed_checkpoint", lambda cfg: (PATH, saved))
    monkeypatch.setattr(resume_checks, "continues_in_place", lambda path: True)
    cfg = Config()
    cfg.training.resume_from_checkpoint = "ck/run_1"
    cfg.dataset.parquet_dir = str(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="the run trained on dataset.parquet_dir"):
        resume_checks.check_run_data_given(cfg, {"config": "/a.yaml", "settings": {}})
    resume_checks.check_run_data_given(cfg, {"config": "/a.yaml", "settings": {"dataset.parquet_dir": None}})  # given
    (tmp_path / "absent").mkdir()  # there: perhaps the run's shards, moved (check_same_data decides, once read)
    resume_checks.check_run_data_given(cfg, {"config": "/a.yaml", "settings": {}})
    # given on the command line: not refused before the data is read, even with another setting left out (the
    # checks after reading it tell that)
    saved["command_line"] = {"config": "/a.yaml", "settings": {"training.batch_size": 32}}
    saved["config"]["training"]["batch_size"] = 4
    (tmp_path / "absent").rmdir()
    with pytest.raises(CheckpointError, match="given training.batch_size=4"):
        resume_checks.check_run_data_given(cfg, {"config": "/b.yaml", "settings": {}})
    resume_checks.check_run_data_given(cfg, {"config": "/b.yaml", "settings": {"dataset.parquet_dir": None}})
