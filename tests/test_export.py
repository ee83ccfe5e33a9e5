"""export.py: safetensors, a Hugging Face Transformers folder that generates what sample.py does, 4-bit
weights, and what sample.py and train.py do with an exported folder."""
import json
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import export
import sample
import train
from checkpoint import (EXPORT_VERSION, Checkpoint, CheckpointError, is_export, load_checkpoint, load_export,
                        model_from_checkpoint)
from config import Config
from conftest import write_config
from locate import load_model
from model import BDH, BDHConfig
from lowbit import dequantize, export_4bit, quantize
from tokenizer import ByteTokenizer, TokenizerError, load_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture
def trained(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=4)
    assert train.main(["--config", str(path), "logging.tensorboard=false"]) == 0
    [run] = (tmp_path / "ck").iterdir()
    return run / "checkpoint_4.pt"


def tiny_checkpoint(**config) -> Checkpoint:
    raw = Config.from_dict({"model": {"n_layer": 1, "n_embd": 32, "n_head": 2}, **config}).to_dict()
    return Checkpoint(step=1, model={}, model_config=raw["model"], config=raw)


def hf_model(folder, full_length=True):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
    if full_length:  # as sample.py does, not stop at a separator
        model.generation_config.eos_token_id = None
    return model.eval(), AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)


def sample_text(capsys, *args):
    capsys.readouterr()
    assert sample.main(["--max-new-tokens", "100", *args, "--temperature", "0", "--device", "cpu"]) == 0
    return capsys.readouterr().out.rstrip("\n")


def test_export_holds_the_checkpoint_weights_and_transformers_generates_what_sample_does(trained, tmp_path, capsys):
    out = tmp_path / "export"
    assert export.main(["--checkpoint", str(trained.parent), "--out", str(out), "--hf"]) == 0
    assert capsys.readouterr().out == f"exported step 4 of {trained} to {out} (a Hugging Face folder too)\n"
    ckpt = load_checkpoint(trained)
    with safe_open(out / "model.safetensors", "pt") as f:  # older Transformers refuse a file that does not say so
        assert f.metadata() == {"format": "pt"}
    # bytes: the separator is the ordinary byte 0x00, no special token; generation pads with it
    assert not {"bos_token", "eos_token"} & json.loads((out / "tokenizer_config.json").read_text()).keys()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["pad_token_id"] == generation["eos_token_id"] == 0
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == ckpt.model.keys()
    assert all(torch.equal(weights[k], ckpt.model[k]) for k in weights)
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ckpt.model_config} == ckpt.model_config and config["bdh_export"]["step"] == 4
    assert load_model(str(out), None, "--checkpoint")[5] == ckpt.config["training"]["block_size"]  # (sample.py's note)
    card = (out / "README.md").read_text()
    assert "step 4 of 4" in card and "bits per byte" in card and "trust_remote_code=True" in card
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")  # (--hf: the Hub's)
    assert f"- context: trained on windows of {ckpt.config['training']['block_size']} tokens;" in card
    with pytest.raises(TokenizerError, match="byte tokens, as export.py writes them .*; to train on bytes, set "
                                             "dataset.tokenizer=bytes$"):  # what a user tries next, to fine-tune
        load_tokenizer(str(out / "tokenizer.json"))
    model, tokenizer = hf_model(out)
    # the same function as model.py: the logits of a whole sequence (the modeling file cannot drift)
    idx = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        expected = model_from_checkpoint(ckpt).eval()(idx)[0]
        assert torch.allclose(model(idx).logits, expected, atol=1e-5)
    # greedy generation of 100 tokens, token for token that of sample.py at temperature 0
    inputs = tokenizer("<00-", return_tensors="pt")
    assert inputs["input_ids"].tolist() == [list(b"<00-")]
    ids = model.generate(**inputs, max_new_tokens=100, do_sample=False)
    reference = model_from_checkpoint(ckpt).eval().generate(inputs["input_ids"], 100, temperature=0)
    assert torch.equal(ids, reference)
    assert tokenizer.decode(ids[0]) == sample_text(capsys, "--checkpoint", str(trained), "--prompt", "<00-")
    torch.manual_seed(0)
    assert model.generate(**inputs, max_new_tokens=20, do_sample=True, top_k=20).shape == (1, 24)
    # by default it samples, as sample.py does (temperature 0.8, no top-k): greedy decoding loops on a small model
    assert (model.generation_config.do_sample, model.generation_config.top_k) == (True, 0)
    assert model.generation_config.temperature == 0.8
    samples = {tuple(model.generate(**inputs, max_new_tokens=40)[0].tolist()) for _ in range(3)}
    assert len(samples) == 3 and tuple(ids[0, :44].tolist()) not in samples


def test_transformers_fine_tunes_with_train_py_s_gradients_and_a_forward_with_gradients_keeps_its_cache(
        trained, tmp_path, monkeypatch):
    out = tmp_path / "export"
    assert export.main(["--checkpoint", str(trained), "--out", str(out), "--hf"]) == 0
    model, _ = hf_model(out)
    reference = model_from_checkpoint(load_checkpoint(trained)).eval()
    idx = torch.randint(0, 256, (2, 40))
    model(idx, labels=idx).loss.backward()  # (Trainer's call: the labels are the inputs)
    logits = reference(idx)[0]
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), idx[:, 1:].reshape(-1)).backward()
    grads = dict(model.named_parameters())
    for name, weight in reference.named_parameters():
        assert torch.allclose(grads[name].grad, weight.grad, atol=1e-6), name
    cache = model(idx[:, :30]).cache  # a forward with gradients (no labels) may go on generating
    assert cache.seen == 30
    with torch.no_grad():
        assert torch.allclose(model(idx[:, 30:], cache=cache).logits, model(idx).logits[:, 30:], atol=1e-5)
    with pytest.raises(RuntimeError, match="does not require grad"):  # the recurrent form has no backward
        model(idx[:, 30:], cache=model(idx[:, :30]).cache, labels=idx[:, 30:]).loss.backward()
    from transformers import AutoModelForCausalLM
    in_bf16 = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.bfloat16)
    out = in_bf16(idx, labels=idx)  # as Transformers users load a model: float32's gradients, rounded
    assert (out.logits.dtype, out.loss.dtype) == (torch.bfloat16, torch.float32)
    out.loss.backward()
    for name, weight in in_bf16.named_parameters():
        assert torch.cosine_similarity(weight.grad.float().flatten(), grads[name].grad.flatten(), dim=0) > 0.99, name
    modeling, autocast_seen, recurrent = sys.modules[type(model).__module__], [], []  # (float32: the caller's autocast)
    real_recurrent = modeling.recurrent_forward
    monkeypatch.setattr(modeling, "recurrent_forward", lambda *args: recurrent.append(1) or real_recurrent(*args))
    real = modeling.parallel_forward
    monkeypatch.setattr(modeling, "parallel_forward", lambda *args: autocast_seen.append(
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None) or real(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (Trainer's bf16=True)
        model(idx, labels=idx)
    assert autocast_seen == [torch.bfloat16]
    model(idx, use_cache=False)
    model.train()
    model(idx)
    model.eval()
    assert recurrent == []  # no cache filled (a second pass) where none may be used: with labels, in training
    monkeypatch.setattr(modeling, "parallel_forward", lambda *args: recomputed.append(args[4]) or real(*args))
    recomputed = []
    model.zero_grad()
    # Trainer's gradient_checkpointing=True (the method's name before Transformers 5.x's rename): model.py's recompute
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model(idx, labels=idx).loss.backward()
    assert recomputed == [True]
    for name, weight in reference.named_parameters():
        assert torch.allclose(grads[name].grad, weight.grad, atol=1e-6), name


@pytest.fixture(scope="module")
def padded_export(tmp_path_factory):
    """A tiny untrained model exported with --hf, its vocabulary padded to 320 rows past the 256 bytes, loaded
    by Transformers."""
    ckpt = tiny_checkpoint(model={"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 320})
    torch.manual_seed(0)
    model = BDH(BDHConfig(**ckpt.model_config))
    torch.nn.init.normal_(model.lm_head)  # (logits that differ from position to position)
    ckpt.model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("padded") / "export"
    export.write_export(folder, ckpt, folder.parent / "checkpoint_1.pt", str(folder), hf=True, four_bit=False)
    return hf_model(folder)[0]


def test_the_transformers_configuration_defaults_as_model_py_and_keeps_what_it_is_given(padded_export):
    config_class = type(padded_export.config)
    default = config_class()
    assert default.vocab_size == BDHConfig().vocab_size == default.tokenizer_vocab_size  # (none given: all of it)
    assert default.separator_token_id == default.bos_token_id == default.eos_token_id == 0  # (bytes: 0x00)
    given = config_class(n_layer=3, n_embd=48, vocab_size=400, tokenizer_vocab_size=390, separator_token_id=7,
                         weights_4bit={"quant_type": "nf4", "blocksize": 64}, low_precision={"use_4bit": True})
    assert (given.n_layer, given.n_embd, given.vocab_size, given.tokenizer_vocab_size) == (3, 48, 400, 390)
    assert given.separator_token_id == given.bos_token_id == given.eos_token_id == 7  # a BPE's separator
    assert (given.weights_4bit, given.low_precision) == ({"quant_type": "nf4", "blocksize": 64}, {"use_4bit": True})
    assert (padded_export.config.tokenizer_vocab_size, padded_export.config.vocab_size) == (256, 320)
    # the Trainer divides the loss by its accumulation steps (forward's loss is a mean, it takes no num_items_in_batch)
    assert type(padded_export).accepts_loss_kwargs is False


def test_a_transformers_forward_never_draws_padded_ids_refuses_padding_and_drops_out_only_in_training(padded_export):
    model, idx = padded_export, torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        logits = model(idx).logits
        assert logits.shape == (2, 12, 320)
        assert torch.isneginf(logits[..., 256:]).all() and torch.isfinite(logits[..., :256]).all()
        assert torch.equal(model(idx, attention_mask=torch.ones_like(idx)).logits, logits)  # a full mask: no padding
        mask = torch.ones_like(idx)
        mask[1, :3] = 0  # the second prompt padded on the left
        with pytest.raises(ValueError, match="BDH has no padding mask: give prompts of equal length"):
            model(idx, attention_mask=mask)
    try:
        model.train()
        assert model.config.dropout > 0 and not torch.equal(model(idx).logits, model(idx).logits)
    finally:
        model.eval()
    assert torch.equal(model(idx).logits, logits)


def test_a_transformers_cache_goes_on_under_either_name_and_use_cache_false_returns_none(padded_export):
    model, idx = padded_export, torch.randint(1, 256, (2, 20))
    with torch.no_grad():
        full = model(idx).logits
        for name in ("past_key_values", "cache"):  # (Transformers 5.x renamed it; generate passes the output's name)
            first = model(idx[:, :12], use_cache=True)
            cache = getattr(first, "cache", None) or first.past_key_values
            assert cache.get_seq_length() == 12
            assert torch.allclose(model(idx[:, 12:], **{name: cache}).logits, full[:, 12:], atol=1e-5), name
            assert cache.get_seq_length() == 20
        out = model(idx, use_cache=False)
    assert getattr(out, "cache", None) is None and getattr(out, "past_key_values", None) is None
    prompt = idx[:1, :6]
    cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert cached.shape == (1, 14) and torch.equal(cached, model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, use_cache=False))


def test_transformers_stops_at_the_separator_and_starts_there_without_a_prompt(trained, tmp_path):
    out = tmp_path / "export"
    assert export.main(["--checkpoint", str(trained), "--out", str(out), "--hf"]) == 0
    model, tokenizer = hf_model(out, full_length=False)
    separator = model.config.separator_token_id
    forward_calls = []

    def separator_third(module, args, output):  # the third new token is the separator
        forward_calls.append(1)
        if len(forward_calls) == 3:
            output.logits[..., :] = -1e9
            output.logits[..., separator] = 1e9
        return output
    hook = model.register_forward_hook(separator_third)
    ids = model.generate(**tokenizer("<00-", return_tensors="pt"), max_new_tokens=20, do_sample=False)
    hook.remove()
    assert ids.shape == (1, 4 + 3) and ids[0, -1] == separator
    ids = model.generate(max_new_tokens=5, do_sample=False)
    assert ids[0, 0] == separator and 1 < ids.shape[1] <= 6  # (earlier if it draws the separator)


def test_a_bpe_model_exports_its_tokenizer(tmp_path, corpus, bpe_file, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_config(tmp_path, corpus, max_iters=2, model={"vocab_size": 384}, dataset={"tokenizer": str(bpe_file)})
    assert train.main(["--config", str(path), "logging.tensorboard=false"]) == 0
    out = tmp_path / "export"
    assert export.main(["--checkpoint-dir", str(tmp_path / "ck"), "--out", str(out), "--hf"]) == 0  # latest
    model, tokenizer = hf_model(out)
    inputs = tokenizer("<00-0", return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    assert ids.max() < 320  # padded ids (vocab_size 384) are never produced
    assert tokenizer.decode(ids[0]) == sample_text(capsys, "--checkpoint", str(out), "--prompt", "<00-0",
                                                   "--max-new-tokens", "30")
    literal = "a <|endoftext|> b"  # text, as in training and sample.py: not the separator
    assert tokenizer(literal)["input_ids"] == load_tokenizer(str(bpe_file)).encode(literal)


def test_4bit_export_is_the_model_sample_4bit_serves(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_config(tmp_path, corpus, max_iters=2, model={"n_embd": 64, "mlp_internal_dim_multiplier": 8})
    assert train.main(["--config", str(path), "logging.tensorboard=false", "low_precision.use_4bit=true"]) == 0
    [run] = (tmp_path / "ck").iterdir()
    out = tmp_path / "export4"
    capsys.readouterr()
    assert export.main(["--checkpoint", str(run), "--out", str(out), "--hf", "--4bit"]) == 0
    assert "post-training quantization" not in capsys.readouterr().err  # it was trained for 4 bits
    assert "at step 2 (of the model with encoder, encoder_v, decoder in 4 bits" in (out / "README.md").read_text()
    tensors = load_file(out / "model.safetensors")
    assert tensors["encoder_4bit"].dtype == torch.uint8 and "encoder" not in tensors
    ckpt = load_checkpoint(run / "checkpoint_2.pt")
    unpacked, _, _ = load_export(out)
    for name in ("encoder", "encoder_v", "decoder"):  # exactly the 4-bit round trip the run evaluated
        expected = dequantize(quantize(ckpt.model[name], "nf4", True)).view_as(ckpt.model[name])
        assert torch.equal(getattr(unpacked, name), expected)
    float_size = sum(t.numel() * 4 for t in ckpt.model.values())
    assert (out / "model.safetensors").stat().st_size < 0.5 * float_size
    old = tmp_path / "export4_version1"  # version 1 named the codes W_nf4: such an export still loads
    old.mkdir()
    save_file({(k[:-len("_4bit")] + "_nf4" if k.endswith("_4bit") else k): v for k, v in tensors.items()},
              old / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["bdh_export"]["version"] = 1
    (old / "config.json").write_text(json.dumps(config))
    assert torch.equal(load_export(old)[0].encoder, unpacked.encoder)
    config["bdh_export"]["version"] = EXPORT_VERSION + 1
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"exported by a newer version of this project \(export version "
                                              rf"{EXPORT_VERSION + 1}, this one reads up to {EXPORT_VERSION}\)"):
        load_export(old)
    model, tokenizer = hf_model(out)
    ids = model.generate(**tokenizer("<01-", return_tensors="pt"), max_new_tokens=100, do_sample=False)
    capsys.readouterr()
    assert sample.main(["--max-new-tokens", "100", "--checkpoint", str(run), "--prompt", "<01-", "--4bit",
                        "--temperature", "0", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert tokenizer.decode(ids[0]) == out.rstrip("\n")
    assert "4-bit weights (nf4" in err and "post-training" not in err  # it was trained for 4 bits
    # without --4bit: the full-precision weights, which its evaluations did not measure
    full_precision = "was trained with low_precision.use_4bit for 4-bit serving, and its evaluations measured its " \
                     "4-bit weights: add --4bit for those; without it, the full-precision weights"
    assert sample.main(["--max-new-tokens", "2", "--checkpoint", str(run), "--device", "cpu"]) == 0
    assert full_precision in capsys.readouterr().err
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "export_float")]) == 0
    assert full_precision in capsys.readouterr().err
    # loaded in bfloat16, as many load a model: the unpacked weights follow the embedding's dtype
    from transformers import AutoModelForCausalLM
    in_bf16 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export4"), trust_remote_code=True,
                                                   dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits, logits_bf16 = model(ids).logits, in_bf16(ids).logits
    assert logits_bf16.dtype == torch.bfloat16
    assert (logits_bf16.float() - logits).abs().max() < 0.05 * logits.abs().max()


def test_an_export_fine_tunes_with_a_fresh_optimizer(trained, tmp_path, corpus, capsys):
    out = tmp_path / "export"
    assert export.main(["--checkpoint", str(trained), "--out", str(out)]) == 0
    assert not (out / "modeling_bdh.py").exists()  # without --hf: weights, config, tokenizer, card
    capsys.readouterr()
    assert export.main(["--checkpoint", str(out), "--out", str(tmp_path / "again")]) == 1  # an export is no checkpoint
    assert capsys.readouterr().err.endswith(f"export.py's output, not a checkpoint (exported from {trained}: give "
                                            f"that checkpoint)\n")
    assert sample.main(["--checkpoint", str(out / "model.safetensors")]) == 1  # one of its files: the folder
    assert capsys.readouterr().err == (f"error: --checkpoint: {out / 'model.safetensors'} is a file of {out}, a folder "
                                       f"export.py wrote: give that folder (to export again, the checkpoint it came "
                                       f"from)\n")
    path = write_config(tmp_path, corpus, "tune.yaml", max_iters=2, checkpoint_freq=2, checkpoint_dir=str(tmp_path / "tune"))
    capsys.readouterr()
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={out}"]) == 0
    assert "fine-tuning the model exported to" in capsys.readouterr().out
    [run] = (tmp_path / "tune").iterdir()
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][0]
    assert first["step"] == 1 and first["train_loss"] < 5.0  # trained weights: far below ln 256 = 5.5
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "tuned")]) == 0  # its card says so
    assert (f"- started from: {out} (exported at step 4 of {trained}); trained further on the data above\n"
            in (tmp_path / "tuned" / "README.md").read_text())
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={out}", "model.n_layer=3"]) == 1
    assert "different model shape" in capsys.readouterr().err
    (out / "model.safetensors").unlink()  # an export copied in part
    assert train.main(["--config", str(path), f"training.resume_from_checkpoint={out}"]) == 1
    assert capsys.readouterr().err.endswith(f"holds no checkpoint_<step>.pt: a folder export.py wrote, without its "
                                            f"model.safetensors (copied in part?): copy that file into it (exported "
                                            f"from {trained}: give that checkpoint)\n")


def test_the_card_names_a_start_only_where_a_run_started_from_a_model(tmp_path):
    from locate import RUN_CONFIG_HEADER
    run = tmp_path / "run_20261124_000000"
    run.mkdir()
    for start, line in (("downloads/mine.pt", ["- started from: downloads/mine.pt; trained further on the data above"]),
                        ("latest", []), ("null", [])):  # latest: a run continued in a new folder, from its own
        (run / "config.yaml").write_text(RUN_CONFIG_HEADER + f"training: {{resume_from_checkpoint: {start}}}\n")
        assert export.started_from(run) == line
    loose = tmp_path / "downloads"  # a checkpoint beside a config file that no run wrote
    loose.mkdir()
    (loose / "config.yaml").write_text("training: {resume_from_checkpoint: auto}\n")
    assert export.started_from(loose) == []


def test_config_json_records_the_tokenizer_s_own_size_and_separator_and_whether_it_trained_for_4_bits(tmp_path):
    """A tokenizer of 320 tokens whose separator is id 7, for a model padded to 384 rows: config.json says the
    tokenizer's (what generation may draw and stops at); sample.py reads use_4bit to say which weights were measured."""
    ckpt = tiny_checkpoint(model={"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 384},
                           low_precision={"use_4bit": True})
    tokenizer = SimpleNamespace(vocab_size=320, separator=7, to_str=lambda: "{}")
    config = export.config_json(ckpt, tokenizer, tmp_path / "checkpoint_1.pt", hf=False, four_bit=True)
    assert (config["vocab_size"], config["tokenizer_vocab_size"], config["separator_token_id"]) == (384, 320, 7)
    assert config["bdh_export"]["tokenizer"] == "tokenizer.json" and config["low_precision"]["use_4bit"] is True


def test_4bit_weights_use_the_run_s_quantization_type():
    ckpt = tiny_checkpoint(low_precision={"use_4bit": True, "quantization_type": "fp4"})
    ckpt.model = {name: torch.randn(2, 32, 64) for name in ("encoder", "encoder_v", "decoder")}
    tensors = export.weights(ckpt, four_bit=True)
    expected = export_4bit(ckpt.model["encoder"], "fp4", ckpt.low_precision()["use_double_quant"])
    assert torch.equal(tensors["quant_map"], expected["quant_map"])
    assert torch.equal(tensors["encoder_4bit"], expected["codes"])


def test_what_is_not_this_projects_is_refused_in_one_line(tmp_path, capsys):
    other = tmp_path / "pytorch_model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    assert export.main(["--checkpoint", str(other), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: --checkpoint: {other}: not a checkpoint of this project (missing model, model_config, step)\n"
    assert not (tmp_path / "out").exists()
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, other)  # another project's, with keys of the same names
    assert export.main(["--checkpoint", str(other), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.endswith("not a checkpoint of this project (missing model_config)\n")
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(other), "--out", " "])
    assert "--out is empty: give the folder to write, e.g. --out my-bdh" in capsys.readouterr().err
    weights_only = tmp_path / "weights_only"  # a folder with safetensors but no config.json is no export
    weights_only.mkdir()
    save_file({"w": torch.zeros(2)}, weights_only / "model.safetensors")
    assert not is_export(weights_only)


def test_an_export_whose_config_json_was_edited_is_refused_in_one_line(trained, tmp_path):
    out = tmp_path / "export"
    assert export.main(["--checkpoint", str(trained), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    encoder = tuple(load_file(out / "model.safetensors")["encoder"].shape)
    for edit, message in [({"n_layer": "3"}, "config.json's n_layer is '3', not a whole number of at least 1"),
                          ({"n_layer": 0}, "config.json's n_layer is 0, not a whole number of at least 1"),
                          ({"n_head": config["n_head"] * 2}, "config.json does not fit model.safetensors: encoder is "
                                                             f"{encoder} there and (4, 32, 32) by config.json")]:
        (out / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(CheckpointError, match=f"^{out}: {re.escape(message)} \\(edited by hand\\?\\); export the "
                                                  f"checkpoint again$"):
            load_export(out)


def test_replace_replaces_an_earlier_export_but_never_a_run_directory(trained, tmp_path, capsys):
    out = tmp_path / "export"
    assert export.main(["--checkpoint", str(trained), "--out", str(out), "--hf"]) == 0
    assert {p.name for p in out.iterdir()} <= export.EXPORT_FILES
    assert export.main(["--checkpoint", str(trained), "--out", str(out), "--replace"]) == 0
    assert not (out / "modeling_bdh.py").exists()
    run = trained.parent
    before = sorted(p.name for p in run.iterdir())
    assert export.main(["--checkpoint", str(trained), "--out", str(run), "--replace"]) == 1
    assert "--replace replaces only what this command writes, and the folder also holds" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before
    assert export.main(["--checkpoint", str(trained), "--out", str(tmp_path / "export4"), "--4bit"]) == 0
    assert "was not trained with low_precision.use_4bit" in capsys.readouterr().err
    assert sample.main(["--checkpoint", str(tmp_path / "export4"), "--max-new-tokens", "5"]) == 0  # and serving it
    assert "export4 (exported at step 4) was not trained with low_precision.use_4bit" in capsys.readouterr().err
    assert sample.main(["--checkpoint", str(out), "--max-new-tokens", "5", "--4bit"]) == 0  # 4 bits from the export
    assert f"note: {out} (exported at step 4) was not trained with low_precision.use_4bit" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    del config["low_precision"]["use_4bit"]  # a folder exported before it was recorded: how it was trained is unknown
    (out / "config.json").write_text(json.dumps(config))
    assert sample.main(["--checkpoint", str(out), "--max-new-tokens", "5", "--4bit"]) == 0
    assert "post-training" not in capsys.readouterr().err
    del config["low_precision"]  # exported before any of it was recorded
    (out / "config.json").write_text(json.dumps(config))
    assert sample.main(["--checkpoint", str(out), "--max-new-tokens", "5", "--4bit"]) == 0
    assert "post-training" not in capsys.readouterr().err


def test_export_never_overwrites_unasked_and_a_file_or_a_full_disk_is_one_line(trained, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "export"
    assert export.main(["--checkpoint", str(trained), "--out", str(out)]) == 0
    (out / "README.md").write_text("my own notes on this model")
    assert export.main(["--checkpoint", str(trained), "--out", str(out)]) == 1
    assert "add --replace" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "my own notes on this model"
    (tmp_path / "afile").write_text("x")
    assert export.main(["--checkpoint", str(trained), "--out", str(tmp_path / "afile")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'afile'}: is a file, not a folder; choose another --out\n"

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "write_export", disk_full)
    assert export.main(["--checkpoint", str(trained), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'out'}: cannot write (No space left on device)\n"
    assert not (tmp_path / "out").exists()


def test_exporting_a_run_whose_best_is_older_than_its_newest_checkpoint_says_how_to_export_the_best(trained, tmp_path,
                                                                                                    capsys):
    run = trained.parent
    shutil.copyfile(trained, run / "best.pt")  # the last evaluation was the best: nothing to say
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "newest")]) == 0
    assert "best.pt" not in capsys.readouterr().err
    older = torch.load(trained, weights_only=True)
    older["step"] = 2
    torch.save(older, run / "best.pt")  # the last evaluation was no better than the one of step 2
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "a")]) == 0
    assert f"note: {trained} is the run's newest checkpoint; its best validation loss (" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(trained), "--out", str(tmp_path / "b")]) == 0  # that file, on purpose
    assert export.main(["--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "c")]) == 0
    assert "note:" not in capsys.readouterr().err
    step_2 = next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("val_loss")
                  and r["step"] == 2)  # its card: the evaluation of its own step, not a later one's
    assert f"validation loss {step_2['val_loss']:.4f} nats per token" in (tmp_path / "c" / "README.md").read_text()


def test_the_model_card_names_the_run_s_validation_data_processes_and_tokens(tmp_path):
    ckpt = tiny_checkpoint()
    config = ckpt.config
    card = export.model_card(ckpt, ByteTokenizer(), tmp_path / "checkpoint_1.pt", "out", hf=False, four_bit=False)
    assert card.startswith("# BDH (")  # the Hub's front matter only with --hf
    assert "- weights: float32\n" in card and "- tokens: UTF-8 bytes\n" in card
    assert "- weights: encoder, encoder_v, decoder in 4 bits (nf4, blocks of 64), the rest float32\n" in (
        export.model_card(ckpt, ByteTokenizer(), tmp_path / "checkpoint_1.pt", "out", hf=False, four_bit=True))
    assert ("), validation fraction 0.05 (split_seed 1337, held out by text), measured on up to 20 batches "
            "(training.eval_iters)\n") in card
    assert "- result: not evaluated yet (stopped before its first evaluation)" in card and "inf" not in card
    ckpt.best_val_loss = 2.5
    assert "- result: best validation loss 2.5000 nats per token" in export.model_card(
        ckpt, ByteTokenizer(), tmp_path / "checkpoint_1.pt", "out", hf=False, four_bit=False)
    config["low_precision"]["use_4bit"] = True  # every evaluation measured the 4-bit model
    assert ("- result: best validation loss 2.5000 nats per token (of the model with encoder, encoder_v, decoder in "
            "4 bits: low_precision.use_4bit)\n") in export.model_card(
        ckpt, ByteTokenizer(), tmp_path / "checkpoint_1.pt", "out", hf=False, four_bit=False)
    metrics = tmp_path / "metrics.jsonl"  # the run's evaluation says what it measured, whatever a resume set since
    metrics.write_text('{"step": 1, "val_loss": 3.0, "val_bits_per_byte": 4.0}\n{"step": 1, "train_loss": 2.9}\n'
                       '{"step": 1, "val_loss": 2.4, "val_bits_per_byte": 3.0, "weights_4bit": false}\n')  # resumed
    card = export.model_card(ckpt, ByteTokenizer(), tmp_path / "checkpoint_1.pt", "out", hf=False, four_bit=False)
    assert "- result: validation loss 2.4000 nats per token, 3.0000 bits per byte, at step 1\n" in card
    ckpt.step = 3  # stopped after step 3, between evaluations: the loss is another step's weights'
    assert ("at step 1; the run's last evaluation: step 3's weights, exported here, were not measured (best.pt holds the "
            "best measured ones)\n") in export.model_card(ckpt, ByteTokenizer(), tmp_path / "checkpoint_3.pt", "out",
                                                         hf=False, four_bit=False)
    ckpt.step = 1
    metrics.unlink()
    config["low_precision"]["use_4bit"] = False  # quantized by the export only: what the loss is of
    assert ("- result: best validation loss 2.5000 nats per token (of the weights as trained; their 4-bit version "
            "here, quantized after training, was not measured)\n") in export.model_card(
        ckpt, ByteTokenizer(), tmp_path / "checkpoint_1.pt", "out", hf=False, four_bit=True)
    config["dataset"]["val_parquet_dir"] = "data/held_out"
    card = export.model_card(ckpt, ByteTokenizer(), tmp_path / "checkpoint_1.pt", "out", hf=False, four_bit=False)
    assert "), validation data/held_out, measured on up to 20 batches" in card and "validation fraction" not in card
    assert "accumulation 1\n" in card  # a checkpoint older than random states and token counting
    ckpt.rng = [{}]  # one process's generators
    assert "accumulation 1\n" in export.model_card(ckpt, ByteTokenizer(), tmp_path / "checkpoint_1.pt", "out",
                                                   hf=False, four_bit=False)
    ckpt.rng, ckpt.tokens = [{}, {}], 40_960  # two processes under torchrun
    card = export.model_card(ckpt, ByteTokenizer(), tmp_path / "checkpoint_1.pt", "exports/out", hf=True,
                             four_bit=False)
    assert "accumulation 1 x 2 processes; 40,960 tokens trained on\n" in card
    assert 'AutoTokenizer.from_pretrained("out", trust_remote_code=True)' in card  # no question at the prompt
    assert "python sample.py --checkpoint out --prompt" in card and "exports" not in card  # the folder, shared
    assert "- settings:" not in card
    for step in (1, 3, 12):  # resumes with changed settings (rundir.record_resumed_config); after step 12: later
        (tmp_path / f"config_resume_{step}.yaml").write_text("{}")
    ckpt.step = 12
    card = export.model_card(ckpt, ByteTokenizer(), tmp_path / "checkpoint_12.pt", "out", hf=False, four_bit=False)
    assert ("- settings: resumed with other settings after steps 1, 3; those given here are the ones from step 4 "
            "on\n") in card
