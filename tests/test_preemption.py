"""Preemption under the launchers (docs/multinode.md, "What a signal does under each launcher").

Two CPU ranks pre-train under ``deepspeed --num_gpus 2`` and ``torchrun --nproc-per-node 2``;
SIGTERM goes to one process or to many of them: ``cmunet-job`` around the ``deepspeed`` runner
(and the runner, its launcher or their process group under it: 75 each time), the runner alone,
its ``deepspeed.launcher.launch``, the whole process group, one rank alone, torchrun's agent, and
every process of the job (agent, ranks, DataLoader workers: what SLURM does to a job step). Each
time both ranks write the checkpoint of the step they are at, rank 0 writes ``preempted.json``,
the ranks exit with 75, and no process of the job is left.

The cases run one after the other on one ``out``: the relaunch that resumes from one case's
checkpoint is the next case, and a last run finishes the job. Every step's loss is compared with
one uninterrupted run, so each resume is checked (the steps after a checkpoint are computed
again from it). Every process started here is stopped here, by its id.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, TINY_PRETRAIN
from cmunet.training.distributed import free_port
from cmunet.training.rendezvous import loopback_interface

BIN = Path(sys.executable).parent
STEPS = 24  # 2 epochs of 12 steps
TINY = [*TINY_PRETRAIN, "train.epochs=2", "train.steps_per_epoch=12",
        "train.checkpoint_every=1000", "train.log_every=1", "train.figure_every=100",
        "data.ratio=50-30"]
ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": loopback_interface() or "lo"}
CASES = ("job", "job_runner", "job_launcher", "job_group", "runner", "launcher", "group", "one_rank", "torchrun_agent", "torchrun_every_process")


def command(launcher: str, shards: Path, out: Path) -> list[str]:
    script = [str(ROOT / "launch/pretrain.py"), *TINY, f"data.shards={shards}", f"out={out}",
              f"tracking.uri=sqlite:///{out.parent / 'mlflow.db'}"]
    if launcher == "job":  # cmunet-job around the deepspeed runner
        return [sys.executable, "-m", "cmunet.cli.job", *command("deepspeed", shards, out)]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                *script]
    return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
            *script]


def losses(out: Path) -> dict[int, float]:
    if not (out / "log.csv").is_file():
        return {}
    with (out / "log.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}


def tree_of(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def running_in(out: Path) -> list[psutil.Process]:
    """Processes (of anyone's) whose command line names ``out``: a job left running there."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if f"out={out}" in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def alive(processes: list[psutil.Process]) -> list[str]:
    """``pid command`` of those still running (a zombie has ended)."""
    found = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid} {' '.join(p.cmdline()[:4])}")
        except psutil.NoSuchProcess:
            pass
    return found


def kill_tree(processes: list[psutil.Process]) -> None:
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


@dataclass
class Stop:
    """What one interrupted launch did."""
    case: str
    resumed_from: int  # the step it started from (0: from scratch)
    signalled_at: int  # the last step logged when the signal was sent
    rc: int  # of the process started (the runner, torchrun), as Popen reports it
    stopped: dict  # OUT/preempted.json
    checkpoints: list[str]
    text: str
    survivors: list[str]  # processes of the job alive 60 s after the started one ended
    losses: dict[int, float] = field(default_factory=dict)  # log.csv when it ended
    seconds: float = 0.0


def signal_case(case: str, tree: list[psutil.Process]) -> None:
    root = tree[0]
    if case.startswith("job_"):  # under cmunet-job: its child, the runner, is the root
        [runner] = [p for p in tree if p.ppid() == root.pid]
        tree, root, case = tree[1:], runner, case[len("job_"):]
    if case in ("job", "runner", "torchrun_agent"):
        root.send_signal(signal.SIGTERM)
    elif case == "launcher":  # deepspeed.launcher.launch, the runner's child
        [launch] = [p for p in tree if p.ppid() == root.pid]
        launch.send_signal(signal.SIGTERM)
    elif case == "group":  # Ctrl-C's SIGINT goes the same way; a scheduler may send SIGTERM
        os.killpg(root.pid, signal.SIGTERM)
    elif case == "one_rank":
        [rank] = [p for p in tree if "--local_rank=1" in p.cmdline() and
                  "--local_rank=1" not in psutil.Process(p.ppid()).cmdline()]
        rank.send_signal(signal.SIGTERM)
    elif case == "torchrun_every_process":  # slurmstepd signals every process of the step
        for p in tree:
            p.send_signal(signal.SIGTERM)
    else:
        raise ValueError(case)


def interrupt(case: str, shards: Path, out: Path, log: Path, resumed_from: int) -> Stop:
    launcher = "torchrun" if case.startswith("torchrun") else "job" if case.startswith("job") \
        else "deepspeed"
    start = time.monotonic()
    with log.open("w") as stream:
        process = subprocess.Popen(command(launcher, shards, out), cwd=out.parent,
                                   env={**os.environ, **ENV}, stdout=stream,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while max(losses(out), default=0) <= resumed_from:  # training goes on after the resume
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.05)
        signalled_at = max(losses(out))
        tree = tree_of(process.pid)
        signal_case(case, tree)
        rc = process.wait(timeout=300)
        psutil.wait_procs(tree, timeout=60)
        survivors = alive([*tree, *running_in(out)])
    finally:
        kill_tree([p for p in [*tree_of(process.pid), *running_in(out)]])
        if process.poll() is None:
            process.wait(timeout=10)
    preempted = out / "preempted.json"
    return Stop(case, resumed_from, signalled_at, rc,
                json.loads(preempted.read_text()) if preempted.is_file() else {},
                sorted(p.name for p in (out / "checkpoints").glob("step_*")), log.read_text(),
                survivors, losses(out), time.monotonic() - start)


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory) -> dict[int, float]:
    """The losses of the same job, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "OUT"
    result = subprocess.run(command("deepspeed", tiny_shards, out), cwd=out.parent,
                            env={**os.environ, **ENV}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    full = losses(out)
    assert sorted(full) == list(range(1, STEPS + 1))
    return full


@pytest.fixture(scope="module")
def chain(tiny_shards, tmp_path_factory) -> dict[str, Stop]:
    """Every case in turn on one out, each resuming from the one before; then the end."""
    folder = tmp_path_factory.mktemp("preempted")
    out, stops, resumed_from = folder / "OUT", {}, 0
    for case in CASES:
        stop = interrupt(case, tiny_shards, out, folder / f"{case}.log", resumed_from)
        stops[case] = stop
        print(f"{case}: rc {stop.rc}, {stop.stopped}, {stop.seconds:.0f} s", flush=True)
        if not stop.stopped:  # a case that failed: the next ones cannot resume from it
            break
        resumed_from = stop.stopped["step"]
    else:
        start = time.monotonic()
        result = subprocess.run(command("deepspeed", tiny_shards, out), cwd=folder,
                                env={**os.environ, **ENV}, capture_output=True, text=True,
                                timeout=600)
        stops["end"] = Stop("end", resumed_from, 0, result.returncode, {}, [],
                            result.stdout + result.stderr, alive(running_in(out)), losses(out),
                            time.monotonic() - start)
    return stops


def next_after(case: str) -> str:
    return (*CASES, "end")[CASES.index(case) + 1]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first one runs the whole chain: 12 launches
@pytest.mark.parametrize("case", CASES)
def test_a_signal_checkpoints_at_its_step_and_leaves_no_process(case, chain, reference):
    assert case in chain, f"an earlier case failed: {list(chain)}"
    stop = chain[case]
    tail = stop.text[-6000:]
    assert stop.stopped, f"no preempted.json\n{tail}"
    step = stop.stopped["step"]
    assert stop.stopped["signal"] == signal.SIGTERM
    # the step being trained when the signal came, or the next (DeepSpeed's launcher signals
    # rank 0 and rank 1 learns it at the next agreement; the watch looks twice a second)
    assert stop.signalled_at <= step <= stop.signalled_at + 3, (stop.signalled_at, step)
    assert step < STEPS and stop.checkpoints[-1] == f"step_{step:08d}", stop.checkpoints
    assert max(stop.losses) == step  # nothing trained after the checkpoint
    # both ranks exit with 75 after the checkpoint (their last words)
    assert stop.text.count(f"preempted: stopped by SIGTERM at step {step} ") == 2, tail
    assert "DataLoader worker" not in stop.text, tail
    assert not stop.survivors, stop.survivors
    # what the process started (what a shell or a job script sees) exits with
    expected = {"job": 75,  # cmunet-job: once every process has ended after the checkpoint
                "job_runner": 75, "job_launcher": 75, "job_group": 75,  # wherever it lands
                "runner": -signal.SIGTERM,  # the runner dies at once (143 in a shell)
                "group": -signal.SIGTERM,  # the runner too; its ranks go on to the checkpoint
                "launcher": 1,  # deepspeed.launcher.launch exits 1 after a signal, always
                "one_rank": 75,  # the launcher passes on the first rank's 75
                "torchrun_agent": 1,  # torchrun exits 1 after a signal (SignalException)
                "torchrun_every_process": 1}[case]
    assert stop.rc == expected, (stop.rc, tail)
    if case in ("runner", "job_runner"):  # the orphaned launcher saw its ranks exit with 75
        assert "exits with return code = 75" in stop.text, tail
        assert "the launcher deepspeed (pid" in stop.text, tail
    # this segment's losses, and those of the relaunch that resumed from its checkpoint
    relaunch = chain.get(next_after(case))
    assert relaunch is not None, f"the relaunch did not run: {list(chain)}"
    assert f"step_{step:08d}: epoch" in relaunch.text, relaunch.text[-3000:]  # "resuming from"
    for segment in (stop, relaunch):
        for s in range(segment.resumed_from + 1, max(segment.losses) + 1):
            assert segment.losses[s] == pytest.approx(reference[s], rel=1e-5, abs=1e-6), \
                (segment.case, s)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_relaunch_after_the_last_stop_finishes_the_job(chain, reference):
    assert "end" in chain, f"an earlier case failed: {list(chain)}"
    end = chain["end"]
    assert end.rc == 0, end.text[-5000:]
    assert sorted(end.losses) == list(range(1, STEPS + 1))  # each step logged once
    for step, loss in end.losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    assert not end.survivors


# ---- the parts, without a launcher (fast) ------------------------------------------------------

RANK = """
import sys, time
from cmunet.preempt import StopRequest
stop = StopRequest()
print("links", [name for _, _, name in stop.watch_launchers(0.05)], flush=True)
deadline = time.monotonic() + 20
while not stop.signum and time.monotonic() < deadline:
    time.sleep(0.02)
print("signum", stop.signum, flush=True)
"""
# a launcher (named torchrun) that starts the rank and waits for it
LAUNCHER = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]])"
# something that is not a launcher (a shell, nohup) above it
ABOVE = "import subprocess, sys; subprocess.run([sys.executable, *sys.argv[1:]])"


def test_a_launcher_that_goes_away_is_a_stop_request_and_one_above_it_is_not(tmp_path):
    (tmp_path / "torchrun").write_text(LAUNCHER)
    top = subprocess.Popen([sys.executable, "-c", ABOVE, str(tmp_path / "torchrun"), RANK],
                           stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert top.stdout.readline().split() == ["links", "['torchrun']"]
        [launcher] = psutil.Process(top.pid).children()
        [rank] = launcher.children()
        top.kill()  # the process above the launcher: the launcher is re-parented, goes on
        top.wait(timeout=10)
        time.sleep(0.5)  # ten looks of the watch
        assert rank.is_running() and not rank.children()
        launcher.kill()  # the launcher itself: as SIGTERM
        assert top.stdout.readline().split() == ["signum", str(int(signal.SIGTERM))]
        rank.wait(timeout=10)
    finally:
        kill_tree(tree_of(top.pid) + [p for p in psutil.process_iter(["cmdline"])
                                      if RANK in (p.info["cmdline"] or [])])
        top.stdout.close()


LOADER = """
import os, signal, sys, time
import torch
from torch.utils.data import DataLoader, IterableDataset
from cmunet.preempt import stop_signals_blocked, worker_ignores_stop_signals

class Count(IterableDataset):
    def __iter__(self):
        n = 0
        while True:
            n += 1
            yield torch.tensor(n)

stops = []
signal.signal(signal.SIGTERM, lambda s, f: stops.append(s))
with stop_signals_blocked():
    batches = iter(DataLoader(Count(), batch_size=None, num_workers=1,
                              worker_init_fn=worker_ignores_stop_signals))
    os.kill(os.getpid(), signal.SIGTERM)  # held back until the block ends
first = next(batches)
worker = batches._workers[0].pid
os.killpg(os.getpgid(0), signal.SIGTERM)  # the rank and its worker, as a scheduler does
time.sleep(0.5)
status = dict(line.split(":\t") for line in open(f"/proc/{worker}/status").read().splitlines()
              if ":\t" in line)
masks = [int(status[k], 16) >> (signal.SIGTERM - 1) & 1 for k in ("SigIgn", "SigBlk")]
print(int(first), int(next(batches)) > 1, worker, len(stops), *masks, flush=True)
time.sleep(60)  # killed by the test
"""


def test_loader_workers_ignore_stop_signals_and_die_with_their_rank(tmp_path):
    rank = subprocess.Popen([sys.executable, "-c", LOADER], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **ENV})
    try:
        first, more, worker, stops, ignored, blocked = rank.stdout.readline().split()
        # the worker survived the SIGTERM and still loads; the rank got both of its signals;
        # the worker ignores SIGTERM (no longer only holds it back: it exits when told to)
        assert (first, more, stops, ignored, blocked) == ("1", "True", "2", "1", "0")
        worker = psutil.Process(int(worker))
        assert worker.ppid() == rank.pid
        rank.kill()  # the rank dies at once (SIGKILL): so does its worker (PR_SET_PDEATHSIG)
        worker.wait(timeout=10)
    finally:
        kill_tree(tree_of(rank.pid))
        rank.wait(timeout=10)
        rank.stdout.close()
