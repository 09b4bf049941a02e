"""cmunet-job (cmunet/job.py): a signal reaches every process of the job, the job's exit code is
75 only once every process has ended after a reported checkpoint, and nothing is left behind.

A stand-in launcher dies at once on SIGTERM (as the ``deepspeed`` runner does) and leaves its
"rank", which takes its time to "checkpoint". The real launchers run in test_preemption.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

JOB = [sys.executable, "-m", "cmunet.cli.job"]
# the rank: on SIGTERM it takes a second, writes DONE, reports the checkpoint and exits with 75
RANK = """
import os, signal, sys, time
from pathlib import Path
from cmunet.job import mark_preempted
def stop(signum, frame):
    time.sleep(1.0)
    Path(sys.argv[1]).write_text(str(os.getpid()))
    mark_preempted()
    os._exit(75)
signal.signal(signal.SIGTERM, stop if sys.argv[2] == "checkpoint" else signal.SIG_IGN)
Path(sys.argv[1] + ".started").write_text(str(os.getpid()))
while True:
    time.sleep(0.05)
"""
# the launcher: starts the rank, waits for it; SIGTERM ends it at once (default action)
LAUNCHER = "import subprocess, sys; subprocess.run([sys.executable, '-c', *sys.argv[1:]])"


def start_job(tmp_path: Path, behaviour: str = "checkpoint", *flags: str) -> subprocess.Popen:
    done = tmp_path / "DONE"
    job = subprocess.Popen([*JOB, *flags, sys.executable, "-c", LAUNCHER, RANK, str(done),
                            behaviour], stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "DONE.started").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()
        time.sleep(0.05)
    return job


def rank_pid(tmp_path: Path) -> int:
    return int((tmp_path / "DONE.started").read_text())


def test_sigterm_waits_for_the_orphaned_rank_and_exits_75(tmp_path):
    job = start_job(tmp_path)
    rank = psutil.Process(rank_pid(tmp_path))
    launcher = psutil.Process(rank.ppid())
    assert launcher.ppid() == job.pid
    job.send_signal(signal.SIGTERM)
    launcher.wait(timeout=10)  # the launcher dies at once, its rank is re-parented to the job
    assert job.poll() is None and rank.is_running()  # the job waits for the rank's checkpoint
    assert job.wait(timeout=30) == 75, job.stderr.read()
    assert (tmp_path / "DONE").read_text() == str(rank.pid)
    assert not rank.is_running()  # reaped by the job before it exited
    assert "SIGTERM: stopping the job" in job.stderr.read()


def test_a_job_that_stops_without_a_checkpoint_keeps_its_exit_code(tmp_path):
    job = start_job(tmp_path, "ignore", "--grace", "1")
    rank = psutil.Process(rank_pid(tmp_path))
    job.send_signal(signal.SIGTERM)
    # the rank ignores SIGTERM: after the grace period it is killed; no checkpoint, no 75
    assert job.wait(timeout=30) == 128 + signal.SIGTERM  # the launcher's own end
    assert "killing it" in job.stderr.read()
    assert not (tmp_path / "DONE").exists()
    psutil.wait_procs([rank], timeout=5)
    assert not rank.is_running()


def test_a_second_signal_kills_the_job_at_once(tmp_path):
    job = start_job(tmp_path, "ignore")
    rank = psutil.Process(rank_pid(tmp_path))
    job.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert rank.is_running()
    job.send_signal(signal.SIGINT)
    # the first SIGINT went on as SIGTERM, which the launcher died of
    assert job.wait(timeout=10) == 128 + signal.SIGTERM
    psutil.wait_procs([rank], timeout=5)
    assert not rank.is_running()


def test_without_a_signal_the_command_exit_code_passes_through(tmp_path):
    run = lambda *cmd: subprocess.run([*JOB, *cmd], capture_output=True, text=True, timeout=60)
    assert run(sys.executable, "-c", "raise SystemExit(3)").returncode == 3
    assert run(sys.executable, "-c", "import os; os.kill(os.getpid(), 9)").returncode == 137
    # a checkpoint reported by a command that then succeeds is no preemption
    ok = run(sys.executable, "-c", "from cmunet.job import mark_preempted; mark_preempted()")
    assert ok.returncode == 0
    # the rank's 75 passes through a launcher that passes it on (deepspeed's for one rank)
    assert run(sys.executable, "-c", "raise SystemExit(75)").returncode == 75
    missing = run()
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "needs a command" in missing.stderr
    nothing = run(str(tmp_path / "no-such-launcher"))
    assert nothing.returncode == 2 and "cannot start" in nothing.stderr, nothing.stderr
    assert nothing.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_a_stopped_study_waits_for_the_ranks_its_launcher_left(tmp_path):
    """cmunet.training.launcher.stop_group (the study's and the demo's pre-training): SIGTERM to
    the job's group, then wait for the orphaned rank's checkpoint; a rank that ignores the
    signal is killed after the grace period."""
    from cmunet.preempt import live_processes
    from cmunet.training.launcher import stop_group

    for behaviour, grace in (("checkpoint", 60.0), ("ignore", 1.0)):
        folder = tmp_path / behaviour
        folder.mkdir()
        done = folder / "DONE"
        child = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, str(done), behaviour],
                                 start_new_session=True)
        deadline = time.monotonic() + 60
        while not (folder / "DONE.started").exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        stop_group(child, grace_s=grace)
        assert done.exists() == (behaviour == "checkpoint")
        assert not [pid for pid, _, group in live_processes() if group == child.pid]
        assert child.returncode is not None
