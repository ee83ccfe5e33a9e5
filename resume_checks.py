"""What a resume compares: the checkpoint's model, tokenizer and data against the command's settings
(refused where they would continue another run, or train weights of another shape), and the changes it
takes but says (the learning-rate schedule, the tokens of a step; what validation measures is
resume_validation.py's). resume.py calls these; train.py calls data_settings_hint where the data does not
match the settings.
"""
import math
import os
import shlex
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from checkpoint import Checkpoint, CheckpointError, peek_checkpoint
from config import Config, learning_rate, step_tokens
from config_file import ConfigError, config_value, with_split_settings
from layout import PATTERN_CHARACTERS
from locate import checkpoint_candidates, continues_in_place, found_newest
from model import BDHConfig
from positions import SHARDS
from tokenizer import TokenizerError, load_tokenizer, tokenizer_from_string


def check_same_data(ckpt, dataset, shards_now: str, batches_now: str, command_line, path, named: bool):
    """A resume that continues a run in its own directory reads the run's training data, unless the
    command line gives other data: a setting the run was started with on the command line, left out
    of the resume command, would continue the run on the config file's data (and prune the
    checkpoints of the run as it was). A run found by `latest` or `auto` (not `named`) is never
    continued on other data: the newest run in checkpoint_dir may be another experiment's. The same
    holds for its validation documents (check_same_split), unless the validation batches are the very
    same (`batches_now`, their fingerprint: a folder moved, say)."""
    saved = ckpt.config.get("dataset", {})
    if ckpt.validation_batches != batches_now:
        check_same_split(saved, dataset, command_line, path, named, seed_split=written_before(ckpt, (0, 4, 6)))
    for key in ("parquet_dir", "text_column"):
        now, before, setting = getattr(dataset, key), saved.get(key, getattr(dataset, key)), f"dataset.{key}"
        same_shards = (key == "parquet_dir" and shards_now is not None  # (moved, say; None: not read yet)
                       and (ckpt.data_order or {}).get(SHARDS) == shards_now)
        if same_setting(setting, before, now) or same_shards or (named and setting in command_line):
            continue
        raise CheckpointError(
            f"{path}: the run trained on {setting} {before!r}, and this command reads {now!r}: a resume "
            f"continues on the run's data: add {override(setting, before)} ({given_then(ckpt, setting)}), or, to "
            f"train {'this run ' * (not named)}on {now!r} from here, "
            f"{give_it(named)}: {command_line_for(setting, now, path, named)}")


def check_run_given_again(cfg, path, ckpt, shards: str | None, val_fingerprint: str | None, command_line: dict):
    """A resume that continues its run: the run's settings it leaves out (check_given_again) and its
    data (check_same_data), refused in one line. `shards`, `val_fingerprint`: the data's now (None:
    not read yet)."""
    named = not found_newest(cfg.training)
    problems = []
    for check in (lambda: check_given_again(ckpt, cfg.to_dict(), command_line, path),
                  lambda: check_same_data(ckpt, cfg.dataset, shards, val_fingerprint, command_line["settings"], path,
                                          named)):
        try:
            check()
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        later = [problem.removeprefix(f"{path}: ") for problem in problems[1:]]
        raise CheckpointError("; and ".join([problems[0], *later]))


def check_run_data_given(cfg, command_line: dict):
    """Before the data is read: a resume that continues its run but reads another dataset.parquet_dir
    than the run's, not given on the command line, for a folder that does not exist, is refused at
    once, with the run's other settings it leaves out: not told to create the folder, nor the built-in
    corpus built there. (A folder that exists may hold the run's very shards, moved: check_same_data.)"""
    parquet_dir = cfg.dataset.parquet_dir
    if (not cfg.training.resume_from_checkpoint or "dataset.parquet_dir" in command_line["settings"]
            or os.path.exists(parquet_dir) or any(c in parquet_dir for c in PATTERN_CHARACTERS)
            or (found := resumed_checkpoint(cfg)) is None):
        return
    path, saved = found
    before = config_value(saved.get("config", {}), "dataset.parquet_dir")
    if (before is None or same_setting("dataset.parquet_dir", before, parquet_dir)
            or not continues_run(path, saved.get("step", math.inf), saved.get("config", {}), cfg.training.max_iters)):
        return
    ckpt = Checkpoint.from_dict(saved)
    try:  # (the split is not compared: the validation batches are not read yet)
        check_run_given_again(cfg, path, ckpt, None, ckpt.validation_batches, command_line)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{found_as_newest(cfg) * (cfg.training.resume_from_checkpoint == 'latest')}") \
            from None


def given_then(ckpt, setting: str) -> str:
    """Where the run's value of a setting came from, as far as its checkpoint says."""
    if not ckpt.command_line:  # (written before 0.4.7)
        return "was it given on the command line when the run started?"
    if setting in ckpt.command_line.get("settings", {}):
        return "the run was given it on its command line"
    return "the run's config file had it"


# the settings a resume gives again (check_given_again): those that change what a run trains (its steps, their
# numbers, what validation measures), and keep_last_n, whose change deletes checkpoints for good; the data's are
# check_same_data's and check_same_tokenizer's
GIVEN_AGAIN = ("model.", "low_precision.", "fp8.", "training.block_size", "training.batch_size",
               "training.gradient_accumulation_steps", "training.max_iters", "training.learning_rate",
               "training.min_lr", "training.warmup_iters", "training.weight_decay", "training.grad_clip",
               "training.seed", "training.eval_iters", "training.keep_last_n")


def command_line_record(config_path: str, overrides) -> dict:
    """What a checkpoint keeps of the command line that trained it (check_given_again): its config
    file, and the settings it gave with that file's value of each (config None: the file alone is
    not a valid config, its values unknown)."""
    names = [item.partition("=")[0] for item in overrides if item.partition("=")[0] != "training.resume_from_checkpoint"]
    try:
        in_file, config = Config.from_yaml(config_path).to_dict(), str(Path(config_path).resolve())
    except ConfigError:
        in_file, config = {}, None
    return {"config": config, "settings": {name: config_value(in_file, name) for name in names}}


def carried_forward(ckpt, config: dict, command_line: dict) -> dict:
    """The record a resumed run's next checkpoints keep: this command line's, and those settings of
    the run's record that this one leaves out while the config still gives the run's value (a resume
    with the run's own config.yaml), so that a later resume is still checked for them."""
    kept = {name: config_value(config, name) for name in ckpt.command_line.get("settings", {})
            if name not in command_line["settings"]
            and same_setting(name, config_value(ckpt.config, name), config_value(config, name))}
    return {**command_line, "settings": {**kept, **command_line["settings"]}}


def check_given_again(ckpt, config: dict, command_line: dict, path):
    """A resume that continues a run in its own directory gives again the settings of GIVEN_AGAIN
    that the run's last command line gave (ckpt.command_line; `command_line`: this one's, both
    command_line_record's) where the config has other values: left out, they would change the run
    silently (a batch size, a schedule). Where the same config file then had another value, it was
    edited since: a change, taken as one. So is a max_iters that extends a finished run. Settings of
    how it runs (logging, devices, workers) may go back to the config file's."""
    given_then = ckpt.command_line.get("settings", {})  # name -> the config file's value then
    same_file = ckpt.command_line.get("config") not in (None, "") and ckpt.command_line["config"] == command_line["config"]
    finished = ckpt.step >= (config_value(ckpt.config, "training.max_iters") or 0)
    left_out = [name for name, in_file_then in given_then.items()
                if name not in command_line["settings"] and name.startswith(GIVEN_AGAIN)
                and not same_setting(name, config_value(ckpt.config, name), config_value(config, name))
                and not (same_file and not same_setting(name, in_file_then, config_value(config, name)))
                and not (finished and name == "training.max_iters")]
    if not left_out:
        return
    them = "them" if len(left_out) > 1 else "it"
    shape = [name for name in left_out if name.startswith("model.") and name != "model.dropout"]
    values = "values" if len(left_out) > 1 else "value"
    change = (f", or give the new {values} on the command line to change {them}" if not shape else
              f" (the model's shape cannot change{'; the others can, given anew' * (len(shape) < len(left_out))})")
    given = " ".join(override(name, config_value(ckpt.config, name)) for name in left_out)
    in_file = ", ".join(repr(config_value(config, name)) for name in left_out)
    raise CheckpointError(
        f"{path}: the run was given {given} on its command line, and this command leaves {them} out (the config file "
        f"has {in_file}): add {them} to resume the run as it was{change}")


def check_same_split(saved: dict, dataset, command_line, path, named: bool, seed_split: bool):
    """The same for the validation documents: a run keeps a val_parquet_dir (another folder: the
    validation batches decide, validation_change warns), or its split_seed, val_fraction and split_by,
    unless the command line that names the run gives others. `seed_split`: a checkpoint of 0.4.5 and
    older, whose training.seed drew its split."""
    keys = ["val_parquet_dir"] + ["split_seed", "val_fraction", "split_by"] * (not saved.get("val_parquet_dir")
                                                                                and not dataset.val_parquet_dir)
    for key in keys:
        before, now, setting = saved.get(key, getattr(dataset, key)), getattr(dataset, key), f"dataset.{key}"
        folder_to_folder = key == "val_parquet_dir" and (before is None) == (now is None)
        if folder_to_folder or same_setting(setting, before, now) or (named and setting in command_line):
            continue
        was = "its training.seed drew them, as up to version 0.4.5; " * (key == "split_seed" and seed_split)
        raise CheckpointError(
            f"{path}: the run held out its validation documents by {setting} {before!r} ({was}this command has "
            f"{'none' if now is None else repr(now)}): add {override(setting, before)} to keep them, or, to measure "
            f"{'this run ' * (not named)}on others from here, {give_it(named)}: "
            f"{command_line_for(setting, now, path, named)}")


def override(setting: str, value) -> str:
    """`setting`=`value` as the command line reads it back (None: null)."""
    written = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    return shlex.quote(f"{setting}={written}")


def command_line_for(setting: str, value, path, named: bool) -> str:
    """The overrides that give `setting` another value on a resume of the run of checkpoint `path`:
    naming the run is what lets them continue it (a run found by latest or auto may be another's)."""
    given = override(setting, value)
    return given if named else f"{override('training.resume_from_checkpoint', path.parent)} {given}"


def give_it(named: bool) -> str:
    """How command_line_for's overrides are given: a run found by latest or auto must be named."""
    return "give that on the command line" if named else "name the run on the command line with it"


def written_before(ckpt, version: tuple) -> bool:
    """Whether the project version that wrote a checkpoint is older than `version`."""
    written = ckpt.versions.get("project", "0")
    return tuple(int(part) for part in written.split(".") if part.isdigit()) < version


def check_same_model(saved_config: dict, model_config: BDHConfig, path):
    """Refuses weights of another model shape (dropout may differ: it is not a shape)."""
    differing = {k: v for k, v in asdict(model_config).items() if k != "dropout" and saved_config.get(k) != v}
    if differing:
        matching = " ".join(override(f"model.{k}", saved_config.get(k)) for k in differing)
        differences = "; ".join(f"{k}: checkpoint {saved_config.get(k)!r}, config {v!r}" for k, v in differing.items())
        raise CheckpointError(f"{path}: the checkpoint is from a different model shape; add {matching} to match it, "
                              f"or start a new run. Differences: {differences}")


SCHEDULE = ("max_iters", "warmup_iters", "learning_rate", "min_lr")  # the settings of learning_rate()


def schedule_jump(ckpt, training) -> str | None:
    """A note when the learning rate of the next step differs from the checkpoint's schedule: a
    finished run extended with more max_iters goes back up the cosine."""
    step, saved = ckpt.step + 1, saved_training(ckpt, training)
    before, now = learning_rate(step, saved), learning_rate(step, training)
    if math.isclose(before, now, rel_tol=0.01):
        return None
    changed = ", ".join(f"{name} {getattr(saved, name)} -> {getattr(training, name)}" for name in SCHEDULE
                        if getattr(saved, name) != getattr(training, name))
    return (f"  note: the learning-rate schedule changed ({changed}): step {step} runs at lr {now:.2e}, where the "
            f"checkpoint's schedule had {before:.2e}"
            + ("; the loss may rise for a while after this jump up" if now > 1.1 * before else ""))


def tokens_before(ckpt, training) -> int:
    """The tokens trained on up to a checkpoint written before they were counted (version 0.4.0):
    its steps times its own tokens per step, as far as it recorded them."""
    return ckpt.step * step_tokens(saved_training(ckpt, training), max(1, len(ckpt.rng)))


def global_batch_change(ckpt, training, world_size: int) -> str:
    """On another number of processes: how the tokens of a step change, and the batch_size and
    gradient_accumulation_steps that keep them (batch_size no larger than now: its memory), or else
    come nearest (within 1% of the nearest, the largest batch_size: fewer micro-batches)."""
    # (a checkpoint without random states, written by hand from other weights: taken as one process's)
    before, now = step_tokens(saved_training(ckpt, training), max(1, len(ckpt.rng))), step_tokens(training, world_size)
    if before == now:
        return ""
    row = now // (training.batch_size * training.gradient_accumulation_steps)  # one window on every process
    candidates = [(size, max(1, math.floor(before / (size * row) + 0.5))) for size in range(1, training.batch_size + 1)]
    error = {(size, steps): abs(size * steps * row - before) / before for size, steps in candidates}
    slack = 0.01 if min(error.values()) > 0 else 0  # (where some keep them exactly: one of those)
    size, steps = max((c for c in candidates if error[c] <= min(error.values()) + slack), key=lambda c: c[0])
    accumulation = training.gradient_accumulation_steps
    keeping = " ".join([f"training.batch_size={size}"] * (size != training.batch_size)
                       + [f"training.gradient_accumulation_steps={steps}"] * (steps != accumulation))
    if error[size, steps] == 0:
        keep = f"; {keeping} keeps {before:,}"
    else:
        processes = f"{world_size} process{'es' * (world_size != 1)}"
        keep = (f"; no whole batch_size and gradient_accumulation_steps keep {before:,} on {processes}"
                + (f" ({keeping} gives {size * steps * row:,})" if keeping else ""))
    return f", and a step trains on {now:,} tokens where it trained on {before:,}{keep}"


def saved_training(ckpt, training):
    """The checkpoint's training settings (this run's where it recorded none)."""
    return SimpleNamespace(**{**asdict(training), **ckpt.config.get("training", {})})


def check_same_tokenizer(saved: str, tokenizer, path, saved_setting, saved_model: dict, model_config):
    """Refuses another tokenizer than the one the weights were trained with, naming the settings
    to give: `saved_setting`, the tokenizer file it came from, if that file still holds it; its
    vocab_size if that differs too."""
    saved = tokenizer_from_string(saved).to_str()  # as loaded now (a tokenizer.json's padding turned off)
    if saved == tokenizer.to_str():
        return
    trained_with = "bytes" if saved == "bytes" else "another tokenizer.json"
    written_out = saved != "bytes" and not holds_tokenizer(saved_setting, saved)
    file = "DIR/tokenizer.json" if written_out else saved_setting
    fix = ["dataset.tokenizer=" + ("bytes" if saved == "bytes" else file)]
    if saved_model.get("vocab_size") != model_config.vocab_size:
        fix.append(f"model.vocab_size={saved_model.get('vocab_size')}")
    how = (f", DIR being where `python export.py --checkpoint {path} --out DIR` writes the one the checkpoint "
           f"carries ({saved_setting} no longer holds it)" if written_out else "")
    raise CheckpointError(f"{path}: the model was trained with {trained_with}, not dataset.tokenizer "
                          f"{tokenizer.name}; set {' '.join(fix)}{how}; or start a new run")


def resumed_checkpoint(cfg) -> tuple[Path, dict] | None:
    """The checkpoint that training.resume_from_checkpoint gives and its dict, its tensors not read
    ({} if it cannot be read); None where there is none."""
    try:
        [path, *_] = checkpoint_candidates(cfg.training.resume_from_checkpoint, cfg.training.checkpoint_dir,
                                           "training.resume_from_checkpoint")
    except CheckpointError:
        return None
    return path, peek_checkpoint(path) or {}


def continues_run(path: Path, step: int, saved_config: dict, max_iters: int) -> bool:
    """Whether a resume from the checkpoint at `path` (of `step`, its run's config `saved_config`)
    trains on in its run directory: the run's own checks then apply (resume.resume)."""
    return continues_in_place(path) and step < max(max_iters, config_value(saved_config, "training.max_iters") or 0)


def data_settings_hint(cfg, problem: Exception) -> str:
    """For an error in setting up the data or tokenizer on a resume: the checkpoint's own data and
    tokenizer settings where the config differs (a run started with command-line overrides, resumed
    without them), or, where the tokenizer file is gone, how to get the one the checkpoint carries."""
    if (found := resumed_checkpoint(cfg)) is None:
        return ""
    path, saved = found[0], with_split_settings(found[1].get("config", {}))
    now = cfg.to_dict()
    # a tokenizer's problem: the data's settings are beside the point
    names = ("dataset.tokenizer", "model.vocab_size") if isinstance(problem, TokenizerError) else DATA_SETTINGS
    if config_value(saved, "dataset.val_parquet_dir"):  # its validation documents were that folder's: nothing split
        names = [name for name in names
                 if name not in ("dataset.split_seed", "dataset.val_fraction", "dataset.split_by")]
    recorded = [name for name in names if name.split(".")[1] in saved.get(name.split(".")[0], {})]
    differ = [override(name, config_value(saved, name)) for name in recorded
              if not same_setting(name, config_value(saved, name), config_value(now, name))]
    run_tokenizer = config_value(saved, "dataset.tokenizer") or cfg.dataset.tokenizer
    if isinstance(problem, TokenizerError) and run_tokenizer != "bytes" and not Path(run_tokenizer).is_file():
        return (f"; the checkpoint carries its tokenizer ({run_tokenizer} is not found): `python export.py --checkpoint "
                f"{path} --out DIR` writes it to DIR/tokenizer.json, for dataset.tokenizer=DIR/tokenizer.json")
    if differ:
        return (f"; the checkpoint's run had {' '.join(differ)}: if the change was not meant, give "
                f"{'those' if len(differ) > 1 else 'it'} again"
                + (found_as_newest(cfg) if found_newest(cfg.training) else ""))
    return ""


def found_as_newest(cfg) -> str:
    """What a refusal adds where `latest` or `auto` chose the run: it may be another experiment's."""
    return (f" (that run is the newest in training.checkpoint_dir {cfg.training.checkpoint_dir}, which `latest` and "
            f"`auto` resume: to resume another, give its directory, or set training.checkpoint_dir to the folder "
            f"that holds it)")


DATA_SETTINGS = ("dataset.parquet_dir", "dataset.val_parquet_dir", "dataset.text_column", "dataset.split_seed",
                 "dataset.val_fraction", "dataset.split_by", "dataset.tokenizer", "model.vocab_size")


PATH_SETTINGS = ("dataset.parquet_dir", "dataset.val_parquet_dir", "dataset.tokenizer")


def same_setting(path: str, before, after) -> bool:
    """Two values of a setting; files and folders by where they are (data/x/ is ./data/x)."""
    if path in PATH_SETTINGS and before and after:
        return os.path.realpath(before) == os.path.realpath(after)
    return before == after


def holds_tokenizer(file, saved: str) -> bool:
    try:
        return file is not None and load_tokenizer(file).to_str() == saved
    except TokenizerError:
        return False
