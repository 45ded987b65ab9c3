"""A site's kept reply: what it reads back is exactly what it kept, or nothing."""

from __future__ import annotations

import stat

import numpy as np

from agent.federation.envelope import BodyKind, make_manifest
from agent.federation.outbox import Outbox, Reply


def _reply(body: bytes, residual: np.ndarray | None) -> Reply:
    m = make_manifest(federation="f", round=3, sender="north", body_kind=BodyKind.UPDATE,
                      body=body, created=1.0, meta={"run": "r1"})
    return Reply("r1", "ab" * 32, m, body, residual)


def test_kept_reply_reads_back_whole_with_private_files(tmp_path):
    rng = np.random.default_rng(0)
    body = rng.bytes(3000)
    residual = rng.standard_normal(17).astype(np.float32)
    box = Outbox(tmp_path)
    kept = _reply(body, residual)
    box.put(kept)
    box.make_durable()
    got = Outbox(tmp_path).get(max_body=1 << 20)  # as a restarted site reads it
    assert got is not None
    assert got.body == body and got.manifest.header() == kept.manifest.header()  # nonce too
    assert got.run == "r1" and got.task_digest == "ab" * 32
    np.testing.assert_array_equal(got.residual, residual)
    for f in (tmp_path / "outbox").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_a_newer_reply_replaces_the_residual_too(tmp_path):
    box = Outbox(tmp_path)
    box.put(_reply(b"x" * 10, np.ones(4, dtype=np.float32)))
    box.put(_reply(b"y" * 10, None))
    got = Outbox(tmp_path).get(max_body=1 << 20)
    assert got is not None and got.body == b"y" * 10 and got.residual is None


def test_a_body_that_does_not_match_its_manifest_is_not_used(tmp_path):
    assert Outbox(tmp_path).get(max_body=1 << 20) is None  # nothing kept yet
    Outbox(tmp_path).put(_reply(b"z" * 100, np.ones(3, dtype=np.float32)))
    path = tmp_path / "outbox" / "reply.bin"
    good = path.read_bytes()
    path.write_bytes(good.replace(b"z" * 100, b"z" * 99 + b"!"))  # a torn or altered body
    assert Outbox(tmp_path).get(max_body=1 << 20) is None
    for cut in (0, 5, 20, len(good) - 4, len(good) - 1):  # torn anywhere
        path.write_bytes(good[:cut])
        assert Outbox(tmp_path).get(max_body=1 << 20) is None, cut
    path.write_bytes(good)
    assert Outbox(tmp_path).get(max_body=1 << 20) is not None
