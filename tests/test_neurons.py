"""neurons.py: which latent neurons fire for each prompt token."""
import os

import pytest
import torch

import neurons
import train
from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import write_config
from model import BDH, BDHConfig

SMALL = BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4)  # N = 64


@pytest.fixture
def small_model(monkeypatch):
    """neurons.py reads an untrained small model, with the byte tokenizer, whatever --checkpoint says."""
    monkeypatch.setattr(neurons, "load_model", lambda *args: (BDH(SMALL), "bytes", {}, "a small model", "", 64))


def test_picture_and_figures_of_the_active_neurons(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2)
    assert train.main(["--config", str(path), "logging.tensorboard=false"]) == 0
    [run] = (tmp_path / "ck").iterdir()
    capsys.readouterr()
    out = tmp_path / "n.png"
    assert neurons.main(["--checkpoint", str(run), "--prompt", "<00-001>abc", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_bytes().startswith(b"\x89PNG") and "x active" in printed and f"wrote {out}" in printed
    # the figures are the fractions of non-zero latents: against a direct computation of layer 1
    model = model_from_checkpoint(load_checkpoint(run / "checkpoint_2.pt")).eval()
    found = neurons.latents(model, list(b"<00-001>abc"))
    with torch.no_grad():
        x = torch.nn.functional.layer_norm(model.embed(torch.tensor(list(b"<00-001>abc"))), (32,), eps=1e-5)
        a = torch.relu(x @ model.encoder)  # (H, T, N)
    assert torch.allclose(found[0][0], a.permute(1, 0, 2).reshape(len(x), -1), atol=1e-6)
    assert printed.startswith(f"model: {run / 'checkpoint_2.pt'} (step 2), trained on {corpus}\n")
    assert f"{float((a > 0).float().mean()):.2%}" in printed.splitlines()[3]
    assert printed.splitlines()[3].split()[0] == "0"  # layers numbered from 0, as in the metrics (sparsity/x_layer0)
    seen = []  # y as the layer has it, before it is multiplied by x in place
    with torch.no_grad():
        model(torch.tensor([list(b"<00-001>abc")]), observe=lambda a, b: seen.append(b.clone()))
    H, N = model.config.n_head, model.config.n_latent
    for (x_latent, y_latent), b, row in zip(found, seen, printed.splitlines()[3:]):
        assert torch.equal(y_latent, b.view(H, -1, N).permute(1, 0, 2).reshape(len(x), -1))
        assert row.split()[2:] == [f"{float((y_latent > 0).float().mean()):.2%}",
                                   f"{int(((x_latent > 0).sum(0) > 0).sum()):,}"]  # y active, neurons used
    assert "never trained at" not in capsys.readouterr().err  # 11 tokens of the 16 it trained on
    # without --checkpoint: the newest checkpoint of the newest run, the same figures
    assert neurons.main(["--checkpoint-dir", str(tmp_path / "ck"), "--prompt", "<00-001>abc", "--out", str(out)]) == 0
    assert capsys.readouterr().out == printed
    # a long prompt: its figures whole, its picture the first --max-tokens rows (not a picture no viewer opens)
    from matplotlib.image import imread
    short = tmp_path / "short.png"
    for option in ("--max-tokens", "--max-neurons"):
        with pytest.raises(SystemExit):
            neurons.main(["--checkpoint", str(run), "--prompt", "abc", option, "0"])
        assert f"{option} must be at least 1, got 0" in capsys.readouterr().err
    assert neurons.main(["--checkpoint", str(run), "--prompt", "<00-001>abc", "--out", str(short), "--max-tokens", "4"]) == 0
    printed_short = capsys.readouterr().out
    assert printed_short.splitlines()[:-1] == printed.splitlines()[:-1]
    assert printed_short.splitlines()[-1] == f"wrote {short} (the first 4 of 11 tokens: --max-tokens)"
    assert imread(short).shape[0] < imread(out).shape[0]
    # longer than the windows it trained on: the figures count positions it never trained at
    assert neurons.main(["--checkpoint", str(run), "--prompt", "<00-001>abc" * 2, "--out", str(tmp_path / "long.png")]) == 0
    assert ("note: the model trained on windows of 16 tokens and the prompt is 22: past 16 it reads positions it "
            "never trained at, and the figures count them too") in capsys.readouterr().err


def test_a_character_of_several_byte_tokens_is_labelled_where_it_completes():
    from tokenizer import ByteTokenizer
    tokenizer = ByteTokenizer()
    assert neurons.token_labels(tokenizer, tokenizer.encode("né ✓a")) == ["n", "·", "é", " ", "·", "·", "✓", "a"]


def test_a_character_the_font_lacks_is_labelled_by_its_code_point():
    assert neurons.drawable(["a", "é", " ", "\ue000x"]) == ["a", "é", " ", "U+E000x"]  # (a private-use character)


@pytest.mark.parametrize("config", [SMALL, BDHConfig(), BDHConfig(n_layer=3, n_embd=128,
                                                                  mlp_internal_dim_multiplier=16)],
                         ids=["small", "config.yaml", "tiny.yaml"])
def test_the_longest_prompt_is_the_longest_that_fits_in_the_memory_budget(config):
    limit = neurons.max_prompt_tokens(config)
    assert neurons.memory_bytes(config, limit) <= neurons.MEMORY_BUDGET < neurons.memory_bytes(config, limit + 1)


def test_a_prompt_too_long_for_the_memory_is_refused_before_the_forward_pass(small_model, tmp_path, monkeypatch,
                                                                             capsys):
    class Reached(Exception):
        pass

    def forward(model, ids):
        raise Reached

    monkeypatch.setattr(neurons, "latents", forward)
    limit = neurons.max_prompt_tokens(SMALL)
    with pytest.raises(Reached):  # as long as it may be
        neurons.main(["--prompt", "a" * limit, "--out", str(tmp_path / "n.png")])
    with pytest.raises(SystemExit) as stop:  # é: 2 byte tokens
        neurons.main(["--prompt", "é" * limit, "--out", str(tmp_path / "n.png")])
    assert stop.value.code == 2
    assert (f"the prompt is {2 * limit:,} tokens, more than the {limit:,} that fit in 2 GiB for this model (memory grows "
            f"with the square of the prompt's length): shorten it, e.g. to its first {limit // 2:,} characters\n"
            in capsys.readouterr().err)


def test_the_picture_draws_no_more_rows_than_fit_in_its_memory(small_model, tmp_path, monkeypatch, capsys):
    drawn = []
    monkeypatch.setattr(neurons, "draw", lambda found, labels, out, max_neurons: drawn.append(len(labels)))
    monkeypatch.setattr(neurons, "PICTURE_ROWS", 10 * SMALL.n_layer)  # 10 tokens per layer
    assert neurons.main(["--prompt", "a" * 30, "--max-tokens", "20", "--out", str(tmp_path / "n.png")]) == 0
    printed = capsys.readouterr()
    assert drawn == [10] and "\n30 tokens," in printed.out
    assert "(the first 10 of 30 tokens: the picture's rows)" in printed.out
    assert printed.err == (f"note: the picture draws the first 10 tokens in each of {SMALL.n_layer} layers, the "
                           f"{10 * SMALL.n_layer:,} rows it draws in about 2 GB of memory (--max-tokens 20 would take "
                           f"more); the printed figures count every token\n")
    assert neurons.main(["--prompt", "a" * 8, "--max-tokens", "20", "--out", str(tmp_path / "n.png")]) == 0
    assert drawn[-1] == 8 and capsys.readouterr().err == ""  # fewer tokens than fit: no note


def test_a_prompt_that_is_not_utf8_is_read_with_its_invalid_bytes_replaced(small_model, tmp_path, capsys):
    prompt = os.fsdecode(b"a\xffb")  # what Python makes of these bytes in sys.argv: a lone surrogate
    assert neurons.main(["--prompt", prompt, "--out", str(tmp_path / "n.png")]) == 0
    printed = capsys.readouterr()
    assert "\n5 tokens," in printed.out  # a, U+FFFD's 3 bytes, b
    assert printed.err == "note: --prompt is not valid UTF-8 (byte 1: b'\\xff'): its invalid bytes become U+FFFD\n"
    (tmp_path / "prompt.txt").write_bytes(b"\xef\xbb\xbfab\n")  # from a file: a byte-order mark dropped
    assert neurons.main(["--prompt-file", str(tmp_path / "prompt.txt"), "--out", str(tmp_path / "n.png")]) == 0
    assert "\n3 tokens," in capsys.readouterr().out  # a, b and the line end


def test_an_out_that_cannot_be_a_picture_is_a_usage_error_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(neurons, "load_model", lambda *args: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as stop:
        neurons.main(["--prompt", "abc", "--out", str(tmp_path / "neurons.txt")])
    assert stop.value.code == 2
    assert f"error: --out {tmp_path / 'neurons.txt'}: give a file name ending in .png (or" in capsys.readouterr().err


def test_every_layer_is_drawn_over_the_same_neurons_with_its_scale(tmp_path, figures):
    """The layers share their weights: column j is one neuron in every panel (those firing most over
    all layers first), so a neuron can be followed down the layers."""
    first, second = torch.zeros(3, 6), torch.zeros(3, 6)
    first[:, 4], first[0, 1] = 1.0, 0.5  # neuron 4 fires for every token in layer 1
    second[:2, 1], second[:, 2], second[0, 4] = 2.0, 0.25, 0.1  # neurons 1 and 2 in layer 2, 4 once
    neurons.draw([(first, first), (second, second)], ["a", "b", "c"], tmp_path / "n.png", max_neurons=3)
    panels = [ax for ax in figures[0].axes if ax.images]
    order = [4, 1, 2]  # fire for 4, 3 (1 + 2) and 3 tokens over the layers (a tie: by index)
    for panel, a in zip(panels, (first, second)):
        assert panel.images[0].get_array().tolist() == a[:, order].tolist()
    assert len(figures[0].axes) == 4  # a colour scale beside each panel, the same one
    assert [panel.images[0].get_clim() for panel in panels] == [(0, 2.0), (0, 2.0)]
    assert panels[-1].get_xlabel().startswith("neurons: the 3 that fire most often over all layers")


def test_silent_neurons_are_not_drawn_and_a_title_gives_each_latent_s_share(tmp_path, figures):
    """Only neurons that fire for some token are columns, however large --max-neurons."""
    x, y = torch.zeros(2, 8), torch.zeros(2, 8)
    x[0, 3], x[1, 5] = 1.0, 0.5  # x: 2 of 16 active, neurons 3 and 5
    y[:, :4] = 1.0  # y: half active
    neurons.draw([(x, y)], ["a", "b"], tmp_path / "n.png", max_neurons=400)
    [panel] = [ax for ax in figures[0].axes if ax.images]
    assert panel.images[0].get_array().shape == (2, 2)
    assert panel.get_title(loc="left").startswith(
        "layer 0: the x latent a (drawn) is 12.5% active, the y latent 50.0%; 2 of 8 neurons fire for some token")


def test_a_prompt_of_one_token_or_as_long_as_the_training_windows_has_no_note_and_an_empty_one_is_refused(
        small_model, tmp_path, capsys):
    assert neurons.main(["--prompt", "a", "--out", str(tmp_path / "n.png")]) == 0
    printed = capsys.readouterr()
    assert "\n1 token, 128 latent neurons per layer (H*N)\n" in printed.out and printed.err == ""
    assert printed.out.splitlines()[-1] == f"wrote {tmp_path / 'n.png'}"  # every token drawn: no "first ... of"
    assert neurons.main(["--prompt", "a" * 64, "--out", str(tmp_path / "n.png")]) == 0
    assert capsys.readouterr().err == ""
    assert neurons.main(["--prompt", "a" * 65, "--out", str(tmp_path / "n.png")]) == 0
    assert "windows of 64 tokens and the prompt is 65" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit) as stop:
        neurons.main(["--prompt-file", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "empty.png")])
    assert stop.value.code == 2 and "error: the prompt is empty" in capsys.readouterr().err
    assert not (tmp_path / "empty.png").exists()


def test_a_space_and_a_line_end_are_labelled_as_visible_marks(small_model, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(neurons, "draw", lambda found, labels, out, max_neurons: drawn.append(labels))
    assert neurons.main(["--prompt", "a b\n", "--out", str(tmp_path / "n.png")]) == 0
    assert drawn == [["a", "␣", "b", "\\n"]]


def test_help_says_the_prompt_is_required(capsys):
    """neurons.py needs a prompt (sample.py's may be left out): its --help says so."""
    with pytest.raises(SystemExit):
        neurons.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--prompt PROMPT the text whose neurons are drawn (one of --prompt and --prompt-file is required)" in text
    assert "document boundary" not in text


def test_4bit_draws_the_weights_a_use_4bit_run_trained_for(tmp_path, monkeypatch, capsys):
    trained_4bit = {"use_4bit": True, "quantization_type": "nf4", "use_double_quant": False}
    monkeypatch.setattr(neurons, "load_model", lambda *args: (BDH(SMALL), "bytes", trained_4bit, "m (step 9)", "", 64))
    used = []
    monkeypatch.setattr(neurons, "latents", lambda model, ids: used.append(model.weight_view) or [
        (torch.ones(len(ids), 128), torch.ones(len(ids), 128))] * 2)
    out = str(tmp_path / "n.png")
    assert neurons.main(["--prompt", "abc", "--out", out]) == 0
    assert "note: m (step 9) was trained with low_precision.use_4bit for 4-bit serving" in capsys.readouterr().err
    assert neurons.main(["--prompt", "abc", "--out", out, "--4bit"]) == 0
    err = capsys.readouterr().err
    assert "4-bit weights (nf4): model" in err and "was trained with" not in err
    assert used[0] is None and used[1] is not None  # the forward pass reads the 4-bit weights
    trained_4bit["exported_in_4bit"] = True
    assert neurons.main(["--prompt", "abc", "--out", out, "--4bit"]) == 1
    assert capsys.readouterr().err == ("error: --4bit: m (step 9) holds 4-bit weights already (export.py --4bit): "
                                       "drop --4bit\n")
