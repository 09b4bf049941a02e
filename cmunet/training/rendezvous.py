"""The process group's listeners bound to MASTER_ADDR only, not to every interface.

torch's rendezvous store (TCPStore) listens on every interface of rank 0's machine, whatever
MASTER_ADDR says. :func:`init_process_group` opens the store's socket itself, bound to the
address MASTER_ADDR resolves to (127.0.0.1 for one machine, the default of plain ``python`` and
``deepspeed`` on one node), and hands it to the store. With a loopback MASTER_ADDR the gloo and
NCCL transports are also put on the loopback interface (``GLOO_SOCKET_IFNAME`` /
``NCCL_SOCKET_IFNAME``, unless set). Under torchrun the store is torchrun's own (its agent
already listens on MASTER_PORT): this module then leaves the rendezvous to torch; see
docs/multinode.md for binding torchrun's endpoint.

A rendezvous that cannot happen ends in one line (:class:`RendezvousError`, exit 2 in
``cmunet-pretrain``) instead of a traceback or a wait without end: rank 0 names the port when it
is taken (``deepspeed`` and torch use 29500 unless told otherwise, so two jobs on one machine
collide there); another rank names rank 0's address when no store answers there within
``$CMUNET_CONNECT_TIMEOUT_S`` seconds (default 300, at most the collective timeout).
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import socket
import threading
import time
from typing import Callable

import torch

CONNECT_ENV = "CMUNET_CONNECT_TIMEOUT_S"
CONNECT_TIMEOUT_S = 300.0  # how long a rank other than 0 looks for rank 0's store
PORT_FIX = "pass --master_port PORT to deepspeed, or MASTER_PORT=PORT"


class RendezvousError(RuntimeError):
    """The process group's store could not be opened (rank 0) or reached (the other ranks)."""


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


def connect_timeout_s(timeout: datetime.timedelta) -> float:
    """Seconds a rank other than 0 waits for rank 0's store: $CMUNET_CONNECT_TIMEOUT_S (default
    300), never more than the collective timeout."""
    value = os.environ.get(CONNECT_ENV, "")
    try:
        seconds = float(value) if value else CONNECT_TIMEOUT_S
    except ValueError:
        raise RendezvousError(f"{CONNECT_ENV}={value!r} is not a number of seconds") from None
    return max(1.0, min(seconds, timeout.total_seconds()))


def _listen(family: int, address: str, port: int, backlog: int) -> int:
    """A socket listening on (address, port), as a file descriptor for the store."""
    server = socket.socket(family, socket.SOCK_STREAM)
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((address, port))
        server.listen(backlog)
    except OSError as err:
        server.close()
        if err.errno == errno.EADDRINUSE:
            raise RendezvousError(f"port {port} on {address} is in use (another job?): "
                                  f"{PORT_FIX}") from None
        raise RendezvousError(f"rank 0 cannot listen on {address}:{port} (MASTER_ADDR, "
                              f"MASTER_PORT): {err.strerror or err}") from None
    return server.detach()  # the store owns the socket from here on


def _reach_store(host: str, port: int, world: int, rank: int, wait_s: float,
                 stop_requested: Callable[[], object] | None) -> torch.distributed.TCPStore:
    """The client of rank 0's store. torch retries a refused connection until its timeout, but
    a port held by something that is not a store (the reason rank 0 could not bind it) accepts
    the connection and never answers the handshake: the store is built in a thread, waited for
    here at most ``wait_s`` seconds (and while no stop is requested)."""
    box: dict = {}

    def connect() -> None:
        try:
            box["store"] = torch.distributed.TCPStore(
                host, port, world, False, datetime.timedelta(seconds=wait_s),
                wait_for_workers=False)
        except Exception as err:  # DistNetworkError, DistStoreError ...
            box["error"] = err

    thread = threading.Thread(target=connect, name="cmunet-store-connect", daemon=True)
    thread.start()
    deadline = time.monotonic() + wait_s + 1  # torch's own timeout first, when it ends
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.2)
        if stop_requested is not None and stop_requested():
            raise RendezvousError(f"rank {rank} stopped by a signal while waiting for rank 0's "
                                  f"store at {host}:{port}")
    if "store" in box:
        return box["store"]
    raise RendezvousError(
        f"rank {rank} found no process-group store at {host}:{port} within {wait_s:.0f} s "
        f"(rank 0 not started, or it failed: see its output; a port in use by another job: "
        f"{PORT_FIX}; a slower start: {CONNECT_ENV}=SECONDS)")


def init_process_group(backend: str, timeout: datetime.timedelta | None = None,
                       stop_requested: Callable[[], object] | None = None) -> bool:
    """Initialise torch.distributed from RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT with the
    store bound to MASTER_ADDR's address; False (nothing done) under torchrun's agent store.
    Raises :class:`RendezvousError` when rank 0 cannot listen on the port, or another rank finds
    no store there in time (or ``stop_requested()`` turns true while it looks)."""
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
    if rank == 0:
        store = torch.distributed.TCPStore(host, port, world, True, timeout,
                                           wait_for_workers=False,
                                           master_listen_fd=_listen(family, address, port,
                                                                    max(128, world)))
    else:
        store = _reach_store(host, port, world, rank, connect_timeout_s(timeout), stop_requested)
        store.set_timeout(timeout)  # the connection's timeout above; the collectives' from here
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world,
                                         timeout=timeout)
    return True
