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
compare. (step_log.py measures the training steps for their records.)
"""
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil

from config_file import with_settings_as_run
from files import atomic_write, read_records
from runtime import config_as_run, first_line

# metrics.jsonl key -> TensorBoard and W&B tag; the per-layer lists get one tag per layer and a mean
TAGS = {"train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "skipped_steps": "train/skipped_steps", "tokens_per_s": "speed/tokens_per_s", "ms_per_step": "speed/ms_per_step",
        "mfu": "speed/mfu", "data_wait": "speed/data_wait", "epochs": "data/epochs", "tokens": "data/tokens",
        "peak_memory_mib": "memory/peak_mib", "val_loss": "val/loss", "val_bits_per_byte": "val/bits_per_byte"}
PER_LAYER = {"sparsity_x": "sparsity/x", "sparsity_y": "sparsity/y"}  # the share of latents active: lower is sparser
VALIDATION_RUN = "validation_from_step_"  # TensorBoard's run of the evaluations since a resume measured anew


class MetricsError(Exception):
    pass


class MetricsLog:
    def __init__(self, run, cfg, device, resumed_step: int | None = None, evaluation_due: bool = False):
        """device: where the run computes, which decides its `auto` settings. evaluation_due: the resume
        evaluates resumed_step first (a stop saved before it): an earlier resume from the same checkpoint may
        have recorded that evaluation, which then goes."""
        self.run, self.settings, self.resumed_step = run, cfg.logging, resumed_step
        # TensorBoard's text: which run is which, what its auto settings were here, and what a resume changed
        self.config_yaml = config_as_run(cfg, device)
        self.config = with_settings_as_run(cfg.to_dict(), self.config_yaml)  # W&B's config, TensorBoard's HParams
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
            self._start_wandb()

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
            # the HParams tab: the runs side by side, a column for each setting (those that differ first) and
            # each curve's last value. TensorBoard keeps a run's first: the settings it started with.
            from torch.utils.tensorboard.summary import hparams
            _, session_start, _ = hparams(hparams_of(self.config), {})
            self.tensorboard.file_writer.add_summary(session_start)
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

    def _start_wandb(self):
        import wandb
        id_file = None if self.run.path is None else self.run.path / "wandb_run_id"
        continues = id_file is not None and id_file.exists()  # a resumed run that logged to W&B before
        run_id = id_file.read_text().strip() if continues else secrets.token_hex(6)
        folder = self.run.checkpoint_dir.resolve()  # (resolved: x/../mine, with x missing, is mine)
        created = [path for path in (folder, *folder.parents) if not path.exists()]  # what mkdir makes, deepest first
        folder.mkdir(parents=True, exist_ok=True)
        settings = dict(project=self.settings.wandb_project, entity=self.settings.wandb_entity,
                        name=self.settings.wandb_run_name or self.run.name, dir=str(folder), config=self.config)
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


def hparams_of(config: dict) -> dict:
    """The settings as TensorBoard's HParams tab takes them, {"model.n_layer": 3, ...}: numbers and
    text, true/false and null as the config file writes them. Not logging's: where the curves go."""
    shown = {None: "null", True: "true", False: "false"}
    return {f"{section}.{key}": shown[value] if value is None or isinstance(value, bool) else
            value if isinstance(value, (int, float, str)) else str(value)
            for section, values in config.items() if section != "logging" for key, value in values.items()}


def indented(text: str) -> str:
    """Text as a Markdown code block, as TensorBoard's text tab shows it: verbatim."""
    return "    " + text.replace("\n", "\n    ")


def sample_markdown(record: dict) -> str:
    """TensorBoard's text: the prompt and the model's continuation as two code blocks."""
    return (f"validation text:\n\n{indented(record['sample_prompt'])}\n\nthe model continues:\n\n"
            f"{indented(record['sample'])}")
