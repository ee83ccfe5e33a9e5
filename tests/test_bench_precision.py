"""bench_precision.py: what it measures is what it says (the training runs themselves are train.py's)."""
import bench_precision
from conftest import write_config


def test_each_seed_is_evaluated_on_its_own_validation_split(tmp_path, corpus, monkeypatch):
    """--seeds 1,2: the losses computed here from checkpoints (post-training 4-bit, QAT unquantized)
    use the seed's split, as train.py's own evaluation in that run does, not the config's seed's."""
    path = write_config(tmp_path, corpus)
    evaluated_with = []
    monkeypatch.setattr(bench_precision, "train_variant", lambda *args: {"run": None, "val_loss": 1.0})
    monkeypatch.setattr(bench_precision, "final_checkpoint_loss",
                        lambda cfg, run, four_bit: evaluated_with.append(cfg.training.seed) or 1.0)
    assert bench_precision.main(["--config", str(path), "--seeds", "1,2"]) == 0
    assert evaluated_with == [1, 1, 1, 2, 2, 2]  # per seed: post-training 4-bit and the two QAT runs
