"""Hugging Face split names in the shards' paths: which split (train, validation, test) a file's
folders or name say it is of, as the Hub reads them, and the message for a training folder whose
files mix a held-out split with others (training would read the held-out documents too).
layout.py refuses such folders with it.
"""
import glob
import re
import shlex
from pathlib import Path


SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
               "evaluation": "test"}  # the Hugging Face Hub's split keywords in file and folder names


def held_out_only(root: Path, files: list[Path]) -> str | None:
    """The held-out split (validation, test) that every file's path below root says the files are
    of, or root's own name where it is a split's (a Hugging Face folder per split), or None."""
    splits = {split_of(root, path)[0] for path in files}
    if splits == {None}:
        splits = {SPLIT_WORDS.get(root.name.lower())}
    return splits.pop() if len(splits) == 1 and splits <= {"validation", "test"} else None


def split_of(root: Path, path: Path) -> tuple:
    """(the Hugging Face split a file's path names: train, validation, test or None; the folder or the
    pattern that selects that split's files beside it). As the Hub reads names: the first word of
    the folders' or the file's name that is a split keyword, words being runs of letters."""
    relative = path.relative_to(root)
    for depth, part in enumerate(relative.parts):
        for word in re.finditer(r"[a-z]+", part.lower()):
            if word.group() in SPLIT_WORDS:
                folder, split = root.joinpath(*relative.parts[:depth]), SPLIT_WORDS[word.group()]
                if depth < len(relative.parts) - 1:  # a folder of the split
                    return split, folder / part
                return split, Path(glob.escape(str(folder))) / f"{glob.escape(part[:word.end()])}*.parquet"
    return None, None


def mixed_splits(root: Path, files: list[Path], pattern: str | None, setting: str) -> str | None:
    """The error for a training folder (or pattern) that holds a held-out split's files beside others'
    (a Hugging Face dataset's train-*, validation-*, test-* files), or None. `setting`:
    dataset.parquet_dir, or prepare.py's --from-parquet, which would write them into one folder."""
    counts, selectors = {}, {}
    for path in files:
        split, selector = split_of(root, path)
        counts[split] = counts.get(split, 0) + 1
        if selector not in selectors.setdefault(split, []):
            selectors[split].append(selector)
    if len(counts) == 1 or not {"validation", "test"} & counts.keys():
        return None
    found = ", ".join(f"{split or 'no split'}: {n:,}" for split, n in sorted(counts.items(), key=lambda kv: str(kv[0])))

    def override(name, value):  # as the command line wants it: a pattern in quotes, or the shell expands it
        if setting == "--from-parquet":
            return (f"--from-parquet {shlex.quote(str(value))}" if name == "parquet_dir" else
                    f"write {shlex.quote(str(value))} into another --out, for dataset.val_parquet_dir")
        return shlex.quote(f"dataset.{name}={value}")
    if "train" in counts:
        train = selectors["train"]
        fix = f"{'give' if setting == '--from-parquet' else 'set'} {override('parquet_dir', train[0])}"
        if "validation" in counts:
            fix += f" and {override('val_parquet_dir', selectors['validation'][0])}"
        if len(train) > 1:
            fix += f" (the train split of one of {len(train)} folders"
            fix += (f"; of all of them: {override('parquet_dir', Path(glob.escape(str(root))) / '**' / train[0].name)})"
                    if len({t.name for t in train}) == 1 else ")")
    else:
        held_out = [str(selector) for split in ("validation", "test") for selector in selectors.get(split, [])]
        beside = {path for path in files if path.parent == root}  # the files root/*.parquet matches
        pattern_fix = (f": {override('parquet_dir', Path(glob.escape(str(root))) / '*.parquet')}"
                       if not pattern and beside and all(split_of(root, path)[0] is None for path in beside) else "")
        fix = (f"{', '.join(held_out[:3])}{' ...' if len(held_out) > 3 else ''} look like held-out splits (by their "
               f"names): move them out of the folder, or give {setting} a pattern of the training files only"
               f"{pattern_fix}")
    everything = override("parquet_dir", every_file(pattern) if pattern else
                          Path(glob.escape(str(root))) / "**" / "*.parquet")
    given = f"{pattern}: the files it matches have paths" if pattern else f"{root}: its files have paths"
    would, anyway = (("the shards written would hold them all", "to write every file") if setting == "--from-parquet"
                     else ("training would read them all", "to train on every file"))
    return (f"{given} named for several Hugging Face splits ({found} files), and {would}, held-out ones too; "
            f"{fix}; {anyway} anyway: {everything}")


def every_file(pattern: str) -> str:
    """The pattern with `**` before its last part: every file it matched, and those in folders below."""
    head, _, last = pattern.rstrip("/").rpartition("/")
    return f"{head}/**/{last}" if head else f"**/{last}"
