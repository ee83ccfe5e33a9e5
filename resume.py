"""Carrying a run across processes. save() writes what an exact continuation needs: the weights,
the optimizer and scaler state, every rank's RNG state, every reader's data position, the step and
the best validation loss. resume() loads it back, so that a run stopped at step k (by a signal, a
crash or kill -9) continues with the same batches, dropout masks and updates as one that never
stopped; it also continues across changed settings, and says what changed. A folder that export.py
wrote starts a fine-tuning run instead: its weights only.
"""
import math
import os
import random
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from adamw4bit import convert_adamw_state
from checkpoint import Checkpoint, CheckpointError, is_export, load_export, peek_checkpoint
from config import learning_rate, step_tokens
from positions import SHARDS, data_order, resume_point
from distributed import full_state, load_full_state, load_full_weights
from locate import checkpoint_candidates, is_run_directory, open_checkpoint, resumable_runs
from model import BDHConfig
from rundir import RunDir, hold_auto_start
from tokenizer import TokenizerError, load_tokenizer, tokenizer_from_string


@dataclass
class Progress:
    """Where the run stands, beyond weights and optimizer state: what a checkpoint records."""
    step: int = 0
    tokens: int = 0  # trained on so far: the sum of each step's tokens, which a resume may change
    best_val_loss: float = math.inf
    last_saved: Path | None = None
    batches_consumed: int = 0
    positions: dict = field(default_factory=dict)  # this rank's readers' positions after those batches
    passes: float | None = None  # over the training data, at the step (StepLog.passes; None: not known)
    measured_anew: bool = False  # a resume changed what validation measures: the next evaluation's record says so
    val_fingerprint: str | None = None  # of the validation batches (evaluation.validation_fingerprint)


def save(run, progress, model, optimizer, scaler, cfg, order, ranks, device, tokenizer, name=None) -> Path:
    """Every rank takes part (positions and RNG states are gathered, FSDP gathers weights); rank 0
    writes. Returns rank 0's path on every rank."""
    model_state, optimizer_state = full_state(model, optimizer)
    positions = sorted((p for rank_positions in ranks.gather(progress.positions) for p in rank_positions.values()),
                       key=lambda p: p["reader"])
    ckpt = Checkpoint(step=progress.step, tokens=progress.tokens, model=model_state, model_config=asdict(cfg.model),
                      config=cfg.to_dict(), optimizer=optimizer_state, scaler=scaler.state_dict(),
                      best_val_loss=progress.best_val_loss, rng=ranks.gather(rng_state(device)), data_order=order,
                      data_positions=positions, batches_consumed=progress.batches_consumed, tokenizer=tokenizer.to_str(),
                      passes=progress.passes, measured_anew=progress.measured_anew,
                      validation_batches=progress.val_fingerprint)
    return ranks.gather(run.save(ckpt, cfg.to_yaml(), name))[0]


def rng_state(device) -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            **torch_rng_state(device)}


def torch_rng_state(device) -> dict:
    """torch's generators: the only ones a training step draws from (dropout masks; the loader has
    its own), cheap enough to keep at every step."""
    state = {"torch": torch.get_rng_state()}
    if device.type in ("cuda", "mps"):  # the dropout masks' generator on the device
        state[device.type] = getattr(torch, device.type).get_rng_state()
    return state


def set_rng_state(state: dict, device):
    """rng_state's, or torch_rng_state's (Python's and numpy's generators left as they are)."""
    if "python" in state:
        random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
        np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(state["torch"])
    if device.type in state:
        getattr(torch, device.type).set_rng_state(state[device.type])


def resume_target(training, ranks, device) -> str | None:
    """training.resume_from_checkpoint as resume() takes it, before the data is read (which may build
    the sample corpus first): auto resolved; a name that does not exist, or latest where there is no
    run, refused, with what it may mean."""
    spec = training.resume_from_checkpoint
    if spec == "auto":
        return resolve_auto(training.checkpoint_dir, ranks, device)
    if spec == "latest" and not resumable_runs(Path(training.checkpoint_dir)) or \
            spec not in (None, "latest") and not os.path.exists(spec):
        checkpoint_candidates(spec, training.checkpoint_dir, "training.resume_from_checkpoint")  # raises
    return spec


def resolve_auto(checkpoint_dir: str, ranks, device) -> str | None:
    """What resume_from_checkpoint=auto means: latest where checkpoint_dir holds a run with a
    checkpoint (on any rank: a rank that sees none is told by latest), else None, a new run. One
    auto job at a time decides and trains in checkpoint_dir (rundir.hold_auto_start)."""
    if ranks.main:
        hold_auto_start(checkpoint_dir)
    if ranks.any(bool(resumable_runs(Path(checkpoint_dir))), device):
        return "latest"
    if ranks.main:
        print(f"training.resume_from_checkpoint auto: no run with a checkpoint in {checkpoint_dir} yet: a new run")
    return None


def resume(cfg, model, optimizer, scaler, tokenizer, units, workers, val_fingerprint: str, ranks, device,
           command_line=frozenset()):
    """Load the checkpoint of training.resume_from_checkpoint into the model, optimizer and
    scaler; returns (its run directory, Progress, the data stream's start positions).
    `val_fingerprint`: that of this run's validation batches (evaluation.validation_fingerprint);
    `command_line`: the settings the command line gives (check_same_data)."""
    low_precision = cfg.low_precision
    if is_export(cfg.training.resume_from_checkpoint):
        return fine_tune_from_export(cfg, model, tokenizer, ranks)
    path, ckpt = open_checkpoint(cfg.training.resume_from_checkpoint, cfg.training.checkpoint_dir)
    newest = cfg.training.resume_from_checkpoint == "latest"  # (auto too): a run found, not named
    shards = data_order(cfg, units, workers, ranks.world_size)[SHARDS]  # their fingerprint
    try:
        check_same_tokenizer(ckpt.tokenizer, tokenizer, path, ckpt.config.get("dataset", {}).get("tokenizer"),
                             ckpt.model_config, cfg.model)
        check_same_model(ckpt.model_config, cfg.model, path)
        if continues_in_place(path) and ckpt.step < cfg.training.max_iters:
            check_same_data(ckpt, cfg.dataset, shards, command_line, path, named=not newest)
    except CheckpointError as e:
        if not newest:
            raise
        raise CheckpointError(f"{e}{found_as_newest(cfg)}") from None
    optimizer_state = optimizer_state_for(optimizer, ckpt.optimizer, {p: name for name, p in model.named_parameters()})
    if ckpt.low_precision()["use_4bit_optimizer"] != low_precision.use_4bit_optimizer:
        print(f"converting the checkpoint's optimizer state to "
              f"{'4-bit' if low_precision.use_4bit_optimizer else 'float32'} moments (use_4bit_optimizer changed)")
    convert_adamw_state(optimizer_state, {name: p.shape for name, p in model.named_parameters()},
                        low_precision.use_4bit_optimizer)
    load_full_state(model, optimizer, ckpt.model, optimizer_state)
    if ckpt.scaler:  # empty when the checkpoint's run did not use float16
        scaler.load_state_dict(ckpt.scaler)
    if len(ckpt.rng) == ranks.world_size:
        set_rng_state(ckpt.rng[ranks.rank], device)
    else:  # another world size: the saved RNG states are one per rank
        if ranks.main:
            print(f"note: {ranks.world_size} process{'es' * (ranks.world_size != 1)} where the checkpoint has "
                  f"{len(ckpt.rng)}: each rank's random state (dropout masks) is seeded afresh"
                  + global_batch_change(ckpt, cfg.training, ranks.world_size))
        torch.manual_seed(cfg.training.seed + ranks.rank + 1000 * ckpt.step)
    tokens = ckpt.tokens if ckpt.tokens is not None else tokens_before(ckpt, cfg.training)
    progress = Progress(step=ckpt.step, tokens=tokens, best_val_loss=ckpt.best_val_loss, last_saved=path,
                        passes=ckpt.passes, measured_anew=ckpt.measured_anew)
    run = reopen_run(cfg, path, ckpt, progress, ranks)
    if ckpt.step >= cfg.training.max_iters:  # train() says there is nothing to do; nothing changes either
        return run, progress, []
    if note := schedule_jump(ckpt, cfg.training):
        print(note)
    best_afresh = evaluated_weights(ckpt.low_precision()) != evaluated_weights(asdict(low_precision))
    if best_afresh:
        print("validation losses now measure other weights (use_4bit or its code book changed): best.pt starts afresh")
    positions, progress.batches_consumed = resume_point(
        cfg, units, workers, ranks.world_size, ckpt.data_order, ckpt.data_positions, ckpt.batches_consumed)
    if warning := validation_change(ckpt.config, cfg.to_dict(), (ckpt.data_order or {}).get(SHARDS), shards,
                                    ckpt.validation_batches, val_fingerprint):
        print(warning)
        best_afresh = True
    if best_afresh:
        progress.best_val_loss, progress.measured_anew = math.inf, True
        if kept := run.set_aside_best(ckpt.step):
            loss = f" (validation loss {ckpt.best_val_loss:.4f})" if math.isfinite(ckpt.best_val_loss) else ""
            print(f"  the run's best.pt so far{loss} is now {kept}")
    return run, progress, positions


def reopen_run(cfg, path: Path, ckpt, progress: Progress, ranks) -> RunDir:
    """The run directory a resumed run writes into: the checkpoint's own, or a new one when the
    checkpoint lies outside a run directory (a download, a backup: not a run to write into or prune)
    or in one that cannot be written (a read-only mount, another user's run).
    Says that the run resumes once the directory is its own (another process may be training in it)."""
    nothing_to_do = ckpt.step >= cfg.training.max_iters  # train() says so: nothing to move or record either
    announce = "" if nothing_to_do else f"resuming from {path} at step {ckpt.step + 1}\n"
    if not continues_in_place(path):
        not_a_run = not is_run_directory(path.parent)
        print(announce, end="")
        progress.best_val_loss = math.inf  # so that the new run directory gets its own best.pt
        if not nothing_to_do:
            why = "is not a run directory (no config.yaml that a run wrote)" if not_a_run else "cannot be written"
            print(f"  {path.parent} {why}: the run continues in a new one in {cfg.training.checkpoint_dir}")
        return RunDir(cfg.training.checkpoint_dir, writer=ranks.main)
    run = RunDir(cfg.training.checkpoint_dir, path=path.parent, writer=ranks.main)
    if nothing_to_do:
        return run
    run.lock()
    print(announce, end="")
    moved, folder = run.set_aside_after(ckpt.step)
    if moved:  # asked for by name: an older checkpoint; else the later ones could not be read
        what = (f"a new branch from step {ckpt.step}: the abandoned branch's"
                if Path(cfg.training.resume_from_checkpoint).is_file() else
                f"step {ckpt.step} is the newest checkpoint that can be read: the later")
        print(f"  {what} {', '.join(moved)} moved to {folder} (`latest` and keep_last_n see this branch only)")
    for line in run.record_resumed_config(ckpt.step, ckpt.config, cfg.to_dict(), cfg.to_yaml()):
        print(f"  config changed: {line}")
    return run


def continues_in_place(path: Path) -> bool:
    """Whether a resume from this checkpoint writes into its run directory (reopen_run)."""
    return is_run_directory(path.parent) and os.access(path.parent, os.W_OK)


def check_same_data(ckpt, dataset, shards_now: str, command_line, path, named: bool):
    """A resume that continues a run in its own directory reads the run's training data, unless the
    command line gives other data: a setting the run was started with on the command line, left out
    of the resume command, would continue the run on the config file's data (and prune the
    checkpoints of the run as it was). A run found by `latest` or `auto` (not `named`) is never
    continued on other data: the newest run in checkpoint_dir may be another experiment's."""
    saved = ckpt.config.get("dataset", {})
    for key in ("parquet_dir", "text_column"):
        now, before, setting = getattr(dataset, key), saved.get(key, getattr(dataset, key)), f"dataset.{key}"
        same_shards = key == "parquet_dir" and (ckpt.data_order or {}).get(SHARDS) == shards_now  # (moved, say)
        if same_setting(setting, before, now) or same_shards or (named and setting in command_line):
            continue
        other_data = shlex.quote(f"{setting}={now}")
        if not named:  # naming the run is what lets other data on the command line continue it
            other_data = f"{shlex.quote(f'training.resume_from_checkpoint={path.parent}')} {other_data}"
        raise CheckpointError(
            f"{path}: the run trained on {setting} {before!r}, and this command reads {now!r}: a resume "
            f"continues on the run's data: add {shlex.quote(f'{setting}={before}')} (was it given on the command "
            f"line when the run started?), or, to train {'this run ' * (not named)}on {now!r} from here, give "
            f"that on the command line: {other_data}")


def check_same_model(saved_config: dict, model_config: BDHConfig, path):
    """Refuses weights of another model shape (dropout may differ: it is not a shape)."""
    differing = [f"{k}: checkpoint {saved_config.get(k)!r}, config {v!r}"
                 for k, v in asdict(model_config).items()
                 if k != "dropout" and saved_config.get(k) != v]
    if differing:
        raise CheckpointError(f"{path}: the checkpoint is from a different model shape; set "
                              f"model.* to match it or start a new run. Differences: " + "; ".join(differing))


def optimizer_state_for(optimizer, saved: dict, names: dict) -> dict:
    """The saved optimizer state (keyed by parameter name) ready to load into `optimizer`: its
    parameter groups take the current settings (betas, weight decay, ...; the config decides
    them, as it does the learning rate), keeping only the saved parameter lists. `names` maps each
    parameter to its name. Checkpoints of version 0.1 keyed the state by position instead."""
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    if all(isinstance(k, int) for k in saved["state"]):
        saved = {"state": {order[k]: v for k, v in saved["state"].items()},
                 "param_groups": [{**g, "params": [order[k] for k in g["params"]]}
                                  for g in saved["param_groups"]]}
    saved["param_groups"] = [
        {**{k: v for k, v in current.items() if k != "params"}, "params": old["params"]}
        for current, old in zip(optimizer.param_groups, saved["param_groups"])]
    return saved


def schedule_jump(ckpt, training) -> str | None:
    """A note when the learning rate of the next step differs from the checkpoint's schedule: a
    finished run extended with more max_iters goes back up the cosine."""
    step = ckpt.step + 1
    before, now = learning_rate(step, saved_training(ckpt, training)), learning_rate(step, training)
    if math.isclose(before, now, rel_tol=0.01):
        return None
    return (f"  note: the learning-rate schedule changed: step {step} runs at lr {now:.2e}, {before:.2e} in the "
            f"checkpoint's schedule (max_iters, warmup_iters, learning_rate, min_lr)"
            + ("; the loss may rise for a while after this jump up" if now > before else ""))


def tokens_before(ckpt, training) -> int:
    """The tokens trained on up to a checkpoint written before they were counted (version 0.4.0):
    its steps times its own tokens per step, as far as it recorded them."""
    return ckpt.step * step_tokens(saved_training(ckpt, training), max(1, len(ckpt.rng)))


def global_batch_change(ckpt, training, world_size: int) -> str:
    """On another number of processes: how the tokens of a step change, and the
    gradient_accumulation_steps (or else the batch_size) that keeps them where one does."""
    before, now = step_tokens(saved_training(ckpt, training), len(ckpt.rng)), step_tokens(training, world_size)
    if before == now:
        return ""
    micro_step = now // training.gradient_accumulation_steps  # over all processes
    row = now // training.batch_size  # the tokens of one batch row over the accumulation and the processes
    keep = (f"; training.gradient_accumulation_steps={before // micro_step} keeps {before:,}"
            if before % micro_step == 0 else
            f"; training.batch_size={before // row} keeps {before:,}" if before % row == 0 else "")
    return f", and a step trains on {now:,} tokens where it trained on {before:,}{keep}"


def saved_training(ckpt, training):
    """The checkpoint's training settings (this run's where it recorded none)."""
    return SimpleNamespace(**{**asdict(training), **ckpt.config.get("training", {})})


def fine_tune_from_export(cfg, model, tokenizer, ranks):
    """training.resume_from_checkpoint names a folder that export.py wrote: its weights, with a
    fresh optimizer, from step 1, in a new run directory (an export holds no optimizer or data state)."""
    folder = cfg.training.resume_from_checkpoint
    exported, saved_tokenizer, config = load_export(folder)
    check_same_tokenizer(saved_tokenizer, tokenizer, folder, str(Path(folder) / "tokenizer.json"), config, cfg.model)
    check_same_model(config, cfg.model, folder)
    load_full_weights(model, exported.state_dict())
    print(f"fine-tuning the model exported to {folder} (step {config['bdh_export']['step']} of its run): its weights, "
          f"a fresh optimizer, from step 1, in a new run directory")
    return RunDir(cfg.training.checkpoint_dir, writer=ranks.main), Progress(), []


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


def data_settings_hint(cfg, problem: Exception) -> str:
    """For an error in setting up the data or tokenizer on a resume: the checkpoint's own data and
    tokenizer settings where the config differs (a run started with command-line overrides, resumed
    without them), or, where the tokenizer file is gone, how to get the one the checkpoint carries."""
    try:
        [path, *_] = checkpoint_candidates(cfg.training.resume_from_checkpoint, cfg.training.checkpoint_dir,
                                           "training.resume_from_checkpoint")
    except CheckpointError:
        return ""
    saved = (peek_checkpoint(path) or {}).get("config", {})
    now = cfg.to_dict()

    def as_override(value):  # what the command line reads back as the same value
        return "null" if value is None else shlex.quote(str(value))
    # a tokenizer's problem: the data's settings are beside the point
    names = ("dataset.tokenizer", "model.vocab_size") if isinstance(problem, TokenizerError) else DATA_SETTINGS
    recorded = [name for name in names if name.split(".")[1] in saved.get(name.split(".")[0], {})]
    differ = [f"{name}={as_override(setting(saved, name))}" for name in recorded
              if not same_setting(name, setting(saved, name), setting(now, name))]
    if differ:
        return (f"; the checkpoint's run had {' '.join(differ)}: if the change was not meant, give those again"
                + (found_as_newest(cfg) if cfg.training.resume_from_checkpoint == "latest" else ""))
    if isinstance(problem, TokenizerError) and cfg.dataset.tokenizer != "bytes":  # the run's own file is gone
        return (f"; the checkpoint carries its tokenizer: `python export.py --checkpoint {path} --out DIR` writes it "
                f"to DIR/tokenizer.json, for dataset.tokenizer=DIR/tokenizer.json")
    return ""


def found_as_newest(cfg) -> str:
    """What a refusal adds where `latest` or `auto` chose the run: it may be another experiment's."""
    return (f" (that run is the newest in training.checkpoint_dir {cfg.training.checkpoint_dir}, which `latest` and "
            f"`auto` resume: to resume another, give its directory, or set training.checkpoint_dir to the folder "
            f"that holds it)")


DATA_SETTINGS = ("dataset.parquet_dir", "dataset.val_parquet_dir", "dataset.text_column", "dataset.tokenizer",
                 "model.vocab_size")
PATH_SETTINGS = ("dataset.parquet_dir", "dataset.val_parquet_dir", "dataset.tokenizer")


def setting(config: dict, path: str):
    """A setting of a config dict, by its dotted path (None if absent)."""
    section, key = path.split(".")
    return config.get(section, {}).get(key)


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


VALIDATION_BATCHES = ("training.batch_size", "training.block_size", "training.eval_iters")  # what they measure


def validation_change(saved: dict, now: dict, saved_shards: str | None = None, shards: str | None = None,
                      saved_batches: str | None = None, batches: str | None = None) -> str | None:
    """A warning if the validation documents or batches differ from those of the checkpoint's run
    (configs `saved` and `now`); None if they are the same. Without val_parquet_dir they are a share of
    parquet_dir's documents drawn from the seed: another seed or val_fraction holds out documents the
    run has trained on. `saved_shards` and `shards`: the fingerprints of parquet_dir's shards
    (data_order), which decide whether it holds the same documents wherever it is. `saved_batches`
    and `batches`: the fingerprints of the validation batches themselves (evaluation.validation_fingerprint),
    which decide, where both are known; the settings then only say why."""
    if saved_batches and batches and saved_batches == batches:
        return None  # the very same batches, wherever their files are now
    def same(path):
        if path == "dataset.parquet_dir" and saved_shards and shards:
            return saved_shards == shards
        return same_setting(path, setting(saved, path), setting(now, path))
    by_fraction = not setting(now, "dataset.val_parquet_dir")
    held_out = ["dataset.val_parquet_dir"] + (["dataset.val_fraction", "training.seed"] if by_fraction else [])
    read_from = ["dataset.text_column"] + ["dataset.parquet_dir"] * by_fraction
    documents = [path for path in held_out + read_from if not same(path)]
    shapes = [path for path in VALIDATION_BATCHES if not same(path)]  # the first eval_iters batches of that shape
    if not documents and not shapes:
        if not (saved_batches and batches):
            return None
        documents = ["dataset.parquet_dir" if by_fraction else "dataset.val_parquet_dir"]  # rewritten in place
    what = "; ".join(f"{path} {setting(now, path)!r}: its shards changed" if setting(saved, path) == setting(now, path)
                     else f"{path}: {setting(saved, path)!r} -> {setting(now, path)!r}" for path in documents + shapes)
    changes = "documents" if documents else "batches"
    if by_fraction and documents and not set(read_from) & set(documents):  # the same documents, held out anew
        keep = " ".join(f"{path}={setting(saved, path)}" for path in documents)
        return (f"WARNING: the validation {changes} change on this resume ({what}): some of those held out now were "
                f"trained on, so the validation loss reads low from here, and best.pt starts afresh; keep {keep} "
                f"to keep the same ones")
    return (f"WARNING: the validation {changes} change on this resume ({what}): losses from here on are not "
            f"comparable with the earlier ones, and best.pt starts afresh")


def evaluated_weights(low_precision: dict) -> str:
    """What a validation loss measures: the weights as trained, or their 4-bit round trip."""
    if not low_precision["use_4bit"]:
        return "as trained"
    return f"4-bit {low_precision['quantization_type']}, double quant {low_precision['use_double_quant']}"
