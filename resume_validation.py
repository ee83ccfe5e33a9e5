"""Whether a resume's validation losses compare with its run's: the validation documents a resume
keeps (an old run's split, keep_split_by_position), and the changes that make it measure other
documents, batches or weights (validation_change, short_batch_added, evaluated_weights), after which
best.pt starts afresh. resume.py and train.py call these.
"""
import json
from pathlib import Path

from checkpoint import is_export, peek_checkpoint
from config_file import config_value, with_split_settings
from evaluation import validation_fingerprint
from locate import resumable_in, resumable_runs
from resume_checks import same_setting, written_before


def keep_split_by_position(cfg, command_line: dict, ranks, device):
    """Before the data is read: a resume (or a fine-tune) of a run that held its validation documents
    out by their place in the shards, as every run begun before dataset.split_by (0.5.0) did, goes
    on doing so unless the command line gives split_by: held out by their text, some documents it
    trained on would be measured. Every rank takes part, and decides as the others."""
    spec, dataset = cfg.training.resume_from_checkpoint, cfg.dataset
    if not spec or "dataset.split_by" in command_line["settings"] or dataset.val_parquet_dir:
        return
    found = run_split(spec, cfg.training.checkpoint_dir)
    by_position = found is not None and found[1] == "position" and dataset.split_by != "position"
    if not ranks.any(by_position, device):
        return
    if ranks.main and found is not None:
        print(f"note: the run of {found[0]} held its validation documents out by their place in the shards (file, "
              f"row group, row), as every run did before version 0.5.0: so does this one, dataset.split_by=position, "
              f"keeping out of validation the documents it trained on (new runs hold documents out by their text, "
              f"which renaming, moving or rewriting the shards does not change)")
    dataset.split_by = "position"


def run_split(spec: str, checkpoint_dir: str) -> tuple[Path, str | None] | None:
    """(the checkpoint that a resume from `spec` reads, as open_checkpoint takes them: the first that
    can be read (its checksums are not checked here); or the export folder; the dataset.split_by its
    run held out validation documents by, None with a val_parquet_dir), or None where there is none."""
    path = Path(spec)
    if is_export(path) and not resumable_in(path):
        try:
            export = json.loads((path / "config.json").read_text())["bdh_export"]
            return path, export.get("split_by", "position")  # (not recorded before 0.5.0)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # (resume.py says what is wrong)
            return None
    candidates = (resumable_runs(Path(checkpoint_dir)) if spec == "latest" else
                  resumable_in(path) if path.is_dir() else [path])
    for candidate in candidates:
        if saved := peek_checkpoint(candidate):
            dataset = with_split_settings(saved.get("config") or {}).get("dataset")
            if not isinstance(dataset, dict):
                return None
            return candidate, None if dataset.get("val_parquet_dir") else dataset.get("split_by")
    return None


VALIDATION_BATCHES = ("training.batch_size", "training.block_size", "training.eval_iters")  # what they measure


def validation_change(saved: dict, now: dict, saved_shards: str | None = None, shards: str | None = None,
                      saved_batches: str | None = None, batches: str | None = None) -> str | None:
    """A warning if the validation documents or batches differ from those of the checkpoint's run
    (configs `saved` and `now`); None if they are the same. Without val_parquet_dir they are a share of
    parquet_dir's documents drawn from split_seed: another split_seed, val_fraction or split_by holds out documents
    the run has trained on. `saved_shards` and `shards`: the fingerprints of parquet_dir's shards
    (data_order), which decide whether it holds the same documents wherever it is. `saved_batches`
    and `batches`: the fingerprints of the validation batches themselves (evaluation.validation_fingerprint),
    which decide, where both are known; the settings then only say why."""
    if saved_batches and batches and saved_batches == batches:
        return None  # the very same batches, wherever their files are now
    def same(path):
        if path == "dataset.parquet_dir" and saved_shards and shards:
            return saved_shards == shards
        return same_setting(path, config_value(saved, path), config_value(now, path))
    by_fraction = not config_value(now, "dataset.val_parquet_dir")
    held_out = ["dataset.val_parquet_dir"] + (["dataset.val_fraction", "dataset.split_seed", "dataset.split_by"]
                                              if by_fraction else [])
    read_from = ["dataset.text_column"] + ["dataset.parquet_dir"] * by_fraction
    documents = [path for path in held_out + read_from if not same(path)]
    shapes = [path for path in VALIDATION_BATCHES if not same(path)]  # the first eval_iters batches of that shape
    if not documents and not shapes:
        if not (saved_batches and batches):
            return None
        documents = ["dataset.parquet_dir" if by_fraction else "dataset.val_parquet_dir"]  # rewritten in place
    before, after = ({path: config_value(config, path) for path in documents + shapes} for config in (saved, now))
    what = "; ".join(f"{path} {after[path]!r}: its shards changed" if before[path] == after[path]
                     else f"{path}: {before[path]!r} -> {after[path]!r}" for path in documents + shapes)
    changes = "documents" if documents else "batches"
    if by_fraction and documents and not set(read_from) & set(documents):  # the same documents, held out anew
        keep = " ".join(f"{path}={config_value(saved, path)}" for path in documents)
        return (f"WARNING: the validation {changes} change on this resume ({what}): some of those held out now may have "
                f"been trained on, so the validation loss may read low from here, and best.pt starts afresh; keep "
                f"{keep} to keep the same ones")
    if by_fraction and documents and config_value(now, "dataset.split_by") == "position":  # other shards: re-drawn
        return (f"WARNING: the validation {changes} change on this resume ({what}): held out by their place in the "
                f"shards (dataset.split_by=position, as runs before 0.5.0), some of those held out now may have been "
                f"trained on, so the validation loss may read low from here, and best.pt starts afresh (a new run "
                f"holds documents out by their text, which survives renamed, moved or rewritten shards)")
    if by_fraction and documents == ["dataset.parquet_dir"]:  # held out by their text: none trained on
        return (f"WARNING: the validation batches change on this resume ({what}): no document trained on is held out "
                f"now (documents are held out by their text), but the batches are taken from the shards as they are "
                f"now, so losses from here on are not comparable with the earlier ones, and best.pt starts afresh")
    return (f"WARNING: the validation {changes} change on this resume ({what}): losses from here on are not "
            f"comparable with the earlier ones, and best.pt starts afresh")


def evaluated_weights(low_precision: dict) -> str:
    """What a validation loss measures: the weights as trained, or their 4-bit round trip."""
    if not low_precision["use_4bit"]:
        return "as trained"
    return f"4-bit {low_precision['quantization_type']}, double quant {low_precision['use_double_quant']}"


def short_batch_added(ckpt, val_batches: list) -> str | None:
    """A note where the checkpoint's version (before 0.4.13) measured the same validation batches but
    the short last one: validation text that ran out before eval_iters batches lost its last windows."""
    last = len(val_batches[-1][0])
    if (not written_before(ckpt, (0, 4, 13)) or last == len(val_batches[0][0])
            or ckpt.validation_batches != validation_fingerprint(val_batches[:-1])):
        return None
    return (f"note: the validation loss now measures the validation text to its last window, {last} "
            f"window{'s' * (last != 1)} more than the checkpoint's version did (a short last batch): best.pt starts "
            f"afresh")
