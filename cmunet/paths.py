"""Where the shipped configs and the pre-training command are, in a checkout and in a wheel.

In a source checkout (``pip install -e .``) the configs are the repository's ``configs/``. A
wheel carries a copy in ``cmunet/configs/`` (setup.py), so every command finds the shipped
configs without the source tree: by path (``configs/pretrain/cmunet-cpu.yaml``, as the docs write
them) or by name (``pretrain/cmunet-cpu``, ``cmunet-cpu`` for the command's own kind, or
``cmunet://pretrain/cmunet-cpu``); ``--list-configs`` lists them (:func:`shipped_configs`).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent if (PACKAGE.parent / "configs").is_dir() else None
SHIPPED = PACKAGE / "configs"
SCHEME = "cmunet://"
SUFFIXES = (".yaml", ".yml")


class UnknownConfig(ValueError):
    """A config that is neither a file nor a shipped config's name."""


def configs_root() -> Path | None:
    """The folder of the shipped configs: the wheel's copy, else the checkout's ``configs/``."""
    if SHIPPED.is_dir():
        return SHIPPED
    return CHECKOUT / "configs" if CHECKOUT else None


def shipped_configs(kind: str | None = None) -> dict[str, Path]:
    """``{"pretrain/cmunet-cpu": path, ...}``: the shipped configs (of the folder ``kind``, e.g.
    ``pretrain``, when given), sorted by name."""
    root = configs_root()
    if root is None:
        return {}
    files = sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    named = {p.relative_to(root).with_suffix("").as_posix(): p for p in files}
    return {name: path for name, path in named.items()
            if kind is None or name.split("/")[0] == kind}


def config_file(name: str | Path, kind: str | None = None) -> Path:
    """The config ``name`` (:func:`find_config`); a name found nowhere is returned relative to
    the working directory, so the error names it."""
    try:
        return find_config(name, kind)
    except UnknownConfig:
        return Path.cwd() / name


def find_config(name: str | Path, kind: str | None = None) -> Path:
    """The config ``name``: an absolute path as it is; a relative one in the working directory,
    else in the checkout (the documented ``configs/...`` paths), else the copy shipped in the
    package (``configs/pretrain/x.yaml`` -> ``cmunet/configs/pretrain/x.yaml``); else the
    shipped config of that name (:func:`shipped_config`). Raises :class:`UnknownConfig`."""
    text = str(name)
    if text.startswith(SCHEME):
        return shipped_config(text, kind)
    path = Path(name)
    if path.is_absolute():
        if not path.is_file():
            raise UnknownConfig(f"config file {path} does not exist")
        return path
    candidates = [Path.cwd() / path]
    if CHECKOUT:
        candidates.append(CHECKOUT / path)
    if path.parts and path.parts[0] == "configs":
        candidates.append(SHIPPED.joinpath(*path.parts[1:]))
    found = next((c for c in candidates if c.is_file()), None)
    return found if found is not None else shipped_config(text, kind)


def shipped_config(name: str, kind: str | None = None) -> Path:
    """The shipped config called ``name``: ``cmunet://pretrain/cmunet-cpu``,
    ``pretrain/cmunet-cpu``, ``configs/pretrain/cmunet-cpu.yaml``, or a bare ``cmunet-cpu``
    among the configs of ``kind`` (among all of them when ``kind`` is None and the name is
    unique). Raises :class:`UnknownConfig` listing the near names."""
    key = name[len(SCHEME):] if name.startswith(SCHEME) else name
    key = key.strip("/")
    key = key[len("configs/"):] if key.startswith("configs/") else key
    for suffix in SUFFIXES:
        key = key[: -len(suffix)] if key.endswith(suffix) else key
    configs = shipped_configs()
    if key in configs:
        return configs[key]
    if "/" not in key:
        matches = [n for n in configs if n.rsplit("/", 1)[-1] == key
                   and (kind is None or n.split("/")[0] == kind)]
        if len(matches) == 1:
            return configs[matches[0]]
        if len(matches) > 1:
            raise UnknownConfig(f"config {name!r} is ambiguous: {', '.join(matches)}")
    names = list(shipped_configs(kind)) or list(configs)
    listing = ", ".join(names) if len(names) <= 6 else f"{len(names)} of them: --list-configs"
    raise UnknownConfig(f"config {name!r} is neither a file nor a shipped config (shipped: "
                        f"{listing or 'none'})")
