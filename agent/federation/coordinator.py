"""The coordinator role: statistics step, training rounds, final evaluation, checkpoints.

Rounds follow PROTOCOL.md's state machine (OPEN -> COLLECTING -> AGGREGATED -> PUBLISHED ->
CLOSED); the checkpoint is written atomically after the statistics step and after every
closed round, so a restarted coordinator never redoes a closed round and a finished federation
stays finished. All math lives in pure modules (aggregate, standardize, metrics); this file
only sequences messages.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import kernels as kernel_registry
from agent.config import CoordinatorConfig, Plan, plan_to_toml_dict
from agent.errors import BrokerError, DataError, FedsiloError, ProtocolError
from agent.federation import topics
from agent.federation.codec import UpdateStream, max_body_len
from agent.federation.envelope import BodyKind, Manifest, make_manifest
from agent.federation.peer import BROADCAST_RESEND_HOLD_S, BodyReady, Peer, StatusSeen, Trust
from agent.federation.strategy import make_strategy, weight_caps
from agent.federation.topics import Topic
from agent.federation.transport import Transport, Will
from agent.ingest.tables import encoded_columns
from agent.learn.kinds import model_kind
from agent.learn.layout import Layout, build_layout, init_params
from agent.learn.modelfile import SavedModel, load_model, save_model
from agent.learn.standardize import Moments, MomentsStream, image_standardizer, standardizer
from agent.ops.atomic import write_bytes_atomic, write_json_atomic
from agent.ops.crashpoints import crash_point
from agent.ops.sdnotify import Notifier
from agent.ops.statedir import StateError, describe, ensure_writable
from agent.ops.status import State, encode_status, host_vitals, offline_status, status_document
from agent.privacy import secagg
from agent.privacy.accountant import PrivacyAccountant
from agent.privacy.dp import gaussian_noise

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
PARAMS = "global.f32"  # before checkpoints named their files (still read)
IMAGE_NORM = "image_norm.f32"
_STATE_FILE = re.compile(r"[a-z_]+(-[0-9a-f]{16})?\.f(32|64)")
METRICS = "metrics.json"
MODEL_ONNX = "model.onnx"  # in model/: the final model as the sites receive it
MAX_SAMPLES = 10**9
STATE_RETRY_S = 5.0  # while the state directory refuses a checkpoint
LOST_ANSWER_GRACE_S = 3.0  # a site's status may overtake the tail of its upload
_REASON = re.compile(r"[a-z_]{1,40}(:[A-Za-z0-9_]{1,64})?")  # a site's reason for declining


class Stopped(FedsiloError):
    """The coordinator was asked to stop (SIGTERM, Ctrl-C)."""


@dataclass
class RoundOutcome:
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)  # site -> why it sent nothing
    seconds: float = 0.0


def plan_digest(plan: Plan) -> str:
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()


def weighted_metrics(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sample-weighted mean of each site's held-out metrics. Each metric says over how many
    patients and sites it really is (`<metric>_n`, `<metric>_sites`): a site whose held-out
    rows all have one outcome has a loss but no AUC. `without_auc` names those sites and why."""
    evals = {s: r["eval"] for s, r in reports.items() if isinstance(r.get("eval"), dict)}
    total = sum(e["n"] for e in evals.values())
    if total <= 0:
        return {}
    out: dict[str, Any] = {"n": float(total)}
    for key in ("loss", "auc", "accuracy"):
        vals = {s: (e[key], e["n"]) for s, e in evals.items() if e.get(key) is not None}
        weight = sum(n for _, n in vals.values())
        if weight:
            out[key] = sum(v * n for v, n in vals.values()) / weight
            out[f"{key}_n"] = float(weight)
            out[f"{key}_sites"] = sorted(vals)
    out["without_auc"] = {s: e.get("reason") or ("no_heldout_patients" if not e["n"]
                                                 else "undefined")
                          for s, e in evals.items() if e.get("auc") is None}
    return out


def describe_final_auc(ev: dict[str, Any]) -> str:
    """The final AUC line, over the patients and sites it really covers."""
    if ev.get("auc") is None:
        return "no held-out AUC (no site could compute one)" + _without_auc(ev)
    sites = ev.get("auc_sites", [])
    return (f"held-out AUC {ev['auc']:.3f} over {int(ev.get('auc_n', ev.get('n', 0)))} "
            f"patients at {len(sites)} site{'s' if len(sites) != 1 else ''}"
            + _without_auc(ev))


_WHY_NO_AUC = {"one_outcome_class": "its held-out patients all have one outcome",
               "too_few_patients": "fewer held-out patients than the minimum for metrics",
               "no_heldout_patients": "no held-out patients"}


def _without_auc(ev: dict[str, Any]) -> str:
    missing = ev.get("without_auc") or {}
    if not missing:
        return ""
    parts = [f"{s}: {_WHY_NO_AUC.get(r, 'AUC undefined')}" for s, r in sorted(missing.items())]
    return " (no AUC from " + "; ".join(parts) + ")"


class Coordinator:
    def __init__(self, config: CoordinatorConfig, plan: Plan, *,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 backend: str = "auto") -> None:
        self.config = config
        self.plan = plan
        self.fed = plan.federation
        self.on_round = on_round or (lambda _record: None)
        self.kernels: ModuleType = kernel_registry.get_backend(backend)
        self.state_dir = Path(config.state_dir)
        self.columns = encoded_columns(plan.features)
        image_shape = None
        if model_kind(plan.model.kind).reads_images and plan.imaging is not None:
            image_shape = (plan.imaging.depth, plan.imaging.size, plan.imaging.size)
        self.layout: Layout = build_layout(plan.model, len(self.columns), image_shape)
        self.strategy = make_strategy(plan.strategy, self.layout.size, len(plan.sites),
                                      plan.compression, self.kernels, plan.source or "plan")
        self.site_rows: dict[str, int] = {}  # training rows each site declared in round 0
        self.plan_doc = plan_to_toml_dict(plan)
        self.digest = plan_digest(plan)
        self.stop_event = threading.Event()
        self.notifier = Notifier()
        self.last_round_ok_ts: float | None = None  # when the last round closed
        self.current_round = 0
        self.state = State.STARTING
        self.site_status: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.run_id = secrets.token_hex(8)
        self.params = init_params(self.layout, plan.seed)
        self.mean = np.zeros(len(self.columns))
        self.scale = np.ones(len(self.columns))
        self.image_norm = np.zeros(0, dtype=np.float32)  # [mean | scale] per voxel, imaging only
        self.phase = "stats"
        self.last_error: str | None = None
        self._republish: Callable[[], int] | None = None  # the open round's task, again
        self._lost_since: dict[str, float] = {}  # site -> when it said it answered, unseen
        self.declined: dict[str, str] = {}  # site -> why it last declined a task
        self.secagg_keys: dict[str, dict[str, Any]] = {}  # site -> its signed masking key
        self._last_epoch = 0  # of secure aggregation: each epoch's number is later
        self.accountants: dict[str, PrivacyAccountant] = {}  # RDP state: never reset
        self.transport = Transport(
            f"fedsilo-{self.fed}-{config.coordinator_id}", config.broker,
            will=Will(topics.coordinator_status(self.fed),
                      offline_status(role="coordinator", identity=config.coordinator_id,
                                     federation=self.fed, reason="connection_lost")),
            subscriptions=topics.coordinator_subscriptions(self.fed))
        max_body = max(max_body_len(self.layout.size, plan.compression),
                       (len(self.columns) + self._image_voxels()) * 3 * 8,
                       4 * self.layout.size if plan.privacy.secure_aggregation else 0)
        self.peer = Peer(self.transport, self.fed, "coordinator", max_body=max_body,
                         accept=self._accept, trust=Trust.load(config.identity, config.broker.tls,
                                                     "coordinator"),
                         resend_hold_s=BROADCAST_RESEND_HOLD_S)

    # ------------------------------------------------------------------ checkpoint

    def _load_checkpoint(self) -> None:
        path = self.state_dir / CHECKPOINT
        if not path.exists():
            return
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise FedsiloError(f"{path}: unreadable checkpoint ({exc}); restore it or move the "
                               "state directory away to start over") from None
        if doc.get("plan_digest") != self.digest:
            raise FedsiloError(f"{path}: checkpoint belongs to another plan; move it away to "
                               "start a new federation")
        self.params = self._read_state_vector(doc, "params")
        self.run_id = doc["run"]
        self.phase = doc["phase"]
        self.current_round = doc["round"]
        self.mean = np.asarray(doc["mean"])
        self.scale = np.asarray(doc["scale"])
        self.history = doc["history"]
        self.image_norm = self._read_state_vector(doc, "image_norm")
        self.site_rows = {str(k): int(v) for k, v in doc.get("site_rows", {}).items()}
        self.secagg_keys = dict(doc.get("secagg_keys", {}))
        self._last_epoch = int(doc.get("last_epoch", 0))
        try:
            self.accountants = {str(k): PrivacyAccountant.from_dict(v)
                                for k, v in doc.get("privacy_accountants", {}).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise FedsiloError(f"{path}: privacy accountant state unusable ({exc}); the "
                               "privacy spent cannot be known, so the federation stops") from None
        if self.plan.privacy.dp != "none" and self.history and not self.accountants:
            raise FedsiloError(f"{path}: rounds were trained with DP but the checkpoint has no "
                               "privacy accountant state")
        state = doc.get("strategy_state", {})
        if not isinstance(state, dict):
            raise FedsiloError(f"{path}: strategy_state is not an object")
        try:
            self.strategy.load_state({key: self._read_state_vector(state[key], "vector",
                                                                   dtype="<f8")
                                      for key in state})
        except (KeyError, TypeError, ValueError) as exc:
            raise FedsiloError(f"{path}: strategy state unusable ({exc})") from None
        log.info("resuming federation %s from checkpoint: phase %s, round %d", self.fed,
                 self.phase, self.current_round)

    def _read_state_vector(self, doc: dict[str, Any], name: str, dtype: str = "<f4"
                           ) -> np.ndarray:
        """A vector the checkpoint names, checked against the digest it records."""
        legacy = {"params": PARAMS, "image_norm": IMAGE_NORM}.get(name)
        file = doc.get(f"{name}_file", legacy)
        if not isinstance(file, str) or not _STATE_FILE.fullmatch(file):
            raise FedsiloError(f"{self.state_dir / CHECKPOINT}: {name}_file {file!r} is not a "
                               "file of this state directory")
        path = self.state_dir / file
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise FedsiloError(f"{path}: cannot read ({exc.strerror or exc}); restore it or "
                               "move the state directory away to start over") from None
        if hashlib.sha256(raw).hexdigest() != doc.get(f"{name}_sha256"):
            raise FedsiloError(f"{path}: digest does not match checkpoint")
        return np.frombuffer(raw, dtype=dtype).astype(np.dtype(dtype).newbyteorder("="))

    def _write_state_vector(self, name: str, vector: np.ndarray, dtype: str = "<f4"
                            ) -> tuple[str, str]:
        """Write a vector under a name of its own digest; returns (file, sha256). The file the
        current checkpoint names is never overwritten, so a crash at any write leaves the
        previous checkpoint and its files loadable."""
        raw = vector.astype(dtype).tobytes()
        digest = hashlib.sha256(raw).hexdigest()
        file = f"{name}-{digest[:16]}.f{8 * np.dtype(dtype).itemsize}"
        path = self.state_dir / file
        if not path.exists():
            write_bytes_atomic(path, raw)
        return file, digest

    def _save_checkpoint(self) -> None:
        self._write_state("checkpoint", self._write_checkpoint)

    def _write_state(self, what: str, write: Callable[[], None]) -> None:
        """Write state, and while the state directory refuses it (disk full, read-only) say so
        in the log and the status and try again: nothing goes on from state that was not
        kept. A stop request ends the wait (the last checkpoint stays valid)."""
        failing: StateError | None = None
        while True:
            try:
                write()
            except OSError as exc:
                error = describe(self.state_dir, exc)
                if failing is None or failing.code != error.code:
                    log.error("%s: %s; retrying every %.0f s", what, error, STATE_RETRY_S)
                failing, self.last_error = error, error.code
                self._publish_status_quietly()
                if self.stop_event.wait(STATE_RETRY_S):
                    raise Stopped(f"stop requested while the {what} could not be written"
                                  ) from None
                continue
            if failing is not None:
                log.info("%s written: the state directory takes writes again", what)
                self.last_error = None
            return

    def _publish_status_quietly(self) -> None:
        try:
            self._publish_status()
        except FedsiloError as exc:
            log.warning("could not publish status: %s", exc)

    def _write_checkpoint(self) -> None:
        params_file, params_sha = self._write_state_vector("params", self.params)
        crash_point("coordinator.params_written")
        norm_file, norm_sha = self._write_state_vector("image_norm", self.image_norm)
        strategy_state = {}
        for key, vector in self.strategy.state().items():
            file, sha = self._write_state_vector(f"strategy_{key}", vector, dtype="<f8")
            strategy_state[key] = {"vector_file": file, "vector_sha256": sha}
        write_json_atomic(self.state_dir / CHECKPOINT, {
            "federation": self.fed, "plan_digest": self.digest, "run": self.run_id,
            "phase": self.phase, "round": self.current_round,
            "params_file": params_file, "params_sha256": params_sha,
            "image_norm_file": norm_file, "image_norm_sha256": norm_sha,
            "strategy_state": strategy_state, "site_rows": self.site_rows,
            "secagg_keys": self.secagg_keys, "last_epoch": self._last_epoch,
            "privacy_accountants": {k: a.to_dict() for k, a in self.accountants.items()},
            "mean": self.mean.tolist(), "scale": self.scale.tolist(), "history": self.history})
        crash_point("coordinator.checkpoint_written")
        keep = {params_file, norm_file, *(v["vector_file"] for v in strategy_state.values())}
        for old in [*self.state_dir.glob("params-*.f32"), *self.state_dir.glob("image_norm-*.f32"),
                    *self.state_dir.glob("strategy_*-*.f64"),
                    self.state_dir / PARAMS, self.state_dir / IMAGE_NORM]:
            if old.name not in keep:
                old.unlink(missing_ok=True)  # files of checkpoints now replaced
        write_json_atomic(self.state_dir / METRICS, {"federation": self.fed, "run": self.run_id,
                                                     "rounds": self.history})

    # ------------------------------------------------------------------ wire helpers

    def _accept(self, topic: topics.Topic) -> bool:
        if topic.sender == "coordinator":
            return False  # our own retained messages echo back only if misconfigured
        if topic.sender not in self.plan.sites:
            return False  # not enrolled in this federation
        if topic.kind in ("manifest", "chunk"):
            return topic.round == self.current_round
        return topic.kind in ("status", "req")

    def _publish_status(self, extra: dict[str, Any] | None = None) -> None:
        self.notifier.status(f"{self.state.value}, round {self.current_round}")
        doc = status_document(role="coordinator", identity=self.config.coordinator_id,
                              federation=self.fed, state=self.state, round=self.current_round,
                              last_error=self.last_error,
                              extra={"rounds_total": self.plan.rounds, "run": self.run_id,
                                     "rejected_messages": sum(self.peer.rejected.values()),
                                     "cert_days_left": self.transport.cert_days_left(),
                                     "bytes_sent": self.peer.bytes_sent,
                                     "last_round_ok_ts": self.last_round_ok_ts,
                                     "throttled": False,
                                     "strategy": self.plan.strategy.name,
                                     "trust_problem": self.peer.trust.problem
                                     if self.peer.trust else None,
                                     "discounted": self._last_discounted(),
                                     "declined": ",".join(f"{s}={why}" for s, why in
                                                          sorted(self.declined.items())),
                                     **self.transport.connection_status(),
                                     **host_vitals(self.state_dir), **(extra or {})})
        self.transport.publish(topics.coordinator_status(self.fed), encode_status(doc),
                               retain=True)

    def _last_discounted(self) -> str:
        """The last closed round's discounted sites, flat for monitoring: "south=krum_outlier"."""
        last = next((r for r in reversed(self.history) if "round" in r), {})
        return ",".join(f"{s}={why}" for s, why in last.get("discounted", {}).items())

    def _broadcast(self, rnd: int, kind: BodyKind, body: bytes, meta: dict[str, Any]) -> int:
        if rnd > 0:  # drop the previous round's retained manifest: late joiners see this one
            self.transport.publish(topics.coordinator_manifest(self.fed, rnd - 1), b"",
                                   retain=True)
        self.peer.forget_sent_before(rnd)
        self.peer.reassembler.forget_rounds_before(rnd)
        manifest = make_manifest(federation=self.fed, round=rnd, sender="coordinator",
                                 body_kind=kind, body=body, created=time.time(),
                                 meta={"run": self.run_id, "plan": self.plan_doc,
                                       "plan_digest": self.digest, **meta})
        send = functools.partial(
            self.peer.send_body, topics.coordinator_manifest(self.fed, rnd),
            lambda k: topics.coordinator_chunk(self.fed, rnd, k), manifest, body,
            retain_manifest=True, expiry_s=self.plan.round_deadline_s * 4)
        self._republish = send
        return send()

    def _publish_task_again(self, rnd: int, why: str) -> None:
        """The same task (same manifest and nonce, so sites that have it ignore it) for sites
        whose copy the broker lost: restarted without persistence, or inside its autosave."""
        if self._republish is None:
            return
        log.warning("round %d: publishing the task again (%s)", rnd, why)
        try:
            self._republish()
        except BrokerError as exc:
            log.warning("round %d: could not publish the task again: %s", rnd, exc)

    def _ask_for_lost_answers(self, rnd: int, outcome: RoundOutcome, now: float) -> None:
        """A site whose status says it answered this round, but whose answer never arrived
        (the broker lost it after acknowledging it), is asked for it again, not waited out."""
        for site, status in self.site_status.items():
            if (site in outcome.reports or status.get("run") != self.run_id
                    or status.get("answered_round") != rnd
                    or self.peer.reassembler.has_body_from(site, rnd)):
                self._lost_since.pop(site, None)
                continue
            since = self._lost_since.setdefault(site, now)
            if now - since >= LOST_ANSWER_GRACE_S:
                self._lost_since[site] = now + LOST_ANSWER_GRACE_S  # ask again later if needed
                self.peer.ask_whole(site, rnd, topics.coordinator_req(self.fed, site))

    def _collect(self, rnd: int, kind: BodyKind,
                 on_body: Callable[[str, Manifest, bytes], dict[str, Any]],
                 expected: set[str] | None = None, quorum: int | None = None) -> RoundOutcome:
        """Gather one body per site for this round: all sites (that did not decline), or a
        quorum at the deadline."""
        self.current_round = rnd
        outcome = RoundOutcome()
        start = time.monotonic()
        deadline = start + self.plan.round_deadline_s
        republish_at = deadline
        connects = self.transport.connects
        self._lost_since = {}
        warned = False
        expected = set(self.plan.sites) if expected is None else expected
        quorum = self.plan.min_sites if quorum is None else quorum
        while True:
            if self.stop_event.is_set():
                raise Stopped("stop requested")
            self.notifier.beat()
            for event in self.peer.poll(0.05):
                if isinstance(event, StatusSeen):
                    self.site_status[event.topic.sender] = event.status
                elif isinstance(event, BodyReady):
                    self._take(event, rnd, kind, on_body, outcome)
            self.peer.request_missing(lambda m: topics.coordinator_req(self.fed, m.sender))
            if set(outcome.reports) | set(outcome.declined) >= expected:
                if len(outcome.reports) < min(quorum, len(expected)) \
                        or not outcome.reports:
                    raise FedsiloError(
                        f"round {rnd}: only {len(outcome.reports)} of {len(expected)} sites "
                        f"can take part (min_sites {self.plan.min_sites}); declined: "
                        + ", ".join(f"{s} ({why})" for s, why in sorted(
                            outcome.declined.items())))
                break
            now = time.monotonic()
            self._ask_for_lost_answers(rnd, outcome, now)
            if self.transport.connects != connects and self.transport.connected:
                connects = self.transport.connects
                self._publish_task_again(rnd, "reconnected to the broker")
            if now >= deadline and len(outcome.reports) >= quorum:
                log.info("round %d deadline: closing with %d of %d sites", rnd,
                         len(outcome.reports), len(expected))
                break
            if now >= deadline and not warned:
                warned = True
                log.warning("round %d deadline passed with %d of %d sites (min_sites %d); "
                            "waiting for a quorum", rnd, len(outcome.reports), len(expected),
                            self.plan.min_sites)
            if now >= republish_at:
                republish_at = now + self.plan.round_deadline_s
                self._publish_task_again(rnd, f"{len(outcome.reports)} of {len(expected)} "
                                              "sites answered by the deadline")
        outcome.seconds = time.monotonic() - start
        return outcome

    def _take(self, event: BodyReady, rnd: int, kind: BodyKind,
              on_body: Callable[[str, Manifest, bytes], dict[str, Any]],
              outcome: RoundOutcome) -> None:
        site, m = event.topic.sender, event.manifest
        try:
            if m.round != rnd:
                raise ProtocolError("wrong_round", f"round {m.round}, expected {rnd}")
            if m.body_kind is not kind and m.body_kind is not BodyKind.DECLINED:
                raise ProtocolError("wrong_body_kind", m.body_kind.value)
            if m.meta.get("run") != self.run_id:
                raise ProtocolError("wrong_run")
            if site in outcome.reports:
                raise ProtocolError("duplicate_update", site)
            if m.body_kind is BodyKind.DECLINED:
                reason = m.meta.get("reason")
                if not isinstance(reason, str) or not _REASON.fullmatch(reason):
                    raise ProtocolError("bad_field", "reason")
                if outcome.declined.get(site) != reason:
                    log.warning("round %d: %s takes no part (%s)", rnd, site, reason)
                outcome.declined[site] = reason
                self.declined[site] = reason
                if reason == "not_a_member" and self.plan.privacy.secure_aggregation:
                    self._register_key(site, m.meta.get("secagg_key"))
                return
            outcome.reports[site] = on_body(site, m, event.body)
            outcome.declined.pop(site, None)
            self.declined.pop(site, None)
            log.debug("round %d: %s reported (%d/%d)", rnd, site, len(outcome.reports),
                      len(self.plan.sites))
        except ProtocolError as exc:
            self.peer.rejected[exc.reason] += 1
            log.warning("rejected %s from %s for round %d: %s", m.body_kind.value, site, rnd, exc)
        except Exception as exc:  # noqa: BLE001 - one malformed report never ends the round
            self.peer.rejected["malformed"] += 1
            log.warning("rejected %s from %s for round %d: malformed (%s)", m.body_kind.value,
                        site, rnd, type(exc).__name__)

    # ------------------------------------------------------------------ phases

    def _stats_phase(self) -> None:
        self.state = State.STATS
        self._publish_status()
        d, v = len(self.columns), self._image_voxels()
        # One pooled vector that each site's moments are summed into as their chunks arrive:
        # memory stays that of one vector (per-voxel moments are megabytes), however many
        # sites send at once.
        pooled = np.zeros(3 * (d + v), dtype=np.float64)
        streams: dict[str, _MomentsSink] = {}

        def open_stream(topic: Topic, m: Manifest) -> _MomentsSink | None:
            if m.body_kind is not BodyKind.STATS or m.round != 0 \
                    or m.meta.get("run") != self.run_id:
                return None
            if topic.sender in streams:
                raise ProtocolError("duplicate_update", topic.sender)
            if m.body_len != pooled.size * 8:
                raise ProtocolError("bad_stats_size", f"{m.body_len} bytes")
            if self.plan.privacy.secure_aggregation:  # checked before its moments are summed
                self._register_key(topic.sender, m.meta.get("secagg_key"))
            streams[topic.sender] = _MomentsSink(MomentsStream(pooled, d))
            return streams[topic.sender]

        def take(site: str, m: Manifest, body: bytes) -> dict[str, Any]:
            if site not in streams or body:
                raise ProtocolError("not_streamed", site)
            return {"n": int(streams[site].stream.largest_count)}

        self.peer.open_stream = open_stream
        try:
            self._broadcast(0, BodyKind.STATS_TASK, b"", {})
            outcome = self._collect(0, BodyKind.STATS, take)
        finally:
            self.peer.open_stream = None
        numeric = tuple(i for i, c in enumerate(self.columns) if "=" not in c)
        self.mean, self.scale = standardizer(Moments.from_vector(pooled[:3 * d]), numeric)
        if v:
            self.image_norm = np.concatenate(image_standardizer(
                Moments.from_vector(pooled[3 * d:])))
        self.site_rows = {site: r["n"] for site, r in outcome.reports.items()}
        self.phase = "train"
        self._save_checkpoint()
        log.info("federated statistics from %d sites", len(outcome.reports))

    def _train_round(self, rnd: int) -> None:
        self.state = State.COLLECTING
        self._publish_status()
        caps = weight_caps(self.site_rows, self.plan.strategy.max_weight_fraction)
        t_open = time.monotonic()
        if self.plan.privacy.secure_aggregation:
            outcome, weights, sent, extra = self._secure_round(rnd, caps)
        else:
            outcome, weights, sent, extra = self._plain_round(rnd, caps)
        self._close_round(rnd, outcome, weights, sent, extra, time.monotonic() - t_open)

    def _plain_round(self, rnd: int, caps: dict[str, float]
                     ) -> tuple[RoundOutcome, dict[str, float], int, dict[str, Any]]:
        """Updates streamed into the strategy's aggregation; with client-level DP every site
        weighs 1 and the coordinator adds the noise to the sum."""
        agg = self.strategy.new_round(rnd)
        opened: dict[str, UpdateStream] = {}
        weights: dict[str, float] = {}
        dp = self.plan.privacy.dp == "client"

        def open_stream(topic: Topic, m: Manifest) -> UpdateStream | None:
            """Each site's update goes into the sum frame by frame as its chunks arrive; what
            is not this round's update is left to be received whole and refused by _take."""
            if m.body_kind is not BodyKind.UPDATE or m.round != rnd \
                    or m.meta.get("run") != self.run_id:
                return None
            site = topic.sender
            earlier = opened.get(site)
            if earlier is not None:
                # A site that restarted sends its update again under a new manifest: the new
                # one may replace the old only if nothing of the old reached the sum.
                if earlier.watermark > 0 or earlier.accepted:
                    raise ProtocolError("duplicate_update", site)
                earlier.abandon(ProtocolError("replaced", site))
            report = _validated_report(m.meta)
            codec = m.meta.get("update")
            if not isinstance(codec, dict):
                raise ProtocolError("bad_field", "update")
            # The weight a site claims is capped: at what it declared in round 0 (a site that
            # missed it: the largest declared) and at the plan's max_weight_fraction.
            cap = caps.get(site, max(caps.values(), default=float(report["n_samples"])))
            weights[site] = 1.0 if dp else min(float(report["n_samples"]), cap)
            stream = agg.open_update(site, codec, weights[site], m.body_len)
            opened[site] = stream
            return stream

        def take(site: str, m: Manifest, body: bytes) -> dict[str, Any]:
            if site not in opened or not opened[site].accepted or body:
                raise ProtocolError("not_streamed", site)  # cannot happen: open_stream took it
            report = _validated_report(m.meta)
            report["bytes_received"] = m.body_len
            return report

        self.peer.open_stream = open_stream
        try:
            sent = self._broadcast(rnd, BodyKind.TASK, self._task_body(), self._task_meta(rnd))
            outcome = self._collect(rnd, BodyKind.UPDATE, take)
        finally:
            self.peer.open_stream = None
        crash_point("coordinator.updates_collected")
        self.state = State.AGGREGATING
        if dp:
            mean = agg.mean_update(self.params)
            k = len(outcome.reports)
            p = self.plan.privacy
            self._spend_privacy(outcome)
            mean += gaussian_noise(mean.size, p.dp_noise_multiplier * p.dp_clip / k)
            self.params = self.strategy.apply_mean(self.params, mean)
        else:
            if self.plan.privacy.dp == "sample":
                self._spend_privacy(outcome)
            self.params = agg.finalize(self.params)
        return outcome, weights, sent, {"partial": agg.partial(),
                                        "discounted": dict(sorted(agg.discounted.items()))}

    def _close_round(self, rnd: int, outcome: RoundOutcome, weights: dict[str, float],
                     sent: int, extra: dict[str, Any], wall: float) -> None:
        slowest = max(r["train_seconds"] for r in outcome.reports.values())
        claimed = sum(r["n_samples"] for r in outcome.reports.values())
        record = {
            "round": rnd,
            "sites": sorted(outcome.reports),
            "declined": dict(sorted(outcome.declined.items())),
            "samples": claimed,
            "train_loss": sum(r["train_loss"] * r["n_samples"] for r in outcome.reports.values())
            / claimed,
            # metrics of the model the sites received this round (the previous global model)
            "eval_before": weighted_metrics(outcome.reports),
            "per_site": {s: {"n_samples": r["n_samples"], "weight": weights[s],
                             "train_loss": r["train_loss"], "eval": r.get("eval"),
                             "bytes_up": r["bytes_received"], "bytes_down": sent}
                         for s, r in outcome.reports.items()},
            "seconds": wall,
            "slowest_train_s": slowest,
            "overhead_s": wall - slowest,
            "bytes_sent": sent,
            "bytes_received": sum(r["bytes_received"] for r in outcome.reports.values()),
            "strategy": self.plan.strategy.name,
            "model_sha256": hashlib.sha256(self.params.astype("<f4").tobytes()).hexdigest(),
            # partial: sites whose update stopped part way (share of the parameters reached);
            # discounted: sites the strategy counted less or not at all this round, and why;
            # secure: epochs, members and timings of a secure round
            **extra,
        }
        if self.plan.privacy.dp != "none":
            record["epsilon"] = self._epsilon()
            record["delta"] = self.plan.privacy.dp_delta
        self.history.append(record)
        self.last_round_ok_ts = round(time.time(), 3)
        self._save_checkpoint()
        ev = record["eval_before"]
        log.info("round %d/%d closed: %d sites, %d samples, train loss %.4f, held-out AUC of the "
                 "model sent %s, %.3f s (overhead %.1f ms)%s", rnd, self.plan.rounds,
                 len(record["sites"]), record["samples"], record["train_loss"],
                 f"{ev['auc']:.3f}" if ev.get("auc") is not None else "n/a", wall,
                 record["overhead_s"] * 1000,
                 f", epsilon {record['epsilon']:.3f}" if "epsilon" in record else "")
        self.on_round(record)

    def _image_voxels(self) -> int:
        shape = self.layout.image_shape
        return 0 if shape is None else int(np.prod(shape))

    def _task_body(self) -> bytes:
        """Global parameters, then (imaging models) the federated per-voxel mean and scale."""
        return (self.params.astype("<f4").tobytes()
                + self.image_norm.astype("<f4").tobytes())

    def _task_meta(self, rnd: int | None = None) -> dict[str, Any]:
        meta = {"layout": self.layout.to_dict(), "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "rounds": self.plan.rounds}
        if rnd is not None and self.plan.privacy.dp != "none":
            # what this round spends, as each site's privacy ledger records it
            meta["epsilon_after"] = self._epsilon(after_round=True)
        return meta

    # ------------------------------------------------------------------ privacy

    def history_epsilon(self) -> float | None:
        """Epsilon spent by the rounds trained (None without DP)."""
        return self._epsilon() if self.plan.privacy.dp != "none" else None

    def _dp_steps(self) -> list[tuple[str, float, int]]:
        """(accountant, sampling rate, compositions) one round costs: the whole federation for
        client-level DP; each site's DP-SGD steps for sample-level DP."""
        p, t = self.plan.privacy, self.plan.training
        if p.dp == "client":
            return [("federation", 1.0, 1)]
        steps = []
        for site, rows in sorted(self.site_rows.items()):
            if rows > 0:
                q = min(1.0, t.batch_size / rows)
                steps.append((site, q, t.local_epochs * -(-rows // t.batch_size)))
        return steps

    def _epsilon(self, *, after_round: bool = False) -> float:
        """Epsilon spent so far (the largest of the sites' for sample-level DP), or after one
        more round."""
        p = self.plan.privacy
        worst = 0.0
        for name, q, count in self._dp_steps():
            acc = self.accountants.setdefault(name, PrivacyAccountant())
            if after_round:
                eps = acc.would_exceed(p.dp_noise_multiplier, q, count, float("inf"),
                                       p.dp_delta)[1]
            else:
                eps = acc.epsilon(p.dp_delta)[0]
            worst = max(worst, eps)
        return worst

    def _budget_left(self) -> bool:
        """False when the next round would spend more than the plan's (epsilon, delta)."""
        p = self.plan.privacy
        if p.dp == "none":
            return True
        after = self._epsilon(after_round=True)
        if after <= p.dp_epsilon:
            return True
        log.warning("stopping before round %d: it would spend epsilon %.3f > the plan's "
                    "budget %.3f (delta %g); %.3f spent", self.current_round + 1, after,
                    p.dp_epsilon, p.dp_delta, self._epsilon())
        return False

    def _spend_privacy(self, outcome: RoundOutcome) -> None:
        """Count the round's release in the accountant and keep it, before the sum is opened:
        a crash after this costs budget twice at worst, never zero times."""
        p = self.plan.privacy
        for name, q, count in self._dp_steps():
            if name == "federation" or name in outcome.reports:
                self.accountants.setdefault(name, PrivacyAccountant()).step(
                    p.dp_noise_multiplier, q=q, count=count)
        self._save_checkpoint()

    def _register_key(self, site: str, record: Any) -> None:
        """A site's signed masking key, checked as its peers will check it."""
        verifier = self.peer.trust.verifier if self.peer.trust is not None else None
        secagg.check_key_record(record, self.fed, self.run_id, site, verifier)
        if self.secagg_keys.get(site) != record:
            self.secagg_keys[site] = record
            log.info("secure aggregation: %s registered its masking key", site)

    def _secure_round(self, rnd: int, caps: dict[str, float]
                      ) -> tuple[RoundOutcome, dict[str, float], int, dict[str, Any]]:
        """Masked updates summed mod 2^wire; the sum opened with the members' self-mask
        secrets. Members that do not deliver: the epoch is run again among those that did
        (fresh masks), so no single update is ever opened (agent/privacy/secagg.py)."""
        privacy = self.plan.privacy
        members = sorted(s for s in self.plan.sites if s in self.secagg_keys)
        bits = secagg.code_bits(self.plan.compression.quantize)
        epoch = max(self._last_epoch + 1, int(time.time()))  # later than any before a restart
        sent, epochs = 0, []
        while True:
            if len(members) < 2:
                raise FedsiloError(f"round {rnd}: secure aggregation needs at least 2 sites "
                                   f"with a registered key; have {members}")
            self._last_epoch = epoch
            fallback = max(caps.values(), default=1.0)
            weights = {s: 1 for s in members} if privacy.dp == "client" else \
                secagg.integer_weights({s: caps.get(s, fallback) for s in members}, bits)
            wire = secagg.ring_bits(sum(weights.values()), bits)
            outcome, total, escrow, bytes_out = self._masked_epoch(rnd, epoch, members,
                                                                   weights, wire)
            sent += bytes_out
            arrived = sorted(outcome.reports)
            epochs.append({"epoch": epoch, "members": members, "arrived": arrived})
            if arrived == members:
                break
            log.warning("round %d: %d of %d masked updates arrived (missing %s); masking "
                        "again among the %d that did", rnd, len(arrived), len(members),
                        ", ".join(sorted(set(members) - set(arrived))), len(arrived))
            members, epoch = arrived, epoch + 1
        if privacy.dp != "none":
            self._spend_privacy(outcome)
        secrets_, recovered = self._reveal(rnd, epoch, members, escrow)
        if secrets_ is None:
            raise FedsiloError(f"round {rnd}: fewer than {secagg.threshold(len(members))} of "
                               f"{len(members)} members answered the unmasking; the sum "
                               "cannot be opened")
        epochs[-1]["recovered"] = recovered
        t0 = time.perf_counter()
        values = secagg.unmask(total.total, [secrets_[s] for s in members], wire, self.kernels)
        mean = secagg.from_fixed(values, bound=privacy.value_bound, bits=bits,
                                 total_weight=sum(weights.values()))
        unmask_s = time.perf_counter() - t0
        self.state = State.AGGREGATING
        self.params = self.strategy.apply_mean(self.params, mean)
        clipped = sum(r["clipped_values"] for r in outcome.reports.values())
        extra = {"partial": {}, "discounted": {},
                 "secure": {"epochs": epochs, "wire_bits": wire, "code_bits": bits,
                            "clipped_values": clipped, "unmask_s": unmask_s}}
        return outcome, {s: float(w) for s, w in weights.items()}, sent, extra

    def _masked_epoch(self, rnd: int, epoch: int, members: list[str], weights: dict[str, int],
                      wire: int) -> tuple[RoundOutcome, secagg.MaskedSum,
                                          dict[str, tuple[dict[str, str], str]], int]:
        """One epoch: the task to the members, their masked updates summed as they stream in.
        (outcome, the masked sum, each update's sealed shares and commitment, bytes sent)."""
        n = self.layout.size
        total = secagg.MaskedSum(n, wire)
        opened: dict[str, secagg.MaskedStream] = {}
        escrow: dict[str, tuple[dict[str, str], str]] = {}
        codec = {"codec": "masked", "epoch": epoch, "wire": wire, "n": n}

        def open_stream(topic: Topic, m: Manifest) -> secagg.MaskedStream | None:
            if m.body_kind is not BodyKind.UPDATE or m.round != rnd \
                    or m.meta.get("run") != self.run_id:
                return None
            site = topic.sender
            if site not in members:
                raise ProtocolError("not_a_member", site)
            if site in opened:
                raise ProtocolError("duplicate_update", site)
            _validated_report(m.meta)
            if m.meta.get("update") != codec:
                raise ProtocolError("bad_field", "update (not this epoch's masking)")
            if m.body_len != n * wire // 8:
                raise ProtocolError("bad_update_size", f"{m.body_len} bytes")
            shares, commit = m.meta.get("shares"), m.meta.get("commitment")
            if not isinstance(shares, dict) or set(shares) != set(members) - {site} \
                    or not all(isinstance(v, str) and len(v) < 256 for v in shares.values()) \
                    or not isinstance(commit, str) or len(commit) != 64:
                raise ProtocolError("bad_field", "shares")
            escrow[site] = (shares, commit)
            opened[site] = total.stream()
            return opened[site]

        def take(site: str, m: Manifest, body: bytes) -> dict[str, Any]:
            if site not in opened or not opened[site].accepted or body:
                raise ProtocolError("not_streamed", site)
            report = _validated_report(m.meta)
            report["bytes_received"] = m.body_len
            clipped = m.meta.get("clipped_values", 0)
            report["clipped_values"] = clipped if isinstance(clipped, int) else 0
            return report

        secure = {"epoch": epoch, "members": members, "wire": wire, "weights": weights,
                  "keys": {s: self.secagg_keys[s] for s in members}}
        self.peer.open_stream = open_stream
        try:
            sent = self._broadcast(rnd, BodyKind.TASK, self._task_body(),
                                   {**self._task_meta(rnd), "secure": secure})
            outcome = self._collect(rnd, BodyKind.UPDATE, take, expected=set(members))
        finally:
            self.peer.open_stream = None
        return outcome, total, escrow, sent

    def _reveal(self, rnd: int, epoch: int, members: list[str],
                escrow: dict[str, tuple[dict[str, str], str]]
                ) -> tuple[dict[str, bytes] | None, list[str]]:
        """Every member's self-mask secret for a complete epoch: given by the member, or
        recovered from the Shamir shares a majority of its peers open (a member lost after its
        upload). (secrets, members recovered), or (None, []) when too few answered."""
        commits = {s: escrow[s][1] for s in members}

        def take(site: str, m: Manifest, body: bytes) -> dict[str, Any]:
            if m.meta.get("epoch") != epoch or body:
                raise ProtocolError("wrong_epoch")
            try:
                seed = base64.b64decode(m.meta.get("seed", ""), validate=True)
            except (ValueError, TypeError):
                raise ProtocolError("bad_field", "seed") from None
            if secagg.commitment(seed) != commits[site]:
                raise ProtocolError("bad_field", "seed (not the one committed to)")
            shares = m.meta.get("shares")
            if not isinstance(shares, dict) or not all(
                    isinstance(v, str) and len(v) == 2 * (2 + secagg.SECRET_BYTES)
                    for v in shares.values()):
                raise ProtocolError("bad_field", "shares")
            return {"seed": seed, "shares": shares}

        body = json.dumps({"keys": {s: self.secagg_keys[s] for s in members},
                           "shares": {s: escrow[s][0] for s in members}}).encode()
        self._broadcast(rnd, BodyKind.UNMASK, body, {"epoch": epoch, "members": members,
                                                     "received": members})
        outcome = self._collect(rnd, BodyKind.REVEAL, take, expected=set(members),
                                quorum=secagg.threshold(len(members)))
        secrets_: dict[str, bytes] = {s: r["seed"] for s, r in outcome.reports.items()}
        recovered = []
        for lost in sorted(set(members) - set(secrets_)):
            shares = [r["shares"][lost] for r in outcome.reports.values() if lost in r["shares"]]
            secret = secagg.recover_secret(shares, commits[lost])
            if secret is None:
                return None, []
            secrets_[lost] = secret
            recovered.append(lost)
            log.warning("round %d: %s sent its masked update but not its self-mask secret; "
                        "recovered it from %d of its peers' shares", rnd, lost, len(shares))
        return secrets_, recovered

    def _evaluate_phase(self) -> dict[str, Any]:
        rnd = self.plan.rounds + 1

        def take(site: str, m: Manifest, body: bytes) -> dict[str, Any]:
            return _validated_report(m.meta, train=False)

        self._broadcast(rnd, BodyKind.EVALUATE, self._task_body(), self._task_meta())
        outcome = self._collect(rnd, BodyKind.EVALUATION, take)
        final = {"round": rnd, "sites": sorted(outcome.reports),
                 "declined": dict(sorted(outcome.declined.items())),
                 "eval": weighted_metrics(outcome.reports),
                 "per_site": {s: r.get("eval") for s, r in outcome.reports.items()}}
        return final

    def _finish(self, final: dict[str, Any] | None) -> None:
        self.phase = "finished"
        if final is not None:
            self.history.append({"final": final})
        self._save_checkpoint()
        crash_point("coordinator.finished_checkpoint_written")
        self._announce_finished()

    def _ensure_model(self) -> None:
        """The model directory holds this run's final model (rewritten from the checkpoint
        when a crash came before it was written, or while it was)."""
        directory = self.state_dir / "model"
        try:
            saved = load_model(directory)
            if np.array_equal(saved.params, self.params):
                return
        except DataError:
            pass
        self._write_state("final model", lambda: save_model(directory, SavedModel(
            layout=self.layout, params=self.params, columns=self.columns, mean=self.mean,
            scale=self.scale, plan=self.plan_doc, image_norm=self.image_norm),
            extra={"run": self.run_id}))
        log.info("final model written to %s", directory)

    def _model_card_extra(self) -> dict[str, str]:
        """What the exported model's card says about this run, from the history: the rounds
        really closed (a DP budget may stop a federation early), the sites whose updates were
        used, the final held-out metrics and the privacy spent."""
        rounds = [r for r in self.history if "round" in r]
        final = next((h["final"] for h in reversed(self.history) if "final" in h), {})
        extra = {"run": self.run_id, "rounds_completed": str(len(rounds)),
                 "training_sites": str(len({s for r in rounds for s in r.get("sites", [])})),
                 "final_metrics": json.dumps(final.get("eval", {}), sort_keys=True,
                                             separators=(",", ":"))}
        epsilon = self.history_epsilon()
        if epsilon is not None:
            extra["epsilon"] = f"{epsilon:.6g}"
        return extra

    def _ensure_onnx(self) -> Path | None:
        """`model/model.onnx` for this run's final model, (re)written only when the file's
        card does not describe this run and parameters (so a restarted coordinator sends the
        same bytes again); None when the model kind has no ONNX export."""
        from agent.learn import onnx_export as ox

        if self.layout.kind not in ox.EXPORTABLE_KINDS:
            log.warning("the final model is not distributed to the sites: model kind %s has "
                        "no ONNX export (exportable: %s)", self.layout.kind,
                        ", ".join(ox.EXPORTABLE_KINDS))
            return None
        directory = self.state_dir / "model"
        path = directory / MODEL_ONNX
        extra = self._model_card_extra()
        want = {**extra,
                "params_sha256": hashlib.sha256(self.params.astype("<f4").tobytes()).hexdigest()}
        try:
            card = ox.model_card(ox.load_onnx(path))
            if all(card.get(k) == v for k, v in want.items()):
                return path
        except Exception:  # noqa: BLE001 - missing, torn or foreign: written again below
            pass
        try:
            saved = load_model(directory)
            self._write_state("final model (ONNX)",
                              lambda: ox.save_onnx(saved, path, extra=extra))
        except (ValueError, DataError) as exc:
            log.warning("the final model is not distributed to the sites: ONNX export "
                        "failed (%s)", exc)
            return None
        log.info("final model exported to %s", path)
        return path

    def _publish_model(self) -> dict[str, Any] | None:
        """The exported model to every site, signed and chunked like a task, at round
        rounds + 2; what the finished control says about it (None: nothing sent)."""
        path = self._ensure_onnx()
        if path is None:
            return None
        body = path.read_bytes()
        rnd = self.plan.rounds + 2
        digest = hashlib.sha256(body).hexdigest()
        self._broadcast(rnd, BodyKind.MODEL, body, {"file": MODEL_ONNX})
        log.info("final model sent to the sites (%d bytes, sha256 %s)", len(body), digest[:12])
        return {"round": rnd, "sha256": digest, "bytes": len(body)}

    def _announce_finished(self) -> None:
        """Model on disk, the model to the sites, then the retained finished control: done
        on every start of a finished federation too, since a crash may have come between the
        checkpoint and any of them (sites wait for the control to stop)."""
        self._ensure_model()
        model = self._publish_model()
        meta: dict[str, Any] = {"run": self.run_id}
        if model is not None:
            meta["model"] = model
        manifest = make_manifest(federation=self.fed, round=self.plan.rounds + 1,
                                 sender="coordinator", body_kind=BodyKind.FINISHED, body=b"",
                                 created=time.time(), meta=meta)
        self.transport.publish(topics.coordinator_manifest(self.fed, self.plan.rounds + 1), b"",
                               retain=True)
        self.peer.send_body(topics.coordinator_control(self.fed), lambda k: "", manifest, b"",
                            retain_manifest=True)
        self.state = State.FINISHED
        self._publish_status()

    # ------------------------------------------------------------------ entry point

    def run(self) -> dict[str, Any]:
        """Run (or resume) the federation to the end; returns the final metrics record."""
        self.notifier.extend_timeout(120.0)
        self.notifier.status("starting")
        ensure_writable(self.state_dir)
        self._load_checkpoint()
        if not self.transport.connect(retry=True, stop=self.stop_event,
                                      on_wait=self.notifier.waiting):
            raise Stopped("stopped while waiting for the MQTT broker")
        self.notifier.ready(f"connected to {self.config.broker.host}:{self.config.broker.port}")
        self.notifier.start_watchdog()
        try:
            if self.phase != "finished":
                # A new run replaces whatever an earlier federation left retained.
                self.transport.publish(topics.coordinator_control(self.fed), b"", retain=True)
                self.transport.publish(topics.coordinator_manifest(self.fed,
                                                                   self.plan.rounds + 2),
                                       b"", retain=True)  # the last run's model
            if self.phase == "stats":
                self._stats_phase()
            first = self.current_round + 1 if self.history else 1
            for rnd in range(first, self.plan.rounds + 1):
                if not self._budget_left():
                    break
                self._train_round(rnd)
            final = None
            if self.phase != "finished":
                final = self._evaluate_phase()
                self._finish(final)
            else:
                self._announce_finished()
            return final or next((h["final"] for h in self.history if "final" in h), {})
        finally:
            self.notifier.stopping()
            self.transport.close(final=(topics.coordinator_status(self.fed), offline_status(
                role="coordinator", identity=self.config.coordinator_id, federation=self.fed,
                reason="stopped")) if self.state is not State.FINISHED else None)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _MomentsSink:
    """A site's streamed moments; a malformed vector is a protocol error (named as such)."""

    def __init__(self, stream: MomentsStream) -> None:
        self.stream = stream

    def feed(self, data: bytes) -> None:
        try:
            self.stream.feed(data)
        except ValueError as exc:
            raise ProtocolError("bad_stats", str(exc)) from None

    def finish(self) -> None:
        try:
            self.stream.finish()
        except ValueError as exc:
            raise ProtocolError("bad_stats", str(exc)) from None


def _validated_report(meta: dict[str, Any], *, train: bool = True) -> dict[str, Any]:
    """Check a site's report before it touches any math (Flower lacks this check)."""
    report: dict[str, Any] = {}
    if train:
        n = meta.get("n_samples")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_SAMPLES:
            raise ProtocolError("bad_n_samples")
        for key in ("train_loss", "train_seconds"):
            if not _finite(meta.get(key)) or meta[key] < 0:
                raise ProtocolError("bad_report", key)
        report = {"n_samples": n, "train_loss": float(meta["train_loss"]),
                  "train_seconds": float(meta["train_seconds"])}
    ev = meta.get("eval")
    if ev is not None:
        if not isinstance(ev, dict) or not isinstance(ev.get("n"), int) or ev["n"] < 0:
            raise ProtocolError("bad_report", "eval")
        clean = {"n": ev["n"]}
        if ev.get("reason") in _WHY_NO_AUC:
            clean["reason"] = ev["reason"]
        for key in ("loss", "auc", "accuracy"):
            value = ev.get(key)
            if value is not None and not _finite(value):
                raise ProtocolError("bad_report", f"eval.{key}")
            clean[key] = float(value) if value is not None else None
        report["eval"] = clean
    return report
