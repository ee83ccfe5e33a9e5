import argparse
import re
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT
from config import Config, ConfigError, load_config
from model import BDHConfig


def problems(raw, overrides=()):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(raw, overrides)
    return info.value.problems


def test_defaults_follow_the_configuration_guide():
    c = Config()
    assert (c.model.n_layer, c.model.n_embd, c.model.dropout, c.model.n_head,
            c.model.mlp_internal_dim_multiplier, c.model.vocab_size) == (6, 256, 0.1, 4, 128, 256)
    t = c.training
    assert (t.block_size, t.batch_size, t.max_iters, t.learning_rate, t.weight_decay) == (512, 8, 3000, 1e-3, 0.1)
    assert (t.log_freq, t.test_freq, t.checkpoint_freq, t.checkpoint_dir) == (100, 500, 500, "checkpoints")
    assert t.resume_from_checkpoint is None and t.debug is False
    lp = c.low_precision
    # the guide's use_4bit default is true; off here: it makes every validation loss the 4-bit model's
    assert (lp.use_fp8, lp.use_4bit, lp.use_4bit_optimizer) == (False, False, False)
    assert (lp.quantization_type, lp.use_double_quant, lp.compute_dtype) == ("nf4", True, "bfloat16")
    assert c.dataset.text_column == "text"


def test_shipped_config_yaml_holds_the_defaults_and_documents_every_field():
    assert Config.from_yaml(ROOT / "config.yaml") == Config()
    lines = (ROOT / "config.yaml").read_text().splitlines()
    fields = [l for l in lines if re.match(r"^\s+\w+:", l)]
    assert len(fields) == sum(len(v) for v in Config().to_dict().values())
    undocumented = [l for l in fields if "#" not in l]
    assert not undocumented


def test_shipped_configs_load():
    for path in (ROOT / "configs").glob("*.yaml"):
        Config.from_yaml(path)


def test_unknown_key_suggests_the_closest_name():
    assert problems({"training": {"learnig_rate": 1e-3}}) == [
        "training.learnig_rate: unknown key; did you mean training.learning_rate?"]


def test_key_in_the_wrong_section_points_to_the_right_one():
    [p] = problems({"training": {"dropout": 0.2}})
    assert "did you mean model.dropout?" in p


def test_unknown_section():
    [p] = problems({"trainng": {}})
    assert p.startswith("trainng: unknown section; did you mean training?")


def test_a_dotted_key_in_a_file_says_how_to_write_it():
    assert problems({"training.batch_size": 4}) == [
        "training.batch_size: a dotted key belongs on the command line; in a YAML file write `batch_size:` indented "
        "under `training:`"]


def test_numbers_that_cannot_train_are_refused():
    assert problems({"training": {"learning_rate": float("nan"), "grad_clip": float("-inf")}}) == [
        "training.learning_rate: must be a finite number, got nan", "training.grad_clip: must be a finite number, got -inf"]
    assert problems({"training": {"seed": 2**32}}) == [
        "training.seed: must be below 2**32 = 4294967296 (NumPy's seeds), got 4294967296"]


@pytest.mark.parametrize("section,key,value,expected", [
    ("training", "batch_size", "8", "expected int, got str '8'"),
    ("training", "batch_size", 8.5, "expected int, got float 8.5"),
    ("training", "batch_size", True, "expected int, got bool True"),
    ("training", "max_iters", None, "expected int, got no value"),
    ("training", "learning_rate", "fast", "expected float, got str 'fast'"),
    ("training", "learning_rate", "0.001", "expected float, got str '0.001'"),
    ("training", "debug", "true", "expected bool (true or false), got str 'true'"),
    ("training", "debug", 1, "expected bool (true or false), got int 1"),
    ("training", "checkpoint_dir", 5, "expected str, got int 5; quote it to give it as text: \"5\" in the file, "
                                      "'training.checkpoint_dir=\"5\"' on the command line"),
])
def test_wrong_types_name_path_expected_type_and_value(section, key, value, expected):
    assert problems({section: {key: value}}) == [f"{section}.{key}: {expected}"]


def test_exponent_floats_that_pyyaml_reads_as_strings_are_accepted():
    raw = yaml.safe_load("training:\n  learning_rate: 3e-4\n  min_lr: 1e-5\n")
    assert isinstance(raw["training"]["learning_rate"], str)  # the PyYAML quirk itself
    c = Config.from_dict(raw)
    assert c.training.learning_rate == 3e-4 and c.training.min_lr == 1e-5


def test_whole_numbers_in_exponent_notation_are_accepted_for_ints():
    raw = yaml.safe_load("training:\n  max_iters: 1e5\n  eval_iters: 2.0e1\n  seed: 7.0\n")
    t = Config.from_dict(raw).training
    assert (t.max_iters, t.eval_iters, t.seed) == (100000, 20, 7) and type(t.max_iters) is int
    assert problems({"training": {"max_iters": "1.5e0"}}) == ["training.max_iters: expected int, got str '1.5e0'"]


def test_a_home_directory_in_paths_is_expanded(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    c = Config.from_dict({"training": {"checkpoint_dir": "~/ck", "resume_from_checkpoint": "latest"},
                          "dataset": {"parquet_dir": "~/data", "tokenizer": "~/tok.json"}})
    assert (c.training.checkpoint_dir, c.dataset.parquet_dir, c.dataset.tokenizer) == (
        "/home/someone/ck", "/home/someone/data", "/home/someone/tok.json")
    assert c.training.resume_from_checkpoint == "latest" and c.dataset.val_parquet_dir is None


def test_int_is_accepted_for_float():
    assert Config.from_dict({"training": {"weight_decay": 0}}).training.weight_decay == 0.0


@pytest.mark.parametrize("raw,fragment", [
    ({"model": {"n_layer": 0}}, "model.n_layer: must be > 0"),
    ({"training": {"batch_size": -1}}, "training.batch_size: must be > 0"),
    ({"model": {"dropout": 1.0}}, "model.dropout: must be in [0, 1)"),
    ({"model": {"n_head": 3}}, "must be divisible by n_head = 3"),
    ({"training": {"min_lr": 0.1}}, "training.min_lr: must be <= training.learning_rate"),
    ({"training": {"device": "tpu"}}, "training.device: must be one of auto, cpu, cuda, mps"),
    ({"training": {"compile": "yes please"}}, "training.compile: must be true, false or auto"),
    ({"low_precision": {"compute_dtype": "fp8"}}, "low_precision.compute_dtype: must be one of"),
    ({"low_precision": {"quantization_type": "int4"}}, "low_precision.quantization_type: must be one of"),
    ({"fp8": {"format": "e5m2"}}, "fp8.format: must be one of hybrid, e4m3"),
    ({"fp8": {"amax_compute_algo": "mean"}}, "fp8.amax_compute_algo: must be one of"),
    ({"model": {"vocab_size": 100}}, "model.vocab_size: tokens are bytes"),
    ({"dataset": {"val_fraction": 0.0}}, "dataset.val_fraction: must be in (0, 1)"),
    ({"low_precision": {"qat_start_fraction": 1.0}}, "low_precision.qat_start_fraction: must be in [0, 1)"),
    ({"training": {"distributed": "deepspeed"}}, "training.distributed: must be one of ddp, fsdp"),
    ({"training": {"distributed_timeout_s": 0}}, "training.distributed_timeout_s: must be > 0"),
])
def test_value_checks(raw, fragment):
    assert any(fragment in p for p in problems(raw)), problems(raw)


@pytest.mark.parametrize("raw,fragment", [
    ({"model": {"n_embd": 72, "n_head": 1}}, "model.n_embd = 72 must be a multiple of 16"),
    ({"training": {"batch_size": 3, "block_size": 10}}, "training.batch_size * training.block_size = 30"),
    ({"low_precision": {"use_4bit": True}}, "cannot be combined with use_4bit"),
    ({"fp8": {"amax_history_len": 32}}, "fp8.amax_history_len: configures TransformerEngine"),
    ({"fp8": {"torchao_recipe": "rowwise"}}, "fp8.format: torchao's rowwise recipe uses E4M3"),
])
def test_fp8_combinations_that_cannot_work_are_refused(raw, fragment):
    raw = {**raw, "low_precision": {"use_fp8": True, **raw.get("low_precision", {})}}
    assert any(fragment in p for p in problems(raw)), problems(raw)


def test_fp8_settings_that_work_are_accepted():
    lp = {"use_fp8": True, "use_4bit_optimizer": True}
    Config.from_dict({"low_precision": lp, "fp8": {"torchao_recipe": "rowwise", "format": "e4m3"}})


def test_every_problem_is_reported_at_once():
    ps = problems({"training": {"learnig_rate": 1, "batch_size": "8"}, "model": {"n_layer": -2},
                   "bogus": {}})
    assert len(ps) == 4


def test_yaml_syntax_error_is_one_line_with_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_layer: 4\n training: [\n")
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    [p] = info.value.problems
    assert p.startswith(f"{path}:3:") and "YAML syntax error" in p and "\n" not in p


def test_an_unquoted_glob_pattern_is_told_to_take_quotes(tmp_path):
    path = tmp_path / "glob.yaml"
    path.write_text("dataset:\n  parquet_dir: **/train-*.parquet\n")
    with pytest.raises(ConfigError, match=r"glob.yaml:2:.*such as a glob pattern, needs quotes"):
        Config.from_yaml(path)
    path.write_text('dataset:\n  parquet_dir: "**/train-*.parquet"\n')
    assert Config.from_yaml(path).dataset.parquet_dir == "**/train-*.parquet"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        Config.from_yaml(tmp_path / "nope.yaml")


def test_a_checkpoint_given_as_the_config_says_how_to_resume_it(tmp_path):
    path = tmp_path / "checkpoint_4.pt"
    torch.save({"step": 4}, path)
    with pytest.raises(ConfigError, match=r"a checkpoint, not a YAML config file; resume it with "
                                          r"training.resume_from_checkpoint=.*checkpoint_4.pt"):
        Config.from_yaml(path)
    path = tmp_path / "utf16.yaml"  # what PowerShell 5.1 writes for `... --print-config > utf16.yaml`
    path.write_text("training:\n  batch_size: 4\n", encoding="utf-16")
    with pytest.raises(ConfigError, match=r"utf16.yaml: not UTF-8 text \(invalid start byte at byte 0\); save the"):
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


def test_yaml_round_trip():
    c = Config.from_dict({"training": {"min_lr": 1e-5, "compile": True, "resume_from_checkpoint": "x.pt"},
                          "model": {"dropout": 0.0}})
    again = Config.from_dict(yaml.safe_load(c.to_yaml()))
    assert again == c and again.training.min_lr == 1e-5


def test_the_model_section_is_the_model_config():
    b = Config.from_dict({"model": {"n_layer": 3}}).model
    assert isinstance(b, BDHConfig) and b.n_layer == 3 and b.n_latent == 128 * 256 // 4


def run_train(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learnig_rate: 0.1\n  batch_size: '8'\n")
    r = run_train("--config", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "training.learnig_rate: unknown key; did you mean training.learning_rate?" in r.stderr
    assert "training.batch_size: expected int, got str '8'" in r.stderr


def test_cli_print_config_shows_overrides():
    r = run_train("--print-config", "training.batch_size=16")
    assert r.returncode == 0
    assert yaml.safe_load(r.stdout)["training"]["batch_size"] == 16


def test_an_override_given_twice_is_noted_and_the_last_applies(capsys):
    args = argparse.Namespace(config=str(ROOT / "config.yaml"), overrides=["training.block_size=64", "training.seed=1",
                                                                "training.block_size=32", "training.seed=1"])
    assert load_config(args).training.block_size == 32
    assert capsys.readouterr().err == ("note: training.block_size is given twice on the command line (64, then 32): "
                                       "the last applies\n")  # the same value twice: nothing to say


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


@pytest.mark.parametrize("override,hint", [
    ("training.lr=1", "did you mean training.learning_rate?"),
    ("training.bs=8", "did you mean training.batch_size?"),
    ("training.iters=10", "did you mean training.max_iters?"),
    ("training.max_steps=10", "did you mean training.max_iters?"),
    ("model.n_embed=64", "did you mean model.n_embd?"),
    ("training.epochs=3", "training has no epochs setting: it runs training.max_iters optimizer steps"),
])
def test_names_from_other_trainers_point_at_the_right_field(override, hint):
    [problem] = problems({}, [override])
    assert problem.startswith(f"{override.split('=')[0]}: unknown key; ") and hint in problem


def test_config_errors_are_printed_once_under_torchrun(tmp_path, monkeypatch, capsys):
    import argparse
    from config import load_config
    arguments = argparse.Namespace(config=str(ROOT / "configs" / "tiny.yaml"), overrides=["training.lr=1"])
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_status:
            load_config(arguments)
        assert exit_status.value.code == 2
        assert ("config error: training.lr: unknown key" in capsys.readouterr().err) == printed
