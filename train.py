"""Train BDH.

    python train.py [--config config.yaml] [--print-config] [section.key=value ...]

main() loads the config and joins the processes torchrun started (if any); train() sets up the
data, the model and the optimizer, resumes from a checkpoint (resume.py), describes the run (console.py), then
loops: step, log, evaluate (evaluation.py), checkpoint.
"""
import os
import signal

# Ctrl-C during the slow `import torch` below: exit with one line, not a traceback from inside torch; a repeat of
# the signal (a wrapper forwarding the same one) is ignored. main() gives the handlers back at the end.
handlers_before_import = {}
if __name__ == "__main__":
    def stop_while_importing(signum, _frame):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        try:
            if os.environ.get("RANK", "0") == "0":  # under torchrun: once (every rank heard it)
                os.write(2, f"\n{signal.Signals(signum).name}: stopped while starting, before anything ran\n".encode())
        except OSError:  # no reader left (a closed terminal)
            pass
        os._exit(130)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handlers_before_import[sig] = signal.getsignal(sig)
        if handlers_before_import[sig] != signal.SIG_IGN:  # (nohup's SIGHUP stays ignored)
            signal.signal(sig, stop_while_importing)

import argparse
import math
import multiprocessing
import random
import shlex
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from adamw4bit import make_optimizer
from arguments import add_config_arguments, load_config, parse_arguments
from checkpoint import CheckpointError, saved_step
from config import learning_rate, step_tokens
from config_file import with_comments
from console import describe_run, done_lines, evaluation_lines
from data import prepare_data, rank_positions, train_loader
from distributed import (DistributedError, Ranks, communication_failure, failed, first_process, gradient_sync,
                         local_tensor, peers_lost, several_processes, shutdown, start, wrap)
from evaluation import evaluate, tokens_per_byte, validation_fingerprint
from files import script_here
from fp8 import FP8Error, fp8_matmuls
from locate import found_newest
from lowbit import LowBitError, check_bitsandbytes, quantization_aware_view
from metrics import MetricsError, MetricsLog, check_installed
from model import BDH
from outputs import outputs_without_reader, put_back_outputs
from positions import data_order
from readers import loader_workers
from resume import (Progress, checkpoint_size, load_saved_state, resume, resume_command_for, resume_target, save,
                    set_rng_state, torch_rng_state, with_max_iters, without_unused_checkpoint_dir)
from resume_checks import check_run_data_given, command_line_record, data_settings_hint
from resume_validation import keep_split_by_position
from rundir import (RunDir, check_writable, clean_stale_temporaries, release_run_directories, remove_empty_runs,
                    unfinished_older_run, unfinished_run)
from runtime import (DTYPES, DeviceError, autocast, check_host_memory, device_clock, emulated_dtype_warning, interrupted,
                     memory_fix, one_line, out_of_memory, peak_flops, pick_device, prepare_compile,
                     resolve_compute_dtype, steady_host_memory)
from shards import DataError
from step_log import StepLog
from stopping import (EVALUATING, SAVING, SIGNALS, STEPPING, GracefulStop, StepVote, StoppedWhileClosing, exit_with,
                      handle_signals, heard_at_once, interrupt_at_once, raise_if_heard, report_stopped_at_once,
                      resume_command, signal_of, signals_held, stop_loader_workers, swallowed_stops_unsaid,
                      tearing_down)
from tokenizer import TokenizerError
from validation import unmeasured_validation, validation_batches


class TrainingError(Exception):
    pass


def train(cfg, train_command: str, ranks: Ranks, device: torch.device, command_line: dict,
          resume_named_in_file: str | None = None) -> int:
    """`train_command`: train.py and the command line's, for the commands it prints: the resume after a
    signal, an error or running out of memory, and the one that trains a finished run further;
    `command_line`: its config file and the settings it gives (resume_checks.command_line_record);
    `resume_named_in_file`: the config file, where training.resume_from_checkpoint comes from it (the command line
    does not give it): resume_target refuses a checkpoint there whose run has gone on since."""
    training = cfg.training
    compute_dtype = resolve_compute_dtype(device, cfg.low_precision.compute_dtype)
    # FP8 on a device or with a backend that cannot run it: refused before anything is read
    matmuls, fp8_recipe = fp8_matmuls(cfg.fp8, device) if cfg.low_precision.use_fp8 else (None, None)
    if cfg.low_precision.use_4bit:
        check_bitsandbytes()
    compute = autocast(device, compute_dtype)
    if warning := emulated_dtype_warning(device, compute_dtype):
        print(warning)
    compile_model = prepare_compile(training, device)
    torch.autograd.set_detect_anomaly(training.debug)
    steady_host_memory(cfg, device)
    if device.type == "cpu":
        check_host_memory(cfg, ranks, compute_dtype)
    # MFU's peak, before the seeds: a measured peak draws random matrices (peak_flops resets the
    # memory statistics after it)
    peak, peak_source = peak_flops(device, DTYPES[compute_dtype]) if device.type == "cuda" else (0, "")
    tokens_per_step = step_tokens(training, ranks.world_size)
    random.seed(training.seed)
    np.random.seed(training.seed)
    torch.manual_seed(training.seed)

    # ---- data
    if ranks.main:
        check_writable(training.checkpoint_dir)
        check_installed(cfg.logging)
    # auto becomes latest or None (a new run), in the config itself: resume.py and main() read it from there
    training.resume_from_checkpoint = resume_target(training, ranks, device, resume_named_in_file)
    check_run_data_given(cfg, command_line)  # a resume that leaves out its run's data: refused before it is read
    keep_split_by_position(cfg, command_line, ranks, device)
    try:
        tokenizer, units = prepare_data(cfg, ranks)
        val_batches = validation_batches(cfg, units, tokenizer)
    except (DataError, TokenizerError) as e:
        if training.resume_from_checkpoint and (hint := data_settings_hint(cfg, e)):
            raise type(e)(f"{e}{hint}") from None
        raise
    val_tokens_per_byte = tokens_per_byte(val_batches, tokenizer)
    val_fingerprint = validation_fingerprint(val_batches)
    workers = loader_workers(cfg, units, ranks.world_size, announce=ranks.main)
    order = data_order(cfg, units, workers, ranks.world_size)  # what decides the batches' order: checkpoints save it
    if ranks.main and not training.resume_from_checkpoint and (
            note := unmeasured_validation(cfg, units, val_batches, val_tokens_per_byte, ranks.world_size)):
        print(note)

    # ---- resume: where the run stands (the checkpoint's weights are loaded once the model exists)
    def resumable_from(where: Path):  # what a stop, an error or a lost peer prints from now on: the resume from `where`
        resume_command[:] = [resume_command_for(ranks, train_command, where)]

    if training.resume_from_checkpoint:
        run, progress, start_positions = resume(cfg, tokenizer, units, workers, order, val_batches, ranks, device,
                                                command_line)
        train_command = without_unused_checkpoint_dir(train_command, training.checkpoint_dir)
        if progress.step >= training.max_iters:
            print(f"nothing to do: the checkpoint {progress.last_saved} is at step {progress.step} and "
                  f"training.max_iters is {training.max_iters}; raise max_iters to train further")
            older = found_newest(training) and unfinished_older_run(training.checkpoint_dir, progress.last_saved.parent)
            if ranks.main and older:
                print(older)
            return 0
        if progress.last_saved:  # (a fine-tune of an export starts a run of its own)
            # the run's folder (its newest checkpoint) where the run goes on in it, else the file itself
            in_place = run.path == progress.last_saved.parent
            resumable_from(run.path if in_place else progress.last_saved)
    else:  # a new run, whose directory the first checkpoint creates
        run, progress = RunDir(training.checkpoint_dir, writer=ranks.main), Progress()
        start_positions = []
        if ranks.main and (note := unfinished_run(training.checkpoint_dir)):
            print(note)
    progress.val_fingerprint = val_fingerprint
    progress.command_line = progress.command_line or command_line  # (a resume keeps the run's too)

    # ---- the training stream: its workers start before the model exists (forked later, on CPU, each would keep
    # the pages of the weights and moments it was forked with as the steps rewrite them: a copy of each)
    with signals_held():
        loader = iter(train_loader(cfg, units, tokenizer, workers, start_positions, progress.batches_consumed,
                                   pin_memory=cfg.dataloader.pin_memory and device.type == "cuda",
                                   rank=ranks.rank, world_size=ranks.world_size))
    progress.positions = rank_positions(start_positions, ranks.rank, workers)

    # ---- model and optimizer
    raw_model, qat_view, qat_start = build_model(cfg, device, matmuls)  # same seed, same weights on every rank
    model = wrap(raw_model, ranks, device)  # DDP or FSDP under torchrun; the model itself otherwise
    optimizer = make_optimizer(raw_model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == "float16")
    if ranks.enabled:  # dropout masks differ between ranks, and from the numbers the weights were drawn from
        torch.manual_seed(training.seed + 1 + ranks.rank)
    if training.resume_from_checkpoint:
        load_saved_state(cfg, run, raw_model, optimizer, scaler, tokenizer, progress, ranks, device)
    if ranks.main and (removed := clean_stale_temporaries(training.checkpoint_dir, run.path)):
        print(f"removed {removed} temporary file(s) left by an interrupted checkpoint write")
    if ranks.main and (empty := remove_empty_runs(training.checkpoint_dir)):
        print(f"removed {', '.join(empty)}: empty, left by a run killed during its first checkpoint")
    if ranks.main and (warning := run.space_warning(checkpoint_size(raw_model, cfg.low_precision,
                                                                    progress.last_saved))):
        print(warning)
    if compile_model:
        model = torch.compile(model)

    # ---- describe the run
    continues_run_dir = run.path is not None
    metrics = MetricsLog(run, cfg, device, resumed_step=progress.step if continues_run_dir else None,
                         evaluation_due=progress.evaluation_due)
    val_windows = sum(len(x) for x, _ in val_batches)
    print(describe_run(cfg, raw_model, optimizer, ranks, device, compute_dtype, units, val_windows, run, compile_model,
                       fp8_recipe, qat_start, peak_source), flush=True)

    # ---- stopping, logging, sampling
    stop = GracefulStop(second_signal_stops=not ranks.enabled, announce=ranks.main, at_once=True)
    sample_generator = torch.Generator(device=device)
    stop_vote = StepVote(ranks)  # whether any rank heard a signal (under torchrun: one step late)
    compiling_steps = ()  # their time is mostly compilation
    if compile_model:
        compiling_steps = (progress.step + 1, qat_start + 1) if qat_view else (progress.step + 1,)
    step_log = StepLog(cfg, metrics, ranks, device, units, workers, progress.positions.values(),
                       first_step=progress.step + 1, compiling_steps=compiling_steps, loss_scaled=scaler.is_enabled(),
                       peak=peak, saved_passes=progress.passes)
    progress.since = step_log.start
    model.train()

    # ---- what the loop calls: checkpoints, evaluations
    def save_checkpoint(at: Progress, name=None, best=False) -> Path:  # every rank takes part; rank 0 writes
        at.passes = step_log.passes(at.positions.values())
        try:
            return save(run, at, raw_model, optimizer, scaler, cfg, order, ranks, device, tokenizer, name=name,
                        best=best)
        except CheckpointError as e:  # a full disk, say
            saved = "earlier checkpoints are intact"
            if best and run.path and saved_step(run.path / "best.pt") == at.step:  # written, then its copy failed
                saved = "best.pt of this step is saved"
                resumable_from(run.path)
            raise CheckpointError(f"{e}; " + (f"{saved}: once that is fixed, resume with `{resume_command[0]}`"
                                             if resume_command else "no checkpoint was saved before")) from None

    def check_weights(at: Progress):  # the loss is taken before the update: a bad update shows in the weights only
        finite = all(local_tensor(p).isfinite().all() for p in raw_model.parameters())
        if ranks.any(not finite, device):
            raise non_finite("a weight", at.step, at.last_saved, training)

    def save_step(at: Progress, best=False, checked=False):  # checkpoint_<step>.pt; older ones go; best: best.pt too
        if not checked:  # (by this step's evaluation)
            check_weights(at)
        at.last_saved = save_checkpoint(at, best=best)
        resumable_from(at.last_saved.parent)
        run.prune(training.keep_last_n)
        metrics.flush(sync=True)  # the first checkpoint creates the run directory: what waited is written now
        if best:
            print(f"saved {at.last_saved.with_name('best.pt')} (best validation loss so far)", flush=True)
        print(f"saved {at.last_saved}" + " (a copy of best.pt)" * best, flush=True)

    def evaluate_step(at: Progress) -> bool:
        """Whether the validation loss is the best so far (at.best_val_loss is then set). Every rank takes part."""
        check_weights(at)
        at.evaluation_due = False
        with paused(step_log, stop, EVALUATING, device):
            raw_model.weight_view = qat_view  # use_4bit: the 4-bit model is measured (each step sets its own)
            raw_model.eval()
            record = {"step": at.step, "tokens": at.tokens, "weights_4bit": qat_view is not None,
                      "validation_batches": at.val_fingerprint, **evaluate(
                raw_model, val_batches, device, compute, sample_generator, ranks, tokenizer, val_tokens_per_byte)}
            if at.measured_anew:  # not comparable with the records before: plot.py breaks the line
                record["measured_anew"], at.measured_anew = True, False
            raw_model.train()
            print(evaluation_lines(record), flush=True)
            metrics.log(record)
        if not record["val_loss"] < at.best_val_loss:
            if math.isnan(record["val_loss"]):  # the weights are finite: the evaluation's forward overflowed
                print("  note: the validation loss is not a number: not taken as the best"
                      + FLOAT16_OVERFLOW * (compute_dtype == "float16"), flush=True)
            return False
        at.best_val_loss = record["val_loss"]
        return True

    def save_best(at: Progress):  # best.pt alone
        with paused(step_log, stop, SAVING, device):  # (timed as a checkpoint: the ETA counts evaluations apart)
            path = save_checkpoint(at, name="best.pt")
        resumable_from(path.parent)  # (its folder: resumes from its newest)
        print(f"saved {path} (best validation loss so far)", flush=True)

    if progress.evaluation_due and evaluate_step(progress):  # a stop saved this step before its evaluation
        save_best(progress)
    while progress.step < training.max_iters:
        # ---- one optimizer step: gradient accumulation over micro-batches
        # what a data error in this step saves (one process): the progress, and the random state before
        # dropout drew the step's first micro-batches' masks (with one micro-batch, an error comes before any draw)
        before = replace(progress, positions=dict(progress.positions))
        rng_before = (torch_rng_state(device) if training.gradient_accumulation_steps > 1 and not ranks.enabled
                      else None)
        step = progress.step = progress.step + 1
        progress.tokens += tokens_per_step
        lr = learning_rate(step, training)
        for group in optimizer.param_groups:
            group["lr"] = lr
        raw_model.weight_view = qat_view if step > qat_start else None
        if qat_view and step == qat_start + 1 and step > 1:
            print(f"step {step}: quantization-aware training starts (4-bit forward from here on)")
        for micro in range(training.gradient_accumulation_steps):
            wait_start = time.perf_counter()
            try:
                x, y, position = next(loader)
            except DataError as e:  # a shard damaged or removed after the start's checks
                raise stop_for_data(e, step, before, rng_before, save_step, step_log, ranks, device) from None
            step_log.data_wait_s += time.perf_counter() - wait_start
            progress.positions[position["reader"]] = position
            progress.batches_consumed += 1
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if training.debug and step == 1 and micro == 0:
                start = tokenizer.decode(x[0, :80].tolist())
                print(f"first batch {tuple(x.shape)}, its first window's start: {start!r}")
            with gradient_sync(model, ranks, sync=micro == training.gradient_accumulation_steps - 1):
                with compute:
                    _, loss = model(x, y)
                scaler.scale(loss / training.gradient_accumulation_steps).backward()
            step_log.add_micro_batch(loss)
        scaler.unscale_(optimizer)
        # the norm before clipping; max_norm inf leaves the gradients as they are
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), training.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        step_log.add_step(grad_norm)
        scaler.step(optimizer)  # float16: skipped if the gradients are not finite (and the scale lowered)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        # until this process's first step is done a signal stops at once (GracefulStop's at_once); from here on the
        # step is saved first. (A KeyboardInterrupt raised in a callback torch.compile set is swallowed: raised here.)
        if stop.at_once:
            raise_if_heard()
        stop.at_once = False
        stopping = stop_vote.ask(stop.heard)  # the same on every rank, as is each re-poll of it below (collectives)
        evaluating = step % training.test_freq == 0 or step == training.max_iters
        saving = step % training.checkpoint_freq == 0 or step == training.max_iters

        # ---- log
        if step_log.due(step, ends_a_stretch=evaluating or saving or stopping):
            write_step_line(step_log, step, lr, progress)
        if not ranks.enabled:  # heard while the line was written (under torchrun the vote tells each rank)
            stopping = stopping or stop.heard
        elif evaluating and not stopping:  # this step's vote, not the next one's: heard in it, save first
            stopping = stop_vote.settle()
        # a stop saves before anything slow: the evaluation that would have started waits for the resume's next
        deferred_evaluation = evaluating and stopping and step < training.max_iters
        evaluating = evaluating and not deferred_evaluation

        # ---- evaluate
        progress.evaluation_due = deferred_evaluation  # (the checkpoint says so: its resume evaluates first)
        best = evaluating and evaluate_step(progress)
        if evaluating:  # heard meanwhile? (`stopping` is the same on every rank: all skip this collective, or none)
            stopping = stopping or ranks.any(stop.heard, device)
        if best and not (saving or stopping):  # (else this step's checkpoint writes best.pt too: written once)
            save_best(progress)
            best, stopping = False, ranks.any(stop.heard, device)  # heard while best.pt was written: stop now

        # ---- checkpoint
        if stopping:
            print(f"{stop.signal_name or 'a signal to another rank'}: saving a checkpoint after step {step}"
                  + (" (before the evaluation due at this step, which the resume runs first)" * deferred_evaluation),
                  flush=True)
        if saving or stopping:
            with paused(step_log, stop, SAVING, device):
                save_step(progress, best=best, checked=evaluating)
            stopping = stopping or ranks.any(stop.heard, device)  # heard while saving: that one
        if stopping and step < training.max_iters:  # (at max_iters: done, as planned)
            stop.closing(f"stopped by {stop.signal_name or 'a signal to another rank'} after step {step}. Resume "
                         f"with:\n  {resume_command[0]}")
            if step_log.steps:  # heard while evaluating or saving a step that was not logged: its line now
                write_step_line(step_log, step, lr, progress)
            break
    if progress.step >= training.max_iters:  # (not stopped early): the command that trains on, to twice the steps
        stop.closing(done_lines(progress, here=progress.step - step_log.first_step + 1, passes=step_log.passes_logged,
                                seconds=time.perf_counter() - step_log.start,
                                train_on=resume_command_for(ranks, with_max_iters(train_command, 2 * progress.step),
                                                            progress.last_saved.parent)))
    stop_vote.settle()
    metrics.close()
    print(stop.last_words)
    return 0


def build_model(cfg, device: torch.device, matmuls=None):
    """(the model, the 4-bit weight view or None, the step after which quantization-aware training
    starts). `matmuls`: its weight products (fp8.fp8_matmuls'), if not model.py's own. use_4bit: the steps
    after qat_start train through the 4-bit round trip; every evaluation measures the 4-bit model
    (before qat_start: the current weights quantized after the fact)."""
    low_precision = cfg.low_precision
    model = BDH(cfg.to_bdh_config()).to(device)
    model.activation_checkpointing = cfg.training.activation_checkpointing
    if matmuls is not None:
        model.matmuls = matmuls
    qat_view = None
    if low_precision.use_4bit:
        qat_view = quantization_aware_view(low_precision.quantization_type, low_precision.use_double_quant)
    qat_start = min(round(low_precision.qat_start_fraction * cfg.training.max_iters), cfg.training.max_iters - 1)
    return model, qat_view, qat_start


@contextmanager
def paused(step_log: StepLog, stop: GracefulStop, doing: str, device: torch.device):
    """Time spent `doing` an evaluation or a checkpoint: left out of the next log line's speed; the
    first signal heard meanwhile lets it finish (GracefulStop: what a second one does)."""
    start = device_clock(device)
    stop.doing = doing
    try:
        yield
    finally:
        stop.doing = STEPPING
    took = time.perf_counter() - start
    step_log.paused_s += took
    step_log.took[doing] = took  # the ETA counts those still to come


def write_step_line(step_log: StepLog, step: int, lr: float, progress: Progress):
    """The log line of the steps since the last one, refused if their loss is not finite."""
    record = step_log.measure(step, lr, progress.tokens, progress.positions.values())
    if not math.isfinite(record["train_loss"]):
        raise non_finite("the training loss", step, progress.last_saved, step_log.cfg.training,
                         float16=step_log.loss_scaled)
    step_log.write(record)


def stop_for_data(e: DataError, step: int, before: Progress, rng_before: dict | None, save_step, step_log: StepLog,
                  ranks: Ranks, device: torch.device) -> DataError:
    """A shard damaged or removed after the start's checks (rewritten by prepare.py meanwhile, a
    network disk gone) stops the run. A single-process run first saves the steps before this one, as
    a regular checkpoint would (their log line, the random state before this step), unless they are
    saved already; under torchrun the other ranks wait in this step's gradient all-reduce, and the
    last checkpoint is what there is."""
    saved = before.last_saved is not None and before.last_saved.name == f"checkpoint_{before.step}.pt"
    also = ""
    if not ranks.enabled and before.step > 0 and not saved:
        if rng_before is not None:
            set_rng_state(rng_before, device)
        try:
            if step_log.steps:
                write_step_line(step_log, before.step, learning_rate(before.step, step_log.cfg.training), before)
            save_step(before)
        except (TrainingError, CheckpointError, MetricsError) as failure:
            also = f"; saving step {before.step} failed too: {one_line(failure)}"
    where = (f"the last checkpoint is {before.last_saved}: resume from it once the data is fixed"
             if before.last_saved else "no checkpoint was saved")
    return DataError(f"{one_line(e)} (at step {step}; {where}){also}")


# no softmax bounds BDH's attention: its sums over the context can pass float16's 65,504
FLOAT16_OVERFLOW = ("; in float16, activations past 65,504 overflow: compute_dtype bfloat16 (Ampere and newer GPUs) or "
                    "float32 has the range")


def non_finite(what: str, step: int, last_saved, training, float16: bool = False) -> TrainingError:
    where = f"nothing saved; the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved"
    clip = (f"training.grad_clip (now {training.grad_clip})" if training.grad_clip else
            "set training.grad_clip (e.g. 1.0)")
    return TrainingError(f"{what} is not finite at step {step} ({where}): lower "
                         f"training.learning_rate (now {training.learning_rate}) or {clip}, or use "
                         f"training.debug=true to find the operation" + FLOAT16_OVERFLOW * float16)


def resuming_a_run(cfg) -> bool:
    """Whether the run resumes a checkpoint (train() resolves auto: to latest, or to a new run)."""
    return cfg.training.resume_from_checkpoint not in (None, "auto")


def rank_of(ranks: Ranks) -> str:
    """The " (rank R)" of an error line under torchrun, also before the process group is joined (a device
    refused first); "" in one process."""
    if ranks.enabled:
        return f" (rank {ranks.rank})"
    return f" (rank {os.environ['RANK']})" if several_processes() and "RANK" in os.environ else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train BDH on parquet shards.")
    add_config_arguments(parser)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config, each setting with its comment, and exit")
    args = parse_arguments(parser, argv)
    cfg = load_config(args)
    if args.print_config:
        if first_process():  # under torchrun: once
            print(with_comments(cfg.to_yaml()), end="")
        return 0
    if not getattr(args, "config_given", False) and first_process():
        print(f"config {args.config} (no --config given: the default, sized for a GPU; configs/tiny.yaml is for a CPU)")
    handlers = {sig: handlers_before_import.get(sig, signal.getsignal(sig)) for sig in SIGNALS}
    heard_at_once.clear()
    handle_signals(interrupt_at_once)  # while the run sets up, as Ctrl-C: it stops at once, in one line
    children = multiprocessing.active_children()  # a calling program's own: not the loader's to stop
    ranks, device = Ranks(), cfg.training.device
    resume_command.clear()
    outputs = outputs_without_reader()
    try:
        ranks, device = start(cfg, pick_device(cfg.training.device))
        overrides = {o.partition("=")[0]: o for o in args.overrides}  # a key given twice: its last value
        resume_given = overrides.pop("training.resume_from_checkpoint", None)  # the resume commands add their own
        named_in_file = None if resume_given else args.config  # else the config file may name it (resume_target)
        train_command = shlex.join([script_here("train.py"), "--config", args.config, *overrides.values()])
        with swallowed_stops_unsaid():
            return train(cfg, train_command, ranks, device, command_line_record(args.config, args.overrides),
                         named_in_file)
    except (DataError, TokenizerError, CheckpointError, MetricsError, TrainingError, DeviceError,
            DistributedError, FP8Error, LowBitError) as e:
        return failed(f"error{rank_of(ranks)}: {one_line(e)}", consequence=peers_lost())
    except StoppedWhileClosing as e:  # the checkpoint is saved: the run ended as asked, its logs cut short
        print(f"\n{e.args[0]}\n(stopped while closing the logs: their last records may be missing)")
        return 0
    except KeyboardInterrupt as e:
        return report_stopped_at_once(resuming_a_run(cfg), signal_of(e))
    except Exception as e:
        if stop := interrupted(e):  # torch.compile wraps a KeyboardInterrupt raised while it compiles
            return report_stopped_at_once(resuming_a_run(cfg), signal_of(stop))
        if (request := out_of_memory(e)) is not None:
            asked = f" (asked for {request})" if request else ""
            return failed(f"error{rank_of(ranks)}: out of memory on {device}{asked}: {memory_fix(cfg)}; "
                          + (f"then resume with `{resume_command[0]}` and the new setting" if resume_command else
                             "no checkpoint was saved"))
        resume_line = resume_command[0] if resume_command else None
        if (failure := communication_failure(e, ranks, cfg.training.distributed_timeout_s, resume_line)) is None:
            raise
        return failed(f"error{rank_of(ranks)}: {failure}", consequence=True)
    finally:
        # the status is decided: a signal changes nothing (under torchrun, also where joining failed, the agent's
        # forwarded repeats neither)
        tearing_down(second_signal_stops="WORLD_SIZE" not in os.environ)
        stop_loader_workers(started_before=children)
        release_run_directories()
        shutdown()
        put_back_outputs(outputs)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    exit_with(main)
