"""The training steps' log lines: what each measures of the steps since the one before (loss,
gradient norm, speed, MFU, the wait for data, the passes over the data, the time left), printed
(console.step_line words them) and recorded (metrics.MetricsLog).
"""
import collections
import time

import torch

from config import step_tokens
from console import step_line
from metrics import MetricsLog
from positions import epochs_read
from readers import reader_count
from runtime import peak_memory_bytes
from stopping import EVALUATING, SAVING

FIRST_STEPS_LOGGED = (1, 2, 5, 10)  # of each process, whatever log_freq says: whether it is viable shows in a minute
ETA_LINES, ETA_SECONDS = 20, 60  # the ETA's speed: that of the last lines' steps, or of the last minute's if more
SLOW_CPU_STEP_S = 5  # seconds a step on CPU (tiny.yaml: about 0.1) above which an hours-long run suggests tiny.yaml
# StepLog.sums: the line's summed loss, gradient norm of the finite steps and skipped steps; the current step's
# loss until it completes
LOSS, GRAD_NORM, SKIPPED, STEP_LOSS = range(4)


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
        # the passes logged go on from the checkpoint's count (saved_passes). A resume on other documents starts a
        # fresh epoch: the one it left counts for what was read of it, not as a whole pass. One that dealt the rest
        # of an epoch anew (to other readers, or on shards added or removed: a share of other data now) reaches the
        # epoch's end with it, the rest of that epoch counted in proportion
        begun, self.epoch = self.epochs_begun(positions), self.epoch_all_are_in(positions)
        self.saved_passes, self.begun, end = saved_passes, begun, self.epoch + 1
        redealt = ranks.any(any("units" in p for p in positions), device)
        ends_with_it = redealt and saved_passes is not None and saved_passes < end
        self.scaled_until = end if ends_with_it and begun < end else None  # (nothing left of it: the count is end)
        self.unread = 0.0 if saved_passes is None or ends_with_it else begun - saved_passes
        # the passes over the data (the text read over all of it) as of the last log line
        self.passes_logged = self.counted(begun)
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
        return self.counted(self.epochs_begun(positions))

    def counted(self, read: float) -> float:
        """The passes logged where the readers have made `read` passes (epochs_begun's)."""
        end = self.scaled_until
        if end is not None and read < end:
            return end - (end - read) * (end - self.saved_passes) / (end - self.begun)
        return read - self.unread

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
