"""Typed configuration: the settings as dataclasses and the checks of their values (config_file.py
reads the YAML and the overrides; arguments.py, the scripts' command lines).

Every problem in a config file is reported at once, one line each, as
`<section.key>: <what is wrong>`; the scripts print them and exit with status 2. The model
section is model.BDHConfig itself.
"""
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field

from config_file import SEED, ConfigError, apply_override, as_yaml, dump_yaml, read_yaml, suggest, typed_section
from distributed import several_processes
from model import BDHConfig


@dataclass
class TrainingConfig:
    block_size: int = 512
    batch_size: int = 8
    max_iters: int = 3000
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    log_freq: int = 100
    test_freq: int = 500
    checkpoint_freq: int = 500
    checkpoint_dir: str = "checkpoints"
    resume_from_checkpoint: typing.Optional[str] = None
    debug: bool = False
    keep_last_n: int = 3
    warmup_iters: int = 100
    min_lr: float = 1e-4
    grad_clip: float = 1.0
    gradient_accumulation_steps: int = 1
    eval_iters: int = 20
    seed: int = SEED
    device: str = "auto"
    compile: typing.Union[bool, str] = "auto"
    activation_checkpointing: bool = False
    distributed: str = "ddp"
    distributed_timeout_s: int = 600


@dataclass
class DataloaderConfig:
    num_workers: int = 2
    pin_memory: bool = True
    prefetch_factor: int = 2


@dataclass
class DatasetConfig:
    parquet_dir: str = "data/stdlib"
    max_cached_files: int = 8
    text_column: str = "text"
    val_fraction: float = 0.05
    split_seed: int = SEED  # which documents val_fraction holds out; training.seed leaves them as they are
    split_by: str = "text"  # what the split hashes: the document's text, or its place (position: runs before 0.5)
    val_parquet_dir: typing.Optional[str] = None
    tokenizer: str = "bytes"


@dataclass
class LowPrecisionConfig:
    use_fp8: bool = False
    use_4bit: bool = False
    use_4bit_optimizer: bool = False
    quantization_type: str = "nf4"
    use_double_quant: bool = True
    compute_dtype: str = "auto"
    qat_start_fraction: float = 0.9


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "bdh"
    wandb_entity: typing.Optional[str] = None
    wandb_run_name: typing.Optional[str] = None


@dataclass
class FP8Config:
    format: str = "hybrid"
    amax_history_len: int = 16
    amax_compute_algo: str = "max"
    backend: str = "auto"
    torchao_recipe: str = "tensorwise"


CHOICES = {
    "training.device": ("auto", "cpu", "cuda", "mps"),
    "training.distributed": ("ddp", "fsdp"),
    "dataset.split_by": ("text", "position"),
    "low_precision.quantization_type": ("nf4", "fp4"),
    "low_precision.compute_dtype": ("bfloat16", "float16", "float32", "auto"),
    "fp8.format": ("hybrid", "e4m3"),
    "fp8.amax_compute_algo": ("max", "most_recent"),
    "fp8.backend": ("auto", "torchao", "transformer_engine"),
    "fp8.torchao_recipe": ("tensorwise", "rowwise", "rowwise_with_gw_hp"),
}
VALUE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                 "te": "transformer_engine", "transformerengine": "transformer_engine", "gpu": "cuda"}
POSITIVE = (
    "model.n_layer", "model.n_embd", "model.n_head", "model.mlp_internal_dim_multiplier",
    "model.vocab_size", "training.block_size", "training.batch_size", "training.max_iters",
    "training.learning_rate", "training.log_freq", "training.test_freq",
    "training.checkpoint_freq", "training.gradient_accumulation_steps", "training.eval_iters",
    "dataloader.prefetch_factor", "dataset.max_cached_files", "fp8.amax_history_len",
    "training.distributed_timeout_s",
)
NON_NEGATIVE = ("training.keep_last_n", "training.weight_decay", "training.warmup_iters", "training.min_lr",
                "training.grad_clip", "training.seed", "dataset.split_seed", "dataloader.num_workers")
PATHS = ("training.checkpoint_dir", "training.resume_from_checkpoint", "dataset.parquet_dir", "dataset.val_parquet_dir",
         "dataset.tokenizer")  # ~ is expanded: the shell leaves it as it is in section.key=~/...
BUILTIN_CORPUS_DIR = DatasetConfig.parquet_dir


@dataclass
class Config:
    model: BDHConfig = field(default_factory=BDHConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dataloader: DataloaderConfig = field(default_factory=DataloaderConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    low_precision: LowPrecisionConfig = field(default_factory=LowPrecisionConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_bdh_config(self) -> BDHConfig:
        """The model's settings, as BDH takes them (the model section is a BDHConfig: a copy of it)."""
        return dataclasses.replace(self.model)

    @classmethod
    def from_yaml(cls, path, overrides=()) -> "Config":
        """Load `path`, apply `section.key=value` overrides, validate; raises ConfigError."""
        lines, repeated = {}, []  # (a key given twice: reported with the other problems)
        try:
            raw = read_yaml(path, config_sections(), lines, repeated)
        except ConfigError as e:  # and a file given as an override (--config forgotten) says so
            files = [item for item in overrides if "=" not in item and item.endswith((".yaml", ".yml"))]
            raise ConfigError(e.problems + [p for item in files for p in apply_override({}, item, [])]) from None
        try:
            config = cls.from_dict(raw, overrides)
        except ConfigError as e:  # a problem with a setting of the file (not overridden): where it is
            overridden = {item.partition("=")[0] for item in overrides}
            located = []
            for problem in e.problems:
                name = problem.split(":", 1)[0]
                of_override = any(problem.startswith((f"{item}:", f"{item!r}:", f"{item} ")) for item in overrides)
                located.append(f"{path}:{lines[name]}: {problem}" if name in lines and name not in overridden
                               and not of_override else problem)
            raise ConfigError(located + repeated) from None
        if repeated:
            raise ConfigError(repeated)
        return config

    @classmethod
    def from_dict(cls, raw: dict, overrides=()) -> "Config":
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
        problems = apply_overrides(raw, list(overrides)) + section_problems(raw)
        sections = {}
        for name, section_cls in config_sections().items():
            given = raw.get(name) if isinstance(raw.get(name), dict) else {}  # anything else: reported above
            values, found = typed_section(name, section_cls, given, all_paths())
            problems += found
            sections[name] = section_cls(**values)
        config = cls(**sections)
        problems += expand_paths(config)
        reported = {p.split(":", 1)[0] for p in problems}
        problems += [p for p in config._check_values() if p.split(":", 1)[0] not in reported]
        if problems:
            raise ConfigError(problems)
        return config

    def _check_values(self):
        problems = [f"{path}: must be a finite number, got {self.get(path)}" for path in all_paths()
                    if isinstance(self.get(path), float) and not math.isfinite(self.get(path))]
        if problems:  # the checks below would misread them
            return problems
        bounded = ("training.seed", "dataset.split_seed", "training.distributed_timeout_s")  # (bounds of their own)
        problems += [f"{path}: must be at most 2**53 = {2**53:,} (an exponent too many?), got {float(self.get(path)):g}"
                     for path in all_paths() if path not in bounded and type(self.get(path)) is int
                     and self.get(path) > 2**53]
        for path in POSITIVE:
            if self.get(path) <= 0:
                problems.append(f"{path}: must be > 0, got {self.get(path)}")
        for path in NON_NEGATIVE:
            if self.get(path) < 0:
                problems.append(f"{path}: must be >= 0, got {self.get(path)}")
        for path, allowed in CHOICES.items():
            if self.get(path) not in allowed:
                value = str(self.get(path))
                gpu = re.fullmatch(r"cuda:(\d+)", value) if path == "training.device" else None
                meant = VALUE_ALIASES.get(value.lower(), value.lower())
                problems.append(f"{path}: must be one of {', '.join(allowed)}; got {self.get(path)!r}"
                                + (f" (for GPU {gpu[1]}: training.device=cuda and CUDA_VISIBLE_DEVICES={gpu[1]} "
                                   f"before the command)" if gpu else f"; did you mean {meant}?" if meant in allowed
                                   else ""))
        if self.training.distributed_timeout_s > 10**9:
            problems.append(f"training.distributed_timeout_s: must be at most 1000000000 (31 years: as good as no "
                            f"limit), got {self.training.distributed_timeout_s}")
        for path in ("training.seed", "dataset.split_seed"):
            if self.get(path) >= 2**32:
                problems.append(f"{path}: must be below 2**32 = {2**32} (NumPy's seeds), got {self.get(path)}")
        if not 0 <= self.low_precision.qat_start_fraction < 1:
            problems.append(f"low_precision.qat_start_fraction: must be in [0, 1) (0: quantization-aware "
                            f"training from the first step), got {self.low_precision.qat_start_fraction}")
        if not 0 < self.dataset.val_fraction < 1:
            problems.append(f"dataset.val_fraction: must be in (0, 1), got {self.dataset.val_fraction}")
        problems += self._check_model() + self._check_training()
        if self.low_precision.use_fp8 and self.model.n_head > 0:
            problems += self._check_fp8()
        return problems

    def _check_model(self):
        problems, model = [], self.model
        if not 0 <= model.dropout < 1:
            problems.append(f"model.dropout: must be in [0, 1), got {model.dropout}")
        latent_total = model.n_embd * model.mlp_internal_dim_multiplier
        if model.n_head > 0 and latent_total % model.n_head:
            divisors = {d for small in range(1, math.isqrt(latent_total) + 1) if latent_total % small == 0
                        for d in (small, latent_total // small)}  # (up to the root: a mistyped n_embd stays quick)
            fitting = [h for h in sorted(divisors) if latent_total // h % 2 == 0]
            nearest = sorted(sorted(fitting, key=lambda h: abs(h - model.n_head))[:4])
            problems.append(f"model.n_head: n_embd * mlp_internal_dim_multiplier = {latent_total} must be "
                            f"divisible by n_head = {model.n_head}"
                            + (f"; the nearest that fit: {', '.join(map(str, nearest))}" if nearest else ""))
        elif model.n_head > 0 and model.n_latent % 2:
            problems.append("model.mlp_internal_dim_multiplier: the latent size n_embd * "
                            "mlp_internal_dim_multiplier / n_head must be even (RoPE rotates pairs)")
        if 0 < model.vocab_size < 256 and self.dataset.tokenizer == "bytes":  # (not positive: said above)
            problems.append(f"model.vocab_size: tokens are bytes 0..255, so it must be >= 256, "
                            f"got {model.vocab_size}")
        return problems

    def _check_training(self):
        problems, training = [], self.training
        if training.learning_rate > 1:  # AdamW moves each weight by about the learning rate a step
            mantissa, exponent = f"{training.learning_rate:e}".split("e")
            problems.append(f"training.learning_rate: {training.learning_rate:g} would move every weight by about "
                            f"that much each step (AdamW): AdamW trains at about 1e-4 to 1e-2"
                            + (f"; did you mean {float(mantissa):g}e-{int(exponent)}?" if int(exponent) >= 2 else ""))
        elif (decay := training.weight_decay * training.learning_rate) >= 1:
            problems.append(f"training.weight_decay: {training.weight_decay:g} x learning_rate "
                            f"{training.learning_rate:g} = {decay:g}: each step would multiply the weights by 1 - "
                            f"{decay:g}, zeroing or flipping them; AdamW's weight_decay is about 0.01 to 0.1")
        if training.block_size == 1:
            problems.append("training.block_size: must be at least 2: a position attends only to the positions "
                            "before it, so a window of 1 gives the model no context")
        if training.min_lr > training.learning_rate > 0:  # (a learning rate <= 0 is reported as such)
            problems.append(f"training.min_lr: must be <= training.learning_rate ({training.learning_rate}), got "
                            f"{training.min_lr}; set it too, e.g. training.min_lr={training.learning_rate / 10:g}")
        if isinstance(training.compile, str) and training.compile != "auto":
            word = training.compile.strip().lower()
            problems.append(f"training.compile: must be true, false or auto; got {training.compile!r}"
                            + (f" ({word} in quotes is text: write it without them)" if word in ("true", "false")
                               else ""))
        return problems

    def _check_fp8(self):
        problems = []
        training, fp8 = self.training, self.fp8
        for name, size in (("model.n_embd", self.model.n_embd), ("the latent size N", self.model.n_latent),
                           ("training.batch_size * training.block_size", training.batch_size * training.block_size)):
            if size % 16:
                problems.append(f"low_precision.use_fp8: {name} = {size} must be a multiple of 16 "
                                f"(a dimension of the FP8 GEMMs, which torch._scaled_mm requires)")
        if self.low_precision.use_4bit:
            problems.append("low_precision.use_fp8: cannot be combined with use_4bit (both replace "
                            "the weight matmuls: FP8 would round the 4-bit values again); pick one")
        defaults = FP8Config()
        for key in ("amax_history_len", "amax_compute_algo"):
            if getattr(fp8, key) != getattr(defaults, key):
                problems.append(f"fp8.{key}: configures TransformerEngine's delayed scaling, which "
                                f"this version does not implement; torchao scales each tensor by "
                                f"its current amax. Remove the setting")
        if fp8.torchao_recipe != "tensorwise" and fp8.format == "hybrid":
            problems.append(f"fp8.format: torchao's {fp8.torchao_recipe} recipe uses E4M3 for "
                            f"gradients too; set fp8.format=e4m3 (or fp8.torchao_recipe=tensorwise)")
        return problems

    def unused_settings(self) -> list[str]:
        """A line for each setting given a value other than its default where nothing reads it
        (it applies only with another setting on): the value would change nothing."""
        defaults = Config()
        return [f"{path} {as_yaml(self.get(path))} is not used in training: {why}"
                for path, why in self.unused_paths().items() if self.get(path) != defaults.get(path)]

    def unused_paths(self) -> dict[str, str]:
        """{path: why} of the settings that nothing reads in this config, whatever their values."""
        low_precision, logging = self.low_precision, self.logging
        unused_when = {
            **{f"dataset.{key}": (self.dataset.val_parquet_dir,
                                  "the validation documents are all of dataset.val_parquet_dir's")
               for key in ("val_fraction", "split_seed", "split_by")},
            "low_precision.qat_start_fraction": (not low_precision.use_4bit, "low_precision.use_4bit is off"),
            **{f"low_precision.{key}": (not low_precision.use_4bit, "low_precision.use_4bit is off (export.py "
                                        "--4bit and sample.py --4bit read it from the checkpoint after training)")
               for key in ("quantization_type", "use_double_quant")},
            **{f"fp8.{f.name}": (not low_precision.use_fp8, "low_precision.use_fp8 is off")
               for f in dataclasses.fields(FP8Config)},
            **{f"logging.{key}": (not logging.wandb, "logging.wandb is off")
               for key in ("wandb_project", "wandb_entity", "wandb_run_name")},
            "dataloader.prefetch_factor": (self.dataloader.num_workers == 0,
                                           "dataloader.num_workers is 0: the main process reads the batches"),
            "training.compile": (self.training.debug and self.training.compile is True,
                                 "training.debug runs the model uncompiled"),
            **{f"training.{key}": (not several_processes(), why) for key, why in (
                ("distributed", "one process trains unsharded (torchrun --nproc_per_node=N, N of 2 or more, shards)"),
                ("distributed_timeout_s", "one process, no other ranks to wait for"))},
        }
        return {path: why for path, (unused, why) in unused_when.items() if unused}

    def get(self, path: str):
        """The value of a setting by its path, "section.key"."""
        section, key = path.split(".")
        return getattr(getattr(self, section), key)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


def learning_rate(step: int, training) -> float:
    """The learning rate of a step: linear warmup over warmup_iters, then cosine decay to min_lr
    at max_iters (training: a TrainingConfig, or anything with its fields)."""
    if step <= training.warmup_iters:
        return training.learning_rate * step / max(1, training.warmup_iters)
    progress = (step - training.warmup_iters) / max(1, training.max_iters - training.warmup_iters)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return training.min_lr + cosine * (training.learning_rate - training.min_lr)


def step_tokens(training, world_size: int) -> int:
    """The tokens of one optimizer step, over all processes."""
    return training.batch_size * training.block_size * training.gradient_accumulation_steps * world_size


def fsdp_problems(cfg) -> list[str]:
    """What FSDP cannot run in this version, one line each."""
    low_precision, problems = cfg.low_precision, []
    for flag, why in (("use_4bit", "it would quantize each rank's shard, not whole blocks of the tensor"),
                      ("use_4bit_optimizer", "it would quantize each rank's shard, not whole blocks of the tensor"),
                      ("use_fp8", "not implemented for sharded weights in this version")):
        if getattr(low_precision, flag):
            problems.append(f"low_precision.{flag} with training.distributed=fsdp: {why}; use "
                            f"training.distributed=ddp")
    if low_precision.compute_dtype == "float16":
        problems.append("low_precision.compute_dtype float16 with training.distributed=fsdp: the "
                        "GradScaler would skip steps on some ranks only, from their own gradient "
                        "shards; use low_precision.compute_dtype=auto (bfloat16 where the hardware computes "
                        "it fast, float32 elsewhere)")
    return problems


def config_sections():
    """{name: dataclass} of the config's sections."""
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}


def all_paths():
    return [f"{name}.{f.name}" for name, cls in config_sections().items() for f in dataclasses.fields(cls)]


def _nullable_paths():
    return {f"{name}.{key}" for name, cls in config_sections().items()
            for key, hint in typing.get_type_hints(cls).items() if type(None) in typing.get_args(hint)}


def apply_overrides(raw: dict, overrides: list[str]) -> list[str]:
    """Applies the command line's `section.key=value` overrides to a config's dict, in order; returns
    the problems, an override split by the shell (`training.seed 3`, `training.seed = 3`) among them."""
    problems = []
    while overrides:
        item = overrides.pop(0)
        following = overrides[0] if overrides else "="
        if item in all_paths() and not ("=" in following or following in all_paths()
                                         or following.endswith((".yaml", ".yml"))):  # `training.seed 3`
            problems.append(f"{item} {overrides[0]}: an override is one argument; did you mean "
                            f"{item}={overrides.pop(0)}?")
            continue
        value_word = "=" not in following and not following.endswith((".yaml", ".yml"))
        if item.rstrip("=") in all_paths() and overrides and (
                following.startswith("=") if not item.endswith("=") else value_word):
            words = [item, overrides.pop(0)]  # `training.seed = 3`, `training.seed =3`, `training.seed= 3`
            if words[-1] == "=" and overrides and "=" not in overrides[0]:
                words.append(overrides.pop(0))
            problems.append(f"{' '.join(words)}: no spaces around '=' in an override: "
                            f"{item.rstrip('=')}={''.join(words[1:]).lstrip('=')}")
            continue
        problems += apply_override(raw, item, all_paths(), _nullable_paths())
    return problems


def section_problems(raw: dict) -> list[str]:
    """What is wrong at a config's top level: a dotted key, an unknown section, a section that is not a mapping."""
    problems = []
    for name, value in raw.items():
        if name in all_paths():  # `training.seed: 3` at the top of a file
            section, key = name.split(".")
            problems.append(f"{name}: a dotted key belongs on the command line; in a YAML file write "
                            f"`{key}:` indented under `{section}:`")
        elif name not in config_sections():
            problems.append(f"{name}: unknown section"
                            + suggest(str(name), list(config_sections()) + all_paths(), config_sections()))
        elif value is not None and not isinstance(value, dict):
            space = "; put a space after the ':' (key: value)" * bool(re.match(r"[\w.-]+:\S", str(value)))
            problems.append(f"{name}: must be a mapping of keys, got {type(value).__name__} {value!r}{space}")
    return problems


def expand_paths(config) -> list[str]:
    """Expands `~` and `$NAME` in the path settings, in place; returns the problems (an unset
    variable, a control character that double quotes made of a Windows path's backslash)."""
    problems = []
    for path in PATHS:
        if not isinstance(written := config.get(path), str):
            continue
        if control := re.search(r"[\x00-\x1f]", written):  # "D:\temp\new" in double quotes: a tab, a line end
            problems.append(f"{path}: {written!r} holds the control character {control[0]!r}: in double "
                            f"quotes a backslash starts an escape (\\t a tab, \\n a line end); write a "
                            f"Windows path in single quotes, or with /")
            continue
        section, key = path.split(".")
        setattr(getattr(config, section), key, os.path.expanduser(os.path.expandvars(written)))
        for variable in re.findall(r"\$(\w+|\{[^}]*\})", written):  # what expandvars looks up
            name = variable.strip("{}")
            if not name.isidentifier() and variable.startswith("{"):  # the shell's ${X:-default}
                problems.append(f"{path}: {written!r}: only $NAME and ${{NAME}} are expanded, not "
                                f"${variable}; write the path out")
            elif name.isidentifier() and name not in os.environ:  # ($5: no variable's, a folder's name)
                problems.append(f"{path}: {written!r}: the environment variable {name} is not set; set it, "
                                f"or write the path out")
    return problems
