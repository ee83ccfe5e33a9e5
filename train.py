"""Train BDH.

    python train.py [--config config.yaml] [--print-config] [section.key=value ...]
"""
import argparse
import ctypes
import dataclasses
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from checkpoint import (PROJECT_VERSION, CheckpointError, RunDir, clean_stale_temporaries,
                        load_checkpoint, model_config_mismatch, optimizer_state_for, resolve_resume,
                        rng_state, set_rng_state)
from config import Config, ConfigError
from data import (DataError, data_order, decode, list_units, loader_workers, resume_point,
                  train_loader, validation_batches)
from distributed import (DistributedError, Ranks, communication_failure, full_state, full_weights,
                         gradient_sync, load_full_state, local_tensor, shutdown, start, wrap)
from fp8 import FP8Error, fp8_model
from lowbit import AdamW4bit, LowBitError, adamw_state_bytes, convert_adamw_state, quantization_aware_view
from model import BDH
from shards import ensure_sample_corpus

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SAMPLE_TOKENS = 200


class TrainingError(Exception):
    pass


def pick_device(requested: str) -> torch.device:
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (requested == "cuda" and not cuda) or (requested == "mps" and not mps):
        raise TrainingError(f"training.device: {requested} requested but not available to this "
                         f"torch {torch.__version__}; set training.device to auto or cpu")
    return torch.device(requested)


def steady_host_memory(cfg: Config, device: torch.device):
    """CPU training of a model whose (H, B, T, N) latents exceed glibc's dynamic mmap range
    (32 MiB): those are mmapped anyway, but glibc then raises its mmap threshold and carves the
    step's 4-32 MiB masks and tiles from the heap, which fragments it: peak RSS grows by hundreds
    of MiB. A fixed 4 MiB threshold gives them their own mappings. Smaller models keep glibc's
    default, which reuses their tensors without page faults."""
    m, t = cfg.model, cfg.training
    latent_bytes = 4 * t.batch_size * t.block_size * m.mlp_internal_dim_multiplier * m.n_embd
    if device.type == "cpu" and latent_bytes > 32 << 20:
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass  # not glibc


def learning_rate(step: int, t) -> float:
    """Linear warmup over warmup_iters, then cosine decay to min_lr at max_iters."""
    if step <= t.warmup_iters:
        return t.learning_rate * step / max(1, t.warmup_iters)
    progress = (step - t.warmup_iters) / max(1, t.max_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (t.learning_rate - t.min_lr)


def make_optimizer(model: BDH, t, lp, device) -> torch.optim.Optimizer:
    """AdamW, or AdamW4bit with low_precision.use_4bit_optimizer. Weight decay on the four matmul
    weights; none on the embedding table."""
    decay = [model.encoder, model.encoder_v, model.decoder, model.lm_head]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": [model.embed.weight], "weight_decay": 0.0}]
    if lp.use_4bit_optimizer:
        return AdamW4bit(groups, lr=t.learning_rate, betas=(0.9, 0.95), quant_type=lp.quantization_type,
                         double_quant=lp.use_double_quant)
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(0.9, 0.95), fused=device.type == "cuda")


def describe_optimizer(optimizer, model, lp) -> str:
    full = adamw_state_bytes(model.parameters())
    if not isinstance(optimizer, AdamW4bit):
        return f"AdamW, state {full / 2**20:.2f} MiB"
    state = optimizer.state_bytes()
    return (f"AdamW4bit ({lp.quantization_type}{', double quant' if lp.use_double_quant else ''}), "
            f"state {state / 2**20:.2f} MiB = {state / full:.3f} x AdamW's {full / 2**20:.2f} MiB")


class GracefulStop:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit 0. In a single process a second
    Ctrl-C stops at once; under torchrun the agent forwards the signal it got itself, so repeats
    are expected and ignored (the agent kills the ranks 30 s later anyway). The handler only
    records the signal: printing from it could re-enter a print the loop is in."""

    def __init__(self, second_signal_stops: bool):
        self.signal_name = None
        self.second_signal_stops = second_signal_stops
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        elif self.second_signal_stops:
            raise KeyboardInterrupt


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def evaluated_weights(low_precision: dict):
    """What a validation loss measures: the weights as trained, or their 4-bit round trip."""
    lp = low_precision
    return (lp["quantization_type"], lp["use_double_quant"]) if lp["use_4bit"] else "as trained"


@torch.no_grad()
def evaluate(model, val_batches, device, autocast, generator, ranks: Ranks) -> tuple[float, str]:
    """Mean validation loss and a sample continuing the first validation window. Rank r takes
    batches r, r + world_size, ...; every rank runs as many forwards (FSDP gathers weights in
    each), a rank short of a batch repeats the first one and does not count it. Runs the
    uncompiled model: eval mode and generation lengths would each trigger a recompile."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, batches
    for i in range(math.ceil(len(val_batches) / ranks.world_size)):
        k = ranks.rank + i * ranks.world_size
        x, y = val_batches[k if k < len(val_batches) else 0]
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        if k < len(val_batches):
            totals += torch.stack([loss.double(), loss.new_ones((), dtype=torch.float64)])
    loss_sum, count = ranks.total(totals).tolist()
    prompt = val_batches[0][0][:1, :32].to(device)
    generator.manual_seed(0)
    with autocast, full_weights(model, ranks):
        out = model.generate(prompt, SAMPLE_TOKENS, temperature=0.8, top_k=None, generator=generator)
    model.train()
    return loss_sum / count, decode(out[0].tolist())


def train(cfg: Config, config_path: str, ranks: Ranks, device: torch.device) -> int:
    t = cfg.training
    steady_host_memory(cfg, device)
    dtype = DTYPES[cfg.low_precision.compute_dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    log_freq = 1 if t.debug else t.log_freq
    use_compile = (t.compile is True or (t.compile == "auto" and device.type == "cuda")) and not t.debug
    if t.debug:
        torch.autograd.set_detect_anomaly(True)
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)

    if ranks.local_rank == 0:
        ensure_sample_corpus(cfg)
    ranks.barrier()
    units = list_units(cfg.dataset.parquet_dir, cfg.dataset.text_column)
    val_batches = validation_batches(cfg, units)

    model = BDH(cfg.to_bdh_config()).to(device)  # the same weights on every rank: same seed
    model.activation_checkpointing = t.activation_checkpointing
    lp = cfg.low_precision
    # use_4bit: the steps after qat_start train through the 4-bit round trip; every evaluation
    # measures the 4-bit model (before qat_start: the current weights quantized after the fact)
    qat_view = quantization_aware_view(lp.quantization_type, lp.use_double_quant) if lp.use_4bit else None
    qat_start = min(round(lp.qat_start_fraction * t.max_iters), t.max_iters - 1)  # at least the last step
    trainable, fp8_recipe = fp8_model(model, cfg, device) if lp.use_fp8 else (model, None)
    wrapped = wrap(trainable, ranks, device)
    optimizer = make_optimizer(model, t, lp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if ranks.enabled:  # dropout masks differ between ranks
        torch.manual_seed(t.seed + ranks.rank)
    if ranks.main and (removed := clean_stale_temporaries(t.checkpoint_dir)):
        print(f"removed {removed} temporary file(s) left by an interrupted checkpoint write")
    run = RunDir(t.checkpoint_dir, writer=ranks.main)
    step, data_resume, best_val_loss, last_saved = 0, None, math.inf, None
    if t.resume_from_checkpoint:
        path = resolve_resume(t.resume_from_checkpoint, t.checkpoint_dir)
        ckpt = load_checkpoint(path)
        model_config_mismatch(ckpt["model_config"], dataclasses.asdict(cfg.to_bdh_config()), path)
        optimizer_state = optimizer_state_for(optimizer, ckpt["optimizer"],
                                              {p: name for name, p in model.named_parameters()})
        if ckpt["config"]["low_precision"]["use_4bit_optimizer"] != lp.use_4bit_optimizer:
            print(f"converting the checkpoint's optimizer state to "
                  f"{'4-bit' if lp.use_4bit_optimizer else 'float32'} moments (use_4bit_optimizer changed)")
            shapes = {name: p.shape for name, p in model.named_parameters()}
            convert_adamw_state(optimizer_state, shapes, lp.use_4bit_optimizer, lp.quantization_type,
                                lp.use_double_quant)
        load_full_state(model, optimizer, ckpt["model"], optimizer_state)
        scaler.load_state_dict(ckpt["scaler"])
        rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # version 0.1: one process
        if len(rngs) == ranks.world_size:
            set_rng_state(rngs[ranks.rank], device)
        else:  # another world size: the data order changes too (resume_point says so)
            torch.manual_seed(t.seed + ranks.rank + 1000 * ckpt["step"])
        step, data_resume = ckpt["step"], ckpt.get("data")
        best_val_loss = ckpt.get("best_val_loss", math.inf)
        if evaluated_weights(ckpt["config"]["low_precision"]) != evaluated_weights(dataclasses.asdict(lp)):
            best_val_loss = math.inf
            print("validation losses now measure other weights (use_4bit or its code book changed): "
                  "best.pt starts afresh")
        run, last_saved = RunDir(t.checkpoint_dir, path=path.parent, writer=ranks.main), path
        run.truncate_metrics(step)
        print(f"resuming from {path} at step {step + 1}")
        for line in run.record_resumed_config(step, cfg.to_dict(), cfg.to_yaml()):
            print(f"  config changed: {line}")
        if step >= t.max_iters:
            print(f"nothing to do: the checkpoint is at step {step} and training.max_iters is "
                  f"{t.max_iters}; raise max_iters to train further")
            return 0
    forward = torch.compile(wrapped) if use_compile else wrapped

    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = t.batch_size * t.block_size * t.gradient_accumulation_steps * ranks.world_size
    processes = (f" | {ranks.world_size} processes ({ranks.mode}), global batch {t.batch_size} x "
                 f"{t.gradient_accumulation_steps} x {ranks.world_size}" if ranks.enabled else "")
    print(f"BDH {n_params / 1e6:.2f}M parameters | device {device} | {cfg.low_precision.compute_dtype}"
          f" | compile {use_compile} | {len(units)} data units | {tokens_per_step:,} tokens/step"
          + processes + f"\noptimizer {describe_optimizer(optimizer, model, lp)}"
          + (f" | 4-bit quantization-aware training ({lp.quantization_type}) of encoder, encoder_v, "
             f"decoder from step {qat_start + 1}; validation losses are the 4-bit model's" if lp.use_4bit else "")
          + (f" | FP8 GEMMs for encoder, encoder_v, decoder: {fp8_recipe}" if fp8_recipe else "")
          + (" | DEBUG: anomaly detection, per-step logs and finiteness checks" if t.debug else ""))

    workers = loader_workers(cfg, units, ranks.world_size)
    start_positions, batches_consumed, first_epoch = resume_point(cfg, workers, data_resume, ranks.world_size)
    loader = iter(train_loader(cfg, units, workers, start_positions, batches_consumed, first_epoch,
                               pin_memory=cfg.dataloader.pin_memory and device.type == "cuda",
                               rank=ranks.rank, world_size=ranks.world_size))
    # this rank's readers' positions after the batches consumed so far: the checkpoint's data position
    positions = {p["reader"]: p for p in start_positions if p["reader"] // max(1, workers) == ranks.rank}
    sample_generator = torch.Generator(device=device)
    stop = GracefulStop(second_signal_stops=not ranks.enabled)
    model.train()
    start = last_log = time.perf_counter()
    loss_sum, loss_count, steps_since_log = torch.zeros((), device=device), 0, 0

    def save(step, name=None):
        """Every rank takes part (positions and RNG states are gathered, FSDP gathers weights);
        rank 0 writes."""
        model_state, optimizer_state = full_state(model, optimizer)
        all_positions = sorted((p for rank_positions in ranks.gather(positions)
                                for p in rank_positions.values()), key=lambda p: p["reader"])
        state = {"step": step, "best_val_loss": best_val_loss, "model": model_state,
                 "optimizer": optimizer_state, "scaler": scaler.state_dict(),
                 "model_config": dataclasses.asdict(cfg.to_bdh_config()),
                 "config": cfg.to_dict(), "rng": ranks.gather(rng_state(device)),
                 "data": {"order": data_order(cfg, workers, ranks.world_size),
                          "batches": batches_consumed, "positions": all_positions},
                 "versions": {"torch": str(torch.__version__), "project": PROJECT_VERSION}}
        return ranks.gather(run.save(step, state, cfg.to_yaml(), name))[0]  # rank 0's path, for all

    while step < t.max_iters:
        step += 1
        lr = learning_rate(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.weight_view = qat_view if step > qat_start else None
        if qat_view and step == qat_start + 1 and step > 1:
            print(f"step {step}: quantization-aware training starts (4-bit forward from here on)")
        for micro in range(t.gradient_accumulation_steps):
            x, y, position = next(loader)
            positions[position["reader"]] = position
            batches_consumed += 1
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if t.debug and step == 1 and loss_count == 0:
                print(f"first batch {tuple(x.shape)}: {decode(x[0, :80].tolist())!r}")
            with gradient_sync(wrapped, ranks, sync=micro == t.gradient_accumulation_steps - 1):
                with autocast:
                    _, loss = forward(x, y)
                scaler.scale(loss / t.gradient_accumulation_steps).backward()
            loss_sum += loss.detach()
            loss_count += 1
        if t.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        steps_since_log += 1
        stopping = ranks.any(stop.signal_name is not None, device)
        if stopping:
            print(f"{stop.signal_name or 'a signal to another rank'}: saving a checkpoint after step {step}"
                  + (" (Ctrl-C again to stop at once)" if stop.second_signal_stops else ""), flush=True)

        if step % log_freq == 0 or step == t.max_iters:
            train_loss = float(ranks.mean(loss_sum / loss_count))
            if not math.isfinite(train_loss):
                raise non_finite("the training loss", step, last_saved)
            now = time.perf_counter()
            ms = (now - last_log) * 1000 / steps_since_log
            record = {"step": step, "train_loss": train_loss, "lr": lr,
                      "tokens_per_s": round(tokens_per_step * 1000 / ms), "ms_per_step": round(ms, 2),
                      "elapsed_s": round(now - start, 2)}
            print(f"step {step}/{t.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | "
                  f"{record['tokens_per_s']:,} tok/s | {ms:.1f} ms/step | elapsed "
                  f"{fmt_time(now - start)} | eta {fmt_time(ms * (t.max_iters - step) / 1000)}", flush=True)
            run.log(record)
            loss_count, steps_since_log, last_log = 0, 0, time.perf_counter()
            loss_sum.zero_()

        if step % t.test_freq == 0 or step == t.max_iters:
            model.weight_view = qat_view
            val_loss, sample = evaluate(model, val_batches, device, autocast, sample_generator, ranks)
            print(f"step {step}: val loss {val_loss:.4f}\n--- sample ---\n{sample}\n--------------", flush=True)
            run.log({"step": step, "val_loss": val_loss, "sample": sample})
            if val_loss < best_val_loss:
                best_val_loss = val_loss
                print(f"saved {save(step, name='best.pt')} (best validation loss so far)", flush=True)
            last_log = time.perf_counter()  # evaluation time is not training time

        if step % t.checkpoint_freq == 0 or step == t.max_iters or stopping:
            finite = all(local_tensor(p).isfinite().all() for p in model.parameters())
            if ranks.any(not finite, device):
                raise non_finite("a weight", step, last_saved)
            last_saved = save(step)
            run.prune(t.keep_last_n)
            print(f"saved {last_saved}", flush=True)
            last_log = time.perf_counter()
        if stopping:
            launcher = "python "
            if ranks.enabled:
                one_node = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size)) == ranks.world_size
                launcher = (f"torchrun --standalone --nproc_per_node={ranks.world_size} " if one_node
                            else "torchrun <the same rendezvous flags> ")
            print(f"stopped by {stop.signal_name or 'a signal to another rank'} after step {step}. "
                  f"Resume with:\n  {launcher}train.py --config {config_path} "
                  f"training.resume_from_checkpoint={last_saved}")
            return 0
    print(f"done: {step} steps in {fmt_time(time.perf_counter() - start)}; final checkpoint {last_saved}")
    return 0


def non_finite(what: str, step: int, last_saved) -> TrainingError:
    where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved"
    return TrainingError(f"{what} is not finite at step {step} (nothing saved; {where}): lower "
                         f"training.learning_rate, set training.grad_clip, or use "
                         f"training.debug=true to find the operation")


def one_line(e: Exception) -> str:
    """DataLoader workers re-raise errors with their traceback in the message: keep the last line."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text.split("DataError: ", 1)[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train BDH on parquet shards.")
    parser.add_argument("--config", default="config.yaml", help="YAML config (default config.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = Config.from_yaml(args.config, args.overrides)
    except ConfigError as e:
        for problem in e.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ranks = Ranks()
    try:
        ranks, device = start(cfg, pick_device(cfg.training.device))
        return train(cfg, args.config, ranks, device)
    except (DataError, CheckpointError, TrainingError, DistributedError, FP8Error, LowBitError) as e:
        print(f"error{rank_tag(ranks)}: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopped at once without saving; the run's earlier checkpoints are intact",
              file=sys.stderr)
        return 130
    except Exception as e:
        if (failure := communication_failure(e, ranks, cfg.training.distributed_timeout_s)) is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        shutdown()


def rank_tag(ranks: Ranks) -> str:
    return f" (rank {ranks.rank})" if ranks.enabled else ""

if __name__ == "__main__":
    sys.exit(main())
