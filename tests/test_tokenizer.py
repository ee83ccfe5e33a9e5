"""Tokenizers: bytes and a Hugging Face tokenizer.json (a byte-level BPE trained here)."""
import json
import pickle

import numpy as np
import pyarrow as pa
import pytest

from tokenizer import (SEPARATOR_TOKEN, ByteTokenizer, HFTokenizer, TokenizerError, byte_level_alphabet,
                       check_vocab_size, load_tokenizer, lost_text, note_prompt_change, printable, separator_in_text,
                       text_change, tokenizer_from_string)

DOCS = ["héllo wörld, some words", "and more words <|endoftext|> inside", "x"]


def documents(texts):
    return pa.array([t.encode() for t in texts], pa.large_binary())


def split_at(stream, separator):
    cuts = np.flatnonzero(stream == separator)
    return [stream[a + 1:b] for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_documents_become_one_stream_each_followed_by_the_separator(kind, bpe_file):
    tokenizer = load_tokenizer("bytes" if kind == "bytes" else str(bpe_file))
    stream = tokenizer.encode_documents(documents(DOCS))
    assert stream.dtype == (np.uint8 if kind == "bytes" else np.uint16)
    assert stream[-1] == tokenizer.separator and (stream == tokenizer.separator).sum() == len(DOCS)
    # a literal <|endoftext|> in a document is text, not a separator
    assert [tokenizer.decode(d) for d in split_at(stream, tokenizer.separator)] == DOCS
    assert [tokenizer.encode(t) for t in DOCS] == [list(d) for d in split_at(stream, tokenizer.separator)]


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_token_bytes_count_the_utf8_bytes_of_the_text(kind, bpe_file):
    tokenizer = load_tokenizer("bytes" if kind == "bytes" else str(bpe_file))
    stream = tokenizer.encode_documents(documents(DOCS))
    text_bytes = sum(len(t.encode()) for t in DOCS) + len(DOCS)  # the separator counts as one byte
    assert tokenizer.token_bytes[stream].sum() == text_bytes
    if kind == "bpe":
        assert len(stream) < text_bytes * 0.8  # merges: fewer tokens than bytes


def test_bpe_keeps_its_behaviour_when_pickled_for_spawned_workers(bpe_file):
    tokenizer = load_tokenizer(str(bpe_file))
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert np.array_equal(copy.encode_documents(documents(DOCS)), tokenizer.encode_documents(documents(DOCS)))
    assert copy.to_str() == tokenizer.to_str() and tokenizer_from_string(tokenizer.to_str()).vocab_size == 320


def test_bytes_round_trip_and_invalid_utf8():
    tokenizer = tokenizer_from_string("bytes")
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.to_str() == "bytes"
    assert tokenizer.decode(tokenizer.encode("ünï")) == "ünï"
    assert tokenizer.decode([0x6F, 0x6B, 0xFF]) == "ok\ufffd"


def test_bad_tokenizer_files_are_one_line_errors(tmp_path, bpe_json, monkeypatch):
    with pytest.raises(TokenizerError, match=r"^dataset.tokenizer: .*nope.json does not exist; give the path of"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(TokenizerError, match=r"^dataset.tokenizer: Bytes is no file: did you mean bytes\?$"):
        load_tokenizer("Bytes")
    with pytest.raises(TokenizerError, match=r"^dataset.tokenizer: byte is no file: did you mean bytes\?$"):
        load_tokenizer("byte")

    def refusal(spec):
        with pytest.raises(TokenizerError) as refused:
            load_tokenizer(spec)
        return str(refused.value)
    for spec, hub_name in (("gpt2", "gpt2"), ("org/model-1.5B", "org/model-1.5B"),
                           ("https://huggingface.co/org/model", "org/model")):  # not downloaded: how to get the file
        assert refusal(spec).startswith(f"dataset.tokenizer: {spec} does not exist (")
        assert (f"; a Hugging Face Hub name is not fetched: save its tokenizer.json first (tokenizers' "
                f"Tokenizer.from_pretrained('{hub_name}').save('tokenizer.json')); give the path") in refusal(spec)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for local in (str(tmp_path / "nope"), "data/tok", "tok.model", "Tokenizer.JSON", "tokenizer"):
        assert "Hub name" not in refusal(local)  # read as paths: a file's suffix, a folder here, an absolute path
    (tmp_path / "mine.json").write_text(bpe_json)
    assert refusal("mine") == "dataset.tokenizer: mine does not exist; did you mean mine.json?"
    assert refusal("mine.jsn") == "dataset.tokenizer: mine.jsn does not exist; did you mean mine.json?"  # a typo
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"^dataset.tokenizer: .*bad.json: not a Hugging Face tokenizer.json "
                                             r"\(not JSON: .*; give the path of a tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    (tmp_path / "shard.parquet").write_bytes(b"PAR1\x15\x80\xff\x00")
    with pytest.raises(TokenizerError, match=r"^dataset.tokenizer: .*shard.parquet: not a Hugging Face tokenizer.json "
                                             r"\(not text: a binary file\); give the path of a tokenizer.json"):
        load_tokenizer(str(tmp_path / "shard.parquet"))
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(TokenizerError, match=r"other.json: not a Hugging Face tokenizer.json \(JSON without the `model` section"):
        load_tokenizer(str(tmp_path / "other.json"))
    (tmp_path / "export").mkdir()
    with pytest.raises(TokenizerError, match=r"^dataset.tokenizer: .*export is a folder, not a tokenizer.json$"):
        load_tokenizer(str(tmp_path / "export"))
    (tmp_path / "export" / "tokenizer.json").write_text(bpe_json)
    with pytest.raises(TokenizerError, match=r"a folder, not a tokenizer.json; it holds one: dataset.tokenizer=.*export/"):
        load_tokenizer(str(tmp_path / "export"))
    without = bpe_json.replace(SEPARATOR_TOKEN, "<|sep|>")
    (tmp_path / "nosep.json").write_text(without)
    with pytest.raises(TokenizerError, match=r"nosep.json: the tokenizer has no <\|endoftext\|> token"):
        load_tokenizer(str(tmp_path / "nosep.json"))
    with pytest.raises(TokenizerError) as info:
        check_vocab_size(HFTokenizer(bpe_json, "tok.json"), 256)
    assert str(info.value) == ("model.vocab_size 256 is smaller than the 320 tokens of dataset.tokenizer tok.json; "
                               "set model.vocab_size=320 (its size rounded up to a multiple of 64)")
    with pytest.raises(TokenizerError, match="model.vocab_size 319 is smaller than the 320 tokens"):
        check_vocab_size(HFTokenizer(bpe_json, "tok.json"), 319)  # one row short: the last token has no embedding
    assert check_vocab_size(HFTokenizer(bpe_json, "tok.json"), 320) is None
    assert check_vocab_size(HFTokenizer(bpe_json, "tok.json"), 384) is None  # rounded up to 128: 64 rows unused
    assert check_vocab_size(HFTokenizer(bpe_json, "tok.json"), 448).startswith("note: model.vocab_size 448 is larger")
    assert check_vocab_size(ByteTokenizer(), 50304) == (
        "note: model.vocab_size 50,304 is larger than the 256 tokens of dataset.tokenizer bytes: 50,048 rows of the "
        "embedding and of lm_head are never trained, and cost memory and time; model.vocab_size=256 (its size rounded "
        "up to a multiple of 64) fits it")
    spec = json.loads(bpe_json)  # <|endoftext|> at GPT-2's id: 320 tokens, ids up to 50,256
    spec["added_tokens"][0]["id"] = spec["model"]["vocab"][SEPARATOR_TOKEN] = 50256
    gapped = HFTokenizer(json.dumps(spec), "gap.json")
    with pytest.raises(TokenizerError, match=r"^model.vocab_size 448 is smaller than the 50,257 ids \(320 tokens, the "
                                             r"largest id 50,256\) of dataset.tokenizer gap.json; set model.vocab_size=50304"):
        check_vocab_size(gapped, 448)
    assert check_vocab_size(gapped, 50304) == (
        "note: dataset.tokenizer gap.json has 320 tokens, with ids up to 50,256: the 49,937 ids between that no token "
        "has take rows of the embedding and of lm_head that are never trained, and cost memory and time (renumbering "
        "its tokens closes the gap)")
    both = check_vocab_size(gapped, 100352)  # and rows past its largest id: both said
    assert both.startswith("note: model.vocab_size 100,352 is larger than the 50,257 ids (320 tokens, the largest id "
                           "50,256) of dataset.tokenizer gap.json: 50,095 rows of the embedding") and both.endswith(
        "; dataset.tokenizer gap.json has 320 tokens, with ids up to 50,256: the 49,937 ids between that no token has "
        "take rows of the embedding and of lm_head that are never trained, and cost memory and time (renumbering its "
        "tokens closes the gap)")
    big = HFTokenizer(bpe_json, "tok.json")
    big.vocab_size = big.n_tokens = 3000  # rounded 3008; up to 3,333 is within a tenth
    assert check_vocab_size(big, 3328) is None and check_vocab_size(big, 3392) is not None


def trained(pre_tokenizer, decoder, texts, vocab_size=400) -> HFTokenizer:
    """A BPE of another kind than prepare.py's: SentencePiece-style (Metaspace), or one without a decoder."""
    from tokenizers import Tokenizer, models, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        tok.decoder = decoder
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", SEPARATOR_TOKEN],
                                                       show_progress=False))
    return HFTokenizer(tok.to_str(), "a test tokenizer")


TEXTS = ["def f(x):\n    return x + 1  # one more\n", "and more words, some words\n\nthe end"] * 20


def test_a_tokenizer_that_loses_text_is_warned_of(bpe_file):
    from tokenizers import decoders, pre_tokenizers
    assert lost_text(ByteTokenizer(), TEXTS + ["ünï\x00"]) is None
    assert lost_text(load_tokenizer(str(bpe_file)), TEXTS + ["ünï"]) is None
    assert lost_text(trained(pre_tokenizers.Metaspace(), decoders.Metaspace(), TEXTS), TEXTS) is None
    lossy = trained(pre_tokenizers.Whitespace(), None, TEXTS)  # the tokenizers quicktour's: no decoder
    warning = lost_text(lossy, TEXTS)
    assert warning.startswith("WARNING: dataset.tokenizer a test tokenizer does not give the text back: 'def f(x):")
    assert "comes back as 'def f ( x ):" in warning
    assert warning.endswith("A byte-level BPE (python prepare.py --train-tokenizer) keeps every byte")


def test_a_byte_level_bpe_that_loses_text_is_told_what_to_fix(bpe_file):
    """Built without its decoder ('ĠC it iz en'), or adding a space before each text: the warning names the
    one setting, not 'use a byte-level BPE', which it is."""
    from tokenizers import Tokenizer, pre_tokenizers
    no_decoder, prefixed = Tokenizer.from_file(str(bpe_file)), Tokenizer.from_file(str(bpe_file))
    no_decoder.decoder = None
    prefixed.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=True)])
    assert lost_text(HFTokenizer(no_decoder.to_str(), "t.json"), TEXTS).endswith(
        "It is a byte-level BPE, which keeps every byte once it has a ByteLevel decoder (tokenizer.decoder = "
        "tokenizers.decoders.ByteLevel(), then save it)")
    assert lost_text(HFTokenizer(prefixed.to_str(), "t.json"), TEXTS).endswith(
        "once its ByteLevel pre-tokenizer's add_prefix_space is false (it puts a space before each text)")


def test_a_tokenizer_whose_vocabulary_holds_the_separator_as_text_is_noted(bpe_file, capsys):
    """A Unigram trained with <|endoftext|> as a special token has it in its own vocabulary too: the
    literal text then encodes to the separator, and cuts the document it is in."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(TEXTS, trainers.UnigramTrainer(vocab_size=100, special_tokens=[SEPARATOR_TOKEN, "<unk>"],
                                                           unk_token="<unk>", show_progress=False))
    unigram = HFTokenizer(tok.to_str(), "unigram.json")
    assert unigram.separator in unigram.encode(DOCS[1])
    assert separator_in_text(unigram).startswith("note: dataset.tokenizer unigram.json encodes the text <|endoftext|> "
                                                 "as its document separator (id 0)")
    assert separator_in_text(load_tokenizer(str(bpe_file))) is None and separator_in_text(ByteTokenizer()) is None
    note_prompt_change(unigram, DOCS[1])
    note_prompt_change(load_tokenizer(str(bpe_file)), DOCS[1])
    notes = capsys.readouterr().err.splitlines()  # (and the tiny unigram's lost text)
    assert notes.count("note: the prompt's <|endoftext|> is the model's document separator: the model reads a "
                       "document boundary there") == 1
    note_prompt_change(ByteTokenizer(), "one\0two\0")  # a NUL now and then, or UTF-16 without its byte-order mark
    note_prompt_change(ByteTokenizer(), "R\0O\0M\0E\0O\0:\0")
    note_prompt_change(ByteTokenizer(), "\0R\0O\0M\0E\0O\0:")  # big-endian
    utf16 = ("note: the prompt's 6 NUL characters are the model's document separator: the model reads a document "
             "boundary there; NULs between the characters are what UTF-16 without a byte-order mark reads as: save "
             "the text as UTF-8")
    assert capsys.readouterr().err.splitlines() == [
        "note: the prompt's 2 NUL characters are the model's document separator: the model reads a document boundary "
        "there", utf16, utf16]


def test_bits_per_byte_of_a_sentencepiece_style_tokenizer_count_the_bytes_of_the_text():
    """A Metaspace token's bytes depend on where it stands ('▁' alone decodes to nothing): the
    validation windows are decoded as text, between separators."""
    import torch
    from tokenizers import decoders, pre_tokenizers
    from evaluation import tokens_per_byte
    tokenizer = trained(pre_tokenizers.Metaspace(), decoders.Metaspace(), TEXTS)
    docs = ["some words and more words", "the end of one more"] * 30
    stream = tokenizer.encode_documents(documents(docs))  # each document followed by the separator
    targets = torch.tensor(stream.astype(np.int64)).view(1, -1)
    text_bytes = sum(len(d.encode()) for d in docs) + len(docs)
    assert tokens_per_byte([(None, targets)], tokenizer) == pytest.approx(len(stream) / text_bytes, rel=1e-9)
    alone = sum(len(tokenizer.decode([token]).encode()) for token in stream if token != tokenizer.separator)
    assert alone + len(docs) < 0.9 * text_bytes  # what each token decodes to alone: not the text's bytes



def test_ids_past_uint16_are_kept_whole_in_the_stream():
    """A vocabulary of more than 65,536 ids (Llama 3's 128k, Qwen's 151k) is stored as uint32: in
    uint16 its high ids would wrap to other tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = Tokenizer(models.WordLevel({"[unk]": 0, "low": 1, "high": 65_536, "higher": 100_000}, unk_token="[unk]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.add_special_tokens([SEPARATOR_TOKEN])  # id 4: the next after the model's 4 entries
    tokenizer = tokenizer_from_string(words.to_str())
    stream = tokenizer.encode_documents(documents(["low high higher"]))
    assert stream.dtype == np.uint32 and stream.tolist() == [1, 65_536, 100_000, 4]
    assert tokenizer.vocab_size == 100_001


def test_padding_and_truncation_saved_in_the_file_are_turned_off(bpe_file):
    """A tokenizer.json saved for inference may pad every text to a length, or cut it: either would
    put pad tokens between documents, or drop their ends."""
    from tokenizers import Tokenizer
    saved = Tokenizer.from_file(str(bpe_file))
    saved.enable_padding(length=64, pad_token=SEPARATOR_TOKEN)
    saved.enable_truncation(4)
    padded, plain = tokenizer_from_string(saved.to_str()), load_tokenizer(str(bpe_file))
    assert padded.turned_off == ["truncation", "padding"] and plain.turned_off == []
    assert np.array_equal(padded.encode_documents(documents(DOCS)), plain.encode_documents(documents(DOCS)))
    assert padded.encode(DOCS[0]) == plain.encode(DOCS[0])
    from model import BDHConfig
    from resume_checks import check_same_tokenizer  # a checkpoint of an earlier version kept the padding: the same one
    check_same_tokenizer(saved.to_str(), plain, "ckpt.pt", str(bpe_file), {"vocab_size": 256}, BDHConfig())


def test_text_is_printed_without_the_control_characters_a_terminal_would_act_on(bpe_file):
    """An undertrained model writes escape sequences, bells, shifts of character set: shown, not obeyed."""
    text = "a\x1b[31mb\x07c\x0ed\x9be\tf\r\ng é\x7fh"
    shown = "a\\x1b[31mb\\x07c\\x0ed\\x9be\tf\r\ng é\\x7fh"
    assert load_tokenizer(str(bpe_file)).shown(text) == shown
    assert ByteTokenizer().shown("\x00" + text) == SEPARATOR_TOKEN + shown
    assert printable("\x7f\x80\x9f\xa0") == "\\x7f\\x80\\x9f\xa0"  # DEL and C1 escaped, NBSP kept


def test_a_template_that_adds_tokens_around_each_text_is_left_out_also_of_what_transformers_reads():
    """Training never applies a post-processor's template (Llama's <s>, BERT's [CLS] ... [SEP]); an export
    that kept it would have Transformers put those tokens around every prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, SEPARATOR_TOKEN: 1, "a": 2, "b": 3, "ab": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([SEPARATOR_TOKEN])
    template = processors.TemplateProcessing(single=f"[UNK] $A {SEPARATOR_TOKEN}",
                                             special_tokens=[("[UNK]", 0), (SEPARATOR_TOKEN, 1)])
    for processor, kept in ((template, None), (processors.Sequence([processors.ByteLevel(), template]), "ByteLevel"),
                            (processors.ByteLevel(), "ByteLevel")):
        tok.post_processor = processor
        loaded = HFTokenizer(tok.to_str(), "mine.json")
        assert (json.loads(loaded.to_hf_json())["post_processor"] or {}).get("type") == kept
        exported = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(loaded.to_hf_json()))
        assert exported("a ab")["input_ids"] == loaded.encode("a ab") == [2, 4]


# ---- found by mutating tokenizer.py: the byte alphabet, the uint16 boundary, added tokens' bytes, messages

def test_the_byte_tokens_exported_for_hugging_face_give_every_byte_its_own_id():
    """export.py writes bytes as a byte-level BPE without merges: each of the 256 bytes must keep its id, or
    Transformers drops the bytes its alphabet lacks (0xAE is the second byte of î, ®)."""
    from tokenizers import Tokenizer, pre_tokenizers
    assert sorted(byte_level_alphabet()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    exported = Tokenizer.from_str(ByteTokenizer().to_hf_json())
    every_byte = bytes(range(256)).decode("latin-1")  # (its UTF-8: every byte 0..255 appears)
    for text in ("ünï ® î €", every_byte):
        assert exported.encode(text).ids == list(text.encode())
        assert exported.decode(list(text.encode())) == text


def test_the_byte_tokens_export_is_refused_as_a_training_tokenizer_with_a_way_to_train_on_bytes(tmp_path):
    (tmp_path / "tokenizer.json").write_text(ByteTokenizer().to_hf_json())
    with pytest.raises(TokenizerError, match=r"^dataset.tokenizer: .*tokenizer.json: the byte tokens, as export.py "
                                             r"writes them for Hugging Face; to train on bytes, set "
                                             r"dataset.tokenizer=bytes$"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_byte_documents_of_a_slice_of_a_row_group_are_that_slice():
    """A part of a unit is a slice of its documents' array (an offset into its buffers)."""
    tokenizer = ByteTokenizer()
    stream = tokenizer.encode_documents(documents(["first"] + DOCS)[1:3])
    assert tokenizer.decode(stream) == f"{DOCS[0]}\0{DOCS[1]}\0"


@pytest.mark.parametrize("largest_id,dtype", [(65_535, np.uint16), (65_536, np.uint32)])
def test_ids_past_uint16_are_kept_whole_at_the_boundary(largest_id, dtype):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = Tokenizer(models.WordLevel({"[unk]": 0, "low": 1, "top": largest_id}, unk_token="[unk]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.add_special_tokens([SEPARATOR_TOKEN])
    tokenizer = tokenizer_from_string(words.to_str())
    stream = tokenizer.encode_documents(documents(["low top"]))
    assert tokenizer.vocab_size == largest_id + 1 and stream.dtype == dtype
    assert stream.tolist() == [1, largest_id, tokenizer.separator]


def test_token_bytes_of_an_added_token_are_the_bytes_of_its_text(bpe_json):
    """An added token counts the bytes of its text, whatever characters it has (a space, é)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(bpe_json)
    tok.add_tokens(["<|im start|>", "café"])  # (each letter of café is in the alphabet, as a character, not a byte)
    tokenizer = HFTokenizer(tok.to_str(), "t.json")
    docs = ["a <|im start|> b", "words", "a café"]
    stream = tokenizer.encode_documents(documents(docs))
    assert {tok.token_to_id("<|im start|>"), tok.token_to_id("café")} <= set(stream.tolist())
    assert tokenizer.token_bytes[stream].sum() == sum(len(d.encode()) + 1 for d in docs)


def test_the_separator_decodes_to_its_text(bpe_file):
    """What sample.py prints at a document boundary: the separator's text, not nothing."""
    tokenizer = load_tokenizer(str(bpe_file))
    assert tokenizer.decode([tokenizer.separator]) == SEPARATOR_TOKEN
    assert tokenizer.decode(tokenizer.encode_documents(documents(DOCS[:1]))) == DOCS[0] + SEPARATOR_TOKEN


def test_did_you_mean_bytes_is_said_for_bytes_written_otherwise_only():
    for spec in ("BYTES", " bytes", "Bytes"):
        with pytest.raises(TokenizerError, match=rf"^dataset.tokenizer: {spec} is no file: did you mean bytes\?$"):
            load_tokenizer(spec)
    for spec in ("byt5", "types"):  # a Hub model, a word: not bytes
        with pytest.raises(TokenizerError) as refused:
            load_tokenizer(spec)
        assert "did you mean bytes" not in str(refused.value)


def test_a_tokenizer_that_cannot_be_read_or_has_no_separator_is_named_as_dataset_tokenizer(tmp_path, bpe_json):
    (tmp_path / "a.json").write_text(bpe_json)
    with pytest.raises(TokenizerError, match=r"^dataset.tokenizer: cannot read .*a.json/tokenizer.json \(Not a "
                                             r"directory\); give the path of a tokenizer.json"):
        load_tokenizer(str(tmp_path / "a.json" / "tokenizer.json"))
    (tmp_path / "nosep.json").write_text(bpe_json.replace(SEPARATOR_TOKEN, "<|sep|>"))
    with pytest.raises(TokenizerError, match=r"^dataset.tokenizer: .*nosep.json: the tokenizer has no <\|endoftext\|> "
                                             r"token, which separates documents"):
        load_tokenizer(str(tmp_path / "nosep.json"))
    for local in ("config.yaml", "tiny.yml", "weights.bin"):  # a file's name: no Hub hint
        with pytest.raises(TokenizerError) as refused:
            load_tokenizer(local)
        assert "Hub name" not in str(refused.value)


def test_ids_no_token_has_are_noted_from_a_tenth_of_the_vocabulary(bpe_json):
    tokenizer = HFTokenizer(bpe_json, "tok.json")
    tokenizer.vocab_size, tokenizer.n_tokens = 3000, 2800  # 200 ids without a token: under a tenth, quiet
    assert check_vocab_size(tokenizer, 3008) is None
    tokenizer.n_tokens = 2700  # 300: a tenth
    assert check_vocab_size(tokenizer, 3008).startswith("note: dataset.tokenizer tok.json has 2,700 tokens, with ids "
                                                       "up to 2,999: the 300 ids between")


class Lossy(ByteTokenizer):
    """Bytes that lower-case the text and drop a last line end: a tokenizer that does not give its text back."""
    name = "lossy"

    def encode(self, text):
        return list(text.lower().removesuffix("\n").encode())


def test_the_lost_text_is_shown_around_where_it_first_differs():
    assert text_change(Lossy(), "a" * 100 + "B" + "c" * 100) == f"{'a' * 12 + 'B' + 'c' * 11!r} comes back as " \
                                                                f"{'a' * 12 + 'b' + 'c' * 11!r}"
    assert text_change(Lossy(), "x" * 100 + "\n") == f"{'x' * 12 + chr(10)!r} comes back as {'x' * 12!r}"
    assert text_change(Lossy(), "same") is None


def test_a_short_prompt_with_a_nul_is_not_taken_for_utf16(capsys):
    note_prompt_change(ByteTokenizer(), "a\0")
    assert capsys.readouterr().err == ("note: the prompt's NUL character is the model's document separator: the model "
                                       "reads a document boundary there\n")
