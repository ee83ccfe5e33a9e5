"""A config file's YAML mistakes told in plain words on their line (yaml_errors.py), checked through
Config as users meet them."""
import re

import pytest

from config import Config, ConfigError
from conftest import config_problems, file_problems


def test_yaml_syntax_error_is_one_line_with_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_layer: 4\n training: [\n")
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    [p] = info.value.problems
    assert p.startswith(f"{path}:3:") and "YAML syntax error" in p and "\n" not in p
    path.write_text("training:\n  max_iters: 10\n  batch_size 32\n  learning_rate: 0.001\n")  # a ':' forgotten
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert info.value.problems == [f"{path}:3: YAML syntax error: 'batch_size 32' has no ':' after its key (key: "
                                   f"value)"]  # not line 4
    for text in ("training:\n  max_iters 10\n  batch_size: 32\n",  # read as a key spanning two lines: found on line 3
                 "training:\n  max_iters 10   # steps\n  batch_size: 32\n"):  # past a comment: found on line 3 too
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            Config.from_yaml(path)
        assert info.value.problems == [f"{path}:2: YAML syntax error: 'max_iters 10' has no ':' after its key (key: "
                                       f"value)"]
    for text in ("logging:\n  wandb_run_name: |\n    my run\n   wandb_project: x\n",  # a value of several lines: no
                 "logging:\n  wandb_run_name: \"my\n    run\"\n     wandb_project: x\n",  # key in it lacks a ':'
                 "logging:\n  wandb_notes: |\n    Changes:\n      lower lr\n   wandb_project: x\n",
                 "logging:\n  wandb_notes:\n    my long\n    note\n   wandb_project: x\n"):
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            Config.from_yaml(path)
        [problem] = info.value.problems
        assert "has no ':'" not in problem and re.match(rf"{re.escape(str(path))}:[45]:", problem)
    for text in ("training:\n  max_iters 10  # steps\n", "training:\n  max_iters 10\n  batch_size 8\n"):  # the only
        path.write_text(text)                                                             # keys: the section's text
        with pytest.raises(ConfigError) as info:
            Config.from_yaml(path)
        assert info.value.problems == [f"{path}:2: YAML syntax error: 'max_iters 10' has no ':' after its key (key: "
                                       f"value)"]
    path.write_text("description:\n  my tiny experiment\n")  # not a section: said so
    assert file_problems(path)[0].startswith(f"{path}:1: description: unknown section")
    path.write_text("training:\n\tmax_iters: 10\n")
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert info.value.problems[0].endswith("(write spaces: YAML does not allow a tab there)")
    path.write_text("training:\n  max_iters: 20\n   batch_size: 8\n")
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert info.value.problems == [f"{path}:3: YAML syntax error: 'batch_size: 8': indented 3 spaces, the other "
                                   f"keys of its section 2: indent it as they are"]
    path.write_text("training:\n  max_iters: 20\nbatch_size: 8\n  log_freq: 5\n")  # a key that left its section
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert info.value.problems == [f"{path}:3: YAML syntax error: 'batch_size: 8': a key at the start of its line, "
                                   f"among the indented keys of a section: indent it as they are"]
    path.write_text("logging:\n  wandb_run_name: exp 3: lower lr\n")  # not the line before: this value
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert info.value.problems == [f"{path}:2:24: YAML syntax error: mapping values are not allowed here (a value "
                                   f"holding ': ' needs quotes: key: \"a: b\")"]


def test_an_unquoted_glob_pattern_is_told_to_take_quotes(tmp_path):
    path = tmp_path / "glob.yaml"
    for pattern in ("**/train-*.parquet", "[ab]*.parquet", "{a,b}/*.parquet"):  # each YAML syntax unquoted
        path.write_text(f"dataset:\n  parquet_dir: {pattern}\n")
        with pytest.raises(ConfigError, match=r"glob.yaml:2:.*such as a glob pattern, needs quotes"):
            Config.from_yaml(path)
    path.write_text('dataset:\n  parquet_dir: "**/train-*.parquet"\n')
    assert Config.from_yaml(path).dataset.parquet_dir == "**/train-*.parquet"


def test_layout_mistakes_are_told_in_plain_words_on_their_line(tmp_path):
    path = tmp_path / "my.yaml"
    section = "training:\n  block_size: 64\n  batch_size: 8\n  max_iters: 10\n"
    for text, line, fix in (
            (section.replace("max_iters: ", "max_iters:"), 4, "'max_iters:10': put a space after the ':' (key: value)"),
            (section.replace("block_size: ", "block_size:"), 2, "'block_size:64': put a space after the ':'"),
            (section.replace("  batch_size", " batch_size"), 3, "'batch_size: 8': indented 1 space, the other keys of "
                                                                "its section 2: indent it as they are"),
            (section.replace("  batch_size", "   batch_size"), 3, "indented 3 spaces, the other keys of its section 2"),
            (section.replace("  batch_size", "batch_size"), 3, "'batch_size: 8': a key at the start of its line, among "
                                                               "the indented keys of a section: indent it as they are"),
            ("logging:\n  wandb_notes:\n    my long\n    note\n   wandb_project: x\n", 5,  # a value's lines: no keys
             "indented 3 spaces, the other keys of its section 2"),
            (section + "---\nmodel:\n  n_layer: 2\n", 5, "a second document starts here (---): one config file holds "
                                                         "one; delete the --- and merge the sections")):
        path.write_text(text)
        [problem] = file_problems(path)
        assert problem.startswith(f"{path}:{line}") and fix in problem, problem
    path.write_text("logging:\n  wandb_project: http://x\n")  # a ':' without a space in a value is fine
    assert Config.from_yaml(path).logging.wandb_project == "http://x"
    path.write_text("training:\n  max_iters: 10\n\tbatch_size: 4\n")  # a tab: PyYAML's words say so
    assert file_problems(path)[0].endswith("(write spaces: YAML does not allow a tab there)")
    path.write_text("training: 3\n  max_iters: 10\n")
    assert file_problems(path) == [f"{path}:1: YAML syntax error: 'training: 3': a section takes no value on its "
                                   f"line: its keys follow it, indented"]
    path.write_text("training:\n  max_iters:10\n")  # the only key: YAML reads the section as that text
    assert file_problems(path)[0].endswith("got str 'max_iters:10'; put a space after the ':' (key: value)")


def test_an_invisible_character_is_named_with_its_line_and_column(tmp_path):
    path = tmp_path / "pasted.yaml"
    for text, where, fix in (("training:\n  batch_size:\u00a08\n", "2:14", "U+00A0 (a no-break space, pasted from a "
                                                                           "web page?): replace it with a plain space"),
                             ("training:\n  batch_size: 8\u00a0\n", "2:16", "U+00A0"),  # trailing: not stripped away
                             ("\ufefftraining:\n  batch\u200b_size: 8\n", "2:8", "U+200B (a zero-width space, pasted "
                                                                                 "from a web page?): delete it")):
        path.write_text(text, encoding="utf-8")
        [problem] = file_problems(path)
        assert problem.startswith(f"{path}:{where}: {fix}"), problem
    path.write_text("\ufefftraining:  # batch\u00a0size\n  batch_size: 8\n"  # in a comment, in quotes, a byte
                    "logging:\n  wandb_run_name: 'caf\u00e9\u00a0run'\n", encoding="utf-8")  # order mark: fine
    c = Config.from_yaml(path)
    assert (c.training.batch_size, c.logging.wandb_run_name) == (8, "caf\u00e9\u00a0run")
    path.write_text("training:\n  max_iters: 10\u00a0# steps\n")  # no comment: the no-break space is the value's
    assert file_problems(path)[0].startswith(f"{path}:2:16: U+00A0 (a no-break space")
    path.write_text("logging:\n  wandb_run_name: run#\u00a02\n")  # a '#' inside a value starts no comment either
    assert file_problems(path)[0].startswith(f"{path}:2:23: U+00A0 (a no-break space")
    assert "U+00A0 (a no-break space, pasted from a web page?): replace it with a plain space" in config_problems(
        {}, ["training.max_iters\u00a0=5"])[0]  # in an override's name
    assert config_problems({}, ["training.batch_size=\u00a08"]) == [
        "training.batch_size: expected int, got str '\\xa08'; it holds U+00A0 (a no-break space, pasted from a web "
        "page?): replace it with a plain space"]
    assert config_problems({}, ["training.batch\u200b_size=8"])[0].endswith("U+200B (a zero-width space, pasted from "
                                                                           "a web page?): delete it (text in quotes "
                                                                           "may hold it)")


def test_quoting_mistakes_are_told_where_they_start(tmp_path):
    """A quote never closed is reported at the end of the file by PyYAML: it is told where it opens."""
    path = tmp_path / "bad.yaml"
    for text, expected in (
            ('model:\n  n_layer: 3\n  dropout: "0.1\ntraining:\n  max_iters: 10\n',
             ":3:12: YAML syntax error: the quote that starts here is never closed: close it at the end of the value"),
            ('dataset:\n  parquet_dir: "C:\\data\\x"\n',
             ":2:20: YAML syntax error: found unknown escape character 'd' (in double quotes a backslash starts an "
             "escape: write a Windows path in single quotes, or with /)"),
            ('dataset:\n  parquet_dir: "C:\\Users\\me"\n',  # \U: the start of an escape, cut short
             ":2:21: YAML syntax error: expected escape sequence of 8 hexadecimal numbers, but found 's' (in double "
             "quotes a backslash starts an escape: write a Windows path in single quotes, or with /)"),
            ('dataset:\n  parquet_dir: "D:\\temp\\new"\n',  # escapes that read: a tab and a line end in the path
             ":2: dataset.parquet_dir: 'D:\\temp\\new' holds the control character '\\t': in double quotes a "
             "backslash starts an escape (\\t a tab, \\n a line end); write a Windows path in single quotes, or "
             "with /"),
            ("dataset:\n  parquet_dir: 'it's'\n",
             ":2:20: YAML syntax error: expected <block end>, but found '<scalar>' (text after the closing quote: "
             "inside '...' a quote is written twice, 'it''s'; or put the value in the other quotes)")):
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            Config.from_yaml(path)
        assert info.value.problems == [f"{path}{expected}"]
