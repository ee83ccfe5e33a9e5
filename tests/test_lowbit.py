"""lowbit.py: 4-bit weights, quantization-aware training and 4-bit serving (bitsandbytes on CPU)."""
import json
import re
import sys

import pytest
import torch

import sample
import train
from checkpoint import load_checkpoint
from conftest import write_config
from lowbit import (LowBitError, dequantize, export_4bit, quantization_aware_view, quantize, serve_4bit_option,
                    to_4bit)
from model import BDH, BDHConfig, unpack_4bit

SMALL = BDHConfig(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_blockwise_round_trip(quant_type, double_quant):
    x = torch.randn(10_000)
    q = quantize(x, quant_type, double_quant)
    assert q["codes"].dtype == torch.uint8 and q["codes"].numel() == 5_000  # two codes per byte
    assert q["absmax"].numel() == 157  # one scale per 64 values, the last block partial
    assert q["absmax"].dtype == (torch.uint8 if double_quant else torch.float32)  # double quant: scales in 8 bits
    assert f"quant_state.bitsandbytes__{quant_type}" in q
    y = dequantize(q)
    assert y.shape == x.shape  # flattened, as x is
    blocks = x[:9984].view(-1, 64)
    error = (y[:9984].view(-1, 64) - blocks).abs().amax(1) / blocks.abs().amax(1)
    assert error.max() < 0.21  # half the widest gap between levels, relative to the block maximum
    assert all(torch.is_tensor(v) for v in q.values())  # checkpointable with weights_only=True


def test_quantization_aware_forward_uses_4bit_weights_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    qat, plain = BDH(SMALL), BDH(SMALL)
    qat.weight_view = quantization_aware_view("nf4", True)
    with torch.no_grad():  # plain holds the 4-bit round trip of qat's weights as its own weights
        plain.load_state_dict(qat.state_dict())
        for name in ("encoder", "encoder_v", "decoder"):
            getattr(plain, name).copy_(dequantize(quantize(getattr(qat, name), "nf4", True)).view_as(getattr(plain, name)))
    assert not torch.equal(plain.encoder, qat.encoder)
    idx = torch.randint(0, 256, (2, 24))
    for model in (qat, plain):
        _, loss = model(idx, torch.roll(idx, -1, 1))
        loss.backward()
    for name in ("encoder", "encoder_v", "decoder", "lm_head"):
        torch.testing.assert_close(getattr(qat, name).grad, getattr(plain, name).grad)
    weight = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    assert qat.weight_view((weight,))[0].dtype == torch.bfloat16  # a bfloat16 model's layers get bfloat16


def test_the_export_s_4bit_weights_unpack_to_the_bitsandbytes_round_trip_in_the_dtype_asked():
    """model.unpack_4bit reads an export's 4-bit weights without bitsandbytes: high nibble first, the
    double quantization of the scales undone, a partial last block (7 x 37 = 259 values)."""
    weight = torch.randn(7, 37)
    for quant_type, double_quant in (("nf4", True), ("fp4", False)):
        packed = export_4bit(weight, quant_type, double_quant)
        expected = dequantize(quantize(weight, quant_type, double_quant)).view(7, 37)
        for dtype in (torch.float32, torch.bfloat16):
            got = unpack_4bit(packed["codes"], packed["absmax"], packed["quant_map"], (7, 37), 64, dtype)
            assert got.dtype == dtype and torch.equal(got, expected.to(dtype))


def metrics(checkpoint_dir, key):
    [run] = checkpoint_dir.iterdir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


def test_quantization_aware_training_starts_at_qat_start_fraction_and_evaluates_in_4bit(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=2, test_freq=2)
    runs = {"plain": [], "from step 4": ["low_precision.use_4bit=true", "low_precision.qat_start_fraction=0.5"],
            "from step 1": ["low_precision.use_4bit=true", "low_precision.qat_start_fraction=0"]}
    train_loss, val_loss = {}, {}
    for name, flags in runs.items():
        assert train.main(["--config", str(path), f"training.checkpoint_dir={tmp_path / name}", *flags]) == 0
        train_loss[name], val_loss[name] = metrics(tmp_path / name, "train_loss"), metrics(tmp_path / name, "val_loss")
    assert "from step 4; validation losses are the 4-bit model's" in capsys.readouterr().out
    # steps 1-3 in full precision, step 3 after an evaluation in 4 bits; from step 4 in 4 bits
    assert train_loss["from step 4"][:3] == train_loss["plain"][:3]
    assert train_loss["from step 4"][3] != train_loss["plain"][3]
    assert train_loss["from step 1"][0] != train_loss["plain"][0]
    # at step 2 both hold the same weights; use_4bit evaluates them after a 4-bit round trip
    assert val_loss["from step 4"][0] != val_loss["plain"][0]
    # resuming across the start of quantization-aware training is exact
    [run] = (tmp_path / "from step 4").iterdir()
    assert train.main(["--config", str(path), f"training.checkpoint_dir={tmp_path / 'from step 4'}", *runs["from step 4"],
                       f"training.resume_from_checkpoint={run / 'checkpoint_2.pt'}"]) == 0
    assert "step 4: quantization-aware training starts" in capsys.readouterr().out
    assert metrics(tmp_path / "from step 4", "train_loss") == train_loss["from step 4"]


def test_at_least_the_last_step_trains_in_4bit(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2, checkpoint_freq=2, test_freq=100)
    assert train.main(["--config", str(path), "low_precision.use_4bit=true"]) == 0  # round(0.9 x 2) = 2
    assert "step 2: quantization-aware training starts" in capsys.readouterr().out
    assert train.main(["--config", str(path), "low_precision.use_4bit=true", "low_precision.qat_start_fraction=0"]) == 0
    out = capsys.readouterr().out  # from the first step: nothing starts during the run
    assert "step 2/2" in out and "quantization-aware training starts" not in out


def test_a_run_without_bitsandbytes_is_refused_before_it_trains(tmp_path, corpus, capsys, monkeypatch):
    """Its first use is the first 4-bit evaluation: after test_freq steps, perhaps before any checkpoint."""
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # (what Python's import says of a missing one)
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=4, test_freq=2)
    assert train.main(["--config", str(path), "low_precision.use_4bit=true"]) == 1
    out, err = capsys.readouterr()
    assert err == ("error: low_precision: the 4-bit modes need bitsandbytes (import of bitsandbytes.functional halted; "
                   "None in sys.modules); pip install -r requirements.txt\n")
    assert "step 1" not in out and not (tmp_path / "ck").exists()
    assert train.main(["--config", str(path), "low_precision.use_4bit_optimizer=true"]) == 0  # (adamw4bit.py's)


def test_switching_use_4bit_on_resume_starts_best_checkpoint_afresh(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2, checkpoint_freq=2, test_freq=2)
    assert train.main(["--config", str(path)]) == 0
    [saved] = (tmp_path / "ck").glob("run_*/checkpoint_2.pt")
    state = torch.load(saved, weights_only=True)
    torch.save({**state, "best_val_loss": 0.0}, saved)  # a best no loss can beat: only a fresh start writes best.pt
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=3",
                       "low_precision.use_4bit=true", "low_precision.qat_start_fraction=0", "training.test_freq=3"]) == 0
    out = capsys.readouterr().out
    assert "best.pt starts afresh" in out
    [run] = (tmp_path / "ck").iterdir()
    assert load_checkpoint(run / "best.pt").step == 3  # the first 4-bit validation loss is the best so far
    assert "the run's best.pt so far (validation loss 0.0000) is now best_until_step_2.pt" in out
    assert load_checkpoint(run / "best_until_step_2.pt").step == 2  # the float model's best is kept


def test_quantization_aware_training_run_and_4bit_sampling(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2, checkpoint_freq=2, test_freq=100)
    assert train.main(["--config", str(path), "low_precision.use_4bit=true", "low_precision.qat_start_fraction=0"]) == 0
    assert "4-bit quantization-aware training (nf4)" in capsys.readouterr().out
    [ckpt] = (tmp_path / "ck").glob("run_*/checkpoint_2.pt")
    assert set(load_checkpoint(ckpt).model) == {"embed.weight", "encoder", "encoder_v", "decoder", "lm_head"}
    argv = ["--checkpoint", str(ckpt), "--prompt", "<00-", "--max-new-tokens", "20", "--temperature", "0"]
    assert sample.main(argv + ["--4bit"]) == 0
    four_bit = capsys.readouterr()
    assert "4-bit weights (nf4, double quant): model" in four_bit.err
    # the served 4-bit model is the one quantization-aware training evaluated
    ck = load_checkpoint(ckpt)
    model = BDH(BDHConfig(**ck.model_config))
    model.load_state_dict(ck.model)
    model.weight_view = quantization_aware_view("nf4", True)
    prompt = torch.tensor([list(b"<00-")])
    expected = model.eval().generate(prompt, 20, temperature=0)
    assert four_bit.out.strip() == bytes(expected[0].tolist()).decode("utf-8", "replace").strip()


def test_serving_notes_say_which_weights_are_used():
    """--4bit: post-training quantization is noted for a run known to have trained without use_4bit; without
    --4bit, a use_4bit run is told its 4-bit weights are not the ones used unless the export holds them already."""
    settings = {"quantization_type": "fp4", "use_double_quant": False}
    [note] = serve_4bit_option(BDH(SMALL), {**settings, "use_4bit": None}, "ck", True)  # not known
    assert note.startswith("4-bit weights (fp4): model ")
    assert "post-training" in serve_4bit_option(BDH(SMALL), {**settings, "use_4bit": False}, "ck", True)[0]
    assert "add --4bit" in serve_4bit_option(BDH(SMALL), {**settings, "use_4bit": True}, "ck", False)[0]
    assert serve_4bit_option(BDH(SMALL), {**settings, "use_4bit": True, "exported_in_4bit": True}, "ck", False) == []
    with pytest.raises(LowBitError, match="drop --4bit"):
        serve_4bit_option(BDH(SMALL), {**settings, "exported_in_4bit": True}, "ck", True)


def test_the_4bit_size_note_counts_the_packed_weights():
    model = BDH(SMALL)
    before = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    [note] = serve_4bit_option(model, {"quantization_type": "nf4", "use_double_quant": True}, "ck", True)
    after, float32, ratio = map(float, re.search(r"model ([\d.]+) MiB, float32 ([\d.]+) MiB \(1/([\d.]+)\)",
                                                 note).groups())
    assert "(nf4, double quant)" in note and model.encoder.numel() == 0
    assert float32 == round(before, 2) and 1 < ratio < 8 and after < float32


def test_4bit_weights_take_about_a_seventh_of_float32_at_the_default_size():
    model = BDH(BDHConfig())
    before, after = to_4bit(model, "nf4", True)
    assert 6.5 < before / after < 8
    assert model.encoder.numel() == 0  # the float32 copies are gone
