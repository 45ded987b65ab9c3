"""The final model as the sites receive it: files that cannot point outside the model
directory, and the checks a received model passes before use (digest, signature by the
federation's coordinator, ONNX validity). End to end over Mosquitto: test_signed_federation."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from agent.errors import ConfigError, DataError
from agent.federation.envelope import BodyKind, make_manifest
from agent.learn import onnx_export as ox
from agent.learn.distribution import (
    MANIFEST_FILE,
    MODEL_FILE,
    received_digest,
    run_verify,
    save_received_model,
    verify_model,
)
from agent.learn.modelfile import load_model, save_model
from agent.security.pki import PKI
from agent.security.signing import Signer, Verifier
from tests.test_predict_study import saved_model

FED = "stroke-tables"  # the federation of test_predict_study's table plan


# ---------------------------------------------------------------------- model.json paths

@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    save_model(d, saved_model("logistic"))
    return d


def _set(directory, field, value):
    doc = json.loads((directory / "model.json").read_text())
    doc[field] = value
    (directory / "model.json").write_text(json.dumps(doc))


def test_a_normal_model_still_loads(model_dir):
    assert load_model(model_dir).params.size > 0


@pytest.mark.parametrize("name", ["../x.f32", "/etc/passwd", "sub/model.f32", "..", "",
                                  "a\\b.f32"])
def test_params_file_must_be_a_plain_name_inside_the_directory(model_dir, name):
    (model_dir.parent / "x.f32").write_bytes((model_dir / "model.f32").read_bytes())
    _set(model_dir, "params_file", name)
    with pytest.raises(DataError, match="params_file"):
        load_model(model_dir)


def test_params_file_symlink_to_outside_is_refused(model_dir, tmp_path):
    outside = tmp_path / "elsewhere.f32"
    outside.write_bytes((model_dir / "model.f32").read_bytes())  # same digest: only the path
    (model_dir / "link.f32").symlink_to(outside)
    _set(model_dir, "params_file", "link.f32")
    with pytest.raises(DataError, match="params_file.*outside"):
        load_model(model_dir)
    # a symlink to a file inside the directory is still a file of the model
    os.replace(model_dir / "model.f32", model_dir / "real.f32")
    (model_dir / "link.f32").unlink()
    (model_dir / "link.f32").symlink_to("real.f32")
    assert load_model(model_dir).params.size > 0


def test_image_norm_file_is_checked_the_same_way(tmp_path):
    d = tmp_path / "cnn"
    save_model(d, saved_model("cnn_fused"))
    assert load_model(d).image_norm is not None
    _set(d, "image_norm_file", "../image_norm.f32")
    with pytest.raises(DataError, match="image_norm_file"):
        load_model(d)


# ---------------------------------------------------------------------- verify_model

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    p = PKI.init(base / "pki", FED)
    p.issue("coordinator", "coordinator")
    p.issue("site", "north")
    other = PKI.init(base / "other", FED)
    other.issue("coordinator", "coordinator")
    return p, other


@pytest.fixture(scope="module")
def onnx_bytes():
    return ox.to_onnx(saved_model("logistic"), extra={"run": "r-1"}).SerializeToString()


def _header(body: bytes, signer: Signer | None = None, sender: str = "coordinator") -> dict:
    h = make_manifest(federation=FED, round=6, sender=sender, body_kind=BodyKind.MODEL,
                      body=body, created=time.time(), meta={"run": "r-1"}).header()
    h = signer.sign(h) if signer is not None else h
    return json.loads(json.dumps(h))  # as it came over the wire


def _signer(p: PKI, name: str) -> Signer:
    return Signer(p.dir / f"{name}.crt", p.dir / f"{name}.key")


def _verifier(p: PKI) -> Verifier:
    return Verifier(p.dir / "ca.crt", p.dir / "crl.pem")


def test_a_signed_model_verifies(tmp_path, pki, onnx_bytes):
    p, _ = pki
    d = tmp_path / "model"
    path = save_received_model(d, _header(onnx_bytes, _signer(p, "coordinator")), onnx_bytes)
    assert path == d / MODEL_FILE and (d / MANIFEST_FILE).is_file()
    assert received_digest(d) == hashlib.sha256(onnx_bytes).hexdigest()
    checks = []
    v = verify_model(d, _verifier(p), report=lambda check, _detail: checks.append(check))
    assert v.signed and v.signer == "coordinator" and v.path == path
    assert v.sha256 == hashlib.sha256(onnx_bytes).hexdigest()
    assert v.card["federation"] == FED and v.card["run"] == "r-1" and v.card["params_sha256"]
    assert checks == ["files", "digest", "signature", "onnx"]


def test_receipt_check_stops_before_onnx(tmp_path, pki):
    """What the site runs on receipt: files, digest and signature, not the ONNX checker (so a
    training site never imports onnx); the full check still refuses a body that is no ONNX."""
    p, _ = pki
    d = tmp_path / "model"
    body = b"not an onnx model at all"
    save_received_model(d, _header(body, _signer(p, "coordinator")), body)
    checks = []
    v = verify_model(d, _verifier(p), check_onnx=False,
                     report=lambda check, _detail: checks.append(check))
    assert v.signed and v.card == {} and checks == ["files", "digest", "signature"]
    with pytest.raises(DataError, match="not a valid ONNX model"):
        verify_model(d, _verifier(p))


def test_one_flipped_byte_is_refused_as_tampered(tmp_path, pki, onnx_bytes):
    p, _ = pki
    d = tmp_path / "model"
    save_received_model(d, _header(onnx_bytes, _signer(p, "coordinator")), onnx_bytes)
    raw = bytearray((d / MODEL_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (d / MODEL_FILE).write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{MODEL_FILE}: tampered or truncated"):
        verify_model(d, _verifier(p))
    (d / MODEL_FILE).write_bytes(onnx_bytes[:-10])
    with pytest.raises(DataError, match="tampered or truncated"):
        verify_model(d, _verifier(p))


def test_signed_by_a_site_is_refused(tmp_path, pki, onnx_bytes):
    p, _ = pki
    d = tmp_path / "model"
    save_received_model(d, _header(onnx_bytes, _signer(p, "north")), onnx_bytes)
    with pytest.raises(DataError, match="wrong signer or role"):
        verify_model(d, _verifier(p))
    # and a site certificate claiming to be the sender changes nothing
    save_received_model(d, _header(onnx_bytes, _signer(p, "north"), sender="north"), onnx_bytes)
    with pytest.raises(DataError, match="not the coordinator"):
        verify_model(d, _verifier(p))


def test_signed_under_another_ca_is_refused(tmp_path, pki, onnx_bytes):
    p, other = pki
    d = tmp_path / "model"
    save_received_model(d, _header(onnx_bytes, _signer(other, "coordinator")), onnx_bytes)
    with pytest.raises(DataError, match="not issued by the federation CA"):
        verify_model(d, _verifier(p))


def test_a_changed_manifest_breaks_its_signature(tmp_path, pki, onnx_bytes):
    p, _ = pki
    d = tmp_path / "model"
    header = _header(onnx_bytes, _signer(p, "coordinator"))
    header["meta"]["run"] = "r-2"
    save_received_model(d, header, onnx_bytes)
    with pytest.raises(DataError, match="signature does not match"):
        verify_model(d, _verifier(p))


def test_unsigned_only_with_allow_unsigned(tmp_path, pki, onnx_bytes):
    p, _ = pki
    d = tmp_path / "model"
    save_received_model(d, _header(onnx_bytes), onnx_bytes)
    with pytest.raises(DataError, match="unsigned manifest"):
        verify_model(d, _verifier(p))
    with pytest.raises(DataError, match="unsigned manifest"):
        verify_model(d, None)
    v = verify_model(d, None, allow_unsigned=True)
    assert not v.signed and v.signer is None
    # a signed manifest with no CA to check it against is not "verified" either
    save_received_model(d, _header(onnx_bytes, _signer(p, "coordinator")), onnx_bytes)
    with pytest.raises(DataError, match="no federation CA"):
        verify_model(d, None)
    assert not verify_model(d, None, allow_unsigned=True).signed


@pytest.mark.parametrize("damage,message", [
    ("no model", "model.onnx: missing"),
    ("no manifest", "model.manifest.json: missing"),
    ("manifest not json", "model.manifest.json: not JSON"),
    ("another body kind", "not a model's"),
    ("not onnx", "not a valid ONNX model"),
    ("no params digest", "no params_sha256"),
])
def test_what_else_is_refused_names_the_file(tmp_path, pki, onnx_bytes, damage, message):
    p, _ = pki
    d = tmp_path / "model"
    body = onnx_bytes
    if damage == "not onnx":
        body = b"\x08\x07garbage that is no protobuf model" * 3
    elif damage == "no params digest":
        model = ox.to_onnx(saved_model("logistic"))
        del model.metadata_props[:]
        body = model.SerializeToString()
    header = _header(body, _signer(p, "coordinator"))
    if damage == "another body kind":
        header = _signer(p, "coordinator").sign(
            {k: v for k, v in header.items() if k not in ("cert", "sig")} | {"body_kind": "task"})
    save_received_model(d, header, body)
    if damage == "no model":
        (d / MODEL_FILE).unlink()
    elif damage == "no manifest":
        (d / MANIFEST_FILE).unlink()
    elif damage == "manifest not json":
        (d / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DataError, match=message):
        verify_model(d, _verifier(p))


def test_save_refuses_a_body_its_manifest_does_not_name(tmp_path, onnx_bytes):
    with pytest.raises(DataError, match="digest"):
        save_received_model(tmp_path / "m", _header(onnx_bytes), onnx_bytes + b"x")
    assert not (tmp_path / "m" / MODEL_FILE).exists()


# ---------------------------------------------------------------------- run_verify (the CLI)

def test_run_verify_prints_each_check_and_the_card(tmp_path, pki, onnx_bytes, capsys):
    p, other = pki
    d = tmp_path / "model"
    save_received_model(d, _header(onnx_bytes, _signer(p, "coordinator")), onnx_bytes)
    assert run_verify(d, config=None, ca=p.dir / "ca.crt", crl=p.dir / "crl.pem",
                      allow_unsigned=False) == 0
    out = capsys.readouterr().out
    for check in ("files", "digest", "signature", "onnx"):
        assert f"ok    {check}" in out
    assert f"federation {FED}" in out and "kind logistic" in out and "created 20" in out
    assert run_verify(d / MODEL_FILE, config=None, ca=other.dir / "ca.crt", crl=None,
                      allow_unsigned=False) == 1
    assert "FAIL  refused" in capsys.readouterr().out


def test_run_verify_takes_the_ca_from_a_site_config(tmp_path, pki, onnx_bytes, capsys):
    p, _ = pki
    d = tmp_path / "model"
    save_received_model(d, _header(onnx_bytes, _signer(p, "coordinator")), onnx_bytes)
    cfg = tmp_path / "north.toml"
    cfg.write_text(f"""
[site]
id = "north"
federation = "{FED}"
state_dir = "{tmp_path / 'state'}"
[broker]
host = "127.0.0.1"
[identity]
ca = "{p.dir / 'ca.crt'}"
cert = "{p.dir / 'north.crt'}"
key = "{p.dir / 'north.key'}"
crl = "{p.dir / 'crl.pem'}"
""")
    assert run_verify(d, config=cfg, ca=None, crl=None, allow_unsigned=False) == 0
    assert "signed by coordinator" in capsys.readouterr().out


def test_run_verify_config_problems_are_config_errors(tmp_path, pki, onnx_bytes):
    p, _ = pki
    d = tmp_path / "model"
    save_received_model(d, _header(onnx_bytes), onnx_bytes)
    with pytest.raises(ConfigError, match="--ca"):
        run_verify(d, config=None, ca=None, crl=None, allow_unsigned=False)
    with pytest.raises(ConfigError):
        run_verify(d, config=None, ca=tmp_path / "nope.crt", crl=None, allow_unsigned=False)
    with pytest.raises(ConfigError, match="--crl"):
        run_verify(d, config=None, ca=None, crl=p.dir / "crl.pem", allow_unsigned=False)
    assert run_verify(d, config=None, ca=None, crl=None, allow_unsigned=True) == 0


# ---------------------------------------------------------------------- the coordinator's export

def test_coordinator_export_card_and_rewrite_only_when_stale(tmp_path):
    """The exported card describes the run from its history, and a restarted coordinator
    sends the very same bytes (the file is not rewritten while its card matches)."""
    from agent.config import BrokerConfig, CoordinatorConfig
    from agent.federation.coordinator import Coordinator
    from tests.fedharness import breast_cancer_sites
    from tests.test_federation import plan_for

    _tables, _test, features = breast_cancer_sites(tmp_path / "data")
    coord = Coordinator(CoordinatorConfig(state_dir=tmp_path / "state",
                                          broker=BrokerConfig(port=1)),
                        plan_for(features, ["north", "south", "east"], rounds=3))
    final_eval = {"n": 40.0, "auc": 0.9, "auc_n": 40.0, "auc_sites": ["north"]}
    coord.history = [{"round": 1, "sites": ["north", "south"]},
                     {"round": 2, "sites": ["north"]},  # stopped early, east never took part
                     {"final": {"round": 4, "eval": final_eval}}]
    coord._ensure_model()
    path = coord._ensure_onnx()
    assert path == tmp_path / "state" / "model" / "model.onnx"
    card = ox.model_card(ox.load_onnx(path))
    assert card["run"] == coord.run_id and card["rounds_completed"] == "2"
    assert card["rounds"] == "3" and card["training_sites"] == "2"
    assert json.loads(card["final_metrics"]) == final_eval and "epsilon" not in card
    before, stat = path.read_bytes(), path.stat().st_mtime_ns
    time.sleep(0.01)
    assert coord._ensure_onnx() == path and path.stat().st_mtime_ns == stat
    coord.run_id = "another-run"  # a card of another run is written again
    coord._ensure_onnx()
    assert ox.model_card(ox.load_onnx(path))["run"] == "another-run"
    path.write_bytes(before[:100])  # a torn file too
    coord._ensure_onnx()
    assert ox.model_card(ox.load_onnx(path))["run"] == "another-run"


# ---------------------------------------------------------------------- a site receiving it

@pytest.mark.integration
def test_site_waits_for_a_model_that_finished_names_and_ignores_other_runs(tmp_path, mosquitto,
                                                                           onnx_bytes):
    """A real `fedsilo site run` against Mosquitto, driven by hand as a coordinator without a
    PKI: a model of another run is refused; "finished" arrives before the model it names, and
    the site waits for it, keeps it, verifies it (unsigned: no PKI) and only then exits."""
    import paho.mqtt.client as mqtt

    from agent.federation import envelope, topics
    from tests.fedharness import breast_cancer_sites, start_site, stop_all, write_site_config
    from tests.test_crash_recovery import wait_for_line
    from tests.test_lifecycle import read_retained

    fed = FED
    tables, _test, _features = breast_cancer_sites(tmp_path / "data")
    cfg = write_site_config(tmp_path / "sites", "north", fed, mosquitto.port, tables[0])
    state = tmp_path / "sites" / "north"
    state.mkdir(parents=True)
    (state / "site-state.json").write_text(json.dumps(
        {"federation": fed, "run": "r-1", "answered": [], "finished_runs": []}))
    log = tmp_path / "north.log"
    proc = start_site(cfg, log)
    read_retained(mosquitto.port, topics.site_status(fed, "north"),
                  lambda d: d["state"] == "idle", timeout=60)

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="coordinator-by-hand")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()

    def send(rnd, kind, body, meta, control=False):
        m = make_manifest(federation=fed, round=rnd, sender="coordinator", body_kind=kind,
                          body=body, created=time.time(), meta=meta)
        head = topics.coordinator_control(fed) if control else \
            topics.coordinator_manifest(fed, rnd)
        infos = [pub.publish(head, envelope.encode(m.header()), qos=1, retain=True)]
        infos += [pub.publish(topics.coordinator_chunk(fed, rnd, k), payload, qos=1)
                  for k, payload in envelope.iter_chunks(m, body)]
        for info in infos:
            info.wait_for_publish(10)

    try:
        other = ox.to_onnx(saved_model("logistic", seed=1)).SerializeToString()
        send(6, BodyKind.MODEL, other, {"run": "run-z"})
        wait_for_line(log, "model_of_another_run")
        digest = hashlib.sha256(onnx_bytes).hexdigest()
        send(5, BodyKind.FINISHED, b"", {"run": "r-1", "model": {
            "round": 6, "sha256": digest, "bytes": len(onnx_bytes)}}, control=True)
        wait_for_line(log, "waiting up to 60 s for the final model")
        assert proc.poll() is None
        send(6, BodyKind.MODEL, onnx_bytes, {"run": "r-1"})
        assert stop_all([proc], timeout=60) == [0]
    finally:
        pub.loop_stop()
        pub.disconnect()
    text = log.read_text()
    assert f"model of run r-1 saved to {state / 'model' / MODEL_FILE}" in text
    assert "UNSIGNED" in text and "Traceback" not in text
    v = verify_model(state / "model", None, allow_unsigned=True)
    assert v.sha256 == digest and not v.signed
    assert json.loads((state / "model" / MANIFEST_FILE).read_text())["meta"]["run"] == "r-1"
