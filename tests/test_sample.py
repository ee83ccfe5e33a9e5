import pytest
import yaml

import sample
import train
from conftest import tiny_config_dict


@pytest.fixture
def checkpoint(tmp_path, corpus):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, corpus, max_iters=2)))
    assert train.main(["--config", str(path)]) == 0
    [ckpt] = (tmp_path / "ck").glob("run_*/checkpoint_2.pt")
    return ckpt


def test_sample_prints_generated_text(checkpoint, capsys):
    capsys.readouterr()
    args = ["--checkpoint", str(checkpoint), "--prompt", "<00-", "--max-new-tokens", "40", "--seed", "5"]
    assert sample.main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("<00-") and len(first.encode()) >= 20
    assert sample.main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text


def test_sample_without_prompt_and_from_run_directory(checkpoint, capsys):
    capsys.readouterr()
    greedy = ["--checkpoint", str(checkpoint.parent), "--max-new-tokens", "10", "--temperature", "0",
              "--device", "cpu"]
    assert sample.main(greedy) == 0
    first = capsys.readouterr().out
    assert sample.main(greedy + ["--seed", "99"]) == 0
    assert capsys.readouterr().out == first  # greedy ignores the seed
    assert sample.main(["--checkpoint", str(checkpoint.parent), "--max-new-tokens", "10", "--top-k", "5"]) == 0


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert sample.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 1
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "does not exist" in err
