"""Secure aggregation: pairwise masks in Z_2^32 so the coordinator learns only the sum.

The design follows Bonawitz et al. (CCS 2017), with one documented change for dropouts
(docs/privacy.md): a member lost *before* its masked update arrived is not recovered from
Shamir shares of its pairwise key; the epoch is run again among the survivors with fresh
masks (a new *epoch*). Each masked update also carries a one-time self mask; its secret is
given (by the site, or recovered from Shamir shares its peers hold) only for an epoch the
coordinator has announced complete, so a member lost *after* its upload is recovered. So:

- Each site holds an X25519 key for the run (kept 0600 in its state directory) and publishes
  the public half signed with its federation identity; every site checks its peers' records
  against the federation CA, so the coordinator cannot substitute a key of its own.
- For a round r, epoch e and pair (i, j), both derive the same 32-byte ChaCha20 key by HKDF
  over their X25519 secret; i < j adds the keystream, j subtracts it: over the epoch's members
  the pairwise masks cancel exactly, mod 2^32. The pairwise seeds never leave the sites.
- The value masked is the update clipped to +-`value_bound` per coordinate (counted, never
  silent), fixed-point quantized with stochastic rounding (int8 codes for int8 compression,
  16-bit otherwise) and multiplied by the site's small integer weight. The sum needs
  `ring_bits` bits; values are sent mod 2^16 when the sum fits (2 bytes a value), else 2^32.
- An update that arrives late for an abandoned epoch is useless to the coordinator: its self
  mask is never revealed (a site never reveals an epoch once it has masked a later one).

Top-k cannot be masked (masks cover every value): plan validation refuses it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import ProtocolError
from agent.ops.atomic import write_bytes_atomic

KEY_RECORD = "secagg_key"
MAX_WEIGHT = 255  # integer weights 1..255: the sum's range stays inside 32 bits
MIN_LEVELS = 16  # the fewest weight levels worth a 16-bit ring
SEED_BYTES = 32  # a ChaCha20 key
SECRET_BYTES = 16  # a self-mask secret (Shamir shares split 16 bytes)


def code_bits(quantize: str) -> int:
    """Bits of one fixed-point code: int8 compression keeps int8 codes; else 16 bits."""
    return 8 if quantize == "int8" else 16


def ring_bits(total_weight: int, bits: int) -> int:
    """The smallest of 16 and 32 bits whose signed range holds the weighted sum of codes."""
    largest = (2 ** (bits - 1) - 1) * total_weight
    if largest < 2 ** 15:
        return 16
    if largest < 2 ** 31:
        return 32
    raise ValueError(f"a sum of weight {total_weight} of {bits}-bit codes exceeds 32 bits")


def integer_weights(weights: dict[str, float], bits: int) -> dict[str, int]:
    """Weights as integers in proportion (a masked sum is of integers): the largest gets as
    many levels as keep the sum of `bits`-bit codes in a 16-bit ring (2 bytes a value on the
    wire), if that is at least 16 levels (weights within 3 % of the largest); else 255 levels
    and a 32-bit ring."""
    fit16 = (2 ** 15 - 1) // ((2 ** (bits - 1) - 1) * max(1, len(weights)))
    levels = min(MAX_WEIGHT, fit16) if fit16 >= MIN_LEVELS else MAX_WEIGHT
    top = max(weights.values(), default=1.0)
    return {s: max(1, min(levels, round(levels * w / top))) if top > 0 else 1
            for s, w in weights.items()}


# ---------------------------------------------------------------------- keys

def _key_file(state_dir: Path, run: str) -> Path:
    return Path(state_dir) / f"secagg-{hashlib.sha256(run.encode()).hexdigest()[:16]}.key"


def site_key(state_dir: Path, run: str) -> X25519PrivateKey:
    """This site's X25519 key for the run: made once, kept 0600, the same after a restart (a
    restarted site must derive the same masks); an earlier run's key file is removed."""
    path = _key_file(state_dir, run)
    try:
        raw = path.read_bytes()
        if len(raw) == 32:
            return X25519PrivateKey.from_private_bytes(raw)
    except FileNotFoundError:
        pass
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    write_bytes_atomic(path, raw, mode=0o600)
    for old in Path(state_dir).glob("secagg-*.key"):
        if old != path:
            old.unlink(missing_ok=True)
    return key


def public_b64(key: X25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def key_record(federation: str, run: str, site: str, key: X25519PrivateKey,
               signer: Any | None) -> dict[str, Any]:
    """What a site publishes of its key: signed with its identity when it has one."""
    record = {"kind": KEY_RECORD, "federation": federation, "run": run, "site": site,
              "x25519": public_b64(key)}
    return signer.sign(record) if signer is not None else record


def check_key_record(record: Any, federation: str, run: str, site: str,
                     verifier: Any | None) -> X25519PublicKey:
    """A peer's public key, after checking what it claims (and, with a PKI, who signed it)."""
    if not isinstance(record, dict) or record.get("kind") != KEY_RECORD:
        raise ProtocolError("bad_key_record", site)
    if (record.get("federation"), record.get("run"), record.get("site")) \
            != (federation, run, site):
        raise ProtocolError("bad_key_record", f"{site}: for another federation, run or site")
    if verifier is not None:
        verifier.verify(record, sender=site, role="site")
    try:
        raw = base64.b64decode(record.get("x25519", ""), validate=True)
        if len(raw) != 32:
            raise ValueError("not 32 bytes")
        return X25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError):
        raise ProtocolError("bad_key_record", f"{site}: x25519") from None


def pair_seed(key: X25519PrivateKey, peer: X25519PublicKey, *, federation: str, run: str,
              rnd: int, epoch: int, a: str, b: str) -> bytes:
    """The ChaCha20 key both sites of a pair derive for one round and epoch (HKDF-SHA256 over
    their X25519 secret, bound to everything that must differ between masks)."""
    try:
        shared = key.exchange(peer)
    except ValueError:  # a low-order peer key: an all-zero secret
        raise ProtocolError("bad_key_record", "a peer's key gives no shared secret") from None
    lo, hi = sorted((a, b))
    info = f"fedsilo-secagg|{federation}|{run}|{rnd}|{epoch}|{lo}|{hi}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info
                ).derive(shared)


def mask_keys(site: str, members: Sequence[str], seeds: dict[str, bytes]
              ) -> tuple[np.ndarray, np.ndarray]:
    """(keys [k, 32] uint8, signs [k] int32) of a site's pairwise masks: + for a peer after it
    in name order, - for one before, so each pair's masks cancel in the sum."""
    peers = [p for p in members if p != site]
    keys = np.frombuffer(b"".join(seeds[p] for p in peers), dtype=np.uint8
                         ).reshape(len(peers), SEED_BYTES)
    signs = np.array([1 if site < p else -1 for p in peers], dtype=np.int32)
    return keys, signs


def self_seed() -> bytes:
    """A one-time self-mask secret from the OS CSPRNG (16 bytes: what Shamir shares split)."""
    return os.urandom(SECRET_BYTES)


def self_mask_key(secret: bytes) -> bytes:
    """The ChaCha20 key of a self mask, from its 16-byte secret."""
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None,
                info=b"fedsilo-secagg-self-mask").derive(secret)


def commitment(secret: bytes) -> str:
    """Sent with the masked update: a recovered secret is checked against it."""
    return hashlib.sha256(b"fedsilo-secagg-commit|" + secret).hexdigest()


# ---------------------------------------------------------------------- Shamir shares

def threshold(members: int) -> int:
    """Shares needed to recover a self-mask secret: a majority of the epoch's members."""
    return members // 2 + 1


def _share_key(key: X25519PrivateKey, peer: X25519PublicKey, *, federation: str, run: str,
               rnd: int, epoch: int, sender: str, receiver: str) -> bytes:
    try:
        shared = key.exchange(peer)
    except ValueError:
        raise ProtocolError("bad_key_record", "a peer's key gives no shared secret") from None
    info = f"fedsilo-secagg-share|{federation}|{run}|{rnd}|{epoch}|{sender}|{receiver}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def seal_shares(secret: bytes, site: str, members: Sequence[str], key: X25519PrivateKey,
                publics: dict[str, X25519PublicKey], *, federation: str, run: str, rnd: int,
                epoch: int) -> dict[str, str]:
    """Shamir shares (pycryptodome, GF(2^128)) of this site's self-mask secret, one per peer,
    each sealed with AES-GCM under a key only that peer can derive: the coordinator relays
    them and can open none. Shares are numbered by the members' name order."""
    members = sorted(members)
    shares = Shamir.split(threshold(len(members)), len(members), secret)
    out = {}
    for (index, share), peer in zip(shares, members, strict=True):
        if peer == site:
            continue
        k = _share_key(key, publics[peer], federation=federation, run=run, rnd=rnd,
                       epoch=epoch, sender=site, receiver=peer)
        nonce = os.urandom(12)
        sealed = AESGCM(k).encrypt(nonce, index.to_bytes(2, "big") + share,
                                   f"{site}>{peer}".encode())
        out[peer] = base64.b64encode(nonce + sealed).decode()
    return out


def open_share(sealed: str, sender: str, site: str, key: X25519PrivateKey,
               sender_public: X25519PublicKey, *, federation: str, run: str, rnd: int,
               epoch: int) -> str:
    """A peer's share addressed to this site, opened (index and share, as hex)."""
    k = _share_key(key, sender_public, federation=federation, run=run, rnd=rnd, epoch=epoch,
                   sender=sender, receiver=site)
    try:
        raw = base64.b64decode(sealed, validate=True)
        plain = AESGCM(k).decrypt(raw[:12], raw[12:], f"{sender}>{site}".encode())
    except (ValueError, TypeError, InvalidTag):
        raise ProtocolError("bad_share", sender) from None
    if len(plain) != 2 + SECRET_BYTES:
        raise ProtocolError("bad_share", sender)
    return plain.hex()


def recover_secret(shares: Sequence[str], commit: str) -> bytes | None:
    """A member's self-mask secret from opened shares; None when they do not give the secret
    its commitment names (too few, or a wrong one among them)."""
    try:
        parts = [(int.from_bytes(bytes.fromhex(h)[:2], "big"), bytes.fromhex(h)[2:])
                 for h in shares]
        secret = Shamir.combine(parts)
    except (ValueError, TypeError):
        return None
    return secret if commitment(secret) == commit else None


# ---------------------------------------------------------------------- values

@dataclass(frozen=True)
class Fixed:
    """An update as integers ready to mask: codes x weight, and what clipping cost."""

    values: np.ndarray  # int64
    clipped: int  # values beyond +-bound, set to the bound


def to_fixed(delta: np.ndarray, *, bound: float, bits: int, weight: int,
             rng: np.random.Generator) -> Fixed:
    """Clip to +-bound (counted), scale to `bits`-bit codes with stochastic rounding (unbiased),
    times the integer weight."""
    top = 2 ** (bits - 1) - 1
    x = delta.astype(np.float64)
    clipped = int(np.count_nonzero(np.abs(x) > bound))
    np.clip(x, -bound, bound, out=x)
    x *= top / bound
    low = np.floor(x)
    codes = low + (rng.random(x.size) < (x - low))
    return Fixed(codes.astype(np.int64) * int(weight), clipped)


def mask(fixed: np.ndarray, keys: np.ndarray, signs: np.ndarray, secret: bytes, wire: int,
         kernels: ModuleType) -> bytes:
    """The masked update as sent: (values + pairwise masks + self mask) mod 2^wire, LE."""
    acc = (fixed & 0xFFFFFFFF).astype(np.uint32)
    self_key = self_mask_key(secret)
    all_keys = np.concatenate([keys, np.frombuffer(self_key, np.uint8)[None, :]])
    all_signs = np.concatenate([signs, np.ones(1, dtype=np.int32)])
    kernels.mask_accumulate(acc, all_keys, all_signs)
    return (acc.astype("<u2") if wire == 16 else acc.astype("<u4")).tobytes()


def unmask(total: np.ndarray, secrets: Sequence[bytes], wire: int, kernels: ModuleType
           ) -> np.ndarray:
    """The sum of the members' fixed-point values (int64, signed) from the sum of their
    masked updates (uint32, mod 2^wire) and their self-mask secrets."""
    acc = total.astype(np.uint32, copy=True)
    if secrets:
        keys = np.frombuffer(b"".join(self_mask_key(s) for s in secrets), dtype=np.uint8
                             ).reshape(-1, SEED_BYTES)
        kernels.mask_accumulate(acc, keys, -np.ones(len(secrets), dtype=np.int32))
    modulus = 1 << wire
    values = acc.astype(np.int64) & (modulus - 1)
    values[values >= modulus // 2] -= modulus
    return values


def from_fixed(values: np.ndarray, *, bound: float, bits: int, total_weight: int
               ) -> np.ndarray:
    """The weighted mean update (float32) from the unmasked integer sum."""
    top = 2 ** (bits - 1) - 1
    return (values.astype(np.float64) * (bound / top / total_weight)).astype(np.float32)


class MaskedSum:
    """The coordinator's running sum of masked updates, mod 2^wire, fed as chunks arrive
    (a stream may split a value across chunks). Nothing of a single update is kept."""

    def __init__(self, n: int, wire: int) -> None:
        self.n, self.wire = n, wire
        self.total = np.zeros(n, dtype=np.uint32)
        self.width = wire // 8

    def stream(self) -> MaskedStream:
        return MaskedStream(self)


class MaskedStream:
    """One site's masked update into a `MaskedSum` (the UpdateStream shape the peer feeds)."""

    def __init__(self, into: MaskedSum) -> None:
        self.into = into
        self.n = into.n
        self.watermark = 0  # values summed so far
        self.accepted = False
        self._carry = b""
        self._abandoned: ProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._abandoned is not None:
            raise self._abandoned
        buf = self._carry + bytes(data)
        w = self.into.width
        whole = len(buf) // w * w
        self._carry = buf[whole:]
        if not whole:
            return
        count = whole // w
        if self.watermark + count > self.n:
            raise ProtocolError("bad_update_size", "more values than the model has")
        values = np.frombuffer(buf[:whole], dtype="<u2" if w == 2 else "<u4")
        part = self.into.total[self.watermark:self.watermark + count]
        part += values.astype(np.uint32)  # wraps mod 2^32; reduced mod 2^wire at unmasking
        self.watermark += count

    def finish(self) -> None:
        if self._abandoned is not None:
            raise self._abandoned
        if self._carry or self.watermark != self.n:
            raise ProtocolError("bad_update_size", f"{self.watermark} of {self.n} values")
        self.accepted = True

    def abandon(self, exc: ProtocolError) -> None:
        self._abandoned = exc
