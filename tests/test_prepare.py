import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

import prepare
from config import Config
from conftest import ROOT, write_config, write_parquet
from shards import Holdout, ParquetFileCache, list_units, read_unit_documents
from tokenizer import load_tokenizer


def test_from_text_command_writes_shards_that_read_back_to_the_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("line one\nline two\n" * 20000)
    b.write_text("short file")
    assert prepare.main(["--from-text", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    units = list_units(tmp_path / "out", "text")
    assert len(units) > 1  # long files become several documents and row groups
    cache = ParquetFileCache(2)
    docs = [d.as_py() for u in units
            for d in cache.get(u.path).read_row_group(u.row_group, columns=["text"]).column(0)]
    assert "".join(docs) == a.read_text() + b.read_text()


def test_from_text_cuts_a_short_text_finer_and_says_what_else_it_needs(tmp_path, capsys):
    """Validation holds out whole documents: a short text is cut into MIN_DOCUMENTS of them (no
    smaller than 256 bytes) unless --chunk-bytes says otherwise, and what is still too few is named."""
    notes = tmp_path / "notes.txt"
    notes.write_text("Some notes.\nMore notes here.\n" * 2000)  # 58 KB: 8 documents of about 8 KB
    assert prepare.main(["--from-text", str(notes), "--out", str(tmp_path / "auto")]) == 0
    out = capsys.readouterr().out
    chunk = int(re.fullmatch(rf"wrote 200 documents to {re.escape(str(tmp_path / 'auto'))} \(of about (\d+) bytes, "
                             rf"not 8,192: a text of this size is cut finer, so that validation has documents to hold "
                             rf"out; --chunk-bytes sets the size\)\n", out)[1])
    text = notes.read_bytes()
    assert chunk == prepare.chunk_for([text], 200) and prepare.chunk_for([text], 200, smallest=chunk + 1) is None
    assert prepare.main(["--from-text", str(notes), "--out", str(tmp_path / "asked"), "--chunk-bytes", "8192"]) == 0
    out = capsys.readouterr().out  # the size asked for is kept, and the note says how much finer would do
    finer = re.search(r"wrote 8 documents .*\nnote: .* about 0\.4 of these 8, .*cut the text finer \(--chunk-bytes "
                      r"(\d+)\), or give", out)[1]
    assert prepare.main(["--from-text", str(notes), "--out", str(tmp_path / "cut"), "--chunk-bytes", finer]) == 0
    assert capsys.readouterr().out == f"wrote 100 documents to {tmp_path / 'cut'}\n"
    assert prepare.main(["--from-text", str(notes), "--out", str(tmp_path / "whole"), "--chunk-bytes", "0"]) == 0
    assert f"about 0.1 of these 1, and training needs the rest; cut the text finer (--chunk-bytes {finer}), or " in (
        capsys.readouterr().out)

    notes.write_text("Some notes.\nMore notes here.\n" * 200)  # 5.8 KB: as fine as 256 bytes is still too few
    assert prepare.main(["--from-text", str(notes), "--out", str(tmp_path / "short")]) == 0
    assert capsys.readouterr().out.endswith(
        "of about 256 bytes, not 8,192: a text of this size is cut finer, so that validation has documents to hold out; "
        "--chunk-bytes sets the size)\nnote: validation holds out each document with probability dataset.val_fraction "
        "(default 0.05): about 1.2 of these 23, and training needs the rest; raise dataset.val_fraction (e.g. 0.2), "
        "or give validation a folder of its own (dataset.val_parquet_dir)\n")
    assert prepare.main(["--from-text", str(notes), "--out", str(tmp_path / "one"), "--chunk-bytes", "0"]) == 0
    assert capsys.readouterr().out.endswith("wrote 1 document to " + str(tmp_path / "one") + "\nnote: validation holds "
                                            "out each document with probability dataset.val_fraction (default 0.05): "
                                            "about 0.1 of these 1, and training needs the rest; cut the text finer "
                                            "(--chunk-bytes 256) and raise dataset.val_fraction (e.g. 0.2), or give "
                                            "validation a folder of its own (dataset.val_parquet_dir)\n")
    notes.write_text("hello world\n")  # no cutting helps: too little text, which it says
    assert prepare.main(["--from-text", str(notes), "--out", str(tmp_path / "tiny")]) == 0
    assert capsys.readouterr().out == (f"wrote 1 document to {tmp_path / 'tiny'}\nnote: 12 bytes of text is too little "
                                       f"to train on and hold validation documents out of: give more text (a few "
                                       f"hundred KB for a first model)\n")
    notes.write_text("Some notes.\nMore notes here.\n" * 130)  # 3.8 KB: under 4 KB is too little too
    assert prepare.main(["--from-text", str(notes), "--out", str(tmp_path / "few_kb")]) == 0
    out = capsys.readouterr().out
    assert "note: 3,770 bytes of text is too little to train on" in out and "val_fraction" not in out


def test_from_text_keeps_many_small_files_whole_and_names_one_it_cannot_read(tmp_path, capsys, monkeypatch):
    files = [tmp_path / f"note{k:03d}.txt" for k in range(prepare.MIN_DOCUMENTS)]
    for k, f in enumerate(files):
        f.write_text(f"note {k}\n" * 200)  # 1.6 KB each: 200 documents as they are, enough: none cut
    assert prepare.main(["--from-text", *map(str, files), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == f"wrote 200 documents to {tmp_path / 'out'}\n"
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self.name == "note007.txt" else read_bytes(self))
    assert prepare.main(["--from-text", *map(str, files), "--out", str(tmp_path / "again")]) == 1
    assert capsys.readouterr().err == f"error: {files[7]}: cannot read (Permission denied)\n"


def test_from_text_keeps_documents_of_8_kb_for_a_text_long_enough(tmp_path, capsys, monkeypatch):
    """The size is chosen without reading a long text: 2 x MIN_DOCUMENTS documents of about 8 KB make enough."""
    monkeypatch.setattr(prepare, "MIN_DOCUMENTS", 5)
    monkeypatch.setattr(prepare, "FEW_DOCUMENTS", 5)  # (no note on too few documents either, which reads them)
    long = tmp_path / "long.txt"
    long.write_text("a line of text\n" * 5500)  # 82 KB: 11 documents of 8 KB and a line
    monkeypatch.setattr(prepare, "chunk_for", lambda *a, **k: pytest.fail("read a text long enough"))
    assert prepare.main(["--from-text", str(long), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == f"wrote 11 documents to {tmp_path / 'out'}\n"


def test_from_text_names_a_file_that_is_not_utf8(tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    assert prepare.main(["--from-text", str(latin1), "--out", str(tmp_path / "out")]) == 0
    assert f"note: {latin1} is not UTF-8 (byte 3: b'\\xe9'): its invalid bytes become U+FFFD" in capsys.readouterr().out
    [unit] = list_units(tmp_path / "out", "text")
    assert ParquetFileCache(1).get(unit.path).read().column("text")[0].as_py() == "caf\ufffd cr\ufffdme\n"


def test_from_text_reads_utf16_by_its_byte_order_mark_and_refuses_nul_bytes(tmp_path, capsys):
    notepad = tmp_path / "notes.txt"  # Windows Notepad's "Unicode", PowerShell's >
    notepad.write_bytes("caf\u00e9 cr\u00e8me\n".encode("utf-16"))
    assert prepare.main(["--from-text", str(notepad), "--out", str(tmp_path / "out")]) == 0
    assert f"note: {notepad} is UTF-16 (its byte-order mark says so): converted to UTF-8" in capsys.readouterr().out
    [unit] = list_units(tmp_path / "out", "text")
    assert ParquetFileCache(1).get(unit.path).read().column("text")[0].as_py() == "caf\u00e9 cr\u00e8me\n"
    unmarked = tmp_path / "unmarked.txt"  # NUL would read as the byte tokenizer's document separator
    unmarked.write_bytes("plain text\n".encode("utf-16-le"))
    assert prepare.main(["--from-text", str(notepad), str(unmarked), "--out", str(tmp_path / "out2")]) == 1
    assert capsys.readouterr().err == (f"error: {unmarked}: not text (a NUL byte at byte 1: binary data, or UTF-16 without "
                                       f"a byte-order mark); leave it out, or convert it to UTF-8 first (Windows' UTF-16: "
                                       f"iconv -f utf-16le -t utf-8)\n")
    assert not (tmp_path / "out2").exists()


def test_train_tokenizer_command_learns_from_the_training_split_only(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus)
    out = tmp_path / "tok" / "tokenizer.json"
    assert prepare.main(["--train-tokenizer", "--vocab-size", "300", "--out", str(out), "--config", str(config),
                         "training.seed=1337", "model.vocab_size=1024"]) == 0
    printed = capsys.readouterr().out
    assert "read " in printed and "(100%)" in printed  # the progress line
    # the command to train with it keeps the overrides that chose the data, and replaces the vocabulary's
    assert f"python train.py --config {config} training.seed=1337 dataset.tokenizer={out} model.vocab_size=320\n" in printed
    assert "would stop" not in printed
    assert prepare.main(["--train-tokenizer", "--vocab-size", "300", "--out", str(tmp_path / "e.json"), "--config",
                         str(config), "training.eval_iters=1000"]) == 0
    assert "fewer than training.eval_iters" not in capsys.readouterr().out  # (the training run's to say)
    assert prepare.main(["--train-tokenizer", "--vocab-size", "300", "--out", str(tmp_path / "long.json"), "--config",
                         str(config), "training.block_size=4096"]) == 0  # windows longer than the validation text
    assert re.search(r"model.vocab_size=320\nnote: that run would stop before its first step: .* the validation split "
                     r"\(val_fraction 0.2\) holds [0-9,]+ tokens, less than one batch: 4 windows of 4097 tokens, "
                     r"each sharing one with the next, 16,385 in all; lower",
                     capsys.readouterr().out)
    tokenizer = load_tokenizer(str(out))
    assert tokenizer.vocab_size == 300 and tokenizer.decode(tokenizer.encode("<01-002>abc")) == "<01-002>abc"
    cfg = Config.from_yaml(config)
    units = list_units(corpus, "text")
    heads = {text[:8] for text in prepare.training_texts(cfg, units)}
    cache = ParquetFileCache(8)
    train_heads = {doc[:8].decode() for unit in units
                   for docs in read_unit_documents(cache, unit, "text", "train", Holdout(0.2, 1337))
                   for doc in docs.to_pylist()}
    assert heads == train_heads and len(heads) < 120


def test_train_tokenizer_checks_out_before_training_and_never_overwrites_unasked(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus)
    command = ["--train-tokenizer", "--vocab-size", "300", "--config", str(config), "--out"]
    assert prepare.main([*command, str(tmp_path)]) == 1
    assert f"--out {tmp_path}: is a folder; give a file name in it" in capsys.readouterr().err
    assert prepare.main([*command, f"{tmp_path / 'new'}/"]) == 1  # written as a folder: not a file named so
    assert f"--out {tmp_path / 'new'}/: is a folder; give a file name in it" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "tokenizer.json"
    existing.write_text("a tokenizer some run uses")
    assert prepare.main([*command, str(existing)]) == 1
    printed = capsys.readouterr()
    assert "exists already" in printed.err and "--replace to overwrite it" in printed.err
    assert "training a" not in printed.out and existing.read_text() == "a tokenizer some run uses"
    assert prepare.main([*command, str(existing), "--replace"]) == 0
    assert load_tokenizer(str(existing)).vocab_size == 300


def test_train_tokenizer_refuses_text_too_short_for_a_merge(tmp_path, capsys):
    write_parquet(tmp_path / "data" / "a.parquet", [None, "", "a"])
    config = write_config(tmp_path, tmp_path / "data", dataset={"val_fraction": 0.01})
    assert prepare.main(["--train-tokenizer", "--out", str(tmp_path / "t.json"), "--config", str(config)]) == 1
    assert "holds too little text to learn a single merge" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("vocab_size", ["257", "-5", "100000000", "18446744073709551616"])
def test_train_tokenizer_refuses_a_vocabulary_without_merges_or_past_any_in_use(tmp_path, capsys, vocab_size):
    """Too large, a typo of a few zeros: the tokenizers library would allocate for it and abort."""
    with pytest.raises(SystemExit):
        prepare.main(["--train-tokenizer", "--vocab-size", vocab_size, "--out", str(tmp_path / "t.json")])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: --vocab-size must be from 258 (256 bytes, <|endoftext|> and a merge) to 1,048,576 (the "
        f"largest vocabularies in use have about 256k tokens), got {int(vocab_size):,}")


@pytest.mark.parametrize("arguments, error", [
    (["--train-tokenizer", "--from-text", "a.txt", "--out", "t.json"], "--from-text and --train-tokenizer are two steps"),
    (["--vocab-size", "300", "--out", "t.json"], "give --from-text FILE ... --out DIR, --from-parquet SHARDS --out "
                                                  "DIR, or --train-tokenizer --out FILE.json (--vocab-size trains a "
                                                  "tokenizer: add --train-tokenizer)"),
    ([str(ROOT / "MODEL.md"), "--out", "x"], "give --from-text FILE ... --out DIR, --from-parquet SHARDS --out DIR, "
                                             "or --train-tokenizer --out FILE.json (did you mean --from-text "
                                             f"{ROOT / 'MODEL.md'}?)"),
    (["--train-tokenizer"], "--out is required: the tokenizer.json to write"),
    (["--from-text", "a.txt"], "--out is required: the folder of the shards to write"),
    (["--from-text", "a.txt", "--out", "x", "--chunk-bytes", "-1"], "--chunk-bytes must be >= 0 (0: one document per "
                                                                    "file), got -1"),
    (["--from-parquet", "a", "--out", "x", "dataset.text_column="],
     "--from-parquet takes no config or vocabulary, and of the overrides only dataset.text_column=NAME (got "
     "dataset.text_column=)")])
def test_usage_errors_say_what_is_wrong(tmp_path, capsys, arguments, error):
    with pytest.raises(SystemExit):
        prepare.main(arguments)
    assert capsys.readouterr().err.splitlines()[-1].partition(" error: ")[2].startswith(error)


def test_from_text_refuses_a_folder_with_shards_unless_told_to_replace(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("first version\n" * 100)
    out = tmp_path / "out"
    assert prepare.main(["--from-text", str(text), "--out", str(out)]) == 0
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    text.write_text("second\n")
    assert prepare.main(["--from-text", str(text), "--out", str(out)]) == 1
    assert (f"the folder holds files already; choose another --out, or add --replace to replace them; or, to add "
            f"these documents to the shards there (the same text column), write them into a new subfolder: --out "
            f"{out / 'more'}\n") in capsys.readouterr().err
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    assert prepare.main(["--from-text", str(text), "--out", str(out / "more")]) == 0  # read with the others
    assert {Path(u.path).parent.name for u in list_units(out, "text")} == {"out", "more"}
    assert prepare.main(["--from-text", str(text), "--out", str(out)]) == 1  # the next: another subfolder
    assert capsys.readouterr().err.endswith(f"write them into a new subfolder: --out {out / 'more_2'}\n")
    (out / "notes.txt").write_text("not a shard")
    assert prepare.main(["--from-text", str(text), "--out", str(out)]) == 1
    assert "subfolder" not in capsys.readouterr().err
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "more")
    (tmp_path / "afile").write_text("x")
    assert prepare.main(["--from-text", str(text), "--out", str(tmp_path / "afile")]) == 1
    assert "subfolder" not in capsys.readouterr().err
    assert prepare.main(["--from-text", str(text), "--out", str(out), "--replace"]) == 0
    docs = [d for u in list_units(out, "text")
            for d in ParquetFileCache(1).get(u.path).read_row_group(u.row_group).column(0).to_pylist()]
    assert docs == ["second\n"] and not [p for p in tmp_path.iterdir() if ".tmp" in p.name or ".old" in p.name]


def test_from_text_replace_keeps_an_input_file_in_the_out_folder_and_refuses_empty_input(tmp_path, capsys):
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "corpus.txt").write_text("some text\n")
    for replace, said in (([], "the folder holds corpus.txt already; move it out"),  # (no --replace suggested)
                          (["--replace"], "--replace replaces only what this command writes, and the folder also "
                                          "holds corpus.txt; move it out")):
        assert prepare.main(["--from-text", str(folder / "corpus.txt"), "--out", str(folder), *replace]) == 1
        assert said in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["corpus.txt"]
    (tmp_path / "empty.txt").write_text("")
    assert prepare.main(["--from-text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out")]) == 1
    assert f"{tmp_path / 'empty.txt'}: no text (empty files); nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arguments,message", [
    (["--from-text", "a.txt", "--out", "o", "--chunk-bytes", "-5"], "--chunk-bytes must be >= 0"),
    (["--train-tokenizer", "--out", "t.json", "--chunk-bytes", "100"], "--chunk-bytes applies to --from-text only"),
    (["--from-text", "a.txt", "--out", "o", "--vocab-size", "999", "--config", "my.yaml"],
     "--from-text takes no config, vocabulary or overrides (got --config --vocab-size): they are for --train-tokenizer"),
    (["--from-text", "a.txt", "--out", "o", "training.seed=3"], "(got training.seed=3)"),
    (["--out", "o", "--from-text", "a.txt", "training.seed=3"], "(got training.seed=3)"),
    (["--from-parquet", "d", "--out", "o", "training.seed=3"], "--from-parquet takes no config or vocabulary, and of "
                                                               "the overrides only dataset.text_column=NAME (got "
                                                               "training.seed=3)"),
    (["--from-parquet", "d", "--out", "o", "--chunk-bytes", "100"], "--chunk-bytes applies to --from-text only"),
    (["--from-parquet", "d", "--out", "o", "dataset.text_colum=content"],
     "dataset.text_colum=content: did you mean dataset.text_column=content?"),
    (["--from-parquet", "d", "--out", "o", "text_column=content"], "text_column=content: did you mean "
                                                                   "dataset.text_column=content?"),
    (["--from-parquet", "d", "--from-text", "a.txt", "--out", "o"], "give --from-text or --from-parquet, not both"),
    (["--from-parquet", "d", "--train-tokenizer", "--out", "o"], "--from-parquet and --train-tokenizer are two steps"),
])
def test_prepare_command_refuses_arguments_it_would_ignore_or_misread(arguments, message, capsys):
    with pytest.raises(SystemExit) as stop:
        prepare.main(arguments)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_from_text_on_a_missing_file_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    assert prepare.main(["--from-text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.txt'}: does not exist\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_from_text_on_a_pattern_that_matched_nothing_says_so(tmp_path, capsys):
    assert prepare.main(["--from-text", str(tmp_path / "*.md"), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / '*.md'}: no file matches this pattern; check its folder "
                                       f"and extension\n")


def test_from_text_on_a_folder_says_to_give_its_files(tmp_path, capsys):
    """With patterns that name all of them, subfolders and other suffixes too (hidden files left out)."""
    books = tmp_path / "books"
    (books / "old").mkdir(parents=True)
    for name in ("a.txt", "b.md", "old/c.txt", ".DS_Store"):
        (books / name).write_text("text")
    assert prepare.main(["--from-text", str(books), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (f"error: {books}: a folder; give the text files in it, e.g. {books / '*.md'} "
                                       f"{books / '*.txt'} {books / 'old' / '*.txt'}\n")
    (tmp_path / "empty").mkdir()
    assert prepare.main(["--from-text", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'empty'}: a folder; give the text files in it (it holds none)\n"


def test_from_text_refuses_parquet_and_zip_files_by_their_first_bytes(tmp_path, capsys):
    import torch
    shard = tmp_path / "train.parquet"
    write_parquet(shard, ["some text"])
    renamed = tmp_path / "train.txt"  # the content counts, not the name
    renamed.write_bytes(shard.read_bytes())
    torch.save({"weights": torch.zeros(2)}, tmp_path / "ckpt.pt")  # a zip archive
    arrow = tmp_path / "wikitext-train.arrow"  # a Hugging Face datasets cache file: an Arrow IPC stream
    with pa.ipc.new_stream(arrow, pa.schema({"text": pa.string()})) as stream:
        stream.write_table(pa.table({"text": ["some text"]}))
    for f, message in [
        (shard, f"{shard}: a parquet file, not text; no conversion needed: train on it with "
                f"dataset.parquet_dir={shard} (or its folder)"),
        (renamed, f"{renamed}: a parquet file, not text; no conversion needed: rename it to end in .parquet and point "
                  f"dataset.parquet_dir at it (or its folder)"),
        (tmp_path / "ckpt.pt", f"{tmp_path / 'ckpt.pt'}: a zip archive (a .pt checkpoint is one), not text; leave it "
                               f"out, or unzip it and give the text files in it"),
        (arrow, f"{arrow}: an Arrow file (Hugging Face datasets' save_to_disk or cache), neither text nor parquet: write "
                f"it as parquet, `python -c \"import datasets, os; os.makedirs('{tmp_path}_parquet', exist_ok=True); "
                f"datasets.Dataset.from_file('{arrow}').to_parquet('{tmp_path}_parquet/wikitext-train.parquet')\"` (so "
                f"each .arrow file), and set dataset.parquet_dir={tmp_path}_parquet")]:
        assert prepare.main(["--from-text", str(f), "--out", str(tmp_path / "out")]) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_from_text_refuses_a_pipe_whose_first_bytes_its_check_would_take(tmp_path):
    """<(cat book.txt): the check of the first bytes read them from the pipe, and the book was written without them."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # (no writer: opening it waits for one, so a process with a timeout)
    ended = subprocess.run([sys.executable, "prepare.py", "--from-text", str(fifo), "--out", str(tmp_path / "out")],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (ended.returncode, ended.stderr) == (1, f"error: {fifo}: not a file but a pipe or a device (<(command) in "
                                                   f"the shell gives one); prepare.py reads each file twice: write it "
                                                   f"to a file first and give that file\n")
    assert not (tmp_path / "out").exists()


def test_an_out_inside_a_folder_of_shards_is_noted(tmp_path, capsys):
    """Training on that folder reads the new shards with the old ones (its subfolders are read too):
    a mix on purpose, or the same text twice."""
    write_parquet(tmp_path / "data" / "old.parquet", ["some text"])
    (tmp_path / "book.txt").write_text("a book\n" * 1000)
    write_parquet(tmp_path / "raw" / "new.parquet", ["more text"])
    for k, mode in enumerate((["--from-text", str(tmp_path / "book.txt")], ["--from-parquet", str(tmp_path / "raw")])):
        out = tmp_path / "data" / ("more" if k else "") / str(k)  # right inside the folder, and deeper
        assert prepare.main([*mode, "--out", str(out)]) == 0
        assert (f"\nnote: {tmp_path / 'data'} holds parquet shards too: training on it reads these with them; "
                f"dataset.parquet_dir={out} reads these alone\n") in capsys.readouterr().out
    assert prepare.main(["--from-text", str(tmp_path / "book.txt"), "--out", str(tmp_path / "book")]) == 0
    assert "holds parquet shards too" not in capsys.readouterr().out


def test_from_text_refuses_a_file_given_twice(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "b.txt").write_text("more text\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "a.txt")
    for twice, message in [(["a.txt", "b.txt", "a.txt"], "a.txt: given twice; give each file once"),
                           (["a.txt", "./a.txt"], "./a.txt: given twice (also as a.txt); give each file once"),
                           (["link.txt", "b.txt", "a.txt"],
                            "a.txt: given twice (also as link.txt); give each file once")]:
        assert prepare.main(["--from-text", *twice, "--out", "out"]) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_data_py_run_as_a_command_points_at_prepare_py():
    r = subprocess.run([sys.executable, "data.py", "--from-text", "notes.txt", "--out", "data/notes"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "the data commands are in prepare.py" in r.stderr


def test_from_parquet_writes_a_large_row_group_again_in_small_ones_with_every_document(tmp_path, capsys):
    """A file written in one row group (pandas' to_parquet) is read in its order; written again in
    small row groups, training shuffles them together."""
    docs = [f"document {i}: " + "text " * (i % 50) for i in range(2000)] + [None, ""]
    source = tmp_path / "raw" / "one.parquet"
    source.parent.mkdir()
    pa_table = pa.table({"id": list(range(len(docs))), "content": docs})
    import pyarrow.parquet as pq
    pq.write_table(pa_table, source)  # one row group
    out = tmp_path / "small"
    assert prepare.main(["--from-parquet", str(source.parent), str(source), "--out", str(out),
                         "dataset.text_column=content"]) == 0  # (the file given twice: read once)
    said = capsys.readouterr().out
    assert said.startswith("rewriting 1 row group of 1 file")
    assert f"train on them with dataset.parquet_dir={out} dataset.text_column=content" in said
    assert said.endswith("\nnote: 2 of the 2,002 rows had no text (null or empty) and were left out, as training "
                         "leaves them out\n")
    units = list_units(out, "content")
    assert len(units) > 50 and pq.read_schema(units[0].path).names == ["content"]
    read = [d.decode() for u in units for part in read_unit_documents(ParquetFileCache(1), u, "content", "all",
                                                                      Holdout(0, 0))
            for d in part.to_pylist()]
    assert read == docs[:-2]  # every document, in order; null and empty ones are skipped, as training does
    # row groups sized by the text read, not by the metadata (a dictionary counts each repeated text once)
    repeated = pa.array([f"{i % 3} " + "words " * 40 for i in range(20_000)]).dictionary_encode()
    write_parquet(tmp_path / "dict" / "d.parquet", repeated, rows_per_group=20_000)
    assert prepare.main(["--from-parquet", str(tmp_path / "dict"), "--out", str(tmp_path / "dict_small")]) == 0
    assert "(4.6 MB of text)" in capsys.readouterr().out
    assert 60 <= len(list_units(tmp_path / "dict_small", "text")) <= 70
    write_parquet(tmp_path / "blank" / "b.parquet", [None, ""], rows_per_group=2)
    assert prepare.main(["--from-parquet", str(tmp_path / "blank"), "--out", str(tmp_path / "none")]) == 1
    assert "no documents (every 'text' is null or empty); nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def values_in(folder, column="text") -> list:
    return [value for unit in list_units(folder, column)
            for value in ParquetFileCache(1).get(unit.path).read_row_group(unit.row_group).column(0).to_pylist()]


def test_from_parquet_refuses_an_out_that_overlaps_its_shards_and_keeps_bytes_that_are_not_utf8(tmp_path, capsys):
    raw = [b"caf\xe9", b"ok", "é".encode()]
    source = write_parquet(tmp_path / "raw" / "a.parquet", raw, rows_per_group=3, type_=pa.binary())
    before = source.read_bytes()
    for linked in ("elsewhere", "empty"):  # training on raw reads what is written there
        (tmp_path / linked).mkdir()
        (tmp_path / "raw" / linked).symlink_to(tmp_path / linked)
    write_parquet(tmp_path / "elsewhere" / "b.parquet", [b"more"], type_=pa.binary())
    write_parquet(tmp_path / "nested" / "sub" / "c.parquet", ["text"])
    (tmp_path / "link").symlink_to(tmp_path / "raw")
    nested = ["--from-parquet", f"{tmp_path}/nested/**/*.parquet", "--out", str(tmp_path / "nested" / "x")]
    assert prepare.main(nested) == 1  # a pattern's folder holds no file itself: still the data's
    for given, out, replace in ((source.parent, tmp_path / "raw" / "small", []),  # training on raw would read both
                                (source, tmp_path / "raw" / "small", []),
                                (f"{tmp_path}/raw/*.parquet", tmp_path / "raw" / "small", []),
                                (source.parent, tmp_path / "elsewhere" / "small", []),
                                (source.parent, tmp_path / "raw" / "empty" / "small", []),
                                (source.parent, tmp_path / "link" / "small", []),  # raw/small by another name
                                (source.parent, tmp_path, []), (source.parent, tmp_path, ["--replace"]),  # holds raw
                                (source, tmp_path / "raw", ["--replace"])):  # would delete a.parquet
        assert prepare.main(["--from-parquet", str(given), "--out", str(out), *replace]) == 1
        assert "overlaps the shards it is written from" in capsys.readouterr().err
        assert sorted(p.name for p in source.parent.iterdir()) == ["a.parquet", "elsewhere", "empty"], (given, out)
        assert source.read_bytes() == before and not any((tmp_path / "empty").iterdir())
    assert prepare.main(["--from-parquet", str(source), "--out", str(tmp_path / "small")]) == 0
    assert "(8 bytes of text, as bytes: a file holds them so)" in capsys.readouterr().out
    assert values_in(tmp_path / "small") == raw  # bytes stay bytes, as training reads them
    # text written without checking (a string column that is not UTF-8): U+FFFD, counted
    write_parquet(tmp_path / "loose" / "c.parquet", pa.array(raw, pa.binary()).view(pa.string()))
    assert prepare.main(["--from-parquet", str(tmp_path / "loose"), "--out", str(tmp_path / "small2")]) == 0
    assert "note: 1 document was not UTF-8: its invalid bytes became U+FFFD" in capsys.readouterr().out
    assert values_in(tmp_path / "small2") == ["caf\ufffd", "ok", "é"]


def test_from_parquet_refuses_a_folder_that_mixes_a_held_out_split_with_the_training_one(tmp_path, capsys):
    write_parquet(tmp_path / "hf" / "train-00000-of-00001.parquet", ["training text"] * 8)
    write_parquet(tmp_path / "hf" / "validation-00000-of-00001.parquet", ["held-out text"] * 2)
    assert prepare.main(["--from-parquet", str(tmp_path / "hf"), "--out", str(tmp_path / "small")]) == 1
    assert (f"the shards written would hold them all, held-out ones too; give --from-parquet "
            f"'{tmp_path}/hf/train*.parquet' and write '{tmp_path}/hf/validation*.parquet' into another --out, for "
            f"dataset.val_parquet_dir; to write every file anyway: --from-parquet '{tmp_path}/hf/**/*.parquet'"
            ) in capsys.readouterr().err
    assert prepare.main(["--from-parquet", f"{tmp_path}/hf/train*.parquet", "--out", str(tmp_path / "small")]) == 0


def test_from_parquet_on_a_text_file_says_it_needs_no_rewrite(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("some text\n")
    assert prepare.main(["--from-parquet", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "x")]) == 1
    out = tmp_path / "notes_parquet"
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'notes.txt'}: given to --from-parquet, it is a file, not a folder of .parquet shards; "
        f"give their folder, a .parquet file or a glob pattern; to train on this file's text: `python prepare.py "
        f"--from-text {tmp_path / 'notes.txt'} --out {out}` and train with dataset.parquet_dir={out} (its row groups "
        f"are small already)\n")


@pytest.mark.parametrize("column", [pa.array([b"caf\xe9", b"ok"], pa.large_binary()),
                                    pa.array([b"caf\xe9", b"ok", b"caf\xe9"], pa.binary()).dictionary_encode()])
def test_from_parquet_keeps_bytes_of_every_binary_kind_as_bytes(tmp_path, capsys, column):
    write_parquet(tmp_path / "raw" / "a.parquet", column)
    out = tmp_path / "small"
    assert prepare.main(["--from-parquet", str(tmp_path / "raw"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "as bytes: a file holds them so" in printed and values_in(out) == column.to_pylist()
    assert f"train on them with dataset.parquet_dir={out}\n" in printed  # (text_column: the default, not named)


def test_from_parquet_replace_rewrites_an_earlier_rewrite(tmp_path, capsys):
    write_parquet(tmp_path / "raw" / "a.parquet", ["first"])
    out = tmp_path / "small"
    assert prepare.main(["--from-parquet", str(tmp_path / "raw"), "--out", str(out)]) == 0
    write_parquet(tmp_path / "raw" / "a.parquet", ["second"])
    assert prepare.main(["--from-parquet", str(tmp_path / "raw"), "--out", str(out)]) == 1
    assert "add --replace to replace them" in capsys.readouterr().err and values_in(out) == ["first"]
    assert prepare.main(["--from-parquet", str(tmp_path / "raw"), "--out", str(out), "--replace"]) == 0
    assert values_in(out) == ["second"]


def test_train_tokenizer_says_what_it_could_not_learn_and_prints_a_command_with_the_new_tokenizer(tmp_path, corpus,
                                                                                                  capsys):
    config = write_config(tmp_path, corpus)
    out = tmp_path / "t.json"
    assert prepare.main(["--train-tokenizer", "--vocab-size", "100000", "--out", str(out), "--config", str(config),
                         "dataset.tokenizer=bytes"]) == 0
    printed = capsys.readouterr().out
    size = load_tokenizer(str(out)).vocab_size
    assert size < 100_000 and (f"note: the training text yields only {size - 257:,} merges, so the vocabulary has "
                               f"{size:,} tokens, fewer than --vocab-size 100,000\n") in printed
    command = re.search(r"python (.*train\.py.*)\n", printed)[1]  # with the new tokenizer, not the one given
    assert "dataset.tokenizer=bytes" not in command and f"dataset.tokenizer={out} model.vocab_size=" in command


def test_train_tokenizer_that_cannot_be_written_is_one_line(tmp_path, corpus, capsys, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(prepare, "atomic_write", disk_full)
    out = tmp_path / "t.json"
    assert prepare.main(["--train-tokenizer", "--vocab-size", "300", "--out", str(out), "--config",
                         str(write_config(tmp_path, corpus))]) == 1
    assert capsys.readouterr().err == f"error: --out {out}: cannot write (No space left on device)\n"


def test_train_tokenizer_defaults_to_4096_tokens_from_config_yaml_and_takes_up_to_the_largest_vocabulary(
        tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(prepare, "load_config", lambda args: args.config)
    monkeypatch.setattr(prepare, "train_tokenizer", lambda config, vocab_size, out, arguments, replace: seen.append(
        (config, vocab_size, arguments)) or "trained")
    assert prepare.main(["--train-tokenizer", "--out", str(tmp_path / "t.json")]) == 0
    assert prepare.main(["--train-tokenizer", "--out", str(tmp_path / "t.json"), "--vocab-size",
                         str(prepare.MAX_VOCAB_SIZE)]) == 0
    assert seen == [("config.yaml", 4096, ["--config", "config.yaml"]),
                    ("config.yaml", prepare.MAX_VOCAB_SIZE, ["--config", "config.yaml"])]
