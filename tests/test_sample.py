import os
import subprocess
import sys

import pytest
import torch
import yaml

import sample
import train
from checkpoint import load_checkpoint
from conftest import NEEDS_CUDA, ROOT, tiny_config_dict
from model import BDH
from tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One 2-step run for the module: the tests only read its checkpoint."""
    from conftest import make_corpus
    from rundir import release_run_directories
    tmp_path = tmp_path_factory.mktemp("sample")
    corpus = make_corpus(tmp_path / "data", n_files=3, docs_per_file=40, rows_per_group=8, doc_len=60)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, corpus, max_iters=2)))
    assert train.main(["--config", str(path)]) == 0
    release_run_directories()
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
    prompt_file = checkpoint.parent / "prompt.txt"  # a prompt too long for the command line comes from a file
    for text in (b"<00-", b"\xef\xbb\xbf<00-", "<00-".encode("utf-16")):  # (a byte-order mark, as Notepad writes
        # one, is not the prompt's; one of UTF-16 says how to read it)
        prompt_file.write_bytes(text)
        assert sample.main([*args[:2], "--prompt-file", str(prompt_file), *args[4:]]) == 0
        assert capsys.readouterr().out == first
    with pytest.raises(SystemExit):  # both: which one? (an empty --prompt too)
        sample.main([*args[:2], "--prompt", "", "--prompt-file", str(prompt_file)])
    assert "--prompt-file: not allowed with argument --prompt" in capsys.readouterr().err
    prompt_file.write_bytes(b"<0\xff")
    with pytest.raises(SystemExit):
        sample.main([*args[:2], "--prompt-file", str(prompt_file)])
    assert "--prompt-file " + str(prompt_file) + ": not UTF-8 text (an invalid byte at byte 2); save it as UTF-8" \
        in capsys.readouterr().err


def test_sample_without_prompt_and_from_run_directory(checkpoint, capsys):
    capsys.readouterr()
    greedy = ["--checkpoint", str(checkpoint.parent), "--max-new-tokens", "10", "--temperature", "0",
              "--device", "cpu"]
    assert sample.main(greedy) == 0
    first = capsys.readouterr().out
    assert not first.startswith("<|endoftext|>")  # the separator it starts from is not the model's text
    assert sample.main(greedy + ["--seed", "99"]) == 0
    assert capsys.readouterr().out == first  # greedy ignores the seed
    assert sample.main(greedy[2:] + ["--checkpoint-dir", str(checkpoint.parent.parent)]) == 0  # latest, by default
    assert capsys.readouterr().out == first
    assert sample.main(["--checkpoint", str(checkpoint.parent), "--max-new-tokens", "10", "--top-k", "5"]) == 0


def test_the_separator_of_bytes_is_printed_as_endoftext_not_a_nul(checkpoint, capsys, monkeypatch):
    """A NUL on a terminal, or in a log (grep: binary file matches): shown as a tokenizer.json shows its own."""
    from model import BDH
    monkeypatch.setattr(BDH, "stream", lambda self, idx, *args, **kwargs: iter(torch.tensor([[t]]) for t in b"a\0b"))
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(checkpoint), "--prompt", "x", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "xa<|endoftext|>b\n"


def test_4bit_from_a_model_trained_without_use_4bit_is_noted_as_post_training(checkpoint, capsys):
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(checkpoint), "--max-new-tokens", "5", "--4bit"]) == 0
    err = capsys.readouterr().err
    assert f"note: {checkpoint} (step 2) was not trained with low_precision.use_4bit" in err
    assert "4-bit weights (nf4" in err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert sample.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 1
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "does not exist" in err


def test_text_comes_out_as_generated_and_whole_characters(bpe_file):
    """The pieces printed one after the other are decode() of all the tokens, and a character whose
    bytes arrive in two tokens is printed once it is whole, never as U+FFFD."""
    from tokenizer import ByteTokenizer, load_tokenizer
    text = "naïve — 東京\nline two ü\n\nend"
    for tokenizer in (ByteTokenizer(), load_tokenizer(str(bpe_file))):
        ids = tokenizer.encode(text)
        pieces = list(sample.text_as_it_comes(tokenizer, iter(ids)))
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in piece for piece in pieces) and len(pieces) > 3
    from tokenizers import Tokenizer, decoders, models  # SentencePiece-style: decode drops a text's leading space
    words = Tokenizer(models.WordLevel({"\u2581Hello": 0, "\n": 1, "\u2581world": 2, "\u2581the": 3}, unk_token="\n"))
    words.decoder = decoders.Metaspace()
    assert "".join(sample.text_as_it_comes(words, iter([0, 1, 2, 3, 1, 3]))) == words.decode([0, 1, 2, 3, 1, 3])
    invalid = list(sample.text_as_it_comes(ByteTokenizer(), iter([0xE6, 0x9D])))  # cut short for good: shown at the end
    assert "".join(invalid) == ByteTokenizer().decode([0xE6, 0x9D])


def test_a_long_line_is_decoded_a_window_at_a_time(bpe_file, monkeypatch):
    """Decoding the whole line for every token would take minutes for a long line without line ends."""
    from tokenizer import ByteTokenizer, load_tokenizer
    text = "東京 naïve words without a line end, " * 200
    for tokenizer in (ByteTokenizer(), load_tokenizer(str(bpe_file))):
        decoded = []
        real = tokenizer.decode
        monkeypatch.setattr(tokenizer, "decode", lambda ids: decoded.append(len(ids)) or real(ids))
        ids = tokenizer.encode(text)
        assert "".join(sample.text_as_it_comes(tokenizer, iter(ids))) == text
        assert max(decoded) <= sample.DECODE_WINDOW + 4  # + a character's bytes waiting to be whole


def test_streamed_text_is_what_generate_gives(checkpoint, capsys):
    from locate import load_model
    from tokenizer import tokenizer_from_string
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(checkpoint), "--prompt", "<01-", "--max-new-tokens", "60", "--seed", "3",
                        "--top-k", "20", "--device", "cpu"]) == 0
    model, saved, _, origin, trained_on, block_size = load_model(str(checkpoint), None, "--checkpoint")
    assert origin == f"{checkpoint} (step 2)" and trained_on == load_checkpoint(checkpoint).config["dataset"]["parquet_dir"]
    tokenizer = tokenizer_from_string(saved)
    out = model.eval().generate(torch.tensor([tokenizer.encode("<01-")]), 60, temperature=0.8, top_k=20,
                                generator=torch.Generator().manual_seed(3), vocab_limit=tokenizer.vocab_size)
    printed = capsys.readouterr()
    assert printed.out == tokenizer.shown(tokenizer.decode(out[0].tolist())) + "\n"  # (its control characters escaped)
    assert printed.err == (f"model: {checkpoint} (step 2), trained on {trained_on}\nnote: the model trained on windows of "
                           f"{block_size} tokens, and this text runs to 64 (the prompt's 4 and 60 new): past {block_size} "
                           f"it reads positions it never trained at, and its text usually gets worse\n")
    assert sample.main(["--checkpoint", str(checkpoint), "--prompt", "<01-", "--max-new-tokens", str(block_size - 3),
                        "--device", "cpu"]) == 0
    assert "note:" not in capsys.readouterr().err  # within the trained length (the last token is not read)
    assert sample.main(["--checkpoint", str(checkpoint), "--max-new-tokens", "99", "--device", "cpu"]) == 0
    assert "runs to 100 (the separator it starts from and 99 new)" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1"])
def test_a_temperature_that_is_not_a_number_from_zero_up_is_refused(checkpoint, capsys, temperature):
    with pytest.raises(SystemExit) as stop:
        sample.main(["--checkpoint", str(checkpoint), "--temperature", temperature])
    assert stop.value.code == 2 and "--temperature must be a finite number >= 0" in capsys.readouterr().err


def test_top_k_0_samples_among_all_tokens_and_a_negative_one_is_refused(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--max-new-tokens", "30", "--device", "cpu"]
    assert sample.main(args + ["--top-k", "256"]) == 0  # every byte: no restriction
    unrestricted = capsys.readouterr().out
    assert sample.main(args + ["--top-k", "0"]) == 0
    assert capsys.readouterr().out == unrestricted
    assert sample.main(args) == 0  # the default
    assert capsys.readouterr().out == unrestricted
    with pytest.raises(SystemExit) as stop:
        sample.main(args + ["--top-k", "-1"])
    assert stop.value.code == 2 and "--top-k must be >= 0 (0: sample among all tokens), got -1" in capsys.readouterr().err
    assert sample.main([*args[:2], "--prompt", "<00-", "--max-new-tokens", "0"]) == 0  # the prompt alone
    assert capsys.readouterr().out == "<00-\n"
    with pytest.raises(SystemExit):
        sample.main([*args[:2], "--max-new-tokens", "-1"])
    assert "--max-new-tokens must be >= 0, got -1" in capsys.readouterr().err


def test_text_is_printed_token_by_token_and_ctrl_c_keeps_it(checkpoint, capsys, monkeypatch):
    from model import BDH
    printed_before_next_token = []

    def interrupted(self, idx, *args, **kwargs):
        for byte in b"abc":
            yield torch.tensor([[byte]])
            printed_before_next_token.append(capsys.readouterr().out)
        raise KeyboardInterrupt

    monkeypatch.setattr(BDH, "stream", interrupted)
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(checkpoint), "--prompt", "x", "--device", "cpu"]) == 130
    assert printed_before_next_token == ["xa", "b", "c"]
    assert "(stopped by Ctrl-C)" in capsys.readouterr().err


def test_a_prompt_the_tokenizer_does_not_give_back_is_noted(checkpoint, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizer import SEPARATOR_TOKEN
    lossy = Tokenizer(models.BPE(unk_token="<unk>"))  # no decoder: words come back with spaces between tokens
    lossy.pre_tokenizer = pre_tokenizers.Whitespace()
    lossy.train_from_iterator(["some words, and more words"] * 10, trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<unk>", SEPARATOR_TOKEN], show_progress=False))
    state = torch.load(checkpoint, weights_only=True)
    state["tokenizer"] = lossy.to_str()
    torch.save(state, tmp_path / "lossy.pt")
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(tmp_path / "lossy.pt"), "--prompt", "more words, é", "--max-new-tokens",
                        "3"]) == 0
    assert ("note: the model's tokenizer does not give the prompt back: 'more words, é' comes back as 'more words , "
            "<unk>'; the model reads what it keeps") in capsys.readouterr().err


@pytest.mark.parametrize("seed", [str(2**64), "99999999999999999999", str(-2**63 - 1)])
def test_a_seed_torch_cannot_take_is_refused(checkpoint, capsys, seed):
    with pytest.raises(SystemExit) as stop:
        sample.main(["--checkpoint", str(checkpoint), "--seed", seed])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"--seed must be from -2**63 to 2**64 - 1 (what torch.Generator takes), got {seed}\n" in err


def test_seeds_at_the_ends_of_the_range_sample_and_a_negative_one_counts_back_from_2_64(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--max-new-tokens", "20", "--device", "cpu", "--seed"]
    texts = []
    for seed in (2**64 - 1, -1, -2**63):
        assert sample.main([*args, str(seed)]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2]  # as torch.Generator.manual_seed takes -1


def test_a_prompt_that_is_not_utf8_is_read_with_its_invalid_bytes_replaced(checkpoint, capsys):
    prompt = os.fsdecode(b"<0\xff-")  # what Python makes of these bytes in sys.argv: a lone surrogate
    assert sample.main(["--checkpoint", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("<0\ufffd-")
    assert "note: --prompt is not valid UTF-8 (byte 2: b'\\xff'): its invalid bytes become U+FFFD\n" in printed.err


def test_a_reader_that_leaves_early_ends_it_quietly(checkpoint):
    """sample.py | head: the pipe closes while text comes; no traceback, status 0."""
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a terminal's Python runs
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(checkpoint), "--prompt",
                             "<00-", "--max-new-tokens", "3000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=buffered)
    assert proc.stdout.read(4) == b"<00-"
    proc.stdout.close()  # what head does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


# ---- found by mutating sample.py: the defaults, the start without a prompt, errors in one line, windows

@pytest.fixture
def stream_calls(monkeypatch):
    """BDH.stream replaced by one that records what it was asked for and yields nothing."""
    calls = []

    def recorded(self, idx, max_new_tokens, **kwargs):
        calls.append({"idx": idx.tolist(), "device": idx.device, "max_new_tokens": max_new_tokens, **kwargs})
        return iter(())

    monkeypatch.setattr(BDH, "stream", recorded)
    return calls


def test_defaults_are_500_new_tokens_seed_1337_and_all_tokens(checkpoint, capsys, stream_calls):
    assert sample.main(["--checkpoint", str(checkpoint), "--prompt", "x", "--device", "cpu"]) == 0
    [call] = stream_calls
    assert call["max_new_tokens"] == 500 and call["temperature"] == 0.8 and call["top_k"] is None
    assert call["generator"].initial_seed() == 1337
    assert call["vocab_limit"] == 256  # the byte tokenizer's ids, whatever the model's vocab_size


def test_generation_without_prompt_starts_from_the_separator(checkpoint, capsys, stream_calls):
    assert sample.main(["--checkpoint", str(checkpoint), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert stream_calls[0]["idx"] == [[ByteTokenizer.separator]]
    assert capsys.readouterr().out == "\n"  # the separator is not printed


@NEEDS_CUDA
def test_the_generator_is_on_the_model_s_device(checkpoint, capsys, stream_calls):
    assert sample.main(["--checkpoint", str(checkpoint), "--prompt", "x", "--max-new-tokens", "3", "--device",
                        "cuda"]) == 0
    [call] = stream_calls
    assert call["generator"].device.type == call["device"].type == "cuda"


def test_a_model_without_a_recorded_block_size_samples_without_a_note(checkpoint, capsys, monkeypatch, stream_calls):
    """An export written before trained_block_size was recorded: nothing to compare the length with."""
    real = sample.load_model
    monkeypatch.setattr(sample, "load_model", lambda *args: (*real(*args)[:5], None))
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(checkpoint), "--prompt", "x", "--max-new-tokens", "5000",
                        "--device", "cpu"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_4bit_on_mps_is_refused_before_loading(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sample, "pick_device", lambda *args, **kwargs: torch.device("mps"))
    assert sample.main(["--checkpoint", str(checkpoint), "--4bit"]) == 1
    assert "error: --4bit: bitsandbytes' 4-bit quantization runs on cpu or cuda; add --device cpu" \
        in capsys.readouterr().err


def test_a_checkpoint_whose_tokenizer_is_unreadable_is_a_clear_error(checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=True)
    state["tokenizer"] = "{not a tokenizer"
    torch.save(state, tmp_path / "bad.pt")
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(tmp_path / "bad.pt"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "tokenizer" in err and "Traceback" not in err


def test_4bit_of_weights_in_4_bits_already_is_a_clear_error(checkpoint, capsys, monkeypatch):
    real = sample.load_model

    def exported_in_4bit(*args):
        loaded = list(real(*args))
        loaded[2] = {**loaded[2], "exported_in_4bit": True}
        return tuple(loaded)

    monkeypatch.setattr(sample, "load_model", exported_in_4bit)
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(checkpoint), "--4bit", "--device", "cpu"]) == 1
    assert "holds 4-bit weights already (export.py --4bit): drop --4bit" in capsys.readouterr().err


def test_a_window_restarts_at_each_line_end(monkeypatch):
    """Short lines never make a window longer than a line (+ the token it starts from)."""
    tokenizer = ByteTokenizer()
    decoded = []
    real = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids: decoded.append(len(ids)) or real(ids))
    text = "ten chars\n" * 30
    assert "".join(sample.text_as_it_comes(tokenizer, iter(tokenizer.encode(text)))) == text
    assert max(decoded) <= len("ten chars\n") + 1
    decoded.clear()
    text = "x" * 1000
    assert "".join(sample.text_as_it_comes(tokenizer, iter(tokenizer.encode(text)))) == text
    assert max(decoded) == sample.DECODE_WINDOW == 64
