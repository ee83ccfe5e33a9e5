"""What every script needs to run on this machine: the device, the compute dtype, memory, peak FLOP/s;
and reading errors for one-line messages (their first or last line, a Ctrl-C inside, an
out-of-memory error and what to lower)."""
import ctypes
import os
import re
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from config_file import AS_RUN

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class DeviceError(Exception):
    pass


def pick_device(requested: str, setting: str = "training.device") -> torch.device:
    """auto: cuda, then mps, then cpu. `setting` names the option in the error message."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (requested == "cuda" and not cuda) or (requested == "mps" and not mps):
        raise DeviceError(f"{setting}: {requested} requested but not available to this torch "
                          f"{torch.__version__}; use auto or cpu")
    return torch.device(requested)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def last_line(e: BaseException) -> str:
    """The last line of an exception's message (its type's name if it has none): where a DataLoader
    worker's or a collective's error puts what happened, after a traceback."""
    return str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__


def shortened(text: str, width: int) -> str:
    """text, or its start and ' ...' in at most `width` characters, cut at a space among the last 30 of them
    (mid-word if there is none)."""
    if len(text) <= width:
        return text
    cut = text.rfind(" ", width - 34, width - 4)
    return text[:cut if cut > 0 else width - 4] + " ..."


def one_line(e: Exception) -> str:
    """The error's line. DataLoader workers re-raise errors with their traceback in the message:
    its last line, without the error's module and class name."""
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last_line(e))


def interrupted(e: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that caused the error, if one did (torch re-raises some as its own errors)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def wants_compile(training, device: torch.device) -> bool:
    """training.compile: true compiles on any device, auto on CUDA only; never with training.debug."""
    return not training.debug and (training.compile is True or (training.compile == "auto" and device.type == "cuda"))


def config_as_run(cfg, device: torch.device) -> str:
    """The config as YAML for the run's own files, after a comment that says what its `auto` settings
    are on this machine: the same file on another machine may compute in another precision."""
    dtype = resolve_compute_dtype(device, cfg.low_precision.compute_dtype)
    return (f"{AS_RUN}training.device {device.type}, low_precision.compute_dtype {dtype}, "
            f"training.compile {str(wants_compile(cfg.training, device)).lower()}\n" + cfg.to_yaml())


def prepare_compile(training, device: torch.device) -> bool:
    """Whether the step is compiled (wants_compile); if so, checked that it can be and made repeatable."""
    if not wants_compile(training, device):
        return False
    check_can_compile(device)
    compile_repeatably(device)
    return True


def check_can_compile(device: torch.device):
    """torch.compile on CPU writes C++ and needs a compiler: say so before the first step fails
    with a long traceback."""
    if device.type != "cpu":
        return
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    if not any(shutil.which(c) for c in candidates):
        raise DeviceError(f"training.compile: torch.compile on CPU needs a C++ compiler and none of "
                          f"{', '.join(candidates)} is on PATH; install one (g++, or Xcode's command line tools) "
                          "or set training.compile=false")


def compile_repeatably(device: torch.device):
    """On CPU, torch.compile's code adds the embedding's gradient rows with atomic additions from
    several threads, in an order that changes from run to run: two runs, or a run and its resume,
    would differ in the last bits. PyTorch's deterministic mode makes inductor use the ordered
    kernel instead (the tiny config's step measured no slower). Its filling of new tensors with
    NaN is left off: it costs time and guards against nothing here. (CUDA: not applied, untested.)"""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False


def resolve_compute_dtype(device: torch.device, setting: str) -> str:
    """low_precision.compute_dtype, with auto made concrete: bfloat16 where the device computes
    it fast (CUDA with bf16; a CPU with AVX512-BF16 (AMX CPUs have it too), whose bf16 matmuls are several times
    faster than float32 ones), float32 elsewhere (other CPUs emulate bf16, slowly; mps)."""
    if setting != "auto":
        return setting
    return "bfloat16" if native_bf16(device) else "float32"


def native_bf16(device: torch.device) -> bool:
    # CUDA: compute capability 8.0 (Ampere) and up; torch's default also says yes where it emulates (T4, V100)
    return ((device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False))
            or (device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()))


def emulated_dtype_warning(device: torch.device, setting: str) -> str | None:
    """A warning for a compute dtype this device only emulates: bf16 on a CPU without AVX512-BF16 or
    a GPU older than Ampere, float16 on a CPU without AMX-FP16. Each step then runs many times slower
    than in float32 (17x for a 2-layer model on a 2-core CPU without either)."""
    emulated = ((setting == "bfloat16" and device.type in ("cpu", "cuda") and not native_bf16(device))
                or (setting == "float16" and device.type == "cpu" and not torch.cpu._is_amx_fp16_supported()))
    if emulated:
        what, cost, alternative = (
            ("GPU", "it has no bfloat16 tensor cores, and steps run slower than in float32", ", or float16")
            if device.type == "cuda" else ("CPU", "each step runs many times slower than in float32", ""))
        return (f"WARNING: low_precision.compute_dtype={setting} on a {what} that emulates it: {cost}; set "
                f"low_precision.compute_dtype=auto ({resolve_compute_dtype(device, 'auto')} on this {what})"
                f"{alternative}")
    return None


def autocast(device: torch.device, compute_dtype: str):
    """The autocast context of a compute dtype (float32: none; auto: resolve_compute_dtype)."""
    dtype = DTYPES[resolve_compute_dtype(device, compute_dtype)]
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def steady_host_memory(cfg, device: torch.device):
    """CPU training of a model whose (H, B, T, N) latents exceed glibc's dynamic mmap range
    (32 MiB): those are mmapped anyway, but glibc then raises its mmap threshold and carves the
    step's 4-32 MiB masks and tiles from the heap, which fragments it: peak RSS grows by hundreds
    of MiB. A fixed 4 MiB threshold gives them their own mappings. Smaller models keep glibc's
    default, which reuses their tensors without page faults."""
    latent_bytes = 4 * cfg.training.batch_size * cfg.training.block_size * cfg.model.n_head * cfg.model.n_latent
    if device.type == "cpu" and latent_bytes > 32 << 20:
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass  # not glibc


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the most memory tensors have held (max_memory_allocated). Elsewhere: the process's peak
    resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return process_status_bytes("VmHWM")
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def tensor_bytes(state) -> int:
    """The bytes of the tensors in nested dicts and lists (a checkpoint, an optimizer's state): about
    their size on disk."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(value) for value in state)
    return 0


MEMINFO, PROCESS_CGROUP, CGROUP_ROOT = Path("/proc/meminfo"), Path("/proc/self/cgroup"), Path("/sys/fs/cgroup")


def available_host_memory() -> int | None:
    """Bytes this process's allocations can get at most: Linux's MemAvailable, or the smallest
    memory limit of its cgroup (a container, a Slurm job) and their parents where that is lower: v2's
    memory.max, v1's memory.limit_in_bytes (its memory controller's own tree; in a container whose
    cgroup is the mount's root, the root's). (The limit, not the room left under it: the page cache
    counted in a cgroup's usage can be reclaimed.) None where /proc/meminfo does not exist."""
    try:
        lines = MEMINFO.read_text().splitlines()
        available = int(next(line for line in lines if line.startswith("MemAvailable:")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return min([available, *cgroup_memory_limits()])


def cgroup_memory_limits():
    """The memory limits of this process's cgroups and their parents, in bytes (v2: "0::/path" and
    memory.max; v1: "4:memory:/path" and memory.limit_in_bytes)."""
    try:
        groups = [line.split(":", 2) for line in PROCESS_CGROUP.read_text().splitlines() if line.count(":") >= 2]
    except OSError:
        return
    for _, controllers, group in groups:
        if not controllers:
            root, limit_file = CGROUP_ROOT, "memory.max"
        elif "memory" in controllers.split(","):
            root, limit_file = CGROUP_ROOT / "memory", "memory.limit_in_bytes"
        else:
            continue
        own = root / group.strip().lstrip("/")
        for folder in [own, *own.parents]:
            if not folder.is_relative_to(root):
                break
            try:
                limit = (folder / limit_file).read_text().strip()
            except OSError:
                continue
            if limit.isdigit():  # (v2's "max": none)
                yield int(limit)


def activation_bytes(cfg, compute_dtype: str, checkpointing: bool) -> int:
    """A lower bound on one process's activations at the peak of a training step. Measured on CPU
    (peak RSS), a step holds about 1.7 (B, H, T, N) tensors per layer for backward plus 3.5 for the
    layer being differentiated (activation checkpointing: about 6 in all, whatever the depth);
    counted here as 1 per layer + 2 (checkpointing: 3), so that no run that fits is refused. Each
    layer also keeps its (H, B, T, T) attention scores, and backward makes one gradient of that size:
    1 per layer + 1 (checkpointing: 2). They outweigh the N-wide tensors once block_size passes N."""
    model, training = cfg.model, cfg.training
    itemsize = DTYPES[compute_dtype].itemsize
    latents = training.batch_size * model.n_head * training.block_size * model.n_latent * itemsize  # one (B, H, T, N)
    scores = training.batch_size * model.n_head * training.block_size ** 2 * itemsize  # one (H, B, T, T)
    if checkpointing:
        return 3 * latents + 2 * scores
    return (model.n_layer + 2) * latents + (model.n_layer + 1) * scores


def check_host_memory(cfg, ranks, compute_dtype: str):
    """On CPU: refuse a run whose weights, gradients, optimizer state and activations (lower bounds)
    exceed the memory available to this machine's processes, rather than let the kernel's OOM
    killer end the run minutes later without a word. Every rank decides on the least memory any of
    them sees, so that all refuse or none."""
    seen = [memory for memory in ranks.gather(available_host_memory()) if memory is not None]
    if not seen:
        return
    available = min(seen)
    n, processes = cfg.model.n_params, int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    shards = ranks.world_size if ranks.sharded else 1  # FSDP: each process builds all weights, then keeps its shard

    def needed(state_bytes_per_parameter):  # AdamW: two float32 moments; AdamW4bit: two 4-bit ones and scales
        return processes * (4 * n + (4 + state_bytes_per_parameter) * n // shards)
    four_bit = cfg.low_precision.use_4bit_optimizer
    need = needed(1 if four_bit else 8)
    training = cfg.training
    activations = processes * activation_bytes(cfg, compute_dtype, training.activation_checkpointing)
    if need <= available < need + activations:
        fix = ("; or set training.activation_checkpointing=true (recomputes each layer in backward)"
               if need + processes * activation_bytes(cfg, compute_dtype, True) <= available else "")
        raise DeviceError(f"a step's activations (batch_size {training.batch_size} x block_size {training.block_size} "
                          f"tokens{f', {processes} processes' * (processes > 1)}) need at least "
                          f"{activations / 2**30:,.1f} GiB beside the {need / 2**30:,.1f} GiB of weights, gradients "
                          f"and optimizer state, and this machine has {available / 2**30:,.1f} GiB available: lower "
                          f"training.batch_size (raising training.gradient_accumulation_steps keeps the tokens per "
                          f"step) or training.block_size{fix}")
    if need <= available:
        return
    cheaper = (" or set low_precision.use_4bit_optimizer=true"  # (FSDP refuses it)
               if not four_bit and not ranks.sharded and needed(1) <= available else "")
    raise DeviceError(f"the model's {n / 1e6:,.0f}M parameters need at least {need / 2**30:,.1f} GiB for weights, "
                      f"gradients and optimizer state{f' ({processes} processes)' * (processes > 1)}, and this "
                      f"machine has {available / 2**30:,.1f} GiB available: make the model smaller (model.n_embd, "
                      f"model.mlp_internal_dim_multiplier; the layers share one set of weights){cheaper}")


def process_status_bytes(field: str) -> int:
    """A memory field of Linux's /proc/self/status (VmRSS, VmHWM), in bytes. (ru_maxrss would carry
    a parent's peak over across exec.)"""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024


# Dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by words of the device name.
# The first match wins, so the more specific names come first.
BF16_PEAK_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.0), ("H100", 989.4),
                    ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0),
                    ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("A6000", 154.8))


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s for MFU, where it comes from): the datasheet's dense bf16 figure for a known GPU
    running bf16 or fp16; otherwise measured once here with large matmuls in that dtype."""
    name = torch.cuda.get_device_name(device)
    if dtype in (torch.bfloat16, torch.float16):
        for key, tflops in BF16_PEAK_TFLOPS:
            if re.search(rf"\b{re.escape(key)}\b", name):
                return tflops * 1e12, f"{name} datasheet dense bf16 peak {tflops:,.0f} TFLOP/s"
    measured = measured_matmul_flops(device, dtype)
    torch.cuda.reset_peak_memory_stats(device)  # the measurement's matrices are not the run's memory
    return measured, f"{name} {str(dtype).removeprefix('torch.')} matmul measured at {measured / 1e12:,.0f} TFLOP/s"


def measured_matmul_flops(device, dtype, n=8192, reps=10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def device_clock(device) -> float:
    """time.perf_counter() once the device has done the work queued so far: a pause in training
    (an evaluation, a checkpoint) timed from here does not take the step's GPU time with it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def out_of_memory(e: BaseException) -> str | None:
    """What an allocation that failed asked for ('78.1 GiB'; '' where the error does not say), or None if `e`
    is not one: CUDA's OutOfMemoryError, the CPU allocator's and MPS's RuntimeErrors."""
    text = str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text):
        return None
    if found := re.search(r"allocate (\d+) bytes", text):
        return f"{int(found[1]) / 2**30:.1f} GiB"
    if found := re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B)", text):
        return found[1]
    return ""


def memory_fix(cfg) -> str:
    """What to lower after an out-of-memory error: the run's settings that decide its memory."""
    training = cfg.training
    fixes = [f"lower training.batch_size {training.batch_size} (raising training.gradient_accumulation_steps keeps the "
             f"tokens per step)", f"training.block_size {training.block_size}", "or the model"]
    if not training.activation_checkpointing:
        fixes[-1] = "the model"
        fixes.append("or set training.activation_checkpointing=true")
    return ", ".join(fixes)
