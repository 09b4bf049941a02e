"""A rendezvous port in use: one line naming the port and the fix, exit 2, no traceback.

``deepspeed`` and torch default to 127.0.0.1:29500, so a second job on one machine finds the port
taken. Rank 0 cannot listen there; the other ranks find no store and must not wait without end.
``.ci/run`` holds 29500 for the whole ``make test`` so that every test proves it picks its own.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from cmunet.training import rendezvous
from cmunet.training.distributed import free_port
from conftest import ROOT

DEFAULT_PORT = 29500
BIN = Path(sys.executable).parent
TINY = ["--config", str(ROOT / "configs/pretrain/cmunet-cpu.yaml"), "view_size=64",
        "model.width=8", "data.num_workers=1", "train.micro_batch=4", "train.epochs=1"]
BUSY = f"error: port {DEFAULT_PORT} on 127.0.0.1 is in use (another job?): " \
       f"{rendezvous.PORT_FIX}"


@contextmanager
def listening(port: int):
    """A socket listening on 127.0.0.1:port that never answers; nothing when the port is
    already taken (by ``.ci/run``'s holder or another job: taken either way)."""
    server = socket.socket()
    try:
        server.bind(("127.0.0.1", port))
        server.listen()
    except OSError as err:
        server.close()
        if err.errno != errno.EADDRINUSE:
            raise
        server = None
    try:
        yield port
    finally:
        if server is not None:
            server.close()


@pytest.fixture
def held_default_port():
    with listening(DEFAULT_PORT) as port:
        yield port


@pytest.fixture(autouse=True)
def connect_threads_end():
    """A rank that gave up leaves torch's connecting thread behind (a process exits there): it
    ends here within its timeout, so that torch's messages stay in this test's output."""
    yield
    for thread in threading.enumerate():
        if thread.name == "cmunet-store-connect":
            thread.join(15)


@pytest.fixture
def rank_env():
    """Sets this process's rank variables; the environment is restored afterwards (the
    rendezvous also sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)."""
    saved = dict(os.environ)

    def set_env(rank: int, world: int, port: int) -> None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)

    yield set_env
    os.environ.clear()
    os.environ.update(saved)


def test_rank0_names_the_busy_port_and_the_fix(held_default_port, rank_env):
    rank_env(0, 2, held_default_port)
    with pytest.raises(rendezvous.RendezvousError) as err:
        rendezvous.init_process_group("gloo")
    assert str(err.value) == BUSY[len("error: "):]


def test_other_rank_gives_up_on_a_port_that_is_not_a_store(rank_env, monkeypatch):
    """A listener that accepts and never answers (what holds a busy port) is not waited for
    longer than $CMUNET_CONNECT_TIMEOUT_S (+1 s)."""
    monkeypatch.setenv(rendezvous.CONNECT_ENV, "2")
    with listening(free_port()) as port:
        rank_env(1, 2, port)
        start = time.monotonic()
        with pytest.raises(rendezvous.RendezvousError) as err:
            rendezvous.init_process_group("gloo")
        waited = time.monotonic() - start
    assert f"rank 1 found no process-group store at 127.0.0.1:{port} within 2 s" in str(err.value)
    assert rendezvous.PORT_FIX in str(err.value) and waited < 10


def test_other_rank_stops_waiting_on_a_stop_request(rank_env, monkeypatch):
    monkeypatch.setenv(rendezvous.CONNECT_ENV, "1")
    with listening(free_port()) as port:
        rank_env(1, 2, port)
        start = time.monotonic()
        with pytest.raises(rendezvous.RendezvousError, match="stopped by a signal"):
            rendezvous.init_process_group("gloo", stop_requested=lambda: True)
    assert time.monotonic() - start < 5


def test_connect_timeout_is_bounded_by_the_collective_timeout(monkeypatch):
    from datetime import timedelta

    monkeypatch.delenv(rendezvous.CONNECT_ENV, raising=False)
    assert rendezvous.connect_timeout_s(timedelta(hours=1)) == rendezvous.CONNECT_TIMEOUT_S
    assert rendezvous.connect_timeout_s(timedelta(seconds=20)) == 20
    monkeypatch.setenv(rendezvous.CONNECT_ENV, "soon")
    with pytest.raises(rendezvous.RendezvousError, match="not a number"):
        rendezvous.connect_timeout_s(timedelta(hours=1))


def pretrain(cmd: list, cwd: Path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**environment, "OMP_NUM_THREADS": "1", **env})


def test_plain_python_with_a_busy_master_port_exits_2_in_one_line(held_default_port, tiny_shards,
                                                                  tmp_path):
    result = pretrain([sys.executable, ROOT / "launch/pretrain.py", *TINY,
                       f"data.shards={tiny_shards}", "out=OUT"], tmp_path,
                      MASTER_PORT=str(held_default_port))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert BUSY in result.stderr.splitlines() and "Traceback" not in result.stderr


@pytest.mark.slow
def test_deepspeed_without_master_port_on_a_busy_29500(held_default_port, tiny_shards,
                                                       tmp_path):
    """The README's single-node command while 29500 is taken: rank 0's line, exit 2, and rank 1
    ends when the launcher stops it instead of waiting for a store that never comes."""
    start = time.monotonic()
    result = pretrain([BIN / "deepspeed", "--num_gpus", "2", ROOT / "launch/pretrain.py", *TINY,
                       f"data.shards={tiny_shards}", "out=OUT"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-5000:]
    assert BUSY in output.splitlines() and "Traceback" not in output
    assert time.monotonic() - start < 240
