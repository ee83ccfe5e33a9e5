"""Where the data is: the parquet files of a folder (recursively, sorted; names that start with '.'
or '_' are not data), of a glob pattern, or one .parquet file. A training folder or pattern whose
files are named for a held-out Hugging Face split beside others is refused (training would read
the held-out documents too), and so are links to missing files; files that are parquet under
another name, or text, are told how to become shards.

Which split a path names: splits.py. Checking and reading the files: shards.py.
"""
import difflib
import errno
import fnmatch
import os
import re
import shlex
from pathlib import Path

from files import ARROW_MAGICS, PARQUET_MAGIC, UTF_BOMS, near_miss, relative_to_here
from splits import held_out_only, mixed_splits


PATTERN_CHARACTERS = "*?["  # dataset.parquet_dir with one of these (and no such folder) is a glob pattern


class DataError(Exception):
    """A problem with the user's data or shards, with a one-line message naming the file."""


def folders_beside(path: Path) -> list[str]:
    """The names of the folders in path's folder (none where it cannot be listed)."""
    try:
        return [entry.name for entry in os.scandir(path.parent) if entry.is_dir()]
    except OSError:
        return []


def shard_files(location, setting: str) -> tuple[Path, list[Path]]:
    """(the folder that the files' keys are relative to, the parquet files) of a folder, a glob
    pattern, or one .parquet file (its folder is the root)."""
    root = Path(location)
    what = f"given to {setting}, it" if setting.startswith("--") else setting  # ("data: dataset.parquet_dir is ...")
    misnamed = []
    if root.is_dir():
        files, skipped, misnamed = parquet_files(root)
        check_links(files)
        files = each_real_file_once(files)
        check_splits(root, files, setting)
    elif root.is_file() and root.name.endswith(".parquet"):
        root, files, skipped = root.parent, [root], []
    elif root.is_symlink() and not root.exists():
        raise DataError(f"{root}: {what} is {broken_link(root)}; restore its target (re-download it) or set "
                        f"{setting} to where the data is")
    elif any(c in str(location) for c in PATTERN_CHARACTERS):
        root, files, skipped, misnamed = pattern_files(str(location), setting)
    elif root.exists() and parquet_by_its_bytes(root):
        raise DataError(f"{root}: a parquet file whose name does not end in .parquet (only such names are read as "
                        f"shards); rename it: `mv {shlex.quote(str(root))} "
                        f"{shlex.quote(str(root.with_suffix('.parquet')))}`")
    elif root.exists():
        out = shlex.quote(str(root.with_suffix("")) + "_parquet")
        raise DataError(f"{root}: {what} is a file, not a folder of .parquet shards; give their folder, a .parquet "
                        f"file or a glob pattern; to train on this file's text: `python prepare.py --from-text "
                        f"{shlex.quote(str(root))} --out {out}` and {set_to(setting, out, small=True)}")
    elif root.suffix and root.suffix != ".parquet":  # a text file's name, perhaps: not a folder to write into
        out = shlex.quote(f"{root.with_suffix('')}_parquet")
        raise DataError(f"{root}: {what} does not exist{relative_to_here(root)}; it takes a folder of .parquet "
                        f"shards: write them with `python prepare.py --from-text TEXT_FILE ... --out {out}` and "
                        f"{set_to(setting, out, small=True)}")
    else:
        close = near_miss(root, Path.is_file) if root.suffix == ".parquet" else None  # a shard's name mistyped
        if close is None and (folders := difflib.get_close_matches(root.name, folders_beside(root), 1, 0.75)):
            close = root.with_name(folders[0])
        raise DataError(f"{root}: {what} does not exist{relative_to_here(root)}; "
                        + (f"did you mean {close}? or " if close else "")
                        + f"create it with `python prepare.py --from-text FILE --out {shlex.quote(str(root))}`")
    if skipped:
        example = min(skipped, key=lambda path: (not path.name.endswith(".parquet"), path))  # a shard's name first
        print(f"{location}: skipped {len(skipped)} file(s) or folder(s) whose names start with '.' or '_', e.g. "
              f"{example.name} (not data, as for pyarrow datasets, Spark and Hugging Face)")
    hidden = [path for path in skipped if path.name.endswith(".parquet") and path.is_file()
              or path.is_dir() and next(path.rglob("*.parquet"), None)] if not files else []
    if hidden:
        raise DataError(f"{root}: its only .parquet files are in names that start with '.' or '_' ({hidden[0].name}"
                        f"{', ...' * (len(hidden) > 1)}), which are not data, as for pyarrow datasets, Spark and Hugging "
                        f"Face: rename them")
    if misnamed:
        others = f" and {len(misnamed) - 1} more" if len(misnamed) > 1 else ""
        raise DataError(f"{misnamed[0]}{others}: named like a parquet shard but not ending in .parquet, so {setting} "
                        f"would leave {'them' if others else 'it'} out of the data; rename such files to end in "
                        f".parquet (only those are read), or move them out of {root}")
    if not files:
        raise DataError(f"{root}: no .parquet files found (searched recursively); {how_to_convert(root, setting)}")
    if setting == "dataset.parquet_dir" and (held_out := held_out_only(root, files)):
        print(f"note: {location}: dataset.parquet_dir's files are named for the {held_out} split, and training reads "
              f"them; if that is not meant, point it at the training split")
    return root, files


def each_real_file_once(files: list[Path]) -> list[Path]:
    """The files without the second and later names of one real file (links to it, as a Hugging Face
    cache's snapshots of two revisions make to one blob): read twice, its held-out documents would
    be trained on under the other name, whose path seeds another split."""
    seen = set()
    return [path for path in files if not (os.path.realpath(path) in seen or seen.add(os.path.realpath(path)))]


def check_links(files: list[Path]):
    """Refuse symbolic links to missing files among the shards (an interrupted download leaves a
    Hugging Face cache's snapshot with links into blobs/ that were never written)."""
    broken = [path for path in files if path.is_symlink() and not path.exists()]
    if broken:
        more = f" (and {len(broken) - 1} more such link(s))" if len(broken) > 1 else ""
        raise DataError(f"{broken[0]}: {broken_link(broken[0])}{more}; re-download the dataset, or remove the "
                        f"link(s) to train without those files")


def broken_link(path) -> str:
    """What a symbolic link that leads to no file is: "a symbolic link to X, which does not exist", or a loop."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link that leads back to itself (links in a loop)"
    return f"a symbolic link to {os.path.realpath(path)}, which does not exist"


def arrow_advice(path: Path) -> str:
    """How to train on an Arrow file of Hugging Face datasets (save_to_disk, or its cache)."""
    saved = (path.parent / "state.json").is_file()  # a save_to_disk folder: its .arrow files are one dataset
    dataset = (f"datasets.load_from_disk({str(path.parent)!r})" if saved
               else f"datasets.Dataset.from_file({str(path)!r})")
    out = f"{str(path.parent).rstrip('/')}_parquet"
    return (f"an Arrow file (Hugging Face datasets' save_to_disk or cache), neither text nor parquet: write it as "
            f"parquet, `python -c \"import datasets, os; os.makedirs({out!r}, exist_ok=True); "
            f"{dataset}.to_parquet('{out}/{'data' if saved else path.stem}.parquet')\"`"
            f"{'' if saved else ' (so each .arrow file)'}, and set dataset.parquet_dir={out}")


def starts_with(path: Path, magics: tuple) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return head.startswith(magics)


LFS_POINTER = b"version https://git-lfs"  # the first line of what git clones in place of a file kept in Git LFS


def unreadable_shard_advice(path: Path, setting: str, alone: bool) -> str:
    """What to do with a .parquet file pyarrow cannot read: fetch it (a Git LFS pointer, which a clone
    without git-lfs holds), convert it (text; `alone`: the only file), or re-create it."""
    with open(path, "rb") as f:  # (an OSError: the caller's)
        head = f.read(len(LFS_POINTER))
    if head == LFS_POINTER:
        return "it is a Git LFS pointer, not the data: fetch the files (`git lfs pull` in the dataset's clone)"
    if not head or head.startswith(PARQUET_MAGIC) or binary(path):
        return "remove or re-create it"
    if alone:
        out = shlex.quote(f"{path.with_suffix('')}_parquet")
        return (f"it holds text: convert it with `python prepare.py --from-text {shlex.quote(str(path))} --out {out}` "
                f"and {set_to(setting, out, small=True)}")
    out = shlex.quote(f"{path.with_suffix('')}_text")  # a subfolder of the shards' folder: read with them
    return (f"it holds text: convert it into shards beside the others with `python prepare.py --from-text "
            f"{shlex.quote(str(path))} --out {out}`, then delete it (or move it out of the data)")


def binary(path: Path) -> bool:
    """Whether a file is not text, by a NUL byte in its first 8 KB (prepare.py refuses such files;
    UTF-16 and UTF-32 with a byte-order mark, which it reads, are text)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return True
    return b"\0" in head and not head.startswith(tuple(UTF_BOMS))


def parquet_by_its_bytes(path: Path) -> bool:
    """Whatever its name (.pq, .parq): a parquet file starts with PAR1."""
    return starts_with(path, (PARQUET_MAGIC,))


def data_folder(location: str) -> Path:
    """The folder a folder, a .parquet file or a pattern reads from (a pattern's: before its first
    wildcard), as an absolute path whose links are kept."""
    stem = next((location[:i] for i, c in enumerate(location) if c in PATTERN_CHARACTERS), None)
    if stem is not None:
        folder = Path(stem) if stem.endswith("/") or not stem else Path(stem).parent
    else:
        folder = Path(location) if Path(location).is_dir() else Path(location).parent
    return Path(os.path.abspath(folder))


def set_to(setting: str, value, small=False) -> str:
    """'set dataset.parquet_dir=VALUE' (or val_parquet_dir); for prepare.py's --from-parquet, what to
    do with VALUE: train on it (`small`: prepare.py --from-text wrote it, in small row groups
    already), or give it to --from-parquet."""
    if setting == "--from-parquet":
        return (f"train with dataset.parquet_dir={value} (its row groups are small already)" if small
                else f"give --from-parquet {value}")
    return f"set {setting}={value}"


def how_to_convert(folder: Path, setting: str) -> str:
    """The prepare.py command for a folder without parquet shards: into it if it is empty, else
    (it holds the text, and prepare.py writes only into a folder of shards) into one beside it,
    which `setting` then names."""
    if not any(folder.iterdir()):
        return f"convert text with `python prepare.py --from-text FILE ... --out {shlex.quote(str(folder))}`"
    text = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix and not p.name.startswith((".", "_")))
    if (folder / "dataset_dict.json").is_file():  # Hugging Face datasets' save_to_disk of several splits
        out = f"{str(folder).rstrip('/')}_parquet"
        return (f"it is a Hugging Face datasets folder (save_to_disk), not parquet: write its splits as parquet, "
                f"`python -c \"import datasets, os; os.makedirs({out!r}, exist_ok=True); d = datasets.load_from_disk("
                f"{str(folder)!r}); [d[s].to_parquet(f'{out}/{{s}}.parquet') for s in d]\"`, and "
                + (f"set dataset.val_parquet_dir={out}/validation.parquet" if setting == "dataset.val_parquet_dir" else
                   f"{set_to(setting, f'{out}/train.parquet')}" + " (and dataset.val_parquet_dir to its validation "
                   "split's file)" * (setting == "dataset.parquet_dir")))
    if arrow := next((p for p in text if starts_with(p, ARROW_MAGICS)), None):
        return f"{arrow.name} is {arrow_advice(arrow)}"
    if text and parquet_by_its_bytes(text[0]):
        return (f"{text[0].name} is a parquet file whose name does not end in .parquet: rename such files to end in "
                f".parquet (only those are read as shards)")
    if text and text[0].suffix.lower() in (".jsonl", ".json", ".csv", ".tsv"):  # records: their syntax is not text
        return (f"{text[0].name} holds records, not plain text: write them as parquet (pyarrow.json.read_json or "
                f"pyarrow.csv.read_csv, then pyarrow.parquet.write_table) and set dataset.text_column to the "
                f"column with the text")
    plain = [p for p in text if not binary(p)]  # (not its pictures)
    suffixes = sorted({p.suffix for p in plain})
    if len(plain) < len(text):
        inputs = " ".join(f"{shlex.quote(str(folder))}/*{suffix}" for suffix in suffixes) or "FILE ..."
    else:  # one kind: that one; several: all of them
        inputs = f"{shlex.quote(str(folder))}/*{suffixes[0] if len(suffixes) == 1 else ''}" if text else "FILE ..."
    out = shlex.quote(f"{str(folder).rstrip('/')}_parquet")
    return (f"convert its text with `python prepare.py --from-text {inputs} --out {out}` and "
            f"{set_to(setting, out, small=True)}")


def pattern_files(pattern: str, setting: str) -> tuple[Path, list[Path], list[Path], list[Path]]:
    """(the root: the folder before the first wildcard; the .parquet files below it that the glob
    pattern matches, with the files of the folders it matches (a pattern that ends in / matches
    folders only), sorted, each real file once; the names skipped; the misnamed shards it takes in,
    as parquet_files finds them). `**` matches any number of folders. Folders the pattern matches are
    checked for split names as a folder given directly is, and so are the files of a pattern without
    `**` together."""
    parts = Path(pattern).parts
    literal = [unescaped(part) for part in parts] + [None]
    first_wildcard = literal.index(None)
    root, segments = Path(*literal[:first_wildcard]), parts[first_wildcard:]
    files, skipped, misnamed = [], [], []
    if root.is_dir():
        files, skipped, misnamed = parquet_files(root, look_in=lambda f: may_hold(segments, f))
    matched = {path: matched_prefix(segments, path.relative_to(root).parts) for path in files + misnamed}
    in_folder = {path: in_matched_folder(segments, path.relative_to(root).parts) for path in files + misnamed}

    def matches(path):  # in a folder it matches, or matched itself (a pattern that ends in / matches folders only)
        return in_folder[path] or (matched[path] is not None and not pattern.endswith(("/", os.sep)))
    taken, misnamed = each_real_file_once(list(filter(matches, files))), list(filter(matches, misnamed))
    check_links(taken)
    skipped = [path for path in skipped if (may_hold(segments, path.relative_to(root).parts) if path.is_dir() else
                                            matched_prefix(segments, path.relative_to(root).parts) is not None)]
    if not taken and not misnamed:  # (misnamed shards: shard_files says so)
        there = [p.relative_to(root).as_posix() for p in parquet_files(root)[0]] if root.is_dir() else []
        wanted = "/".join(segments)  # the names most like the pattern first: a typo's intended file is among them
        like = sorted(there, key=lambda name: -difflib.SequenceMatcher(None, wanted, name).ratio())
        holds = (f"{root} holds {len(there):,} .parquet file(s), such as {', '.join(like[:3])}" if there
                 else f"{root} holds no .parquet file" if root.is_dir() else f"{root} does not exist")
        hidden = f" ({len(skipped)} name(s) starting with '.' or '_' skipped)" if skipped else ""
        raise DataError(f"{pattern}: {setting} matches no .parquet file{hidden}{relative_to_here(root)}; {holds}")
    for folder in sorted({matched[path] for path in taken if in_folder[path]}):
        check_splits(root.joinpath(*folder), [p for p in taken if p.relative_to(root).parts[:len(folder)] == folder],
                     setting)
    if "**" not in segments:  # `**`: every file it matches, held-out splits' too (what the error offers last)
        check_splits(root, taken, setting, pattern=pattern)
    return root, taken, skipped, misnamed


def unescaped(part: str):
    """A path part as a literal name (glob.escape's [*], [?] and [[] read back), or None if it holds a
    wildcard."""
    if any(c in re.sub(r"\[[*?[]\]", "", part) for c in PATTERN_CHARACTERS):
        return None
    return re.sub(r"\[([*?[])\]", r"\1", part)


def in_matched_folder(segments: tuple, parts: tuple) -> bool:
    """Whether a file's path below the pattern's root is in a folder that the glob segments match."""
    matched = matched_prefix(segments, parts)
    return matched is not None and len(matched) < len(parts)


def matched_prefix(segments: tuple, parts: tuple, depth: int = 0):
    """The shortest leading folders of `parts` (or all of it) that the glob segments match, or None."""
    if not segments:
        return parts[:depth]
    if segments[0] == "**":  # no folder first, else one more
        if (shorter := matched_prefix(segments[1:], parts, depth)) is not None:
            return shorter
        return matched_prefix(segments, parts, depth + 1) if depth < len(parts) else None
    if depth < len(parts) and fnmatch.fnmatchcase(parts[depth], segments[0]):
        return matched_prefix(segments[1:], parts, depth + 1)
    return None


def may_hold(segments: tuple, folder: tuple) -> bool:
    """Whether something inside `folder` (its parts) can match the glob segments."""
    if not segments or not folder or segments[0] == "**":
        return True
    return fnmatch.fnmatchcase(folder[0], segments[0]) and may_hold(segments[1:], folder[1:])


def check_splits(root: Path, files: list[Path], setting: str, pattern: str | None = None):
    """Refuse a training folder (the files of a pattern below `root`) that mixes a held-out split's
    files with others."""
    if setting in ("dataset.parquet_dir", "--from-parquet") and (mixed := mixed_splits(root, files, pattern, setting)):
        raise DataError(mixed)


def parquet_files(root: Path, look_in=None) -> tuple[list[Path], list[Path], list[Path]]:
    """(every *.parquet file under root, sorted; the names skipped; the misnamed shards: parquet files
    named .pq, .parq or .PARQUET, which would be left out, so that the caller can refuse them).
    Symbolic links to folders are followed, each real folder once, except a link to a folder that
    holds root (a loop, whose other folders are not this data); links to missing files are listed
    (check_links refuses them); names starting with '.' or '_' are not data (a macOS ._ copy,
    Spark's _SUCCESS and _temporary/) and are skipped. look_in(the folder's parts below root), for a
    pattern: whether to look into a folder at all; then a link is followed unless it leads back up
    its own path (a folder skipped as seen might be the one the pattern wants)."""
    found, skipped, misnamed, seen = [], [], [], set()
    roots = (os.path.realpath(root), os.path.abspath(root))  # (root may be a link: the folders above either)
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        below = Path(folder).relative_to(root).parts
        # a folder: a link back up the tree, or a second way to the same folder; a pattern: back up its own path
        visited = seen if look_in is None else {os.path.realpath(p) for p in Path(folder).parents[:len(below)]}
        above_root = any(path.startswith(real.rstrip(os.sep) + os.sep) for path in roots)  # other data: not this
        if real in visited or above_root:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if look_in is None or look_in(below + (name,)))
        skipped += [Path(folder) / name for name in subfolders if name.startswith((".", "_"))]
        subfolders[:] = [name for name in subfolders if not name.startswith((".", "_"))]
        for name in names:
            if name.endswith(".parquet") and name.startswith((".", "_")):
                skipped.append(Path(folder) / name)
            elif name.endswith(".parquet") and (os.path.isfile(path := os.path.join(folder, name))
                                                or os.path.islink(path) and not os.path.exists(path)):
                found.append(Path(folder) / name)
            elif (not name.endswith(".parquet") and name.lower().endswith((".parquet", ".pq", ".parq"))
                  and not name.startswith((".", "_")) and os.path.isfile(path := os.path.join(folder, name))
                  and parquet_by_its_bytes(Path(path))):  # (a Power Query .pq script is not one)
                misnamed.append(Path(folder) / name)

    def below_root(path):  # as sorted(Path) orders them
        return path.relative_to(root).parts
    return sorted(found, key=below_root), skipped, sorted(misnamed, key=below_root)
