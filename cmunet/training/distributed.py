"""Process-group set-up that works the same under `deepspeed`, `torchrun` and plain `python`.

* plain `python`: RANK/WORLD_SIZE/LOCAL_RANK default to a single process, MASTER_ADDR to
  127.0.0.1 and MASTER_PORT to a free port (else DeepSpeed would look for MPI);
* CUDA -> NCCL, one GPU per local rank; CPU -> gloo;
* CPU threads: each rank gets cores / local ranks threads unless OMP_NUM_THREADS is set
  (deepspeed's launcher does not set it, torchrun sets 1 for several local ranks; 2 ranks x all
  cores each ran 3x slower here);
* DeepSpeed's shared-memory all-reduce op is only used for inference but is JIT-compiled
  (tens of seconds) when DeepSpeed starts on CPU: it is marked unavailable before start-up.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from cmunet.training.precision import default_device


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_world_size() -> int:
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun, deepspeed launcher
        if name in os.environ:
            return int(os.environ[name])
    return 1


def set_cpu_threads() -> int:
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    threads = max(1, len(os.sched_getaffinity(0)) // local_world_size())
    torch.set_num_threads(threads)
    return threads


def init_distributed() -> DistInfo:
    """Initialise (or join) the process group through DeepSpeed and return this rank's place."""
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set; use a launcher "
                               "(deepspeed, torchrun) or set MASTER_ADDR and MASTER_PORT")
        os.environ["MASTER_PORT"] = str(free_port())
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        set_cpu_threads()
        _skip_inference_allreduce_op()
    if not torch.distributed.is_initialized():
        from cmunet.training.rendezvous import init_process_group  # listeners on MASTER_ADDR only

        init_process_group("nccl" if device.type == "cuda" else "gloo")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                    int(os.environ["LOCAL_RANK"]), device)


def _skip_inference_allreduce_op() -> None:
    # deepspeed.ops caches which ops can be built in a module-level dict meant to be edited
    # (see deepspeed/ops/__init__.py); training uses torch.distributed's gloo all-reduce.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown(wait: bool = True) -> None:
    """Destroy the process group (leaving it to interpreter exit aborts sporadically).
    ``wait=False`` after an error: the other ranks may never reach a barrier."""
    if torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
