"""Carrying a run across processes. save() writes what an exact continuation needs: the weights,
the optimizer and scaler state, every rank's RNG state, every reader's data position, the step and
the best validation loss. resume() and load_saved_state() load it back, so that a run stopped at
step k (by a signal, a crash or kill -9) continues with the same batches, dropout masks and updates
as one that never stopped; it also continues across changed settings, and says what changed. A
folder that export.py wrote starts a fine-tuning run instead: its weights only. Also the commands a
run prints: the one that resumes it, the one that trains it on.
"""
import copy
import math
import os
import random
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from adamw4bit import convert_adamw_state
from checkpoint import Checkpoint, CheckpointError, is_export, load_checkpoint, load_export, saved_step
from config_file import config_value
from distributed import Ranks, full_state, load_full_state, load_full_weights
from evaluation import validation_fingerprint
from files import near_miss
from locate import (checkpoint_candidates, checkpoint_step, checkpoints_in, continues_in_place, is_run_directory,
                    found_newest, is_run_with_checkpoints, one_run_given, open_checkpoint, resumable_runs)
from positions import SHARDS, resume_point
from resume_checks import (carried_forward, check_run_given_again, check_same_model, check_same_tokenizer,
                           continues_run, found_as_newest, global_batch_change, schedule_jump, tokens_before)
from resume_validation import evaluated_weights, short_batch_added, validation_change
from rundir import RunDir, hold_auto_start
from runtime import config_as_run, tensor_bytes


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
    best_afresh: bool = False  # this resume did (not saved): load_saved_state sets the run's best.pt so far aside
    evaluation_due: bool = False  # at this step, and not run yet (a stop saved first)
    val_fingerprint: str | None = None  # of the validation batches (evaluation.validation_fingerprint)
    # this command line's (resume_checks.command_line_record), with what a resume carries of the run's (carried_forward)
    command_line: dict = field(default_factory=dict)
    seconds_before: float | None = 0.0  # of training before this process (None: an older checkpoint did not say)
    since: float = field(default_factory=time.perf_counter)  # when this process began training (StepLog.start)

    def seconds(self) -> float | None:
        """Of training, in all the run's processes so far."""
        return None if self.seconds_before is None else self.seconds_before + time.perf_counter() - self.since


def save(run, progress, model, optimizer, scaler, cfg, order, ranks, device, tokenizer, name=None, best=False) -> Path:
    """Every rank takes part (positions and RNG states are gathered, FSDP gathers weights); rank 0
    writes (`best`: best.pt too, RunDir.save). Returns rank 0's path on every rank."""
    model_state, optimizer_state = full_state(model, optimizer)
    positions = sorted((p for rank_positions in ranks.gather(progress.positions) for p in rank_positions.values()),
                       key=lambda p: p["reader"])
    ckpt = Checkpoint(step=progress.step, tokens=progress.tokens, model=model_state, model_config=asdict(cfg.model),
                      config=cfg.to_dict(), optimizer=optimizer_state, scaler=scaler.state_dict(),
                      best_val_loss=progress.best_val_loss, rng=ranks.gather(rng_state(device)), data_order=order,
                      data_positions=positions, batches_consumed=progress.batches_consumed, tokenizer=tokenizer.to_str(),
                      passes=progress.passes, measured_anew=progress.measured_anew,
                      validation_batches=progress.val_fingerprint, evaluation_due=progress.evaluation_due,
                      command_line=progress.command_line, seconds=progress.seconds())
    return ranks.gather(run.save(ckpt, config_as_run(cfg, device), name, best))[0]


def checkpoint_size(model, low_precision, last_saved: Path | None) -> int:
    """About the bytes of a checkpoint: the last one's, or the weights and AdamW's two moments (float32,
    or 4-bit: a quarter of the weights together)."""
    if last_saved is not None and last_saved.is_file():
        return last_saved.stat().st_size
    weights = tensor_bytes(model.state_dict())
    return weights + (weights // 4 if low_precision.use_4bit_optimizer else 2 * weights)


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


def resume_target(training, ranks, device, named_in_file: str | None = None) -> str | None:
    """training.resume_from_checkpoint as resume() takes it, before the data is read (which may build
    the built-in corpus first): auto resolved; a name that does not exist, or latest where there is no
    run, refused, with what it may mean. So is a checkpoint file that the config file names
    (`named_in_file`) where its run has gone on since: a resume from it again, after the config's
    max_iters was raised, say, would branch and set the later steps aside."""
    spec = training.resume_from_checkpoint
    if spec == "auto":
        return resolve_auto(training.checkpoint_dir, ranks, device)
    if spec == "latest" and not resumable_runs(Path(training.checkpoint_dir)) or \
            spec not in (None, "latest") and not os.path.exists(spec):
        checkpoint_candidates(spec, training.checkpoint_dir, "training.resume_from_checkpoint")  # raises
    if named_in_file and spec not in (None, "latest") and os.path.isfile(spec) and continues_in_place(Path(spec)):
        step = saved_step(Path(spec))
        later = [path for path in checkpoints_in(Path(spec).parent) if checkpoint_step(path) > step]
        if later:
            raise CheckpointError(
                f"{named_in_file}: training.resume_from_checkpoint names {spec} (step {step}), and its run has gone "
                f"on to {later[-1].name}: a resume from it again would start a new branch and set the later "
                f"checkpoints aside; to continue the run, write its directory ({Path(spec).parent}) there instead; "
                f"to branch from step {step} on purpose, give training.resume_from_checkpoint={spec} on the "
                f"command line")
    return spec


def resolve_auto(checkpoint_dir: str, ranks, device) -> str | None:
    """What resume_from_checkpoint=auto means: latest where checkpoint_dir holds a run with a
    checkpoint (on any rank: a rank that sees none is told by latest), else None, a new run. One
    auto job at a time decides and trains in checkpoint_dir (rundir.hold_auto_start)."""
    if is_run_with_checkpoints(Path(checkpoint_dir)):
        raise one_run_given(Path(checkpoint_dir), "training.resume_from_checkpoint", "auto")
    new_folder = not Path(checkpoint_dir).exists()  # (before the hold creates it)
    if ranks.main:
        hold_auto_start(checkpoint_dir)
    if ranks.any(bool(resumable_runs(Path(checkpoint_dir))), device):
        return "latest"
    if ranks.main:
        near = near_miss(checkpoint_dir, keep=resumable_runs) if new_folder else None  # a typo of the folder's name?
        print(f"training.resume_from_checkpoint auto: no run with a checkpoint in {checkpoint_dir} yet: a new run"
              + (f" (did you mean training.checkpoint_dir={near}? It holds runs)" if near else ""))
    return None


def check_resumable(cfg, path: Path, ckpt, tokenizer, shards: str, val_fingerprint: str, command_line: dict) -> dict:
    """Refuses a checkpoint this config cannot resume: another tokenizer or model, and where the resume
    continues the checkpoint's run, settings or data of that run left out. Returns what the next
    checkpoints record of the command line (a continued run keeps the settings its earlier ones gave)."""
    try:
        check_same_tokenizer(ckpt.tokenizer, tokenizer, path, config_value(ckpt.config, "dataset.tokenizer"),
                             ckpt.model_config, cfg.model)
        # (before the model's check, which would name model.* alone; also where this config's max_iters says
        # there is nothing to do, but the run's own does not)
        if not continues_run(path, ckpt.step, ckpt.config, cfg.training.max_iters):
            check_same_model(ckpt.model_config, cfg.model, path)
            return command_line
        check_run_given_again(cfg, path, ckpt, shards, val_fingerprint, command_line)
        check_same_model(ckpt.model_config, cfg.model, path)
    except CheckpointError as e:
        if not found_newest(cfg.training):
            raise
        raise CheckpointError(f"{e}{found_as_newest(cfg)}") from None
    return carried_forward(ckpt, cfg.to_dict(), command_line)


def resume(cfg, tokenizer, units, workers, order: dict, val_batches: list, ranks, device, command_line: dict):
    """Where the run of training.resume_from_checkpoint stands: (its run directory, Progress, the data
    stream's start positions), from the checkpoint, checked against this config. Its weights and
    optimizer state are loaded once the model exists (load_saved_state): the loader's workers start in
    between, before the model and its optimizer take their memory.
    `order`: this run's data order (positions.data_order); `val_batches`: its validation batches
    (validation.validation_batches);
    `command_line`: its config file and the settings it gives (resume_checks.command_line_record)."""
    val_fingerprint = validation_fingerprint(val_batches)
    if is_export(cfg.training.resume_from_checkpoint):  # a fine-tune (load_saved_state checks the export)
        return RunDir(cfg.training.checkpoint_dir, writer=ranks.main), Progress(), []
    unreadable = []
    path, ckpt = open_checkpoint(cfg.training.resume_from_checkpoint, cfg.training.checkpoint_dir, skipped=unreadable)
    shards = order[SHARDS]  # their fingerprint
    progress_command_line = check_resumable(cfg, path, ckpt, tokenizer, shards, val_fingerprint, command_line)
    tokens = ckpt.tokens if ckpt.tokens is not None else tokens_before(ckpt, cfg.training)
    best = math.inf if math.isnan(ckpt.best_val_loss) else ckpt.best_val_loss  # (up to 0.4.10 a NaN could be)
    progress = Progress(step=ckpt.step, tokens=tokens, best_val_loss=best, last_saved=path,
                        passes=ckpt.passes, measured_anew=ckpt.measured_anew, evaluation_due=ckpt.evaluation_due,
                        command_line=progress_command_line, seconds_before=ckpt.seconds)
    if ckpt.step < cfg.training.max_iters:
        state_notes(cfg, ckpt, ranks)
    run = reopen_run(cfg, path, ckpt, progress, ranks, device, unreadable,
                     checkpoint_dir_given="training.checkpoint_dir" in command_line["settings"])
    if ckpt.step >= cfg.training.max_iters:  # train() says there is nothing to do; nothing changes either
        return run, progress, []
    if note := schedule_jump(ckpt, cfg.training):
        print(note)
    best_afresh = evaluated_weights(ckpt.low_precision()) != evaluated_weights(asdict(cfg.low_precision))
    if best_afresh:
        print("validation losses now measure other weights (use_4bit or its code book changed): best.pt starts afresh")
    positions, progress.batches_consumed = resume_point(
        cfg, units, workers, ranks.world_size, ckpt.data_order, ckpt.data_positions, ckpt.batches_consumed, order)
    if note := short_batch_added(ckpt, val_batches):
        print(note)
        best_afresh = True
    elif warning := validation_change(ckpt.config, cfg.to_dict(), (ckpt.data_order or {}).get(SHARDS), shards,
                                      ckpt.validation_batches, val_fingerprint):
        print(warning)
        best_afresh = True
    if best_afresh:  # (the run's best.pt so far is set aside once the checkpoint, maybe that file, is loaded)
        progress.best_val_loss, progress.measured_anew, progress.best_afresh = math.inf, True, True
    return run, progress, positions  # (the checkpoint's mapping of the file ends here: no worker inherits it)


def load_saved_state(cfg, run, model, optimizer, scaler, tokenizer, progress: Progress, ranks, device):
    """Load the checkpoint that resume() found (read again, mapped) into the model, optimizer and
    scaler, and set the random state it saved; for a fine-tune, the export's weights. Where this resume
    starts best.pt afresh (resume(): validation now measures something else), the run's best.pt so far is
    then set aside."""
    if is_export(cfg.training.resume_from_checkpoint):
        fine_tune_from_export(cfg, model, tokenizer)
        return
    ckpt = load_checkpoint(progress.last_saved, check_sums=False)  # (resume() checked them)
    optimizer_state = optimizer_state_for(optimizer, ckpt.optimizer, {p: name for name, p in model.named_parameters()})
    convert_adamw_state(optimizer_state, {name: p.shape for name, p in model.named_parameters()},
                        cfg.low_precision.use_4bit_optimizer)
    # (copies: the optimizer keeps its state, which must not be the file's mapped pages, changed if it is copied over)
    load_full_state(model, optimizer, ckpt.model, copy.deepcopy(optimizer_state))
    if ckpt.scaler:  # empty when the checkpoint's run did not use float16
        scaler.load_state_dict(ckpt.scaler)
    if len(ckpt.rng) == ranks.world_size:
        set_rng_state(ckpt.rng[ranks.rank], device)
    else:  # another world size: the saved RNG states are one per rank (state_notes)
        torch.manual_seed(cfg.training.seed + ranks.rank + 1000 * ckpt.step)  # per rank, and apart from other steps
    if progress.best_afresh:
        ranks.barrier()  # every rank has read the checkpoint, which may be that best.pt
        if kept := run.set_aside_best(ckpt.step):
            loss = f" (validation loss {ckpt.best_val_loss:.4f})" if math.isfinite(ckpt.best_val_loss) else ""
            print(f"  the run's best.pt so far{loss} is now {kept}")


def state_notes(cfg, ckpt, ranks):
    """What load_saved_state changes of the checkpoint's state, said before resume()'s other lines."""
    use_4bit_optimizer = cfg.low_precision.use_4bit_optimizer
    if ranks.main and ckpt.low_precision()["use_4bit_optimizer"] != use_4bit_optimizer:
        print(f"converting the checkpoint's optimizer state to {'4-bit' if use_4bit_optimizer else 'float32'} "
              f"moments (use_4bit_optimizer changed)")
    if len(ckpt.rng) != ranks.world_size:  # the saved RNG states are one per rank
        reseeded = ": each rank's random state (dropout masks) is seeded afresh" * (cfg.model.dropout > 0)
        batch_note = global_batch_change(ckpt, cfg.training, ranks.world_size)
        if ranks.main and (reseeded or batch_note):
            print(f"note: {ranks.world_size} process{'es' * (ranks.world_size != 1)} where the checkpoint has "
                  f"{len(ckpt.rng) or 'no random state'}{reseeded}{batch_note}")


def reopen_run(cfg, path: Path, ckpt, progress: Progress, ranks, device, unreadable=(),
               checkpoint_dir_given=False) -> RunDir:
    """The run directory a resumed run writes into: the checkpoint's own, or a new one when the
    checkpoint lies outside a run directory (a download, a backup: not a run to write into or prune)
    or in one that cannot be written (a read-only mount, another user's run). An older checkpoint of a
    run, with another training.checkpoint_dir on the command line, is refused: a branch would take
    over that run.
    Says that the run resumes once the directory is its own (another process may be training in it).
    `unreadable`: checkpoints skipped for this one, set aside in its run (before a later one is taken
    for an abandoned branch). A run continued in place takes its own folder as training.checkpoint_dir
    (another one given, `checkpoint_dir_given` on the command line, is said not to be used)."""
    nothing_to_do = ckpt.step >= cfg.training.max_iters  # train() says so: nothing to move or record either
    ended = ckpt.step == config_value(ckpt.config, "training.max_iters")
    found = (f" (the newest run in {cfg.training.checkpoint_dir}{', which had ended' * ended})"
             if found_newest(cfg.training) else "")
    announce = "" if nothing_to_do else f"resuming from {path} at step {ckpt.step + 1}{found}\n"
    if not continues_in_place(path):
        not_a_run = not is_run_directory(path.parent)
        print(announce, end="")
        progress.best_val_loss = math.inf  # so that the new run directory gets its own best.pt
        if not nothing_to_do:
            why = "is not a run directory (no config.yaml that a run wrote)" if not_a_run else "cannot be written"
            print(f"  {path.parent} {why}: the run continues in a new one in {cfg.training.checkpoint_dir}")
        return RunDir(cfg.training.checkpoint_dir, writer=ranks.main)
    given, folder = cfg.training.checkpoint_dir, path.parent.parent
    elsewhere = os.path.realpath(given) != os.path.realpath(folder)
    if elsewhere:  # the run's records (its config, W&B's folder) say where it is, not what was given
        saved = config_value(ckpt.config, "training.checkpoint_dir")
        same = saved and os.path.realpath(saved) == os.path.realpath(folder)
        cfg.training.checkpoint_dir = saved if same else str(folder.resolve())
    later = [p for p in checkpoints_in(path.parent) if checkpoint_step(p) > ckpt.step and p not in unreadable]
    its_own = os.path.realpath(given) == os.path.realpath(config_value(ckpt.config, "training.checkpoint_dir") or "")
    if elsewhere and checkpoint_dir_given and not its_own and later and not nothing_to_do:  # another study's run
        raise CheckpointError(
            f"{path} (step {ckpt.step}) is not the newest checkpoint of its run, which went on to {later[-1].name}: "
            f"a resume from it continues in {path.parent} as a new branch and sets the later checkpoints aside, while "
            f"training.checkpoint_dir {given} asks for another folder; for a run of its own there, copy the "
            f"checkpoint out (mkdir -p {shlex.quote(given)} && cp {shlex.quote(str(path))} {shlex.quote(given)}/) "
            f"and resume the copy; to branch in the run itself, leave training.checkpoint_dir out")
    run = RunDir(cfg.training.checkpoint_dir, path=path.parent, writer=ranks.main)
    if nothing_to_do:
        return run
    run.lock()
    print(announce, end="")
    if elsewhere and checkpoint_dir_given:  # (a config file's, the default perhaps: no need to say)
        print(f"  training.checkpoint_dir {given} is not used: a resume continues in its run's directory, "
              f"{path.parent} (for a separate run from this checkpoint, copy the checkpoint file out of the run "
              f"directory and resume the copy)")
    if renamed := run.set_aside_unreadable(unreadable):
        print(f"  the checkpoint(s) that could not be read are now {', '.join(renamed)} (keep_last_n no longer "
              f"counts them; delete them once you have looked)")
        if any(name.startswith("best.pt") for name in renamed):
            progress.best_val_loss = math.inf  # the next evaluation writes a best.pt
    moved, folder = run.set_aside_after(ckpt.step)
    if moved:  # an older checkpoint asked for by name (the later ones that cannot be read are set aside above)
        print(f"  a new branch from step {ckpt.step}: the abandoned branch's {', '.join(moved)} moved to {folder} "
              f"(`latest` and keep_last_n see this branch only; a wrong checkpoint named? stop now and move the "
              f"folder's files back into {run.path} to take that branch back)")
    for line in run.record_resumed_config(ckpt.step, ckpt.config, cfg.to_dict(), config_as_run(cfg, device)):
        print(f"  config changed: {line}")
    return run


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


def fine_tune_from_export(cfg, model, tokenizer):
    """training.resume_from_checkpoint names a folder that export.py wrote: its weights, with a
    fresh optimizer, from step 1, in a new run directory (an export holds no optimizer or data state)."""
    folder = cfg.training.resume_from_checkpoint
    exported, saved_tokenizer, config = load_export(folder)
    check_same_tokenizer(saved_tokenizer, tokenizer, folder, str(Path(folder) / "tokenizer.json"), config, cfg.model)
    check_same_model(config, cfg.model, folder)
    load_full_weights(model, exported.state_dict())
    print(f"fine-tuning the model exported to {folder} (step {config['bdh_export']['step']} of its run): its weights, "
          f"a fresh optimizer, from step 1, in a new run directory")


# ---- the commands a run prints: the one that resumes it, the one that trains it on

def resume_command_for(ranks: Ranks, train_command: str, where: Path) -> str:
    """The command that continues a run from `where`: its run directory (its newest checkpoint
    then), or a checkpoint file."""
    return f"{launcher(ranks)}{train_command} {shlex.quote(f'training.resume_from_checkpoint={where}')}"


def with_max_iters(train_command: str, max_iters: int) -> str:
    """train()'s `train_command` with max_iters set, for the command that trains a finished run on."""
    words = [word for word in shlex.split(train_command) if not word.startswith("training.max_iters=")]
    return shlex.join([*words, f"training.max_iters={max_iters}"])


def without_unused_checkpoint_dir(train_command: str, checkpoint_dir: str) -> str:
    """train()'s `train_command` without a training.checkpoint_dir other than the run's (`checkpoint_dir`),
    one a resume in place did not use: the commands it prints would say so again."""
    def unused(word):
        key, _, value = word.partition("=")
        return key == "training.checkpoint_dir" and os.path.realpath(value) != os.path.realpath(checkpoint_dir)
    return shlex.join(word for word in shlex.split(train_command) if not unused(word))


def launcher(ranks: Ranks) -> str:
    """How this run was started, for the resume command."""
    if not ranks.enabled:
        return "python "
    if int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size)) == ranks.world_size:
        return f"torchrun --standalone --nproc_per_node={ranks.world_size} "
    return "torchrun <the same rendezvous flags> "
