#!/usr/bin/env python
"""Parameter counts of every pre-training method at the paper's scale, next to the paper's.

Each method is built from its paper-scale config (``configs/pretrain/<method>.yaml``, width 64)
on PyTorch's meta device (shapes only: no memory, no initialisation time) and counted with
``count_parameters``: all parameters of the pre-training module (momentum copies included),
the trainable ones (what the optimizer holds), and those of the exported parts (what fine-tuning
loads; the fine-tuned UNet adds a fresh 1x1 head of 130 parameters).

    python tools/param_table.py                        # print the table (markdown)
    python tools/param_table.py --write docs/methods.md  # replace the table in the doc

The doc's table sits between the markers below; tests/test_methods.py checks it is up to date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- param-table: begin -->", "<!-- param-table: end -->"
ORDER = ("none", "genesis", "mae", "spark", "moco", "cmunet", "cmunet-rec", "cmunet-con")
PAPER = {"none": 31.04, "genesis": 31.04, "mae": 31.04, "spark": 34.18, "moco": 37.70,
         "cmunet": 121.49}  # millions, the paper's Table I


def counts(method_name: str) -> dict[str, int]:
    """{"total", "trainable", "export"} parameter counts of ``method_name`` at paper scale."""
    from cmunet.config import load_config
    from cmunet.methods import build_method
    from cmunet.models.unet import count_parameters
    from cmunet.training.pretrain_config import PretrainConfig

    cfg = load_config(PretrainConfig, ROOT / "configs" / "pretrain" / f"{method_name}.yaml")
    with torch.device("meta"):
        method = build_method(cfg)
    exported = sum(count_parameters(getattr(method, a)) for a in method.parts.values())
    return {"total": count_parameters(method), "trainable": count_parameters(method, True),
            "export": exported}


def parameter_table() -> str:
    """The markdown table (without the markers)."""
    lines = ["| method | paper | pre-training module | trainable | exported (loaded by "
             "fine-tuning) |", "|---|---:|---:|---:|---:|"]
    for name in ORDER:
        c = counts(name)
        paper = f"{PAPER[name]:.2f} M" if name in PAPER else "—"
        lines.append(f"| `{name}` | {paper} | {c['total'] / 1e6:.2f} M | "
                     f"{c['trainable'] / 1e6:.2f} M | {c['export'] / 1e6:.2f} M |")
    return "\n".join(lines)


def section(text: str) -> str:
    """The table between the markers of a document."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the document has no {BEGIN} ... {END} section")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="markdown file whose table to replace")
    args = parser.parse_args(argv)
    table = parameter_table()
    if args.write is None:
        print(table)
        return 0
    text = args.write.read_text()
    old = section(text)
    before, rest = text.split(BEGIN, 1)
    args.write.write_text(f"{before}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")
    print(f"{args.write}: table {'unchanged' if old == table else 'updated'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
