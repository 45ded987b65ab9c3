"""Logging: journald priorities, and nothing patient-like or payload-like gets written."""

from __future__ import annotations

import base64
import io
import logging
import os

import pytest

from agent.ops.logsetup import MAX_MESSAGE, redact, setup_logging


@pytest.mark.parametrize("line,kept,gone", [
    ("rejected file: PatientName=Doe^John, reason=bad", "reason=bad", "Doe^John"),
    ("PatientID: '12345678' in series 2", "in series 2", "12345678"),
    ("element (0010,0030) Patient's Birth Date 19500101", "element", "19500101"),
    ("body " + base64.b64encode(bytes(range(200))).decode(), "body", "AAECAwQF"),
    ("chunk b'" + "\\x00" * 50 + "' refused", "refused", "\\x00\\x00"),
])
def test_redaction_keeps_the_reason_and_drops_the_value(line, kept, gone):
    out = redact(line)
    assert kept in out and gone not in out


def test_sizes_topics_and_digests_survive_and_long_lines_are_cut():
    line = ("dropped message on fedsilo/v1/fed/site/north/update/3/chunk/0 (1048600 bytes): "
            "chunk_digest_mismatch " + "a" * 64)
    assert redact(line) == line  # a sha256 digest is not a payload
    assert len(redact("x" * 10_000)) < MAX_MESSAGE + 100


def test_setup_logging_filters_and_prefixes_priorities_under_journald(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setitem(os.environ, "JOURNAL_STREAM", "8:1234")
    setup_logging("DEBUG", stream=stream)
    log = logging.getLogger("agent.test")
    log.warning("quarantined %s: PatientName=%s", "file.dcm", "Doe^Jane")
    log.info("round %d closed", 3)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("<4>WARNING agent.test: quarantined file.dcm")
    assert "Doe^Jane" not in lines[0] and "[redacted]" in lines[0]
    assert lines[1] == "<6>INFO agent.test: round 3 closed"
    monkeypatch.delitem(os.environ, "JOURNAL_STREAM")
    setup_logging("INFO")
