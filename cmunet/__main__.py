"""``python -m cmunet``: the version, the commands, and which extra each one needs.

``python -m cmunet COMMAND [ARGS ...]`` runs ``cmunet-COMMAND`` (``python -m cmunet pretrain
--config cmunet-cpu ...``), for environments whose console scripts are not on PATH.
"""

from __future__ import annotations

import importlib
import sys

import cmunet
from cmunet import extras
from cmunet.cli.common import COMMANDS


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"cmunet {cmunet.__version__}: contrastive masked pre-training and few-label "
             "fine-tuning for coronary angiograms", "", "commands (each has --help):"]
    for command, (extra, what) in COMMANDS.items():
        if extra is None:
            state = ""
        elif extras.missing(extra):
            state = f"  [needs pip install 'cmunet[{extra}]']"
        else:
            state = f"  [{extra}]"
        lines.append(f"  {command:<{width}}  {what}{state}")
    lines += ["", "python -m cmunet COMMAND [ARGS ...] runs cmunet-COMMAND.",
              "cmunet-pretrain --list-configs (finetune, evaluate, tune and study too) lists "
              "the shipped configs."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"cmunet {cmunet.__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview(), end="")
        return 0
    command = argv[0] if argv[0].startswith("cmunet-") else f"cmunet-{argv[0]}"
    if command not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; python -m cmunet lists them", file=sys.stderr)
        return 2
    module = importlib.import_module(f"cmunet.cli.{command[len('cmunet-'):]}")
    sys.argv[0] = command
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
