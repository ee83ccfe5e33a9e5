"""How long a training loop waits for its data: the training stream of a config, taken at the pace
of a step of --step-ms milliseconds (a sleep stands for the step), as train.py takes it.

    python bench_loader.py --config configs/tiny.yaml --step-ms 40 --batches 1200 [section.key=value ...]

Prints the first batch's time (the loader starting: its workers, the first pools read) and, over the
batches after it, the share of the time spent waiting for data, the longest wait and where it came
(a reader's pool, or an epoch, that was not ready when its first batch was due).
"""
import argparse
import multiprocessing
import sys
import time

from arguments import add_config_arguments, load_config, parse_arguments
from data import prepare_data, train_loader
from distributed import Ranks
from readers import loader_workers
from runtime import one_line
from shards import DataError
from stopping import ended_like_ctrl_c, signals_held, stop_loader_workers
from tokenizer import TokenizerError


def wait_for_batches(cfg, step_s: float, batches: int) -> dict:
    """The waits of `batches` batches after the first, each taken `step_s` after the one before."""
    tokenizer, units = prepare_data(cfg, Ranks())
    workers = loader_workers(cfg, units)
    started = time.perf_counter()
    with signals_held():  # (the workers start here)
        loader = iter(train_loader(cfg, units, tokenizer, workers))
    next(loader)
    first_s, waits, longest = time.perf_counter() - started, 0.0, (0.0, 0, None)
    begun = time.perf_counter()
    for n in range(1, batches + 1):
        asked = time.perf_counter()
        _, _, position = next(loader)
        wait = time.perf_counter() - asked
        waits += wait
        if wait > longest[0]:
            longest = (wait, n, position)
        time.sleep(step_s)
    return {"workers": workers, "first_batch_s": first_s, "waited_s": waits, "seconds": time.perf_counter() - begun,
            "longest_wait_s": longest[0], "longest_at_batch": longest[1], "longest_at": longest[2]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="How long a training loop waits for its data.")
    add_config_arguments(parser)
    parser.add_argument("--step-ms", type=float, default=40.0, help="the step's time, in milliseconds (default 40)")
    parser.add_argument("--batches", type=int, default=1000, help="batches taken after the first (default 1000)")
    args = parse_arguments(parser, argv)
    if args.step_ms < 0 or args.batches < 1:
        parser.error(f"--step-ms must be >= 0 and --batches >= 1, got {args.step_ms} and {args.batches}")
    cfg = load_config(args)
    children = multiprocessing.active_children()  # (a calling program's own)
    with ended_like_ctrl_c():  # Ctrl-C: one line, not a traceback
        try:
            result = wait_for_batches(cfg, args.step_ms / 1000, args.batches)
        except (DataError, TokenizerError) as e:  # (a worker's, with its traceback: its last line)
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 1
        finally:
            stop_loader_workers(started_before=children)  # (after an error they would keep the process alive)
    at = result["longest_at"]
    print(f"{result['workers']} worker(s), steps of {args.step_ms:g} ms: the first batch after "
          f"{result['first_batch_s']:.2f} s; then {args.batches:,} batches in {result['seconds']:.1f} s, "
          f"{result['waited_s']:.1f} s of it waiting for data ({result['waited_s'] / result['seconds']:.1%}); the "
          f"longest wait {result['longest_wait_s'] * 1000:,.0f} ms, at batch {result['longest_at_batch']:,} (reader "
          f"{at['reader']}, epoch {at['epoch']}, unit {at['unit']}, {at['consumed']} of its pool's {at['windows']} "
          f"windows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
