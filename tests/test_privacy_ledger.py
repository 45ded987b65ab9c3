"""The privacy ledger: every release is recorded durably and chained, and every kind of edit to
the file is found at the right entry; a crash mid-append is told apart from tampering and
repaired; `fedsilo ledger` shows and checks it for the data-protection officer."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys

import pytest

from agent.errors import FedsiloError
from agent.ops.statedir import StateError
from agent.privacy import ledger as ledger_mod
from agent.privacy.ledger import (
    LEDGER_NAME,
    Ledger,
    LedgerError,
    canonical,
    entry_hash,
    genesis_hash,
    verify,
    verify_bytes,
)

FED = "stroke-test"
TOPIC = "fedsilo/v1/stroke-test/site/north/reply"


def fill(ledger: Ledger, n: int = 5) -> list[dict]:
    """n releases: stats in round 0, then an update and its evaluation per round, DP on."""
    out = []
    for i in range(n):
        kind = "stats" if i == 0 else ("update" if i % 2 else "evaluation")
        out.append(ledger.append(
            federation=FED, run="run-a", round=(i + 1) // 2, kind=kind,
            destination=f"{TOPIC}/{i}", body=os.urandom(64 + 32 * i),
            epsilon=None if kind != "update" else 0.25 * i,
            detail={"codec": "int8", "secure": True, "clipped_values": i}))
    return out


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    return d


def lines_of(path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def rechain(entries: list[dict]) -> list[bytes]:
    """What someone with write access can do: a consistent chain over edited entries."""
    out: list[bytes] = []
    for e in entries:
        e = dict(e)
        e["prev"] = hashlib.sha256(out[-1]).hexdigest() if out else genesis_hash(e["federation"])
        e["hash"] = entry_hash(e)
        out.append(canonical(e))
    return out


# ------------------------------------------------------------------------------ round trip

def test_append_read_round_trip(state):
    ledger = Ledger.for_state_dir(state)
    body = b"\x00\x01 an update body"
    first = ledger.append(federation=FED, run="run-a", round=1, kind="update",
                          destination=TOPIC, body=body, epsilon=1,
                          detail={"codec": "int8", "secure": True, "clipped_values": 0})
    assert first["seq"] == 0 and first["bytes"] == len(body)
    assert first["digest"] == hashlib.sha256(body).hexdigest()
    assert first["epsilon"] == 1.0 and isinstance(first["epsilon"], float)
    assert first["prev"] == genesis_hash(FED) and first["hash"] == entry_hash(first)
    assert first["ts"] == round(first["ts"], 3)
    second = ledger.append(federation=FED, run="run-a", round=1, kind="metrics",
                           destination=TOPIC + "/m", digest="ab" * 32, size=10)
    assert second["seq"] == 1 and second["epsilon"] is None and second["detail"] == {}
    assert second["prev"] == hashlib.sha256(lines_of(state / LEDGER_NAME)[0]).hexdigest()
    assert list(ledger.entries()) == [first, second] == list(Ledger(state / LEDGER_NAME)
                                                             .entries())
    for raw in lines_of(state / LEDGER_NAME):  # sorted keys, compact
        assert raw == canonical(json.loads(raw))
    assert len(ledger) == 2


def test_chain_verifies_with_counts(state):
    entries = fill(Ledger.for_state_dir(state))
    report = verify(state / LEDGER_NAME)
    assert report.ok and report.status == "intact" and not report.truncated
    assert report.entries == report.lines == 5 and report.last_seq == 4
    assert report.last_hash == entries[-1]["hash"]
    assert report.count_by_kind == {"stats": 1, "update": 2, "evaluation": 2}
    assert report.bytes_by_kind["stats"] == 64
    assert report.epsilon == {f"{FED}/run-a": 0.75}
    assert "intact, 5 entries" in report.describe()


def test_empty_ledger_is_intact_and_file_is_0600(state):
    old = os.umask(0)
    try:
        Ledger.for_state_dir(state)
    finally:
        os.umask(old)
    path = state / LEDGER_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert verify(path).status == "intact" and verify(path).entries == 0
    fill(Ledger(path), 2)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_resend_is_not_a_second_release(state):
    ledger = Ledger.for_state_dir(state)
    args = dict(federation=FED, run="run-a", round=3, kind="update", destination=TOPIC,
                body=b"same bytes", epsilon=0.5)
    first = ledger.append(**args)
    assert ledger.append(**args) == first
    assert Ledger.for_state_dir(state).append(**args) == first  # after a restart too
    assert len(lines_of(state / LEDGER_NAME)) == 1
    other = ledger.append(**{**args, "destination": TOPIC + "/elsewhere"})
    assert other["seq"] == 1


def test_refused_entries(state):
    ledger = Ledger.for_state_dir(state)
    good = dict(federation=FED, run="r", round=1, kind="update", destination=TOPIC, body=b"x")
    for bad in ({"kind": "Status!"}, {"kind": ""}, {"round": -1}, {"round": True},
                {"destination": ""}, {"epsilon": float("nan")}, {"epsilon": -1.0},
                {"digest": "ab" * 32}, {"detail": {"blob": "x" * 5000}},
                {"detail": {"bad": object()}}):
        with pytest.raises(ValueError):
            ledger.append(**{**good, **bad})
    with pytest.raises(ValueError):
        ledger.append(**{k: v for k, v in good.items() if k != "body"}, digest="AB" * 32, size=1)
    ledger.append(**good, epsilon=2.0)
    with pytest.raises(LedgerError, match="lower than"):
        ledger.append(**{**good, "body": b"y"}, epsilon=1.0)
    ledger.append(**{**good, "body": b"z", "run": "next-run"}, epsilon=0.1)  # a new accountant
    assert verify(state / LEDGER_NAME).ok and len(ledger) == 2


def test_clock_stepping_back_keeps_ts_monotone(state, monkeypatch):
    ledger = Ledger.for_state_dir(state)
    clock = iter([1000.0, 900.0, 1100.0])
    monkeypatch.setattr(ledger_mod.time, "time", lambda: next(clock))
    ts = [ledger.append(federation=FED, run="r", round=1, kind="metrics", destination=TOPIC,
                        body=bytes([i]))["ts"] for i in range(3)]
    assert ts == [1000.0, 1000.0, 1100.0]
    assert verify(state / LEDGER_NAME).ok


# -------------------------------------------------------------------------------- tampering

def _edit(field, value, rehash=False):
    def edit(lines):
        e = json.loads(lines[2])
        e[field] = value
        if rehash:
            e["hash"] = entry_hash(e)
        lines[2] = canonical(e)
        return lines
    return edit


TAMPERING = {
    # name: (edit of the lines of a 5-entry ledger, first bad line, its seq, words)
    "bytes edited": (_edit("bytes", 1), 3, 2, "hash does not match"),
    "bytes edited, hash recomputed": (_edit("bytes", 1, rehash=True), 4, 3, "prev does not"),
    "line deleted": (lambda ls: ls[:2] + ls[3:], 3, 3, "seq is 3, expected 2"),
    "first line deleted": (lambda ls: ls[1:], 1, 1, "expected 0"),
    "two lines swapped": (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 2, 2, "expected 1"),
    "prev edited": (_edit("prev", "0" * 64), 3, 2, "hash does not match"),
    "prev edited, hash recomputed": (_edit("prev", "0" * 64, rehash=True), 3, 2,
                                     "prev does not match"),
    "hash edited": (_edit("hash", "f" * 64), 3, 2, "hash does not match"),
    "spaces added": (lambda ls: [*ls[:2], ls[2].replace(b",", b", "), *ls[3:]], 3, 2,
                     "canonical"),
    "garbage line": (lambda ls: [*ls[:2], b"{not json", *ls[3:]], 3, None, "not valid JSON"),
    "empty line": (lambda ls: [*ls[:2], b"", *ls[2:]], 3, None, "empty line"),
    "field removed": (lambda ls: [*ls[:2], canonical({k: v for k, v in json.loads(ls[2])
                                                      .items() if k != "digest"}), *ls[3:]],
                      3, 2, "'digest' is missing"),
}


@pytest.mark.parametrize("name", TAMPERING)
def test_tampering_is_found_at_the_first_bad_entry(state, name):
    edit, line, seq, words = TAMPERING[name]
    fill(Ledger.for_state_dir(state))
    path = state / LEDGER_NAME
    write_lines(path, edit(lines_of(path)))
    report = verify(path)
    assert not report.ok and report.status == "broken" and not report.truncated
    assert (report.bad_line, report.bad_seq) == (line, seq), report.problem
    assert words in report.problem
    assert report.entries == line - 1
    assert f"line {line}" in report.describe()
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="chain broken"):  # never repaired, never appended to
        Ledger(path)
    assert path.read_bytes() == before


def test_consistent_rewrites_ts_and_epsilon(state):
    fill(Ledger.for_state_dir(state))
    path = state / LEDGER_NAME
    entries = [json.loads(raw) for raw in lines_of(path)]
    # The limit the docs state: a consistent rewrite of the whole chain verifies.
    rewritten = [dict(e) for e in entries]
    rewritten[2]["bytes"] = 1
    write_lines(path, rechain(rewritten))
    assert verify(path).ok
    backwards = [dict(e) for e in entries]
    backwards[3]["ts"] = backwards[2]["ts"] - 10
    report = verify_bytes(b"".join(x + b"\n" for x in rechain(backwards)))
    assert (report.bad_seq, report.ok) == (3, False) and "earlier" in report.problem
    spent = [dict(e) for e in entries]
    spent[3]["epsilon"] = 0.1  # seq 1 spent 0.25 in the same run
    report = verify_bytes(b"".join(x + b"\n" for x in rechain(spent)))
    assert report.bad_seq == 3 and "epsilon 0.1 is lower" in report.problem
    first = {**entries[0], "prev": genesis_hash("another-federation")}  # moved from another
    first["hash"] = entry_hash(first)
    report = verify_bytes(canonical(first) + b"\n")
    assert report.bad_seq == 0 and "not the genesis hash" in report.problem


# ----------------------------------------------------------------------------- crash repair

@pytest.mark.parametrize("keep", [0.5, 1.0])  # half a line, or all of it but the newline
def test_truncated_last_line_is_reported_and_repaired(state, caplog, keep):
    path = state / LEDGER_NAME
    ledger = Ledger(path)
    entries = fill(ledger, 3)
    complete = path.read_bytes()
    partial = canonical({**entries[-1], "seq": 3})
    with open(path, "ab") as fh:
        fh.write(partial[:int(len(partial) * keep)])
    report = verify(path)
    assert report.ok and report.truncated and report.status == "truncated"
    assert report.entries == 3 and report.truncated_bytes == int(len(partial) * keep)
    assert "truncated" in report.describe() and "broken" not in report.describe()
    with caplog.at_level(logging.WARNING, logger="agent.privacy.ledger"):
        reopened = Ledger(path)
    assert "partial last line" in caplog.text
    assert path.read_bytes() == complete
    nxt = reopened.append(federation=FED, run="run-a", round=2, kind="update",
                          destination=TOPIC, body=b"after the crash", epsilon=0.9)
    assert nxt["seq"] == 3
    assert nxt["prev"] == hashlib.sha256(complete.split(b"\n")[-2]).hexdigest()
    assert verify(path).status == "intact" and verify(path).entries == 4


def test_failed_write_leaves_no_partial_line(state, monkeypatch):
    ledger = Ledger.for_state_dir(state)
    fill(ledger, 2)
    path = state / LEDGER_NAME
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 20:
            real_write(fd, bytes(data[:20]))
            return 20
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ledger_mod.os, "write", half_then_full)
    with pytest.raises(StateError) as err:
        ledger.append(federation=FED, run="run-a", round=5, kind="update", destination=TOPIC,
                      body=b"never sent")
    monkeypatch.setattr(ledger_mod.os, "write", real_write)
    assert err.value.code == "disk_full"
    assert path.read_bytes() == before
    assert ledger.append(federation=FED, run="run-a", round=5, kind="update",
                         destination=TOPIC, body=b"never sent")["seq"] == 2
    assert verify(path).status == "intact"


def test_file_changed_under_the_writer_is_refused(state):
    ledger = Ledger.for_state_dir(state)
    fill(ledger, 2)
    (state / LEDGER_NAME).unlink()
    with pytest.raises(LedgerError, match="changed under the site"):
        fill(ledger, 1)
    assert isinstance(LedgerError("x"), FedsiloError)


# -------------------------------------------------------------------------------------- CLI

def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "ledger", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_table_summary_json_and_since(state, tmp_path):
    fill(Ledger.for_state_dir(state))
    run = cli("--state-dir", str(state))
    assert run.returncode == 0, run.stderr
    out = run.stdout
    header = out.splitlines()[0].split()
    assert header[:4] == ["seq", "time", "(UTC)", "round"]
    for word in ("kind", "bytes", "destination", "epsilon", "digest"):
        assert word in header
    assert f"{TOPIC}/4" in out and "Z " in out  # ISO time in UTC
    assert "5 entries, " in out and "bytes left this site" in out
    assert "stats" in out and "evaluation" in out
    assert "epsilon spent: 0.75 (federation stroke-test, run run-a)" in out
    assert "chain: intact" in out
    rows = [line for line in out.splitlines() if TOPIC in line]
    assert len(rows) == 5
    since = cli("--state-dir", str(state), "--since", "2")
    assert [line.split()[0] for line in since.stdout.splitlines() if TOPIC in line] == ["3", "4"]
    js = cli("--state-dir", str(state), "--json")
    assert js.returncode == 0
    raw = (state / LEDGER_NAME).read_text().splitlines()
    assert js.stdout.splitlines() == raw  # exactly as recorded; tail -1 is the latest hash
    assert json.loads(js.stdout.splitlines()[-1])["seq"] == 4
    (tmp_path / "site.toml").write_text(
        f'[site]\nid = "north"\nfederation = "{FED}"\nstate_dir = "state"\n')
    via_config = cli("--config", str(tmp_path / "site.toml"), "--verify")
    assert via_config.returncode == 0, via_config.stderr
    assert "intact, 5 entries" in via_config.stdout


def test_cli_verify_exit_codes(state):
    fill(Ledger.for_state_dir(state))
    path = state / LEDGER_NAME
    good = cli("--state-dir", str(state), "--verify")
    assert good.returncode == 0 and "intact" in good.stdout, good.stderr
    write_lines(path, _edit("bytes", 1)(lines_of(path)))
    bad = cli("--state-dir", str(state), "--verify")
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in bad.stderr
    assert "line 3, seq 2" in lines[0] and "hash does not match" in lines[0]
    as_json = cli("--state-dir", str(state), "--verify", "--json")
    assert as_json.returncode == 1
    doc = json.loads(as_json.stdout)
    assert (doc["status"], doc["bad_seq"], doc["bad_line"]) == ("broken", 2, 3)
    listing = cli("--state-dir", str(state))  # still shown, with the chain's state
    assert listing.returncode == 0 and "chain: BROKEN at line 3, seq 2" in listing.stdout


def test_cli_missing_ledger_and_bad_config_exit_2(tmp_path):
    for args in (["--state-dir", str(tmp_path / "nowhere")],
                 ["--state-dir", str(tmp_path), "--verify"],
                 ["--config", str(tmp_path / "missing.toml")]):
        run = cli(*args)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert "no privacy ledger" in cli("--state-dir", str(tmp_path)).stderr
    assert cli("--state-dir", str(tmp_path), "--since", "-1").returncode == 2
    usage = cli()  # neither --state-dir nor --config: argparse's usage error
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
