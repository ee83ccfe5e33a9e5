"""The scripts' command lines: --config and the section.key=value overrides every script takes
(add_config_arguments, load_config), parse_arguments, which tells a mistyped option or an override
written as an option how to write it, and the prompt of sample.py and neurons.py (add_prompt_arguments)."""
import argparse
import difflib
import os
import sys
import typing
from pathlib import Path

from config import Config, all_paths, config_sections, fsdp_problems
from config_file import ALIASES, EPOCHS, ConfigError, in_file_order, read_yaml, suggest
from distributed import first_process, several_processes
from files import bom_encoding, tell_torchrun


def add_config_arguments(parser, default: str = "config.yaml"):
    """--config and the section.key=value overrides, as every script takes them."""
    parser.add_argument("--config", default=default, action=OneConfigFile, help=f"YAML config (default {default})")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help=f"override any config field, e.g. training.batch_size=16 (the sections: "
                             f"{', '.join(config_sections())}; train.py --print-config lists every field and its "
                             f"value)")
    parser.setting_paths = all_paths()  # parse_arguments: --max_iters 10 is told to write training.max_iters=10
    parser.switch_paths = {f"{name}.{key}" for name, cls in config_sections().items()  # --debug: training.debug=true
                           for key, hint in typing.get_type_hints(cls).items() if hint is bool}


class OneConfigFile(argparse.Action):
    """--config given twice is refused: argparse would keep the last one without a word."""

    def __call__(self, parser, namespace, value, option_string=None):
        if getattr(namespace, "config_given", False):
            parser.error(f"--config is given twice ({namespace.config}, then {value}): give one file, and change "
                         f"single settings with section.key=value")
        namespace.config, namespace.config_given = value, True


def load_config(args) -> Config:
    """The config of parsed add_config_arguments; on problems, prints them one per line and exits
    with status 2, as argparse does for bad arguments (under torchrun, rank 0 alone prints them). An
    override given twice with two values is noted: the last applies, so scripts can add to a command."""
    rank_zero = first_process()
    given = {}
    for item in args.overrides:
        path, _, value = item.partition("=")
        if path in given and given[path] != value and rank_zero:
            print(f"note: {path} is given twice on the command line ({given[path]}, then {value}): the last applies",
                  file=sys.stderr)
        given[path] = value
    try:
        cfg = Config.from_yaml(args.config, args.overrides)
        if rank_zero and args.config and not read_yaml(args.config, config_sections()):  # an editor's unsaved new file
            print(f"note: {args.config} holds no settings: every setting not given on the command line has its "
                  f"default (config.yaml lists them: a model sized for a GPU; configs/tiny.yaml is for a CPU)",
                  file=sys.stderr)
        sharded = cfg.training.distributed == "fsdp" and several_processes()
        if sharded and (problems := fsdp_problems(cfg)):
            raise ConfigError(problems)
        return cfg
    except ConfigError as e:
        problems = in_file_order(e.problems, args.config)
        for problem in problems if rank_zero else ():
            print(f"config error: {problem}", file=sys.stderr)
        tell_torchrun(f"config error: {problems[0]}" + f" (and {len(problems) - 1} more)" * (len(problems) > 1))
        raise SystemExit(2)


def parse_arguments(parser, argv=None):
    """parser.parse_args(argv), naming the option a misspelled one means (--tempreature:
    --temperature), and telling an override written as an option (--training.seed=3, or nanoGPT's
    --max_iters 10 where the parser takes overrides: add_config_arguments) how to write it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    error = parser.error

    def told(message):  # under torchrun, its failure summary shows a usage error too
        tell_torchrun(f"{parser.prog}: error: {message}")
        error(message)
    parser.error = told
    # overrides on both sides of an option; after `--` every word is positional, which only the plain parser keeps
    args, unknown = (parser.parse_known_args if "--" in argv else parser.parse_known_intermixed_args)(argv)
    options = [option for action in parser._actions for option in action.option_strings]
    settings = getattr(parser, "setting_paths", ())
    given = {word.partition("=")[0] for word in argv}
    for item in unknown:
        name, equals, value = item.partition("=")
        following = argv[argv.index(item) + 1:argv.index(item) + 2]  # `--max_iters 10`: its value is the next word
        if not equals:
            value = following[0] if following and not following[0].startswith("-") and "=" not in following[0] \
                else "VALUE"
        if item.startswith("--") and "." in name:
            parser.error(f"unrecognized argument {item}: an override takes no dashes: {name.lstrip('-')}={value}")
        key, dashed = name[2:].replace("-", "_"), name.replace("_", "-")
        # a script's own option first (--out_dir: --out), then a setting of that name, then another trainer's
        own = [o for o in options if o.startswith("--") and len(o) > 3 and dashed.startswith(o)] or \
            difflib.get_close_matches(dashed, options, n=1, cutoff=0.8)
        setting = [p for p in settings if p.split(".")[1] == key] if item.startswith("--") else []
        if setting and f"--{key.replace('_', '-')}" not in options:
            if value == "VALUE" and setting[0] in getattr(parser, "switch_paths", ()):  # a bare flag: switched on
                value = "true"
            parser.error(f"unrecognized argument {item}: settings are given as section.key=value: {setting[0]}={value}")
        if item.startswith("-") and own:
            parser.error(f"unrecognized argument {item}: did you mean {own[0]}?")
        if item.startswith("--") and settings and key in EPOCHS:
            parser.error(f"unrecognized argument {item}: settings are given as section.key=value; "
                         f"{suggest(key, settings, ())[2:]}")
        if item.startswith("--") and settings and key in ALIASES:
            parser.error(f"unrecognized argument {item}: settings are given as section.key=value: "
                         f"{ALIASES[key]}={value}")
        if item.startswith("-") and (match := difflib.get_close_matches(dashed, options, n=1)):
            parser.error(f"unrecognized argument {item}: did you mean {match[0]}?")
        if len(name) == 2 and name[0] == "-" and len(starting := [o for o in options if o[2:3] == name[1]]) == 1:
            parser.error(f"unrecognized argument {item}: did you mean {starting[0]}?")  # -c: --config
        if unknown == [item] and "--checkpoint" in options and "--checkpoint" not in given and (
                option := checkpoint_option(Path(item))):
            without = " (without --checkpoint-dir)" * (option == "--checkpoint" and "--checkpoint-dir" in given)
            what = "a checkpoint" if option == "--checkpoint" else "a folder of runs"
            parser.error(f"unrecognized argument {item}: {what} is given as {option} {item}{without}")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def checkpoint_option(path: Path) -> str | None:
    """The option that takes a word of the command line, where it names a checkpoint file, a run
    directory or an export (--checkpoint) or a folder of runs (--checkpoint-dir); else None."""
    from locate import is_export, is_run_directory, resumable_runs  # (torch: only for such a word)
    try:
        if path.suffix == ".pt" or is_run_directory(path) or is_export(path):
            return "--checkpoint"
        return "--checkpoint-dir" if path.is_dir() and resumable_runs(path) else None
    except OSError:  # a folder that cannot be listed
        return None


def add_prompt_arguments(parser, required: bool, purpose: str = "the text to continue"):
    """--prompt TEXT, or --prompt-file F (a UTF-8 file; -: standard input) for a prompt too long for a
    command line; prompt_argument reads them. `purpose`: what the prompt is for, in --help."""
    prompt = parser.add_mutually_exclusive_group(required=required)
    prompt.add_argument("--prompt", help=purpose + ("" if required else " (none: from a document boundary)"))
    prompt.add_argument("--prompt-file", help="the prompt from a UTF-8 text file (-: standard input), for a prompt "
                                              "too long for the command line")


def prompt_argument(parser, args) -> str:
    """The prompt add_prompt_arguments' options give; a file that cannot be read is a usage error."""
    if args.prompt_file is None:
        return utf8_argument(args.prompt or "", "--prompt")
    try:
        raw = sys.stdin.buffer.read() if args.prompt_file == "-" else Path(args.prompt_file).read_bytes()
        # as it is, its last line end too; not a byte-order mark (Windows editors'), which may say UTF-16
        return raw.decode(bom_encoding(raw) or "utf-8-sig")
    except OSError as e:
        parser.error(f"--prompt-file {args.prompt_file}: cannot read it ({e.strerror or e})")
    except UnicodeDecodeError as e:
        parser.error(f"--prompt-file {args.prompt_file}: not UTF-8 text (an invalid byte at byte {e.start:,}); save "
                     f"it as UTF-8")


def utf8_argument(text: str, option: str) -> str:
    """A command-line text as valid UTF-8. Python reads argv bytes that are not UTF-8 as lone
    surrogates, which no tokenizer encodes: the bytes become U+FFFD, with a note on stderr."""
    raw = os.fsencode(text)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        print(f"note: {option} is not valid UTF-8 (byte {e.start:,}: {raw[e.start:e.start + 1]!r}): its invalid "
              f"bytes become U+FFFD", file=sys.stderr)
        return raw.decode("utf-8", errors="replace")
