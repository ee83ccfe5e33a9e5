"""bench_precision.py: what it measures is what it says (the training runs themselves are train.py's)."""
import json
from pathlib import Path

import pytest
import torch

import bench_precision
from adamw4bit import adamw_state_bytes
from config import Config
from conftest import write_config
from model import BDH

QAT = ("low_precision.use_4bit=true",)


def test_each_seed_is_evaluated_on_its_own_validation_split(tmp_path, corpus, monkeypatch):
    """--seeds 1,2: the losses computed here from checkpoints (post-training 4-bit, QAT unquantized)
    use the seed's split, as train.py's own evaluation in that run does, not the config's seed's."""
    path = write_config(tmp_path, corpus)
    evaluated_with = []
    monkeypatch.setattr(bench_precision, "train_variant", lambda *args: {"run": None, "val_loss": 1.0})
    monkeypatch.setattr(bench_precision, "final_checkpoint_loss",
                        lambda cfg, run, four_bit: evaluated_with.append((cfg.training.seed, cfg.dataset.split_seed))
                        or 1.0)
    assert bench_precision.main(["--config", str(path), "--seeds", "1,2", "--json", str(tmp_path / "out.json")]) == 0
    assert evaluated_with == [(1, 1)] * 3 + [(2, 2)] * 3  # per seed: post-training 4-bit and the two QAT runs
    results = json.loads((tmp_path / "out.json").read_text())
    assert list(results["seeds"]) == ["1", "2"] and results["complete"] is True
    assert list(results["optimizer_state_bytes"]) == ["AdamW", "AdamW4bit"]  # (torchao's: not in the 4bit set)


def test_variant_trains_only_the_variants_named_beside_the_first(tmp_path, corpus, monkeypatch, capsys):
    path = write_config(tmp_path, corpus)
    trained = []

    def train_variant(config, overrides, variant, *args):
        trained.append(variant)
        return {"run": None, "val_loss": 1.0}
    monkeypatch.setattr(bench_precision, "train_variant", train_variant)
    monkeypatch.setattr(bench_precision, "final_checkpoint_loss", lambda *args, **kwargs: 1.0)
    assert bench_precision.main(["--config", str(path), "--variant", "4-bit QAT"]) == 0
    assert trained == [[], ["low_precision.use_4bit=true"]]  # AdamW, the baseline, and the one named
    with pytest.raises(SystemExit):
        bench_precision.main(["--config", str(path), "--variant", "QAT"])
    assert ("--variant 'QAT' is not in --set 4bit: its variants are 'AdamW', 'AdamW4bit', '4-bit QAT', "
            "'4-bit QAT from step 1'") in capsys.readouterr().err


def summary(tmp_path, corpus, monkeypatch, capsys, results, argv=(), **training):
    """main's printed lines, each variant's train_variant result given by results[seed, variant overrides]."""
    path = write_config(tmp_path, corpus, **training)
    seeds = []

    def train_variant(config, overrides, variant, *args):
        seed = int(next(o for o in overrides if o.startswith("training.seed=")).partition("=")[2])
        seeds.append(seed)
        return {"run": None, **results[seed, tuple(variant if not isinstance(variant, tuple) else variant[0])]}
    monkeypatch.setattr(bench_precision, "train_variant", train_variant)
    monkeypatch.setattr(bench_precision, "final_checkpoint_loss",
                        lambda cfg, run, four_bit: 9.0 if four_bit else 2.5 + cfg.training.seed)
    assert bench_precision.main(["--config", str(path), *argv]) == 0
    return capsys.readouterr().out.splitlines(), seeds


def line_of(lines, name):
    """What the summary line of `name` says, from its "val loss" on."""
    line = next(line for line in lines if line.lstrip().startswith(name + " "))
    return line[line.index("val loss"):]


def test_summary_speed_ratio_leaves_out_a_baseline_without_a_full_log_interval(tmp_path, corpus, monkeypatch, capsys):
    """A run too short for a full log interval has no ms_per_step (None): the summary still prints, its
    speed and ratio from the seeds where both runs have one."""
    results = {(1, ()): {"val_loss": 1.0, "ms_per_step": None}, (1, QAT): {"val_loss": 1.0, "ms_per_step": 20.0},
               (2, ()): {"val_loss": 1.0, "ms_per_step": 10.0}, (2, QAT): {"val_loss": 1.0, "ms_per_step": 30.0}}
    lines, _ = summary(tmp_path, corpus, monkeypatch, capsys, results, ["--seeds", "1,2", "--variant", "4-bit QAT"])
    assert "| 30.0 ms/step (3.00x)" in line_of(lines, "4-bit QAT")
    assert "| 10.0 ms/step (1.00x)" in line_of(lines, "AdamW")


@pytest.mark.parametrize("seeds,message", [("1,x", "'1,x': give whole numbers separated by commas, e.g. 1,2,3"),
                                           ("1,1", "'1,1': each seed once, each >= 0"),  # one folder per seed
                                           ("-1", "'-1': each seed once, each >= 0")])
def test_seeds_are_distinct_whole_numbers(seeds, message, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_precision.main(["--seeds", seeds])
    assert stop.value.code == 2 and f"error: argument --seeds: {message}\n" in capsys.readouterr().err


def test_summary_gives_mean_loss_its_change_and_the_worst_seed(tmp_path, corpus, monkeypatch, capsys):
    results = {(1, ()): {"val_loss": 2.0, "ms_per_step": 10.0}, (1, QAT): {"val_loss": 2.2, "ms_per_step": 20.0},
               (2, ()): {"val_loss": 4.0, "ms_per_step": 30.0}, (2, QAT): {"val_loss": 4.0, "ms_per_step": 40.0}}
    lines, _ = summary(tmp_path, corpus, monkeypatch, capsys, results, ["--seeds", "1,2", "--variant", "4-bit QAT"])
    # QAT: losses 2.2 and 4.0 (mean 3.1), changes +10% and 0% (mean +5%, worst +10%); 20 and 40 ms (mean 30),
    # against 10 and 30: 60 / 40 = 1.5x; its weights unquantized (2.5 + seed): 3.5 and 4.5, mean 4.0
    assert line_of(lines, "4-bit QAT") == \
        "val loss 3.1000 (+5.00%, worst +10.00%) | 30.0 ms/step (1.50x) | its weights unquantized: 4.0000"
    assert line_of(lines, "AdamW") == "val loss 3.0000 (+0.00%, worst +0.00%) | 20.0 ms/step (1.00x)"
    # post-training quantization: no speed of its own
    assert line_of(lines, "AdamW, then 4-bit weights (post-training)") == "val loss 9.0000 (+237.50%, worst +350.00%)"


def test_one_seed_gives_no_worst_and_defaults_to_the_configs_seed(tmp_path, corpus, monkeypatch, capsys):
    results = {(7, ()): {"val_loss": 2.0}, (7, QAT): {"val_loss": 2.5}}
    lines, seeds = summary(tmp_path, corpus, monkeypatch, capsys, results, ["--variant", "4-bit QAT"], seed=7)
    assert seeds == [7, 7]
    assert line_of(lines, "4-bit QAT") == "val loss 2.5000 (+25.00%) | its weights unquantized: 9.5000"
    assert "seeds 7 (change" in next(line for line in lines if line.startswith("after "))


def test_seed_0_is_a_seed(tmp_path, corpus, monkeypatch, capsys):
    results = {(s, v): {"val_loss": 2.0} for s in (0, 1) for v in ((), QAT)}
    _, seeds = summary(tmp_path, corpus, monkeypatch, capsys, results, ["--seeds", "0,1", "--variant", "4-bit QAT"])
    assert seeds == [0, 0, 1, 1]


def test_post_training_quantization_is_measured_in_the_4bit_set_only(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setattr(bench_precision, "optimizer_step_ms", lambda cfg: {"AdamW": 1.0, "AdamW4bit": 2.0})
    results = {(1, ()): {"val_loss": 2.0}, (1, tuple(bench_precision.FOUR_BIT_OPTIMIZER)): {"val_loss": 2.1}}
    lines, _ = summary(tmp_path, corpus, monkeypatch, capsys, results,
                       ["--set", "optimizer", "--seeds", "1", "--variant", "AdamW4bit"])
    assert not any("post-training" in line for line in lines)
    assert any(line.startswith("optimizer state: AdamW ") for line in lines)  # this set too reports it
    assert "optimizer step alone: AdamW 1.0 ms, AdamW4bit 2.0 ms" in lines


def test_optimizer_state_line_gives_mib_and_the_ratio_to_adamw(tmp_path, corpus):
    cfg = Config.from_yaml(str(write_config(tmp_path, corpus)), [])
    state, line = bench_precision.state_bytes_line(cfg, torchao=False)
    adamw = adamw_state_bytes(BDH(cfg.to_bdh_config()).parameters())
    assert state["AdamW"] == adamw and 0 < state["AdamW4bit"] < adamw
    assert line == (f"optimizer state: AdamW {adamw / 2**20:.2f} MiB (1.000x), "
                    f"AdamW4bit {state['AdamW4bit'] / 2**20:.2f} MiB ({state['AdamW4bit'] / adamw:.3f}x)")


def test_train_variant_takes_the_last_val_loss_and_the_median_of_full_intervals_after_the_first(tmp_path,
                                                                                                 monkeypatch):
    records = [{"step": 1, "ms_per_step": 900.0, "tokens_per_s": 1.0},  # train.py's first steps: not an interval
               {"step": 5, "ms_per_step": 500.0, "tokens_per_s": 5.0},  # the first interval: warm-up
               {"step": 10, "ms_per_step": 10.0, "tokens_per_s": 100.0}, {"step": 10, "val_loss": 3.0},
               {"step": 15, "ms_per_step": 20.0, "tokens_per_s": 300.0},
               {"step": 20, "ms_per_step": 40.0, "tokens_per_s": 200.0}, {"step": 20, "val_loss": 2.0}]
    calls = []
    monkeypatch.setattr(bench_precision, "train_in",
                        lambda workdir, args, python, note="": calls.append((args, python, note)) or ("run", records))
    result = bench_precision.train_variant("c.yaml", ["a.b=1"], ["c.d=2"], tmp_path, 5)
    assert result["val_loss"] == 2.0 and result["run"] == "run"
    assert result["ms_per_step"] == 20.0 and result["tokens_per_s"] == 200.0
    assert calls[0][0] == ["--config", "c.yaml", "a.b=1", "c.d=2", "training.keep_last_n=1"]
    assert calls[0][1] == [str(bench_precision.REPO / "train.py")] and calls[0][2] == ""


def test_fp8_is_refused_without_a_cuda_gpu(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_precision, "train_variant", lambda *args: pytest.fail("trained"))
    with pytest.raises(SystemExit) as stop:
        bench_precision.main(["--config", str(write_config(tmp_path, corpus)), "--set", "fp8"])
    assert stop.value.code == 2
    assert "error: --set fp8 trains with FP8 GEMMs, which need a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("four_bit", [True, False])
def test_final_checkpoint_loss_quantizes_the_weights_only_when_asked(tmp_path, corpus, monkeypatch, four_bit):
    cfg = Config.from_yaml(str(write_config(tmp_path, corpus)), [])
    quantized = []
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(bench_precision, "checkpoints_in", lambda run: [Path("a.pt"), Path("b.pt")])
    monkeypatch.setattr(bench_precision, "load_checkpoint", lambda path: path)
    monkeypatch.setattr(bench_precision, "model_from_checkpoint", lambda path: model if path.name == "b.pt" else None)
    monkeypatch.setattr(bench_precision, "to_4bit", lambda m, kind, double: quantized.append(m))
    monkeypatch.setattr(bench_precision, "validation_batches", lambda cfg, units, tokenizer: "batches")
    monkeypatch.setattr(bench_precision, "validation_loss",
                        lambda m, batches, *_: (1.5 if m is model and batches == "batches" else 0,))
    assert bench_precision.final_checkpoint_loss(cfg, "run", four_bit) == 1.5
    assert quantized == ([model] if four_bit else [])
