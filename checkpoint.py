"""Checkpoint files and exported models: what they hold, and reading them safely.

A checkpoint is one file (torch.save of Checkpoint.to_dict()) holding only tensors, numbers,
strings, lists and dicts; it is read with torch.load(weights_only=True), so loading one cannot run
code. Checkpoint is the one place that knows its layout. Where checkpoints live, and which one a
name means, is locate.py's job.
"""
import dataclasses
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from config import LowPrecisionConfig
from config_file import config_value, with_split_settings
from files import ZIP_MAGIC
from model import LAYER_WEIGHTS, BDH, BDHConfig, unpack_4bit
from runtime import first_line, shortened

PROJECT_VERSION = "0.5.2"


class CheckpointError(Exception):
    pass


@dataclass
class Checkpoint:
    """What a checkpoint holds. Weights are the canonical float32 tensors of MODEL.md, whatever
    trained them; the optimizer state is keyed by parameter name (version 0.1: by position);
    rng and data_positions hold every rank's and every reader's part."""
    step: int
    model: dict
    model_config: dict
    config: dict = field(default_factory=dict)
    optimizer: dict | None = None
    scaler: dict | None = None
    best_val_loss: float = math.inf
    rng: list = field(default_factory=list)
    data_order: dict | None = None  # the settings that decide the batch order (positions.data_order)
    data_positions: list = field(default_factory=list)  # every reader's position after batches_consumed
    batches_consumed: int = 0
    tokenizer: str = "bytes"  # tokenizer.py's to_str(): "bytes" or a tokenizer.json
    tokens: int | None = None  # trained on up to this step (None: written before version 0.4.0)
    passes: float | None = None  # over the training data, up to this step (None: written before version 0.4.2)
    measured_anew: bool = False  # a resume changed what validation measures, and no evaluation has run since
    evaluation_due: bool = False  # a stop saved before the evaluation due at this step: the resume runs it first
    validation_batches: str | None = None  # their fingerprint (None: written before version 0.4.4)
    command_line: dict = field(default_factory=dict)  # of the session that wrote it (resume_checks.command_line_record)
    seconds: float | None = None  # of training, in all the run's processes up to it (None: a run begun before 0.4.10)
    versions: dict = field(default_factory=lambda: {"torch": str(torch.__version__), "project": PROJECT_VERSION})

    def to_dict(self) -> dict:
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in ("data_order", "data_positions", "batches_consumed")}
        state["data"] = {"order": self.data_order, "batches": self.batches_consumed,
                         "positions": self.data_positions}
        return state

    @classmethod
    def from_dict(cls, state: dict) -> "Checkpoint":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in state.items() if k in names}
        values["model"] = {k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}
        if isinstance(values.get("rng"), dict):  # version 0.1: one process, one RNG state
            values["rng"] = [values["rng"]]
        data = state.get("data") or {}
        values.update(data_order=data.get("order"), data_positions=data.get("positions", []),
                      batches_consumed=data.get("batches", 0))
        with_split_settings(values.get("config") or {})
        return cls(**values)

    def low_precision(self) -> dict:
        return low_precision_of(self.config)


def low_precision_of(config: dict) -> dict:
    """A run's low_precision settings from its config (a checkpoint's, an export's config.json); the
    defaults for those an older version did not record."""
    return {**dataclasses.asdict(LowPrecisionConfig()), **config.get("low_precision", {})}


def load_checkpoint(path, check_sums=True) -> Checkpoint:
    """`check_sums`: compare the file's parts with their CRC-32 (a read of the whole file) first."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:  # no permission, removed meanwhile
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None
    if not magic:
        raise CheckpointError(f"{path}: not a checkpoint (the file is empty)")
    if magic != ZIP_MAGIC and magic[:1] != b"\x80":  # torch.save's zip, or its legacy pickle format
        raise CheckpointError(f"{path}: not a checkpoint (not a file written by torch.save)")
    if magic == ZIP_MAGIC and check_sums and (entry := damaged_entry(path)):
        raise CheckpointError(f"{path}: not a readable checkpoint (damaged: the bytes of {entry} do not match their "
                              f"checksum, a disk or copy error)")
    try:
        try:  # mapped: its tensors are read from the file as they are used (a resume held a copy of it all in memory)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=magic == ZIP_MAGIC)
        except Exception:
            if magic != ZIP_MAGIC:
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # a file system that maps no files
    except Exception as e:  # truncated, or holds code
        if "Weights only load failed" in str(e):
            why = "it holds Python objects, not only tensors and plain data; loading it could run code"
        else:  # a zip cut short (a full disk, a copy interrupted): torch's own words are cryptic
            why = f"cut short or corrupt: {shortened(first_line(e), 120)}"
        raise CheckpointError(f"{path}: not a readable checkpoint ({why})")
    missing = [k for k in ("model", "model_config", "step") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this project (missing {', '.join(missing)})")
    return Checkpoint.from_dict(state)


def damaged_entry(path: Path) -> str | None:
    """The first part of a torch.save zip whose bytes differ from the CRC-32 written with them (torch.load
    does not check: a flipped bit in the weights loads as another number); None if all match, or if
    the zip cannot be read at all (torch.load then says how)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


def peek_checkpoint(path: Path) -> dict | None:
    """A checkpoint file's dict, its tensors mapped from the file rather than read; None if it cannot
    be read."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return saved if isinstance(saved, dict) else None
    except Exception:
        return None


def stopped_short(saved: dict) -> bool:
    """Whether a checkpoint's dict (peek_checkpoint) is from before its run's max_iters."""
    step, max_iters = saved.get("step"), config_value(saved.get("config") or {}, "training.max_iters")
    return isinstance(step, int) and isinstance(max_iters, int) and step < max_iters


def saved_step(path: Path) -> float:
    """The step of a checkpoint file, read without loading its tensors; inf if it cannot be read."""
    return (peek_checkpoint(path) or {}).get("step", math.inf)


def model_from_checkpoint(ckpt: Checkpoint) -> BDH:
    model = BDH(BDHConfig(**ckpt.model_config))
    model.load_state_dict(ckpt.model)
    return model


# ---------------------------------------------------------------- exported models (export.py)

EXPORT_VERSION = 2  # 2: 4-bit codes are W_4bit (version 1 named them W_nf4, fp4 ones too)


def is_export(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model.safetensors").is_file() and (Path(path) / "config.json").is_file()


def load_export(folder) -> tuple[BDH, str, dict]:
    """(the model, its tokenizer as tokenizer.to_str() gives it, config.json) of a folder that
    export.py wrote; 4-bit weights are unpacked to float32."""
    from safetensors.torch import load_file
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        export = config["bdh_export"]
        if export["version"] > EXPORT_VERSION:
            raise CheckpointError(f"{folder}: exported by a newer version of this project (export version "
                                  f"{export['version']}, this one reads up to {EXPORT_VERSION}); update the code")
        tensors = load_file(folder / "model.safetensors")
        tokenizer = "bytes" if export["tokenizer"] == "bytes" else (folder / "tokenizer.json").read_text()
        settings = {k: config[k] for k in BDHConfig.__dataclass_fields__}
        if wrong := [k for k, v in settings.items() if k != "dropout" and not (type(v) is int and v >= 1)]:
            raise CheckpointError(f"{folder}: config.json's {wrong[0]} is {settings[wrong[0]]!r}, not a whole number "
                                  f"of at least 1 (edited by hand?); export the checkpoint again")
        model = BDH(BDHConfig(**settings))
        expected = model.state_dict()
        if wrong := [k for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]:
            raise CheckpointError(f"{folder}: config.json does not fit model.safetensors: {wrong[0]} is "
                                  f"{tuple(tensors[wrong[0]].shape)} there and {tuple(expected[wrong[0]].shape)} "
                                  f"by config.json (edited by hand?); export the checkpoint again")
        if config.get("weights_4bit"):
            blocksize = config["weights_4bit"]["blocksize"]
            for name in LAYER_WEIGHTS:
                shape = getattr(model, name).shape
                suffix = "4bit" if export["version"] >= 2 else "nf4"  # (EXPORT_VERSION)
                codes = tensors.pop(f"{name}_{suffix}")
                tensors[name] = unpack_4bit(codes, tensors.pop(f"{name}_absmax"),
                                            tensors["quant_map"], shape, blocksize)
            tensors.pop("quant_map")
        model.load_state_dict(tensors)
    except CheckpointError:
        raise
    except Exception as e:  # a missing file or key, not JSON, not safetensors, other shapes
        raise CheckpointError(f"{folder}: not a model exported by this project's export.py ({type(e).__name__}: "
                              f"{first_line(e)})")
    return model, tokenizer, config
