"""Several nodes, simulated on one machine (the recipes of docs/multinode.md):

* torchrun with two "nodes" (``--nnodes 2 --node_rank 0|1 --nproc-per-node 1``, one c10d
  rendezvous on 127.0.0.1): pre-training, resume, and an export equal to the single-node 2-rank
  run's;
* DeepSpeed's multi-node launch without ssh (a two-host hostfile, ``--no_ssh --node_rank``);
* a Ray cluster of a head and a second node (``ray start --head`` / ``ray start --address``, token
  authentication, separate temp dirs) running the search, with trials on both nodes;
* one MLflow server receiving the pre-training, the search and both registries.

Every listener is on 127.0.0.1 (except torchrun's and Ray's own, which listen on every interface,
see docs/multinode.md); every process started here is stopped here, by its id.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_PRETRAIN
from cmunet.training.distributed import free_port
from cmunet.training.rendezvous import loopback_interface

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TINY = [*TINY_PRETRAIN, "train.epochs=1", "train.steps_per_epoch=2",
        "train.checkpoint_every=1", "train.log_every=1", "train.figure_every=100",
        "data.ratio=50-30"]
# one thread per rank, gloo on the loopback interface (torchrun leaves the store to its agent, so
# cmunet does not choose the interface there): the same arithmetic in every run
ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": loopback_interface() or "lo"}


def start(cmd, cwd, log: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env={**os.environ, **ENV, **env},
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(process: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate ``process`` and every process it started (by their ids), then reap them."""
    try:
        tree = [psutil.Process(process.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        p.kill()
    process.wait(timeout=timeout)


def finish(processes, logs, timeout=600) -> str:
    """Wait for every process; all must exit with 0. Returns their logs."""
    deadline = time.monotonic() + timeout
    try:
        for p in processes:
            p.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for p in processes:
            if p.poll() is None:
                stop(p)
    text = "\n".join(f"==== {log.name}\n{log.read_text()}" for log in logs)
    assert all(p.returncode == 0 for p in processes), text[-8000:]
    return text


def torchrun_nodes(shards, out, cwd: Path, tag: str, *extra) -> str:
    """Two torchrun "nodes" of one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    processes, logs = [], []
    for node in (0, 1):
        logs.append(cwd / f"{tag}-node{node}.log")
        processes.append(start([BIN / "torchrun", "--nnodes", "2", "--node_rank", node,
                                "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                "--rdzv-endpoint", endpoint, "--rdzv-id", f"cmunet-{tag}",
                                ROOT / "launch/pretrain.py", *TINY, f"data.shards={shards}",
                                f"out={out}", *extra], cwd, logs[-1]))
    return finish(processes, logs)


def export_of(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "export" / "model.safetensors")


def assert_same_export(a: dict, b: dict) -> None:
    """Equal to float32 round-off. With two ranks the gradient all-reduce adds two numbers, and
    a + b == b + a exactly, so the node layout cannot change the reduction order; each rank runs
    one thread (OMP_NUM_THREADS=1) on the same data, so the runs should agree bit for bit. The
    tolerance (1e-6 absolute, 1e-5 relative: that of the resume test in test_pretrain_job.py) only
    leaves room for a kernel that picks another summation order on another machine."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def steps(out: Path) -> list[int]:
    with (out / "log.csv").open() as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


# ---- shared pieces -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free port of 127.0.0.1 with a SQLite store and served artifacts."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = start([BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", port,
                    "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                    "--artifacts-destination", folder / "artifacts", "--workers", 1],
                   folder, folder / "server.log", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                   MLFLOW_DISABLE_TELEMETRY="true")
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the MLflow server did not start in 120 s"
                time.sleep(0.5)
        yield uri
    finally:
        stop(server)


@pytest.fixture(scope="module")
def one_node(tiny_shards, tmp_path_factory) -> Path:
    """The reference: one node, two ranks (torchrun --nproc-per-node 2)."""
    cwd = tmp_path_factory.mktemp("one-node")
    log = cwd / "one-node.log"
    finish([start([BIN / "torchrun", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend",
                   "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                   ROOT / "launch/pretrain.py", *TINY, f"data.shards={tiny_shards}", "out=OUT",
                   f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}"], cwd, log)], [log])
    return cwd / "OUT"


@pytest.fixture(scope="module")
def two_nodes(tiny_shards, mlflow_server, tmp_path_factory) -> tuple[Path, str]:
    """Pre-training on two torchrun "nodes", logged and registered on the MLflow server."""
    cwd = tmp_path_factory.mktemp("two-nodes")
    text = torchrun_nodes(tiny_shards, "OUT", cwd, "first", f"tracking.uri={mlflow_server}")
    return cwd, text


# ---- pre-training --------------------------------------------------------------------------------

def test_torchrun_two_nodes_resume_and_match_one_node(two_nodes, one_node, tiny_shards,
                                                      mlflow_server):
    cwd, text = two_nodes
    out = cwd / "OUT"
    assert "2 rank(s) on cpu" in text and "global batch 4 x 1 x 2 = 8" in text
    assert steps(out) == [1, 2] == steps(one_node)
    first = export_of(out)
    assert_same_export(first, export_of(one_node))
    # a job killed after step 1's checkpoint: relaunching both nodes resumes from it
    shutil.rmtree(out / "checkpoints" / "step_00000002")
    shutil.rmtree(out / "export")
    text = torchrun_nodes(tiny_shards, "OUT", cwd, "resume", f"tracking.uri={mlflow_server}")
    assert f"resuming from {Path('OUT') / 'checkpoints' / 'step_00000001'}" in text
    assert steps(out) == [1, 2]
    assert_same_export(export_of(out), first)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("cmunet-pretrain").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["resolved.world_size"] == "2"
    assert runs[0].info.status == "FINISHED"  # the resumed run continued the same MLflow run
    versions = client.search_model_versions("name='cmunet-pretrain'")
    assert {v.run_id for v in versions} == {runs[0].info.run_id} and len(versions) == 2


def test_deepspeed_two_nodes_without_ssh_match_one_node(one_node, tiny_shards, tmp_path):
    """deepspeed --hostfile (two hosts) --no_ssh --node_rank N: one launcher per node, as a
    scheduler would start them; no ssh, no pdsh."""
    (tmp_path / "hostfile").write_text("node-0 slots=1\nnode-1 slots=1\n")
    port = free_port()
    processes, logs = [], []
    for node in (0, 1):
        logs.append(tmp_path / f"deepspeed-node{node}.log")
        processes.append(start([BIN / "deepspeed", "--hostfile", "hostfile", "--no_ssh",
                                "--node_rank", node, "--master_addr", "127.0.0.1",
                                "--master_port", port, ROOT / "launch/pretrain.py", *TINY,
                                f"data.shards={tiny_shards}", "out=OUT",
                                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                               tmp_path, logs[-1]))
    text = finish(processes, logs)
    assert "nnodes=2, num_local_procs=1, node_rank=1" in text and "2 rank(s) on cpu" in text
    assert steps(tmp_path / "OUT") == [1, 2]
    assert_same_export(export_of(tmp_path / "OUT"), export_of(one_node))


# ---- the search on a Ray cluster -----------------------------------------------------------------

def ray_node(temp_dir: Path, log: Path, env: dict, head_port: int, head: bool):
    """``ray start --block`` for the head or a second node, every port chosen free (two nodes on
    one machine must not share Ray's fixed default ports, nor those of another Ray here)."""
    ports = {flag: free_port() for flag in ("--node-manager-port", "--object-manager-port",
                                            "--dashboard-agent-grpc-port",
                                            "--dashboard-agent-listen-port",
                                            "--runtime-env-agent-port", "--metrics-export-port")}
    where = (["--head", "--port", head_port, "--include-dashboard", "false"] if head
             else ["--address", f"127.0.0.1:{head_port}"])
    return start([BIN / "ray", "start", "--block", *where, "--node-ip-address", "127.0.0.1",
                  "--num-cpus", 1, "--num-gpus", 0, "--object-store-memory", 100_000_000,
                  "--temp-dir", temp_dir, "--disable-usage-stats",
                  *[x for item in ports.items() for x in item]], temp_dir.parent, log, **env)


def wait_started(process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def alive_nodes(env: dict, address: str) -> subprocess.CompletedProcess:
    """A client that joins the cluster and counts its live nodes (prints the count)."""
    code = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items()
                                  if not k.startswith("RAY_AUTH")}, **env}, timeout=120)


def test_search_on_a_two_node_ray_cluster_logs_to_the_mlflow_server(two_nodes, tiny_shards,
                                                                     mlflow_server, tmp_path):
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    base = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = []
    try:
        for name in ("head", "node2"):
            (base / name).mkdir()
            nodes.append(ray_node(base / name, base / f"{name}.log", env, port,
                                  head=name == "head"))
            wait_started(nodes[-1], base / f"{name}.log")
        joined = alive_nodes(env, address)
        assert joined.stdout.split()[-1:] == ["2"], joined.stderr[-3000:]
        assert alive_nodes({}, address).returncode != 0  # without the token nobody gets in
        result = subprocess.run(
            [sys.executable, ROOT / "launch/tune.py", "--config", ROOT / "configs/tune/cpu.yaml",
             f"data.shards={tiny_shards}", "init=models:/cmunet-pretrain/1", "out=OUT",
             "data.ratio=50-30", "train.epochs=1", "train.batch_size=4", "search.folds=2",
             "search.batch_size=[4]", "search.max_concurrent=2", f"search.address={address}",
             f"tracking.uri={mlflow_server}", "search.verbose=0"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env={**os.environ, **ENV, **env})
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    finally:
        for node in reversed(nodes):
            stop(node)
        shutil.rmtree(base, ignore_errors=True)
    trial_nodes = set()
    for path in (tmp_path / "OUT" / "ray" / "search").glob("*/result.json"):
        trial_nodes |= {json.loads(line)["node_id"] for line in path.read_text().splitlines()}
    assert len(trial_nodes) == 2  # one trial on each node

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    summary = json.loads((tmp_path / "OUT" / "result.json").read_text())
    runs = client.search_runs([client.get_experiment_by_name("cmunet-tune").experiment_id])
    assert len(runs) == 3  # the search and its two trials
    version = client.get_model_version_by_alias("cmunet", "champion")
    assert version.run_id == summary["parent_run_id"]
    assert client.get_registered_model("cmunet-pretrain")  # the pre-training's, same server
