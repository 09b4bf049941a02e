"""Messages through :mod:`logging`, shown as plain lines on stdout on rank 0.

Every module logs to a child of the ``cmunet`` logger (``logger(__name__)``). The first use
configures it (:func:`setup_logging`): rank 0 at INFO (or ``$CMUNET_LOG_LEVEL``, which a
command's ``--log-level`` sets), every other rank at WARNING, the rank taken from the launcher's
``RANK`` variable. A message prints exactly as ``print`` did (no level or time prefix), to
whatever ``sys.stdout`` is at that moment, so output captured by a test or redirected by a job
runner keeps its lines. Progress bars turn themselves off on other ranks and outside a terminal
(:func:`bar_disable`).
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "cmunet"


class _Stdout(logging.StreamHandler):
    """A handler writing to the current ``sys.stdout`` (not the one seen when it was made)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property always wins
        pass


def setup_logging(rank: int | None = None, level: int | str | None = None) -> logging.Logger:
    """Configure the ``cmunet`` logger: ``level`` (default ``$CMUNET_LOG_LEVEL``, else INFO) on
    rank 0, WARNING (or ``level`` if higher) on other ranks; ``rank`` defaults to ``$RANK`` (set
    by deepspeed and torchrun), else 0. Messages go to stdout as they are. Calling it again only
    changes the level."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    if level is None:
        level = _env_level()
    level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(level, int):
        raise ValueError(f"log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stdout) for h in root.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.propagate = False  # Ray and DeepSpeed configure the root logger: no double lines
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    return root


def logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``__name__``), configuring ``cmunet``'s on first use."""
    if not logging.getLogger(ROOT).handlers:
        setup_logging()
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def _env_level() -> int:
    """``$CMUNET_LOG_LEVEL`` (set by a command's --log-level for the jobs it starts), else INFO."""
    level = logging.getLevelName(os.environ.get("CMUNET_LOG_LEVEL", "").upper())
    return level if isinstance(level, int) else logging.INFO


def bar_disable(show: bool = True) -> bool | None:
    """tqdm's ``disable``: True where no bar is wanted (``show`` false, e.g. not rank 0), else
    None, which makes tqdm draw the bar only when its stream (stderr) is a terminal, so logs and
    job outputs do not fill with carriage returns."""
    return None if show else True
