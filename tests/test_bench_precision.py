"""bench_precision.py: what it measures is what it says (the training runs themselves are train.py's)."""
import json

import pytest

import bench_precision
from conftest import write_config


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


def test_summary_speed_ratio_leaves_out_a_baseline_without_a_full_log_interval(tmp_path, corpus, monkeypatch, capsys):
    """A run too short for a full log interval has no ms_per_step (None): the summary still prints, its
    speed and ratio from the seeds where both runs have one."""
    path = write_config(tmp_path, corpus)
    speeds = {(1, ()): None, (1, ("low_precision.use_4bit=true",)): 20.0,
              (2, ()): 10.0, (2, ("low_precision.use_4bit=true",)): 30.0}

    def train_variant(config, overrides, variant, *args):
        seed = int(next(o for o in overrides if o.startswith("training.seed=")).partition("=")[2])
        return {"run": None, "val_loss": 1.0, "ms_per_step": speeds[seed, tuple(variant)]}
    monkeypatch.setattr(bench_precision, "train_variant", train_variant)
    monkeypatch.setattr(bench_precision, "final_checkpoint_loss", lambda *args, **kwargs: 1.0)
    assert bench_precision.main(["--config", str(path), "--seeds", "1,2", "--variant", "4-bit QAT"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| 30.0 ms/step (3.00x)" in next(line for line in lines if line.lstrip().startswith("4-bit QAT "))
    assert "| 10.0 ms/step (1.00x)" in next(line for line in lines if line.lstrip().startswith("AdamW "))


@pytest.mark.parametrize("seeds,message", [("1,x", "'1,x': give whole numbers separated by commas, e.g. 1,2,3"),
                                           ("1,1", "'1,1': each seed once, each >= 0"),  # one folder per seed
                                           ("-1", "'-1': each seed once, each >= 0")])
def test_seeds_are_distinct_whole_numbers(seeds, message, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_precision.main(["--seeds", seeds])
    assert stop.value.code == 2 and f"error: argument --seeds: {message}\n" in capsys.readouterr().err
