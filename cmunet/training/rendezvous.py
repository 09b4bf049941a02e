"""The process group's listeners bound to MASTER_ADDR only, not to every interface.

torch's rendezvous store (TCPStore) listens on every interface of rank 0's machine, whatever
MASTER_ADDR says. :func:`init_process_group` opens the store's socket itself, bound to the
address MASTER_ADDR resolves to (127.0.0.1 for one machine, the default of plain ``python`` and
``deepspeed`` on one node), and hands it to the store. With a loopback MASTER_ADDR the gloo and
NCCL transports are also put on the loopback interface (``GLOO_SOCKET_IFNAME`` /
``NCCL_SOCKET_IFNAME``, unless set). Under torchrun the store is torchrun's own (its agent
already listens on MASTER_PORT): this module then leaves the rendezvous to torch; see
docs/multinode.md for binding torchrun's endpoint.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket

import torch


def loopback_interface() -> str | None:
    """The name of the interface holding 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    try:
        import psutil
    except ImportError:
        return "lo"
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    return None


def _resolve(host: str, port: int) -> tuple[int, str]:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return family, address[0]


def init_process_group(backend: str, timeout: datetime.timedelta | None = None) -> bool:
    """Initialise torch.distributed from RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT with the
    store bound to MASTER_ADDR's address; False (nothing done) under torchrun's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return False
    timeout = timeout or datetime.timedelta(minutes=30)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    family, address = _resolve(host, port)
    if ipaddress.ip_address(address).is_loopback:
        interface = loopback_interface()
        if interface:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    listen_fd = None
    if rank == 0:
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((address, port))
        server.listen(max(128, world))
        listen_fd = server.detach()  # the store owns the socket from here on
    store = torch.distributed.TCPStore(host, port, world, rank == 0, timeout,
                                       wait_for_workers=False, master_listen_fd=listen_fd)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world,
                                         timeout=timeout)
    return True
