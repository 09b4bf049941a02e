#!/usr/bin/env python
"""Print the pip arguments that install torch for this machine (what `make setup` runs).

    python tools/torch_spec.py 2.13.0            ->  torch==2.13.0 [--index-url CPU_INDEX]

A GPU (nvidia-smi lists one): torch==VERSION from the configured index (PyPI's Linux wheels are
the CUDA build). No GPU: pip is asked, without installing or downloading any wheel, what
torch==VERSION resolves to with this machine's configuration (pip config, $PIP_INDEX_URL,
$PIP_FIND_LINKS). When that is already a CPU build (a +cpu wheel, or a wheel that needs no
nvidia-*/cuda-* package here, as on macOS and Windows) the arguments stay torch==VERSION;
otherwise (the public PyPI on Linux, whose torch pulls ~3 GB of CUDA wheels) they add
--index-url CPU_INDEX (default https://download.pytorch.org/whl/cpu). The reason goes to stderr.
See README.md, "Installing the package".
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_PREFIXES = ("nvidia-", "nvidia_", "cuda-", "cuda_", "triton")


def has_gpu() -> bool:
    """Whether ``nvidia-smi -L`` lists a GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def resolve(requirement: str, python: str = sys.executable) -> dict | None:
    """pip's installation report for ``requirement`` alone (``--dry-run --no-deps``: only the
    metadata is fetched), or None when pip cannot resolve it (no index reachable)."""
    command = [python, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
               "--quiet", "--disable-pip-version-check", "--report", "-", requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        return json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def cuda_requirements(report: dict) -> tuple[str, list[str]]:
    """The torch wheel's file name in pip's ``report`` and the CUDA packages it would pull on
    this machine (its ``requires_dist`` whose markers hold here): none for a CPU build."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare virtual environment: pip's own copy
        from pip._vendor.packaging.requirements import Requirement

    item = next(i for i in report.get("install", [])
                if i["metadata"]["name"].lower() == "torch")
    wheel = item["download_info"]["url"].rsplit("/", 1)[-1].replace("%2B", "+")
    if "+cpu" in item["metadata"]["version"]:
        return wheel, []
    pulled = []
    for line in item["metadata"].get("requires_dist") or []:
        requirement = Requirement(line)
        applies = requirement.marker is None or requirement.marker.evaluate({"extra": ""})
        if applies and requirement.name.lower().startswith(CUDA_PREFIXES):
            pulled.append(requirement.name)
    return wheel, pulled


def choose(version: str, cpu_index: str = CPU_INDEX, gpu: bool | None = None,
           report: dict | None | bool = False) -> tuple[list[str], str]:
    """The pip arguments for torch ``version`` and why (``gpu`` and ``report`` default to this
    machine's answers)."""
    plain = [f"torch=={version}"]
    if (has_gpu() if gpu is None else gpu):
        return plain, "a GPU is visible: the configured index's default (CUDA) build"
    if report is False:
        report = resolve(plain[0])
    if report is None:
        return [*plain, "--index-url", cpu_index], (
            f"pip could not resolve {plain[0]} here: trying the CPU wheels of {cpu_index}")
    wheel, pulled = cuda_requirements(report)
    if not pulled:
        return plain, f"no GPU, and pip here already resolves {plain[0]} to a CPU build ({wheel})"
    return [*plain, "--index-url", cpu_index], (
        f"no GPU, and pip here resolves {plain[0]} to a CUDA build ({wheel}, which requires "
        f"{', '.join(pulled[:3])}{', ...' if len(pulled) > 3 else ''}): using the CPU wheels "
        f"of {cpu_index}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version", help="the torch version, e.g. 2.13.0")
    parser.add_argument("--cpu-index", default=CPU_INDEX,
                        help=f"the index of the CPU wheels (default {CPU_INDEX})")
    args = parser.parse_args(argv)
    words, why = choose(args.version, args.cpu_index)
    print(f"torch: {why}", file=sys.stderr)
    print(" ".join(words))
    return 0


if __name__ == "__main__":
    sys.exit(main())
