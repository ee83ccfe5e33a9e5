"""Learning per second: train for a fixed wall-clock budget on the first 90% of a text file and
measure the loss on the last 10%, for one or several configurations side by side.

    python bench_budget.py --text tinyshakespeare.txt --seconds 240 --config configs/tiny.yaml \
        [--variant NAME section.key=value ...] ... [--json results.json]

Any text file does (tinyshakespeare.txt: BENCHMARKS.md says where to get it). The text is cut at 90% of
its characters: the first part becomes one training document, the rest is the held-out text. For each
variant a short calibration run measures the loop's start-up (torch.compile included) and its seconds per
step; the real run then gets the max_iters that fill the budget, so that its learning-rate schedule ends
with it (with --seconds 0 it keeps the config's max_iters), and saves a checkpoint every max_iters // 8
steps and at the end. Each checkpoint's loss is then measured on all of the held-out text, in
non-overlapping windows of the training block size (the last, shorter window included), in float32: the
loss against wall-clock. The budget counts the training loop (compilation, evaluations and checkpoint
writes included), not the interpreter start, nor these measurements after it (on a CPU they can take
longer than the training: each checkpoint's line shows when it is done).
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from arguments import add_config_arguments, load_config, parse_arguments
from checkpoint import load_checkpoint, model_from_checkpoint
from corpus import text_files_to_parquet
from files import REPO, check_outputs, does_not_exist, folder_made_for
from model import BDHConfig
from locate import checkpoint_step, checkpoints_in, train_in
from runtime import first_line
from stopping import ended_like_ctrl_c
from tokenizer import tokenizer_from_string

TRAIN = str(REPO / "train.py")
CALIBRATION_STEPS = 60  # the per-step time is measured over the second half: compilation settles
CURVE_POINTS = 8


def calibrate(config, overrides, workdir: Path) -> tuple[float, float]:
    """(start-up seconds of the training loop, seconds per step after it)."""
    steps = CALIBRATION_STEPS
    _, records = train_in(workdir, ["--config", config, *overrides, f"training.max_iters={steps}",
                                    f"training.log_freq={steps // 6}", f"training.test_freq={steps}",
                                    f"training.checkpoint_freq={steps}", "training.warmup_iters=1"], (TRAIN,))
    elapsed = {r["step"]: r["elapsed_s"] for r in records if "elapsed_s" in r}
    per_step = (elapsed[steps] - elapsed[steps // 2]) / (steps - steps // 2)
    return elapsed[steps] - steps * per_step, per_step


@torch.no_grad()
def heldout_loss(checkpoint: Path, text: str) -> float:
    """Mean loss over every token of `text` after the first, in windows of block_size tokens."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt).eval()
    tokens = torch.tensor(tokenizer_from_string(ckpt.tokenizer).encode(text))
    T = ckpt.config["training"]["block_size"]
    total, count = 0.0, 0
    starts = list(range(0, len(tokens) - 1, T))
    for i in range(0, len(starts), 32):
        windows = [tokens[s:s + T + 1] for s in starts[i:i + 32]]
        full = [w for w in windows if len(w) == T + 1]
        for batch in ([torch.stack(full)] if full else []) + [w[None] for w in windows if len(w) < T + 1]:
            logits, _ = model(batch[:, :-1])
            total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(),
                                                       reduction="sum").item()
            count += batch[:, 1:].numel()
    return total / count


def run_variant(config, overrides, seconds, data: Path, heldout: str, workdir: Path) -> dict:
    common = [f"dataset.parquet_dir={data / 'train'}", f"dataset.val_parquet_dir={data / 'heldout'}",
              "training.eval_iters=1", "training.keep_last_n=0", *overrides]
    if seconds:
        startup, per_step = calibrate(config, common, workdir / "calibration")
        max_iters = max(CURVE_POINTS, int((seconds - startup) / per_step))
        if max_iters * per_step + startup > seconds * 1.1:
            print(f"note: {seconds:g} s hold fewer than {CURVE_POINTS} steps after the start-up ({startup:.0f} s, then "
                  f"{per_step:.2f} s a step): this variant trains {CURVE_POINTS} steps, past the budget", flush=True)
    else:  # the config's own max_iters
        startup, per_step = None, None
        max_iters = load_config(argparse.Namespace(config=config, overrides=common)).training.max_iters
    every = max(1, max_iters // CURVE_POINTS)
    run, records = train_in(workdir / "run", ["--config", config, *common, f"training.max_iters={max_iters}",
                                              f"training.checkpoint_freq={every}", f"training.test_freq={max_iters}",
                                              f"training.log_freq={every}"], (TRAIN,))
    elapsed = {r["step"]: r["elapsed_s"] for r in records if "elapsed_s" in r}
    curve = []
    for path in checkpoints_in(run):
        curve.append((elapsed[checkpoint_step(path)], heldout_loss(path, heldout)))
        print(f"  {path.name}: held-out loss {curve[-1][1]:.4f}", flush=True)
    ckpt = load_checkpoint(checkpoints_in(run)[-1])
    training = ckpt.config["training"]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] % every == 0][1:]
    return {"overrides": overrides, "max_iters": max_iters, "startup_s": startup and round(startup, 1),
            "ms_per_step": per_step and round(per_step * 1000, 1),
            "tokens_per_s": statistics.median(rates) if rates else None,
            "parameters": BDHConfig(**ckpt.model_config).n_params,
            "tokens": max_iters * training["batch_size"] * training["block_size"] * training["gradient_accumulation_steps"],
            "curve": [(round(t, 1), round(loss, 4)) for t, loss in curve], "heldout_loss": round(curve[-1][1], 4),
            "seconds": round(curve[-1][0], 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, default="configs/tiny.yaml")
    parser.add_argument("--text", required=True, help="a text file: the first 90%% trains, the rest is held out")
    parser.add_argument("--seconds", type=float, default=240,
                        help="the wall-clock budget of each run (default 240; 0: the config's own max_iters)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
                        help="a named set of section.key=value overrides on top of the config; repeatable")
    parser.add_argument("--json", help="also write the results to this file (after each variant; \"complete\": "
                                       "true once all are)")
    args = parse_arguments(parser, argv)
    if args.seconds < 0:
        parser.error(f"--seconds must be >= 0 (0: the config's own max_iters), got {args.seconds:g}")
    check_outputs(parser, {"--json": args.json})
    names = [name for name, *_ in args.variant]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        parser.error(f"--variant {twice[0]} is given twice: give each variant its own name")
    variants = {name: [*args.overrides, *extra] for name, *extra in args.variant} or {"config": list(args.overrides)}
    for overrides in variants.values():  # config errors now, not after minutes of the first variant
        load_config(argparse.Namespace(config=args.config, overrides=overrides))
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except FileNotFoundError:
        parser.error(f"--text {args.text}: {does_not_exist(args.text)}")
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--text {args.text}: cannot read it as UTF-8 text ({first_line(e)})")
    if len(text.strip()) < 100:
        parser.error(f"--text {args.text}: {len(text)} characters; give a text to train on (tinyshakespeare: 1 MB)")
    cut = math.floor(len(text) * 0.9)
    results = {"text": args.text, "seconds": args.seconds, "config": args.config, "variants": {}, "complete": False}
    with ended_like_ctrl_c(), tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for part, piece in (("train", text[:cut]), ("heldout", text[cut:])):
            (Path(tmp) / f"{part}.txt").write_text(piece, encoding="utf-8")
            text_files_to_parquet([Path(tmp) / f"{part}.txt"], data / part, chunk_bytes=0)
        for i, (name, overrides) in enumerate(variants.items()):  # (a folder by number: a name may hold / or ..)
            try:
                result = run_variant(args.config, overrides, args.seconds, data, text[cut:], Path(tmp) / f"variant{i}")
            except subprocess.CalledProcessError as e:
                print(f"error: variant {name}: train.py stopped with status {e.returncode} (its error is above)",
                      file=sys.stderr)
                return 1
            results["variants"][name] = result
            speed = (f"{result['tokens_per_s']:,} tok/s" if result["tokens_per_s"] is not None else
                     "tok/s not measured (too few steps)")
            print(f"{name}: held-out loss {result['heldout_loss']:.4f} after {result['seconds']:.0f} s, "
                  f"{result['max_iters']} steps, {result['tokens']:,} tokens, {speed}; curve {result['curve']}",
                  flush=True)
            if args.json:  # after each variant: a later one that fails or is stopped leaves these
                folder_made_for(args.json).write_text(json.dumps(results, indent=2))
    if args.json:
        folder_made_for(args.json).write_text(json.dumps({**results, "complete": True}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
