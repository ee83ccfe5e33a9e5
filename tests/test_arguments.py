"""arguments.py: the scripts' command lines: --config and overrides (load_config), and the hints for a
mistyped option, an override written as an option, or a checkpoint without --checkpoint."""
import argparse
import os

import pytest

import arguments
from arguments import (add_config_arguments, add_prompt_arguments, load_config, parse_arguments, prompt_argument,
                       utf8_argument)
from conftest import ROOT


def test_an_override_given_twice_is_noted_and_the_last_applies(capsys):
    args = argparse.Namespace(config=str(ROOT / "config.yaml"), overrides=["training.block_size=64", "training.seed=1",
                                                                "training.block_size=32", "training.seed=1"])
    assert load_config(args).training.block_size == 32
    assert capsys.readouterr().err == ("note: training.block_size is given twice on the command line (64, then 32): "
                                       "the last applies\n")  # the same value twice: nothing to say


def test_an_empty_config_file_is_noted(tmp_path, capsys):
    (tmp_path / "my.yaml").write_text("# training:\n#   max_iters: 10\n")
    args = argparse.Namespace(config=str(tmp_path / "my.yaml"), overrides=["training.max_iters=5"])
    assert load_config(args).training.max_iters == 5
    assert capsys.readouterr().err == (f"note: {tmp_path / 'my.yaml'} holds no settings: every setting not given on "
                                       f"the command line has its default (config.yaml lists them: a model sized for a GPU; "
                                       f"configs/tiny.yaml is for a CPU)\n")
    load_config(argparse.Namespace(config=str(ROOT / "configs" / "tiny.yaml"), overrides=[]))
    assert capsys.readouterr().err == ""


def test_the_notes_are_printed_once_under_torchrun(tmp_path, monkeypatch, capsys):
    (tmp_path / "my.yaml").write_text("# nothing yet\n")
    monkeypatch.setenv("RANK", "1")
    load_config(argparse.Namespace(config=str(tmp_path / "my.yaml"),
                                   overrides=["training.block_size=64", "training.block_size=32"]))
    assert capsys.readouterr().err == ""  # rank 0 says it


def test_config_errors_are_printed_once_under_torchrun(tmp_path, monkeypatch, capsys):
    arguments_config, told = str(ROOT / "configs" / "tiny.yaml"), []
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_status:
            load_config(argparse.Namespace(config=arguments_config, overrides=["training.lr=1"]))
        assert exit_status.value.code == 2
        assert ("config error: training.lr: unknown key" in capsys.readouterr().err) == printed
    monkeypatch.setattr(arguments, "tell_torchrun", told.append)  # its failure summary: the first and a count
    with pytest.raises(SystemExit):
        load_config(argparse.Namespace(config=arguments_config, overrides=["training.lr=1", "model.n_layr=2"]))
    assert told == ["config error: model.n_layr: unknown key; did you mean model.n_layer? (and 1 more)"]


def test_config_errors_are_printed_in_the_order_of_the_file_s_lines_then_the_command_line_s(tmp_path, capsys):
    path = tmp_path / "my.yaml"  # a value problem (val_fraction) is found after the type problems, but comes first
    path.write_text("dataset:\n  val_fraction: 5\ntraining:\n  max_iters: ten\nlogging:\n  tensorboard: maybe\n")
    with pytest.raises(SystemExit):
        load_config(argparse.Namespace(config=str(path), overrides=["training.lr=1", "model.n_layer=x"]))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1:3] for line in lines[:3]] == [
        [f"{path}:2", "dataset.val_fraction"], [f"{path}:4", "training.max_iters"], [f"{path}:6", "logging.tensorboard"]]
    assert sorted(line.split(": ")[1] for line in lines[3:]) == ["model.n_layer", "training.lr"]


def test_overrides_go_on_both_sides_of_an_option_and_after_a_double_dash():
    parser = argparse.ArgumentParser(prog="train.py")
    add_config_arguments(parser)
    parser.add_argument("--print-config", action="store_true")
    args = parse_arguments(parser, ["training.seed=3", "--config", "my.yaml", "training.max_iters=5", "--print-config",
                                    "model.n_layer=2"])
    assert (args.config, args.print_config) == ("my.yaml", True)
    assert args.overrides == ["training.seed=3", "training.max_iters=5", "model.n_layer=2"]
    args = parse_arguments(parser, ["--config", "my.yaml", "--", "-odd=1"])  # after --: positional, dash or not
    assert args.overrides == ["-odd=1"]


def test_an_override_written_as_an_option_is_told_to_drop_the_dashes(capsys):
    parser = argparse.ArgumentParser(prog="train.py")
    add_config_arguments(parser)
    assert parse_arguments(parser, ["training.seed=3"]).overrides == ["training.seed=3"]
    for argv, hint in ((["--training.seed=3"], "training.seed=3"), (["--training.seed", "3"], "training.seed=3"),
                       (["--training.seed"], "training.seed=VALUE")):
        with pytest.raises(SystemExit):
            parse_arguments(parser, argv)
        assert capsys.readouterr().err.endswith(f"error: unrecognized argument {argv[0]}: an override takes no "
                                                f"dashes: {hint}\n")
    # nanoGPT's way (--max_iters 10): the setting of that name, in its section
    for argv, hint in ((["--max_iters", "10"], "training.max_iters=10"), (["--batch-size=8"], "training.batch_size=8"),
                       (["--n_layer", "--config", "a.yaml"], "model.n_layer=VALUE"), (["--lr", "1e-3"],
                       "training.learning_rate=1e-3"), (["--debug", "training.max_iters=4"], "training.debug=true")):
        with pytest.raises(SystemExit):
            parse_arguments(parser, argv)
        assert capsys.readouterr().err.endswith(f"error: unrecognized argument {argv[0]}: settings are given as "
                                                f"section.key=value: {hint}\n")
    with pytest.raises(SystemExit):
        parse_arguments(parser, ["--epochs", "3"])
    assert capsys.readouterr().err.endswith("error: unrecognized argument --epochs: settings are given as "
                                            "section.key=value; training has no epochs setting: it runs "
                                            "training.max_iters optimizer steps of batch_size x block_size x "
                                            "gradient_accumulation_steps tokens each; set training.max_iters\n")
    with pytest.raises(SystemExit):
        parse_arguments(parser, ["--bogus"])
    assert capsys.readouterr().err.endswith("error: unrecognized arguments: --bogus\n")
    parser.add_argument("--vocab-size")  # a script's own options, misspelled: those, not a setting
    parser.add_argument("--out")
    for argv, meant in ((["--vocab_size", "4096"], "--vocab-size"), (["--out_dir", "shards"], "--out"),
                        (["-c", "a.yaml"], "--config"), (["-v", "4096"], "--vocab-size")):  # a short option guessed
        with pytest.raises(SystemExit):
            parse_arguments(parser, argv)
        assert capsys.readouterr().err.endswith(f"error: unrecognized argument {argv[0]}: did you mean {meant}?\n")


def test_a_misspelled_option_is_named_in_every_script(tmp_path, capsys):
    import sample
    for argv, meant in ((["--tempreature", "1"], "--temperature"), (["--max_new_tokens=5"], "--max-new-tokens")):
        with pytest.raises(SystemExit) as stop:
            sample.main(argv)
        assert stop.value.code == 2
        assert capsys.readouterr().err.endswith(f"error: unrecognized argument {argv[0]}: did you mean {meant}?\n")
    run = tmp_path / "run_1"
    run.mkdir()
    (run / "config.yaml").write_text("")
    for argv in (["ck/run_1/best.pt"], [str(run), "--max-new-tokens", "5"]):  # a checkpoint without its option
        with pytest.raises(SystemExit):
            sample.main(argv)
        assert capsys.readouterr().err.endswith(f"error: unrecognized argument {argv[0]}: a checkpoint is given as "
                                                f"--checkpoint {argv[0]}\n")
    with pytest.raises(SystemExit):
        sample.main(["--checkpoint-dir", str(tmp_path), str(run)])
    assert capsys.readouterr().err.endswith(f": a checkpoint is given as --checkpoint {run} (without "
                                            f"--checkpoint-dir)\n")
    (run / "checkpoint_2.pt").write_bytes(b"")
    with pytest.raises(SystemExit):
        sample.main([str(tmp_path)])
    assert capsys.readouterr().err.endswith(f": a folder of runs is given as --checkpoint-dir {tmp_path}\n")
    (tmp_path / "notes").mkdir()
    for argv in (["--prompt", "Read", "the", str(run)], ["--prompt", "Read", str(tmp_path / "notes")],  # unquoted
                 ["--checkpoint", str(run), str(run)], [str(ROOT)]):  # (the repository: its config.yaml is no run's)
        with pytest.raises(SystemExit):
            sample.main(argv)
        assert " is given as " not in capsys.readouterr().err


def test_a_second_config_file_is_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  batch_size: 4\n")
    parser = argparse.ArgumentParser(prog="train.py")
    add_config_arguments(parser)
    with pytest.raises(SystemExit):
        parse_arguments(parser, ["--config", str(path), "--config", "config.yaml"])
    assert f"error: --config is given twice ({path}, then config.yaml)" in capsys.readouterr().err
    assert parse_arguments(parser, ["--config", str(path)]).config == str(path)


def test_under_torchrun_the_fsdp_only_checks_refuse_fsdp_runs_not_ddp_runs(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = str(ROOT / "configs" / "tiny.yaml")
    cfg = load_config(argparse.Namespace(config=config, overrides=["training.distributed=ddp",
                                                                   "low_precision.use_4bit=true"]))
    assert cfg.low_precision.use_4bit and cfg.training.distributed == "ddp"
    with pytest.raises(SystemExit) as stop:
        load_config(argparse.Namespace(config=config, overrides=["training.distributed=fsdp",
                                                                 "low_precision.use_4bit=true"]))
    assert stop.value.code == 2
    assert "config error: low_precision.use_4bit with training.distributed=fsdp" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--epochs", "3"], ["--lr", "1e-3"]])
def test_a_script_without_settings_does_not_offer_a_setting(argv, capsys):
    """sample.py takes no section.key=value: --epochs or --lr there is not told to write one."""
    parser = argparse.ArgumentParser(prog="sample.py")
    parser.add_argument("--checkpoint")
    with pytest.raises(SystemExit):
        parse_arguments(parser, argv)
    err = capsys.readouterr().err
    assert "unrecognized argument" in err and "section.key=value" not in err


def test_a_prompt_file_is_read_without_a_byte_order_mark_and_one_not_utf8_is_a_usage_error(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="sample.py")
    add_prompt_arguments(parser, required=True)
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfOnce upon\n")  # UTF-8 as a Windows editor saves it
    assert prompt_argument(parser, parse_arguments(parser, ["--prompt-file", str(tmp_path / "p.txt")])) == "Once upon\n"
    (tmp_path / "p.txt").write_bytes(b"ab\xe9c")  # Latin-1
    with pytest.raises(SystemExit) as stop:
        prompt_argument(parser, parse_arguments(parser, ["--prompt-file", str(tmp_path / "p.txt")]))
    assert stop.value.code == 2 and "not UTF-8 text (an invalid byte at byte 2)" in capsys.readouterr().err
    # --prompt given bytes that are not UTF-8: each becomes U+FFFD (not dropped), and a note says so
    assert utf8_argument(os.fsdecode(b"caf\xe9 au lait"), "--prompt") == "caf\ufffd au lait"
    assert "note: --prompt is not valid UTF-8 (byte 3: b'\\xe9')" in capsys.readouterr().err
