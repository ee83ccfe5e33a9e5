"""What a run prints: describe_run, the lines it starts with (model, data, optimizer, notes);
step_line and evaluation_lines, the lines of a step's and an evaluation's metrics records; done_lines, the
run's last words."""
import math
from pathlib import Path

from adamw4bit import AdamW4bit, adamw_state_bytes
from checkpoint import saved_step
from config import learning_rate, step_tokens
from files import byte_amount

CPU_STEP_FLOPS = 1e12  # a few seconds at the bf16 speed of a many-core CPU; config.yaml's model is 5 per step


def step_line(record: dict, max_iters: int, eta: float | None, elapsed: float, at_least: bool = False,
              first: bool = False) -> str:
    """The printed line of a step's metrics record (eta: seconds left; None: no estimate yet;
    at_least: it leaves out evaluations or checkpoints not yet timed, shown as "at least 0:02:29"; first: the
    process's first line, whose wait for data includes the loader's start)."""
    extra = f" | MFU {record['mfu']:.1%}" if "mfu" in record else ""
    if record.get("skipped_steps"):  # float16: gradients overflowed, the scaler skipped those updates
        extra += f" | {record['skipped_steps']} step(s) skipped by the float16 loss scaler"
    if record.get("data_wait", 0) >= 0.05:  # the loader does not keep up (below, it is handing batches over)
        extra += f" | waiting for data {record['data_wait']:.0%}" + " (the loader starting)" * first
    if eta is None:
        eta = "eta after compilation"
    elif record["step"] == max_iters:  # what is left is theirs ("eta 0:00:38" read as a step count gone wrong)
        eta = "final evaluation and checkpoint next" + f", about {format_duration(eta)}" * (not at_least)
    else:
        eta = "eta " + "at least " * at_least + format_duration(eta)
    grad_norm = "-" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
    return (f"step {record['step']}/{max_iters} | loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | grad norm "
            f"{grad_norm} | {record['tokens_per_s']:,} tok/s | {record['ms_per_step']:.1f} ms/step{extra} | "
            f"elapsed {format_duration(elapsed)} | {eta}")


def evaluation_lines(record: dict) -> str:
    """The printed lines of an evaluation's metrics record: its figures and the sample."""
    x_active, y_active = (sum(record[key]) / len(record[key]) for key in ("sparsity_x", "sparsity_y"))
    return (f"step {record['step']}: val loss {record['val_loss']:.4f} | {record['val_bits_per_byte']:.4f} bits/byte | "
            f"active latents: x {x_active:.1%}, y {y_active:.1%} (mean over layers)\n--- sample: validation text ---\n"
            f"{record['sample_prompt']}\n--- the model continues ---\n{record['sample']}\n--------------")


def done_lines(progress, here: int, passes: float, seconds: float, train_on: str) -> str:
    """What a run says when it reaches max_iters: `here`, the steps of this process (a resumed run's
    are fewer); `train_on`, the command that trains it on to twice its steps."""
    step, in_all = progress.step, progress.seconds()
    # (a short run on a large corpus: 0.0012 passes, not 0.00; two figures as rounded: 0.0999 is 0.10)
    rounded = float(f"{passes:.2g}")
    share = f"{passes:.2f}" if rounded >= 0.1 or passes <= 0 else f"{passes:.{1 - math.floor(math.log10(rounded))}f}"
    return (f"done: {step} step{'s' * (step != 1)} ({share} passes over the training data)"
            + (f", the last {here} in this process" if here < step else "") + f" in {format_duration(seconds)}"
            + (f" (the whole run: {format_duration(in_all)})" if here < step and in_all is not None else "")
            + (f"; best validation loss {progress.best_val_loss:.4f} (best.pt{best_step(progress.last_saved)})"
               if math.isfinite(progress.best_val_loss) else "")
            + f"; final checkpoint {progress.last_saved}\nto train on, to step {2 * step} say (the learning rate then "
            f"rises again: its schedule runs to the new max_iters):\n  {train_on}")


def best_step(last_saved: Path) -> str:
    """", of step 1200": the step of best.pt beside the run's last checkpoint; "" if it cannot be read."""
    step = saved_step(last_saved.parent / "best.pt")
    return f", of step {step}" if math.isfinite(step) else ""


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def subfolders(parquet_dir: str, units) -> str:
    """Where a folder's shards lie when they lie in several of its subfolders (a parent folder given
    for one of its datasets trains on all of them): " in 3 top-level folders: ./, de/, en/"."""
    root = Path(parquet_dir)
    if not root.is_dir():  # (a pattern, or one file)
        return ""
    try:
        tops = sorted({f"{parts[0] if len(parts) > 1 else '.'}/" for parts in (Path(u.path).relative_to(root).parts
                                                                               for u in units)})
    except ValueError:  # (not below it as written)
        return ""
    if len(tops) < 2:
        return ""
    return f" in {len(tops)} top-level folders: {', '.join(tops[:5])}{', ...' * (len(tops) > 5)}"


def parameter_count(n: int) -> str:
    """65.5K, 25.3M, 1.61B."""
    return f"{n / 1e9:.2f}B" if n >= 999_950_000 else f"{n / 1e6:.1f}M" if n >= 999_950 else f"{n / 1e3:.1f}K"


def describe_run(cfg, model, optimizer, ranks, device, compute_dtype, units, val_windows: int, run, compiled,
                 fp8_recipe, qat_start, peak_source: str) -> str:
    """The lines that start a run: model, data, optimizer, then notes. `peak_source`: what MFU is
    measured against ("": no MFU)."""
    training, low_precision = cfg.training, cfg.low_precision
    shape = cfg.model
    if low_precision.compute_dtype == "auto":
        compute_dtype += " (auto)"
    layers = f"{shape.n_layer} layer{'s' * (shape.n_layer != 1)}"
    heads = f"{shape.n_head} head{'s' * (shape.n_head != 1)}"
    lines = [f"BDH {parameter_count(shape.n_params)} parameters ({layers}, {heads}, n_embd {shape.n_embd}, N "
             f"{shape.n_latent}, dropout {shape.dropout:g}) | device {device} | {compute_dtype} | "
             f"compile {compiled}{' | activation checkpointing' * training.activation_checkpointing} | "
             f"{step_tokens(training, ranks.world_size):,} tokens/step"]
    if ranks.enabled:
        lines[0] += (f" | {ranks.world_size} processes ({ranks.mode}), global batch {training.batch_size} x "
                     f"{training.gradient_accumulation_steps} x {ranks.world_size}")
    dataset = cfg.dataset
    validation = (f"validation {Path(dataset.val_parquet_dir).resolve()}" if dataset.val_parquet_dir
                  else f"validation {dataset.val_fraction * 100:g}% of its documents (by {dataset.split_by}, split_seed "
                       f"{dataset.split_seed})")
    full, rest = divmod(val_windows, training.batch_size)  # (the last batch short where the text runs out)
    windows = f"{val_windows:,}" if rest else f"{full} x {training.batch_size}"
    validation += f", measured on {windows} windows taken across it"
    tokenizer = "bytes" if dataset.tokenizer == "bytes" else Path(dataset.tokenizer).resolve()
    writes_to = (f"continues in {run.path.resolve()}" if run.path is not None
                 else f"runs in {Path(training.checkpoint_dir).resolve()}")
    n_files, n_rows = len({unit.path for unit in units}), sum(unit.num_rows for unit in units)
    data_size = (f"{n_files} file{'s' * (n_files != 1)}{subfolders(dataset.parquet_dir, units)}, {len(units)} row "
                 f"group{'s' * (len(units) != 1)}, {n_rows:,} row{'s' * (n_rows != 1)}, "
                 f"{byte_amount(sum(unit.text_bytes for unit in units))} in its text column")  # (as parquet stores it)
    lines.append(f"data {Path(dataset.parquet_dir).resolve()} ({data_size}; {validation}) | tokenizer {tokenizer} | "
                 f"{writes_to}")
    lines.append(optimizer_line(cfg, model, optimizer, ranks, fp8_recipe, qat_start))
    if note := cpu_size_note(cfg, device, "the first step line comes after it"):
        lines.append(note)
    if training.warmup_iters >= training.max_iters:
        reached = learning_rate(training.max_iters, training)
        peak = training.learning_rate
        rises = (f"only to {reached:.3g} (learning_rate {peak:.3g})" if reached < peak
                 else f"to {peak:.3g} at the last step")
        lines.append(f"note: training.warmup_iters {training.warmup_iters} >= max_iters {training.max_iters}: the "
                     f"learning rate rises {rises} and never decays; lower warmup_iters for a full schedule")
    lines += [f"note: {line}" for line in cfg.unused_settings()]
    if peak_source:
        lines.append(f"MFU against the {peak_source}"
                     + (f" (FP8 too: the same {compute_dtype.removesuffix(' (auto)')} yardstick)" if fp8_recipe else ""))
    if compiled:
        lines.append("torch.compile: the first step compiles the model and takes longer")
    return "\n".join(lines)


def cpu_size_note(cfg, device, then: str) -> str | None:
    """For a model and batch sized for a GPU, on a CPU: a step's FLOPs (one process's) and the config for a CPU.
    `then`: what the wait delays."""
    step_flops = cfg.model.training_flops_per_token(cfg.training.block_size) * step_tokens(cfg.training, 1)
    if device.type != "cpu" or step_flops <= CPU_STEP_FLOPS:
        return None
    return (f"note: a step is {step_flops / 1e12:.1f} TFLOP per process, seconds to minutes on a CPU ({then}): this "
            f"model is sized for a GPU; configs/tiny.yaml trains on a CPU in minutes")


def optimizer_line(cfg, model, optimizer, ranks, fp8_recipe, qat_start) -> str:
    """The optimizer and its state's size, then what changes the training step: 4-bit QAT, FP8, debug."""
    full = adamw_state_bytes(model.parameters())
    if isinstance(optimizer, AdamW4bit):
        state = optimizer.state_bytes()
        f = optimizer.format
        v = {"v": "v", "sqrt": "sqrt(v)", "root4": "v^(1/4)"}[f.v_form]
        line = (f"optimizer {type(optimizer).__name__} (m: {f.m_code}, {v}: {f.v_code}, blocks of "
                f"{f.block_size}), state {state / 2**20:.2f} MiB = {state / full:.3f} x AdamW's "
                f"{full / 2**20:.2f} MiB")
    else:
        sharded = (f" in all, {full / ranks.world_size / 2**20:.2f} MiB per rank (FSDP shards it)"
                   if cfg.training.distributed == "fsdp" and ranks.world_size > 1 else "")
        line = f"optimizer {type(optimizer).__name__}, state {full / 2**20:.2f} MiB{sharded}"
    if cfg.low_precision.use_4bit:
        line += (f" | 4-bit quantization-aware training ({cfg.low_precision.quantization_type}) of encoder, "
                 f"encoder_v, decoder from step {qat_start + 1}; validation losses are the 4-bit model's")
    if fp8_recipe:
        line += f" | FP8 GEMMs for encoder, encoder_v, decoder: {fp8_recipe}"
    if cfg.training.debug:
        line += " | DEBUG: anomaly detection, a log line (and its loss checked) every step"
    return line
