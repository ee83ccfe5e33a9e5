"""Tokenizers: bytes and a Hugging Face tokenizer.json (a byte-level BPE trained here)."""
import pickle

import numpy as np
import pyarrow as pa
import pytest

from tokenizer import (SEPARATOR_TOKEN, ByteTokenizer, HFTokenizer, TokenizerError, check_vocab_size,
                       load_tokenizer, tokenizer_from_string)

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


def test_bad_tokenizer_files_are_one_line_errors(tmp_path, bpe_json):
    with pytest.raises(TokenizerError, match=r"^dataset.tokenizer: cannot read .*nope.json \(No such file"):
        load_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"bad.json: not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    without = bpe_json.replace(SEPARATOR_TOKEN, "<|sep|>")
    (tmp_path / "nosep.json").write_text(without)
    with pytest.raises(TokenizerError, match=r"nosep.json: the tokenizer has no <\|endoftext\|> token"):
        load_tokenizer(str(tmp_path / "nosep.json"))
    with pytest.raises(TokenizerError) as info:
        check_vocab_size(HFTokenizer(bpe_json, "tok.json"), 256)
    assert str(info.value) == ("model.vocab_size 256 is smaller than the 320 tokens of dataset.tokenizer tok.json; "
                               "set model.vocab_size=320 (its size rounded up to a multiple of 64)")
    check_vocab_size(HFTokenizer(bpe_json, "tok.json"), 384)
