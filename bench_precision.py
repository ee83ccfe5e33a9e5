"""Low-precision benchmarks: variants trained side by side in one run, with train.py.

    python bench_precision.py --config configs/tiny.yaml [--json out.json] [section.key=value ...]
    python bench_precision.py --set fp8 --config config.yaml [model.n_embd=512 ...]    (CUDA)

--set 4bit (default): AdamW; AdamW4bit; AdamW with use_4bit quantization-aware training (from
low_precision.qat_start_fraction of the steps, and from step 1); and the plain AdamW model
quantized to 4 bits after training (post-training quantization). Reports the
optimizer state bytes of AdamW and AdamW4bit, and each model's final validation loss.
--set fp8: bf16 against bf16 + FP8 GEMMs: training tokens/s (median of the logged intervals after
the first) and final validation loss.
Every variant trains the same config for the same steps and is evaluated on the same validation
batches (train.py's evaluation at max_iters).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from checkpoint import checkpoints_in, load_checkpoint, model_from_checkpoint
from config import add_config_arguments, load_config
from data import list_units, validation_batches
from lowbit import AdamW4bit, adamw_state_bytes, to_4bit
from model import BDH
from runtime import autocast
from tokenizer import load_tokenizer

BF16 = ["low_precision.compute_dtype=bfloat16"]
VARIANT_SETS = {
    "4bit": {"AdamW": [], "AdamW4bit": ["low_precision.use_4bit_optimizer=true"],
             "4-bit QAT": ["low_precision.use_4bit=true"],
             "4-bit QAT from step 1": ["low_precision.use_4bit=true", "low_precision.qat_start_fraction=0"]},
    "fp8": {"bf16": BF16, "bf16 + FP8": BF16 + ["low_precision.use_fp8=true"]},
}
PTQ = "AdamW, then 4-bit weights (post-training)"


def train_variant(config_path, overrides, extra, workdir, log_freq) -> dict:
    checkpoint_dir = Path(workdir) / "checkpoints"
    cmd = [sys.executable, "train.py", "--config", config_path, *overrides, *extra,
           f"training.checkpoint_dir={checkpoint_dir}", "training.keep_last_n=1"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    [run] = checkpoint_dir.iterdir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # full log intervals only (train.py also logs its first steps), and not the first: it holds warm-up
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] % log_freq == 0][1:]
    return {"run": run, "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1],
            "tokens_per_s": statistics.median(rates) if rates else None}


@torch.no_grad()
def final_checkpoint_loss(cfg, run, four_bit: bool) -> float:
    """The validation loss of the run's last checkpoint: its weights as trained, or with encoder,
    encoder_v and decoder quantized to 4 bits (what sample.py --4bit serves)."""
    model = model_from_checkpoint(load_checkpoint(checkpoints_in(run)[-1]))
    low_precision = cfg.low_precision
    if four_bit:
        to_4bit(model, low_precision.quantization_type, low_precision.use_double_quant)
    model.eval()
    units = list_units(cfg.dataset.parquet_dir, cfg.dataset.text_column)
    batches = validation_batches(cfg, units, load_tokenizer(cfg.dataset.tokenizer))
    with autocast(torch.device("cpu"), low_precision.compute_dtype):
        return sum(model(x, y)[1].item() for x, y in batches) / len(batches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, default="configs/tiny.yaml")
    parser.add_argument("--set", default="4bit", choices=VARIANT_SETS, help="which variants to compare")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    cfg = load_config(args)
    low_precision = cfg.low_precision
    results = {"config": cfg.to_dict(), "set": args.set, "variants": {}}
    if args.set == "4bit":
        model = BDH(cfg.model)
        state = {"AdamW": adamw_state_bytes(model.parameters()),
                 "AdamW4bit": AdamW4bit(model.parameters(), quant_type=low_precision.quantization_type,
                                        double_quant=low_precision.use_double_quant).state_bytes()}
        results["optimizer_state_bytes"] = state
        print(f"optimizer state: AdamW {state['AdamW'] / 2**20:.2f} MiB, AdamW4bit ({low_precision.quantization_type}, "
              f"double quant {low_precision.use_double_quant}) {state['AdamW4bit'] / 2**20:.2f} MiB = "
              f"{state['AdamW4bit'] / state['AdamW']:.3f}x")
    variants = results["variants"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANT_SETS[args.set].items():
            variants[name] = train_variant(args.config, args.overrides, extra, Path(tmp) / name.replace(" ", "_"),
                                           cfg.training.log_freq)
            if name == "AdamW":
                variants[PTQ] = {"val_loss": final_checkpoint_loss(cfg, variants[name]["run"], four_bit=True)}
            elif name.startswith("4-bit QAT"):  # train.py evaluated its 4-bit weights; these are as trained
                variants[name]["full_precision_val_loss"] = final_checkpoint_loss(cfg, variants[name]["run"],
                                                                                  four_bit=False)
        for v in variants.values():
            v.pop("run", None)
    base_name, base = next(iter(variants.items()))
    print(f"after {cfg.training.max_iters} steps, {cfg.training.eval_iters} validation batches:")
    for name, v in variants.items():
        extra = (f"{v['tokens_per_s']:>12,.0f} tok/s ({v['tokens_per_s'] / base['tokens_per_s']:.2f}x)"
                if v.get("tokens_per_s") and args.set == "fp8" else "")
        if "full_precision_val_loss" in v:
            extra = f"; its weights unquantized: {v['full_precision_val_loss']:.4f}"
        print(f"  {name:<44} val loss {v['val_loss']:.4f} ({(v['val_loss'] / base['val_loss'] - 1) * 100:+.2f}% "
              f"vs {base_name}){extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
