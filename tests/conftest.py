import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

# before torch starts: one thread for each test process and each training process a test starts
# (pytest -n 2 on 2 cores: a third faster, and no step stalled behind a thread waiting for a core)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# a shell starts a background job (`pytest ... &`) with SIGINT ignored, and train.py keeps an ignored signal
# ignored, as the shell asked: the tests that send SIGINT run with Python's own handler, as from a terminal
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]  # a test parametrized so runs on CUDA where there is one


@pytest.fixture
def two_threads():
    """Two threads for torch in this test process (the suite's have one): what races between them shows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def rendezvous(n: int) -> tuple[dict, object]:
    """(the environment torchrun gives its n ranks, the store they meet at). The test holds the
    store, as torchrun's agent does: hosted by rank 0, it would end with rank 0, perhaps while
    another rank still leaves the process group. Port 0: the system picks a free one as it binds."""
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, wait_for_workers=False)
    return {"WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
            "TORCHELASTIC_USE_AGENT_STORE": "True"}, store


def run_ranks(script: str, n: int = 2) -> list[str]:
    """What each of n processes running `script` in a gloo group printed; each must exit 0."""
    env, _store = rendezvous(n)
    ranks = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env, "RANK": str(r)}) for r in range(n)]
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in ranks]
    finally:
        for proc in ranks:
            proc.kill()
    assert [proc.returncode for proc in ranks] == [0] * n
    return outputs


def write_parquet(path, docs, rows_per_group=4, column="text", type_=pa.string()):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    column_data = docs if isinstance(docs, pa.Array) else pa.array(docs, type_)
    pq.write_table(pa.table({column: column_data}), path, row_group_size=rows_per_group)
    return path


def make_corpus(root, n_files=3, docs_per_file=12, rows_per_group=4, doc_len=40):
    """Documents '<ff-rrr>' (file and row number) followed by letters: every document is recognisable."""
    for f in range(n_files):
        docs = []
        for r in range(docs_per_file):
            head = f"<{f:02d}-{r:03d}>"
            docs.append(head + "abcdefghij" * (doc_len // 10))
        write_parquet(Path(root) / f"shard-{f}.parquet", docs, rows_per_group)
    return Path(root)


def unit_of_tag(units, rows_per_group=8):
    """(file, row) tag of make_corpus's documents -> the index of its (file, row group) unit."""
    index = {(Path(u.path).name, u.row_group): i for i, u in enumerate(units)}
    return lambda f, r: index[(f"shard-{f}.parquet", r // rows_per_group)]


def tiny_config_dict(tmp_path, data_dir, **training):
    """A model small enough that a few steps take well under a second on CPU."""
    t = {"block_size": 16, "batch_size": 4, "max_iters": 4, "learning_rate": 1e-2,
         "log_freq": 1, "test_freq": 2, "checkpoint_freq": 2, "eval_iters": 2,
         "warmup_iters": 1, "min_lr": 1e-3, "checkpoint_dir": str(tmp_path / "ck"),
         "device": "cpu", "compile": False}
    t.update(training)
    return {
        "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "mlp_internal_dim_multiplier": 4,
                  "dropout": 0.1},
        "training": t,
        "dataloader": {"num_workers": 0},
        "dataset": {"parquet_dir": str(data_dir), "val_fraction": 0.2},
        "low_precision": {"compute_dtype": "float32"},
    }


def write_config(tmp_path, corpus, name="exp.yaml", model=None, dataset=None, **training):
    raw = tiny_config_dict(tmp_path, corpus, **training)
    raw["model"].update(model or {})
    raw["dataset"].update(dataset or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(autouse=True)
def process_wide_state():
    """train.main runs in this process: what a compiled CPU run sets for the whole process
    (runtime.compile_repeatably), and the run directories it holds, end with its test."""
    yield
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = True
    from rundir import release_run_directories
    release_run_directories()  # as train.main does: a RunDir a test created held its folder
    from stopping import heard_at_once
    heard_at_once.clear()  # (train.main clears it when it starts; a test may use the handlers without it)


class PaddedCounter:
    """TensorBoard names an event file by the second, host, process and a count of the process's writers, and reads
    a folder's files sorted by name: in one second, writer 10 sorts before writer 9 and its steps seem to go back,
    so TensorBoard drops points. Only a test process writes that many (a run's process writes a few); padded, they
    sort in order."""

    def __init__(self):
        self.count = itertools.count()

    def get(self) -> str:
        return f"{next(self.count):09d}"


@pytest.fixture(autouse=True, scope="session")
def event_files_in_order():
    try:
        from tensorboard.summary.writer import event_file_writer
    except ImportError:
        return
    event_file_writer._global_uid = PaddedCounter()


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures a command draws, kept open (it closes each once written) to be looked into."""
    import matplotlib.pyplot as plt
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    return kept


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "data", n_files=3, docs_per_file=40, rows_per_group=8, doc_len=60)


@pytest.fixture(scope="session")
def bpe_json():
    """A 320-token byte-level BPE trained on text like make_corpus's documents."""
    from tokenizer import train_bpe
    texts = [f"<{f:02d}-{r:03d}>" + "abcdefghij" * 6 + " some words, and more words." for f in range(3) for r in range(40)]
    return train_bpe(iter(texts), 320)


@pytest.fixture
def bpe_file(tmp_path, bpe_json):
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe_json)
    return path


# ---- train.py runs: their run directories, and runs in a process of their own

def config_problems(raw, overrides=()):
    """The problems Config.from_dict reports for a raw config and overrides."""
    from config import Config
    from config_file import ConfigError
    with pytest.raises(ConfigError) as info:
        Config.from_dict(raw, overrides)
    return info.value.problems


def file_problems(path, overrides=()):
    """The problems Config.from_yaml reports for a config file and overrides."""
    from config import Config
    from config_file import ConfigError
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path, overrides)
    return info.value.problems


def run_dirs(tmp_path):
    """The run directories in tmp_path/ck (beside them: an auto run's .auto.lock)."""
    root = tmp_path / "ck"
    return sorted(p for p in root.glob("run_*") if p.is_dir()) if root.exists() else []


def start(config, *overrides):
    return subprocess.Popen([sys.executable, "train.py", "--config", str(config), *overrides], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def only_run(checkpoint_dir):
    [run] = [p for p in checkpoint_dir.iterdir() if p.name.startswith("run_")]
    return run


@pytest.fixture(autouse=True, scope="session")
def short_samples():
    """The sample printed at each evaluation: 16 tokens instead of 200 (3/4 of a tiny run's time)."""
    import evaluation
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "SAMPLE_TOKENS", 16)
        yield


def hub_layout(root):
    """A Hugging Face dataset's files: two configurations, each with train, validation and test files."""
    for config in ("wikitext-103-raw-v1", "wikitext-2-raw-v1"):
        for name in ("train-00000-of-00002", "train-00001-of-00002", "validation-00000-of-00001", "test-00000-of-00001"):
            write_parquet(root / config / f"{name}.parquet", [f"{config} {name} doc {i}" for i in range(3)])
