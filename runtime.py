"""What every script needs to run on this machine: the device, the compute dtype, host memory."""
import ctypes
from contextlib import nullcontext

import torch

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


def autocast(device: torch.device, compute_dtype: str):
    """The autocast context of low_precision.compute_dtype (float32: none)."""
    dtype = DTYPES[compute_dtype]
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
