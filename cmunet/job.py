"""A launcher's command run as one job that stops cleanly (``cmunet-job``, docs/multinode.md).

``cmunet-job deepspeed --num_gpus 2 launch/pretrain.py ...`` starts the command in a process
group of its own and becomes the *subreaper* of everything it starts (``PR_SET_CHILD_SUBREAPER``),
so the ranks that a dying launcher leaves behind are re-parented to it rather than to init. On
SIGTERM or SIGINT it sends SIGTERM to the whole group (the launcher, the ranks; their DataLoader
workers ignore it and end with their rank), then waits until every process of the job has ended:
the ranks write the checkpoint of the step they agree on and exit. It exits with 75 when a job
of this toolkit inside reported that it stopped after a complete checkpoint (it sets
``CMUNET_JOB_MARK`` to a file of its own; :func:`mark_preempted` creates it), else with the
command's own exit code (128 + N for a command ended by signal N).

Without it, a signal to the ``deepspeed`` runner ends the runner at once with 143 while its ranks
go on to their checkpoint unattended, and a job script cannot tell when it may relaunch.

A second signal, or ``grace_s`` seconds after the first, kills whatever is left with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cmunet.preempt import PREEMPTED, STOP_SIGNALS, _prctl, live_processes

MARK_ENV = "CMUNET_JOB_MARK"
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
GRACE_S = 900.0  # how long the job may take to stop after the signal before it is killed


def mark_preempted() -> None:
    """Tell a surrounding ``cmunet-job`` that this process stopped after a complete checkpoint
    (called where a command returns :data:`~cmunet.preempt.PREEMPTED`)."""
    mark = os.environ.get(MARK_ENV)
    if mark:
        Path(mark).touch()


def _children() -> list[int]:
    """This process's live children (the command, and the orphans re-parented here)."""
    me = os.getpid()
    return [pid for pid, parent, _ in live_processes() if parent == me]


def _kill_all(group: int) -> None:
    """SIGKILL to the command's process group and to every child adopted from it."""
    kills = [(os.killpg, group), *((os.kill, pid) for pid in _children())]
    for kill, pid in kills:
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_job(command: list[str], grace_s: float = GRACE_S, poll_s: float = 0.1) -> int:
    """Run ``command`` as described in the module docstring; returns the job's exit code."""
    if not command:
        raise ValueError("cmunet-job needs a command to run, e.g. "
                         "cmunet-job deepspeed --num_gpus 2 launch/pretrain.py --config ...")
    if not _prctl(PR_SET_CHILD_SUBREAPER, 1):
        raise OSError("cmunet-job needs Linux (PR_SET_CHILD_SUBREAPER): start the launcher "
                      "directly and wait for OUT/preempted.json (docs/multinode.md)")
    with tempfile.TemporaryDirectory(prefix="cmunet-job-") as folder:  # 0700, this user's
        mark = Path(folder) / "preempted"
        try:
            child = subprocess.Popen(command, env={**os.environ, MARK_ENV: str(mark)},
                                     start_new_session=True)
        except OSError as err:
            raise OSError(f"cmunet-job cannot start {command[0]!r}: {err.strerror}") from None
        stopped: list[float] = []

        def forward(signum, frame) -> None:
            if stopped:  # a second signal: stop now
                _kill_all(child.pid)
                return
            stopped.append(time.monotonic())
            print(f"cmunet-job: {signal.Signals(signum).name}: stopping the job (SIGTERM to "
                  "each of its processes; they write a checkpoint and exit)", file=sys.stderr,
                  flush=True)
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

        previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
        try:
            code = _wait_for_all(child.pid, stopped, grace_s, poll_s)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if mark.exists() and (stopped or code != 0):
            return PREEMPTED
        return 128 - code if code < 0 else code


def _wait_for_all(first: int, stopped: list[float], grace_s: float, poll_s: float) -> int:
    """Reap every child until none is left; the exit code of ``first`` (negative: a signal)."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return code if code is not None else 0
        if pid == 0:
            if stopped and time.monotonic() - stopped[0] > grace_s:
                print(f"cmunet-job: still running {grace_s:g} s after the signal: killing it",
                      file=sys.stderr, flush=True)
                _kill_all(first)
                stopped[0] = float("inf")
            time.sleep(poll_s)
        elif pid == first:
            code = os.waitstatus_to_exitcode(status)
