"""bench_budget.py: a variant trains on the first 90% of a text and its checkpoints are measured on the
rest (no timing is asserted; the figures are in BENCHMARKS.md)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench_budget
from conftest import ROOT, write_config


def test_a_variant_gives_a_held_out_curve_from_any_directory(tmp_path, corpus, monkeypatch, capsys):
    """...and its results are written before the next variant, which here fails."""
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(100)))
    config = write_config(tmp_path, corpus, max_iters=4, warmup_iters=8)
    out = tmp_path / "results.json"
    monkeypatch.chdir(tmp_path)  # train.py is found beside bench_budget.py, not in the working directory
    assert bench_budget.main(["--config", str(config), "--text", str(text), "--seconds", "0", "--variant", "plain",
                              "--variant", "failing", "training.resume_from_checkpoint=nothing.pt",
                              "--json", str(out)]) == 1
    said = capsys.readouterr().out
    assert "\n  step 4/4 | loss " in said  # train.py's progress, passed on, and its notes
    assert "\n  note: training.warmup_iters 8 >= max_iters 4: the learning rate rises only to " in said
    assert json.loads(out.read_text())["complete"] is False
    [(name, result)] = json.loads(out.read_text())["variants"].items()
    assert name == "plain" and result["max_iters"] == 4
    assert [len(point) for point in result["curve"]] == [2] * 4  # (seconds, held-out loss) at every step
    assert result["heldout_loss"] == result["curve"][-1][1] < 5.55  # ln 256: it learned something


def test_a_variant_name_given_twice_and_a_missing_text_are_refused(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus)
    with pytest.raises(SystemExit):
        bench_budget.main(["--config", str(config), "--text", str(ROOT / "README.md"), "--variant", "a",
                           "--variant", "a", "model.n_layer=2"])
    assert "error: --variant a is given twice: give each variant its own name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_budget.main(["--config", str(config), "--text", str(ROOT / "READM.md")])
    assert f"error: --text {ROOT / 'READM.md'}: does not exist; did you mean {ROOT / 'README.md'}?\n" in \
        capsys.readouterr().err


def running(text: str) -> dict[int, str]:
    """pid -> session id of the processes whose command line holds `text` (Linux)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found[int(entry.name)] = os.getsid(int(entry.name))
        except OSError:  # a process that ended meanwhile
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads the processes' command lines in /proc")
def test_a_benchmark_stopped_by_sigterm_removes_its_folder_of_runs_and_stops_its_training(tmp_path, corpus):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(100)))
    config = write_config(tmp_path, corpus, max_iters=100000, log_freq=1)
    folder = tmp_path / "tmp"  # where the benchmark's runs are: their train.py's command lines name it
    folder.mkdir()
    command = [sys.executable, str(ROOT / "bench_budget.py"), "--config", str(config), "--text", str(text),
               "--seconds", "0"]
    env = {**os.environ, "TMPDIR": str(folder), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert any(line.startswith("  step 1/") for line in bench.stdout)  # train.py is training
        [(pid, session)] = running(str(folder)).items()
        assert session == pid != bench.pid  # a session of its own: the benchmark kills it with its loader workers
        bench.send_signal(signal.SIGTERM)  # the benchmark alone, as a scheduler may: it stops train.py itself
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 3  # (a process killed may take a moment to go)
        while running(str(folder)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running(str(folder)) == {}
        assert bench.stderr.read().endswith("\nSIGTERM: stopped\n")
    finally:
        bench.kill()
        bench.stdout.close()
        bench.stderr.close()
    assert list(folder.iterdir()) == []
