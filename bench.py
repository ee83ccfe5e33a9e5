"""Benchmark: model.py against the straightforward implementation (reference.py), side by side.

    python bench.py [--config config.yaml] [--steps 10] [--skip memory loader generation] [--json out.json]
                    [--profile table.txt] [section.key=value ...]

Training step of both implementations, as train.py runs it (gradient accumulation, gradient clipping,
AdamW or AdamW4bit, a GradScaler in float16; FP8 and 4-bit weights are refused: reference.py has
neither, and bench_precision.py measures them), alternating on the same inputs:
median ms/step, tokens/s, peak memory (CUDA: max allocated; CPU: peak RSS of a fresh process
running the step, and that peak above the process's RSS before the first step; each implementation
alone, in a fresh process), and on CUDA the
MFU against a peak FLOP/s measured here with a large matmul in the same dtype. Also the data
loader alone (against the rate the model consumes batches) and generation: 1,000 new tokens after
a 256-token prompt, recurrent (model.py) against full recompute (reference.py).
"""
import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import time

import torch

from adamw4bit import make_optimizer
from arguments import add_config_arguments, load_config, parse_arguments
from corpus import ensure_builtin_corpus
from console import cpu_size_note
from data import train_loader
from files import check_outputs, folder_made_for
from model import BDH
from readers import loader_workers
from reference import reference_forward
from runtime import (DTYPES, DeviceError, autocast, device_clock, measured_matmul_flops, peak_memory_bytes, pick_device,
                     prepare_compile, process_status_bytes, resolve_compute_dtype, steady_host_memory, wants_compile)
from shards import DataError, list_units
from stopping import ended_like_ctrl_c, signals_held
from tokenizer import TokenizerError, load_tokenizer

IMPLEMENTATIONS = ("model.py", "reference")


def make_step(cfg, device, implementation):
    """A training step closure of one implementation, on its own copy of the same weights: train.py's
    step (gradient accumulation over the same batch, the gradient norm and clipping, its optimizer,
    a GradScaler in float16)."""
    training = cfg.training
    torch.manual_seed(training.seed)
    model = BDH(cfg.to_bdh_config()).to(device)
    model.activation_checkpointing = training.activation_checkpointing
    forward = model if implementation == "model.py" else (lambda idx, tgt: reference_forward(model, idx, tgt))
    if wants_compile(training, device):  # as train.py: both implementations are measured so
        forward = torch.compile(forward)
    optimizer = make_optimizer(model, cfg, device)
    compute_dtype = resolve_compute_dtype(device, cfg.low_precision.compute_dtype)
    compute = autocast(device, compute_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == "float16")

    def step(x, y):
        for _ in range(training.gradient_accumulation_steps):
            with compute:
                _, loss = forward(x, y)
            scaler.scale(loss / training.gradient_accumulation_steps).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip or math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_training(cfg, device, steps, warmup=2) -> dict:
    shape, vocab = (cfg.training.batch_size, cfg.training.block_size), cfg.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, shape, generator=gen).to(device)
    y = torch.randint(0, vocab, shape, generator=gen).to(device)
    results = {}
    for name in IMPLEMENTATIONS:
        results[name] = {"times": []}
        results[name]["step"] = make_step(cfg, device, name)
    for i in range(warmup + steps):  # alternate, so drift in machine speed hits both alike
        for name in IMPLEMENTATIONS:
            start = device_clock(device)
            results[name]["step"](x, y)
            seconds = device_clock(device) - start
            if i >= warmup:
                results[name]["times"].append(seconds)
    tokens = shape[0] * shape[1] * cfg.training.gradient_accumulation_steps
    out = {}
    for name in IMPLEMENTATIONS:
        ms = statistics.median(results[name]["times"]) * 1000
        out[name] = {"ms_per_step": ms, "tokens_per_s": tokens / ms * 1000}
    return out


def memory_probe(args, implementation) -> dict:
    """Peak memory of a fresh process that runs two training steps of one implementation alone
    (CUDA: max allocated; CPU: peak RSS, and RSS before the first step): in the timing process
    the other implementation's weights and AdamW state would count too."""
    cmd = [sys.executable, __file__, "--config", args.config, "--memory-probe", implementation,
           *args.overrides]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:  # (out of memory, say): the other measurements stand
        lines = result.stderr.strip().splitlines() or ["no error message"]
        print(f"note: the memory probe of {implementation} failed: {lines[-1][:300]}", file=sys.stderr)
        return {}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_memory_probe(cfg, device, implementation):
    step = make_step(cfg, device, implementation)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.training.batch_size, cfg.training.block_size), device=device)
    baseline = process_status_bytes("VmRSS")
    for _ in range(2):
        step(x, x)
    peak = {"peak_memory_bytes": peak_memory_bytes(device)}
    if device.type == "cpu":
        peak["baseline_rss_bytes"] = baseline
    print(json.dumps(peak))


def bench_generation(cfg, device, prompt_len=256, new_tokens=1000, samples=5) -> dict:
    """Recurrent generation (model.py) of new_tokens after a prompt, timed whole, against full
    recompute (reference.py), which re-runs the whole sequence for every token: its time for the
    same tokens is the integral of one forward pass over the growing context, measured at
    `samples` evenly spaced context lengths (trapezoid rule): running it for 1,000 tokens would
    take about 100 minutes on 2 CPU cores at the default size (BENCHMARKS.md)."""
    torch.manual_seed(cfg.training.seed)
    model = BDH(cfg.to_bdh_config()).to(device).eval()
    vocab = cfg.model.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), device=device)
    model.generate(prompt[:, :8], 2, temperature=0)  # warm-up
    start = device_clock(device)
    model.generate(prompt, new_tokens, temperature=0)
    recurrent = device_clock(device) - start
    lengths = [round(prompt_len + i * (new_tokens - 1) / (samples - 1)) for i in range(samples)]
    seconds = []
    with torch.no_grad():
        for T in lengths:
            idx = torch.randint(0, vocab, (1, T), device=device)
            start = device_clock(device)
            reference_forward(model, idx)
            seconds.append(device_clock(device) - start)
    step = (new_tokens - 1) / (samples - 1)
    full = sum((s0 + s1) / 2 * step for s0, s1 in zip(seconds, seconds[1:])) + (seconds[0] + seconds[-1]) / 2
    return {"prompt": prompt_len, "new_tokens": new_tokens,
            "recurrent_tokens_per_s": new_tokens / recurrent,
            "full_recompute_tokens_per_s": new_tokens / full,
            "full_recompute_forward_s": dict(zip(lengths, seconds))}


def profile_training(cfg, device, path, steps=3, warmup=2) -> dict:
    """torch.profiler over `steps` training steps of model.py: the table of operators and kernels by
    time goes to `path`; returned, per step: wall time and, on CUDA, the device time in GEMMs, in
    Triton kernels (what torch.compile fused), in other kernels, and the device idle time (launch
    overhead and host work)."""
    from torch.profiler import ProfilerActivity, profile
    step = make_step(cfg, device, "model.py")
    x = torch.randint(0, cfg.model.vocab_size, (cfg.training.batch_size, cfg.training.block_size), device=device)
    for _ in range(warmup):
        step(x, x)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        start = device_clock(device)
        for _ in range(steps):
            step(x, x)
        wall = (device_clock(device) - start) / steps
    events = prof.key_averages()
    with open(folder_made_for(path), "w") as f:
        f.write(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=60))
    out = {"wall_ms": wall * 1000}
    if cuda:
        kernels = {"gemm_ms": 0.0, "triton_ms": 0.0, "other_kernels_ms": 0.0}
        for e in events:
            if e.device_type != torch.autograd.DeviceType.CUDA or e.self_device_time_total <= 0:
                continue
            name = e.key.lower()
            kind = ("gemm_ms" if any(k in name for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas"))
                    else "triton_ms" if name.startswith("triton") else "other_kernels_ms")
            kernels[kind] += e.self_device_time_total / 1000 / steps
        out.update(kernels, idle_ms=out["wall_ms"] - sum(kernels.values()))
    return out


def loader_throughput(cfg, units, tokenizer, model_ms_per_step, seconds=5.0) -> dict:
    """Batches a second the training stream gives when taken as fast as it can, against the model's
    (bench_loader.py measures the waits of a stream taken at the pace of training steps)."""
    workers = loader_workers(cfg, units)
    with signals_held():  # (the workers start here)
        it = iter(train_loader(cfg, units, tokenizer, workers))
    next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        n += 1
    rate = n / (time.perf_counter() - start)
    model_rate = cfg.training.gradient_accumulation_steps * 1000 / model_ms_per_step  # batches a second
    return {"num_workers": workers, "batches_per_s": rate, "model_batches_per_s": model_rate,
            "loader_over_model": rate / model_rate}


def print_training(training: dict, device, peak_flops: float | None):
    """The training step's table: model.py, reference.py and their ratio."""
    fast, ref = training["model.py"], training["reference"]
    print(f"{'training step':<16}{'model.py':>14}{'reference':>14}{'ratio':>10}")
    print(f"{'tokens/s':<16}{fast['tokens_per_s']:>14,.0f}{ref['tokens_per_s']:>14,.0f}"
          f"{fast['tokens_per_s'] / ref['tokens_per_s']:>9.2f}x")
    print(f"{'ms/step':<16}{fast['ms_per_step']:>14.1f}{ref['ms_per_step']:>14.1f}")
    if "peak_memory_bytes" in fast and "peak_memory_bytes" in ref:
        label = "peak MiB" if device.type == "cuda" else "peak RSS MiB"
        print(f"{label:<16}{fast['peak_memory_bytes'] / 2**20:>14,.0f}{ref['peak_memory_bytes'] / 2**20:>14,.0f}"
              f"{fast['peak_memory_bytes'] / ref['peak_memory_bytes']:>9.2f}x")
    if "baseline_rss_bytes" in fast and "baseline_rss_bytes" in ref:
        above = {n: training[n]["peak_memory_bytes"] - training[n]["baseline_rss_bytes"] for n in IMPLEMENTATIONS}
        print(f"{'step MiB':<16}{above['model.py'] / 2**20:>14,.0f}{above['reference'] / 2**20:>14,.0f}"
              f"{above['model.py'] / above['reference']:>9.2f}x   (peak RSS above RSS before the first step)")
    if "mfu" in fast:
        print(f"{'MFU':<16}{fast['mfu']:>14.1%}{ref['mfu']:>14.1%}   (peak {peak_flops / 1e12:,.0f} TFLOP/s measured)")


def print_loader(loader: dict):
    print(f"loader: {loader['batches_per_s']:,.0f} batches/s with {loader['num_workers']} workers; the "
          f"model consumes {loader['model_batches_per_s']:,.2f}/s: {loader['loader_over_model']:,.0f}x")


def print_generation(generation: dict):
    recurrent, full = generation["recurrent_tokens_per_s"], generation["full_recompute_tokens_per_s"]
    print(f"generation, {generation['new_tokens']} tokens after a {generation['prompt']}-token prompt: recurrent "
          f"{recurrent:,.2f} tokens/s, full recompute {full:,.3f} tokens/s: {recurrent / full:,.0f}x")


def arguments(argv):
    parser = argparse.ArgumentParser(description="Benchmark model.py against reference.py.")
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per implementation (default 10)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--skip", nargs="+", action="extend", default=[], metavar="{memory,loader,generation}",
                        help="parts not to measure")
    parser.add_argument("--profile", metavar="FILE",
                        help="also profile model.py's training step (torch.profiler): its table to FILE")
    parser.add_argument("--memory-probe", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_arguments(parser, argv)
    if swallowed := [item for item in args.skip if "=" in item]:  # `--skip memory a.b=1`: the parts end at `=`
        wanted = set(args.overrides) | set(swallowed)
        args.overrides = [item for item in argv if item in wanted]  # in their order: the last of a key applies
        args.skip = [item for item in args.skip if "=" not in item]
    if unknown := [item for item in args.skip if item not in ("memory", "loader", "generation")]:
        parser.error(f"argument --skip: invalid choice: {unknown[0]!r} (choose from memory, loader, generation)")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    check_outputs(parser, {"--json": args.json, "--profile": args.profile})
    return args


def main(argv=None) -> int:
    args = arguments(argv)
    with ended_like_ctrl_c():  # Ctrl-C or a scheduler's SIGTERM: one line, not a traceback
        return measure(args)


def measure(args) -> int:
    cfg = load_config(args)
    if modes := [m for m in ("use_fp8", "use_4bit") if getattr(cfg.low_precision, m)]:
        print(f"error: low_precision.{modes[0]}: bench.py times model.py against reference.py, which has no FP8 or "
              f"4-bit forward; set it to false here (bench_precision.py --set {modes[0][4:]} measures that mode)",
              file=sys.stderr)
        return 1
    try:
        device = pick_device(cfg.training.device)
        prepare_compile(cfg.training, device)
        if "loader" not in args.skip and not args.memory_probe:  # its data: checked before the minutes of timing
            ensure_builtin_corpus(cfg)
            units = list_units(cfg.dataset.parquet_dir, cfg.dataset.text_column)
            tokenizer = load_tokenizer(cfg.dataset.tokenizer)
    except (DeviceError, DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    steady_host_memory(cfg, device)  # as train.py does, for both implementations
    if args.memory_probe:
        run_memory_probe(cfg, device, args.memory_probe)
        return 0
    training, model = cfg.training, cfg.model
    compute_dtype = resolve_compute_dtype(device, cfg.low_precision.compute_dtype)
    print(f"device {device} ({torch.get_num_threads()} threads) | {compute_dtype} | "
          f"compiled {wants_compile(training, device)} | L{model.n_layer} D{model.n_embd} H{model.n_head} N{model.n_latent} "
          f"| batch {training.batch_size} x T {training.block_size} | torch {torch.__version__}")
    if note := cpu_size_note(cfg, device, f"bench.py times {args.steps} of them after 2 warm-up steps, for each of "
                                          f"the two implementations"):
        print(note, flush=True)
    results = {"device": str(device), "config": cfg.to_dict(), "torch": str(torch.__version__)}
    results["training"] = training = bench_training(cfg, device, args.steps)
    if device.type == "cuda":
        peak = measured_matmul_flops(device, DTYPES[compute_dtype])
        results["peak_flops"] = peak
        for r in training.values():
            r["mfu"] = r["tokens_per_s"] * cfg.model.training_flops_per_token(cfg.training.block_size) / peak
    if "memory" not in args.skip:
        if device.type == "cuda":  # the timed models are gone: their cached blocks go back to the GPU for the probes
            gc.collect()
            torch.cuda.empty_cache()
        for name in IMPLEMENTATIONS:
            training[name].update(memory_probe(args, name))

    fast = training["model.py"]
    print_training(training, device, results.get("peak_flops"))

    if args.profile:
        results["profile"] = prof = profile_training(cfg, device, args.profile)
        print("profile of a model.py step: " + ", ".join(f"{k[:-3]} {v:.1f} ms" for k, v in prof.items())
              + f" (table: {args.profile})")
    if "loader" not in args.skip:
        results["loader"] = loader_throughput(cfg, units, tokenizer, fast["ms_per_step"])
        print_loader(results["loader"])
    if "generation" not in args.skip:
        results["generation"] = bench_generation(cfg, device)
        print_generation(results["generation"])
    if args.json:
        with open(folder_made_for(args.json), "w") as f:
            json.dump(results, f, indent=2, default=lambda o: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
