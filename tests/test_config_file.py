"""Reading a config as written (config_file.py): keys given twice, overrides, strict types, and
suggestions for misspelled names of settings; checked through Config and the scripts, as users meet
them. (YAML syntax mistakes: test_yaml_errors.py.)"""
import pytest
import torch
import yaml

from config import Config, ConfigError
from config_file import read_yaml, with_split_settings
from conftest import config_problems, file_problems


def test_unknown_key_suggests_the_closest_name():
    assert config_problems({"training": {"learnig_rate": 1e-3}}) == [
        "training.learnig_rate: unknown key; did you mean training.learning_rate?"]


def test_key_in_the_wrong_section_points_to_the_right_one():
    [p] = config_problems({"training": {"dropout": 0.2}})
    assert "did you mean model.dropout?" in p


@pytest.mark.parametrize("section,key,value,expected", [
    ("training", "batch_size", "8", "expected int, got str '8'; a number in quotes is text: write it without them "
                                    "(`batch_size: 8` in the file, training.batch_size=8 on the command line)"),
    ("training", "batch_size", "0.5", "expected int, got str '0.5'"),  # unquoted, still not an int
    ("training", "batch_size", 8.5, "expected int, got float 8.5"),
    ("training", "max_iters", 1e-3, "expected int, got float 0.001"),
    ("training", "learning_rate", "1e-3", "expected float, got str '1e-3'; a number in quotes is text: write it "
                                          "without them (`learning_rate: 1e-3` in the file, "
                                          "training.learning_rate=1e-3 on the command line)"),
    ("training", "batch_size", True, "expected int, got bool True"),
    ("training", "max_iters", None, "expected int, got no value"),
    ("training", "learning_rate", "fast", "expected float, got str 'fast'; write a plain number (3000, 0.05 or "
                                         "3e-4: no commas, units or %)"),
    ("training", "learning_rate", "0.001", "expected float, got str '0.001'; a number in quotes is text: write it "
                                           "without them (`learning_rate: 0.001` in the file, "
                                           "training.learning_rate=0.001 on the command line)"),
    ("training", "debug", "true", "expected bool (true or false), got str 'true'; true in quotes is text: write it "
                                  "without them (`debug: true` in the file, training.debug=true on the command line)"),
    ("training", "debug", 1, "expected bool (true or false), got int 1"),
    ("training", "debug", "False ", "expected bool (true or false), got str 'False '; false in quotes is text: "
                                    "write it without them (`debug: false` in the file, training.debug=false on the "
                                    "command line)"),
    ("training", "learning_rate", True, "expected float, got bool True"),
    ("training", "resume_from_checkpoint", "", "empty text ''; write null for none"),
    ("training", "resume_from_checkpoint", True, "expected str or null, got bool True; to resume the newest run, write "
                                                 "latest (or auto: latest where there is a run, else a new run)"),
    ("training", "resume_from_checkpoint", False, "expected str or null, got bool False; for a new run, write null"),
    ("dataset", "parquet_dir", " ", "empty text ' '; give one, or leave it out for the default, data/stdlib"),
    ("dataset", "text_column", True, "expected str, got bool True; YAML reads an unquoted yes, no, on, off, true, "
                                     "false or number as one: put the text in quotes (`text_column: \"...\"` in the "
                                     "file, 'dataset.text_column=\"...\"' on the command line)"),
    ("training", "checkpoint_dir", None, "expected str, got no value; YAML reads an empty value or a bare ~ as none: "
                                         "give a value, in quotes if it is ~ (`checkpoint_dir: \"~\"`)"),
])
def test_wrong_types_name_path_expected_type_and_value(section, key, value, expected):
    assert config_problems({section: {key: value}}) == [f"{section}.{key}: {expected}"]


def test_text_that_reads_as_a_number_survives_a_saved_config(tmp_path):
    config = Config.from_dict({}, ["logging.wandb_run_name='1e5'", "training.learning_rate=3e-4"])
    (tmp_path / "run.yaml").write_text(config.to_yaml())
    assert Config.from_yaml(tmp_path / "run.yaml") == config


def test_exponent_notation_is_a_number_in_the_file_and_on_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 3e-4\n  min_lr: 1e-5\n  max_iters: 1e5\n  eval_iters: 2.0e1\n")
    assert yaml.safe_load(path.read_text())["training"]["learning_rate"] == "3e-4"  # the YAML 1.1 quirk itself
    raw = read_yaml(path, ["training"])
    t = Config.from_dict(raw, ["training.seed=7.0", "training.warmup_iters=2e2"]).training
    assert (t.learning_rate, t.min_lr, t.max_iters, t.eval_iters, t.seed, t.warmup_iters) == (3e-4, 1e-5, 100000, 20,
                                                                                              7, 200)
    assert type(t.max_iters) is int and type(t.warmup_iters) is int
    assert config_problems({"training": {"max_iters": 1.5e0}}) == [
        "training.max_iters: expected int, got float 1.5"]


def test_int_is_accepted_for_float():
    assert Config.from_dict({"training": {"weight_decay": 0}}).training.weight_decay == 0.0


def test_a_control_character_is_named_with_its_line(tmp_path):
    path = tmp_path / "pasted.yaml"
    path.write_text("model:\n  n_layer: 4\x01\n")
    assert file_problems(path) == [f"{path}:2: YAML cannot hold character U+0001 (a control character): delete it"]


def test_a_section_with_every_key_commented_out_takes_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  # batch_size: 4\nmodel:\n  n_layer: 2\n")
    assert Config.from_yaml(path, ["training.batch_size=16"]).training.batch_size == 16
    path.write_text("training: 5\n")
    assert file_problems(path, ["training.batch_size=16"]) == [
        f"{path}:1: training: must be a mapping of keys, got int 5"]  # once


def test_a_problem_with_a_setting_of_the_file_says_where_it_is(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  warmpu_iters: 5\n  batch_size: '8'\nmodel:\n  n_layer: 0\n")
    assert file_problems(path, ["model.n_layer=0"]) == [
        f"{path}:2: training.warmpu_iters: unknown key; did you mean training.warmup_iters?",
        f"{path}:3: training.batch_size: expected int, got str '8'; a number in quotes is text: write it without "
        f"them (`batch_size: 8` in the file, training.batch_size=8 on the command line)",
        "model.n_layer: must be > 0, got 0"]  # the command line's value: not the file's line


def test_yaml_merge_keys_work_and_a_list_as_key_is_named(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("base: &b\n  batch_size: 4\ntraining:\n  <<: *b\n  max_iters: 5\n")
    assert read_yaml(path, ["base", "training"])["training"] == {"batch_size": 4, "max_iters": 5}
    path.write_text("training:\n  ? [a]\n  : 1\n")
    assert file_problems(path) == [f"{path}:2:5: YAML syntax error: a key must be a name, not a list"]


def test_missing_file(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="config file not found; pass an existing file with --config$"):
        Config.from_yaml(tmp_path / "nope.yaml")
    monkeypatch.chdir(tmp_path)  # train.py run from another folder: where config.yaml was looked for
    with pytest.raises(ConfigError, match=f"^config.yaml: config file not found \\(relative paths start from the "
                                          f"current directory, {tmp_path}\\); pass an existing file with --config$"):
        Config.from_yaml("config.yaml")
    (tmp_path / "tiny.yaml").write_text("training:\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=f"tiny: config file not found; did you mean --config {tmp_path}/tiny.yaml"):
        Config.from_yaml(tmp_path / "tiny")
    with pytest.raises(ConfigError, match=f"tiny.yml: config file not found; did you mean --config {tmp_path}/tiny.yaml"):
        Config.from_yaml(tmp_path / "tiny.yml")  # a typo of an existing file's name
    # --config forgotten, from a folder without config.yaml: the file given says so too
    assert file_problems("config.yaml", ["/repo/configs/tiny.yaml"])[1:] == [
        "/repo/configs/tiny.yaml: an override must look like section.key=value; to train with this file: --config "
        "/repo/configs/tiny.yaml"]


def test_a_checkpoint_given_as_the_config_says_how_to_resume_it(tmp_path):
    path = tmp_path / "checkpoint_4.pt"
    torch.save({"step": 4}, path)
    with pytest.raises(ConfigError, match=r"a checkpoint, not a YAML config file; resume it with "
                                          r"training.resume_from_checkpoint=.*checkpoint_4.pt"):
        Config.from_yaml(path)
    path = tmp_path / "utf16.yaml"  # what PowerShell 5.1 writes for `... --print-config > utf16.yaml`
    path.write_text("training:\n  batch_size: 4\n", encoding="utf-16")
    assert Config.from_yaml(path).training.batch_size == 4  # read by its byte-order mark
    path.write_bytes(path.read_bytes() + b"\x00\xdc")  # a lone surrogate
    with pytest.raises(ConfigError, match=r"utf16.yaml: not UTF-16 text \(illegal encoding at byte \d+\); save the "
                                          r"config as UTF-8"):
        Config.from_yaml(path)
    path.write_bytes(b"training:\n  batch_size: \xff\n")
    with pytest.raises(ConfigError, match=r"utf16.yaml: not UTF-8 text \(invalid start byte at byte 24\); save the"):
        Config.from_yaml(path)


def test_overrides_are_parsed_as_yaml_scalars_and_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  batch_size: 4\n")
    c = Config.from_yaml(path, ["training.batch_size=16", "model.dropout=0.0",
                                "training.resume_from_checkpoint=latest", "training.compile=true"])
    assert (c.training.batch_size, c.model.dropout) == (16, 0.0)
    assert c.training.resume_from_checkpoint == "latest" and c.training.compile is True
    with pytest.raises(ConfigError, match="training.batch_sise: unknown key; did you mean training.batch_size"):
        Config.from_yaml(path, ["training.batch_sise=16"])
    with pytest.raises(ConfigError, match="expected int"):
        Config.from_yaml(path, ["training.batch_size=big"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        Config.from_yaml(path, ["batch_size=16"])
    with pytest.raises(ConfigError, match="my.yaml: an override must look like section.key=value; to train with this "
                                          "file: --config my.yaml"):
        Config.from_yaml(path, ["my.yaml"])


def test_an_empty_override_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  batch_size: 4\n")
    # `...=$CKPT` with CKPT unset: not a new run without a word
    assert file_problems(path, ["training.resume_from_checkpoint="]) == ["training.resume_from_checkpoint=: no value (an unset shell variable?); write "
                                   "training.resume_from_checkpoint=null for none"]
    assert Config.from_yaml(path, ["dataset.val_parquet_dir=null"]).dataset.val_parquet_dir is None
    assert file_problems(path, ["training.max_iters="]) == [  # null is no value for it
        "training.max_iters=: no value (an unset shell variable?); give it one, or leave it out for the default"]


def test_a_key_or_section_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 1.0e-3\n  batch_size: 4\n  learning_rate: 2.0e-3\n"
                    "model:\n  n_layer: 2\ntraining:\n  max_iters: 5\n")
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert info.value.problems == [
        f"{path}:4: 'learning_rate' appears again (first at line 2); YAML would keep only the last: keep one",
        f"{path}:7: 'training' appears again (first at line 1); YAML would keep only the last, replacing the "
        f"whole section: keep one"]
    path.write_text("training:\n  min_lr: 1.0e-6\ntraining:\n  learning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError) as info:  # only that: the min_lr of line 2 is not the run's any more
        Config.from_yaml(path)
    assert info.value.problems == [f"{path}:3: 'training' appears again (first at line 1); YAML would keep only the "
                                   f"last, replacing the whole section: keep one"]
    path.write_text("training:\n  learnig_rate: 1.0e-3\n  max_iters: 5\n  max_iters: 6\n")  # with other problems: all
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path, ["training.lr=1"])
    assert info.value.problems == [
        f"{path}:2: training.learnig_rate: unknown key; did you mean training.learning_rate?",
        "training.lr: unknown key; did you mean training.learning_rate?",
        f"{path}:4: 'max_iters' appears again (first at line 3); YAML would keep only the last: keep one"]


def test_a_key_without_its_section_is_given_it():
    assert config_problems({}, ["max_iters=5"]) == [
        "max_iters=5: an override must look like section.key=value; did you mean training.max_iters=5?"]
    assert config_problems({}, ["lr=3"]) == [
        "lr=3: an override must look like section.key=value; did you mean training.learning_rate=3?"]
    assert config_problems({}, ["no_such=5"]) == [
        "no_such=5: an override must look like section.key=value (for example training.batch_size=16)"]
    assert config_problems({}, [".max_iters=5"]) == [  # (it said ": unknown section")
        ".max_iters=5: an override must look like section.key=value; did you mean training.max_iters=5?"]
    assert config_problems({}, [" .max_iters="]) == [  # (no value to suggest)
        " .max_iters=: an override must look like section.key=value (for example training.batch_size=16)"]
    assert config_problems({}, ["training.=5"]) == [
        "training.=5: an override must look like section.key=value (for example training.batch_size=16)"]
    assert config_problems({}, ["epochs=3"]) == [
        "epochs=3: an override must look like section.key=value; training has no epochs setting: it runs "
        "training.max_iters optimizer steps of batch_size x block_size x gradient_accumulation_steps tokens each; set "
        "training.max_iters"]


def test_an_override_split_at_a_space_is_joined_in_the_hint():
    assert config_problems({}, ["training.max_iters", "100", "training.seed=3"]) == [
        "training.max_iters 100: an override is one argument; did you mean training.max_iters=100?"]
    assert config_problems({}, ["training.max_iters", "my.yaml"])[-1].startswith("my.yaml: an override must look like")


@pytest.mark.parametrize("override,hint", [
    ("training.lr=1", "did you mean training.learning_rate?"),
    ("training.bs=8", "did you mean training.batch_size?"),
    ("training.iters=10", "did you mean training.max_iters?"),
    ("training.max_steps=10", "did you mean training.max_iters?"),
    ("model.n_embed=64", "did you mean model.n_embd?"),
    ("training.epochs=3", "training has no epochs setting: it runs training.max_iters optimizer steps"),
    ("training.eval_interval=100", "did you mean training.test_freq?"),  # not eval_iters, the closest spelling
    ("training.dtype=bfloat16", "did you mean low_precision.compute_dtype?"),
    ("training.init_from=resume", "did you mean training.resume_from_checkpoint?"),
    ("training.save_every=100", "did you mean training.checkpoint_freq?"),
    ("training.beta2=0.99", "there is no such setting: AdamW's betas are fixed at 0.9 and 0.95"),
    ("model.bias=false", "there is no such setting: BDH's layers have no bias terms"),
])
def test_names_from_other_trainers_point_at_the_right_field(override, hint):
    [problem] = config_problems({}, [override])
    assert problem.startswith(f"{override.split('=')[0]}: unknown key; ") and hint in problem


def test_whole_numbers_are_read_as_yaml_1_2_reads_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  seed: 0042\n  max_iters: 08\n")  # YAML 1.1: octal 34, and text
    c = Config.from_yaml(path, ["training.batch_size=016"])
    assert (c.training.seed, c.training.max_iters, c.training.batch_size) == (42, 8, 16)
    path.write_text("training:\n  max_iters: 1:30\n")  # YAML 1.1: 90, in base 60
    assert file_problems(path) == [f"{path}:2: training.max_iters: expected int, got str '1:30'; write a plain number "
                                   f"(3000, 0.05 or 3e-4: no commas, units or %)"]
    assert config_problems({"training": {"max_iters": "3,000"}})[0].endswith("write a plain number (3000, 0.05 or "
                                                                             "3e-4: no commas, units or %)")
    c = Config.from_dict({"logging": {"wandb_run_name": "0042"}})
    assert Config.from_dict(yaml.load(c.to_yaml(), Loader=yaml.SafeLoader)).logging.wandb_run_name == "0042"


def test_none_written_for_null_and_a_section_indented_under_another_are_told(tmp_path):
    assert config_problems({"dataset": {"val_parquet_dir": "None"}}) == [
        "dataset.val_parquet_dir: None is text in YAML, not none: write null for none"]
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_iters: 10\n  dataloader:\n  num_workers: 0\n")
    assert file_problems(path)[0] == (f"{path}:3: training.dataloader: dataloader is a section of its own, not a key "
                                      f"of training: write `dataloader:` at the start of its line")


def test_an_override_written_with_a_colon_spaces_or_a_hash_is_told_or_taken_as_written(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  batch_size: 4\n  learning_rate: 1.0e-3\n")
    for overrides, problem in ((["training.learning_rate:3e-4"], "training.learning_rate:3e-4: an override is written "
                                "with '=', not ':': training.learning_rate=3e-4"),
                               (["training.learning_rate:=3e-4"], "training.learning_rate:=3e-4: an override is "
                                "written with '=', not ':': training.learning_rate=3e-4"),
                               (["training.learning_rate = 3e-4"], "'training.learning_rate = 3e-4': no spaces around "
                                "'=' in an override: training.learning_rate=3e-4"),
                               (["training.learning_rate= 3e-4"], "'training.learning_rate= 3e-4': no spaces around "
                                "'=' in an override: training.learning_rate=3e-4")):
        assert file_problems(path, overrides) == [problem]  # the override's, not the file's line 3
    for words in (["training.learning_rate", "=", "3e-4"], ["training.learning_rate=", "3e-4"],
                  ["training.learning_rate", "=3e-4"]):
        assert file_problems(path, words) == [f"{' '.join(words)}: no spaces around '=' in an override: "
                                              f"training.learning_rate=3e-4"]
    assert file_problems(path, ["training.resume_from_checkpoint=", "training.seed=3"])[0].startswith(
        "training.resume_from_checkpoint=: no value")  # an unset variable, not a space
    c = Config.from_yaml(path, ["logging.wandb_run_name=run #1", "logging.wandb_project=#2",
                                "logging.wandb_entity=\"a # b\"", "dataset.text_column=\"a\" #b"])  # (in quotes,
    assert (c.logging.wandb_run_name, c.logging.wandb_project, c.logging.wandb_entity) == (  # YAML's reading)
        "run #1", "#2", "a # b")
    assert c.dataset.text_column == "\"a\" #b"  # not quoted whole: as written
    assert Config.from_yaml(path, ["dataset.text_column='a' # 'b'"]).dataset.text_column == "'a' # 'b'"
    assert file_problems(path, ["training.seed"]) == [
        "training.seed: an override must look like section.key=value (for example training.batch_size=16)"]
    assert file_problems(path, ["training.batch_size=16 #x"]) == [
        "training.batch_size: expected int, got str '16 #x'; write a plain number (3000, 0.05 or 3e-4: no commas, "
        "units or %)"]
    path.write_text("training:\n  batch_size: 4\n  max_iters: 0\n")  # an override that is a prefix of the problem's
    for overrides in ([""], ["training"]):
        assert file_problems(path, overrides)[-1] == f"{path}:3: training.max_iters: must be > 0, got 0"


def test_an_old_config_keeps_the_validation_split_it_trained_with():
    """Before dataset.split_seed: training.seed drew the split, by position; with val_parquet_dir, the defaults."""
    old = with_split_settings({"dataset": {}, "training": {"seed": 7}})
    assert (old["dataset"]["split_seed"], old["dataset"]["split_by"]) == (7, "position")
    own_folder = with_split_settings({"dataset": {"val_parquet_dir": "val"}, "training": {"seed": 7}})
    assert (own_folder["dataset"]["split_seed"], own_folder["dataset"]["split_by"]) == (1337, "text")
    assert with_split_settings({"dataset": {"split_seed": 3, "split_by": "text"}})["dataset"] == {
        "split_seed": 3, "split_by": "text"}
