"""Whether a resume's validation losses compare with its run's: the documents, batches and weights they
measure. (The split an old run's resume keeps, end to end: test_resume.py.)"""
from pathlib import Path

import resume_validation
from config import Config
from distributed import Ranks
from resume_validation import evaluated_weights, keep_split_by_position, run_split, validation_change

BY_TEXT = {"training": {"seed": 1}, "dataset": {"parquet_dir": "d", "val_parquet_dir": None, "val_fraction": 0.05,
                                                "split_seed": 1, "split_by": "text"}}


def test_a_resume_that_changes_the_validation_documents_says_so():
    by_fraction = {"training": {"seed": 1}, "dataset": {"parquet_dir": "d", "val_parquet_dir": None, "val_fraction": 0.05,
                                                        "split_seed": 1}}
    assert validation_change(by_fraction, by_fraction) is None
    assert validation_change(by_fraction, {**by_fraction, "training": {"seed": 1, "learning_rate": 0.1}}) is None
    assert validation_change({**by_fraction, "training": {"seed": 1, "batch_size": 8}},
                             {**by_fraction, "training": {"seed": 1, "batch_size": 16}}) == (
        "WARNING: the validation batches change on this resume (training.batch_size: 8 -> 16): losses from here on "
        "are not comparable with the earlier ones, and best.pt starts afresh")
    assert validation_change(by_fraction, {**by_fraction, "training": {"seed": 5}}) is None  # a seed sweep's
    resplit = {**by_fraction, "dataset": {**by_fraction["dataset"], "split_seed": 5}}
    assert validation_change(by_fraction, resplit) == (
        "WARNING: the validation documents change on this resume (dataset.split_seed: 1 -> 5): some of those held out "
        "now may have been trained on, so the validation loss may read low from here, and best.pt starts afresh; keep "
        "dataset.split_seed=1 to keep the same ones")
    folder = {"training": {"seed": 1}, "dataset": {"parquet_dir": "d", "val_parquet_dir": "v", "val_fraction": 0.05}}
    assert validation_change(folder, {**folder, "dataset": {**folder["dataset"], "split_seed": 5}}) is None  # nothing split
    assert "may have been trained on" in validation_change(folder, by_fraction)  # training read all of d
    assert validation_change(by_fraction, {**by_fraction, "dataset": {**by_fraction["dataset"], "parquet_dir": "e"}}) \
        .endswith("losses from here on are not comparable with the earlier ones, and best.pt starts afresh")
    more_training_data = {**folder, "dataset": {**folder["dataset"], "parquet_dir": "d_more"}}
    assert validation_change(folder, more_training_data, "shards", "more shards") is None  # validation is v's
    moved = {**by_fraction, "dataset": {**by_fraction["dataset"], "parquet_dir": "elsewhere/d"}}
    assert validation_change(by_fraction, moved, "shards", "shards") is None  # the same shards, moved
    assert validation_change(by_fraction, moved, "shards", "other shards") == (  # (split by text: none trained on)
        "WARNING: the validation batches change on this resume (dataset.parquet_dir: 'd' -> 'elsewhere/d'): no "
        "document trained on is held out now (documents are held out by their text), but the batches "
        "are taken from the shards as they are now, so losses from here on are not comparable with the earlier ones, "
        "and best.pt starts afresh")
    written_otherwise = {**folder, "dataset": {**folder["dataset"], "val_parquet_dir": "./v/"}}
    assert validation_change(folder, written_otherwise) is None
    # the batches' own fingerprints decide where both are known; the settings say why
    moved_folder = {**folder, "dataset": {**folder["dataset"], "val_parquet_dir": "elsewhere/v"}}
    assert validation_change(folder, moved_folder, saved_batches="b", batches="b") is None
    assert validation_change(folder, moved_folder, saved_batches="b", batches="other b") is not None
    assert validation_change(folder, folder, saved_batches="b", batches="other b") == (
        "WARNING: the validation documents change on this resume (dataset.val_parquet_dir 'v': its shards changed): "
        "losses from here on are not comparable with the earlier ones, and best.pt starts afresh")
    assert validation_change(folder, folder, saved_batches=None, batches="b") is None  # a checkpoint before 0.4.4
    for config in (folder, by_fraction):  # other texts of the same rows
        other_column = {**config, "dataset": {**config["dataset"], "text_column": "content"}}
        assert validation_change(config, other_column) == (
            "WARNING: the validation documents change on this resume (dataset.text_column: None -> 'content'): "
            "losses from here on are not comparable with the earlier ones, and best.pt starts afresh")


def test_what_a_validation_loss_measured_tells_every_4bit_setting_apart():
    """A resume that changes any of them restarts best.pt: the losses measure other weights."""
    plain = {"use_4bit": False, "quantization_type": "nf4", "use_double_quant": True}
    assert evaluated_weights(plain) == evaluated_weights({**plain, "use_double_quant": False}) == "as trained"
    four_bit = {**plain, "use_4bit": True}
    assert len({evaluated_weights(four_bit), evaluated_weights({**four_bit, "use_double_quant": False}),
                evaluated_weights({**four_bit, "quantization_type": "fp4"}), "as trained"}) == 4


def test_what_a_changed_split_by_text_or_by_position_tells():
    rewritten = validation_change(BY_TEXT, BY_TEXT, saved_batches="b", batches="other b")  # the shards, in place
    assert rewritten == (
        "WARNING: the validation batches change on this resume (dataset.parquet_dir 'd': its shards changed): no "
        "document trained on is held out now (documents are held out by their text), but the batches are taken from "
        "the shards as they are now, so losses from here on are not comparable with the earlier ones, and best.pt "
        "starts afresh")
    by_position = {**BY_TEXT, "dataset": {**BY_TEXT["dataset"], "split_by": "position", "parquet_dir": "e"}}
    assert "held out by their place in the shards (dataset.split_by=position" in validation_change(BY_TEXT, by_position)
    other_text = {**BY_TEXT, "dataset": {**BY_TEXT["dataset"], "parquet_dir": "e", "text_column": "content"}}
    warning = validation_change(BY_TEXT, other_text)  # other documents: whether trained on is not known
    assert "no document trained on" not in warning and warning.endswith(
        "not comparable with the earlier ones, and best.pt starts afresh")


def test_only_a_split_of_parquet_dir_by_position_is_kept(tmp_path, monkeypatch, capsys):
    """A run that held out by place keeps doing so, but not where validation has a folder of its own
    (then, or now), nor with a note where the config says position already."""
    monkeypatch.setattr(resume_validation, "peek_checkpoint",
                        lambda path: {"config": {"dataset": {"val_parquet_dir": "v", "split_by": "position"}}})
    assert run_split(str(tmp_path / "checkpoint_2.pt"), str(tmp_path)) == (tmp_path / "checkpoint_2.pt", None)
    monkeypatch.setattr(resume_validation, "run_split", lambda spec, folder: (Path(spec), "position"))
    for dataset in ({"val_parquet_dir": "v"}, {"split_by": "position"}, {}):
        cfg = Config.from_dict({"training": {"resume_from_checkpoint": "old.pt"}, "dataset": dataset})
        keep_split_by_position(cfg, {"settings": {}}, Ranks(), None)
        assert cfg.dataset.split_by == ("text" if dataset.get("val_parquet_dir") else "position")
        assert ("held its validation documents out by their place" in capsys.readouterr().out) == (not dataset)
