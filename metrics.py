"""Where a run's numbers go: metrics.jsonl in the run directory (always), TensorBoard event files
beside it (logging.tensorboard), and Weights & Biases (logging.wandb). Only the process that writes
the run directory logs (rank 0 under torchrun).

The run directory appears with the first checkpoint: records made before wait in memory and are
written to metrics.jsonl and TensorBoard then (flush). W&B starts with the run, its files under
<checkpoint_dir>/wandb/, and its run id is kept in the run directory (wandb_run_id), so a resumed
run continues the same W&B run (or a new one, when W&B has logged past the checkpoint's step). A
resume also cuts metrics.jsonl and the TensorBoard curves back to the checkpoint's step: the steps
after it are trained again and logged once. Where a resume changed what validation measures
(measured_anew), the evaluations from then on go to TensorBoard as a run of their own,
validation_from_step_<step> in the run directory: its curves do not join losses that do not
compare. StepLog measures the training steps for their records and prints their lines
(console.step_line words them).
"""
import collections
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import time

import torch

from config import step_tokens
from console import step_line
from files import atomic_write, read_records
from positions import epochs_read
from readers import reader_count
from runtime import first_line, peak_memory_bytes
from stopping import EVALUATING, SAVING

# metrics.jsonl key -> TensorBoard and W&B tag; the per-layer lists get one tag per layer and a mean
TAGS = {"train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "skipped_steps": "train/skipped_steps", "tokens_per_s": "speed/tokens_per_s", "ms_per_step": "speed/ms_per_step",
        "mfu": "speed/mfu", "data_wait": "speed/data_wait", "epochs": "data/epochs", "tokens": "data/tokens",
        "peak_memory_mib": "memory/peak_mib", "val_loss": "val/loss", "val_bits_per_byte": "val/bits_per_byte"}
PER_LAYER = {"sparsity_x": "sparsity/x", "sparsity_y": "sparsity/y"}  # the share of latents active: lower is sparser
VALIDATION_RUN = "validation_from_step_"  # TensorBoard's run of the evaluations since a resume measured anew
FIRST_STEPS_LOGGED = (1, 2, 5, 10)  # of each process, whatever log_freq says: whether it is viable shows in a minute
ETA_LINES, ETA_SECONDS = 20, 60  # the ETA's speed: that of the last lines' steps, or of the last minute's if more
SLOW_CPU_STEP_S = 5  # seconds a step on CPU (tiny.yaml: about 0.1) above which an hours-long run suggests tiny.yaml
# StepLog.sums: the line's summed loss, gradient norm of the finite steps and skipped steps; the current step's
# loss until it completes
LOSS, GRAD_NORM, SKIPPED, STEP_LOSS = range(4)


class MetricsError(Exception):
    pass


class MetricsLog:
    def __init__(self, run, cfg, resumed_step: int | None = None, evaluation_due: bool = False):
        """evaluation_due: the resume evaluates resumed_step first (a stop saved before it): an earlier
        resume from the same checkpoint may have recorded that evaluation, which then goes."""
        self.run, self.settings, self.resumed_step = run, cfg.logging, resumed_step
        self.config_yaml = cfg.to_yaml()  # TensorBoard's text: which run is which, and what a resume changed
        self.pending, self.tensorboard, self.wandb = [], None, None
        # the step of the evaluations' TensorBoard run since a resume measured anew (validation_from_step_<it>), and
        # whether the run evaluated before (its first evaluation, measured anew or not, has nothing to keep apart from)
        self.validation_writers, self.measured_anew_at, self.evaluated = {}, None, False
        if not run.writer:
            return
        self.logged_to = -1  # the last step the run's earlier processes logged (a resume redoes those after it)
        if resumed_step is not None:
            try:
                self.logged_to = self._truncate(resumed_step, evaluation_due)
            except OSError as e:  # a full disk: the records cannot be cut back to the checkpoint
                raise MetricsError(f"{run.path / 'metrics.jsonl'}: cannot cut the run's records back to step "
                                   f"{resumed_step} ({e.strerror or first_line(e)}); the checkpoints are "
                                   f"intact: make room (or fix the folder), then resume again") from None
        if self.settings.wandb:
            self._start_wandb(cfg)

    def log(self, record: dict):
        """One record: a step, scalars, per-layer lists, the generated sample."""
        if self.run.writer:
            self.pending.append(record)
            if self.wandb is not None:
                self.wandb.log(wandb_values(record), step=record["step"])
            self.flush()

    def flush(self, sync: bool = False):
        """Write what waits, once the run directory exists; `sync` (at a checkpoint, at the end): fsync
        metrics.jsonl too (an fsync for every line took a quarter of a small model's step at log_freq 1
        on a busy disk)."""
        if not self.run.writer or self.run.path is None or not (self.pending or sync):
            return
        try:
            self._write(sync)
        except OSError as e:  # a disk that filled up since the checkpoint, a folder made read-only
            raise MetricsError(f"{self.run.path}: cannot write the run's records ({e.strerror or first_line(e)}); the "
                               f"checkpoints written are intact: make room (or fix the folder), then resume") from None
        self.pending = []

    def _write(self, sync: bool):
        if self.settings.tensorboard and self.tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter
            # A resume's writer starts with a session START at the step after its checkpoint: TensorBoard drops
            # the points from there on that the earlier processes wrote. Its server takes the first START of a
            # run as the run's beginning, not a restart: a new run writes one too, at step 0. (A due evaluation of
            # the resumed step, run again: TensorBoard keeps its earlier point, the same value.)
            purge = 0 if self.resumed_step is None else self.resumed_step + 1
            self.tensorboard = SummaryWriter(str(self.run.path), purge_step=purge)
            # the config of each process, at its first step: what a resume changed shows in the text tab
            self.tensorboard.add_text("config", indented(self.config_yaml), purge)
        if self.wandb is not None and not (self.run.path / "wandb_run_id").exists():
            atomic_write(self.run.path / "wandb_run_id", lambda f: f.write(self.wandb.id.encode()))
            if not self.settings.wandb_run_name and self.wandb.name != self.run.path.name:
                self.wandb.name = self.run.path.name  # run_X_2: another run took run_X in the same second
        with open(self.run.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            for record in self.pending:
                f.write(json.dumps(record) + "\n")
            f.flush()
            if sync:
                os.fsync(f.fileno())
        if self.tensorboard is not None:
            for record in self.pending:
                if "val_loss" in record:
                    if record.get("measured_anew") and self.evaluated:
                        self.measured_anew_at = record["step"]
                    self.evaluated = True
                writer = self.validation_writer() if "val_loss" in record else self.tensorboard
                for tag, value in scalars(record).items():
                    writer.add_scalar(tag, value, record["step"])
                if "sample" in record:
                    self.tensorboard.add_text("sample", sample_markdown(record), record["step"])
            for writer in (self.tensorboard, *self.validation_writers.values()):
                writer.flush()

    def validation_writer(self):
        """Where an evaluation's scalars go: the run's event files, or, since a resume changed what
        validation measures, those of validation_from_step_<the first evaluation since>."""
        if self.measured_anew_at is None:
            return self.tensorboard
        if self.measured_anew_at not in self.validation_writers:
            from torch.utils.tensorboard import SummaryWriter
            purge = None if self.resumed_step is None else self.resumed_step + 1
            self.validation_writers[self.measured_anew_at] = SummaryWriter(
                str(self.run.path / f"{VALIDATION_RUN}{self.measured_anew_at}"), purge_step=purge)
        return self.validation_writers[self.measured_anew_at]

    def close(self):
        self.flush(sync=True)
        for writer in ([self.tensorboard] if self.tensorboard is not None else []) + [*self.validation_writers.values()]:
            writer.close()
        if self.wandb is not None:
            self.wandb.finish()

    def _truncate(self, step: int, evaluation_due: bool) -> int:
        """Drop the records of steps after `step`, which the resumed run trains again (and the
        evaluation of `step` if it is due), and TensorBoard's runs of evaluations that begin there;
        returns the last step there was a record of (-1: none)."""
        for later in self.run.path.glob(f"{VALIDATION_RUN}*"):  # TensorBoard's evaluations from step on: redone
            if (at := re.fullmatch(rf"{VALIDATION_RUN}(\d+)", later.name)) and (
                    int(at[1]) > step or int(at[1]) == step and evaluation_due):
                shutil.rmtree(later)
        path = self.run.path / "metrics.jsonl"
        if not path.exists():
            if step > 0:
                print(f"note: {path} is missing: the run's records (plot.py) start again at step {step + 1}")
            return -1
        records = read_records(path)[0]  # a line a kill cut short goes
        kept = [record for record in records
                if record["step"] < step or record["step"] == step and not (evaluation_due and "val_loss" in record)]
        evaluations = [record for record in kept if "val_loss" in record]
        self.evaluated = bool(evaluations)
        self.measured_anew_at = max((record["step"] for record in evaluations[1:] if record.get("measured_anew")),
                                    default=None)
        atomic_write(path, lambda f: f.write("".join(json.dumps(record) + "\n" for record in kept).encode()))
        return max((record["step"] for record in records), default=-1)

    def _start_wandb(self, cfg):
        import wandb
        id_file = None if self.run.path is None else self.run.path / "wandb_run_id"
        continues = id_file is not None and id_file.exists()  # a resumed run that logged to W&B before
        run_id = id_file.read_text().strip() if continues else secrets.token_hex(6)
        folder = self.run.checkpoint_dir.resolve()  # (resolved: x/../mine, with x missing, is mine)
        created = [path for path in (folder, *folder.parents) if not path.exists()]  # what mkdir makes, deepest first
        folder.mkdir(parents=True, exist_ok=True)
        settings = dict(project=self.settings.wandb_project, entity=self.settings.wandb_entity,
                        name=self.settings.wandb_run_name or self.run.name, dir=str(folder), config=cfg.to_dict())
        # W&B ignores a step below one the run has logged: the steps after the checkpoint, trained again, would be
        # lost. They go to a new W&B run of the same name. metrics.jsonl may say so already (offline, the only
        # record): then the old W&B run is not opened at all (offline, that would leave a folder to sync).
        ahead = continues and self.logged_to > self.resumed_step
        try:
            self.wandb = wandb.init(id=secrets.token_hex(6) if ahead else run_id, resume="allow", **settings)
            # what W&B holds: its server says (starting_step), offline only metrics.jsonl does
            logged_to = max(self.wandb.starting_step - 1, self.logged_to)
            if continues and not ahead and logged_to > self.resumed_step:
                self.wandb.finish()
                self.wandb = wandb.init(id=secrets.token_hex(6), **settings)
        except Exception as e:  # no API key, no network, a bad entity: before training, not hours in
            if created:  # the run never started: the folders made for W&B's files go (empty but for those)
                shutil.rmtree(folder / "wandb", ignore_errors=True)
                for path in created:
                    with contextlib.suppress(OSError):
                        path.rmdir()
            raise MetricsError(f"logging.wandb: W&B did not start ({first_line(e)}); run "
                               f"`wandb login`, set WANDB_MODE=offline, or set logging.wandb=false")
        if self.wandb.id != run_id:
            atomic_write(id_file, lambda f: f.write(self.wandb.id.encode()))
            print(f"W&B run {run_id} has logged up to step {logged_to}, past the checkpoint's step "
                  f"{self.resumed_step}: the resumed run logs to a new W&B run of the same name, {self.wandb.id}")


class StepLog:
    """The training steps' log lines. A line measures the steps since the one before: their loss
    and gradient norm are summed on the device and read at the line only (no wait for the GPU at
    every step); their speed leaves out the seconds spent evaluating and saving (paused_s) and
    counts those spent waiting for the loader (data_wait_s, shown as a share)."""

    def __init__(self, cfg, metrics: MetricsLog, ranks, device, units, workers, positions, first_step: int,
                 compiling_steps: tuple, loss_scaled: bool, peak: float, saved_passes: float | None = None):
        """compiling_steps: those torch.compile compiles for (a compiled run's first, and the first
        of quantization-aware training, whose forward differs)."""
        self.cfg, self.metrics, self.ranks, self.device, self.units = cfg, metrics, ranks, device, units
        self.first_step, self.compiling_steps = first_step, compiling_steps
        self.loss_scaled, self.peak = loss_scaled, peak
        self.tokens_per_step = step_tokens(cfg.training, ranks.world_size)
        self.flops_per_token = cfg.model.training_flops_per_token(cfg.training.block_size)
        self.n_readers, self.dealings = reader_count(workers, ranks.world_size), {}  # (epochs_read's dealings)
        self.readers = range(ranks.rank * max(1, workers), (ranks.rank + 1) * max(1, workers))  # this rank's
        positions = list(positions)
        # the epochs every reader had finished when this stream began (a resume may have dealt them otherwise)
        self.whole_before = min((p["epoch"] + ("units" in p) for p in positions), default=0)
        self.sums = torch.zeros(4, device=device)  # indexed by LOSS, GRAD_NORM, SKIPPED, STEP_LOSS
        self.start = time.perf_counter()
        # a resume on other data starts a fresh epoch: the one it left counts for what was read of it
        # (saved_passes, the checkpoint's count), not as a whole pass
        begun = self.epochs_begun(positions)
        self.unread = 0.0 if saved_passes is None else begun - saved_passes
        # the passes over the data (the text read over all of it) as of the last log line
        self.epoch, self.passes_logged = self.epoch_all_are_in(positions), begun - self.unread
        self.epochs_ended = 0  # (measure() sets it for its line)
        self.took = {}  # seconds the last evaluation and the last checkpoint took (train.paused)
        self.recent, self.opening = collections.deque(), None  # (seconds, steps) of lines: eta()
        self.recent_total = [0.0, 0]  # the sums of recent's seconds and steps
        self._next_line()

    def _next_line(self):
        self.sums.zero_()
        self.micro_batches, self.steps = 0, 0
        self.line_start, self.paused_s, self.data_wait_s = time.perf_counter(), 0.0, 0.0

    def epochs_begun(self, positions) -> float:
        """The passes over the data that the readers have made (positions.epochs_read), this rank's at
        `positions`: the mean over the ranks, each with as many readers (every rank calls it)."""
        mine = epochs_read(positions, self.units, self.cfg.training.seed, self.n_readers, self.dealings,
                           readers=self.readers, whole_before=self.whole_before)
        if not self.ranks.enabled:
            return mine
        return self.ranks.mean(torch.tensor([mine], dtype=torch.float64, device=self.device)).item()

    def epoch_all_are_in(self, positions) -> int:
        """The epoch of the slowest reader of all ranks: once it goes on, every document has been read
        again (every rank calls it)."""
        epochs = {p["reader"]: p["epoch"] for p in positions}
        return round(self.ranks.lowest(min(epochs.get(reader, self.whole_before) for reader in self.readers),
                                       self.device))

    def passes(self, positions) -> float:
        """About how many passes over the training data the readers at `positions` have made."""
        return self.epochs_begun(positions) - self.unread

    def add_micro_batch(self, loss: torch.Tensor):
        self.sums[STEP_LOSS] += loss.detach()

    def add_step(self, grad_norm: torch.Tensor):
        """An optimizer step with its gradient norm before clipping. A norm that is not finite is
        counted apart (float16: the scaler skipped that step; otherwise it was applied)."""
        self.sums[LOSS] += self.sums[STEP_LOSS]
        self.sums[STEP_LOSS] = 0
        self.micro_batches += self.cfg.training.gradient_accumulation_steps
        skipped = ~grad_norm.isfinite()
        self.sums[GRAD_NORM] += torch.where(skipped, 0.0, grad_norm)
        self.sums[SKIPPED] += skipped
        self.steps += 1

    def due(self, step: int, ends_a_stretch: bool) -> bool:
        """Whether `step` gets its line: every log_freq steps, a run's first few, and a step that
        evaluates, saves or stops (`ends_a_stretch`): a run resumed from its checkpoint (best.pt at an
        evaluation) would never log the steps since the last line."""
        log_freq = 1 if self.cfg.training.debug else self.cfg.training.log_freq
        return step % log_freq == 0 or ends_a_stretch or step - self.first_step + 1 in FIRST_STEPS_LOGGED

    def measure(self, step: int, lr: float, tokens: int, positions) -> dict:
        """The record of the steps since the last line, up to `step` (every rank's mean: all ranks call
        it); write() prints it and starts the next line."""
        loss, grad_norm, skipped = self.ranks.mean(self.sums[:STEP_LOSS] / torch.tensor(
            [max(1, self.micro_batches), 1, 1], device=self.device)).tolist()
        skipped = round(skipped)
        counted = self.steps - skipped  # the steps whose gradients were finite
        now = time.perf_counter()
        seconds_per_step = (now - self.line_start - self.paused_s) / self.steps
        positions = list(positions)
        epoch = self.epoch_all_are_in(positions)
        self.epochs_ended, self.epoch = epoch - self.epoch, epoch
        self.passes_logged = self.passes(positions)
        record = {"step": step, "interval_steps": self.steps, "tokens": tokens, "epochs": round(self.passes_logged, 3),
                  "train_loss": loss, "lr": lr,
                  "grad_norm": grad_norm / counted if counted else None,
                  "tokens_per_s": round(self.tokens_per_step / seconds_per_step),
                  "ms_per_step": round(seconds_per_step * 1000, 2),
                  "data_wait": round(self.data_wait_s / (seconds_per_step * self.steps), 4),
                  "peak_memory_mib": round(peak_memory_bytes(self.device) / 2**20, 1),
                  "elapsed_s": round(now - self.start, 2)}
        if self.loss_scaled:
            record["skipped_steps"] = skipped
        if any(step - self.steps < compiling <= step for compiling in self.compiling_steps):
            record["compiling"] = True  # the line's time is mostly compilation: not a speed to plot
        if self.peak:  # tokens_per_step counts every rank; peak is one GPU's
            flops_per_s = self.flops_per_token * self.tokens_per_step / self.ranks.world_size / seconds_per_step
            record["mfu"] = flops_per_s / self.peak
        return record

    def pauses_left(self, step: int) -> tuple[float, bool]:
        """Seconds the evaluations and checkpoints from `step` on will take (its line comes before its
        own), at what the last of each took; and whether some of them are left out, being due but
        not yet timed in this process."""
        max_iters = self.cfg.training.max_iters

        def due_from(every):  # every `every` steps, and at max_iters
            return max_iters // every - (step - 1) // every + (max_iters % every != 0)
        due = {doing: due_from(every) for doing, every in (
            (EVALUATING, self.cfg.training.test_freq), (SAVING, self.cfg.training.checkpoint_freq))}
        return (sum(self.took.get(doing, 0.0) * count for doing, count in due.items()),
                any(count and doing not in self.took for doing, count in due.items()))

    def eta(self, record: dict, first: bool) -> tuple[float | None, bool]:
        """Seconds left after the record's step (None while it compiles), and whether evaluations or
        checkpoints not yet timed are left out. The steps left go at the speed of the last ETA_LINES
        lines, or of those of the last ETA_SECONDS where they are more (log_freq 1): one interval's is
        noisy on a shared machine. A process's first line (its loader starting) counts only until
        there is another."""
        pauses, untimed = self.pauses_left(record["step"])
        if record.get("compiling"):
            return None, untimed
        timed = (record["ms_per_step"] / 1000 * self.steps, self.steps)
        if first:
            self.opening = timed
        else:
            self.recent.append(timed)
            self.recent_total = [total + value for total, value in zip(self.recent_total, timed)]
            while len(self.recent) > ETA_LINES and self.recent_total[0] - self.recent[0][0] >= ETA_SECONDS:
                self.recent_total = [total - value for total, value in zip(self.recent_total, self.recent.popleft())]
        seconds, steps = self.recent_total if self.recent else self.opening
        return seconds / steps * (self.cfg.training.max_iters - record["step"]) + pauses, untimed

    def write(self, record: dict):
        """Print the record's line (and notes it calls for) and record it."""
        step, max_iters = record["step"], self.cfg.training.max_iters
        seconds_per_step = record["ms_per_step"] / 1000
        first = step - self.steps + 1 == self.first_step
        eta, untimed = self.eta(record, first)
        print(step_line(record, max_iters, eta, record["elapsed_s"], at_least=untimed, first=first), flush=True)
        if (self.first_step == 1 and step == 2 and self.device.type == "cpu" and seconds_per_step > SLOW_CPU_STEP_S
                and seconds_per_step * max_iters > 3600):  # a fresh run's first step not compiling
            print(f"  note: at this speed the run takes about {seconds_per_step * max_iters / 3600:.1f} hours on "
                  f"this CPU: model and batch are sized for a GPU; configs/tiny.yaml is sized for a CPU (minutes)",
                  flush=True)
        if self.epochs_ended > 0:  # (more than one: passes shorter than log_freq steps)
            done = f"pass {self.epoch} over the training data is" if self.epochs_ended == 1 else \
                f"passes {self.epoch - self.epochs_ended + 1} to {self.epoch} over the training data are"
            print(f"  {done} done: the documents are read again, reshuffled", flush=True)
        self.metrics.log(record)
        self._next_line()  # writing the line is not the next line's training time


def check_installed(settings):
    """The packages the logging settings ask for: before anything is trained or written."""
    for enabled, package, setting in ((settings.tensorboard, "tensorboard", "logging.tensorboard"),
                                      (settings.wandb, "wandb", "logging.wandb")):
        if enabled and importlib.util.find_spec(package) is None:
            raise MetricsError(f"{setting}: the {package} package is not installed; pip install {package} "
                               f"(or -r requirements-dev.txt), or set {setting}=false")


def scalars(record: dict) -> dict:
    """TensorBoard/W&B tag -> number for one record (a compiling step's speed is left out)."""
    out = {tag: record[key] for key, tag in TAGS.items() if record.get(key) is not None
           and not (record.get("compiling") and tag.startswith("speed/"))
           and not (key == "tokens" and "val_loss" in record)}  # (the step's own record has them)
    for key, tag in PER_LAYER.items():
        if key in record:
            out.update({f"{tag}_layer{i}": v for i, v in enumerate(record[key])})
            out[f"{tag}_mean"] = sum(record[key]) / len(record[key])
    return out


def wandb_values(record: dict) -> dict:
    values = scalars(record)
    if "sample" in record:
        values["val/sample"] = record["sample"]
        values["val/sample_prompt"] = record["sample_prompt"]
    return values


def indented(text: str) -> str:
    """Text as a Markdown code block, as TensorBoard's text tab shows it: verbatim."""
    return "    " + text.replace("\n", "\n    ")


def sample_markdown(record: dict) -> str:
    """TensorBoard's text: the prompt and the model's continuation as two code blocks."""
    return (f"validation text:\n\n{indented(record['sample_prompt'])}\n\nthe model continues:\n\n"
            f"{indented(record['sample'])}")
