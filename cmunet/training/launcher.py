"""Pre-training as a subprocess, for jobs that chain stages (the study, the demo).

The pre-training command (``cmunet.cli.pretrain``, as ``python -m``, so that it runs from an
installed wheel as well as from a checkout) runs under a launcher (``deepspeed --num_gpus 2``,
``torchrun --nproc_per_node 2``) or plain Python. Two jobs on one machine must not share the
launcher's default rendezvous port, so a free port is added unless the launcher names one. The
launcher is taken from this Python's environment when it is installed there, so that
``.venv/bin/python launch/demo.py`` works without activating the environment. The command runs
in a process group of its own; a stopped study sends SIGTERM to that group and waits until each
of its processes has ended (:func:`stop_group`), so no rank outlives it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from cmunet.data import location
from cmunet.preempt import PREEMPTED, Interrupted, live_processes
from cmunet.tracking.mlflow_run import TrackingConfig
from cmunet.training.distributed import free_port

PORT_FLAGS = {"deepspeed": "--master_port", "torchrun": "--master-port"}
MODULE = "cmunet.cli.pretrain"
MODULE_FLAGS = {"deepspeed": "--module", "torchrun": "-m"}  # run a module, not a script


def pretrain_command(launcher: str, config: str | Path, overrides: list[str]) -> list[str]:
    """The command line running the pre-training (``python -m cmunet.cli.pretrain``, the same
    as ``launch/pretrain.py``) with ``--config CONFIG overrides...`` under ``launcher``."""
    words = shlex.split(launcher) or [sys.executable]
    beside = Path(sys.executable).parent / words[0]  # this environment's deepspeed / torchrun,
    if "/" not in words[0] and beside.is_file():  # also when it is not on PATH (make demo)
        words[0] = str(beside)
    flag = PORT_FLAGS.get(Path(words[0]).name)
    if flag and not any(w.startswith(("--master_port", "--master-port")) for w in words):
        words += [f"{flag}={free_port()}"]
    name = Path(words[0]).name
    if name in MODULE_FLAGS:
        words += [MODULE_FLAGS[name], MODULE]
    elif name.startswith("python"):
        words += ["-m", MODULE]
    else:  # another launcher (srun, mpirun ...): the module's file, run as a script
        words += [str(Path(__file__).resolve().parents[1] / "cli" / "pretrain.py")]
    return [*words, "--config", str(config), *overrides]


def job_overrides(shards: str | Path, ratio: str, out: str | Path, tracking: TrackingConfig,
                  run_name: str) -> list[str]:
    """The keys every chained job (pre-training, search) gets: its data, output and MLflow run."""
    return [f"data.shards={location.absolute(shards)}", f"data.ratio={ratio}", f"out={out}",
            f"tracking.uri={tracking.uri}", f"tracking.experiment={tracking.experiment}",
            f"tracking.run_name={run_name}"]


def run_logged(command: list[str], log_file: Path, what: str) -> None:
    """Run ``command`` with its output appended to ``log_file``; raise naming the log on failure."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as stream:
        stream.write(f"$ {shlex.join(command)}\n")
        stream.flush()
        # a process group of its own: the launcher, its ranks and their loader workers
        child = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            code = child.wait()
        except BaseException:  # a stop request (Interrupted, KeyboardInterrupt) or a bug
            stop_group(child)
            raise
    if code == PREEMPTED:
        raise Interrupted(f"{what} was stopped by a signal after writing its checkpoint; see "
                          f"{log_file}")
    if code != 0:
        raise RuntimeError(f"{what} failed (exit {code}); see {log_file}")


STOP_GRACE_S = 600  # how long a stopped study waits for its pre-training's checkpoint


def stop_group(child: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to every process of ``child``'s group (the job writes its checkpoint and exits
    75), then wait until none is left -- also the ranks of a launcher that died at once (the
    ``deepspeed`` runner), which keep the group -- and kill what is left after ``grace_s``."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while True:
        child.poll()  # reaps the launcher (the ranks' parent is another process by now)
        if not any(group == child.pid for _, _, group in live_processes()):
            return
        if time.monotonic() > deadline:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return
        time.sleep(0.2)
