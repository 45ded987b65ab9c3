"""The final model as a site receives it, and the checks that must pass before anyone uses it.

Why a module of its own: a model that scores patients must be the one the federation's
coordinator published, whole, and nothing else. The coordinator sends `model.onnx` as a
`model` body (agent/federation/envelope.py) whose manifest it signs like every task; the site
keeps that manifest header *as received* (`model.manifest.json`, with `cert` and `sig`) next
to the file, so the same checks run again offline, at any later time, by the scorer
(agent/results/scoring.py) or `fedsilo model verify`:

- both files are there and the manifest is a JSON model manifest;
- the file's SHA-256 and length are the ones the manifest names (else: tampered or truncated);
- the manifest is signed by the `coordinator` identity, role `coordinator`, under the
  federation CA (and not revoked), exactly as the site checked it on the wire;
- the file is a valid ONNX model whose card names its parameters (`params_sha256`) and the
  manifest's federation.

An unsigned manifest (the demo without a PKI) passes only with `allow_unsigned=True`, and is
reported as unsigned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError, DataError, ProtocolError
from agent.ops.atomic import write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:  # cryptography is imported only where a CA is given
    from agent.security.signing import Verifier

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "model.manifest.json"
MODEL_BODY_KIND = "model"  # agent.federation.envelope.BodyKind.MODEL (no import of the wire here)
MAX_MANIFEST_BYTES = 256 * 1024  # envelope.MAX_HEADER_BYTES: nothing larger was ever received
WHERE = "fedsilo model verify"


@dataclass(frozen=True)
class VerifiedModel:
    """A model that passed every check: what it is and who vouched for it."""

    path: Path  # the model.onnx file
    sha256: str  # of the file
    card: dict[str, str]  # the ONNX model card (metadata_props)
    signer: str | None  # the certificate's name that signed the manifest; None when unsigned
    signed: bool  # False: accepted unsigned (allow_unsigned), nothing vouches for it
    manifest: dict[str, Any]  # the manifest header as received

    @property
    def short(self) -> str:
        """Short digest for people and status documents."""
        return self.sha256[:12]


def save_received_model(directory: Path, manifest_header: dict[str, Any], body: bytes) -> Path:
    """Keep a received model: body first, then the manifest (each written atomically), so a
    crash in between leaves a pair that fails verification rather than one that passes with
    the wrong file. Returns the model file's path."""
    directory = Path(directory)
    if hashlib.sha256(body).hexdigest() != manifest_header.get("body_digest"):
        raise DataError(f"{directory / MODEL_FILE}: body does not match its manifest's digest")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MODEL_FILE
    write_bytes_atomic(path, body)
    write_json_atomic(directory / MANIFEST_FILE, manifest_header)
    return path


def received_digest(directory: Path) -> str | None:
    """The body digest the kept manifest names (None without a readable one): tells a site
    whether it already holds a model, without the cost of full verification."""
    try:
        doc = json.loads((Path(directory) / MANIFEST_FILE).read_text())
        digest = doc.get("body_digest") if isinstance(doc, dict) else None
        if isinstance(digest, str) and (Path(directory) / MODEL_FILE).is_file():
            return digest
    except (OSError, ValueError):
        pass
    return None


def verify_model(directory: Path, verifier: Verifier | None, *, allow_unsigned: bool = False,
                 report: Callable[[str, str], None] | None = None,
                 check_onnx: bool = True) -> VerifiedModel:
    """Every check above, in order; DataError names the file and the first problem.

    `report(check, detail)` is called after each check that passed (the CLI prints them).
    `check_onnx=False` stops after the signature (card then empty): the site checks what it
    wrote on receipt without importing onnx (~15 MiB); the scorer then opens the file with
    onnxruntime alone (which parses and checks it) and applies `check_card` to its card."""
    directory = Path(directory)
    if directory.is_file():  # the model file itself was named
        directory = directory.parent
    say = report or (lambda _check, _detail: None)
    path, manifest_path = directory / MODEL_FILE, directory / MANIFEST_FILE
    raw = _read(path, "the model")
    header = _manifest(manifest_path)
    say("files", f"{path} ({len(raw)} bytes), {manifest_path}")

    digest = hashlib.sha256(raw).hexdigest()
    if digest != header["body_digest"] or len(raw) != header.get("body_len", len(raw)):
        raise DataError(f"{path}: tampered or truncated: SHA-256 {digest[:12]}…, {len(raw)} "
                        f"bytes; its manifest names {str(header['body_digest'])[:12]}…, "
                        f"{header.get('body_len')} bytes")
    say("digest", f"sha256 {digest} matches the manifest")

    signed = "sig" in header or "cert" in header
    signer: str | None = None
    if signed and verifier is not None:
        if header.get("sender") != "coordinator":
            raise DataError(f"{manifest_path}: sent by {header.get('sender')!r}, not the "
                            "coordinator")
        try:
            verifier.verify(header, sender="coordinator", role="coordinator")
        except ProtocolError as exc:
            raise DataError(f"{manifest_path}: signature refused ({_why(exc)})") from None
        signer = "coordinator"
        say("signature", "signed by the coordinator, certificate issued by the federation CA")
    elif signed:
        if not allow_unsigned:
            raise DataError(f"{manifest_path}: signed, but no federation CA was given to check "
                            "the signature")
        signed = False
        say("signature", "NOT CHECKED (no federation CA given; allowed)")
    elif allow_unsigned:
        say("signature", "UNSIGNED (no PKI: allowed, nothing vouches for this model)")
    else:
        raise DataError(f"{manifest_path}: unsigned manifest; nothing vouches for this model "
                        "(only a demo without a PKI may allow it)")

    if not check_onnx:
        return VerifiedModel(path=path, sha256=digest, card={}, signer=signer, signed=signed,
                             manifest=header)
    card = _onnx_card(path, raw)
    check_card(path, card, header)
    say("onnx", f"valid ONNX model, card parameters {card['params_sha256'][:12]}")
    return VerifiedModel(path=path, sha256=digest, card=card, signer=signer, signed=signed,
                         manifest=header)


def _why(exc: ProtocolError) -> str:
    """Signature refusals in words (the reason code stays for grep)."""
    words = {"signer_mismatch": "wrong signer or role",
             "untrusted_signer": "not issued by the federation CA",
             "bad_signature": "the signature does not match the manifest",
             "signer_revoked": "the signer's certificate is revoked",
             "signer_expired": "the signer's certificate is not valid now",
             "crl_stale": "the CRL is past its nextUpdate",
             "unsigned": "no signature"}
    return f"{words.get(exc.reason, exc.reason)}: {exc}"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: missing ({what} was never received, or was removed)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def _manifest(path: Path) -> dict[str, Any]:
    """The kept manifest header, checked for the fields the checks read."""
    raw = _read(path, "the model's manifest")
    if len(raw) > MAX_MANIFEST_BYTES:
        raise DataError(f"{path}: {len(raw)} bytes, larger than any manifest")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DataError(f"{path}: not JSON") from None
    if not isinstance(header, dict) or header.get("kind") != "manifest":
        raise DataError(f"{path}: not a manifest")
    if header.get("body_kind") != MODEL_BODY_KIND:
        raise DataError(f"{path}: a {header.get('body_kind')!r} manifest, not a model's")
    digest = header.get("body_digest")
    if not isinstance(digest, str) or len(digest) != 64:
        raise DataError(f"{path}: no body_digest")
    if not isinstance(header.get("meta", {}), dict):
        raise DataError(f"{path}: meta is not an object")
    return header


def check_card(path: Path, card: dict[str, str], header: dict[str, Any]) -> None:
    """The card must be fedsilo's and describe the federation and run its manifest names (a
    validly signed model of another federation is still not this one's)."""
    if not card.get("params_sha256"):
        raise DataError(f"{path}: the model card has no params_sha256 (not exported by "
                        "fedsilo?)")
    if card.get("federation") != header.get("federation"):
        raise DataError(f"{path}: the card names federation {card.get('federation')!r}, the "
                        f"manifest {header.get('federation')!r}")
    run = header.get("meta", {}).get("run")
    if "run" in card and run is not None and card["run"] != run:
        raise DataError(f"{path}: the card names run {card['run']!r}, the manifest {run!r}")


def _onnx_card(path: Path, raw: bytes) -> dict[str, str]:
    """The model card of a file that passes onnx.checker; DataError otherwise."""
    try:
        import onnx

        model = onnx.load_from_string(raw)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - protobuf and the checker raise many kinds
        raise DataError(f"{path}: not a valid ONNX model ({type(exc).__name__})") from None
    return {p.key: p.value for p in model.metadata_props}


# ------------------------------------------------------------------ fedsilo model verify


def _trust_files(config: Path | None, ca: Path | None, crl: Path | None
                 ) -> tuple[Path | None, Path | None]:
    """(CA, CRL) from --ca/--crl, or from a site config's [identity] (else its [broker.tls]
    CA, as Trust.load derives the identity); ConfigError for what cannot be used."""
    if config is not None and (ca is not None or crl is not None):
        raise ConfigError(WHERE, "--config", "give --config or --ca/--crl, not both")
    if crl is not None and ca is None:
        raise ConfigError(WHERE, "--crl", "goes with --ca")
    if config is None:
        return ca, crl
    from agent.config import load_site_config

    cfg = load_site_config(config)
    if cfg.identity is not None:
        return cfg.identity.ca, cfg.identity.crl
    if cfg.broker.tls is not None:
        return cfg.broker.tls.ca, None
    return None, None


def run_verify(path: Path, *, config: Path | None, ca: Path | None, crl: Path | None,
               allow_unsigned: bool) -> int:
    """`fedsilo model verify`: one line per check, then what the card says. 0: the model may
    be used; 1: refused (the message says why). ConfigError for bad arguments or config."""
    ca_file, crl_file = _trust_files(Path(config) if config else None,
                                     Path(ca) if ca else None, Path(crl) if crl else None)
    verifier = None
    if ca_file is not None:
        from agent.security.signing import Verifier

        verifier = Verifier(ca_file, crl_file)
    elif not allow_unsigned:
        where = (f"{config}: names no federation CA ([identity] or [broker.tls])" if config
                 else "no federation CA to check the signature")
        raise ConfigError(WHERE, "--config" if config else "--ca",
                          f"{where}; give --ca (or --allow-unsigned for a demo without a PKI)")

    def report(check: str, detail: str) -> None:
        print(f"ok    {check:<9} {detail}")

    try:
        model = verify_model(Path(path), verifier, allow_unsigned=allow_unsigned, report=report)
    except DataError as exc:
        print(f"FAIL  refused: {exc}")
        return 1
    card = model.card
    rounds = card.get("rounds_completed", card.get("rounds", "?"))
    print(f"model of federation {card.get('federation', '?')}, run {card.get('run', '?')}, "
          f"{rounds} rounds, kind {card.get('model_kind', '?')}, created "
          f"{card.get('created_utc', '?')}; sha256 {model.short}, "
          f"{'signed by ' + str(model.signer) if model.signed else 'UNSIGNED'}")
    return 0
