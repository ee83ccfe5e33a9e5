"""Which latent neurons fire for each token of a prompt, layer by layer: BDH's sparse, positive
activations as a picture.

    python neurons.py [--checkpoint X | --checkpoint-dir DIR] --prompt TEXT | --prompt-file F [--out neurons.png]
                      [--max-neurons 400] [--max-tokens 80] [--4bit]

One panel per layer shows the x latent a = relu(x @ encoder) of every prompt token (rows) over the
neurons that fire for at least one of them in some layer (columns, the same in every panel since the
layers share their weights, the most often active first, at most --max-neurons; H*N neurons in all):
white where a neuron is silent, darker the stronger it fires (one scale for all panels, beside each). The
picture shows the first --max-tokens tokens (a row each, PICTURE_ROWS over all layers at most); the
figures count them all. Layers are numbered from 0, as in the metrics (sparsity/x_layer0). It prints,
per layer, the share of the x and y latents (y: b = relu(LN(A x) @ encoder_v)) that is non-zero and
how many distinct neurons the prompt used. A prompt may be as long as fits in MEMORY_BUDGET (2 GiB):
the forward pass keeps every layer's T x T attention scores, so the memory grows with the square of
its length (memory_bytes). --4bit draws the 4-bit weights a use_4bit run trained for and evaluated, as
sample.py --4bit generates from them.
"""
import argparse
import math
import sys

import torch

from arguments import add_prompt_arguments, parse_arguments, prompt_argument
from checkpoint import CheckpointError
from files import folder_made_for, picture_path, stdout_reader_gone
from locate import add_checkpoint_arguments, load_model, model_line
from lowbit import LowBitError, serve_4bit_option
from tokenizer import TokenizerError, note_prompt_change, tokenizer_from_string

PICTURE_ROWS = 4000  # tokens x layers drawn at most: 4,500 rows (22 pixels and a label each) took 2.3 GB to draw
MEMORY_BUDGET = 2 * 2**30  # bytes that latents() may take: it limits the prompt's length (max_prompt_tokens solves
# memory_bytes' estimate for it in closed form; a test checks that the two agree)


@torch.no_grad()
def latents(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the x and y latents of each token, each (T, H*N)."""
    found = []

    def keep(a, b):  # a: (H, 1, T, N); b: (H, T, N), which the layer then changes in place
        H, _, T, N = a.shape
        found.append((a[:, 0].permute(1, 0, 2).reshape(T, H * N).float(),
                      b.view(H, T, N).permute(1, 0, 2).reshape(T, H * N).float().clone()))

    model.eval()(torch.tensor([ids]), observe=keep)
    return found


def memory_bytes(config, n_tokens: int) -> int:
    """About the most memory latents() takes, in float32: until the forward pass ends each layer keeps
    its attention scores (H x T x T) and a; here each layer's a and b are kept too, and the layer's
    temporaries come on top: about 4 copies of the H*N latents per token. (Measured at the limit, for
    the shapes of config.yaml and configs/tiny.yaml: within 10%.)"""
    return 4 * config.n_layer * config.n_head * n_tokens * (n_tokens + 4 * config.n_latent)


def max_prompt_tokens(config) -> int:
    """The longest prompt whose memory_bytes fit in MEMORY_BUDGET: T*T + 4N*T <= MEMORY_BUDGET / (4 L H)."""
    N = config.n_latent
    return math.isqrt(4 * N * N + MEMORY_BUDGET // (4 * config.n_layer * config.n_head)) - 2 * N


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, as the prompt's text grows by it: a character split over several tokens
    (UTF-8 bytes) shows at the token that completes it, the tokens before it as '·'."""
    labels, done = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        complete = text.rstrip("\ufffd")  # an unfinished character decodes as U+FFFD
        labels.append(complete[len(done):] if complete.startswith(done) and complete != done else
                      "·" if text.endswith("\ufffd") else tokenizer.decode(ids[end - 1:end]))
        done = complete if complete.startswith(done) else done
    return labels


def drawable(labels: list[str]) -> list[str]:
    """The labels with each character the labels' font lacks (CJK, emoji, in matplotlib's own font)
    written as its code point, U+65E5, rather than drawn as an empty box."""
    from matplotlib import font_manager, ft2font
    font = ft2font.FT2Font(font_manager.findfont(font_manager.FontProperties(family="monospace")))
    return ["".join(c if c.isspace() or font.get_char_index(ord(c)) else f"U+{ord(c):04X}" for c in label)
            for label in labels]


def draw(found, labels, out, max_neurons: int):
    """Every layer's x latent over the same columns: the layers share their weights, so a column is
    one neuron throughout, those that fire most often over all layers first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = drawable(labels)
    fig, axes = plt.subplots(len(found), 1, figsize=(14, 1.5 + 0.22 * len(labels) * len(found)), squeeze=False)
    firing_anywhere = sum((a > 0).sum(0) for a, _ in found)
    columns = torch.argsort(firing_anywhere, descending=True, stable=True)[
        :min(max_neurons, int((firing_anywhere > 0).sum()))]
    strongest = max(float(a[:, columns].max()) for a, _ in found) if len(columns) else 1.0  # one scale for all
    for layer, ((a, b), ax) in enumerate(zip(found, axes[:, 0])):
        firing = (a > 0).sum(0)
        image = ax.imshow(a[:, columns].numpy(), aspect="auto", cmap="Greys", interpolation="nearest", vmin=0,
                          vmax=strongest)
        fig.colorbar(image, ax=ax, pad=0.01, fraction=0.02).set_label("x latent", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7, family="monospace")
        ax.set_xticks([])
        ax.set_title(f"layer {layer}: the x latent a (drawn) is {float((a > 0).float().mean()):.1%} active, the y "
                     f"latent {float((b > 0).float().mean()):.1%}; {int((firing > 0).sum()):,} of {a.shape[1]:,} "
                     f"neurons fire for some token", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(f"neurons: the {len(columns):,} that fire most often over all layers, the same in each "
                           f"layer (--max-neurons)", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder_made_for(out), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(parser)
    add_prompt_arguments(parser, required=True, purpose="the text whose neurons are drawn (one of --prompt and "
                                                        "--prompt-file is required)")
    parser.add_argument("--out", default="neurons.png", help="the picture to write (default neurons.png)")
    parser.add_argument("--max-neurons", type=int, default=400, help="columns per layer (default 400)")
    parser.add_argument("--max-tokens", type=int, default=80, help="rows per layer: the prompt's first tokens "
                        "(default 80; the printed figures count every token)")
    parser.add_argument("--4bit", dest="four_bit", action="store_true",
                        help="the 4-bit weights (encoder, encoder_v, decoder) a use_4bit run trained for")
    args = parse_arguments(parser, argv)
    args.prompt = prompt_argument(parser, args)
    for option, value in (("--max-neurons", args.max_neurons), ("--max-tokens", args.max_tokens)):
        if value < 1:
            parser.error(f"{option} must be at least 1, got {value}")
    try:
        out = picture_path(args.out)
    except ValueError as e:
        parser.error(str(e))
    try:
        model, saved_tokenizer, low_precision, origin, trained_on, block_size = load_model(
            args.checkpoint, args.checkpoint_dir, "--checkpoint")
        tokenizer = tokenizer_from_string(saved_tokenizer)
        for note in serve_4bit_option(model, low_precision, origin, args.four_bit):
            print(note, file=sys.stderr)
    except (CheckpointError, LowBitError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ids = tokenizer.encode(args.prompt)
    if not ids:
        parser.error("the prompt is empty")
    note_prompt_change(tokenizer, args.prompt)
    if block_size and len(ids) > block_size:
        print(f"note: the model trained on windows of {block_size:,} tokens and the prompt is {len(ids):,}: past "
              f"{block_size:,} it reads positions it never trained at, and the figures count them too", file=sys.stderr)
    if len(ids) > (limit := max_prompt_tokens(model.config)):
        fitting = len(tokenizer.decode(ids[:limit]).rstrip("\ufffd"))  # (a character cut short: U+FFFD)
        parser.error(f"the prompt is {len(ids):,} tokens, more than the {limit:,} that fit in {MEMORY_BUDGET // 2**30} "
                     f"GiB for this model (memory grows with the square of the prompt's length): shorten it, e.g. to "
                     f"its first {fitting:,} characters")
    shown = min(len(ids), args.max_tokens, fitting_rows := max(1, PICTURE_ROWS // model.config.n_layer))
    if shown == fitting_rows < min(len(ids), args.max_tokens):
        print(f"note: the picture draws the first {shown:,} tokens in each of {model.config.n_layer} layers, the "
              f"{PICTURE_ROWS:,} rows it draws in about 2 GB of memory (--max-tokens {args.max_tokens:,} would take "
              f"more); the printed figures count every token", file=sys.stderr)
    found = latents(model, ids)
    labels = [repr(label)[1:-1].replace(" ", "␣") for label in token_labels(tokenizer, ids[:shown])]
    draw([(a[:shown], b[:shown]) for a, b in found], labels, out, args.max_neurons)
    try:
        print(f"{model_line(origin, trained_on)}\n{len(ids)} token{'s' * (len(ids) != 1)}, {found[0][0].shape[1]:,} "
              f"latent neurons per layer (H*N)")
        print(f"{'layer':>5} {'x active':>9} {'y active':>9} {'neurons used':>13}")
        for layer, (a, b) in enumerate(found):
            print(f"{layer:>5} {float((a > 0).float().mean()):>9.2%} {float((b > 0).float().mean()):>9.2%} "
                  f"{int(((a > 0).sum(0) > 0).sum()):>13,}")
        cut_by = "--max-tokens" if shown == args.max_tokens else "the picture's rows"
        print(f"wrote {args.out}" + (f" (the first {shown:,} of {len(ids):,} tokens: {cut_by})" if shown < len(ids)
                                     else ""), flush=True)
    except BrokenPipeError:  # (the picture is written first)
        stdout_reader_gone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
