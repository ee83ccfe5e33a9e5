"""Plot runs from their metrics.jsonl: losses against steps and tokens, bits per byte against the
text read, learning rate, activation sparsity, training speed. Several runs are overlaid, each under its directory's
name and the settings in which they differ.

    python plot.py RUN_DIR [RUN_DIR ...] [--out curves.png]

A folder of runs (checkpoints/) stands for every run in it; a folder of experiments' checkpoint_dirs,
for every run in those (named experiment/run_...).
"""
import argparse
import math
import sys
from collections import Counter
from pathlib import Path

import yaml

from arguments import parse_arguments
from config_file import ConfigError, settings_as_run, with_settings_as_run, with_split_settings
from checkpoint import is_export
from files import does_not_exist, folder_made_for, picture_path, read_records, resumed_configs
from locate import export_source


class PlotError(Exception):
    pass


class NothingLogged(PlotError):
    pass


def read_metrics(run_dir: Path) -> tuple[list, list]:
    """(training records, evaluation records) of a run."""
    run_dir, give = Path(run_dir), "give a run directory (checkpoints/run_YYYYMMDD_HHMMSS)"
    path = run_dir / "metrics.jsonl"
    if not run_dir.exists():
        raise PlotError(f"{run_dir}: {does_not_exist(run_dir, keep=Path.is_dir, otherwise=give)}")
    if run_dir.is_file():
        holder = run_dir.parent if (run_dir.parent / "metrics.jsonl").is_file() else None
        raise PlotError(f"{run_dir}: a file; " + (f"give its run directory, {holder}" if holder else give))
    if is_export(run_dir):
        source = export_source(run_dir)
        raise PlotError(f"{run_dir}: a folder export.py wrote, which holds no metrics; "
                        + (f"give the run directory it came from, {Path(source).parent}" if source else give))
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl, nor a run directory with one in it; give a run directory "
                        f"(checkpoints/run_YYYYMMDD_HHMMSS) or a folder of runs")
    records, skipped = read_records(path)
    for n in skipped:
        print(f"note: {path}:{n} is not a metrics record (a write cut short?); skipped", file=sys.stderr)
    train = [r for r in records if "train_loss" in r]
    evaluations = [r for r in records if "val_loss" in r]
    if not train and not evaluations:
        raise NothingLogged(f"{path}: holds no training or validation records yet")
    return train, evaluations


def runs_in(arg) -> list[Path]:
    """The run directories an argument stands for: a run directory, its metrics.jsonl, or a folder
    of runs (each folder in it that holds a metrics.jsonl), or a folder of such folders."""
    path = Path(arg)
    if path.name == "metrics.jsonl":
        return [path.parent]
    if path.is_dir() and not (path / "metrics.jsonl").exists():  # its runs, or its experiments' (a checkpoint_dir each)
        found = sorted(run for run in path.glob("*/metrics.jsonl")) or sorted(path.glob("*/*/metrics.jsonl"))
        return [run.parent for run in found if run.is_file()] or [path]
    return [path]


def runs_of(args) -> list[Path]:
    """The run directories the arguments stand for (runs_in), each once."""
    return list({run.resolve(): run for arg in args for run in runs_in(arg)}.values())


def one_point(points) -> dict:
    """A marker for a line of a single point, which draws nothing otherwise."""
    return {"marker": "o"} if len(points) == 1 else {}


def comparable_stretches(evaluations) -> list[list]:
    """The evaluations cut where a resume changed what validation measures (measured_anew): a line
    does not join losses that are not comparable."""
    stretches = []
    for record in evaluations:
        if not stretches or record.get("measured_anew"):
            stretches.append([])
        stretches[-1].append(record)
    return stretches


# settings that change neither what a run learns nor what its validation measures: left out of the labels
# (DDP and FSDP compute the same steps)
# (dataloader.num_workers is labelled: its readers deal the data, so it changes the order of the batches)
NOT_IN_LABELS = ("logging.", "dataloader.pin_memory", "dataloader.prefetch_factor", "training.checkpoint_dir",
                 "training.log_freq", "training.test_freq", "training.checkpoint_freq", "training.keep_last_n",
                 "training.debug", "training.device",
                 "training.distributed", "training.compile", "training.activation_checkpointing",
                 "dataset.max_cached_files")
STARTED_FROM = "training.resume_from_checkpoint"  # in config.yaml: the export or loose checkpoint a run started from
MAX_LABEL_SETTINGS = 4
FIGURE_WIDTH_IN = 16
VALIDATION = {"marker": "o", "linestyle": "--"}  # the validation losses' line style (the training losses: solid)
LATENTS = {"sparsity_x": {"marker": "o", "linestyle": "-"},  # the active shares of the x and y latents: their styles
           "sparsity_y": {"marker": "s", "linestyle": ":"}}


def run_settings(run_dir: Path) -> dict:
    """{section.key: value} of the config a run started with (config.yaml), a value that a resume
    changed (config_resume_<step>.yaml) as `first→...→last`; {} without config.yaml. An `auto`
    setting is the value it resolved to on the run's machine (compute_dtype bfloat16); a setting
    that none of the run's configs used (an fp8 one with use_fp8 off) is left out."""
    history, unused = {}, None
    for path in [Path(run_dir) / "config.yaml", *(path for _, path in resumed_configs(run_dir))]:
        try:
            text = path.read_text(encoding="utf-8")
            raw = yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            if not history:
                return {}
            continue
        raw = with_split_settings(raw) if isinstance(raw, dict) else {}
        unused = not_used(raw) if unused is None else unused & not_used(raw)
        low_precision = raw.get("low_precision")
        older = not settings_as_run(text)  # a run of an older version: what auto computed in is not known
        if older and isinstance(low_precision, dict) and low_precision.get("compute_dtype") == "auto":
            del low_precision["compute_dtype"]
        with_settings_as_run(raw, text)
        for section, values in raw.items():
            for key, value in (values if isinstance(values, dict) else {}).items():
                values_seen = history.setdefault(f"{section}.{key}", [])
                if not values_seen or values_seen[-1] != value:
                    values_seen.append(value)
    if STARTED_FROM in history:  # where it started; its resumes' checkpoints are its own
        history[STARTED_FROM] = history[STARTED_FROM][:1]
    return {key: values[0] if len(values) == 1 else Changed("→".join(map(shown_value, values)))
            for key, values in history.items() if key not in unused}


def not_used(raw: dict) -> set[str]:
    """The settings that nothing reads in a run's config (Config.unused_paths); none where the config
    no longer loads (a version's settings since renamed)."""
    from config import Config  # (torch: not before a picture is asked for)
    try:
        return set(Config.from_dict(raw).unused_paths())
    except ConfigError:
        return set()


class Changed(str):
    """A setting's values as a resume changed them: first→...→last."""

    def shortened(self) -> str:
        """first→…→last where there are more than three (a legend of a run resumed many times fits)."""
        values = self.split("→")
        return f"{values[0]}→…→{values[-1]}" if len(values) > 3 else self


def labels(names: list[str], settings: list[dict], limit: int | None = MAX_LABEL_SETTINGS) -> list[str]:
    """Each run's name and the settings in which the runs differ, or that a resume changed (the
    tokenizer first, then those with the most values, such as a sweep's), so that the curves of
    several runs can be told apart: run_20261123_101500 (tokenizer=tokenizer.json); the first `limit`
    of them, then "...". Where more than MAX_LABEL_SETTINGS differ, a run shows where it departs from
    the value most runs share (a sweep's baseline: shared_settings); a run with no departure, its
    values. A run without settings (no config.yaml) keeps its name, and is left out of the comparison;
    so is a setting a run's older version did not record."""
    differing, shared = compared(settings)
    described = []
    for s in settings:
        keys = [key for key in differing if key in s]
        if len(differing) > MAX_LABEL_SETTINGS:
            keys = [key for key in keys if key not in shared or repr(s[key]) != repr(shared[key])] or keys
        more = ", ..." if limit is not None and len(keys) > limit else ""
        shown = [s[key].shortened() if limit is not None and isinstance(s[key], Changed) else shown_value(s[key])
                 for key in keys[:limit]]  # (the terminal's list, limit None: every value)
        described.append(", ".join(f"{shown_name(key)}={value}" for key, value in zip(keys, shown)) + more)
    return [f"{name} ({words})" if words else name for name, words in zip(names, described)]


def compared(settings: list[dict]) -> tuple[list[str], dict]:
    """The settings in which the runs differ, in the labels' order; and of those, {setting: the value
    that more runs have than any other}, where one does."""
    known = [s for s in settings if s]
    values = lambda key: [repr(s[key]) for s in known if key in s]  # noqa: E731
    differing = [key for key in dict.fromkeys(k for s in known for k in s) if not key.startswith(NOT_IN_LABELS)
                 and (len(set(values(key))) > 1 or any(isinstance(s.get(key), Changed) for s in known))]
    tokenizers = {s.get("dataset.tokenizer") for s in known}
    if "dataset.tokenizer" in differing and all(  # a vocab_size each tokenizer implies says nothing more
            len({repr(s.get("model.vocab_size")) for s in known if s.get("dataset.tokenizer") == t}) == 1
            for t in tokenizers):
        differing = [key for key in differing if key != "model.vocab_size"]
    differing.sort(key=lambda key: (key != "dataset.tokenizer", -len(set(values(key)))))
    shared = {}
    for key in differing:
        counts = Counter(values(key)).most_common(2)
        if len(counts) == 1 or counts[0][1] > counts[1][1]:
            shared[key] = next(s[key] for s in known if key in s and repr(s[key]) == counts[0][0])
    return differing, shared


def shared_settings(settings: list[dict]) -> str:
    """Where the labels name each run's departures: the values most runs share, "dropout=0.0, ..."."""
    differing, shared = compared(settings)
    if len(differing) <= MAX_LABEL_SETTINGS:
        return ""
    return ", ".join(f"{shown_name(key)}={shown_value(value)}" for key, value in shared.items())


def shown_name(path: str) -> str:
    """A setting's name in a label: its key, or its whole path where the key alone does not say what it
    is (fp8.format)."""
    section, key = path.split(".")
    return path if section == "fp8" else key


def shown_value(value) -> str:
    """A setting's value in a label, as its config file writes it: null, true, false; text unquoted."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def text_read(evaluation: dict) -> float | None:
    """The bytes of training text read by an evaluation's step: its tokens x the bytes per token of the
    validation text (val_loss / (bits per byte x ln 2)), the x of bits per byte, which then compares runs of
    different tokenizers as the text they learnt from."""
    tokens, loss, bpb = evaluation.get("tokens"), evaluation.get("val_loss"), evaluation.get("val_bits_per_byte")
    if not (tokens and loss and bpb):
        return None
    return tokens * loss / (bpb * math.log(2))


def averaged_at(train) -> tuple[list, list]:
    """The steps and tokens at which to draw the training losses: each record's loss is the mean over
    its interval_steps since the record before, so it goes at their middle. At its last step, a mean
    over 100 steps would lag behind the validation losses, and a resumed process's first records (of 1
    to 5 steps each) would show as a dip below the curve. (Records of versions before 0.4.11, and one
    whose interval's start has no record, go at their step.)"""
    steps, tokens, before = [], [], None
    for record in train:
        interval = record.get("interval_steps", 1)
        adjoins = before is not None and before["step"] == record["step"] - interval
        back = (interval - 1) / 2 if adjoins else 0  # (a process's first record is of one step: 0 too)
        made = record.get("tokens")
        steps.append(record["step"] - back)
        tokens.append(made - (made - before.get("tokens", made)) / interval * back if back and made else made)
        before = record
    return steps, tokens


def readable_runs(args) -> tuple[list[Path], list[tuple[list, list]], list[str]]:
    """The run directories that `args` give (runs_of) and have logged, their (training, evaluation)
    records and names: a run's directory name, or experiment/run_... for runs of several folders. A run
    that has logged nothing yet is left out with a note, unless no run has."""
    read, problems = {}, []
    for run_dir in runs_of(args):
        try:
            read[run_dir] = read_metrics(run_dir)
        except NothingLogged as e:  # among several runs: one that has not logged yet is left out, not the picture
            problems.append(e)
    if problems and not read:
        raise problems[0]
    for problem in problems:
        print(f"note: {problem}; left out", file=sys.stderr)
    run_dirs = [Path(d).resolve() for d in read]
    several_folders = len({d.parent for d in run_dirs}) > 1  # runs of several folders (experiments): say which
    names = [f"{d.parent.name}/{d.name}" if several_folders else d.name for d in run_dirs]
    return list(read), list(read.values()), names


def draw_curves(axes, runs, colors):
    """Each run's curves, in its colour, into the six panels."""
    (loss_steps, loss_tokens, bpb), (lr, sparsity, speed) = axes
    for (train, evaluations), color in zip(runs, colors):
        steps = [r["step"] for r in train]
        for ax, x in zip((loss_steps, loss_tokens), averaged_at(train)):
            if train:
                ax.plot(x, [r["train_loss"] for r in train], color=color, alpha=0.8, **one_point(train))
        for stretch in comparable_stretches(evaluations):
            val_steps = [r["step"] for r in stretch]
            for ax, val_x in ((loss_steps, val_steps), (loss_tokens, [r.get("tokens") for r in stretch])):
                ax.plot(val_x, [r["val_loss"] for r in stretch], color=color, **VALIDATION)
            if measured := [r for r in stretch if text_read(r) is not None]:
                bpb.plot([text_read(r) for r in measured], [r["val_bits_per_byte"] for r in measured], "o-", color=color)
            with_sparsity = [r for r in stretch if r.get("sparsity_x")]
            for key, style in LATENTS.items() if with_sparsity else ():
                sparsity.plot([r["step"] for r in with_sparsity], [sum(r[key]) / len(r[key]) for r in with_sparsity],
                              color=color, **style)
        if train:
            lr.plot(steps, [r.get("lr") for r in train], color=color, **one_point(train))
            timed = [r for r in train if not r.get("compiling")]  # a compiling step's time is not its speed
            speed.plot([r["step"] for r in timed], [r.get("tokens_per_s") for r in timed], color=color,
                       **one_point(timed))


def label_panels(fig, axes, runs, names, colors, per_token: str):
    """Titles, axes and legends: the runs by colour once, under the panels; in a panel, only what its
    line styles mean."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter, MaxNLocator
    (loss_steps, loss_tokens, bpb), (lr, sparsity, speed) = axes
    titles = (("loss against steps", "step", per_token),
              ("loss against tokens", "tokens", per_token),
              ("validation bits per byte against text read", "training text read (bytes)", "bits per byte"),
              ("learning rate", "step", "learning rate"),
              ("active latent neurons (mean over layers)", "step", "fraction non-zero"),
              ("training speed", "step", "tokens/s"))
    for ax, (title, xlabel, ylabel) in zip(axes.flat, titles):
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center", color="grey")
    loss_styles = [Line2D([], [], color="grey", label="train")] * any(train for train, _ in runs) + [
        Line2D([], [], color="grey", label="validation", **VALIDATION)] * any(evaluations for _, evaluations in runs)
    for ax in (loss_steps, loss_tokens):
        if loss_styles:
            ax.legend(handles=loss_styles, fontsize=8)
    if sparsity.has_data():
        sparsity.legend(handles=[Line2D([], [], color="grey", label=f"{key[-1]} latent", **style)
                                 for key, style in LATENTS.items()], fontsize=8)
    label_px = 7 * max(map(len, names)) + 70  # 9-point text at 100 dpi, and the line before it
    columns = max(1, min(3, len(names), (FIGURE_WIDTH_IN * 100 - 40) // label_px))
    rows = -(-len(names) // columns)
    fig.legend(handles=[Line2D([], [], color=color, label=name) for name, color in zip(names, colors)],
               loc="lower center", ncol=columns, fontsize=9, frameon=False)
    loss_tokens.xaxis.set_major_formatter(EngFormatter())  # 50k, 100k, ... rather than digits that run together
    if bpb.has_data():  # (an empty axis runs from 0 to 1: "200 mB")
        bpb.xaxis.set_major_formatter(EngFormatter(unit="B"))
        bpb.xaxis.set_major_locator(MaxNLocator(nbins=4))  # ("100 kB125 kB150 kB" ran together)
    for ax in (loss_steps, lr, sparsity, speed):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # steps: no 22.5 (nor 3.8 about one)
    speed.yaxis.set_major_formatter(EngFormatter())
    fig.tight_layout(rect=(0, 0.025 * rows + 0.01, 1, 1))


def plot(run_dirs, out: Path) -> list[str]:
    """Draw the runs' curves into `out`; returns each run's name with every setting that tells it
    apart (the legend shows the first few), and for a sweep, the values most runs share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run_dirs, runs, names = readable_runs(run_dirs)
    settings = [run_settings(d) for d in run_dirs]
    if len({evaluations[-1]["validation_batches"] for _, evaluations in runs
            if evaluations and evaluations[-1].get("validation_batches")}) > 1:  # (older runs do not say)
        print("note: these runs measure their validation loss on different batches (other data, tokenizer, "
              "dataset.split_seed, val_fraction, split_by, batch_size, block_size or eval_iters): their validation "
              "curves compare only roughly", file=sys.stderr)
    for name, (_, evaluations) in zip(names, runs):
        if anew := [str(record["step"]) for record in evaluations[1:] if record.get("measured_anew")]:
            many = len(anew) > 1
            print(f"note: {name}: {'resumes' if many else 'a resume'} changed what validation measures (the "
                  f"evaluations from step{'s' * many} {', '.join(anew)}): its validation lines break there",
                  file=sys.stderr)
    full_names = labels(names, settings, limit=None)
    names = labels(names, settings)
    per_token = ("loss (nats/token: not across tokenizers)"  # (bits per byte compares them)
                 if len({s.get("dataset.tokenizer") for s in settings if s}) > 1 else "loss (nats per token)")
    fig, axes = plt.subplots(2, 3, figsize=(FIGURE_WIDTH_IN, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10
    draw_curves(axes, runs, colors)
    label_panels(fig, axes, runs, names, colors, per_token)
    fig.savefig(folder_made_for(out), dpi=100)
    plt.close(fig)
    return full_names + ([f"most runs: {shared}"] if (shared := shared_settings(settings)) else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (or their metrics.jsonl), or folders of runs")
    parser.add_argument("--out", default="curves.png", help="the picture to write (default curves.png)")
    args = parse_arguments(parser, argv)
    try:
        out = picture_path(args.out)
    except ValueError as e:
        parser.error(str(e))
    try:
        runs = plot(args.runs, out)
    except (PlotError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}:")
    for run in runs:
        print(f"  {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
