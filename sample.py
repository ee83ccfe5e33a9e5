"""Generate text from a checkpoint.

    python sample.py [--checkpoint PATH | --checkpoint-dir DIR] [--prompt TEXT | --prompt-file F] [--max-new-tokens N]
                     [--temperature T] [--top-k K] [--seed S] [--device auto|cpu|cuda|mps] [--4bit]

The model shape and the tokenizer come from the checkpoint (or an exported folder). Without a prompt, generation starts at a document
boundary (the separator token). --4bit keeps encoder, encoder_v and decoder as 4-bit codes (the
checkpoint's low_precision.quantization_type and use_double_quant) and dequantizes them once per
generate call: the model a use_4bit run trained for. The text is printed as it is generated; Ctrl-C
stops there, keeping what was printed.
"""
import argparse
import itertools
import sys

import torch

from arguments import add_prompt_arguments, parse_arguments, prompt_argument
from checkpoint import CheckpointError
from files import stdout_reader_gone
from locate import add_checkpoint_arguments, load_model, model_line
from lowbit import LowBitError, serve_4bit_option
from model import SAMPLE_TEMPERATURE
from runtime import DeviceError, pick_device
from tokenizer import TokenizerError, note_prompt_change, tokenizer_from_string


DECODE_WINDOW = 64  # tokens decoded together at most: decoding a whole long line per token is quadratic


def text_as_it_comes(tokenizer, ids):
    """The text of ids (an iterable, consumed as it comes) in pieces to print one after the other. A
    window of tokens is decoded whole, starting from the last token of the window before, so a
    character split between tokens, or a tokenizer's spacing (SentencePiece's at the start of a
    text), comes out as decode() gives it; a piece waits while its text ends in a character cut short
    (U+FFFD). A window ends at a line end or after DECODE_WINDOW tokens."""
    window, printed = [], 0
    for token in ids:
        window.append(token)
        text = tokenizer.decode(window)
        if not text.endswith("\ufffd"):
            yield text[printed:]
            if text.endswith("\n") or len(window) >= DECODE_WINDOW:  # the next window starts from this token
                window, printed = [token], len(tokenizer.decode([token]))
            else:
                printed = len(text)
    yield tokenizer.decode(window)[printed:]


def load_for_sampling(args):
    """(model in eval mode on its device, tokenizer, device, the block_size it trained with or None)
    of --checkpoint, in 4 bits with --4bit; what it read is said on stderr (stdout holds the text only)."""
    device = pick_device(args.device, setting="--device")
    if args.four_bit and device.type == "mps":
        raise DeviceError("--4bit: bitsandbytes' 4-bit quantization runs on cpu or cuda; add --device cpu")
    model, saved_tokenizer, low_precision, origin, trained_on, block_size = load_model(
        args.checkpoint, args.checkpoint_dir, "--checkpoint")
    print(model_line(origin, trained_on), file=sys.stderr)
    model = model.to(device).eval()
    tokenizer = tokenizer_from_string(saved_tokenizer)
    for note in serve_4bit_option(model, low_precision, origin, args.four_bit):
        print(note, file=sys.stderr)
    return model, tokenizer, device, block_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Generate text from a BDH checkpoint.")
    add_checkpoint_arguments(parser)
    add_prompt_arguments(parser, required=False)
    parser.add_argument("--max-new-tokens", type=int, default=500, help="(default 500)")
    parser.add_argument("--temperature", type=float, default=SAMPLE_TEMPERATURE,
                        help=f"0 picks the likeliest token (default {SAMPLE_TEMPERATURE})")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest tokens (0, the default: "
                                                             "all)")
    parser.add_argument("--seed", type=int, default=1337, help="(default 1337)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="(default auto)")
    parser.add_argument("--4bit", dest="four_bit", action="store_true",
                        help="generate from 4-bit weights (encoder, encoder_v, decoder)")
    args = parse_arguments(parser, argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0 (0: sample among all tokens), got {args.top_k}")
    if not 0 <= args.temperature < float("inf"):  # nan too
        parser.error(f"--temperature must be a finite number >= 0 (0 picks the likeliest token), got "
                     f"{args.temperature}")
    if not -2**63 <= args.seed < 2**64:
        parser.error(f"--seed must be from -2**63 to 2**64 - 1 (what torch.Generator takes), got {args.seed}")
    args.prompt = prompt_argument(parser, args)
    try:
        model, tokenizer, device, block_size = load_for_sampling(args)
    except (CheckpointError, DeviceError, LowBitError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    prompt = tokenizer.encode(args.prompt) or [tokenizer.separator]
    note_prompt_change(tokenizer, args.prompt)
    # the model reads every token but the last one it writes; past block_size its text gets worse (BENCHMARKS.md)
    if block_size and len(prompt) + args.max_new_tokens - 1 > block_size:
        start = f"the prompt's {len(prompt):,}" if args.prompt else "the separator it starts from"
        print(f"note: the model trained on windows of {block_size:,} tokens, and this text runs to "
              f"{len(prompt) + args.max_new_tokens:,} ({start} and {args.max_new_tokens:,} new): past {block_size:,} "
              f"it reads positions it never trained at, and its text usually gets worse", file=sys.stderr)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    tokens = (int(token) for token in model.stream(idx, args.max_new_tokens, temperature=args.temperature,
                                                    top_k=args.top_k or None, generator=generator,
                                                    vocab_limit=tokenizer.vocab_size))
    shown = prompt if args.prompt else []  # not the synthetic separator
    try:
        for piece in text_as_it_comes(tokenizer, itertools.chain(shown, tokens)):
            print(tokenizer.shown(piece), end="", flush=True)
        print(flush=True)  # (a line end left to the exit's flush would meet the closed pipe there)
    except KeyboardInterrupt:
        print("\n(stopped by Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        stdout_reader_gone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
