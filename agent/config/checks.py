"""Validation machinery shared by every fedsilo TOML file: typed reads that name file and key.

Every check names the file, the key and the problem, so `fedsilo config check` (and every
daemon start) can exit 2 with one line a hospital IT person can act on.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SITE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
FEDERATION_ID_PATTERN = SITE_ID_PATTERN
PROFILE_NAME_PATTERN = SITE_ID_PATTERN  # hardware profiles (agent/ops/hardware.py)
COLUMN_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class _Reader:
    """Reads typed values out of one TOML table, naming file and dotted key on failure."""

    def __init__(self, file: str, table: dict[str, Any], prefix: str) -> None:
        self.file = file
        self.table = table
        self.prefix = prefix
        if not isinstance(table, dict):
            raise ConfigError(file, prefix, "must be a table")

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., *,
            required: bool = False) -> Any:
        if name not in self.table:
            if required or default is ...:
                raise self.fail(name, "is required but missing")
            return default
        value = self.table[name]
        # bool is an int subclass; never accept true/false where a number is asked for.
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            raise self.fail(name, f"must be {_kind_name(kind)}, got a boolean")
        if int in _as_tuple(kind) and float in _as_tuple(kind) and isinstance(value, int):
            return float(value) if kind == (float, int) else value
        if not isinstance(value, kind):
            raise self.fail(name, f"must be {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def number(self, name: str, default: Any = ..., *, lo: float | None = None,
               hi: float | None = None, integer: bool = False) -> Any:
        value = self.get(name, int if integer else (float, int), default)
        if value is None:
            return value
        if lo is not None and value < lo:
            raise self.fail(name, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.fail(name, f"must be <= {hi}, got {value}")
        return float(value) if not integer else int(value)

    def choice(self, name: str, options: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(name, str, default)
        if value not in options:
            raise self.fail(name, f"must be one of {', '.join(options)}; got {value!r}")
        return value

    def pattern(self, name: str, regex: re.Pattern[str], what: str, default: Any = ...) -> str:
        value = self.get(name, str, default)
        if not regex.fullmatch(value):
            raise self.fail(name, f"{value!r} is not a valid {what} (pattern {regex.pattern})")
        return value

    def sub(self, name: str, *, required: bool = False) -> _Reader | None:
        if name not in self.table:
            if required:
                raise self.fail(name, "table is required but missing")
            return None
        value = self.table[name]
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table")
        return _Reader(self.file, value, self.key(name))

    def reject_unknown(self, known: set[str]) -> None:
        for name in self.table:
            if name not in known:
                raise self.fail(name, f"unknown key (expected one of {', '.join(sorted(known))})")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _read_toml(path: Path) -> dict[str, Any]:
    file = str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(file, "", "is a directory, expected a TOML file") from None
    except PermissionError:
        raise ConfigError(file, "", "permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(file, "", "not valid UTF-8 TOML") from None


def _path(base: Path, value: str) -> Path:
    """Relative paths in a config file are relative to that file, like systemd and Mosquitto."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


# ---------------------------------------------------------------------------- loaders

