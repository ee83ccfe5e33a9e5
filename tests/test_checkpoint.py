"""Checkpoint files: the format, its older layouts, safe loading."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from checkpoint import (PROJECT_VERSION, Checkpoint, CheckpointError, load_checkpoint, load_export,
                        model_from_checkpoint, peek_checkpoint, saved_step)
from config import Config
from conftest import tiny_config_dict
from model import BDH


def test_checkpoint_of_a_compiled_model_loads_into_a_plain_one(tmp_path):
    model = BDH(Config.from_dict(tiny_config_dict(tmp_path, tmp_path)).model)
    compiled_keys = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": compiled_keys, "model_config": {}, "step": 1}, tmp_path / "c.pt")
    fresh = BDH(model.config)
    fresh.load_state_dict(load_checkpoint(tmp_path / "c.pt").model)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_checkpoint_that_runs_code_on_load_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": {}, "model_config": {}, "step": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"not a readable checkpoint \(it holds Python objects, not only tensors "
                                              r"and plain data; loading it could run code\)$"):
        load_checkpoint(tmp_path / "evil.pt")


def test_checkpoint_file_round_trip_and_version_0_1_layout(tmp_path):
    ckpt = Checkpoint(step=7, model={"lm_head": torch.ones(2, 3)}, model_config={"n_layer": 1},
                      rng=[{"torch": torch.get_rng_state()}], data_order={"training.seed": 1},
                      data_positions=[{"reader": 0, "epoch": 2}], batches_consumed=9, best_val_loss=1.5)
    torch.save(ckpt.to_dict(), tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt")["versions"] == {"torch": str(torch.__version__), "project": PROJECT_VERSION}
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert (loaded.step, loaded.best_val_loss, loaded.batches_consumed) == (7, 1.5, 9)
    assert loaded.data_order == {"training.seed": 1} and loaded.data_positions == [{"reader": 0, "epoch": 2}]
    assert torch.equal(loaded.model["lm_head"], torch.ones(2, 3)) and len(loaded.rng) == 1
    old = {"step": 3, "model": {}, "model_config": {}, "rng": {"torch": torch.get_rng_state()}}  # one process
    torch.save(old, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert isinstance(loaded.rng, list) and torch.equal(loaded.rng[0]["torch"], old["rng"]["torch"])
    assert loaded.data_order is None and loaded.batches_consumed == 0 and loaded.data_positions == []


def test_a_checkpoint_is_mapped_not_read_into_memory(tmp_path):
    """Mapped, a resume no longer holds the whole file in memory beside the model and its optimizer
    (0.5 GiB above the step's peak at 75M parameters). (What the optimizer keeps is copied off the
    file's pages: test_resume.)"""
    weights = torch.arange(4096.0)
    torch.save(Checkpoint(step=1, model={"w": weights}, model_config={}).to_dict(), tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    raw = (tmp_path / "c.pt").read_bytes()
    start = raw.find(weights.numpy().tobytes())
    with open(tmp_path / "c.pt", "r+b") as f:  # copied over in place (cp keeps the file)
        f.seek(start)
        f.write(bytes(4 * 4096))
    assert torch.equal(loaded.model["w"], torch.zeros(4096))  # (read from the file as it is now)


@pytest.mark.parametrize("dataset,split_seed", [({}, 5), ({"val_parquet_dir": "v"}, 1337)])
def test_a_checkpoint_before_split_seed_records_the_split_it_had(dataset, split_seed):
    """Up to 0.4.5 training.seed drew the validation documents (with val_parquet_dir: none; the default)."""
    state = {"step": 1, "model": {}, "model_config": {}, "config": {"training": {"seed": 5}, "dataset": dataset}}
    assert Checkpoint.from_dict(state).config["dataset"]["split_seed"] == split_seed


def test_a_file_that_is_not_a_checkpoint_is_called_so(tmp_path):
    (tmp_path / "README.md").write_text("# a project\n")
    with pytest.raises(CheckpointError, match=r"README.md: not a checkpoint \(not a file written by torch.save\)$"):
        load_checkpoint(tmp_path / "README.md")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt: not a checkpoint \(the file is empty\)$"):
        load_checkpoint(tmp_path / "empty.pt")


def test_a_checkpoint_with_a_flipped_byte_is_refused_not_loaded(tmp_path):
    weights = torch.arange(4096, dtype=torch.float32)
    torch.save({"model": {"lm_head": weights}, "model_config": {}, "step": 1}, tmp_path / "c.pt")
    data = bytearray((tmp_path / "c.pt").read_bytes())
    at = data.index(weights[1000:1004].numpy().tobytes())  # inside the tensor's bytes: torch.load would not notice
    data[at] ^= 0xFF
    (tmp_path / "c.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"c.pt: not a readable checkpoint \(damaged: the bytes of "
                                              r"c/data/0 do not match their checksum, a disk or copy error\)"):
        load_checkpoint(tmp_path / "c.pt")
    # a resume's second read of the file it checked (load_saved_state) leaves the sums out
    assert load_checkpoint(tmp_path / "c.pt", check_sums=False).model["lm_head"][1000] != 1000


# ---- found by mutating checkpoint.py: torch's legacy format, files that hold no dict, paths that cannot be
# opened, a file cut short in one line, weights missing, an export's config.json edited

def test_a_checkpoint_in_torch_saves_legacy_format_loads(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "model_config": {}, "step": 2}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(tmp_path / "legacy.pt")
    assert loaded.step == 2 and torch.equal(loaded.model["w"], torch.ones(2))


@pytest.mark.parametrize("saved", [torch.zeros(3), 5, "model model_config step", [1]])
def test_a_file_holding_no_dict_is_not_a_checkpoint_and_has_no_step(tmp_path, saved):
    torch.save(saved, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x.pt: not a checkpoint of this project \(missing model, model_config, "
                                              r"step\)$"):
        load_checkpoint(tmp_path / "x.pt")
    assert peek_checkpoint(tmp_path / "x.pt") is None and saved_step(tmp_path / "x.pt") == float("inf")


def test_a_path_that_cannot_be_opened_is_called_so(tmp_path):
    with pytest.raises(CheckpointError, match=r": cannot be read \(Is a directory\)$"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"gone.pt: cannot be read \(No such file or directory\)$"):
        load_checkpoint(tmp_path / "gone.pt")


def test_a_checkpoint_cut_short_is_refused_in_one_short_line(tmp_path):
    torch.save(Checkpoint(step=1, model={"w": torch.arange(100000.0)}, model_config={}).to_dict(), tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[:len(data) // 2])  # a copy interrupted
    with pytest.raises(CheckpointError, match=r"c.pt: not a readable checkpoint \(cut short or corrupt: ") as info:
        load_checkpoint(tmp_path / "c.pt")
    why = str(info.value).split("cut short or corrupt: ", 1)[1]
    assert "\n" not in why and len(why) <= 121  # torch's words, shortened to 120 characters, and ")"


def test_a_checkpoint_missing_a_weight_does_not_make_a_model(tmp_path):
    model = BDH(Config.from_dict(tiny_config_dict(tmp_path, tmp_path)).model)
    weights = model.state_dict()
    weights.pop("lm_head")
    ckpt = Checkpoint(step=1, model=weights, model_config=vars(model.config))
    with pytest.raises(RuntimeError, match="lm_head"):
        model_from_checkpoint(ckpt)


def test_an_export_whose_config_json_says_true_for_a_number_is_refused(tmp_path):
    model = BDH(Config.from_dict(tiny_config_dict(tmp_path, tmp_path)).model)
    out = tmp_path / "export"
    out.mkdir()
    save_file(model.state_dict(), out / "model.safetensors")
    config = {**vars(model.config), "bdh_export": {"version": 2, "tokenizer": "bytes"}}
    (out / "config.json").write_text(json.dumps(config))
    assert load_export(out)[0].config == model.config
    (out / "config.json").write_text(json.dumps({**config, "n_layer": True}))
    with pytest.raises(CheckpointError, match=r"config.json's n_layer is True, not a whole number of at least 1"):
        load_export(out)
