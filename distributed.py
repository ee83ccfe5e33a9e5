"""Several processes under torchrun: DistributedDataParallel or FSDP2, NCCL on CUDA, gloo on CPU.

    torchrun --standalone --nproc_per_node=N train.py --config X

`python train.py` is one process and none of this applies. Under torchrun every rank builds the
same model from the same seed; with `training.distributed: ddp` each holds all of it and gradients
are averaged, with `fsdp` (torch.distributed.fsdp.fully_shard) each holds 1/N of every weight,
gradient and AdamW state and weights are gathered for each forward. Either way a rank reads only
its own readers' part of the data, and rank 0 alone prints and writes the run directory.
Checkpoints hold full, unsharded tensors (the layout of MODEL.md), so any world size, a single
process and sample.py read them.
"""
import datetime
import logging
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from files import tell_torchrun
from runtime import first_line, last_line, shortened


class DistributedError(Exception):
    pass


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "single"  # single | ddp | fsdp
    cpu_group: object = None  # gloo beside NCCL, for collectives of CPU tensors (None: the default group is gloo)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:  # FSDP: each rank holds a shard of every weight
        return self.enabled and self.mode == "fsdp"

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def total(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def lowest(self, value: float, device) -> float:
        if not self.enabled:
            return value
        values = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
        return values.item()

    def any(self, flag: bool, device) -> bool:
        return bool(self.total(torch.tensor([float(flag)], device=device)).item()) if self.enabled else flag

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def several_processes() -> bool:
    """Whether torchrun started more than one process (by its environment, before the process group)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def first_process() -> bool:
    """Whether this is rank 0, or the only process, by torchrun's environment (before the process group)."""
    return os.environ.get("RANK", "0") == "0"


def start(cfg, device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes in the environment; (ranks, this rank's device)."""
    training = cfg.training
    if not several_processes():  # (config.unused_settings notes the settings for several)
        return Ranks(), device
    if missing := [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]:
        world = os.environ["WORLD_SIZE"]
        named = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        raise DistributedError(f"WORLD_SIZE={world} is set, but {named} "
                               f"{'is' if len(missing) == 1 else 'are'} not: start the processes with torchrun "
                               f"(torchrun --nproc_per_node=N train.py ...), or unset WORLD_SIZE for one process")
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                  int(os.environ.get("LOCAL_RANK", 0)), training.distributed)
    if not 0 <= ranks.rank < ranks.world_size:
        raise DistributedError(f"RANK={ranks.rank} with WORLD_SIZE={ranks.world_size}: a rank is 0 to WORLD_SIZE - 1; "
                               f"start the processes with torchrun, which numbers them")
    if device.type == "mps":
        raise DistributedError("torchrun with training.device mps: no distributed backend runs "
                               "on mps; set training.device=cpu or use CUDA GPUs")
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {ranks.local_rank} has no GPU: this node has "
                                   f"{torch.cuda.device_count()}; lower --nproc_per_node")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=training.distributed_timeout_s)
    _JOINED.append(ranks.rank)
    try:
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as e:  # (dist.DistError is a RuntimeError)
        raise joining_failure(e, ranks, training.distributed_timeout_s) from None
    if backend == "nccl":
        try:
            ranks.cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        except Exception as e:  # gloo connects every pair of ranks now, by the address of each hostname
            raise DistributedError(f"gloo (which carries the stop signal's vote between the ranks) "
                                   f"could not connect them ({first_line(e)[:200]}); set GLOO_SOCKET_IFNAME to the "
                                   f"network interface between the nodes (`ip addr` lists them)")
    if not ranks.main:  # only rank 0 prints; errors (stderr) still come from every rank
        sys.stdout = open(os.devnull, "w")
    return ranks, device


_JOINED = []  # start() joined a process group: its threads live until the process ends (stopping.exit_with)
_PEERS_LOST = []  # a collective, or joining, failed: the process group cannot be torn down cleanly


def joining_failure(e: Exception, ranks: Ranks, timeout_s: int) -> DistributedError:
    """The line for init_process_group's failure: the others did not come (a consequence, like a
    lost peer), the address is taken, or another problem in torchrun's settings."""
    text = shortened(last_line(e), 200)
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return DistributedError(f"the rendezvous address is taken ({text}): another job holds its port; set another "
                                f"MASTER_PORT (with torchrun: --master_port, or --rdzv-endpoint HOST:PORT)")
    if not isinstance(e, dist.DistError) or not any(s in text.lower() for s in ("timeout", "timed out", "connect")):
        return DistributedError(f"the process group could not start ({text}); check torchrun's "
                                f"settings (--nproc_per_node, --nnodes, the rendezvous endpoint)")
    _PEERS_LOST.append(ranks.rank)
    return DistributedError(f"joining the other ranks failed ({text}): a rank that failed to start "
                            f"has its error above (none if it hangs, or a signal killed it); they wait at most "
                            f"training.distributed_timeout_s = {timeout_s} s for each other; every node must run the "
                            f"same command, with the same --rdzv-endpoint (or --master_addr and --master_port)")


def failed(line: str, consequence: bool = False) -> int:
    """The exit status of a run that `line` says failed, printed (and under torchrun, given to its
    summary; `consequence`: of another rank's failure)."""
    print(line, file=sys.stderr)
    tell_torchrun(line, consequence)
    return 1


def joined() -> bool:
    """Whether start() joined a process group (stopping.exit_with ends such a process at once)."""
    return bool(_JOINED)


def peers_lost() -> bool:
    """Whether this rank failed because another did (a collective, or joining them, failed)."""
    return bool(_PEERS_LOST)


def shutdown():
    if dist.is_initialized() and not _PEERS_LOST:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """The module the training step calls. FSDP shards `model` in place (its parameters become
    DTensors: build the optimizer afterwards); DDP wraps it and keeps `model` as the inner module.
    The shared encoder/encoder_v/decoder stay one parameter each, used by every layer."""
    if ranks.sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        # an explicit mesh: FSDP's default is a CUDA one whenever a GPU exists, even for a CPU run
        fully_shard(model, mesh=init_device_mesh(device.type, (ranks.world_size,)))
        return model
    if ranks.enabled:
        from torch.nn.parallel import DistributedDataParallel
        # torch.compile of DDP's forward skips its profiler label and warns, once per rank: not a problem
        logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(
            lambda record: "Profiler record function" not in record.getMessage())
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def gradient_sync(wrapped: torch.nn.Module, ranks: Ranks, sync: bool):
    """Context for one micro-step: gradients are reduced across ranks only when `sync` (the last
    micro-step of an optimizer step); the others accumulate locally."""
    if ranks.sharded:
        wrapped.set_requires_gradient_sync(sync)
        return nullcontext()
    if ranks.enabled and not sync:
        return wrapped.no_sync()
    return nullcontext()


@contextmanager
def full_weights(model: torch.nn.Module, ranks: Ranks):
    """Whole weights on every rank for code that reads them outside forward() (generation)."""
    if ranks.sharded:
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on the CPU (all ranks must call; under torchrun only rank
    0 gets it, the others empty dicts: only rank 0 writes). The optimizer state is keyed by
    parameter name, the same in every mode, so a checkpoint moves between a single process, DDP and
    FSDP of any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # 1 s to import
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


def load_full_weights(model, model_state: dict):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))


def communication_failure(e: BaseException, ranks: Ranks, timeout_s: int, resume: str | None = None) -> str | None:
    """A clear line for a collective that timed out or lost its peer; None for other errors.
    `resume`: the command that resumes from the run's newest checkpoint (None: none saved)."""
    text = str(e)
    if not ranks.enabled or not isinstance(e, (RuntimeError, dist.DistError)):
        return None
    if not any(s in text.lower() for s in ("timed out", "timeout", "connection closed", "connection reset",
                                           "nccl", "broken pipe", "processgroup", "read error", "write error")):
        return None
    _PEERS_LOST.append(ranks.rank)
    return (f"communication with the other ranks failed ({shortened(last_line(e), 200)}): if another rank died, hangs or "
            f"refused to start, its error is above (none if a signal killed it, as the kernel's out-of-memory "
            f"killer does; a collective waits at most training.distributed_timeout_s = {timeout_s} s); once that is "
            f"fixed, " + (f"resume with `{resume}`" if resume else "run the same command again (no checkpoint was saved)"))
