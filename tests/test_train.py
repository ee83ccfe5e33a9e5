import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

import train
from checkpoint import RunDir, load_checkpoint, resolve_resume
from config import Config
from conftest import ROOT, tiny_config_dict, write_config


def run_dirs(tmp_path):
    root = tmp_path / "ck"
    return sorted(p for p in root.iterdir()) if root.exists() else []


def test_run_directory_holds_resolved_config_checkpoints_and_metrics(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus)
    assert train.main(["--config", str(path), "training.batch_size=3"]) == 0
    out = capsys.readouterr().out
    assert "step 4/4" in out and "val loss" in out and "--- sample ---" in out
    [run] = run_dirs(tmp_path)
    assert run.name.startswith("run_")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved == Config.from_yaml(path, ["training.batch_size=3"]).to_dict()
    assert saved["training"]["batch_size"] == 3
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_2.pt", "checkpoint_4.pt"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]  # incl. before the dir existed
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert {"lr", "tokens_per_s", "ms_per_step", "elapsed_s"} <= set(records[0])


def test_no_run_directory_before_the_first_checkpoint(tmp_path, corpus, monkeypatch, capsys):
    path = write_config(tmp_path, corpus, checkpoint_freq=100, test_freq=100, max_iters=50)
    real = train.learning_rate

    def interrupt_at_step_3(step, t):
        if step == 3:
            raise KeyboardInterrupt
        return real(step, t)

    monkeypatch.setattr(train, "learning_rate", interrupt_at_step_3)
    assert train.main(["--config", str(path)]) == 130
    captured = capsys.readouterr()
    assert "step 2/50" in captured.out and "Traceback" not in captured.err
    assert run_dirs(tmp_path) == []


def test_resume_continues_at_the_next_step_in_the_same_directory(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    original = (run / "config.yaml").read_text()
    capsys.readouterr()
    ckpt2 = run / "checkpoint_2.pt"
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={ckpt2}",
                       "training.max_iters=6"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {ckpt2} at step 3" in out
    assert "step 3/6" in out and "step 1/6" not in out and "step 2/6" not in out
    assert "config changed: training.max_iters: 4 -> 6" in out
    assert run_dirs(tmp_path) == [run]
    assert (run / "config.yaml").read_text() == original
    assert yaml.safe_load((run / "config_resume_2.yaml").read_text())["training"]["max_iters"] == 6
    assert load_checkpoint(run / "checkpoint_6.pt")["step"] == 6
    # a run directory and `latest` resolve to the newest checkpoint
    assert resolve_resume(str(run), str(tmp_path / "ck")) == run / "checkpoint_6.pt"
    assert resolve_resume("latest", str(tmp_path / "ck")) == run / "checkpoint_6.pt"


def test_resume_restores_model_optimizer_and_step(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    ckpt = load_checkpoint(run / "checkpoint_2.pt")
    assert set(ckpt["model"]) == {"embed.weight", "encoder", "encoder_v", "decoder", "lm_head"}
    assert ckpt["optimizer"]["state"] and ckpt["versions"]["torch"] == torch.__version__
    assert ckpt["config"]["training"]["max_iters"] == 2
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest",
                       "training.max_iters=2"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_resume_refuses_a_different_model_shape(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path)]) == 0
    capsys.readouterr()
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest",
                       "model.n_embd=64", "model.n_layer=3"]) == 1
    err = capsys.readouterr().err
    assert "different model shape" in err and "n_embd: checkpoint 32, config 64" in err
    assert "n_layer: checkpoint 2, config 3" in err and len(err.strip().splitlines()) == 1


def test_checkpoint_of_a_compiled_model_loads_into_a_plain_one(tmp_path):
    model = train.BDH(Config.from_dict(tiny_config_dict(tmp_path, tmp_path)).to_bdh_config())
    compiled_keys = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": compiled_keys, "model_config": {}, "step": 1}, tmp_path / "c.pt")
    fresh = train.BDH(model.config)
    fresh.load_state_dict(load_checkpoint(tmp_path / "c.pt")["model"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_checkpoint_that_runs_code_on_load_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": {}, "model_config": {}, "step": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(train.CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_two_runs_started_in_the_same_second_get_different_directories(tmp_path):
    a, b = RunDir(str(tmp_path)), RunDir(str(tmp_path))
    b.name = a.name
    pa = a.save(1, {"x": 1}, "model: {}\n").parent
    pb = b.save(1, {"x": 1}, "model: {}\n").parent
    assert pa != pb and pa.exists() and pb.exists()


def test_missing_data_is_one_line_error(tmp_path, capsys):
    path = write_config(tmp_path, tmp_path / "no-such-dir")
    assert train.main(["--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_refused(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, device="cuda")
    assert train.main(["--config", str(path)]) == 1
    assert "training.device: cuda requested but not available" in capsys.readouterr().err


def test_data_loader_workers_train(tmp_path, corpus):
    path = write_config(tmp_path, corpus, max_iters=3, checkpoint_freq=3)
    assert train.main(["--config", str(path), "dataloader.num_workers=2"]) == 0


def test_sigterm_finishes_the_step_and_saves_a_resumable_checkpoint(tmp_path, corpus):
    path = write_config(tmp_path, corpus, max_iters=100000, checkpoint_freq=100000, test_freq=100000)
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    [run] = run_dirs(tmp_path)
    [ckpt] = run.glob("checkpoint_*.pt")
    step = load_checkpoint(ckpt)["step"]
    assert step >= 3 and f"stopped by SIGTERM after step {step}" in out
    assert f"training.resume_from_checkpoint={ckpt}" in out


def test_checkpoints_move_between_compiled_and_plain_runs(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2, test_freq=100)
    assert train.main(["--config", str(path)]) == 0
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest",
                       "training.max_iters=3", "training.compile=true"]) == 0
    assert "compile True" in capsys.readouterr().out
    [run] = run_dirs(tmp_path)
    assert set(load_checkpoint(run / "checkpoint_3.pt")["model"]) == {
        "embed.weight", "encoder", "encoder_v", "decoder", "lm_head"}
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest",
                       "training.max_iters=4"]) == 0
    assert load_checkpoint(run / "checkpoint_4.pt")["step"] == 4


def test_non_finite_loss_stops_without_saving_a_nan_model(tmp_path, corpus, monkeypatch, capsys):
    path = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2)
    real = train.learning_rate
    monkeypatch.setattr(train, "learning_rate", lambda step, t: float("nan") if step == 3 else real(step, t))
    assert train.main(["--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "not finite at step 4" in err and "checkpoint_2.pt" in err
    [run] = run_dirs(tmp_path)
    assert [p.name for p in run.glob("checkpoint_*.pt")] == ["checkpoint_2.pt"]


def test_activation_checkpointing_reaches_the_model(tmp_path, corpus, monkeypatch):
    seen = []
    real_apply = train.BDH.forward

    def spy(self, idx, targets=None):
        seen.append(self.activation_checkpointing)
        return real_apply(self, idx, targets)

    monkeypatch.setattr(train.BDH, "forward", spy)
    path = write_config(tmp_path, corpus, max_iters=1, test_freq=100)
    assert train.main(["--config", str(path), "training.activation_checkpointing=true"]) == 0
    assert seen and all(seen)


def test_checkpoint_of_version_0_1_still_resumes(tmp_path, corpus):
    """Version 0.1 keyed the optimizer state by position and kept one RNG state."""
    path = write_config(tmp_path, corpus, max_iters=2, test_freq=100)
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    old = torch.load(run / "checkpoint_2.pt", weights_only=True)
    order = [name for group in old["optimizer"]["param_groups"] for name in group["params"]]
    old["optimizer"] = {"state": {order.index(n): s for n, s in old["optimizer"]["state"].items()},
                        "param_groups": [{**g, "params": [order.index(n) for n in g["params"]]}
                                         for g in old["optimizer"]["param_groups"]]}
    old["rng"] = old["rng"][0]
    torch.save(old, run / "checkpoint_2.pt")
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest",
                       "training.max_iters=3"]) == 0
    assert load_checkpoint(run / "checkpoint_3.pt")["step"] == 3


def test_evaluation_builds_no_autograd_graph():
    from distributed import Ranks
    from model import BDH, BDHConfig
    model = BDH(BDHConfig(n_layer=1, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4))
    grad_modes = []
    model.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    batches = [(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))]
    loss, _ = train.evaluate(model, batches, torch.device("cpu"), train.nullcontext(), torch.Generator(), Ranks())
    assert grad_modes == [False] and loss > 0 and model.training
