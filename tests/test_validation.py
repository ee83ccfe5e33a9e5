import re

import pytest
import torch

import data
from config import Config
from conftest import make_corpus, write_parquet
from shards import DataError, ParquetFileCache, Unit, list_units
from tokenizer import ByteTokenizer
from validation import unmeasured_validation, validation_batches

BYTES = ByteTokenizer()


def test_a_validation_share_far_larger_than_what_is_measured_is_noted_where_the_run_reads_the_rest():
    units = [Unit("a.parquet", i, 1000, 100 << 20, 0, 100 << 20) for i in range(10)]  # 1,000 MB of text
    val_batches = [(None, torch.zeros(32, 64))] * 20  # 40 KB measured (bytes: a token a byte); 50 MB held out
    cfg = Config.from_dict({"training": {"max_iters": 500_000, "batch_size": 32, "block_size": 64}})  # 1.03 passes
    assert unmeasured_validation(cfg, units, val_batches, 1.0, 1) == (
        "note: validation holds out about 50.0 MB of the text (dataset.val_fraction 0.05) and its evaluations measure "
        "40 KB of it, while training plans 1.0 passes over the rest: dataset.val_fraction=0.003 would train on about "
        "47.0 MB more (set it for a new run: it changes which documents are held out)")
    assert unmeasured_validation(cfg, units, val_batches, 1.0, 2) is not None  # 2 processes: 2 passes
    fewer_steps = Config.from_dict({"training": {"max_iters": 400_000, "batch_size": 32, "block_size": 64}})
    assert unmeasured_validation(fewer_steps, units, val_batches, 1.0, 1) is None  # the rest is not all read
    assert unmeasured_validation(cfg, units, val_batches * 2, 1.0, 1) is None  # 625 times what is measured
    own_folder = Config.from_dict({"training": {"max_iters": 500_000}, "dataset": {"val_parquet_dir": "val"}})
    assert unmeasured_validation(own_folder, units, val_batches, 1.0, 1) is None


def test_a_column_without_documents_says_so(tmp_path):
    write_parquet(tmp_path / "d" / "a.parquet", [None, "", None, ""] * 10, 4)
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(tmp_path / "d")}, "training": {"block_size": 8}})
    with pytest.raises(DataError, match=r"column 'text' holds no documents: every row of the 1 file\(s\) is null or empty"):
        validation_batches(cfg, list_units(tmp_path / "d", "text"), BYTES)
    write_parquet(tmp_path / "e" / "a.parquet", [f"short text {i}" for i in range(40)], 4)
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(tmp_path / "e")}, "training": {"block_size": 4096}})
    with pytest.raises(DataError, match=r"lower training.block_size or training.batch_size, or raise dataset.val_fraction"):
        validation_batches(cfg, list_units(tmp_path / "e", "text"), BYTES)
    write_parquet(tmp_path / "f" / "a.parquet", [f"a whole book {i} " * 5000 for i in range(3)], 4)  # few, long ones
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(tmp_path / "f"), "val_fraction": 1e-6}})
    with pytest.raises(DataError, match=r"none of its 3 documents went to validation \(each goes with probability "
                                        r"dataset.val_fraction 1e-06\); cut the text into more documents \(python "
                                        r"prepare.py --from-text ... with a smaller --chunk-bytes\), raise dataset.val_fraction,"):
        validation_batches(cfg, list_units(tmp_path / "f", "text"), BYTES)
    write_parquet(tmp_path / "r" / "a.parquet", ["a line", "", "another line", "a line"] * 1000, 4)  # copies of 2 texts
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(tmp_path / "r"), "val_fraction": 0.01}})
    with pytest.raises(DataError, match=r"none of its 3,000 documents went to validation: they hold 2 distinct texts, "
                                        r"and the copies of a text fall on one side of the split \(dataset.split_by "
                                        r"text: .*\); add documents of other texts, raise dataset.val_fraction, or set "
                                        r"dataset.val_parquet_dir$"):
        validation_batches(cfg, list_units(tmp_path / "r", "text"), BYTES)
    write_parquet(tmp_path / "g" / "a.parquet", ["one small text file, cut into one document " * 50], 4)
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(tmp_path / "g")}, "training": {"seed": 0}})
    with pytest.raises(DataError, match=r"none of its 1 document went to validation .*--chunk-bytes\), or set "
                                        r"dataset.val_parquet_dir$"):  # a higher val_fraction cannot split 1 document
        validation_batches(cfg, list_units(tmp_path / "g", "text"), BYTES)


def test_a_validation_folder_is_read_whole_and_training_reads_all_of_the_training_folder(tmp_path, capsys):
    train_dir, val_dir = make_corpus(tmp_path / "train", n_files=2), tmp_path / "val"
    write_parquet(val_dir / "v.parquet", [f"<90-{r:03d}>" + "zyxwvutsrq" * 4 for r in range(12)], 4)
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(train_dir), "val_parquet_dir": str(val_dir)},
                            "training": {"block_size": 16, "batch_size": 2, "eval_iters": 1000}})
    units = list_units(train_dir, "text")
    validation = validation_batches(cfg, units, BYTES)
    assert f"fill {len(validation)} batches, fewer than training.eval_iters 1000" in capsys.readouterr().out
    seen = b"".join(bytes(x.flatten().tolist()) for x, _ in validation)  # consecutive windows: the stream
    assert set(re.findall(rb"<\d\d-\d\d\d>", seen)) <= {f"<90-{r:03d}>".encode() for r in range(12)}
    assert len(set(re.findall(rb"<90-\d\d\d>", seen))) >= 11  # all of it but the tail short of a batch
    assert data.training_split(cfg) == "all"  # no document of parquet_dir is held back for validation
    loader = data.train_loader(cfg, units, BYTES, 0).dataset
    trained = sum(x.numel() for x, _, _ in loader.epoch_batches(ParquetFileCache(4), 0, 1, 0))
    everything = sum(len(part) for unit in units for part in data.read_unit_tokens(
        ParquetFileCache(4), unit, "text", "all", None, BYTES))
    assert everything - 3 * 16 < trained <= everything


def test_validation_is_taken_across_its_files_not_from_the_first(tmp_path, corpus):
    val_dir = tmp_path / "val"
    for f in range(5):  # a file each of code, of one language, ...: the first alone does not stand for them
        write_parquet(val_dir / f"{f}.parquet", [f"<{f:02d}-{r:03d}>" + "abcdefghij" * 20 for r in range(40)], 40)
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(corpus), "val_parquet_dir": str(val_dir)},
                            "training": {"block_size": 16, "batch_size": 3, "eval_iters": 4}})
    units = list_units(corpus, "text")
    validation = validation_batches(cfg, units, BYTES)
    assert len(validation) == 4 and all(x.shape == (3, 16) for x, _ in validation)
    files = [{int(f) for f in re.findall(rb"<(\d\d)-", bytes(x.flatten().tolist()))} for x, _ in validation]
    assert files == [{0}, {1}, {2}, {3}]  # the start of each of 4 stretches: files 0, 1, 2, and 3-4
    write_parquet(val_dir / "5.parquet", ["tiny"])  # short of a window: the others give more
    write_parquet(val_dir / "6.parquet", ["tiny"])
    cfg.training.eval_iters = 6
    files = [{int(f) for f in re.findall(rb"<(\d\d)-", bytes(x.flatten().tolist()))}
             for x, _ in validation_batches(cfg, units, BYTES)]
    assert len(files) == 6 and set.union(*files) == {0, 1, 2, 3, 4}


def test_validation_that_some_files_lack_is_made_up_by_the_others_all_of_them(tmp_path, corpus):
    val_dir = tmp_path / "val"
    write_parquet(val_dir / "00.parquet", ["tiny"])  # no window: the 19 others give one more each, then the
    for f in range(1, 20):  # surplus goes from the fullest, not from the last files
        write_parquet(val_dir / f"{f:02d}.parquet", [f"<{f:02d}-{r:03d}>" + "abcdefghij" * 5 for r in range(4)], 4)
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(corpus), "val_parquet_dir": str(val_dir)},
                            "training": {"block_size": 16, "batch_size": 1, "eval_iters": 20}})
    validation = validation_batches(cfg, list_units(corpus, "text"), BYTES)
    assert len(validation) == 20
    assert {int(f) for x, _ in validation for f in re.findall(rb"<(\d\d)-", bytes(x.flatten().tolist()))} == set(
        range(1, 20))


def test_a_seed_sweep_measures_every_run_on_the_same_validation_documents(corpus):
    """training.seed draws weights, dropout and the order; which documents are held out is split_seed's."""
    def validation(seed: int, split_seed: int = 1337):
        cfg = Config.from_dict({"dataset": {"parquet_dir": str(corpus), "split_seed": split_seed},
                                "training": {"block_size": 16, "batch_size": 2, "eval_iters": 4, "seed": seed}})
        return [x.tolist() for x, _ in validation_batches(cfg, list_units(corpus, "text"), BYTES)]
    assert validation(seed=1) == validation(seed=2) != validation(seed=1, split_seed=2)


def test_validation_documents_too_short_for_a_window_each_are_read_as_one_stream(tmp_path, corpus):
    """A validation document or two per row group, each shorter than a window: joined, as one stream."""
    val_dir = tmp_path / "val"
    for f in range(8):
        write_parquet(val_dir / f"{f}.parquet", [f"<{f:02d}>" + "x" * 6])
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(corpus), "val_parquet_dir": str(val_dir)},
                            "training": {"block_size": 16, "batch_size": 2, "eval_iters": 8}})
    validation = validation_batches(cfg, list_units(corpus, "text"), BYTES)
    assert [len(x) for x, _ in validation] == [2, 2, 1]  # 8 x 11 bytes: 5 windows of 16 (none from any one file)
    for f in range(8):  # as many windows either way (two files of 21 bytes, 17 wanted): each file's first is measured
        (val_dir / f"{f}.parquet").unlink()
    for f in range(2):
        write_parquet(val_dir / f"{f}.parquet", [f"<{f:02d}>" + "q" * 16])
    cfg.training.batch_size, cfg.training.eval_iters = 1, 3
    validation = validation_batches(cfg, list_units(corpus, "text"), BYTES, note_few=False)
    assert [bytes(x.flatten().tolist())[:4] for x, _ in validation] == [b"<00>", b"<01>"]


def test_a_validation_folder_is_named_in_its_errors(tmp_path):
    train_dir = make_corpus(tmp_path / "train", n_files=2)
    raw = {"dataset": {"parquet_dir": str(train_dir), "val_parquet_dir": str(tmp_path / "nope")}}
    with pytest.raises(DataError, match=r"nope: dataset.val_parquet_dir does not exist"):
        validation_batches(Config.from_dict(raw), list_units(train_dir, "text"), BYTES)


def test_a_validation_folder_that_holds_training_files_is_refused(tmp_path):
    train_dir = make_corpus(tmp_path / "train", n_files=2)
    units = list_units(train_dir, "text")
    (tmp_path / "link").symlink_to(train_dir)
    for val in (train_dir, sorted(train_dir.glob("*.parquet"))[1], tmp_path / "link"):
        cfg = Config.from_dict({"dataset": {"parquet_dir": str(train_dir), "val_parquet_dir": str(val)}})
        with pytest.raises(DataError, match=r"^dataset.val_parquet_dir: \d of its \d file\(s\) are training files too "
                                            r".*: validation would measure documents the model trains on"):
            validation_batches(cfg, units, BYTES)
    (tmp_path / "train_link").symlink_to(train_dir)  # training through a link, validation the folder itself
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(tmp_path / "train_link"),
                                        "val_parquet_dir": str(train_dir)}})
    with pytest.raises(DataError, match="are training files too"):
        validation_batches(cfg, list_units(tmp_path / "train_link", "text"), BYTES)


def test_validation_text_that_runs_out_is_measured_to_its_last_window(tmp_path, corpus, capsys):
    val_dir = tmp_path / "val"
    write_parquet(val_dir / "v.parquet", [f"<{r:02d}>" + "y" * 11 for r in range(8)])  # 8 x 16 bytes: 7 windows
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(corpus), "val_parquet_dir": str(val_dir)},
                            "training": {"block_size": 16, "batch_size": 3, "eval_iters": 20}})
    validation = validation_batches(cfg, list_units(corpus, "text"), BYTES)
    assert [len(x) for x, _ in validation] == [3, 3, 1]  # the seventh window too, in a short batch
    assert set(re.findall(rb"<(\d\d)>", b"".join(bytes(x.flatten().tolist()) for x, _ in validation))) == {
        f"{r:02d}".encode() for r in range(7)}
    assert (f"of {val_dir} fill 2 batches and 1 window, fewer than training.eval_iters 20: every evaluation "
            f"measures all of them\n") in capsys.readouterr().out
    cfg.training.batch_size = 8  # less than one batch: refused
    with pytest.raises(DataError, match=r"the validation documents hold 128 tokens, less than one batch"):
        validation_batches(cfg, list_units(corpus, "text"), BYTES)


def test_validation_stretches_cover_all_its_files_when_they_outnumber_eval_iters(tmp_path, corpus):
    val_dir = tmp_path / "val"
    for f in range(8):  # 8 files, 4 batches: stretches of files 0-1, 2-3, 4-5, 6-7
        write_parquet(val_dir / f"{f}.parquet", [f"<{f:02d}-{r:03d}>" + "abcdefghij" * 20 for r in range(40)], 40)
    cfg = Config.from_dict({"dataset": {"parquet_dir": str(corpus), "val_parquet_dir": str(val_dir)},
                            "training": {"block_size": 16, "batch_size": 3, "eval_iters": 4}})
    files = [{int(f) for f in re.findall(rb"<(\d\d)-", bytes(x.flatten().tolist()))}
             for x, _ in validation_batches(cfg, list_units(corpus, "text"), BYTES)]
    assert files == [{0}, {2}, {4}, {6}]
