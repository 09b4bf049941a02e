"""Every listener the toolkit opens is bound to 127.0.0.1 on one machine; the local Ray of the
search listens on 127.0.0.1 only and requires a token as well (other users of the machine reach
127.0.0.1 too)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

RANK = """
import psutil, torch
from cmunet.training.distributed import init_distributed, shutdown
info = init_distributed()
value = torch.ones(1)
torch.distributed.all_reduce(value)
listening = {c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == "LISTEN"}
print(info.rank, int(value.item()), sorted(listening), flush=True)
shutdown()
"""


def test_two_ranks_listen_on_loopback_only():
    from cmunet.training.distributed import free_port

    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    ranks = [subprocess.Popen([sys.executable, "-c", RANK], env={**env, "RANK": str(r),
                              "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
             for r in (0, 1)]
    lines = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0]
    assert lines == ["0 2 ['127.0.0.1']", "1 2 ['127.0.0.1']"]  # store (rank 0) and gloo


CLIENT = """
import ray
try:
    ray.init(address="{address}", logging_level="ERROR")
    print("connected")
except Exception as err:
    print("refused:", type(err).__name__)
"""


def other_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback ones."""
    return [a.address for addresses in psutil.net_if_addrs().values() for a in addresses
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}  # gRPC's IPv6 sockets show 127.0.0.1 IPv4-mapped


def test_the_local_ray_listens_on_loopback_only_and_requires_a_token(tmp_path, monkeypatch):
    import ray

    from cmunet.training.ray_local import ray_session
    from cmunet.training.tune_config import SearchConfig

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no token file of the user is used or written
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
    with ray_session(SearchConfig(num_cpus=1, temp_dir=temp)):
        address = ray.get_runtime_context().gcs_address
        token = os.environ["RAY_AUTH_TOKEN"]
        assert os.environ["RAY_AUTH_MODE"] == "token" and len(token) == 64
        assert address.startswith("127.0.0.1:")
        session = Path(temp, "ray", "session_latest").resolve()  # Ray's folders: this user's only
        assert {stat.S_IMODE(os.stat(p).st_mode) for p in (temp, Path(temp, "ray"), session,
                                                            session / "sockets")} == {0o700}
        worker = ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker process listens too
        me = psutil.Process()
        ray_pids = {me.pid} | {p.pid for p in me.children(recursive=True)}  # driver, GCS, raylet,
        listening = {(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("inet")
                     if c.status == "LISTEN" and c.pid in ray_pids}   # agents, workers
        assert {pid for _, _, pid in listening} >= {me.pid, worker}
        assert len(listening) >= 4 and {ip for ip, _, _ in listening} <= LOOPBACK, listening
        for ip in other_addresses():  # from another machine: nothing answers
            for _, port, _ in listening:
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((ip, port), timeout=10).close()
        answers = {}
        for name, extra in {"no token": {}, "wrong token": {"RAY_AUTH_TOKEN": "0" * 64},
                            "the token": {"RAY_AUTH_TOKEN": token}}.items():
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
            env.update({"RAY_AUTH_MODE": "token", "HOME": str(tmp_path / "other"), **extra,
                        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})  # keep 127.0.0.1 as given
            out = subprocess.run([sys.executable, "-c", CLIENT.format(address=address)], env=env,
                                 capture_output=True, text=True, timeout=120).stdout
            answers[name] = out.strip().splitlines()[-1] if out.strip() else "nothing"
    assert answers["the token"] == "connected", answers
    assert answers["no token"].startswith("refused") and answers["wrong token"].startswith(
        "refused"), answers
    assert not (tmp_path / ".ray").exists() and "RAY_AUTH_TOKEN" not in os.environ
    shutil.rmtree(temp, ignore_errors=True)
