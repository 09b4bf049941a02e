"""What every command shares: ``--version``, ``--log-level``, ``--list-configs`` and, before
anything heavy is imported, the check that the extra it needs is installed (:func:`start`).

Kept free of torch and of the extras, so that these answers are immediate and work in a base
install.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

import cmunet
from cmunet import extras
from cmunet.paths import configs_root, shipped_configs

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_ENV = "CMUNET_LOG_LEVEL"  # set by --log-level, read by the jobs this one starts

# command -> the extra it needs (None: the base install) and what it does (python -m cmunet)
COMMANDS: dict[str, tuple[str | None, str]] = {
    "cmunet-shard": (None, "WebDataset shards from folders of angiograms"),
    "cmunet-synth": (None, "synthetic angiograms with vessel masks, for trying the toolkit"),
    "cmunet-pretrain": ("train", "self-supervised pre-training (CM-UNet and baselines)"),
    "cmunet-finetune": ("train", "fine-tuning of the segmentation UNet"),
    "cmunet-evaluate": ("train", "evaluation on the test split"),
    "cmunet-tune": ("tune", "the cross-validated fine-tuning search on Ray Tune"),
    "cmunet-select": ("mlflow", "which frames to annotate, chosen with the pre-trained encoder"),
    "cmunet-segment": (None, "segmentation of new angiograms with a fine-tuned model"),
    "cmunet-study": ("tune", "a whole study: pre-training arms x label budgets x seeds"),
    "cmunet-demo": ("tune", "the whole pipeline on synthetic angiograms, no data needed"),
    "cmunet-job": (None, "a launcher's command as one job that stops cleanly on a signal"),
}


def version_line(command: str) -> str:
    return f"{command} {cmunet.__version__}"


def start(command: str, argv: Sequence[str] | None = None) -> list[str]:
    """The first step of ``command``'s ``main``: answer ``--version`` (with or without the
    extra), then refuse in one line, exit status 2, when the extra it needs is missing
    (``error: cmunet-tune needs the 'tune' extra: pip install 'cmunet[tune]'``). Returns the
    arguments as a list."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv:
        print(version_line(command))
        raise SystemExit(0)
    extra = COMMANDS[command][0]
    if extra is not None:
        try:
            extras.check(command, extra)
        except extras.MissingExtra as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(extras.EXIT_MISSING) from None
    return argv


class _ListConfigs(argparse.Action):
    def __init__(self, option_strings, dest, kind=None, **kwargs):
        self.kind = kind
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(list_configs(self.kind), end="")
        parser.exit(0)


def list_configs(kind: str | None = None) -> str:
    """The shipped configs (of ``kind``): name and the first line of the file's comment."""
    configs = shipped_configs(kind)
    if not configs:
        return "no shipped configs\n"
    width = max(map(len, configs))
    lines = [f"{name:<{width}}  {_summary(path)}".rstrip() for name, path in configs.items()]
    example = next(iter(configs))
    short = f" or --config {example.rsplit('/', 1)[-1]}" if kind else ""
    lines.append(f"(files in {configs_root()}; give one as --config {example}{short})")
    return "\n".join(lines) + "\n"


def _summary(path, width: int = 76) -> str:
    """The first sentence of the comment opening the file, cut to ``width`` characters."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ""
    words = []
    for line in lines:
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    text = text[: text.index(". ") + 1] if ". " in text else text
    return text if len(text) <= width else text[: width - 3].rsplit(" ", 1)[0] + " ..."


def exit_status(job: Callable[[], object],
                errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)) -> int:
    """Run ``job``: 0, or 2 with the one line ``error: ...`` on stderr for a user error
    (``errors``: a bad input or setting, named in the message)."""
    try:
        job()
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def command_parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of every ``cmunet-*`` command: ``description`` (the command's docstring) and
    ``epilog`` laid out as written, so that example command lines stay one per line."""
    return argparse.ArgumentParser(description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common(parser: argparse.ArgumentParser, command: str, kind: str | None = None,
               configs: bool = False) -> None:
    """``--version``, ``--log-level`` and, with ``configs``, ``--list-configs`` (of ``kind``)."""
    parser.add_argument("--version", action="version", version=version_line(command))
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                        help=f"messages shown: {', '.join(LOG_LEVELS)} (default ${LOG_ENV}, "
                             "else INFO)")
    if configs:
        parser.add_argument("--list-configs", action=_ListConfigs, kind=kind,
                            help="list the shipped configs (give one as --config NAME) and exit")


def apply_common(args: argparse.Namespace) -> None:
    """Set the log level of this process, and of the jobs it starts, from ``--log-level``."""
    level = getattr(args, "log_level", None)
    if level:
        os.environ[LOG_ENV] = level
        from cmunet.log import setup_logging

        setup_logging(level=getattr(logging, level))
