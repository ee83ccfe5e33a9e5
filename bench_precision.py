"""Low-precision benchmarks: variants trained side by side in one run, with train.py.

    python bench_precision.py --config configs/tiny.yaml [--json out.json] [section.key=value ...]
    python bench_precision.py --set fp8 --config config.yaml [model.n_embd=512 ...]    (CUDA)
    python bench_precision.py --set optimizer --seeds 1337,1,2 [dataset.parquet_dir=data/shakespeare]
    python bench_precision.py --set optimizer-ablation [training.max_iters=600 ...]

--set 4bit (default): AdamW; AdamW4bit; AdamW with use_4bit quantization-aware training (from
low_precision.qat_start_fraction of the steps, and from step 1); and the plain AdamW model
quantized to 4 bits after training (post-training quantization). Reports the
optimizer state bytes, and each model's final validation loss.
--set optimizer: AdamW; AdamW4bit (adamw4bit.py); torchao.optim.AdamW4bit with its defaults (the
format of Li et al. as torchao implements it). Also times the optimizer step alone. With --seeds
1337,1,2 every variant runs once per seed (which draws its validation documents too: dataset.split_seed), and
each loss is compared with AdamW's of the same seed
(mean and worst).
--set optimizer-ablation: AdamW4bit with one choice of its MomentFormat changed at a time.
--variant NAME (repeatable): only these variants of the set (the first one is still the baseline).
Variants with another optimizer run train.py through `launch` below, in their own process.
--set fp8: bf16 against bf16 + FP8 GEMMs: training tokens/s (median of the logged intervals after
the first) and final validation loss.
Every variant trains the same config for the same steps and is evaluated on the same validation
batches (train.py's evaluation at max_iters).
"""
import argparse
import json
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import adamw4bit
from adamw4bit import AdamW4bit, MomentFormat, adamw_state_bytes, make_optimizer
from arguments import add_config_arguments, load_config, parse_arguments
from checkpoint import load_checkpoint, model_from_checkpoint
from config import Config
from distributed import Ranks
from evaluation import validation_loss
from files import REPO, check_outputs, folder_made_for
from lowbit import to_4bit
from model import BDH
from locate import checkpoints_in, train_in
from runtime import autocast, pick_device, process_status_bytes, steady_host_memory
from shards import list_units
from stopping import ended_like_ctrl_c
from tokenizer import load_tokenizer
from validation import validation_batches

BF16 = ["low_precision.compute_dtype=bfloat16"]
FOUR_BIT_OPTIMIZER = ["low_precision.use_4bit_optimizer=true"]
PAPER = {"v_form": "v", "signed_scale": False}  # with the other defaults: Li et al.'s format, as torchao has it
TORCHAO = "torchao AdamW4bit"  # the variant, and its name in the optimizer tables
EARLIER = {"m_code": "nf4", "v_code": "nf4", "v_form": "root4", "floor": True, "block_size": 32, "signed_scale": False}
# a variant: its overrides, or (overrides, the optimizer: a MomentFormat's fields or "torchao")
VARIANT_SETS = {
    "4bit": {"AdamW": [], "AdamW4bit": FOUR_BIT_OPTIMIZER,
             "4-bit QAT": ["low_precision.use_4bit=true"],
             "4-bit QAT from step 1": ["low_precision.use_4bit=true", "low_precision.qat_start_fraction=0"]},
    "fp8": {"bf16": BF16, "bf16 + FP8": BF16 + ["low_precision.use_fp8=true"]},
    "optimizer": {"AdamW": [], "AdamW4bit": FOUR_BIT_OPTIMIZER,
                  TORCHAO: (FOUR_BIT_OPTIMIZER, "torchao")},
    "optimizer-ablation": {"AdamW": [], **{name: (FOUR_BIT_OPTIMIZER, fields) for name, fields in {
        "the paper's format (m dynamic, v linear, blocks of 128)": PAPER,
        "only m in 4 bits": {**PAPER, "v_code": None},
        "only v in 4 bits": {**PAPER, "m_code": None},
        "blocks of 32": {**PAPER, "block_size": 32},
        "blocks of 64": {**PAPER, "block_size": 64},
        "m in nf4": {**PAPER, "m_code": "nf4"},
        "m in fp4": {**PAPER, "m_code": "fp4"},
        "v in nf4, floor": {**PAPER, "v_code": "nf4", "floor": True},
        "v stored as sqrt(v)": {**PAPER, "v_form": "sqrt"},
        "v rank-1 scales": {**PAPER, "rank1": True},
        "v log2 code book": {**PAPER, "v_code": "log"},
        "v stored as v^(1/4) (the default)": {},
        "v^(1/4), m scaled by its absolute maximum": {"signed_scale": False},
        "v^(1/4), only v in 4 bits": {"m_code": None},
        "v^(1/4), rank-1 scales": {"rank1": True},
        "v^(1/4), log2 code book": {"v_code": "log"},
        "v^(1/4) in nf4, no floor": {"v_code": "nf4"},
        "v^(1/4) in nf4, floor": {"v_code": "nf4", "floor": True},
        "earlier format: m nf4, v^(1/4) nf4, floor, blocks of 32": EARLIER,
        "earlier format, only m": {**EARLIER, "v_code": None},
        "earlier format, only v": {**EARLIER, "m_code": None},
    }.items()}, TORCHAO: (FOUR_BIT_OPTIMIZER, "torchao")},
}
PTQ = "AdamW, then 4-bit weights (post-training)"


def torchao_adamw4bit():
    """torchao.optim.AdamW4bit (its defaults) as train.py uses AdamW4bit: train.py sets each
    group's lr to a float, torchao wants its tensor; state_bytes() is known before its lazily made
    state; `format` is its format, for train.py's description."""
    from torchao.optim import AdamW4bit as Torchao

    class TorchaoAdamW4bit(Torchao):
        format = MomentFormat(v_form="v")

        def step(self, closure=None):
            for group in self.param_groups:
                if not torch.is_tensor(group["lr"]):
                    group["lr"] = torch.tensor(group["lr"])
            return super().step(closure)

        def state_bytes(self):  # 4-bit codes and a float32 scale per 128 where numel >= 4096 and divides
            params = [p for group in self.param_groups for p in group["params"]]
            return sum(2 * (p.numel() // 2 + p.numel() // 128 * 4) if p.numel() >= 4096 and p.numel() % 128 == 0
                       else 8 * p.numel() for p in params)
    return TorchaoAdamW4bit


def launch(argv):
    """python -c 'import bench_precision, sys; bench_precision.launch(sys.argv[1:])' OPTIMIZER ARGS...:
    train.py with ARGS, its AdamW4bit replaced by torchao's ("torchao") or given another format (a
    JSON object of MomentFormat fields)."""
    optimizer = json.loads(argv[0])
    if optimizer == "torchao":
        adamw4bit.AdamW4bit = torchao_adamw4bit()
    else:
        adamw4bit.DEFAULT_FORMAT = MomentFormat(**optimizer)
    sys.argv = [str(REPO / "train.py"), *argv[1:]]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")


def train_variant(config_path, overrides, variant, workdir, log_freq) -> dict:
    extra, optimizer = variant if isinstance(variant, tuple) else (variant, None)
    arguments = ["--config", config_path, *overrides, *extra, "training.keep_last_n=1"]
    launcher = ["-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import bench_precision; "
                      f"bench_precision.launch(sys.argv[1:])", json.dumps(optimizer)]
    start = time.perf_counter()
    run, records = train_in(workdir, arguments, launcher if optimizer else [str(REPO / "train.py")],
                            f"(optimizer: {json.dumps(optimizer)})" if optimizer else "")
    wall_s = time.perf_counter() - start
    print(f"  {wall_s:.0f} s, start-up, compilation and evaluation included", flush=True)
    # full log intervals only (train.py also logs its first steps), and not the first: it holds warm-up
    logged = [r for r in records if "ms_per_step" in r and r["step"] % log_freq == 0][1:]
    return {"run": run, "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1], "wall_s": wall_s,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in logged) if logged else None,
            "ms_per_step": statistics.median(r["ms_per_step"] for r in logged) if logged else None}


def final_checkpoint_loss(cfg, run, four_bit: bool) -> float:
    """The validation loss of the run's last checkpoint, measured as train.py measures it (on the
    run's device, in its compute dtype): its weights as trained, or with encoder, encoder_v and
    decoder quantized to 4 bits (what sample.py --4bit serves)."""
    device = pick_device(cfg.training.device)
    model = model_from_checkpoint(load_checkpoint(checkpoints_in(run)[-1])).to(device)
    low_precision = cfg.low_precision
    if four_bit:
        to_4bit(model, low_precision.quantization_type, low_precision.use_double_quant)
    model.eval()
    units = list_units(cfg.dataset.parquet_dir, cfg.dataset.text_column)
    batches = validation_batches(cfg, units, load_tokenizer(cfg.dataset.tokenizer))
    return validation_loss(model, batches, device, autocast(device, low_precision.compute_dtype), Ranks())[0]


def state_bytes_line(cfg, torchao: bool) -> tuple[dict, str]:
    """The optimizer state of AdamW, AdamW4bit and (`torchao`: where the set trains it) torchao's AdamW4bit."""
    model = BDH(cfg.to_bdh_config())
    state = {"AdamW": adamw_state_bytes(model.parameters()), "AdamW4bit": AdamW4bit(model.parameters()).state_bytes()}
    if torchao:
        state[TORCHAO] = torchao_adamw4bit()(model.parameters(), betas=(0.9, 0.95)).state_bytes()
    return state, "optimizer state: " + ", ".join(
        f"{name} {size / 2**20:.2f} MiB ({size / state['AdamW']:.3f}x)" for name, size in state.items())


def optimizer_step_ms(cfg, steps=20) -> dict:
    """The optimizer step alone on the config's model (random gradients): median ms of each
    optimizer, the three alternating step by step."""
    model = BDH(cfg.to_bdh_config())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {"AdamW": torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95)),
                  "AdamW4bit": AdamW4bit(model.parameters(), lr=1e-4, betas=(0.9, 0.95)),
                  TORCHAO: torchao_adamw4bit()(model.parameters(), lr=1e-4, betas=(0.9, 0.95))}
    for optimizer in optimizers.values():
        for _ in range(3):  # warm-up (torchao compiles its step)
            optimizer.step()
    times = {name: [] for name in optimizers}
    for _ in range(steps):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def optimizer_peak_mib(cfg, name: str, steps=2) -> float:
    """MiB that the `name` optimizer (AdamW or AdamW4bit, as train.py makes them) adds to this process
    at its peak, from its setup through `steps` steps on the config's model with random gradients:
    its state and the temporaries of a step (Linux's peak resident set size, reset first). Run each
    optimizer in a fresh process."""
    cfg.low_precision.use_4bit_optimizer = name == "AdamW4bit"
    steady_host_memory(cfg, torch.device("cpu"))
    model = BDH(cfg.to_bdh_config())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    before = process_status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    for _ in range(steps):
        optimizer.step()
    return (process_status_bytes("VmHWM") - before) / 2**20


def run_seed(args, seed, workdir) -> dict:
    """Every variant of the set, trained with this seed: name -> its results."""
    variants = {}
    # each seed draws its own validation documents too, as training.seed did before dataset.split_seed
    overrides = [*args.overrides, f"training.seed={seed}", f"dataset.split_seed={seed}"]
    cfg = Config.from_yaml(args.config, overrides)  # the seed's validation split, for final_checkpoint_loss
    baseline = next(iter(VARIANT_SETS[args.set]))  # what the others are compared with
    for name, variant in VARIANT_SETS[args.set].items():
        if args.variant and name not in (baseline, *args.variant):
            continue
        variants[name] = train_variant(args.config, overrides, variant, workdir / f"{seed}_{name}".replace(" ", "_"),
                                       cfg.training.log_freq)
        if args.set == "4bit" and name == "AdamW":
            variants[PTQ] = {"val_loss": final_checkpoint_loss(cfg, variants[name]["run"], four_bit=True)}
        elif name.startswith("4-bit QAT"):  # train.py evaluated its 4-bit weights; these are as trained
            variants[name]["full_precision_val_loss"] = final_checkpoint_loss(cfg, variants[name]["run"],
                                                                              four_bit=False)
    for v in variants.values():
        v.pop("run", None)
    return variants


def seed_list(text: str) -> list[int]:
    """--seeds: distinct whole numbers >= 0, comma-separated (one training run each, in one folder)."""
    try:
        seeds = [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers separated by commas, e.g. 1,2,3") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: each seed once, each >= 0")
    return seeds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, default="configs/tiny.yaml")
    parser.add_argument("--set", default="4bit", choices=VARIANT_SETS,
                        help="which variants to compare (default 4bit; see the top of this file)")
    parser.add_argument("--seeds", type=seed_list,
                        help="comma-separated: train every variant once per seed (default: the config's "
                             "training.seed)")
    parser.add_argument("--variant", action="append", metavar="NAME",
                        help="run only this variant of the set, beside its first (repeatable; default: all)")
    parser.add_argument("--json", help="also write the results to this file (after each seed; \"complete\": "
                                       "true once all are)")
    args = parse_arguments(parser, argv)
    check_outputs(parser, {"--json": args.json})
    for name in args.variant or ():
        if name not in VARIANT_SETS[args.set]:
            parser.error(f"--variant {name!r} is not in --set {args.set}: its variants are "
                         f"{', '.join(map(repr, VARIANT_SETS[args.set]))}")
    cfg = load_config(args)
    if args.set == "fp8" and not torch.cuda.is_available():
        parser.error("--set fp8 trains with FP8 GEMMs, which need a CUDA GPU (compute capability >= 8.9)")
    seeds = args.seeds or [cfg.training.seed]
    results = {"config": cfg.to_dict(), "set": args.set, "seeds": {}, "complete": False}
    if args.set != "fp8":
        results["optimizer_state_bytes"], line = state_bytes_line(cfg, TORCHAO in VARIANT_SETS[args.set])
        print(line, flush=True)
    if args.set == "optimizer":
        results["optimizer_step_ms"] = optimizer_step_ms(cfg)
        print("optimizer step alone: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in
                                                   results["optimizer_step_ms"].items()), flush=True)
    with ended_like_ctrl_c(), tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            try:
                results["seeds"][seed] = run_seed(args, seed, Path(tmp))
            except subprocess.CalledProcessError as e:
                print(f"error: seed {seed}: train.py stopped with status {e.returncode} (its error is above)",
                      file=sys.stderr)
                return 1
            if args.json:  # after each seed: a long run that stops early keeps what it measured
                folder_made_for(args.json).write_text(json.dumps(results, indent=2))
    print(f"after {cfg.training.max_iters} steps, {cfg.training.eval_iters} validation batches, seeds "
          f"{', '.join(map(str, seeds))} (change: against the first variant with the same seed):")
    runs = list(results["seeds"].values())
    base_name = next(iter(runs[0]))
    for name in runs[0]:
        losses = [run[name]["val_loss"] for run in runs]
        changes = [(run[name]["val_loss"] / run[base_name]["val_loss"] - 1) * 100 for run in runs]
        line = f"  {name:<58} val loss {statistics.mean(losses):.4f} ({statistics.mean(changes):+.2f}%"
        line += f", worst {max(changes):+.2f}%)" if len(runs) > 1 else ")"
        # (None: a run too short for a full log interval) the seeds where both have a speed, else the variant's
        pairs = [(run[name]["ms_per_step"], run[base_name]["ms_per_step"]) for run in runs
                 if run[name].get("ms_per_step") and run[base_name].get("ms_per_step")]
        speeds = [s for s, _ in pairs] or [run[name]["ms_per_step"] for run in runs if run[name].get("ms_per_step")]
        if speeds:
            line += f" | {statistics.mean(speeds):.1f} ms/step"
            line += f" ({sum(s for s, _ in pairs) / sum(b for _, b in pairs):.2f}x)" if pairs else ""
        if "full_precision_val_loss" in runs[0][name]:
            line += f" | its weights unquantized: {statistics.mean(r[name]['full_precision_val_loss'] for r in runs):.4f}"
        print(line)
    if args.json:
        folder_made_for(args.json).write_text(json.dumps({**results, "complete": True}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
