"""Where the shipped configs and the pre-training command are, in a checkout and in a wheel.

In a source checkout (``pip install -e .``) the configs are the repository's ``configs/``. A
wheel carries a copy in ``cmunet/configs/`` (setup.py), so the study and the demo find their
default configs without the source tree.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent if (PACKAGE.parent / "configs").is_dir() else None
SHIPPED = PACKAGE / "configs"


def config_file(name: str | Path) -> Path:
    """The config ``name``: an absolute path as it is; a relative one in the checkout (the
    documented ``configs/...`` paths), else in the working directory, else the copy shipped in
    the package (``configs/pretrain/x.yaml`` -> ``cmunet/configs/pretrain/x.yaml``). A name found
    nowhere is returned relative to the working directory, so the error names it."""
    path = Path(name)
    if path.is_absolute():
        return path
    candidates = [CHECKOUT / path] if CHECKOUT else []
    candidates.append(Path.cwd() / path)
    if path.parts and path.parts[0] == "configs":
        candidates.append(SHIPPED.joinpath(*path.parts[1:]))
    return next((c for c in candidates if c.is_file()), Path.cwd() / path)
