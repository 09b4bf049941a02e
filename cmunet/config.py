"""Typed configuration: dataclass defaults <- a YAML file <- command-line ``key=value`` overrides.

Every job's configuration is a tree of dataclasses. :func:`load_config` reads a YAML file, applies
dotted overrides (``train.epochs=2``), refuses unknown keys and wrong types with a message that
names the key, and returns the typed object. :func:`save_config` writes the resolved tree so that it
can be stored beside every output and loaded again with :func:`load_config`.

Values of overrides are parsed as YAML (``2`` is an int, ``[1, 2]`` a list, ``null`` None) except
where the field is a string, which takes the text as written.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""

    def __init__(self, message: str, key: str | None = None):
        self.key, self.message = key, message
        super().__init__(f"'{key}' {message}" if key else message)


class _Raw(str):
    """An override's value as typed on the command line (parsed once its field type is known)."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, the YAML file at ``path`` and ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(data, key.strip(), _Raw(value))
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        where = ""
        if path is not None:  # blame the file only when it fails without the overrides too
            where = f" (in {path})" if not overrides or _fails(cls, path) else \
                " (in the command-line overrides)"
        raise ConfigError(f"{err}{where}") from None


def _fails(cls: type, path: str | Path) -> bool:
    try:
        from_dict(cls, read_yaml_mapping(path))
    except ConfigError:
        return True
    return False


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a nested mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        factory = fields[key].default_factory
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict) \
                and factory is not dataclasses.MISSING:
            # a partial section overrides the parent's default for it, not the class defaults
            value = _merge(dataclasses.asdict(factory()), value)
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # raised by a __post_init__ validator: name the full key
        if err.key is None or not prefix:
            raise
        raise ConfigError(err.message, key=prefix + err.key) from None


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _Raw) and type(None) in args and value.strip() in ("null", "None", "~", ""):
        value = None
    if isinstance(value, _Raw) and tp is not str and not _accepts_str(tp):
        try:
            value = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            value = str(value)
    if isinstance(value, _Raw):
        value = str(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"'{key}' = {value!r} has the wrong type: expected {_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"'{key}' = {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' = {value!r} must be a list ({_name(tp)})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"'{key}' must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' = {value!r} must be a mapping")
        kt, vt = args if args else (Any, Any)
        return {_coerce(kt, k, f"{key}.{k}"): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"'{key}' has an unsupported annotation {tp!r}")
    raise ConfigError(f"'{key}' = {value!r} has the wrong type: expected {_name(tp)}")


def _accepts_str(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved configuration as plain Python data (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"train.epochs": 2, ...}``: the resolved configuration as dotted keys (MLflow params)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return out


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved configuration as YAML (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)
    return path


def check(condition: bool, key: str, message: str) -> None:
    """Validation helper for ``__post_init__``: raise a ConfigError naming ``key``."""
    if not condition:
        raise ConfigError(message, key=key)


EXAMPLE_OVERRIDES = ("train.epochs=2", "data.shards=/data/shards", "seeds=[0]",
                     "synthetic_count=80", "out=OUT")  # --help's examples, where cls has the key


def example_overrides(cls: type, count: int = 2) -> list[str]:
    """The first ``count`` of :data:`EXAMPLE_OVERRIDES` that ``cls`` accepts."""
    found = []
    for item in EXAMPLE_OVERRIDES:
        try:
            load_config(cls, None, [item])
        except ConfigError:
            continue
        found.append(item)
    return found[:count]


def parse_cli(cls: type[T], description: str, argv: Sequence[str] | None = None,
              default_config: str | None = None, *, command: str | None = None,
              kind: str | None = None) -> T:
    """The command line shared by every launcher: ``--config FILE|NAME [--print-config]
    [key=value ...]`` (see :func:`parse_command`); returns the config."""
    return parse_command(cls, description, argv, default_config, command=command, kind=kind)[0]


def parse_command(cls: type[T], description: str, argv: Sequence[str] | None = None,
                  default_config: str | None = None, *, command: str | None = None,
                  kind: str | None = None, dry_run: str | None = None
                  ) -> tuple[T, argparse.Namespace]:
    """The config and the parsed arguments of ``--config FILE|NAME [--print-config]
    [--list-configs] [--log-level LEVEL] [--version] [--dry-run] [key=value ...]``.

    ``--config`` takes a file, or the name of a shipped config of the folder ``kind``
    (``cmunet-cpu`` for ``kind="pretrain"``, ``pretrain/cmunet-cpu``, ``cmunet://...``; see
    :func:`cmunet.paths.find_config`); ``--list-configs`` lists them (with ``kind`` only).
    ``dry_run``, when given, is the help of a ``--dry-run`` flag (``args.dry_run``)."""
    from cmunet.cli.common import add_common, apply_common, command_parser
    from cmunet.paths import UnknownConfig, find_config

    parser = command_parser(description, "Any config key can be overridden as key=value (dotted "
                            "for nested keys), for example:\n  "
                            + " ".join(example_overrides(cls)))
    parser.add_argument("--config", default=default_config, metavar="FILE|NAME",
                        help="YAML config file, or the name of a shipped config "
                             "(--list-configs lists them)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    if dry_run:
        parser.add_argument("--dry-run", action="store_true", help=dry_run)
    add_common(parser, command or parser.prog, kind, configs=kind is not None)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    # deepspeed's launcher appends --local_rank=N; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)  # flags may come between the key=value overrides
    apply_common(args)
    try:
        path = None if args.config is None else find_config(args.config, kind)
        cfg = load_config(cls, path, args.overrides)
    except (ConfigError, UnknownConfig) as err:
        parser.error(str(err))
    if args.print_config:
        print(dump_config(cfg), end="")
        raise SystemExit(0)
    return cfg, args
