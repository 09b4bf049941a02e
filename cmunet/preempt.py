"""Stopping on SIGTERM (SLURM and Kubernetes preemption, ``scancel``) and SIGINT without losing work.

* :func:`sigterm_exits`: while it is active, SIGTERM raises ``SystemExit(143)`` in the main
  thread, so ``finally`` blocks run (a sharding job removes its temporary folder).
* :class:`StopRequest`: SIGTERM and SIGINT only set a flag; the training loop asks
  :meth:`StopRequest.agreed` at log points and checkpoints (all ranks agree through one
  all-reduce, so they stop at the same step), writes a checkpoint and raises :class:`Preempted`, which the
  launcher turns into the exit code :data:`PREEMPTED` (75, EX_TEMPFAIL: "try again"). A second
  SIGINT stops at once (KeyboardInterrupt).
* :meth:`StopRequest.watch_launchers`: a launcher that dies without passing its signal on (the
  ``deepspeed`` runner on one node, a launcher killed with SIGKILL) counts as a SIGTERM: a
  thread notices that a launcher between this rank and the first process that is not a launcher
  (``deepspeed``, ``deepspeed.launcher.launch``, ``torchrun``) has gone, by its child having
  been re-parented.
* :func:`worker_ignores_stop_signals` (a DataLoader ``worker_init_fn``) and
  :func:`stop_signals_blocked` (around starting the workers): loader workers ignore SIGTERM and
  SIGINT while their rank runs (:func:`loader_worker_init`: SIGTERM ends them once the rank
  exits) and die with their rank (``PR_SET_PDEATHSIG``), so a signal to the whole process group
  (Ctrl-C, a scheduler signalling every process) leaves the decision to the rank instead of
  killing its workers first.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import multiprocessing
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import torch

PREEMPTED = 75  # exit code of a job stopped by a signal after a complete checkpoint
TERMINATED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Preempted(Exception):
    """Raised after the checkpoint of a stop request was written."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} after writing "
                         f"its checkpoint; relaunch the same command to resume")


class Interrupted(Exception):
    """A job stopped by a signal after saving what lets a relaunch continue (exit PREEMPTED)."""


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def default_sigterm() -> None:
    """Worker-process initializer: SIGTERM ends the worker (its parent cleans up)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) while active (main thread only; elsewhere a no-op)."""
    if not _in_main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(TERMINATED)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_interrupt(what: str) -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Interrupted` in the main thread while active (a study:
    the job it runs at that moment saves what it has and stops; main thread only)."""
    if not _in_main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(f"{what} stopped by {signal.Signals(signum).name}; relaunch the same "
                          "command to continue where it stopped")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def loader_worker_init() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` for this rank's loader (see
    :func:`worker_ignores_stop_signals`); the rank's exit (atexit) lets its workers end."""
    exiting = multiprocessing.Event()
    atexit.register(exiting.set)  # runs before multiprocessing's exit handler ends the workers
    return functools.partial(worker_ignores_stop_signals, exiting=exiting)


def worker_ignores_stop_signals(worker_id: int = 0, exiting=None) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM and SIGINT are ignored while the rank runs (the
    rank decides when to stop and then ends its workers), and the worker gets SIGKILL when its
    rank dies. Once ``exiting`` (an Event its rank sets at exit) is set, SIGTERM ends the worker:
    multiprocessing terminates and then joins its daemon children at exit, and a worker that
    ignored SIGTERM for good would hang its rank's exit."""
    parent = os.getppid()
    for signum in STOP_SIGNALS:  # SIG_IGN also drops a signal held back since the fork
        signal.signal(signum, signal.SIG_IGN)
    if exiting is not None:
        def on_sigterm(signum, frame):
            if exiting.is_set():
                os._exit(0)

        signal.signal(signal.SIGTERM, on_sigterm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # see stop_signals_blocked
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the rank died before the line above
        os._exit(1)


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """SIGTERM and SIGINT held back in this thread while it starts processes (DataLoader
    workers, forked: they inherit the mask until :func:`worker_ignores_stop_signals` ignores
    them), so a signal to the process group cannot kill a worker before it ignores it. Signals
    that arrive meanwhile reach this process's handlers once the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ---- launchers above this rank ----------------------------------------------------------------

LAUNCHER_NAMES = {"deepspeed", "ds", "torchrun", "deepspeed.launcher.launch",
                  "deepspeed.launcher.runner", "torch.distributed.run",
                  "torch.distributed.launch"}


def _parent_of(pid: int) -> int | None:
    """The parent process id of ``pid`` (None when it is gone or a zombie); Linux /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) ": state, ppid, ...
    return None if fields[0] in ("Z", "X") else int(fields[1])


def live_processes() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every process that has not ended (zombies left
    out); Linux /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if fields[0] not in ("Z", "X"):
            yield int(entry.name), int(fields[1]), int(fields[2])


def launcher_name(words: list[str]) -> str | None:
    """``deepspeed``, ``deepspeed.launcher.launch``, ``torchrun`` ... when the command line
    ``words`` runs one: as the program, or as Python's script or ``-m`` module."""
    if not words:
        return None
    program = Path(words[0]).name
    if program in LAUNCHER_NAMES or not program.startswith("python"):
        return program if program in LAUNCHER_NAMES else None
    rest = iter(words[1:])
    for word in rest:
        if word.startswith("-c"):
            return None
        if word.startswith("-m"):
            module = word[2:] or next(rest, "")
            return module if module in LAUNCHER_NAMES else None
        if word in ("-W", "-X"):  # options with a value
            next(rest, None)
        elif not word.startswith("-"):  # the script
            return Path(word).name if Path(word).name in LAUNCHER_NAMES else None
    return None


def _launcher_name(pid: int) -> str | None:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return launcher_name([w for w in words if w] if words[-1:] == [""] else words)


def launcher_links(pid: int | None = None) -> list[tuple[int, int, str]]:
    """(child, parent, parent's launcher name) for each launcher above ``pid`` (this process),
    from its parent up to the last launcher before a process that is not one (a shell,
    ``slurmstepd``, ``sshd``). The top launcher's own parent is not watched: a ``nohup``
    launcher outliving its shell is no stop request."""
    links, child = [], pid or os.getpid()
    while True:
        parent = _parent_of(child)
        if parent is None or parent <= 1:
            return links
        name = _launcher_name(parent)
        if name is None:
            return links
        links.append((child, parent, name))
        child = parent


def broken_link(links: list[tuple[int, int, str]]) -> tuple[int, str] | None:
    """(pid, name) of a launcher of ``links`` that has gone: its child has another parent."""
    for child, parent, name in links:
        if _parent_of(child) != parent:
            return parent, name
    return None


class StopRequest:
    """Records SIGTERM / SIGINT instead of dying; see the module docstring."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signum = 0
        self._previous: dict[int, object] = {}
        self._closed = threading.Event()
        if _in_main_thread():
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)

    def watch_launchers(self, interval_s: float = 0.5) -> list[tuple[int, int, str]]:
        """Count a launcher above this rank that has gone (killed, or the ``deepspeed`` runner
        exiting on SIGTERM without passing it on) as a SIGTERM; checked every ``interval_s``
        seconds by a daemon thread until :meth:`close`. Returns the links watched."""
        links = launcher_links()
        if not links:
            return links

        def watch() -> None:
            while not self._closed.wait(interval_s):
                gone = broken_link(links)
                if gone:
                    if not self.signum:
                        print(f"cmunet: the launcher {gone[1]} (pid {gone[0]}) has gone: "
                              "stopping as on SIGTERM", file=sys.stderr, flush=True)
                    self.signum = self.signum or signal.SIGTERM
                    return

        threading.Thread(target=watch, name="cmunet-launcher-watch", daemon=True).start()
        return links

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = self.signum or signum

    def agreed(self, device: torch.device | None = None) -> int:
        """The signal any rank received (0 = none), the same on every rank."""
        import torch  # here: cmunet-job and the loader workers' set-up need no torch

        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                or torch.distributed.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=device or "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def close(self) -> None:
        self._closed.set()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
