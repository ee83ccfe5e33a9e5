import math
import re
import subprocess
import sys

import pytest
import yaml

import train
from conftest import ROOT, config_problems
from config import NON_NEGATIVE, Config, TrainingConfig, learning_rate
from model import BDHConfig


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
    # the guide's compute_dtype default is bfloat16; auto here: the same on a GPU with bf16, float32 on the
    # CPUs (and GPUs) that would emulate bf16 many times slower
    assert (lp.quantization_type, lp.use_double_quant, lp.compute_dtype) == ("nf4", True, "auto")
    assert c.dataset.text_column == "text"


def test_the_model_section_is_what_the_model_is_built_from():
    c = Config.from_dict({}, ["model.n_layer=2", "model.n_embd=64"])
    assert c.model == BDHConfig(n_layer=2, n_embd=64) == c.to_bdh_config()  # (the guide's name for it)
    assert c.to_bdh_config() is not c.model


def test_shipped_config_yaml_holds_the_defaults_and_documents_every_field():
    assert Config.from_yaml(ROOT / "config.yaml") == Config()
    lines = (ROOT / "config.yaml").read_text().splitlines()
    fields = [l for l in lines if re.match(r"^\s+\w+:", l)]
    assert len(fields) == sum(len(v) for v in Config().to_dict().values())
    undocumented = [l for l in fields if "#" not in l]
    assert not undocumented


def test_shipped_configs_load():
    paths = [ROOT / "config.yaml", *(ROOT / "configs").glob("*.yaml")]
    assert len(paths) > 1
    for path in paths:
        Config.from_yaml(path)


def test_unknown_section():
    [p] = config_problems({"trainng": {}})
    assert p.startswith("trainng: unknown section; did you mean training?")


def test_a_dotted_key_in_a_file_says_how_to_write_it():
    assert config_problems({"training.batch_size": 4}) == [
        "training.batch_size: a dotted key belongs on the command line; in a YAML file write `batch_size:` indented "
        "under `training:`"]


def test_numbers_that_cannot_train_are_refused():
    assert config_problems({"training": {"learning_rate": float("nan"), "grad_clip": float("-inf")}}) == [
        "training.learning_rate: must be a finite number, got nan", "training.grad_clip: must be a finite number, got -inf"]
    assert config_problems({"training": {"seed": 2**32}}) == [
        "training.seed: must be below 2**32 = 4294967296 (NumPy's seeds), got 4294967296"]
    assert config_problems({"training": {"learning_rate": -1}}) == ["training.learning_rate: must be > 0, got -1.0"]  # alone


def test_a_home_directory_in_paths_is_expanded(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    c = Config.from_dict({"training": {"checkpoint_dir": "~/ck", "resume_from_checkpoint": "latest"},
                          "dataset": {"parquet_dir": "~/data", "tokenizer": "~/tok.json"}})
    assert (c.training.checkpoint_dir, c.dataset.parquet_dir, c.dataset.tokenizer) == (
        "/home/someone/ck", "/home/someone/data", "/home/someone/tok.json")
    assert c.training.resume_from_checkpoint == "latest" and c.dataset.val_parquet_dir is None


def test_environment_variables_in_paths_are_expanded_or_named_when_unset(monkeypatch):
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    c = Config.from_dict({"training": {"checkpoint_dir": "$SCRATCH/ck"}, "dataset": {"parquet_dir": "${SCRATCH}/d"}})
    assert (c.training.checkpoint_dir, c.dataset.parquet_dir) == ("/scratch/me/ck", "/scratch/me/d")
    assert config_problems({"training": {"checkpoint_dir": "$NOT_SET_ANYWHERE/ck"}}) == [
        "training.checkpoint_dir: '$NOT_SET_ANYWHERE/ck': the environment variable NOT_SET_ANYWHERE is not set; set "
        "it, or write the path out"]
    assert config_problems({"training": {"checkpoint_dir": "${SCRATCH:-/tmp}/ck"}}) == [  # the shell's, not Python's
        "training.checkpoint_dir: '${SCRATCH:-/tmp}/ck': only $NAME and ${NAME} are expanded, not ${SCRATCH:-/tmp}; "
        "write the path out"]
    assert Config.from_dict({"training": {"checkpoint_dir": "/price$5"}}).training.checkpoint_dir == "/price$5"
    monkeypatch.setenv("WITH_DOLLAR", "/x/$y")  # a value holding $: not expanded again, not named
    assert Config.from_dict({"training": {"checkpoint_dir": "$WITH_DOLLAR/c"}}).training.checkpoint_dir == "/x/$y/c"


@pytest.mark.parametrize("raw,fragment", [
    ({"model": {"n_layer": 0}}, "model.n_layer: must be > 0"),
    ({"training": {"batch_size": -1}}, "training.batch_size: must be > 0"),
    ({"model": {"dropout": 1.0}}, "model.dropout: must be in [0, 1)"),
    ({"model": {"n_head": 3}}, "must be divisible by n_head = 3; the nearest that fit: 1, 2, 4, 8"),
    # a mistyped n_embd: its divisors found up to the square root (counting to 1.28e11 took hours)
    ({"model": {"n_embd": 10**9, "n_head": 3}}, "= 128000000000 must be divisible by n_head = 3; the nearest that "
                                                 "fit: 1, 2, 4, 5"),
    ({"model": {"n_embd": 120, "n_head": 7, "mlp_internal_dim_multiplier": 1}}, "the nearest that fit: 4, 5, 6, 10"),
    ({"model": {"n_embd": 144, "n_head": 11, "mlp_internal_dim_multiplier": 1}}, "the nearest that fit: 6, 8, 9, 12"),
    ({"model": {"n_embd": 64, "n_head": 20, "mlp_internal_dim_multiplier": 1}}, "the nearest that fit: 4, 8, 16, 32"),
    ({"training": {"min_lr": 0.1}}, "training.min_lr: must be <= training.learning_rate"),
    ({"training": {"learning_rate": 3e4, "min_lr": 3e3}}, "AdamW trains at about 1e-4 to 1e-2; did you mean 3e-4?"),
    ({"training": {"device": "tpu"}}, "training.device: must be one of auto, cpu, cuda, mps"),
    ({"training": {"device": "cuda:1"}}, "got 'cuda:1' (for GPU 1: training.device=cuda and CUDA_VISIBLE_DEVICES=1 "),
    ({"training": {"compile": "yes please"}}, "training.compile: must be true, false or auto"),
    ({"training": {"compile": "true"}}, "got 'true' (true in quotes is text: write it without them)"),
    ({"training": {"distributed_timeout_s": 10**14}}, "training.distributed_timeout_s: must be at most 1000000000"),
    ({"low_precision": {"compute_dtype": "fp8"}}, "low_precision.compute_dtype: must be one of"),
    ({"low_precision": {"compute_dtype": "bf16"}}, "got 'bf16'; did you mean bfloat16?"),  # other tools' spellings
    ({"training": {"distributed": "DDP"}}, "got 'DDP'; did you mean ddp?"),
    ({"low_precision": {"quantization_type": "int4"}}, "low_precision.quantization_type: must be one of"),
    ({"fp8": {"format": "e5m2"}}, "fp8.format: must be one of hybrid, e4m3"),
    ({"fp8": {"amax_compute_algo": "mean"}}, "fp8.amax_compute_algo: must be one of"),
    ({"model": {"vocab_size": 100}}, "model.vocab_size: tokens are bytes"),
    ({"dataset": {"val_fraction": 0.0}}, "dataset.val_fraction: must be in (0, 1)"),
    ({"low_precision": {"qat_start_fraction": 1.0}}, "low_precision.qat_start_fraction: must be in [0, 1)"),
    ({"training": {"distributed": "deepspeed"}}, "training.distributed: must be one of ddp, fsdp"),
    ({"training": {"distributed_timeout_s": 0}}, "training.distributed_timeout_s: must be > 0"),
    ({"model": {"dropout": -0.1}}, "model.dropout: must be in [0, 1), got -0.1"),
    ({"model": {"n_embd": 30, "n_head": 4, "mlp_internal_dim_multiplier": 2}},  # a latent of 15: RoPE needs pairs
     "model.mlp_internal_dim_multiplier: the latent size n_embd * mlp_internal_dim_multiplier / n_head must be even"),
    ({"model": {"vocab_size": 255}}, "model.vocab_size: tokens are bytes 0..255, so it must be >= 256, got 255"),
    ({"dataset": {"val_fraction": 1.0}}, "dataset.val_fraction: must be in (0, 1), got 1.0"),
    ({"training": {"seed": 2**32}}, "training.seed: must be below 2**32"),
    ({"dataset": {"split_seed": 2**32}}, "dataset.split_seed: must be below 2**32"),
    ({"training": {"weight_decay": 1000}}, "training.weight_decay: 1000 x learning_rate 0.001 = 1: each step would "
                                           "multiply the weights by 1 - 1, zeroing or flipping them"),
    ({"training": {"block_size": 1}}, "training.block_size: must be at least 2"),
    ({"training": {"compile": "False"}}, "got 'False' (false in quotes is text: write it without them)"),
    ({"training": {"device": "GPU"}}, "got 'GPU'; did you mean cuda?"),
    ({"low_precision": {"compute_dtype": "float"}}, "got 'float'; did you mean float32?"),
])
def test_value_checks(raw, fragment):
    assert any(fragment in p for p in config_problems(raw)), config_problems(raw)


def test_every_setting_that_cannot_be_negative_is_refused_below_0_and_taken_at_0():
    for path in NON_NEGATIVE:
        section, key = path.split(".")
        [problem] = config_problems({section: {key: -1}})
        assert re.fullmatch(rf"{re.escape(path)}: must be >= 0, got -1(\.0)?", problem)
        assert Config.from_dict({section: {key: 0}}).get(path) == 0  # (min_lr 0: a schedule that decays to nothing)
    assert Config.from_dict({"training": {"min_lr": 1e-3, "learning_rate": 1e-3}})  # a constant rate
    assert Config.from_dict({"training": {"seed": 2**32 - 1, "distributed_timeout_s": 10**9}})


def test_a_learning_rate_above_1_is_refused_with_a_guess_only_where_a_minus_sign_went_missing():
    assert config_problems({"training": {"learning_rate": 2.5}}) == [
        "training.learning_rate: 2.5 would move every weight by about that much each step (AdamW): AdamW trains at "
        "about 1e-4 to 1e-2"]  # 2.5e-0 would be no guess
    assert config_problems({"training": {"learning_rate": 1000.0}})[0].endswith("; did you mean 1e-3?")  # 1_000


def test_a_value_spelt_nothing_like_a_choice_gets_no_guess():
    [problem] = config_problems({"low_precision": {"compute_dtype": "fp8"}})
    assert problem.endswith("got 'fp8'")


@pytest.mark.parametrize("raw,fragment", [
    ({"model": {"n_embd": 72, "n_head": 1}}, "model.n_embd = 72 must be a multiple of 16"),
    ({"training": {"batch_size": 3, "block_size": 10}}, "training.batch_size * training.block_size = 30"),
    ({"low_precision": {"use_4bit": True}}, "cannot be combined with use_4bit"),
    ({"fp8": {"amax_history_len": 32}}, "fp8.amax_history_len: configures TransformerEngine"),
    ({"fp8": {"amax_compute_algo": "most_recent"}}, "fp8.amax_compute_algo: configures TransformerEngine"),
    ({"model": {"n_embd": 16, "mlp_internal_dim_multiplier": 1, "n_head": 2}},
     "the latent size N = 8 must be a multiple"),
    ({"fp8": {"torchao_recipe": "rowwise"}}, "fp8.format: torchao's rowwise recipe uses E4M3"),
])
def test_fp8_combinations_that_cannot_work_are_refused(raw, fragment):
    raw = {**raw, "low_precision": {"use_fp8": True, **raw.get("low_precision", {})}}
    assert any(fragment in p for p in config_problems(raw)), config_problems(raw)


def test_fp8_settings_that_work_are_accepted():
    lp = {"use_fp8": True, "use_4bit_optimizer": True}
    cfg = Config.from_dict({"low_precision": lp, "fp8": {"torchao_recipe": "rowwise", "format": "e4m3"}})  # no error
    assert (cfg.low_precision.use_fp8, cfg.fp8.torchao_recipe, cfg.fp8.format) == (True, "rowwise", "e4m3")


def test_every_problem_is_reported_at_once():
    ps = config_problems({"training": {"learnig_rate": 1, "batch_size": "8"}, "model": {"n_layer": -2},
                   "bogus": {}})
    assert [p.split(":")[0] for p in ps] == ["bogus", "training.learnig_rate", "training.batch_size", "model.n_layer"]


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


def test_cli_print_config_shows_overrides_with_each_setting_s_comment(capsys, tmp_path):
    assert train.main(["--print-config", "training.batch_size=16"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["training"]["batch_size"] == 16
    [shipped] = [line for line in (ROOT / "config.yaml").read_text().splitlines() if line.startswith("  batch_size:")]
    assert f"  batch_size: 16{' ' * 20}#{shipped.split('#', 1)[1]}" in printed.splitlines()  # the value given
    settings = [line for line in printed.splitlines() if line.startswith("  ")]
    assert len(settings) == sum(len(section) for section in Config().to_dict().values())
    assert all("  # " in line for line in settings)  # every setting has its comment
    (tmp_path / "printed.yaml").write_text(printed)
    assert Config.from_yaml(tmp_path / "printed.yaml") == Config.from_dict({"training": {"batch_size": 16}})
    folder = "/data/corpus #2/a long folder name with spaces in it/and more words/so that YAML wraps it/*.parquet"
    overrides = [f"dataset.parquet_dir={folder}", "logging.wandb_run_name='a\n\n  b'"]  # (YAML: two lines each)
    assert train.main(["--print-config", *overrides]) == 0
    printed = capsys.readouterr().out  # (a comment on a value's first line would be in the value)
    (tmp_path / "wrapped.yaml").write_text(printed)
    assert Config.from_yaml(tmp_path / "wrapped.yaml") == Config.from_dict({}, overrides) != Config()
    assert "# parquet files kept open" in next(line for line in printed.splitlines()  # the others keep theirs
                                               if line.startswith("  max_cached_files: 8"))


def test_a_setting_that_nothing_reads_is_noted():
    c = Config.from_dict({"dataset": {"val_parquet_dir": "v", "val_fraction": 0.5}, "fp8": {"torchao_recipe": "rowwise"},
                          "logging": {"wandb_project": "p"}, "dataloader": {"num_workers": 0, "prefetch_factor": 8},
                          "training": {"debug": True, "compile": True}, "low_precision": {"qat_start_fraction": 0.5,
                                                                                       "quantization_type": "fp4"}})
    assert c.unused_settings() == [
        "dataset.val_fraction 0.5 is not used in training: the validation documents are all of "
        "dataset.val_parquet_dir's",
        "low_precision.qat_start_fraction 0.5 is not used in training: low_precision.use_4bit is off",
        "low_precision.quantization_type 'fp4' is not used in training: low_precision.use_4bit is off (export.py "
        "--4bit and sample.py --4bit read it from the checkpoint after training)",
        "fp8.torchao_recipe 'rowwise' is not used in training: low_precision.use_fp8 is off",
        "logging.wandb_project 'p' is not used in training: logging.wandb is off",
        "dataloader.prefetch_factor 8 is not used in training: dataloader.num_workers is 0: the main process reads "
        "the batches",
        "training.compile true is not used in training: training.debug runs the model uncompiled"]
    used = Config.from_dict({"dataset": {"val_fraction": 0.5}, "low_precision": {"use_4bit": True, "qat_start_fraction": 0.5},
                             "logging": {"wandb": True, "wandb_project": "p"}, "training": {"compile": True}})
    assert used.unused_settings() == []
    for path in [ROOT / "config.yaml", *(ROOT / "configs").glob("*.yaml")]:  # the files users copy
        assert Config.from_yaml(path).unused_settings() == [], path


def test_an_integer_past_2_to_the_53_is_refused_in_one_line_and_each_mistake_said_once():
    """1e30 is read as an integer: a step count that large would fail deep inside the run (its loss
    divided by it, an islice past sys.maxsize)."""
    assert config_problems({}, ["training.gradient_accumulation_steps=1e30", "training.eval_iters=1e19",
                                "model.vocab_size=0"]) == [
        "training.gradient_accumulation_steps: must be at most 2**53 = 9,007,199,254,740,992 (an exponent too many?), "
        "got 1e+30",
        "training.eval_iters: must be at most 2**53 = 9,007,199,254,740,992 (an exponent too many?), got 1e+19",
        "model.vocab_size: must be > 0, got 0"]  # (not also: bytes need 256)


# ---- found by mutating config.py: every bound written out, values at the edge, one line a setting

@pytest.mark.parametrize("path,bad,bound", [
    *[(p, 0, ">") for p in (
        "model.n_layer", "model.n_embd", "model.n_head", "model.mlp_internal_dim_multiplier", "model.vocab_size",
        "training.block_size", "training.batch_size", "training.max_iters", "training.learning_rate",
        "training.log_freq", "training.test_freq", "training.checkpoint_freq", "training.gradient_accumulation_steps",
        "training.eval_iters", "dataloader.prefetch_factor", "dataset.max_cached_files", "fp8.amax_history_len",
        "training.distributed_timeout_s")],
    *[(p, -1, ">=") for p in (
        "training.keep_last_n", "training.weight_decay", "training.warmup_iters", "training.min_lr",
        "training.grad_clip", "training.seed", "dataset.split_seed", "dataloader.num_workers")],
])
def test_each_count_and_rate_is_refused_past_its_bound(path, bad, bound):
    """Written out, not read from POSITIVE / NON_NEGATIVE: a setting dropped from them would go unchecked."""
    section, key = path.split(".")
    assert any(re.fullmatch(rf"{re.escape(path)}: must be {bound} 0, got {bad}(\.0)?", p)
               for p in config_problems({section: {key: bad}})), config_problems({section: {key: bad}})


def test_values_at_the_edge_of_their_range_are_taken():
    c = Config.from_dict({"training": {"max_iters": 2**53, "learning_rate": 1.0, "min_lr": 0.0},
                          "low_precision": {"qat_start_fraction": 0.0},  # 0: quantization-aware from the first step
                          "model": {"vocab_size": 100}, "dataset": {"tokenizer": "tok.json"}})  # (BPE: any vocab)
    assert (c.training.max_iters, c.training.learning_rate, c.low_precision.qat_start_fraction, c.model.vocab_size) == (
        2**53, 1.0, 0.0, 100)
    assert config_problems({"low_precision": {"qat_start_fraction": -0.1}}) == [
        "low_precision.qat_start_fraction: must be in [0, 1) (0: quantization-aware training from the first step), "
        "got -0.1"]


@pytest.mark.parametrize("raw,expected", [
    ({"training": {"seed": 2**60}}, "training.seed: must be below 2**32 = 4294967296 (NumPy's seeds), got "
                                    f"{2**60}"),
    ({"dataset": {"split_seed": 2**60}}, "dataset.split_seed: must be below 2**32 = 4294967296 (NumPy's seeds), got "
                                         f"{2**60}"),
    ({"training": {"distributed_timeout_s": 10**16}}, "training.distributed_timeout_s: must be at most 1000000000 "
                                                      "(31 years: as good as no limit), got 10000000000000000"),
    ({"training": {"min_lr": "x", "learning_rate": 1e-5}},  # the default min_lr then exceeds it: not said again
     "training.min_lr: expected float, got str 'x'; write a plain number (3000, 0.05 or 3e-4: no commas, units or %)"),
])
def test_a_setting_with_a_bound_of_its_own_is_refused_in_one_line(raw, expected):
    assert config_problems(raw) == [expected]


def test_a_learning_rate_in_the_tens_gets_no_guess():
    [problem] = config_problems({"training": {"learning_rate": 25.0}})
    assert problem.endswith("AdamW trains at about 1e-4 to 1e-2")


def test_fp8_with_no_heads_is_refused_in_one_line_not_a_traceback():
    assert config_problems({"model": {"n_head": 0}, "low_precision": {"use_fp8": True}}) == [
        "model.n_head: must be > 0, got 0"]


@pytest.mark.parametrize("character", ["\x00", "\t"])
def test_a_control_character_in_a_path_is_refused(character):
    [problem] = config_problems({"training": {"checkpoint_dir": f"D:{character}x"}})
    assert problem.startswith(f"training.checkpoint_dir: {'D:' + character + 'x'!r} holds the control character "
                              f"{character!r}")


def test_the_learning_rate_decays_by_cosine_over_the_steps_after_warmup():
    t = TrainingConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=10, max_iters=110)
    assert learning_rate(5, t) == 0.5 and learning_rate(10, t) == 1.0
    assert math.isclose(learning_rate(60, t), 0.5)  # halfway from warmup to max_iters
    assert learning_rate(110, t) == learning_rate(500, t) == 0.0


def test_compile_false_in_debug_is_not_noted():
    assert Config.from_dict({"training": {"debug": True, "compile": False}}).unused_settings() == []
