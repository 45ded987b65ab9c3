"""One root exception so callers can catch "anything fedsilo refused" in one place.

Each subclass carries the exit code the command line uses for it.
"""

from __future__ import annotations


class FedsiloError(Exception):
    """Root of every error fedsilo raises on purpose."""

    exit_code = 1


class ConfigError(FedsiloError):
    """A config or plan file is missing, unreadable or invalid."""

    exit_code = 2

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")


class DataError(FedsiloError):
    """Local data (a table, a DICOM file) cannot be used."""


class ProtocolError(FedsiloError):
    """A message on the wire is malformed, foreign, stale or too large.

    `reason` is a short machine-readable code; the message never contains payload bytes.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class NotWanted(ProtocolError):
    """A sound message this role has no use for (a model it holds already, another run's):
    refused like any other, but logged at INFO and not counted as a rejected message, so
    monitoring does not alarm on every restart."""


class BrokerError(FedsiloError):
    """The MQTT broker cannot be reached or refused us."""
