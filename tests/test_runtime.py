"""runtime.py: the device, the compute dtype, the GPU peak table, the host memory check."""
import os
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

import runtime
from conftest import ROOT


def test_auto_compute_dtype_is_bfloat16_only_where_bf16_is_fast(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert runtime.resolve_compute_dtype(cpu, "auto") == "bfloat16"
    assert runtime.autocast(cpu, "auto").fast_dtype == torch.bfloat16  # and the steps compute in it
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert runtime.resolve_compute_dtype(cpu, "auto") == "float32"
    assert not isinstance(runtime.autocast(cpu, "auto"), torch.autocast)
    assert runtime.resolve_compute_dtype(cpu, "float16") == "float16"  # an explicit choice stays
    assert runtime.resolve_compute_dtype(torch.device("mps"), "auto") == "float32"
    # torch.cuda.is_bf16_supported() alone also says yes on a GPU that emulates bf16 (T4, V100)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.resolve_compute_dtype(torch.device("cuda"), "auto") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and up
    assert runtime.resolve_compute_dtype(torch.device("cuda"), "auto") == "bfloat16"
    # the run's config files say what auto was, over the settings as given
    from config import Config
    as_run = runtime.config_as_run(Config(), torch.device("cuda"))
    assert as_run == ("# on this machine: training.device cuda, low_precision.compute_dtype bfloat16, training.compile "
                      "true\n" + Config().to_yaml())


def test_a_compute_dtype_the_cpu_emulates_is_warned_about(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    for dtype in ("bfloat16", "float16"):
        assert runtime.emulated_dtype_warning(cpu, dtype) == (
            f"WARNING: low_precision.compute_dtype={dtype} on a CPU that emulates it: each step runs many times "
            f"slower than in float32; set low_precision.compute_dtype=auto (float32 on this CPU)")
        assert runtime.emulated_dtype_warning(torch.device("cuda"), dtype) is None
    assert runtime.emulated_dtype_warning(cpu, "float32") is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # AVX512-BF16 without AMX-FP16
    assert runtime.emulated_dtype_warning(cpu, "bfloat16") is None
    assert runtime.emulated_dtype_warning(cpu, "float16").endswith("compute_dtype=auto (bfloat16 on this CPU)")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.emulated_dtype_warning(torch.device("cuda"), "bfloat16") == (  # a T4, a V100
        "WARNING: low_precision.compute_dtype=bfloat16 on a GPU that emulates it: it has no bfloat16 tensor cores, "
        "and steps run slower than in float32; set low_precision.compute_dtype=auto (float32 on this GPU), or float16")
    assert runtime.emulated_dtype_warning(torch.device("cuda"), "float16") is None


@pytest.mark.parametrize("name,tflops", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                         ("NVIDIA H100 NVL", 835.5), ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5),
                                         ("NVIDIA L4", 121.0), ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.1),
                                         ("NVIDIA A100-SXM4-40GB", 312.0)])
def test_the_datasheet_peak_is_found_by_whole_words(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    peak, source = runtime.peak_flops(torch.device("cuda"), torch.bfloat16)
    assert peak == tflops * 1e12 and source.startswith(f"{name} datasheet")


def test_float32_or_an_unknown_gpu_is_measured_and_the_measurement_s_memory_forgotten(monkeypatch):
    """The datasheet's peak is for bf16 and fp16 on a GPU it names (an A10 is no A10G); otherwise the matmul
    is measured, and its matrices are not counted in the run's peak memory."""
    reset, measure = [], runtime.measured_matmul_flops
    monkeypatch.setattr(runtime, "measured_matmul_flops", lambda device, dtype: 50e12)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: reset.append(device))
    for name, dtype in (("NVIDIA H100 80GB HBM3", torch.float32), ("NVIDIA A10", torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
        peak, source = runtime.peak_flops(torch.device("cuda"), dtype)
        assert peak == 50e12 and "measured at 50 TFLOP/s" in source
    assert reset == [torch.device("cuda")] * 2
    clock = iter([10.0, 12.0])  # the measurement: two FLOPs per multiply-add
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    monkeypatch.setattr(runtime, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert measure(torch.device("cpu"), torch.float32, n=16, reps=2) == 2 * 16**3 * 2 / 2.0


def test_auto_picks_mps_where_there_is_no_cuda_and_an_absent_mps_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.pick_device("auto") == torch.device("cpu")
    with pytest.raises(runtime.DeviceError, match=r"^sample.device: mps requested but not available"):
        runtime.pick_device("mps", "sample.device")


def test_first_line_of_an_error_and_the_last_of_a_worker_s_without_its_class():
    assert runtime.first_line(ValueError("first\nsecond")) == "first"
    assert runtime.first_line(KeyError()) == "KeyError"
    error = RuntimeError("Caught ValueError in DataLoader worker process 0.\nTraceback ...\n"
                         "pyarrow.lib.ArrowInvalid: x\npyarrow.lib.ArrowInvalidError: bad row group  ")
    assert runtime.last_line(error) == "pyarrow.lib.ArrowInvalidError: bad row group"
    assert runtime.one_line(error) == "bad row group"
    assert runtime.last_line(KeyError()) == "KeyError"


def test_a_ctrl_c_is_found_in_an_error_s_context_even_when_the_errors_form_a_cycle():
    """torch re-raises a Ctrl-C as its own error (its context, not its cause); a cycle of contexts ends the search."""
    ctrl_c, wrapped = KeyboardInterrupt(), RuntimeError("worker failed")
    wrapped.__context__ = ctrl_c
    assert runtime.interrupted(wrapped) is ctrl_c
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    found = []
    search = threading.Thread(target=lambda: found.append(runtime.interrupted(a)), daemon=True)
    search.start()
    search.join(timeout=2)
    assert found == [None], "the search did not end"


def test_an_out_of_memory_error_without_a_size_is_one_and_the_fix_is_what_is_not_on_yet():
    assert runtime.out_of_memory(RuntimeError("MPS backend out of memory")) == ""  # (no size said)
    assert runtime.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    cfg = SimpleNamespace(training=SimpleNamespace(batch_size=4, block_size=16, activation_checkpointing=True))
    assert runtime.memory_fix(cfg) == ("lower training.batch_size 4 (raising training.gradient_accumulation_steps "
                                       "keeps the tokens per step), training.block_size 16, or the model")


def test_compiling_on_cpu_without_a_cxx_compiler_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(runtime.DeviceError, match=r"training.compile: torch.compile on CPU needs a C\+\+ compiler"
                                                  r".*or set training.compile=false"):
        runtime.check_can_compile(torch.device("cpu"))
    runtime.check_can_compile(torch.device("cuda"))  # Triton brings its own
    (tmp_path / "g++").write_text("#!/bin/sh\n")
    (tmp_path / "g++").chmod(0o755)
    runtime.check_can_compile(torch.device("cpu"))
    monkeypatch.setenv("CXX", "my-cxx")  # the compiler torch.compile uses: not on PATH, though g++ is
    with pytest.raises(runtime.DeviceError, match="none of my-cxx is on PATH"):
        runtime.check_can_compile(torch.device("cpu"))


def test_preparing_a_compiled_cpu_step_checks_for_a_compiler_and_orders_the_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "check_can_compile", lambda device: calls.append("check"))
    monkeypatch.setattr(runtime, "compile_repeatably", lambda device: calls.append("repeatable"))
    assert runtime.prepare_compile(SimpleNamespace(compile=True, debug=False), torch.device("cpu")) is True
    assert runtime.prepare_compile(SimpleNamespace(compile=False, debug=False), torch.device("cpu")) is False
    assert calls == ["check", "repeatable"]


def test_compile_follows_the_setting_and_never_under_debug():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    wants = lambda setting, device, debug=False: runtime.wants_compile(  # noqa: E731
        SimpleNamespace(compile=setting, debug=debug), device)
    assert wants(True, cpu) and wants("auto", cuda) and wants(True, cuda)
    assert not wants("auto", cpu) and not wants(False, cuda) and not wants(True, cuda, debug=True)


def test_a_model_whose_state_exceeds_the_available_memory_is_refused(monkeypatch):
    from config import Config
    from distributed import Ranks
    cfg = Config()  # 25.3M parameters: 405 MB with AdamW (16 bytes each), 228 MB with the 4-bit optimizer (9)
    cfg.training.batch_size, cfg.training.block_size = 1, 8  # activations of 8 MiB
    monkeypatch.setattr(runtime, "available_host_memory", lambda: 300e6)
    with pytest.raises(runtime.DeviceError, match=r"^the model's 25M parameters need at least 0\.4 GiB for weights, "
                       r"gradients and optimizer state, and this machine has 0\.3 GiB available: make the model "
                       r"smaller \(.*\) or set low_precision.use_4bit_optimizer=true$"):
        runtime.check_host_memory(cfg, Ranks(), "float32")
    cfg.low_precision.use_4bit_optimizer = True
    runtime.check_host_memory(cfg, Ranks(), "float32")
    cfg.low_precision.use_4bit_optimizer = False
    monkeypatch.setattr(runtime, "available_host_memory", lambda: 550e6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # FSDP: each process builds all weights, then keeps half the rest

    class TwoRanks(Ranks):  # what the other rank sees, without a process group
        def gather(self, obj):
            return [obj, other_rank_sees]
    other_rank_sees = 550e6
    runtime.check_host_memory(cfg, TwoRanks(world_size=2, mode="fsdp"), "float32")  # 2 x (4 + 12 / 2) x 25.3M = 506 MB
    with pytest.raises(runtime.DeviceError, match=r"optimizer state \(2 processes\)"):
        runtime.check_host_memory(cfg, TwoRanks(world_size=2, mode="ddp"), "float32")
    other_rank_sees = 500e6  # every rank decides on the least: all refuse, or none; and the 4-bit optimizer
    # (329 MB would fit) is not suggested: FSDP refuses it
    with pytest.raises(runtime.DeviceError, match=r"this machine has 0\.5 GiB available: make the model smaller "
                       r"\(model.n_embd, model.mlp_internal_dim_multiplier; the layers share one set of weights\)$"):
        runtime.check_host_memory(cfg, TwoRanks(world_size=2, mode="fsdp"), "float32")
    monkeypatch.setattr(runtime, "available_host_memory", lambda: None)  # not Linux: nothing to check against
    other_rank_sees = None
    runtime.check_host_memory(cfg, TwoRanks(world_size=2, mode="ddp"), "float32")


def test_a_batch_whose_activations_exceed_the_available_memory_is_refused(monkeypatch):
    """The default model's (B, H, T, N) tensor at batch 8 x 512 is 512 MiB in float32: counted 6 + 2 times
    (the peak measured on CPU is about 14), 3 times with activation checkpointing; its (H, B, T, T) scores,
    32 MiB, 6 + 1 and 2 times. At a block_size far past N the scores decide."""
    from config import Config
    from distributed import Ranks
    cfg = Config()
    monkeypatch.setattr(runtime, "available_host_memory", lambda: 1.8 * 2**30)
    with pytest.raises(runtime.DeviceError, match=r"or training.block_size$"):  # checkpointing would not do
        runtime.check_host_memory(cfg, Ranks(), "float32")
    monkeypatch.setattr(runtime, "available_host_memory", lambda: 3 * 2**30)
    with pytest.raises(runtime.DeviceError, match=r"^a step's activations \(batch_size 8 x block_size 512 tokens\) need "
                       r"at least 4\.2 GiB beside the 0\.4 GiB of weights, gradients and optimizer state, and this "
                       r"machine has 3\.0 GiB available: lower training.batch_size .* or training.block_size; or set "
                       r"training.activation_checkpointing=true \(recomputes each layer in backward\)$"):
        runtime.check_host_memory(cfg, Ranks(), "float32")
    runtime.check_host_memory(cfg, Ranks(), "bfloat16")  # 2.1 GiB
    cfg.training.activation_checkpointing = True
    runtime.check_host_memory(cfg, Ranks(), "float32")  # 1.6 GiB
    cfg.training.batch_size = 16
    with pytest.raises(runtime.DeviceError, match=r"need at least 3\.1 GiB .*or training.block_size$"):
        runtime.check_host_memory(cfg, Ranks(), "float32")
    tiny = Config.from_yaml(ROOT / "configs" / "tiny.yaml")  # N 512: at block_size 65,536 the scores are 32 GiB
    tiny.training.batch_size, tiny.training.block_size = 1, 65536
    monkeypatch.setattr(runtime, "available_host_memory", lambda: 22 * 2**30)
    with pytest.raises(runtime.DeviceError, match=r"block_size 65536 tokens\) need at least 129\.2 GiB"):
        runtime.check_host_memory(tiny, Ranks(), "bfloat16")


def test_available_host_memory_is_read_on_linux():
    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/meminfo is Linux's")
    assert 0 < runtime.available_host_memory() < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.parametrize("cgroup,limits,expected_gib", [
    (None, {}, 16),  # no /proc/self/cgroup: MemAvailable
    ("0::/\n", {"": "max"}, 16),  # cgroup v2 without a limit
    ("0::/job/step\n", {"job/step": "max", "job": str(4 << 30)}, 4),  # a limit on a parent (Slurm's job)
    ("0::/job/step\n", {"job/step": str(6 << 30), "job": str(8 << 30)}, 6),
    ("0::/c\n", {"c": str(64 << 30)}, 16),  # a limit above what the machine has
    ("4:memory:/a\n0::/\n", {}, 16),  # cgroup v1 without a limit file
    ("4:memory:/a\n0::/\n", {"memory/a": str(3 << 30)}, 3),  # cgroup v1 (older Docker, Slurm)
    ("4:memory:/host/path\n0::/\n", {"memory": str(5 << 30)}, 5),  # a container's own cgroup at the mount's root
    ("4:cpu,memory:/a\n", {"memory/a": str(9223372036854771712)}, 16),  # v1's "no limit"
    ("4:cpu,memory:/a\n", {"memory/a": str(3 << 30)}, 3),  # memory mounted with another controller
])
def test_available_memory_is_the_least_of_memavailable_and_the_cgroup_limits(tmp_path, monkeypatch, cgroup, limits,
                                                                           expected_gib):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {32 << 20} kB\nMemFree: 1 kB\nMemAvailable: {16 << 20} kB\n")
    monkeypatch.setattr(runtime, "MEMINFO", meminfo)
    monkeypatch.setattr(runtime, "PROCESS_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(runtime, "CGROUP_ROOT", tmp_path / "fs")
    if cgroup is not None:
        (tmp_path / "cgroup").write_text(cgroup)
    for folder, limit in limits.items():
        (tmp_path / "fs" / folder).mkdir(parents=True, exist_ok=True)
        name = "memory.limit_in_bytes" if folder.split("/")[0] == "memory" else "memory.max"
        (tmp_path / "fs" / folder / name).write_text(limit + "\n")
    assert runtime.available_host_memory() == expected_gib << 30
    monkeypatch.setattr(runtime, "MEMINFO", tmp_path / "absent")
    assert runtime.available_host_memory() is None  # not Linux


def test_compiling_on_cpu_turns_on_the_ordered_kernels():
    """test_a_compiled_run_resumes_bit_for_bit_and_its_checkpoints_resume_plain catches its absence only
    when the threads' atomic adds race."""
    try:
        runtime.compile_repeatably(torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = True


def test_a_long_message_is_cut_at_a_word_and_never_to_nothing():
    assert runtime.shortened("short", 120) == "short" and runtime.shortened("x" * 120, 120) == "x" * 120
    assert runtime.shortened("word " * 40, 120) == "word " * 22 + "word ..."
    assert runtime.shortened("error at " + "x" * 140, 120) == "error at " + "x" * 107 + " ..."  # one long word: cut inside


def test_cpu_training_with_large_latents_sets_glibc_s_mmap_threshold(monkeypatch):
    """Latents past 32 MiB (here 64 MiB) get a 4 MiB mmap threshold; smaller ones (and GPUs) keep glibc's default."""
    calls = []
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=lambda *a: calls.append(a)))
    cfg = SimpleNamespace(training=SimpleNamespace(batch_size=4, block_size=1024),
                          model=SimpleNamespace(n_head=4, n_latent=1024))  # 4 bytes x 16M = 64 MiB
    runtime.steady_host_memory(cfg, torch.device("cuda"))
    runtime.steady_host_memory(cfg, torch.device("cpu"))
    cfg.training.batch_size = 1  # 16 MiB
    runtime.steady_host_memory(cfg, torch.device("cpu"))
    assert calls == [(-3, 4 << 20)]


def test_the_peak_memory_on_cpu_is_the_peak_not_the_current_resident_size():
    big = torch.ones(200 << 20, dtype=torch.uint8)  # 200 MiB, mmapped: returned to the system when freed
    del big
    assert runtime.peak_memory_bytes(torch.device("cpu")) >= runtime.process_status_bytes("VmRSS") + (150 << 20)
    assert runtime.process_status_bytes("VmRSS") > 10 << 20  # bytes, not KiB


def test_tensor_bytes_counts_the_bytes_of_tensors_in_tuples_too():
    state = {"a": torch.zeros(10, dtype=torch.float32), "b": (torch.zeros(4, dtype=torch.bfloat16), 3), "c": "x"}
    assert runtime.tensor_bytes(state) == 40 + 8


def test_activation_checkpointing_keeps_two_score_tensors():
    cfg = SimpleNamespace(model=SimpleNamespace(n_head=1, n_latent=1, n_layer=6),
                          training=SimpleNamespace(batch_size=1, block_size=1024))
    scores = 1024 ** 2 * 4
    assert runtime.activation_bytes(cfg, "float32", True) == 3 * 1024 * 4 + 2 * scores
    assert runtime.activation_bytes(cfg, "float32", False) == 8 * 1024 * 4 + 7 * scores


def test_checkpointing_and_the_4bit_optimizer_are_suggested_only_where_they_would_fit(monkeypatch):
    from config import Config
    from distributed import Ranks
    cfg = Config()  # 25.3M parameters: 405 MB with AdamW, 228 MB with the 4-bit optimizer
    cfg.training.batch_size, cfg.training.block_size = 1, 8
    monkeypatch.setattr(runtime, "available_host_memory", lambda: 200e6)  # not even the 4-bit optimizer fits
    with pytest.raises(runtime.DeviceError) as refusal:
        runtime.check_host_memory(cfg, Ranks(), "float32")
    assert "use_4bit_optimizer" not in str(refusal.value)
    cfg = Config()  # batch 8 x 512: 4.2 GiB of activations, 1.6 GiB with checkpointing, 0.4 GiB of state
    monkeypatch.setattr(runtime, "available_host_memory", lambda: 1.8 * 2**30)  # 1.6 + 0.4 > 1.8 > 1.6
    with pytest.raises(runtime.DeviceError) as refusal:
        runtime.check_host_memory(cfg, Ranks(), "float32")
    assert "activation_checkpointing" not in str(refusal.value)
