"""Reading a config as written: the YAML file (unique keys, one-line errors: yaml_errors.py says what
is wrong), `section.key=value` overrides, typed fields without silent coercion, and suggestions for
misspelled names of settings.
What the settings are and which values they take is config.py's; the scripts' command lines,
arguments.py's.
"""
import contextlib
import dataclasses
import difflib
import math
import re
import typing
from pathlib import Path

import yaml

from files import REPO, ZIP_MAGIC, bom_encoding, near_miss, relative_to_here
from yaml_errors import INVISIBLE, invisible, invisible_character, read_as_text, without_comment, yaml_syntax_problem

SEED = 1337  # the default of training.seed and of dataset.split_seed


# Names that other trainers use for these settings.
ALIASES = {"lr": "training.learning_rate", "bs": "training.batch_size", "batch": "training.batch_size",
           "micro_batch_size": "training.batch_size", "iters": "training.max_iters", "steps": "training.max_iters",
           "max_steps": "training.max_iters", "num_steps": "training.max_iters", "seq_len": "training.block_size",
           "context_length": "training.block_size", "warmup": "training.warmup_iters",
           "warmup_steps": "training.warmup_iters", "wd": "training.weight_decay", "clip": "training.grad_clip",
           "n_embed": "model.n_embd", "d_model": "model.n_embd", "layers": "model.n_layer", "heads": "model.n_head",
           "grad_accum": "training.gradient_accumulation_steps",
           "grad_accum_steps": "training.gradient_accumulation_steps",
           # nanoGPT's and Hugging Face Trainer's names
           **dict.fromkeys(("eval_interval", "val_interval", "eval_every", "eval_steps"), "training.test_freq"),
           **dict.fromkeys(("log_interval", "log_every", "logging_steps"), "training.log_freq"),
           **dict.fromkeys(("save_interval", "save_every", "save_steps", "checkpoint_interval"),
                           "training.checkpoint_freq"),
           **dict.fromkeys(("out_dir", "output_dir"), "training.checkpoint_dir"),
           **dict.fromkeys(("init_from", "resume", "resume_from"), "training.resume_from_checkpoint"),
           **dict.fromkeys(("dtype", "precision", "mixed_precision", "amp"), "low_precision.compute_dtype"),
           "lr_decay_iters": "training.max_iters", "min_learning_rate": "training.min_lr",
           "max_grad_norm": "training.grad_clip", "wandb_log": "logging.wandb",
           **dict.fromkeys(("n_layers", "num_layers"), "model.n_layer"),
           **dict.fromkeys(("n_heads", "num_heads"), "model.n_head")}
EPOCHS = ("epochs", "num_epochs", "max_epochs")
NOT_SETTINGS = {  # other trainers' settings that are fixed here
    **dict.fromkeys(("beta1", "beta2", "betas"), "AdamW's betas are fixed at 0.9 and 0.95 (adamw4bit.make_optimizer)"),
    "bias": "BDH's layers have no bias terms"}


class ConfigError(Exception):
    """One or more configuration problems; .problems holds one line per problem."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def read_yaml(path, sections, lines: dict | None = None, repeated: list | None = None) -> dict:
    """The mapping in the YAML file at `path` (an empty file: {}); ConfigError names the file, line
    and fix for a missing or unreadable file, a syntax error or a key given twice in one mapping.
    `lines`, if given, gets the line of each section and section.key. `repeated`, if given, gets the
    problems of keys given twice in a section instead (the mapping keeps the last), to be reported
    with the others."""
    path = Path(path)
    text = read_config_text(path)
    if problem := invisible_character(text):
        line, column, fix = problem
        raise ConfigError([f"{path}:{line}:{column}: {fix}"])
    loader = None
    try:
        loader = _UniqueKeyLoader(text)  # a control character stops it here already (a ReaderError)
        node = loader.get_single_node()
        raw = loader.construct_document(node) if node is not None else None
        for section, keys in node.value if isinstance(node, yaml.MappingNode) else ():
            if str(section.value) in sections and read_as_text(section, keys):
                first = without_comment(text.splitlines()[keys.start_mark.line])
                raise ConfigError([f"{path}:{keys.start_mark.line + 1}: YAML syntax error: {first!r} has no ':' "
                                   f"after its key (key: value)"])
            if lines is None:
                continue
            lines[str(section.value)] = section.start_mark.line + 1
            for key, _ in keys.value if isinstance(keys, yaml.MappingNode) else ():
                lines[f"{section.value}.{key.value}"] = key.start_mark.line + 1
    except yaml.reader.ReaderError as e:
        line = text[:e.position].count("\n") + 1
        raise ConfigError([f"{path}:{line}: YAML cannot hold character U+{e.character:04X} (a control character): "
                           f"delete it"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([yaml_syntax_problem(path, text, e, sections)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    duplicates = [f"{path}:{line}: {key!r} appears again (first at line {first}); YAML would keep only the "
                  f"last{', replacing the whole section' if section else ''}: keep one"
                  for key, first, line, section in sorted(loader.duplicates, key=lambda d: d[2])]
    # a repeated section drops the first one's keys: their problems (and lines) would mislead
    if duplicates and (repeated is None or any(section for *_, section in loader.duplicates)):
        raise ConfigError(duplicates)
    if duplicates:
        repeated += duplicates
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections ({', '.join(sections)}), "
                           f"got {type(raw).__name__}"])
    return raw


def read_config_text(path: Path) -> str:
    """The text of a config file (UTF-8, or UTF-16 with its byte-order mark: what Windows PowerShell's >
    writes); ConfigError says what to do if it is missing or not text."""
    try:
        raw = path.read_bytes()
        return raw.decode(bom_encoding(raw) or "utf-8")
    except FileNotFoundError:
        with_suffix = [f"{path}{suffix}" for suffix in (".yaml", ".yml") if Path(f"{path}{suffix}").is_file()]
        close = with_suffix[0] if with_suffix else near_miss(path, keep=Path.is_file)
        fix = f"did you mean --config {close}?" if close else "pass an existing file with --config"
        raise ConfigError([f"{path}: config file not found{relative_to_here(path)}; {fix}"])
    except UnicodeDecodeError as e:
        if path.read_bytes()[:4] == ZIP_MAGIC:  # what torch.save writes
            raise ConfigError([f"{path}: a checkpoint, not a YAML config file; resume it with "
                               f"training.resume_from_checkpoint={path} (its run's config.yaml is the config)"])
        encoding = e.encoding.upper().removesuffix("-LE").removesuffix("-BE")  # (UTF-16: as its byte-order mark says)
        raise ConfigError([f"{path}: not {encoding} text ({e.reason} at byte {e.start}); save the config as UTF-8"])
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config file: {e}"])


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading 1e-3 and 1e5 as numbers (YAML 1.1 reads them as text) and noting
    every key that appears twice in one mapping (PyYAML keeps the last silently): (key, first line,
    line, whether it is a section)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates = []

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: the keys it brings may be given again
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a name, not a "
                                                        f"{type(key).__name__}", key_node.start_mark)
            line = key_node.start_mark.line + 1
            if key in first_line:
                self.duplicates.append((key, first_line[key], line, isinstance(value_node, yaml.MappingNode)))
            first_line.setdefault(key, line)
        return super().construct_mapping(node, deep)


    def construct_yaml_int(self, node):
        """Whole numbers with leading zeros read as decimal, as YAML 1.2 reads them: 0042 is 42 (YAML 1.1:
        octal, 34); 1:30 is text, as in 1.2 (1.1: 90, in base 60)."""
        text = str(node.value).replace("_", "")
        if ":" in text:
            return node.value
        if re.fullmatch(r"[-+]?0\d+", text):
            return int(text, 10)
        return super().construct_yaml_int(node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting text that the loader would read as a number (the name '1e5')."""


for _yaml_class in (_UniqueKeyLoader, _Dumper):
    _yaml_class.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                      list("-+0123456789."))
    _yaml_class.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?0\d+$"), list("-+0"))  # 08, 09


def dump_yaml(data: dict) -> str:
    """`data` as YAML that read_yaml reads back the same."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def with_comments(text: str) -> str:
    """dump_yaml's text of a config with each section's and setting's comment from the repository's
    config.yaml (train.py --print-config), where its value ends on its line; the text as it is where
    the comments would not read back the same."""
    comments, section, name = {}, None, None  # {"section" or "section.key": its comment}
    with contextlib.suppress(OSError):
        for line in (REPO / "config.yaml").read_text().splitlines():
            if match := re.fullmatch(r"(\w+):\s*(#.*)?", line):
                section, name = match[1], match[1]
                comments[name] = match[2]
            elif (match := re.fullmatch(r"  (\w+): .*?(#.*)", line)) and section:
                name = f"{section}.{match[1]}"
                comments[name] = match[2]
            elif (match := re.fullmatch(r"\s+#\s*(.*)", line)) and comments.get(name):  # a comment's next line
                comments[name] += " " + match[1]
    lines, section = [], None
    given = text.splitlines()
    for k, line in enumerate(given):
        if match := re.fullmatch(r"(\w+):", line):
            section, name = match[1], match[1]
        else:
            name = f"{section}.{match[1]}" if (match := re.fullmatch(r"  (\w+): .*", line)) else None
        # a value's next line (more indented, or blank inside quotes): no comment on the line before
        ends_here = k + 1 == len(given) or given[k + 1].strip() and not given[k + 1].startswith("   ")
        lines.append(f"{line:<35} {comments[name]}" if comments.get(name) and ends_here else line)
    commented = "\n".join(lines) + "\n"
    try:
        return commented if yaml.safe_load(commented) == yaml.safe_load(text) else text
    except yaml.YAMLError:
        return text


def read_scalar(text: str):
    """`text` as the config file would read it (1e-3 a number); the text itself if YAML cannot read it."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict, item: str, paths: list[str], nullable=()) -> list[str]:
    """Apply one `section.key=value` override (value parsed as a YAML scalar) to raw; its problems.
    `paths`: every section.key, for a key given without its section; `nullable`: those that take null."""
    if problem := invisible_character(item.split("=", 1)[0]):  # (a value's text may hold one)
        return [f"{item!r}: {problem[2]}"]
    name, colon, written = item.partition(":")
    if colon and "=" not in name and name in paths:
        return [f"{item}: an override is written with '=', not ':': {name}={written.lstrip('=').strip()}"]
    if "=" not in item or "." not in item.split("=", 1)[0]:
        if item.endswith((".yaml", ".yml")):
            return [f"{item}: an override must look like section.key=value; to train with this file: --config {item}"]
        key, _, value = item.partition("=")
        if "=" in item and (meant := [path for path in paths if path.split(".")[1] == key] or
                            ([ALIASES[key]] if key in ALIASES else [])):
            return [f"{item}: an override must look like section.key=value; did you mean {meant[0]}={value}?"]
        if "=" in item and key in EPOCHS:
            return [f"{item}: an override must look like section.key=value{suggest(key, paths, ())}"]
        return [f"{item}: an override must look like section.key=value "
                f"(for example training.batch_size=16)"]
    path, text = item.split("=", 1)
    if path.strip(" \t") in paths and (path != path.strip(" \t") or text[:1] in (" ", "\t")):
        return [f"{item!r}: no spaces around '=' in an override: {path.strip()}={text.strip()}"]
    section, key = path.split(".", 1)
    if not section.strip() or not key:  # `.max_iters=3`, `training.=3`
        meant = [p for p in paths if p.split(".")[1] == key] if key and text.strip() else []
        return [f"{item}: an override must look like section.key=value"
                + (f"; did you mean {meant[0]}={text}?" if meant else " (for example training.batch_size=16)")]
    if not text.strip():  # `training.resume_from_checkpoint=$CKPT` with CKPT unset would start a new run
        fix = f"write {path}=null for none" if path in nullable else "give it one, or leave it out for the default"
        return [f"{item}: no value (an unset shell variable?); {fix}"]
    quoted = re.fullmatch(r"""\s*("([^"\\]|\\.)*"|'([^']|'')*')\s*""", text)  # one quoted text, nothing after it
    cut = re.search(r"(^|\s)#", text) and not quoted  # where YAML would cut a comment
    value = text if cut else read_scalar(text)  # (on the command line, # is no comment)
    if raw.get(section) is None:  # absent, or every key commented out
        raw[section] = {}
    if isinstance(raw[section], dict):  # (otherwise the section's own check says what is wrong)
        raw[section][key] = value
    return []


def typed_section(name: str, section_cls, values: dict, all_paths: list[str]):
    """(the fields of dataclass `section_cls` given in `values`, converted; problems, one line each)."""
    known = {f.name: f for f in dataclasses.fields(section_cls)}
    hints = typing.get_type_hints(section_cls)
    result, problems = {}, []
    for key, value in values.items():
        path = f"{name}.{key}"
        if key not in known:
            if key in {p.split(".")[0] for p in all_paths}:  # `  dataloader:`, indented under the section above
                problems.append(f"{path}: {key} is a section of its own, not a key of {name}: write `{key}:` at the "
                                f"start of its line")
            else:
                problems.append(f"{path}: unknown key" + suggest(path, all_paths, known))
            continue
        ok, converted, expected = check_type(value, hints[key])
        if ok and isinstance(converted, str) and not converted.strip():  # would read as none, or as the current folder
            fix = ("write null for none" if hints[key] == typing.Optional[str] else
                   f"give one, or leave it out for the default, {known[key].default}")
            problems.append(f"{path}: empty text {value!r}; {fix}")
        elif ok and hints[key] == typing.Optional[str] and converted in ("None", "none", "NONE"):
            problems.append(f"{path}: {converted} is text in YAML, not none: write null for none")
        elif ok:
            result[key] = converted
        else:
            quote = ""
            if path == "training.resume_from_checkpoint" and isinstance(value, bool):
                quote = ("; to resume the newest run, write latest (or auto: latest where there is a run, else a new "
                         "run)" if value else "; for a new run, write null")
            elif expected.startswith("str") and isinstance(value, (int, float, bool)):
                quote = (f"; YAML reads an unquoted yes, no, on, off, true, false or number as one: put the text in "
                         f"quotes (`{key}: \"...\"` in the file, '{path}=\"...\"' on the command line)")
            elif expected in ("int", "float") and isinstance(value, str) and check_type(_number(value), hints[key])[0]:
                quote = (f"; a number in quotes is text: write it without them (`{key}: {value.strip()}` in the file, "
                         f"{path}={value.strip()} on the command line)")
            elif isinstance(value, str) and (hidden := next((c for c in value if c in INVISIBLE), None)):
                quote = f"; it holds {invisible(hidden)}"
            elif expected in ("int", "float") and isinstance(value, str) and _number(value) is None:
                quote = "; write a plain number (3000, 0.05 or 3e-4: no commas, units or %)"
            elif isinstance(value, str) and value.strip().lower() in ("true", "false") and "true" in expected:
                quote = (f"; {value.strip().lower()} in quotes is text: write it without them (`{key}: "
                         f"{value.strip().lower()}` in the file, {path}={value.strip().lower()} on the command line)")
            elif expected.startswith("str") and value is None:
                quote = f"; YAML reads an empty value or a bare ~ as none: give a value, in quotes if it is ~ (`{key}: \"~\"`)"
            got = f"{type(value).__name__} {value!r}" if value is not None else "no value"
            problems.append(f"{path}: expected {expected}, got {got}{quote}")
    return result, problems


def in_file_order(problems: list[str], config_path) -> list[str]:
    """The problems found in the config file ("FILE:LINE: ...") by line, then the others as they came."""
    def line(problem):
        found = config_path and re.match(rf"{re.escape(str(config_path))}:(\d+): ", problem)
        return int(found[1]) if found else math.inf
    return sorted(problems, key=line)


def suggest(name: str, candidates: list[str], known) -> str:
    """What to write instead of the unknown `name`: the same key in another section, the setting
    another trainer's name means, or the closest candidate; else the `known` names."""
    key = name.split(".")[-1]
    if key in EPOCHS:
        return ("; training has no epochs setting: it runs training.max_iters optimizer steps of batch_size x "
                "block_size x gradient_accumulation_steps tokens each; set training.max_iters")
    if key in NOT_SETTINGS:
        return f"; there is no such setting: {NOT_SETTINGS[key]}"
    moved = [c for c in candidates if c.split(".")[-1] == key and c != name]
    match = moved or ([ALIASES[key]] if key in ALIASES else []) or difflib.get_close_matches(name, candidates, n=1,
                                                                                              cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else f"; known: {', '.join(known)}"


def as_yaml(value) -> str:
    """A setting's value in a message, as YAML writes it: true, false, null; text quoted."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def _number(text: str):
    """`text` as the config file reads a number (no comment in it), or None."""
    value = read_scalar(text) if not re.search(r"(^|\s)#", text) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def check_type(value, hint):
    """(ok, value, expected type name). Strict: no bool->number or str->number coercion; an int may be
    written as a whole float (1e5, 3000.0)."""
    if hint is bool:
        return isinstance(value, bool), value, "bool (true or false)"
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value), "int"
        return isinstance(value, int) and not isinstance(value, bool), value, "int"
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value), "float"
        return False, value, "float"
    if hint is str:
        return isinstance(value, str), value, "str"
    if hint == typing.Optional[str]:
        return value is None or isinstance(value, str), value, "str or null"
    if hint == typing.Union[bool, str]:
        return isinstance(value, (bool, str)), value, "true, false or auto"
    raise TypeError(f"unsupported config type {hint}")


AS_RUN = "# on this machine: "  # runtime.config_as_run's comment: what a run's `auto` settings were


def settings_as_run(config_text: str) -> dict[str, str]:
    """{path: value} of the settings that config_as_run's comment resolved (device, compute dtype,
    compile) in the text of a run's config file; {} without that comment (a run of an older version)."""
    for line in config_text.splitlines()[:3]:
        if line.startswith(AS_RUN):
            return dict(item.split(" ", 1) for item in line[len(AS_RUN):].split(", ") if " " in item)
    return {}


def with_settings_as_run(config: dict, config_text: str) -> dict:
    """A config dict (changed in place) with the `auto` settings that config_as_run's comment in
    `config_text` resolved as they resolved (compute_dtype bfloat16); those the dict has."""
    for path, value in settings_as_run(config_text).items():
        section, key = path.split(".")
        if isinstance(config.get(section), dict) and key in config[section]:
            config[section][key] = read_scalar(value)
    return config


def config_value(config: dict, path: str):
    """A setting of a config dict (a checkpoint's, say), by its dotted path; None if absent."""
    section, key = path.split(".")
    return (config.get(section) or {}).get(key)


def with_split_settings(config: dict) -> dict:
    """A config as written (a dict, changed in place) before dataset.split_seed (0.4.6) or
    dataset.split_by (0.5.0), given the split it had: training.seed drew the validation documents,
    by their place in the shards (with val_parquet_dir: the defaults, which split nothing)."""
    dataset, training = config.get("dataset"), config.get("training")
    if isinstance(dataset, dict) and "split_seed" not in dataset:
        seed = training.get("seed", SEED) if isinstance(training, dict) else SEED
        dataset["split_seed"] = SEED if dataset.get("val_parquet_dir") else seed
    if isinstance(dataset, dict) and "split_by" not in dataset:
        dataset["split_by"] = "text" if dataset.get("val_parquet_dir") else "position"
    return config
