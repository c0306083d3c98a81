"""Stage arguments as dataclasses: one definition gives the CLI parser, the config file and argv.

Each stage declares ``@dataclass class XArgs`` whose fields are made with :func:`arg` (help text,
flag, choices); checks live in ``__post_init__`` and raise :class:`ValueError`. From that one
declaration this module builds the argparse parser (:func:`build_parser`), merges
``--config x.yaml`` under the flags (:func:`parse_into`), and turns an instance back into the
exact command line (:func:`to_argv`), which ``distill.ops`` and the TUI use.

Every flag is also accepted with underscores (``--batch_size`` for ``--batch-size``), the
spelling the seed's scripts documented; ``--help`` lists only the hyphenated form.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_UNSET = object()


def arg(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    secret: bool = False,
    env: str | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a command-line option.

    ``secret`` values are never logged and never put on a command line (``to_argv`` passes them
    through ``env`` instead); ``env`` names an environment variable that supplies the default.
    """
    metadata = {"help": help, "flag": flag, "choices": choices, "secret": secret, "env": env}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _flag(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``(inner type, is optional)`` for ``X | None`` annotations."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def _fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("help")]


def _required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser that also takes each long option spelt with underscores.

    ``--batch_size 4`` and ``--no_skip_existing`` read as ``--batch-size 4`` and
    ``--no-skip-existing``. The spelling is mended before parsing, and only where the mended
    option is one this parser knows (or abbreviates one), so help shows one form, unknown flags
    still fail in the user's own spelling, and values after ``--`` are left alone. Subparsers
    made through ``add_subparsers`` are of this class too.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._hyphenated(argv), namespace)

    def _hyphenated(self, argv: list[str]) -> list[str]:
        known = [s for s in self._option_string_actions if s.startswith("--")]
        out = []
        for i, token in enumerate(argv):
            if token == "--":
                return out + argv[i:]
            name, eq, value = token.partition("=")
            if name.startswith("--") and "_" in name and name not in known:
                mended = "--" + name[2:].replace("_", "-")
                if any(s == mended or s.startswith(mended) for s in known):
                    token = mended + eq + value
            out.append(token)
        return out


def build_parser(
    cls: type, parser: argparse.ArgumentParser | None = None
) -> argparse.ArgumentParser:
    """Add one option per field of ``cls`` (defaults left unset so config files can fill them)."""
    parser = parser or ArgumentParser()
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML file of option values; flags override it"
    )
    for field, annotation in _fields(cls):
        inner, _ = _base_type(annotation)
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": _UNSET,
            "help": field.metadata["help"] + (" (required)" if _required(field) else ""),
        }
        if field.metadata.get("choices"):
            kwargs["choices"] = field.metadata["choices"]
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is list:
            kwargs["nargs"] = "+"
            kwargs["type"] = typing.get_args(inner)[0]
        else:
            kwargs["type"] = inner
            kwargs["metavar"] = field.name.upper()
        parser.add_argument(_flag(field), **kwargs)
    return parser


def _coerce(cls: type, name: str, value: Any, annotation: Any, where: str) -> Any:
    inner, optional = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: {name}: must not be null")
    if typing.get_origin(inner) is list:
        item = typing.get_args(inner)[0]
        values = value if isinstance(value, list) else [value]
        return [item(v) for v in values]
    if inner is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {name}: expected true or false, got {value!r}")
        return value
    if inner in (int, float) and isinstance(value, bool):
        raise ValueError(f"{where}: {name}: expected a number, got {value!r}")
    try:
        return inner(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: {name}: expected {getattr(inner, '__name__', inner)}, got {value!r}"
        ) from None


def load_config(cls: type, path: Path) -> dict[str, Any]:
    """Read a YAML config for ``cls``: unknown keys and wrong types fail with the file's name."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ValueError(f"{path}: cannot read config: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ValueError(f"{path}{line}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config must be a mapping of option names to values")
    known = {f.name: a for f, a in _fields(cls)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"{path}: {key}: unknown option (known: {', '.join(sorted(known))})")
        values[name] = _coerce(cls, name, value, known[name], str(path))
    return values


def parse_into(cls: type[T], namespace: argparse.Namespace) -> T:
    """Defaults, then environment, then ``--config``, then flags; build and validate ``cls``."""
    values: dict[str, Any] = {}
    for field, annotation in _fields(cls):
        env = field.metadata.get("env")
        if env and os.environ.get(env):
            values[field.name] = _coerce(cls, field.name, os.environ[env], annotation, f"${env}")
    config = getattr(namespace, "config", None)
    if config is not None:
        values.update(load_config(cls, config))
    for field, _ in _fields(cls):
        value = getattr(namespace, field.name, _UNSET)
        if value is not _UNSET:
            values[field.name] = value
    missing = [_flag(f) for f, _ in _fields(cls) if _required(f) and f.name not in values]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join(missing)}")
    return cls(**values)


def to_argv(obj: Any) -> tuple[list[str], dict[str, str]]:
    """The flags that reproduce ``obj`` (only values that differ from the defaults).

    Returns ``(argv, env)``: secret fields travel in ``env`` (never on a command line, where
    ``ps`` would show them).
    """
    argv: list[str] = []
    env: dict[str, str] = {}
    for field, annotation in _fields(type(obj)):
        value = getattr(obj, field.name)
        default = (
            field.default_factory()
            if field.default_factory is not dataclasses.MISSING
            else field.default
        )
        if value == default and not _required(field):
            continue
        if field.metadata.get("secret"):
            if value and field.metadata.get("env"):
                env[field.metadata["env"]] = str(value)
            continue
        inner, _ = _base_type(annotation)
        flag = _flag(field)
        if inner is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            continue
        elif isinstance(value, list):
            argv.append(flag)
            argv.extend(str(v) for v in value)
        else:
            argv.extend([flag, str(value)])
    return argv, env


def describe(obj: Any) -> dict[str, Any]:
    """The final configuration as a plain dict for logs and run records, secrets redacted."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if field.metadata.get("secret") and value:
            value = "***"
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, list):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[field.name] = value
    return out
