"""Generate text from a checkpoint.

    python sample.py --checkpoint PATH [--prompt TEXT] [--max-new-tokens N] [--temperature T]
                     [--top-k K] [--seed S] [--device auto|cpu|cuda|mps] [--4bit]

The model shape comes from the checkpoint. Without a prompt, generation starts at a document
boundary (the separator byte). --4bit keeps encoder, encoder_v and decoder as 4-bit codes (the
checkpoint's low_precision.quantization_type and use_double_quant) and dequantizes them once per
generate call: the model a use_4bit run trained for.
"""
import argparse
import sys

import torch

from checkpoint import CheckpointError, load_checkpoint, resolve_resume
from data import SEPARATOR, decode
from lowbit import LowBitError, to_4bit
from model import BDH, BDHConfig
from train import TrainingError, pick_device


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Generate text from a BDH checkpoint.")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint_<step>.pt, a run directory, or latest")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where `latest` looks")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the likeliest byte")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--4bit", dest="four_bit", action="store_true",
                        help="generate from 4-bit weights (encoder, encoder_v, decoder)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        parser.error("--max-new-tokens and --temperature must be >= 0 and --top-k >= 1")
    try:
        device = pick_device(args.device)
        if args.four_bit and device.type == "mps":
            raise TrainingError("--4bit: bitsandbytes' 4-bit quantization runs on cpu or cuda; "
                                "add --device cpu")
        path = resolve_resume(args.checkpoint, args.checkpoint_dir)
        ckpt = load_checkpoint(path)
    except (CheckpointError, TrainingError) as e:
        print(f"error: {str(e).replace('training.resume_from_checkpoint', '--checkpoint')}", file=sys.stderr)
        return 1
    model = BDH(BDHConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    if args.four_bit:
        lp = ckpt.get("config", {}).get("low_precision", {})
        quant_type, double_quant = lp.get("quantization_type", "nf4"), lp.get("use_double_quant", True)
        try:
            before, after = to_4bit(model, quant_type, double_quant)
        except LowBitError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"4-bit weights ({quant_type}{', double quant' if double_quant else ''}): model "
              f"{after / 2**20:.2f} MiB, float32 {before / 2**20:.2f} MiB (1/{before / after:.1f})",
              file=sys.stderr)

    prompt = list(args.prompt.encode("utf-8")) or [SEPARATOR]
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=generator)
    start = len(prompt) if not args.prompt else 0  # don't print the synthetic separator
    print(decode(out[0, start:].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
