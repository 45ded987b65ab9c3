"""`fedsilo ledger`: what left this site, for the data-protection officer, and whether the record
is intact.

Without options: a table of the entries and a summary (entries and bytes by kind, epsilon spent,
the chain's status). `--json`: the entries as JSON lines, exactly as recorded, so
`fedsilo ledger --json | tail -1` is the latest entry and its hash (copy it off the host).
`--verify`: exit 0 when the chain is intact (a truncated last line, left by a crash while
recording, is said but not an error), 1 with one line naming the first bad entry.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.privacy.ledger import (
    LedgerError,
    LedgerReport,
    ledger_path,
    parse_lines,
    verify_bytes,
)

COMMAND = "fedsilo ledger"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), "", "no privacy ledger here (nothing has been recorded as "
                                         "sent from this state directory, or it is the wrong "
                                         "one)") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "", "is a directory, expected the ledger file") from None
    except PermissionError:
        raise ConfigError(str(path), "", "permission denied (mode 0600: run as the site's "
                                         "service user or root)") from None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read it ({exc.strerror or exc})") from None


def _when(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), tz=timezone.utc).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def table(entries: list[dict[str, Any]]) -> str:
    """One row per entry: seq, time (UTC), round, kind, bytes, destination, epsilon, digest."""
    head = ("seq", "time (UTC)", "round", "kind", "bytes", "destination", "epsilon", "digest")
    rows = [head] + [(
        _cell(e.get("seq")), _when(e.get("ts")), _cell(e.get("round")), _cell(e.get("kind")),
        f"{e['bytes']:,}" if isinstance(e.get("bytes"), int) else _cell(e.get("bytes")),
        _cell(e.get("destination")),
        f"{e['epsilon']:.4g}" if isinstance(e.get("epsilon"), (int, float)) else "-",
        str(e.get("digest", "-"))[:12]) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {0, 2, 4}  # numbers
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                     for r in rows)


def summary(entries: list[dict[str, Any]], report: LedgerReport) -> str:
    """Entries and bytes by kind (of the entries shown), epsilon spent, the chain's status."""
    kinds: dict[str, list[int]] = {}
    for e in entries:
        size = e.get("bytes") if isinstance(e.get("bytes"), int) else 0
        k = kinds.setdefault(str(e.get("kind")), [0, 0])
        k[0], k[1] = k[0] + 1, k[1] + size
    total = sum(b for _, b in kinds.values())
    lines = [f"{len(entries)} entries, {total:,} bytes left this site"]
    for kind, (n, b) in sorted(kinds.items()):
        lines.append(f"  {kind:<12} {n:>6} {'entry' if n == 1 else 'entries':<7} {b:>16,} bytes")
    if report.epsilon:
        spent = ", ".join(f"{eps:.4g} (federation {track.split('/', 1)[0]}, run "
                          f"{track.split('/', 1)[1]})" for track, eps in report.epsilon.items())
        lines.append(f"epsilon spent: {spent}")
    else:
        lines.append("epsilon spent: none recorded (no differential privacy on these releases)")
    if report.ok:
        state = "intact" + (f", last hash {report.last_hash[:16]}" if report.last_hash else "")
        if report.truncated:
            state += "; last line truncated (a crash while recording, nothing sent for it)"
    else:
        seq = f", seq {report.bad_seq}" if report.bad_seq is not None else ""
        state = (f"BROKEN at line {report.bad_line}{seq}: {report.problem} (entries from there "
                 f"on cannot be trusted; fedsilo ledger --verify)")
    lines.append(f"chain: {state}")
    return "\n".join(lines)


def run_ledger(*, state_dir: str | None, config: str | None, verify: bool = False,
               as_json: bool = False, since: int | None = None) -> int:
    """The `fedsilo ledger` command; config and file problems raise ConfigError (exit 2)."""
    if since is not None and since < 0:
        raise ConfigError(COMMAND, "--since", "must be a round number >= 0")
    if config is not None:
        from agent.config import load_site_config

        state_dir = str(load_site_config(config).state_dir)
    if state_dir is None:
        raise ConfigError(COMMAND, "--state-dir/--config", "give the site's state directory "
                                                           "or its config")
    path = ledger_path(state_dir)
    data = _read(path)
    report = verify_bytes(data)
    if verify:
        if as_json:
            print(json.dumps({"path": str(path), **report.to_dict()}, sort_keys=True))
            return 0 if report.ok else 1
        if not report.ok:
            raise LedgerError(report.describe(str(path)))
        print(report.describe(str(path)))
        return 0
    lines = parse_lines(data)
    if since is not None:
        lines = [(raw, e) for raw, e in lines
                 if isinstance(e.get("round"), int) and e["round"] >= since]
    entries = [e for _, e in lines]
    if as_json:
        for raw, _ in lines:  # exactly as recorded
            print(raw.decode("utf-8", "replace"))
        if not report.ok:
            print(f"fedsilo: {report.describe(str(path))}", file=sys.stderr)
        return 0
    print(table(entries))
    print()
    print(summary(entries, report))
    return 0
