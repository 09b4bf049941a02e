"""Process-group set-up that works the same under `deepspeed`, `torchrun` and plain `python`.

* plain `python`: RANK/WORLD_SIZE/LOCAL_RANK default to a single process, MASTER_ADDR to
  127.0.0.1 and MASTER_PORT to a free port (else DeepSpeed would look for MPI); a missing
  MASTER_ADDR is an error when the ranks are not all on this node;
* CUDA -> NCCL, one GPU per local rank (LOCAL_RANK modulo the GPUs the process sees);
  CPU -> gloo;
* CPU threads: each rank gets cores / local ranks threads unless OMP_NUM_THREADS is set
  (deepspeed's launcher does not set it, torchrun sets 1 for several local ranks; 2 ranks x all
  cores each ran 3x slower here);
* collectives time out after ``timeout_s`` (default 1 h, DeepSpeed's default is 10 min): rank 0
  alone writes figures, runs the probe and exports at epoch ends while the other ranks wait in
  their next collective;
* decisions that must be the same on every rank are taken once and shared
  (:func:`ranks_where`, :func:`decided_by_main`): one rank stopping alone leaves the others
  waiting in a collective until the timeout;
* DeepSpeed's shared-memory all-reduce op is only used for inference but is JIT-compiled
  (tens of seconds) when DeepSpeed starts on CPU: it is marked unavailable before start-up.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch

from cmunet.training.precision import default_device
from cmunet.training.rendezvous import RendezvousError


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


def init_distributed(timeout_s: float = 3600,
                     stop_requested: Callable[[], object] | None = None) -> DistInfo:
    """Initialise (or join) the process group through DeepSpeed and return this rank's place;
    a collective that waits longer than ``timeout_s`` seconds fails. A rendezvous that cannot
    happen (rank 0's port in use, no rank 0 within $CMUNET_CONNECT_TIMEOUT_S, or
    ``stop_requested()`` true while a rank waits for it) raises :class:`RendezvousError` with a
    one-line message."""
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    world = int(os.environ["WORLD_SIZE"])
    if "MASTER_ADDR" not in os.environ:
        if world > 1 and local_world_size() != world:  # several nodes, or cannot tell
            raise RendezvousError(
                f"WORLD_SIZE={world} but MASTER_ADDR is not set and this node runs "
                f"{local_world_size()} of the ranks: set MASTER_ADDR to rank 0's host name or "
                "address (127.0.0.1 would leave every node waiting for itself)")
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise RendezvousError("WORLD_SIZE > 1 but MASTER_PORT is not set; use a launcher "
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

        backend = "nccl" if device.type == "cuda" else "gloo"
        init_process_group(backend, timedelta(seconds=timeout_s), stop_requested)
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                    int(os.environ["LOCAL_RANK"]), device)


def _skip_inference_allreduce_op() -> None:
    # deepspeed.ops caches which ops can be built in a module-level dict meant to be edited
    # (see deepspeed/ops/__init__.py); training uses torch.distributed's gloo all-reduce.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def ranks_where(flag: bool) -> list[int]:
    """The ranks on which ``flag`` is true; every rank gets the same list (one all-reduce)."""
    if not _active():
        return [0] if flag else []
    dist = torch.distributed
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    flags = torch.zeros(dist.get_world_size(), device=device)
    flags[dist.get_rank()] = float(flag)
    dist.all_reduce(flags)
    return [rank for rank, value in enumerate(flags.tolist()) if value]


def decided_by_main(decide: Callable[[], Any]) -> Any:
    """``decide()`` run on rank 0 only, its result (or its error, raised on every rank) shared
    with all ranks: one answer where ranks could see different things (a shared file system)."""
    if not _active() or torch.distributed.get_world_size() == 1:
        return decide()
    box: list = [None]
    if torch.distributed.get_rank() == 0:
        try:
            box[0] = ("result", decide())
        except Exception as err:  # the other ranks must not wait for an answer that never comes
            box[0] = ("error", err)
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown(wait: bool = True) -> None:
    """Destroy the process group (leaving it to interpreter exit aborts sporadically).
    ``wait=False`` after an error: the other ranks may never reach a barrier."""
    if torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        ds = sys.modules.get("deepspeed.comm")
        if ds is not None and ds.is_initialized():
            ds.destroy_process_group()  # also drops DeepSpeed's cached groups: a later init works
        else:
            torch.distributed.destroy_process_group()
