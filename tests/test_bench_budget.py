"""bench_budget.py: a variant trains on the first 90% of a text and its checkpoints are measured on the
rest (no timing is asserted; the figures are in BENCHMARKS.md)."""
import json

import pytest

import bench_budget
from conftest import ROOT, write_config


def test_a_variant_gives_a_held_out_curve_from_any_directory(tmp_path, corpus, monkeypatch, capsys):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(100)))
    config = write_config(tmp_path, corpus, max_iters=4)
    out = tmp_path / "results.json"
    monkeypatch.chdir(tmp_path)  # train.py is found beside bench_budget.py, not in the working directory
    assert bench_budget.main(["--config", str(config), "--text", str(text), "--seconds", "0",
                              "--variant", "plain", "--json", str(out)]) == 0
    [(name, result)] = json.loads(out.read_text())["variants"].items()
    assert name == "plain" and result["max_iters"] == 4
    assert [len(point) for point in result["curve"]] == [2] * 4  # (seconds, held-out loss) at every step
    assert result["heldout_loss"] == result["curve"][-1][1] < 5.55  # ln 256: it learned something


def test_a_variant_name_given_twice_is_refused(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus)
    with pytest.raises(SystemExit):
        bench_budget.main(["--config", str(config), "--text", str(ROOT / "README.md"), "--variant", "a",
                           "--variant", "a", "model.n_layer=2"])
    assert "error: --variant a is given twice: give each variant its own name" in capsys.readouterr().err
