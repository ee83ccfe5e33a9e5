"""A YAML config file's mistakes in plain words, on their line: what PyYAML reports in its own words
(a key without its ':', `key:value` without a space, a key indented otherwise than its section's,
a section given a value, a second document, a tab, a value that needs quotes) and what it does not
report at all (a no-break or zero-width space pasted from a web page). config_file.read_yaml asks.
"""
import re
from pathlib import Path

import yaml


INVISIBLE = {"\u00a0": "a no-break space", "\u2007": "a figure space", "\u202f": "a narrow no-break space",
             "\u3000": "an ideographic space", "\u200b": "a zero-width space", "\u200c": "a zero-width non-joiner",
             "\u200d": "a zero-width joiner", "\u2060": "a word joiner", "\ufeff": "a zero-width no-break space"}


def invisible_character(text: str) -> tuple[int, int, str] | None:
    """(line, column, what to do) for the first character outside comments and quotes that looks like a
    space or like nothing (pasted from a web page or a PDF), which YAML reads as part of a name or value."""
    for number, line in enumerate(text.splitlines(), 1):
        if number == 1 and line.startswith("\ufeff"):  # a byte order mark: fine
            line = " " + line[1:]
        unquoted = re.sub(r'"[^"]*"|\'[^\']*\'', lambda quoted: " " * len(quoted[0]), line)
        content = re.split(r"(?:^|[ \t])#", unquoted)[0]  # (a no-break space before # is no comment's)
        if found := next((c for c in content if c in INVISIBLE), None):
            return number, content.index(found) + 1, f"{invisible(found)} (text in quotes may hold it)"
    return None


def invisible(character: str) -> str:
    """What one of INVISIBLE is, and what to do with it."""
    fix = "replace it with a plain space" if character.isspace() else "delete it"
    return f"U+{ord(character):04X} ({INVISIBLE[character]}, pasted from a web page?): {fix}"


def without_comment(line: str) -> str:
    """A YAML line's text, its comment (a '#' at its start or after a space) cut, stripped."""
    return re.split(r"(?:^|\s)#", line)[0].strip()


def read_as_text(section: yaml.Node, value: yaml.Node) -> bool:
    """Whether a section's value is `key value` lines indented under it, all without their ':', which
    YAML reads as one text."""
    return (isinstance(value, yaml.ScalarNode) and value.start_mark.line > section.start_mark.line
            and value.style is None and value.tag.endswith(":str") and " " in value.value and ":" not in value.value)


def yaml_syntax_problem(path: Path, text: str, e: yaml.YAMLError, sections=()) -> str:
    """One line for a YAML syntax error: where the mistake most likely is, and a hint for the usual ones."""
    lines = text.splitlines()
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
    content = [without_comment(line) for line in lines]
    syntax = isinstance(e, (yaml.scanner.ScannerError, yaml.parser.ParserError))  # (not what a constructor refused)
    # `key value`: PyYAML finds the mistake a line later, or past a comment, in its own words
    if syntax and mark and (k := key_without_colon(lines, content, mark.line)) is not None:
        return f"{path}:{k + 1}: YAML syntax error: {content[k]!r} has no ':' after its key (key: value)"
    if syntax and mark and (found := layout_mistake(lines, content, mark.line, sections)):
        k, fix = found
        return f"{path}:{k + 1}: YAML syntax error: {content[k]!r}: {fix}"
    if problem == "but found another document":
        problem = ("a second document starts here (---): one config file holds one; delete the --- and merge the "
                   "sections")
    if getattr(e, "context", None) == "while scanning a simple key":  # found a line later
        mark = e.context_mark
    elif getattr(e, "context", None) == "while scanning a quoted scalar" and "end of stream" in problem:
        mark, problem = e.context_mark, "the quote that starts here is never closed: close it at the end of the value"
    elif problem.startswith(("found unknown escape character", "expected escape sequence")):  # (\Users: \U)
        problem += " (in double quotes a backslash starts an escape: write a Windows path in single quotes, or with /)"
    elif problem.endswith("but found '<scalar>'") and mark and mark.line < len(lines) and \
            re.match(r"\s*[\w.-]+:\s+[\"']", lines[mark.line]):
        problem += (" (text after the closing quote: inside '...' a quote is written twice, 'it''s'; or put the "
                    "value in the other quotes)")
    elif problem == "mapping values are not allowed here" and mark and mark.line < len(lines):
        if ":" in lines[mark.line][:mark.column].split("#")[0]:
            problem += " (a value holding ': ' needs quotes: key: \"a: b\")"
    line = lines[mark.line] if mark and mark.line < len(lines) else ""
    if "'\\t'" in problem:
        problem += " (write spaces: YAML does not allow a tab there)"
    if re.search(r":\s+[*&!\[{]", line):  # YAML syntax, unless quoted
        problem += ' (a value that starts with *, &, !, [ or {, such as a glob pattern, needs quotes: "*.parquet")'
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    return f"{where}: YAML syntax error: {problem}"


def key_without_colon(lines: list[str], content: list[str], mark_line: int) -> int | None:
    """The line where PyYAML stopped, or the last line with text before it, if it stands where a key
    belongs and has no ':' (comments cut): `key value`. A key belongs at the top level, first under a
    key that ends in ':', and beside a key; not in a value of several lines (a block scalar, a
    quoted or flow value), nor under a list item."""
    def indent(k):
        return len(lines[k]) - len(lines[k].lstrip())

    def is_key_place(k):
        if indent(k) == 0:
            return True
        above = [j for j in range(k - 1, -1, -1) if content[j] and indent(j) <= indent(k)]
        if not above or content[above[0]].startswith(("-", "?")):
            return False
        q = above[0]
        if indent(q) == indent(k):  # beside a key
            return ":" in content[q] and is_key_place(q)
        previous = next(j for j in range(k - 1, -1, -1) if content[j])
        return previous == q and content[q].endswith(":") and is_key_place(q)  # first under `key:`
    last = next((k for k in range(min(mark_line, len(lines)) - 1, -1, -1) if content[k]), None)
    for k in (last, mark_line):
        if k is not None and k < len(lines) and content[k] and ":" not in content[k] and \
                not content[k].startswith(("-", "?")) and is_key_place(k):
            return k
    return None


def layout_mistake(lines: list[str], content: list[str], mark_line: int, sections) -> tuple[int, str] | None:
    """(line, fix) for the mistake, on the line where PyYAML stopped or the one with text before it, that
    PyYAML reports in its own words: `key:value` without a space, a key indented otherwise than the
    other keys of its section, one at the start of its line among them, or a section given a value.
    (Indented with a tab: PyYAML's words say so.)"""
    def indent(k):
        return len(lines[k]) - len(lines[k].lstrip())
    previous = next((k for k in range(min(mark_line, len(lines)) - 1, -1, -1) if content[k]), None)
    candidates = [k for k in (mark_line, previous) if k is not None and k < len(lines) and content[k]]
    if any("\t" in lines[k][:indent(k)] for k in candidates):
        return None
    for k in candidates:
        if re.match(r"[A-Za-z_][\w.-]*:[^\s:/]", content[k]):
            return k, "put a space after the ':' (key: value)"
    for k in candidates:
        header = next((j for j in range(k, -1, -1) if content[j] and indent(j) == 0), None)
        if header is None or header == k:
            continue
        end = next((j for j in range(k + 1, len(lines)) if content[j] and indent(j) == 0), len(lines))
        indents = [indent(j) for j in range(header + 1, end) if re.match(r"[\w.-]+:(\s|$)", content[j])]  # keys
        usual = max(indents, key=lambda i: (indents.count(i), -indents.index(i))) if indents else indent(k)
        if indent(k) != usual:  # (a tie: the first key's)
            return k, (f"indented {indent(k)} space{'s' * (indent(k) != 1)}, the other keys of its section "
                       f"{usual}: indent it as they are")
    if previous is not None and mark_line < len(lines) and indent(previous) == 0 and ":" in content[previous] \
            and not content[previous].endswith(":") and indent(mark_line) > 0:
        if content[previous].split(":")[0].strip() in sections:
            return previous, "a section takes no value on its line: its keys follow it, indented"
        return previous, "a key at the start of its line, among the indented keys of a section: indent it as they are"
    return None
