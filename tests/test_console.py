"""console.py: the lines a run prints, at its start and for its records."""
import math
from types import SimpleNamespace

import torch
import yaml

import console
import train
from config import Config
from conftest import ROOT, write_config, write_parquet
from resume import Progress
from shards import list_units


def test_the_step_line_says_what_the_record_holds():
    record = {"step": 40, "train_loss": 2.34567, "lr": 3e-4, "grad_norm": 0.5, "tokens_per_s": 12345, "ms_per_step": 81.0}
    line = console.step_line(record, 100, 60 * 0.081, elapsed=59.996)
    assert line == ("step 40/100 | loss 2.3457 | lr 3.00e-04 | grad norm 0.500 | 12,345 tok/s | 81.0 ms/step | "
                    "elapsed 0:00:59 | eta 0:00:04")
    assert " | MFU 41.0% | " in console.step_line({**record, "mfu": 0.41}, 100, 0.081, elapsed=1)
    assert " | waiting for data 12% | " in console.step_line({**record, "data_wait": 0.123}, 100, 0.081, elapsed=1)
    assert "waiting" not in console.step_line({**record, "data_wait": 0.04}, 100, 0.081, elapsed=1)
    assert " | waiting for data 5% | " in console.step_line({**record, "data_wait": 0.05}, 100, 0.081, elapsed=1)
    assert console.step_line(record, 100, None, elapsed=5).endswith("| eta after compilation")
    assert console.step_line(record, 100, 149.5, elapsed=5, at_least=True).endswith("| eta at least 0:02:29")
    last = {**record, "step": 100}
    assert console.step_line(last, 100, 0.2, elapsed=5, at_least=True).endswith(
        "elapsed 0:00:05 | final evaluation and checkpoint next")
    assert console.step_line(last, 100, 38.2, elapsed=5).endswith(
        "| final evaluation and checkpoint next, about 0:00:38")
    assert console.step_line(record, 100, 0.2, elapsed=5, at_least=True).endswith("| eta at least 0:00:00")
    assert " | 3 step(s) skipped by the float16 loss scaler | " in console.step_line(
        {**record, "skipped_steps": 3}, 100, 1.0, elapsed=1)
    assert console.format_duration(3661) == "1:01:01" and console.format_duration(25 * 3600 + 59) == "25:00:59"


def test_a_model_sized_for_a_gpu_is_noted_on_cpu(tmp_path, corpus, monkeypatch, capsys):
    path = write_config(tmp_path, corpus, max_iters=1, test_freq=100)
    assert train.main(["--config", str(path)]) == 0
    assert "sized for a GPU" not in capsys.readouterr().out
    step_flops = Config.from_dict(yaml.safe_load(path.read_text())).model.training_flops_per_token(16) * 4 * 16
    monkeypatch.setattr(console, "CPU_STEP_FLOPS", step_flops / 2)
    assert train.main(["--config", str(path), f"training.checkpoint_dir={tmp_path / 'ck2'}"]) == 0
    assert (f"note: a step is {step_flops / 1e12:.1f} TFLOP per process, seconds to minutes on a CPU (the "
            f"first step line comes after it): this model is sized for a GPU; configs/tiny.yaml trains on a CPU in "
            f"minutes\n") in capsys.readouterr().out
    assert (ROOT / "configs" / "tiny.yaml").is_file()


def test_the_first_line_gives_the_model_s_shape(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=1, test_freq=100)
    assert train.main(["--config", str(path), "model.n_layer=1",
                       "model.dropout=0.2", "training.activation_checkpointing=true"]) == 0
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("BDH "))
    model = Config.from_dict(yaml.safe_load(path.read_text())).model  # the shape a sweep changes is on the first line
    counts = (65_536, 999_950, 25_296_896, 100_400_000, 999_950_000, 1_611_661_312)
    assert [console.parameter_count(n) for n in counts] == ["65.5K", "1.0M", "25.3M", "100.4M", "1.00B", "1.61B"]
    assert first.startswith(f"BDH {console.parameter_count(model.n_params)} parameters (1 layer, {model.n_head} "
                            f"heads, n_embd {model.n_embd}, N {model.n_latent}, dropout 0.2) | device cpu | ")
    assert "| activation checkpointing |" in first


def test_the_data_line_names_the_subfolders_a_parent_folder_mixes(tmp_path):
    """`dataset.parquet_dir=data` where data/ holds two datasets trains on both: the start says so."""
    for folder in ("data/mytext", "data/stdlib", "data"):
        write_parquet(tmp_path / folder / "x.parquet", ["some text"] * 4)
    assert console.subfolders(str(tmp_path / "data"), list_units(tmp_path / "data", "text")) == (
        " in 3 top-level folders: ./, mytext/, stdlib/")
    assert console.subfolders(str(tmp_path / "data/mytext"), list_units(tmp_path / "data/mytext", "text")) == ""
    assert console.subfolders(str(tmp_path / "data/*/x.parquet"), list_units(str(tmp_path / "data/*/x.parquet"), "text")) == ""


def test_the_done_line_shows_a_small_share_of_a_pass_by_its_figures(tmp_path):
    progress = Progress(step=50, last_saved=tmp_path / "checkpoint_50.pt")
    for passes, shown in ((2.345, "2.35 passes"), (0.1, "0.10 passes"), (0.0012345, "0.0012 passes"),
                          (6.1e-06, "0.0000061 passes"), (0.0999, "0.10 passes"), (0.00999, "0.010 passes"),
                          (0, "0.00")):
        line = console.done_lines(progress, here=50, passes=passes, seconds=61, train_on="python train.py ...")
        assert line.startswith(f"done: 50 steps ({shown}")


def test_the_done_line_of_a_run_done_in_one_process_names_no_process_and_offers_twice_its_steps(tmp_path):
    progress = Progress(step=50, last_saved=tmp_path / "checkpoint_50.pt")
    line = console.done_lines(progress, here=50, passes=2.0, seconds=61, train_on="python train.py ...")
    assert line.startswith("done: 50 steps (2.00 passes over the training data) in 0:01:01; final checkpoint ")
    assert "in this process" not in line and "the whole run" not in line
    assert "\nto train on, to step 100 say (" in line
    resumed = console.done_lines(progress, here=20, passes=2.0, seconds=61, train_on="python train.py ...")
    assert ", the last 20 in this process in 0:01:01 (the whole run: " in resumed


def test_the_evaluation_lines_give_x_and_y_their_own_means():
    record = {"step": 10, "val_loss": 2.5, "val_bits_per_byte": 3.6, "sparsity_x": [0.1, 0.3],
              "sparsity_y": [0.02, 0.04], "sample_prompt": "Once", "sample": " upon"}
    assert "active latents: x 20.0%, y 3.0% (mean over layers)\n" in console.evaluation_lines(record)


def test_the_data_line_shows_five_subfolders_then_dots(tmp_path):
    for folder in ("a", "b", "c", "d", "e", "f"):
        write_parquet(tmp_path / "data" / folder / "x.parquet", ["some text"] * 4)
    assert console.subfolders(str(tmp_path / "data"), list_units(tmp_path / "data", "text")) == (
        " in 6 top-level folders: a/, b/, c/, d/, e/, ...")


def test_the_done_line_names_the_best_validation_loss_and_its_step(tmp_path, monkeypatch):
    """best.pt's step where it can be read; the whole run's time only where known (an older checkpoint's is not)."""
    progress = Progress(step=50, best_val_loss=2.34567, last_saved=tmp_path / "checkpoint_50.pt", seconds_before=None)
    monkeypatch.setattr(console, "saved_step", lambda path: 30)
    line = console.done_lines(progress, here=20, passes=1.0, seconds=61, train_on="python train.py ...")
    assert ", the last 20 in this process in 0:01:01; best validation loss 2.3457 (best.pt, of step 30); final " in line
    monkeypatch.setattr(console, "saved_step", lambda path: math.inf)  # unreadable
    line = console.done_lines(progress, here=50, passes=1.0, seconds=61, train_on="python train.py ...")
    assert "; best validation loss 2.3457 (best.pt); final checkpoint " in line


def test_the_optimizer_line_of_a_sharded_or_4bit_run():
    """FSDP's optimizer state is per rank (DDP's is whole on each); 4-bit QAT's first step is counted from 1."""
    model = torch.nn.Linear(64, 64)
    optimizer, ranks = torch.optim.AdamW(model.parameters()), SimpleNamespace(world_size=2)
    tiny = ROOT / "configs" / "tiny.yaml"
    line = console.optimizer_line(Config.from_yaml(tiny, ["training.distributed=fsdp"]), model, optimizer, ranks,
                                  None, 0)
    assert "MiB per rank (FSDP shards it)" in line
    line = console.optimizer_line(Config.from_yaml(tiny, ["training.distributed=ddp", "low_precision.use_4bit=true"]),
                                  model, optimizer, ranks, None, 99)
    assert "per rank" not in line and "decoder from step 100;" in line


def start_lines(tmp_path, corpus, overrides=(), val_windows=8, run_path=None, compiled=False, fp8_recipe=None,
                peak_source="", compute_dtype="float32", ranks=None, device="cpu", **training):
    """describe_run's lines for the test config (write_config's), with `overrides` as on the command line."""
    cfg = Config.from_yaml(write_config(tmp_path, corpus, **training), list(overrides))
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    ranks = ranks or SimpleNamespace(enabled=False, world_size=1, mode="", main=True)
    units = list_units(cfg.dataset.parquet_dir, cfg.dataset.text_column)
    return console.describe_run(cfg, model, optimizer, ranks, torch.device(device), compute_dtype, units, val_windows,
                                SimpleNamespace(path=run_path), compiled, fp8_recipe, 0, peak_source)


def test_the_compute_dtype_auto_chose_is_marked_so(tmp_path, corpus):
    """compute_dtype auto: the first line names the dtype it resolved to, and says it was chosen."""
    assert "| float32 (auto) |" in start_lines(tmp_path, corpus, ["low_precision.compute_dtype=auto"])
    assert "(auto)" not in start_lines(tmp_path, corpus, ["low_precision.compute_dtype=float32"])


def test_the_data_line_counts_files_row_groups_and_rows(tmp_path, corpus):
    """3 files of 40 documents in row groups of 8: 3 files, 15 row groups, 120 rows."""
    data = start_lines(tmp_path, corpus).splitlines()[1]
    assert "(3 files, 15 row groups, 120 rows, " in data


def test_the_data_line_says_how_validation_is_held_out(tmp_path, corpus):
    """A fraction of the documents, in percent; or a folder of its own, by its path."""
    lines = start_lines(tmp_path, corpus)
    assert "validation 20% of its documents (by " in lines
    write_parquet(tmp_path / "val" / "v.parquet", ["held out text"] * 4)
    lines = start_lines(tmp_path, corpus, [f"dataset.val_parquet_dir={tmp_path / 'val'}"])
    assert f"validation {(tmp_path / 'val').resolve()}, measured on" in lines and "of its documents" not in lines


def test_the_validation_windows_are_counted_in_batches_where_they_fill_them(tmp_path, corpus):
    """8 windows in batches of 4: "2 x 4"; 9 windows (the last batch short): "9"."""
    assert "measured on 2 x 4 windows taken across it" in start_lines(tmp_path, corpus, val_windows=8)
    assert "measured on 9 windows taken across it" in start_lines(tmp_path, corpus, val_windows=9)


def test_a_resumed_run_says_it_continues_in_its_own_directory(tmp_path, corpus):
    """Not in training.checkpoint_dir, where a new run would go."""
    run = tmp_path / "ck" / "run-1"
    lines = start_lines(tmp_path, corpus, run_path=run)
    assert f"| continues in {run.resolve()}" in lines
    assert f"| runs in {(tmp_path / 'ck').resolve()}" in start_lines(tmp_path, corpus)


def test_several_processes_are_named_with_the_global_batch_and_tokens(tmp_path, corpus):
    """Under torchrun the first line gives the processes and the tokens of a step over all of them."""
    ranks = SimpleNamespace(enabled=True, world_size=2, mode="ddp", main=True)
    first = start_lines(tmp_path, corpus, ranks=ranks).splitlines()[0]
    assert "| 128 tokens/step | 2 processes (ddp), global batch 4 x 1 x 2" in first
    assert "processes" not in start_lines(tmp_path, corpus).splitlines()[0]


def test_a_warmup_as_long_as_the_run_is_noted(tmp_path, corpus):
    """warmup_iters == max_iters: the rate reaches its peak only at the last step and never decays."""
    lines = start_lines(tmp_path, corpus, warmup_iters=4, max_iters=4)
    assert "note: training.warmup_iters 4 >= max_iters 4: the learning rate rises to 0.01 at the last step" in lines
    lines = start_lines(tmp_path, corpus, warmup_iters=8, max_iters=4)
    assert "the learning rate rises only to 0.005 (learning_rate 0.01) and never decays" in lines
    assert "warmup_iters" not in start_lines(tmp_path, corpus, warmup_iters=1, max_iters=4)


def test_settings_that_do_nothing_are_noted(tmp_path, corpus):
    """A setting the run ignores is a note among the start lines."""
    cfg = Config.from_yaml(write_config(tmp_path, corpus))
    lines = start_lines(tmp_path, corpus)
    for line in cfg.unused_settings():
        assert f"note: {line}" in lines
    noted = start_lines(tmp_path, corpus, ["low_precision.use_double_quant=false"])
    unused = Config.from_yaml(write_config(tmp_path, corpus),
                              ["low_precision.use_double_quant=false"]).unused_settings()
    assert unused and all(f"note: {line}" in noted for line in unused)


def test_mfu_compile_and_debug_are_said_where_they_apply(tmp_path, corpus):
    """MFU's yardstick where it is measured (and FP8's), the compiling first step, and debug mode."""
    plain = start_lines(tmp_path, corpus)
    assert "MFU" not in plain and "torch.compile" not in plain and "DEBUG" not in plain
    lines = start_lines(tmp_path, corpus, ["training.debug=true"], compiled=True, peak_source="H100's bfloat16 peak",
                        fp8_recipe="tensorwise", compute_dtype="bfloat16 (auto)")
    assert "MFU against the H100's bfloat16 peak (FP8 too: the same bfloat16 (auto) yardstick)" not in lines
    assert "MFU against the H100's bfloat16 peak (FP8 too: the same bfloat16 yardstick)" in lines
    assert "torch.compile: the first step compiles the model and takes longer" in lines
    assert "| DEBUG: anomaly detection" in lines
    assert "FP8 too" not in start_lines(tmp_path, corpus, peak_source="H100's bfloat16 peak")


def test_a_folder_given_by_a_relative_path_names_no_subfolders_rather_than_fail(tmp_path, monkeypatch):
    """Units listed under another spelling of the folder (not below it as written): no subfolder list, no error."""
    for folder in ("a", "b"):
        write_parquet(tmp_path / "data" / folder / "x.parquet", ["some text"] * 4)
    monkeypatch.chdir(tmp_path)
    units = list_units(tmp_path / "data", "text")
    assert console.subfolders("data", units) == ""


def test_the_note_on_a_step_too_large_for_a_cpu_is_for_a_cpu_alone(tmp_path, corpus, monkeypatch):
    """On a GPU the same step is no reason for a note (torch.device("cuda") is only named here, not used)."""
    monkeypatch.setattr(console, "CPU_STEP_FLOPS", 0)
    assert "sized for a GPU" in start_lines(tmp_path, corpus)
    assert "sized for a GPU" not in start_lines(tmp_path, corpus, device="cuda")
