"""Stopping on SIGTERM (SLURM and Kubernetes preemption, ``scancel``) and SIGINT without losing work.

* :func:`sigterm_exits`: while it is active, SIGTERM raises ``SystemExit(143)`` in the main
  thread, so ``finally`` blocks run (a sharding job removes its temporary folder).
* :class:`StopRequest`: SIGTERM and SIGINT only set a flag; the training loop asks
  :meth:`StopRequest.agreed` at log points and checkpoints (all ranks agree through one
  all-reduce, so they stop at the same step), writes a checkpoint and raises :class:`Preempted`, which the
  launcher turns into the exit code :data:`PREEMPTED` (75, EX_TEMPFAIL: "try again"). A second
  SIGINT stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

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


class StopRequest:
    """Records SIGTERM / SIGINT instead of dying; see the module docstring."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signum = 0
        self._previous: dict[int, object] = {}
        if _in_main_thread():
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = self.signum or signum

    def agreed(self, device: torch.device | None = None) -> int:
        """The signal any rank received (0 = none), the same on every rank."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                or torch.distributed.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=device or "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
