"""The site role: answer the coordinator's tasks with statistics, updates and evaluations.

Patient rows never leave this process: what goes out is column moments (counts, sums, sums of
squares), parameter updates with their sample count, and aggregate held-out metrics.
The plan arrives inside every task, so a site that joins late (or restarts) needs nothing but
its config: the retained manifest of the current round tells it what to do, and the chunks it
missed are asked for again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

import kernels as kernel_registry
from agent.config import Plan, SiteConfig, plan_from_dict
from agent.errors import DataError, FedsiloError, NotWanted, ProtocolError
from agent.federation import topics
from agent.federation.aggregate import accumulate_update
from agent.federation.codec import Encoded, encode_update, kept_count, rounding_seed
from agent.federation.envelope import BodyKind, Manifest, make_manifest
from agent.federation.outbox import Outbox, Reply
from agent.federation.peer import BodyReady, Peer, Trust
from agent.federation.transport import Transport, Will
from agent.ingest.tables import EncodedTable, load_table
from agent.learn import metrics
from agent.learn.distribution import received_digest, save_received_model, verify_model
from agent.learn.kinds import model_kind
from agent.learn.layout import Layout
from agent.learn.models import predict_proba
from agent.learn.standardize import apply_standardization, local_moments
from agent.learn.trainer import DpSgd, TrainResult, train_local
from agent.ops.atomic import write_atomic, write_json_atomic
from agent.ops.crashpoints import crash_point
from agent.ops.hardware import (
    apply_profile,
    backend_for,
    default_profiles_dir,
    detect_host,
    load_profiles,
    select_profile,
)
from agent.ops.sdnotify import Notifier
from agent.ops.statedir import (
    DISK_FULL,
    NOT_WRITABLE,
    describe,
    ensure_writable,
    hold_agent_lock,
)
from agent.ops.status import (
    State,
    encode_status,
    home_assistant_discovery,
    host_vitals,
    offline_status,
    status_document,
)
from agent.ops.throttle import Throttle
from agent.privacy import secagg
from agent.privacy.dp import clip_to_norm, gaussian_noise, secure_rng, site_noise_std
from agent.privacy.ledger import Ledger
from agent.privacy.secsite import SecureState

if TYPE_CHECKING:
    from agent.ingest.service import IngestService

log = logging.getLogger(__name__)

MAX_TASK_BYTES = 256 << 20  # flat: the site learns the model (and so its size) from the task itself
STATUS_EVERY_S = 10.0
THROTTLE_POLL_S = 1.0  # while paused: how often the policy is asked again
STATE_RETRY_S = 10.0  # a task the state directory refused is tried again after this
START_TIMEOUT_S = 120.0  # asked of systemd while starting (a cold Numba cache compiles)
MODEL_WAIT_S = 60.0  # after "finished" names a model not yet here: how long to wait for it


class _Stopping(BaseException):
    """A stop was requested while training: unwinds to `run`, which goes offline cleanly.
    (A BaseException, like KeyboardInterrupt, so the per-task `except Exception` that keeps the
    daemon alive through a bad task does not swallow it.)"""


@dataclass(frozen=True)
class LocalData:
    """This site's usable rows (with their images for an imaging model), split once,
    deterministically, into train and held-out rows."""

    table: EncodedTable
    x: np.ndarray  # encoded features of the usable rows
    y: np.ndarray
    images: np.ndarray | None  # float32 [n, depth, size, size] for an imaging model, else None
    train: np.ndarray  # row indices into x / y / images
    holdout: np.ndarray
    rows_without_image: int = 0


def _proc_status_mib(*keys: str) -> dict[str, float]:
    found: dict[str, float] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name in keys:
                    found[name] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return found


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM belongs to the process's own address space;
    ru_maxrss would also count the parent's memory at fork time."""
    peak = _proc_status_mib("VmHWM").get("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_split_mib() -> tuple[float, float]:
    """(private anonymous, file-backed) resident memory now. File-backed pages are mostly shared
    library code (llvmlite, numpy), shared by every fedsilo process on the host."""
    d = _proc_status_mib("RssAnon", "RssFile")
    return d.get("RssAnon", float("nan")), d.get("RssFile", float("nan"))


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _names(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)


def _epoch_of(meta: Any) -> int | None:
    return meta.get("epoch") if isinstance(meta, dict) else None


def _secure_task(sec: Any, plan: Plan, site: str) -> dict[str, Any]:
    """A secure round's settings from the task, checked before any of it is used."""
    if not isinstance(sec, dict):
        raise ProtocolError("bad_field", "secure")
    members, weights, keys = sec.get("members"), sec.get("weights"), sec.get("keys")
    epoch, wire = sec.get("epoch"), sec.get("wire")
    if (not _names(members) or len(set(members)) != len(members)
            or not set(members) <= set(plan.sites) or site not in members
            or len(members) < 2 or not isinstance(epoch, int) or wire not in (16, 32)
            or not isinstance(weights, dict) or not isinstance(keys, dict)):
        raise ProtocolError("bad_field", "secure")
    w = weights.get(site)
    if not isinstance(w, int) or isinstance(w, bool) or not 1 <= w <= secagg.MAX_WEIGHT:
        raise ProtocolError("bad_field", "secure.weights")
    total = sum(weights.get(p, 0) for p in members if isinstance(weights.get(p), int))
    try:
        if secagg.ring_bits(total, secagg.code_bits(plan.compression.quantize)) > wire:
            raise ValueError("the sum would wrap")
    except ValueError:
        raise ProtocolError("bad_field", "secure.wire") from None
    return {"members": sorted(members), "epoch": epoch, "wire": wire, "weights": weights,
            "keys": keys}


def split_rows(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(n * holdout_fraction)) if n >= 10 else 0
    return np.sort(order[k:]), np.sort(order[:k])


class _SitePeer(Peer):
    """A Peer that keeps the signed header of the model manifests it verified: the site saves
    it beside the model (model.manifest.json) so the signature can be checked again offline."""

    KEEP = 8  # headers of model manifests kept (one per coordinator restart at most)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_headers: dict[tuple[Any, Any], dict[str, Any]] = {}

    def _verify(self, header: dict[str, Any], topic: topics.Topic) -> None:
        super()._verify(header, topic)
        if header.get("kind") == "manifest" and header.get("body_kind") == BodyKind.MODEL.value:
            key = (header.get("round"), header.get("nonce"))
            self.model_headers.pop(key, None)
            self.model_headers[key] = dict(header)
            while len(self.model_headers) > self.KEEP:
                del self.model_headers[next(iter(self.model_headers))]

    def signed_header(self, m: Manifest) -> dict[str, Any] | None:
        """The header as received of a completed model body (None if it was never seen)."""
        header = self.model_headers.get((m.round, m.nonce))
        return header if header is not None and header.get("body_digest") == m.body_digest \
            else None


class Site:
    def __init__(self, config: SiteConfig, *, backend: str = "auto",
                 process_start: float | None = None) -> None:
        self.config = config
        self.fed = config.federation
        self.site_id = config.site_id
        facts = detect_host()
        self.profile = select_profile(load_profiles(default_profiles_dir()), facts,
                                      config.hardware_profile, source=config.source)
        if backend == "auto":
            backend = backend_for(self.profile, kernel_registry.available_backends())
        self.kernels: ModuleType = kernel_registry.get_backend(backend)
        cap = self.profile.settings.memory_cap_mib
        if cap and backend == "gpu":
            from kernels.gpu_common import set_memory_limit_mib

            set_memory_limit_mib(cap)
            log.info("GPU memory pool capped at %d MiB by hardware profile %s", cap,
                     self.profile.name)
        self.threads = apply_profile(self.profile, facts)
        self.process_start = process_start if process_start is not None else time.time()
        self.stop_event = threading.Event()
        self.notifier = Notifier()
        self.throttle = Throttle(config.policy, cores=os.cpu_count() or 1)
        self.throttle_reason: str | None = None
        self.last_round_ok_ts: float | None = None  # when this site last sent an update
        self.state = State.STARTING
        self.round: int | None = None
        self.run_id: str | None = None
        self.answered: set[tuple[int, str]] = set()  # (round, manifest nonce)
        self.finished_runs: list[str] = []  # runs this site saw finish (oldest first)
        self._retry: tuple[BodyReady, float] | None = None  # (task, when) after a state error
        self.answered_round: int | None = None  # the last round whose reply was acknowledged
        self.outbox = Outbox(config.state_dir)
        self.secure = SecureState(config.state_dir)
        self.ledger: Ledger | None = None  # opened at the first release (state_dir is checked)
        self.plan: Plan | None = None
        self.data: LocalData | None = None
        self.last_error: str | None = None
        self.first_step_after_start_s: float | None = None  # cold start, once per process
        self.first_step_after_task_s: float | None = None  # of the latest training task
        self._task_arrived: float | None = None
        self._first_step_pending = False
        self.ingest: IngestService | None = None
        self.attack: str | None = None
        if os.environ.get("FEDSILO_DEMO_ATTACK"):  # the demo's misbehaving hospital only
            from agent.demo.attack import armed

            self.attack = armed()
            log.warning("DEMO ATTACK ARMED: this site sends %s updates (FEDSILO_DEMO_ATTACK); "
                        "never in a real federation", self.attack)
        self.declined_reason: str | None = None  # why this site sends nothing for the plan
        self._std_images: np.ndarray | None = None
        self._image_norm_digest: str | None = None
        self.transport = Transport(
            f"fedsilo-{self.fed}-site-{self.site_id}", config.broker,
            will=Will(topics.site_status(self.fed, self.site_id),
                      offline_status(role="site", identity=self.site_id, federation=self.fed,
                                     reason="connection_lost")),
            subscriptions=topics.site_subscriptions(self.fed, self.site_id))
        self.peer = _SitePeer(self.transport, self.fed, self.site_id, max_body=MAX_TASK_BYTES,
                              accept=self._accept, trust=Trust.load(
                                  config.identity, config.broker.tls, self.site_id))
        self.peer.open_stream = self._open_stream
        self.model_dir = config.state_dir / "model"
        self.model_sha256 = received_digest(self.model_dir)  # of the model this site holds
        self._awaited_model: dict[str, Any] | None = None  # what "finished" said was sent

    # ------------------------------------------------------------------ helpers

    def _accept(self, topic: topics.Topic) -> bool:
        if topic.sender != "coordinator":
            return False
        return topic.kind != "req" or topic.site == self.site_id

    def _status_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"rejected_messages": sum(self.peer.rejected.values()),
                                 "bytes_sent": self.peer.bytes_sent,
                                 "bytes_received": self.peer.bytes_received,
                                 "hardware_profile": self.profile.name,
                                 "threads": self.threads}
        if self.data is not None:
            extra["rows_read"] = self.data.table.rows_read
            extra["rows_skipped"] = sum(self.data.table.skipped.values())
            # Flat for monitoring tools: "target_missing=1,unparseable:age=2".
            extra["rows_skipped_reasons"] = ",".join(
                f"{k}={v}" for k, v in sorted(self.data.table.skipped.items()))
            extra["train_rows"] = int(self.data.train.size)
            extra["rows_without_image"] = self.data.rows_without_image
        if self.ingest is not None:
            extra.update(self.ingest.status_extra())
        extra["declined_reason"] = self.declined_reason
        extra["rss_peak_mib"] = round(peak_rss_mib(), 1)
        extra["cert_days_left"] = self.transport.cert_days_left()
        extra.update(self.transport.connection_status())
        extra["last_round_ok_ts"] = self.last_round_ok_ts
        extra["run"] = self.run_id
        if self.model_sha256 is not None:
            extra["model_sha256"] = self.model_sha256[:12]
        extra["trust_problem"] = self.peer.trust.problem if self.peer.trust else None
        extra["answered_round"] = self.answered_round  # the coordinator asks again if lost
        extra["throttled"] = self.throttle_reason is not None
        extra["throttle_reason"] = self.throttle_reason
        extra.update(host_vitals(self.config.state_dir))
        if self.first_step_after_start_s is not None:
            extra["first_step_after_start_s"] = round(self.first_step_after_start_s, 3)
        if self.first_step_after_task_s is not None:
            extra["first_step_after_task_s"] = round(self.first_step_after_task_s, 3)
        return extra

    def publish_status(self) -> None:
        self.notifier.status(f"{self.state.value}, round {self.round}")
        doc = status_document(role="site", identity=self.site_id, federation=self.fed,
                              state=self.state, round=self.round, last_error=self.last_error,
                              extra=self._status_extra())
        self.transport.publish(topics.site_status(self.fed, self.site_id), encode_status(doc),
                               retain=True)

    def _reply(self, task: Manifest, kind: BodyKind, body: bytes, meta: dict[str, Any],
               residual: np.ndarray | None = None) -> None:
        """Keep the reply on disk (with the residual it leaves), then send it."""
        assert self.run_id is not None
        manifest = make_manifest(federation=self.fed, round=task.round, sender=self.site_id,
                                 body_kind=kind, body=body, created=time.time(),
                                 meta={"run": self.run_id, **meta})
        reply = Reply(self.run_id, task.body_digest, manifest, body, residual)
        self.outbox.put(reply)
        self._send_reply(reply, task)

    def _send_reply(self, reply: Reply, task: Manifest) -> None:
        """Send a kept reply, then keep what it leaves: its residual, then the round as
        answered. A crash anywhere in between sends the same reply again at restart."""
        rnd = reply.manifest.round
        self.state = State.UPLOADING
        self.peer.forget_sent_before(rnd)
        manifest_topic, chunk_topic = self._reply_topics(rnd)
        self._record_release(reply.manifest, reply.body, manifest_topic, task)
        self.peer.send_body(manifest_topic, chunk_topic, reply.manifest, reply.body)
        self.outbox.make_durable()
        if reply.residual is not None:
            self._save_residual(reply.residual)
        crash_point("site.residual_saved")
        self.answered.add((rnd, task.nonce))
        self.answered_round = rnd
        self._save_state()
        if self.last_error in (DISK_FULL, NOT_WRITABLE):
            log.info("round %d answered: the state directory takes writes again", rnd)
            self.last_error = None
        self.state = State.IDLE
        self.publish_status()

    def _record_release(self, m: Manifest, body: bytes, destination: str,
                        task: Manifest | None) -> None:
        """Into the privacy ledger before it leaves (a resend is not recorded twice)."""
        if self.ledger is None:
            self.ledger = Ledger.for_state_dir(self.config.state_dir)
        eps = task.meta.get("epsilon_after") if task is not None else None
        if m.body_kind is not BodyKind.UPDATE or not _finite_number(eps):
            eps = None
        codec = m.meta.get("update")
        detail = {k: v for k, v in {
            "codec": codec.get("codec", codec.get("quantize")) if isinstance(codec, dict)
            else None,
            "clipped_values": m.meta.get("clipped_values"),
            "dp_clipped": m.meta.get("dp_clipped"),
            "reason": m.meta.get("reason")}.items() if v is not None}
        # What left is the manifest (its meta carries metrics, seeds, shares) and the body
        # it names: the digest covers both, the size counts both.
        header = json.dumps(m.header(), sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(header + body).hexdigest()
        self.ledger.append(federation=self.fed, run=str(self.run_id), round=m.round,
                           kind=m.body_kind.value, destination=destination, digest=digest,
                           size=len(header) + len(body), epsilon=eps, detail=detail or None)

    def _reply_topics(self, rnd: int) -> tuple[str, Callable[[int], str]]:
        """(manifest topic, chunk topic of index) of this site's reply for a round."""
        return (topics.site_manifest(self.fed, self.site_id, rnd),
                lambda k: topics.site_chunk(self.fed, self.site_id, rnd, k))

    def _resend_kept_reply(self, m: Manifest) -> bool:
        """A task already answered (before this site restarted, or before the coordinator
        restarted and re-issued it with the same parameters): send that same reply again."""
        kept = self.outbox.get(MAX_TASK_BYTES)
        if kept is None or (kept.run, kept.task_digest, kept.manifest.round) \
                != (self.run_id, m.body_digest, m.round) \
                or _epoch_of(kept.manifest.meta.get("update")) != _epoch_of(m.meta.get("secure")):
            return False  # (a secure round's epochs share the task body: told apart by epoch)
        log.info("round %d was answered before: sending the same %s again", m.round,
                 kept.manifest.body_kind.value)
        self.round = m.round
        self._send_reply(kept, m)
        return True

    # ------------------------------------------------------------------ data

    def _ensure_data(self, plan: Plan) -> LocalData:
        if self.data is not None and self.plan == plan:
            return self.data
        if self.config.data.table is None:
            raise DataError(f"{self.config.source}: data.table is not set; this site has no "
                            "clinical table to train on")
        table = load_table(self.config.data.table, plan.features, plan.target, plan.missing,
                           self.config.data.id_column)
        x, y, images, no_image = table.x, table.y, None, 0
        if model_kind(plan.model.kind).reads_images:
            x, y, images, no_image = self._join_images(table, plan)
        train, holdout = split_rows(x.shape[0], self.config.data.holdout_fraction,
                                    self.config.data.split_seed)
        if train.size == 0:
            raise DataError(f"{self.config.data.table}: no usable rows")
        self.plan = plan
        self._image_norm_digest = None  # new rows: standardise their images afresh
        self.data = LocalData(table=table, x=x, y=y, images=images, train=train,
                              holdout=holdout, rows_without_image=no_image)
        return self.data

    def _join_images(self, table: EncodedTable, plan: Plan
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Keep the rows whose patient has a stored series (joined by keyed hash of the id)."""
        assert plan.imaging is not None
        if table.ids is None:
            raise DataError(f"{self.config.source}: an imaging model needs data.id_column to "
                            "join table rows with images")
        rows, images = self._ingest_service().images_for(table.ids, plan.imaging)
        missing = table.x.shape[0] - rows.size
        if missing:
            log.warning("%d of %d table rows have no stored image series; the imaging model "
                        "trains on the other %d", missing, table.x.shape[0], rows.size)
        return table.x[rows], table.y[rows], images, missing

    def _ingest_service(self) -> IngestService:
        """Started at launch when a listener or watch folder is configured, else on first need
        (pydicom and friends are imported only then: table-only sites stay light)."""
        if self.ingest is None:
            from agent.ingest.service import IngestService

            self.ingest = IngestService(self.config.state_dir, self.config.dicom,
                                        workers=self.profile.settings.ingest_workers)
            if self.config.results.score:
                self.ingest.attach_scorer(self.config.results, self.config.data,
                                          self.peer.trust.verifier if self.peer.trust else None)
            self.ingest.start()
        return self.ingest

    def _standardize_images(self, norm: np.ndarray) -> None:
        """Images against the federation's per-voxel mean and scale (sent with every task)."""
        assert self.data is not None
        if self.data.images is None:
            return
        digest = hashlib.sha256(norm.tobytes()).hexdigest()
        if self._image_norm_digest == digest:
            return
        mean, scale = np.split(norm, 2)
        shape = self.data.images.shape[1:]
        if not (np.all(np.isfinite(norm)) and np.all(scale > 0)):
            raise ProtocolError("bad_image_norm")
        self._std_images = ((self.data.images - mean.reshape(shape)) / scale.reshape(shape)
                            ).astype(np.float32)
        self._image_norm_digest = digest

    def _images(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Keyword arguments that hand an imaging model its (standardised) images."""
        assert self.data is not None
        if self.data.images is None:
            return {}
        return {"images": self._std_images[idx]}

    def _min_cell(self, plan: Plan) -> int:
        """The smallest cohort this site reports on: the plan's, raised by the site's own."""
        return max(plan.privacy.min_cell, self.config.privacy.min_cell)

    def _refusal(self, plan: Plan) -> str | None:
        """Why this hospital's [privacy] settings refuse the plan, or None."""
        mine = self.config.privacy
        if mine.allowed_features:
            for f in plan.features:
                if f.name not in mine.allowed_features:
                    return f"feature_not_allowed:{f.name}"
        if mine.allowed_model_kinds and plan.model.kind not in mine.allowed_model_kinds:
            return f"model_kind_not_allowed:{plan.model.kind}"
        if mine.require_secure_aggregation and not plan.privacy.secure_aggregation:
            return "secure_aggregation_required"
        if mine.max_epsilon is not None and (plan.privacy.dp == "none"
                                             or plan.privacy.dp_epsilon > mine.max_epsilon):
            return "privacy_budget_not_allowed"
        return None

    def _decline(self, m: Manifest, reason: str, meta: dict[str, Any] | None = None) -> None:
        """Answer a task with nothing but why: the coordinator stops waiting for this site."""
        if reason != self.declined_reason:
            log.warning("round %d: this site takes no part (%s)", m.round, reason)
        self.declined_reason = reason
        self._reply(m, BodyKind.DECLINED, b"", {"reason": reason, **(meta or {})})

    def _key_record(self) -> dict[str, Any]:
        """This run's masking key, signed (sent with the statistics, or when not a member)."""
        assert self.run_id is not None
        key = secagg.site_key(self.config.state_dir, self.run_id)
        return secagg.key_record(self.fed, self.run_id, self.site_id, key,
                                 self.peer.trust.signer if self.peer.trust is not None else None)

    def _evaluate(self, layout: Layout, params: np.ndarray, x: np.ndarray) -> dict[str, Any]:
        assert self.data is not None and self.plan is not None
        idx = self.data.holdout
        if idx.size < self._min_cell(self.plan):
            # Metrics on a handful of patients say too much about each of them: suppressed.
            return {"n": 0, "loss": None, "auc": None, "accuracy": None,
                    "reason": "too_few_patients"}
        y = self.data.y[idx]
        p = predict_proba(layout, params, x[idx], self.kernels, **self._images(idx))
        auc = metrics.roc_auc(y, p)
        out = {"n": int(idx.size), "loss": float(metrics.log_loss(y, p)),
               "auc": None if not np.isfinite(auc) else float(auc),
               "accuracy": float(metrics.accuracy(y, p))}
        if out["auc"] is None:  # every held-out patient has the same outcome
            out["reason"] = "one_outcome_class"
        return out

    # ------------------------------------------------------------------ tasks

    def _on_task(self, m: Manifest, body: bytes) -> None:
        self._task_arrived = time.monotonic()
        self._first_step_pending = True
        meta = m.meta
        run = meta.get("run")
        if not isinstance(run, str):
            raise ProtocolError("bad_field", "run")
        if run != self.run_id:
            if self.run_id is not None:
                log.info("coordinator started a new run; resetting round state")
            self.run_id, self.answered = run, set()
        if (m.round, m.nonce) in self.answered:
            return  # a retained manifest seen again after reconnect: already answered
        if m.body_kind is BodyKind.UNMASK:
            self._on_unmask(m, body)
            return
        if self._resend_kept_reply(m):
            return
        # Otherwise a new manifest for a round we answered is a re-opened round with other
        # parameters than the reply we kept: answer it afresh.
        try:
            plan = plan_from_dict(meta.get("plan"), "<plan from coordinator>")
        except FedsiloError as exc:
            raise ProtocolError("bad_plan", str(exc)) from None
        if plan.federation != self.fed:
            raise ProtocolError("foreign_federation", "plan")
        if self.site_id not in plan.sites:
            log.warning("this site is not listed in the plan of federation %s; idle", self.fed)
            return
        if plan.imaging is not None and self.ingest is not None:
            self.ingest.set_imaging(plan.imaging)  # series waiting for a grid complete now
        self.round = m.round
        refusal = self._refusal(plan)
        if refusal is not None:
            self._decline(m, refusal)
            return
        data = self._ensure_data(plan)
        if data.train.size < self._min_cell(plan):
            # Sums over a handful of rows are those patients' values (or one patient's CT).
            self._decline(m, "below_min_cell")
            return
        self.declined_reason = None
        if m.body_kind is BodyKind.STATS_TASK:
            self.state = State.STATS
            vector = local_moments(data.x[data.train]).to_vector()
            if data.images is not None:  # per-voxel moments for the federation's average head
                pixels = data.images[data.train].reshape(data.train.size, -1)
                vector = np.concatenate([vector, local_moments(pixels).to_vector()])
            if self.attack is not None:
                from agent.demo.attack import attack_moments

                vector = attack_moments(self.attack, vector)
            meta: dict[str, Any] = {"n_rows": int(data.train.size)}
            if plan.privacy.secure_aggregation:
                meta["secagg_key"] = self._key_record()
            self._reply(m, BodyKind.STATS, vector.astype("<f8").tobytes(), meta)
            return
        layout = Layout.from_dict(meta.get("layout"))
        mean = np.asarray(meta.get("mean"), dtype=np.float64)
        scale = np.asarray(meta.get("scale"), dtype=np.float64)
        width = data.x.shape[1]
        voxels = 0 if data.images is None else int(np.prod(data.images.shape[1:]))
        if (mean.shape != (width,) or scale.shape != (width,)
                or len(body) != (layout.size + 2 * voxels) * 4):
            raise ProtocolError("task_shape_mismatch")
        values = np.frombuffer(body, dtype="<f4").astype(np.float32)
        params = values[:layout.size]
        self._standardize_images(values[layout.size:])
        x = apply_standardization(data.x, mean, scale)
        evaluation = self._evaluate(layout, params, x)
        if m.body_kind is BodyKind.EVALUATE:
            self._reply(m, BodyKind.EVALUATION, b"", {"eval": evaluation})
            return
        if plan.privacy.secure_aggregation:
            sec = m.meta.get("secure")
            if isinstance(sec, dict) and isinstance(sec.get("members"), list) \
                    and self.site_id not in sec["members"]:
                # The coordinator has no key of ours (we missed the statistics step): here it is.
                self._decline(m, "not_a_member", {"secagg_key": self._key_record()})
                return
        self.state = State.TRAINING
        self.publish_status()
        self._yield_to_clinical_work()
        log.info("round %d: training on %d rows", m.round, data.train.size)
        result = self.train_round(plan, layout, params, x, m.round)
        delta = (result.params - params).astype(np.float32)
        n_samples = int(result.n_samples)
        if self.attack is not None:
            from agent.demo.attack import attack_update

            delta, n_samples = attack_update(self.attack, delta, n_samples)
        report = {"n_samples": n_samples, "train_loss": float(result.mean_loss),
                  "train_seconds": float(result.seconds), "eval": evaluation}
        privacy = plan.privacy
        if privacy.dp == "client":  # each site's contribution bounded: the sensitivity
            delta, norm = clip_to_norm(delta, privacy.dp_clip)
            report["dp_clipped"] = bool(norm > privacy.dp_clip)
        if privacy.secure_aggregation:
            body, meta = self._masked_update(m, plan, delta)
            self._reply(m, BodyKind.UPDATE, body, report | meta)
            raw = 4 * layout.size
        else:
            encoded = self._encode(plan, layout, delta, m.round)
            self._reply(m, BodyKind.UPDATE, encoded.body, report | {"update": encoded.meta},
                        residual=encoded.residual)
            body, raw = encoded.body, encoded.raw_bytes
        self.last_round_ok_ts = round(time.time(), 3)
        report |= {"bytes_up": len(body), "update_raw_bytes": raw}
        self._publish_metrics(m.round, report)

    def _encode(self, plan: Plan, layout: Layout, delta: np.ndarray, rnd: int) -> Encoded:
        """The plain (unmasked) update as the plan's codec sends it. With client-level DP the
        update as it will be decoded stays within the clip norm: stochastic rounding may push
        it past, so it is shrunk and encoded again until it does not."""
        spec = plan.compression
        residual = self._load_residual(layout.size) if kept_count(layout.size, spec) \
            < layout.size else None
        seed = rounding_seed(self.fed, self.site_id, rnd)
        for _ in range(8):
            encoded = encode_update(delta, spec, seed=seed, kernels=self.kernels,
                                    residual=residual)
            if plan.privacy.dp != "client":
                return encoded
            sent = np.zeros(layout.size, dtype=np.float32)
            accumulate_update(sent, 1.0, encoded.body, encoded.meta, spec, self.kernels)
            norm = float(np.linalg.norm(sent.astype(np.float64)))
            if norm <= plan.privacy.dp_clip:
                return encoded
            delta = (delta * (plan.privacy.dp_clip / norm * (1 - 1e-6))).astype(np.float32)
        raise FedsiloError("could not encode the update within the DP clip norm")

    def _masked_update(self, m: Manifest, plan: Plan, delta: np.ndarray
                       ) -> tuple[bytes, dict[str, Any]]:
        """This site's update, masked for the epoch the task names (agent/privacy/secagg)."""
        assert self.run_id is not None
        sec = _secure_task(m.meta.get("secure"), plan, self.site_id)
        members, epoch, wire = sec["members"], sec["epoch"], sec["wire"]
        key = secagg.site_key(self.config.state_dir, self.run_id)
        publics = self._peer_keys(sec["keys"], members)
        seeds = {peer: secagg.pair_seed(key, public, federation=self.fed, run=self.run_id,
                                        rnd=m.round, epoch=epoch, a=self.site_id, b=peer)
                 for peer, public in publics.items()}
        privacy = plan.privacy
        rng = secure_rng()
        if privacy.dp == "client":  # this site's share of the noise on the sum
            std = site_noise_std(privacy.dp_noise_multiplier, privacy.dp_clip, len(members))
            delta = delta + gaussian_noise(delta.size, std)
        bits = secagg.code_bits(plan.compression.quantize)
        fixed = secagg.to_fixed(delta, bound=privacy.value_bound, bits=bits,
                                weight=sec["weights"][self.site_id], rng=rng)
        if fixed.clipped:
            log.warning("round %d: %d of %d values beyond privacy.value_bound %g were clipped "
                        "before masking", m.round, fixed.clipped, delta.size,
                        privacy.value_bound)
        secret = self.secure.begin(self.run_id, m.round, epoch, members)
        crash_point("site.masked")  # the crash tests' site lost after masking, before sending
        keys, signs = secagg.mask_keys(self.site_id, members, seeds)
        body = secagg.mask(fixed.values, keys, signs, secret, wire, self.kernels)
        shares = secagg.seal_shares(secret, self.site_id, members, key, publics,
                                    federation=self.fed, run=self.run_id, rnd=m.round,
                                    epoch=epoch)
        return body, {"update": {"codec": "masked", "epoch": epoch, "wire": wire,
                                 "n": int(delta.size)}, "clipped_values": fixed.clipped,
                      "shares": shares, "commitment": secagg.commitment(secret)}

    def _peer_keys(self, records: Any, members: list[str]) -> dict[str, Any]:
        """The members' masking keys, each checked against the federation CA."""
        assert self.run_id is not None
        if not isinstance(records, dict):
            raise ProtocolError("bad_field", "keys")
        verifier = self.peer.trust.verifier if self.peer.trust is not None else None
        return {peer: secagg.check_key_record(records.get(peer), self.fed, self.run_id, peer,
                                              verifier)
                for peer in members if peer != self.site_id}

    def _on_unmask(self, m: Manifest, body: bytes) -> None:
        """The coordinator holds every masked update of an epoch: give this site's self-mask
        secret and open the shares of the other members' (for any of them lost since)."""
        assert self.run_id is not None
        meta = m.meta
        if meta.get("run") != self.run_id:
            raise ProtocolError("wrong_run")
        epoch, members, received = meta.get("epoch"), meta.get("members"), meta.get("received")
        if not isinstance(epoch, int) or not _names(members) or not _names(received):
            raise ProtocolError("bad_field", "unmask")
        secret = self.secure.reveal(self.run_id, m.round, epoch, members, received)
        try:
            doc = json.loads(body)
            sealed = {j: doc["shares"][j][self.site_id] for j in members if j != self.site_id}
        except (ValueError, KeyError, TypeError):
            raise ProtocolError("bad_field", "unmask shares") from None
        key = secagg.site_key(self.config.state_dir, self.run_id)
        publics = self._peer_keys(doc.get("keys"), members)
        opened = {}
        for j, box in sealed.items():
            if not isinstance(box, str):
                raise ProtocolError("bad_field", "unmask shares")
            opened[j] = secagg.open_share(box, j, self.site_id, key, publics[j],
                                          federation=self.fed, run=self.run_id, rnd=m.round,
                                          epoch=epoch)
        self._reply(m, BodyKind.REVEAL, b"", {"epoch": epoch, "shares": opened,
                                              "seed": base64.b64encode(secret).decode()})

    def train_round(self, plan: Plan, layout: Layout, params: np.ndarray, x: np.ndarray,
                    rnd: int) -> TrainResult:
        """Round `rnd`'s local training from `params` on this site's standardised rows `x`.

        Deterministic: the same inputs give the same update, so a round trained again after a
        crash sends what the first try would have (and tests can replay a site's rounds) -
        except with DP-SGD, whose noise is fresh each try (a try that never left costs
        nothing)."""
        data = self._ensure_data(plan)
        training = plan.training
        cap = self.profile.settings.max_batch_size
        if training.batch_size > cap:
            log.info("batch size %d capped at %d by hardware profile %s", training.batch_size,
                     cap, self.profile.name)
            training = replace(training, batch_size=cap)
        privacy = plan.privacy
        dp_sgd = None
        if privacy.dp == "sample":
            dp_sgd = DpSgd(privacy.dp_clip, privacy.dp_noise_multiplier, gaussian_noise)
        result = train_local(layout, params, x[data.train], data.y[data.train],
                             training, seed=plan.seed * 100_003 + rnd,
                             kernels=self.kernels, first_step_callback=self._first_step,
                             step_callback=self._training_step, **self._images(data.train),
                             proximal_mu=plan.strategy.mu if plan.strategy.name == "fedprox"
                             else 0.0, dp_sgd=dp_sgd)
        if dp_sgd is not None and dp_sgd.clipped:
            log.info("round %d: DP-SGD clipped %d example gradients to %g", rnd,
                     dp_sgd.clipped, privacy.dp_clip)
        return result

    def _residual_file(self) -> Path:
        run = hashlib.sha256(str(self.run_id).encode()).hexdigest()[:16]
        return self.config.state_dir / f"residual-{run}.f32"

    def _load_residual(self, n: int) -> np.ndarray:
        """This run's error-feedback residual (zeros when there is none or it does not fit)."""
        try:
            data = self._residual_file().read_bytes()
        except FileNotFoundError:
            return np.zeros(n, dtype=np.float32)
        residual = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if residual.size != n or not np.all(np.isfinite(residual)):
            log.warning("error-feedback residual does not fit this model; starting from zero")
            return np.zeros(n, dtype=np.float32)
        return residual

    def _save_residual(self, residual: np.ndarray) -> None:
        path = self._residual_file()
        write_atomic(path, lambda fh: fh.write(residual.astype("<f4").tobytes()), mode=0o600)
        for old in self.config.state_dir.glob("residual-*.f32"):
            if old != path:  # an earlier run's
                old.unlink(missing_ok=True)

    def _publish_metrics(self, rnd: int, report: dict[str, Any]) -> None:
        """Aggregate numbers only, flat, for IT monitoring and the data scientist's dashboards."""
        doc = {"schema": 1, "site": self.site_id, "federation": self.fed, "round": rnd,
               "n_samples": report["n_samples"], "train_loss": report["train_loss"],
               "train_seconds": report["train_seconds"], "bytes_up": report["bytes_up"],
               "update_raw_bytes": report["update_raw_bytes"],
               **{f"eval_{k}": v for k, v in report["eval"].items()},
               "bytes_sent": self.peer.bytes_sent, "ts": round(time.time(), 3)}
        payload = encode_status(doc)
        topic = topics.site_metrics(self.fed, self.site_id)
        if self.ledger is not None:
            self.ledger.append(federation=self.fed, run=str(self.run_id), round=rnd,
                               kind="metrics", destination=topic, body=payload)
        self.transport.publish(topic, payload)

    def _first_step(self) -> None:
        """Time to the first optimizer step, from the task's arrival (what the site itself
        costs a round), and once per process from its start (the cold-start figure, which
        also counts any wait for the coordinator)."""
        if not self._first_step_pending or self._task_arrived is None:
            return
        self._first_step_pending = False
        self.first_step_after_task_s = time.monotonic() - self._task_arrived
        if self.first_step_after_start_s is None:
            self.first_step_after_start_s = time.time() - self.process_start
            log.info("first training step %.2f s after the task arrived (%.2f s after process "
                     "start)", self.first_step_after_task_s, self.first_step_after_start_s)

    @property
    def _state_file(self) -> Path:
        return self.config.state_dir / "site-state.json"

    def _save_state(self) -> None:
        """Remember which tasks were answered, so a restarted site does not train them again."""
        write_json_atomic(self._state_file, {"federation": self.fed, "run": self.run_id,
                                             "answered": sorted(self.answered),
                                             "finished_runs": self.finished_runs})

    def _load_state(self) -> None:
        try:
            doc = json.loads(self._state_file.read_text())
            if doc.get("federation") == self.fed and isinstance(doc.get("run"), str):
                self.run_id = doc["run"]
                self.answered = {(int(r), str(n)) for r, n in doc.get("answered", [])}
            finished = doc.get("finished_runs", [])
            if isinstance(finished, list):
                self.finished_runs = [str(r) for r in finished][-16:]
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError) as exc:
            log.warning("%s unreadable (%s); starting without it", self._state_file, exc)

    # ------------------------------------------------------------------ main loop

    def _open_stream(self, topic: topics.Topic, m: Manifest) -> None:
        """Before any chunk is kept: a model of another run, or the one this site holds
        already (seen again after a restart), is refused, so nothing asks for its chunks."""
        if m.body_kind is not BodyKind.MODEL:
            return None  # received whole, as before
        run = m.meta.get("run")
        if run != self.run_id:
            raise NotWanted("model_of_another_run", f"model of run {run}, this site takes part "
                                                    f"in run {self.run_id}")
        if m.body_digest == self.model_sha256:
            raise NotWanted("model_already_held", f"model of run {run} is here already")
        return None

    def _on_model(self, m: Manifest, body: bytes) -> None:
        """Keep the federation's final model (body, then its signed manifest) and check it
        as the scorer and `fedsilo model verify` will."""
        run = m.meta.get("run")
        if run != self.run_id:  # the run changed while its chunks were arriving
            log.info("ignoring the model of run %s: this site takes part in run %s", run,
                     self.run_id)
            return
        header = self.peer.signed_header(m)
        if header is None:
            log.warning("model of run %s arrived without the manifest it was checked "
                        "against; not kept", run)
            return
        try:
            path = save_received_model(self.model_dir, header, body)
        except (OSError, DataError) as exc:
            error = describe(self.config.state_dir, exc) if isinstance(exc, OSError) else exc
            log.error("model of run %s not saved to %s: %s", run, self.model_dir, error)
            return
        self.model_sha256 = m.body_digest
        trust = self.peer.trust
        try:
            verified = verify_model(self.model_dir, trust.verifier if trust else None,
                                    allow_unsigned=trust is None, check_onnx=False)
        except DataError as exc:
            log.error("model of run %s saved to %s, but it does not verify: %s", run, path, exc)
            return
        log.info("model of run %s saved to %s (sha256 %s, %s)", run, path, verified.short,
                 "signed by the coordinator" if verified.signed else "UNSIGNED")
        self.publish_status()

    def _wait_for_model(self) -> None:
        """"Finished" named a model this site has not got yet (its chunks may still be on
        the way, or asked for again): keep polling for it a while, then finish without it."""
        want = self._awaited_model
        self._awaited_model = None
        if not isinstance(want, dict) or want.get("sha256") in (None, self.model_sha256):
            return
        deadline = time.monotonic() + MODEL_WAIT_S
        log.info("waiting up to %.0f s for the final model (%s)", MODEL_WAIT_S,
                 str(want.get("sha256"))[:12])
        while self.model_sha256 != want.get("sha256"):
            if time.monotonic() >= deadline:
                log.warning("the final model (sha256 %s) did not arrive within %.0f s; "
                            "finishing without it", str(want.get("sha256"))[:12], MODEL_WAIT_S)
                return
            if self.stop_event.is_set():
                return
            self.notifier.beat()
            for event in self.peer.poll(0.1):
                if isinstance(event, BodyReady) and event.manifest.body_kind is BodyKind.MODEL:
                    self._on_model(event.manifest, event.body)
            self.peer.request_missing(lambda _m: topics.site_req(self.fed, self.site_id))

    def _handle(self, event: BodyReady) -> bool:
        """Handle one complete body from the coordinator; True when the federation finished."""
        m = event.manifest
        if event.topic.kind == "control":
            return m.body_kind is BodyKind.FINISHED and self._on_finished(m)
        if m.body_kind is BodyKind.MODEL:  # before the check below: it may come after finished
            self._on_model(m, event.body)
            return False
        if m.meta.get("run") in self.finished_runs:
            log.info("ignoring a round %d task of run %s, which finished earlier", m.round,
                     m.meta.get("run"))
            return False
        try:
            if m.body_kind not in (BodyKind.STATS_TASK, BodyKind.TASK, BodyKind.EVALUATE,
                                   BodyKind.UNMASK):
                raise ProtocolError("wrong_body_kind", m.body_kind.value)
            self._on_task(m, event.body)
        except ProtocolError as exc:
            self.peer.rejected[exc.reason] += 1
            log.warning("rejected task for round %d: %s", m.round, exc)
        except DataError as exc:
            self._fail("data_error", str(exc))
        except FedsiloError as exc:
            self._fail("task_failed", str(exc))
        except OSError as exc:  # the state directory refused a write: full, or read-only
            error = describe(self.config.state_dir, exc)
            self._fail(error.code, f"round {m.round} not answered: {error}; trying again in "
                                   f"{STATE_RETRY_S:.0f} s")
            self._retry = (event, time.monotonic() + STATE_RETRY_S)
        except MemoryError as exc:  # host memory, or the GPU pool's memory_cap_mib
            self._fail("out_of_memory", f"round {m.round} needs more memory than this host "
                                        f"allows ({exc}); see memory_cap_mib in docs/hardware.md")
        except Exception:  # noqa: BLE001 - the daemon outlives one bad task; traceback logged
            log.exception("internal error while handling round %d", m.round)
            self._fail("internal_error", "see the log above")
        return False

    def _on_finished(self, m: Manifest) -> bool:
        """True when the run this site takes part in finished. A retained "finished" of any
        other run (an earlier run of the same federation id, one this site never joined, or
        one it already saw finish) is history: the site keeps waiting for the next run."""
        run = m.meta.get("run")
        if not isinstance(run, str) or run in self.finished_runs or run != self.run_id:
            log.info("federation %s: run %s finished earlier; waiting for a new run", self.fed,
                     run if isinstance(run, str) else "?")
            return False
        log.info("federation %s finished (run %s)", self.fed, run)
        model = m.meta.get("model")
        self._awaited_model = model if isinstance(model, dict) else None
        self.finished_runs = [*self.finished_runs, run][-16:]
        self._save_state()
        return True

    def _fail(self, code: str, message: str) -> None:
        self.last_error = code
        self.state = State.ERROR
        log.error("%s", message)
        self.publish_status()

    def _training_step(self) -> None:
        """After every optimizer step: alive for the watchdog; a stop request ends training;
        the training policy may make the next batch wait."""
        self.notifier.beat()
        crash_point("site.training_step")
        if self.stop_event.is_set():
            raise _Stopping
        self._yield_to_clinical_work()

    def _yield_to_clinical_work(self) -> None:
        """Wait while `[policy]` says so (outside training hours, host busy with other work),
        saying why in the status; the watchdog stays fed and a stop request ends the wait."""
        last_status = time.monotonic()
        while (reason := self.throttle.reason()) is not None:
            changed = reason != self.throttle_reason
            if changed:
                log.info("training paused: %s", reason)
                self.throttle_reason = reason
            if changed or time.monotonic() - last_status >= STATUS_EVERY_S:
                self.publish_status()  # also while the pause lasts: monitoring sees us alive
                last_status = time.monotonic()
            self.notifier.beat()
            if self.stop_event.wait(THROTTLE_POLL_S):
                raise _Stopping
        if self.throttle_reason is not None:
            log.info("training resumed")
            self.throttle_reason = None
            self.publish_status()

    def run(self, *, exit_when_finished: bool = True) -> int:
        """Serve the federation until it finishes (or until stopped, with `exit_when_finished`
        False): 0 either way. One agent per state directory (agent.lock, held meanwhile)."""
        self.notifier.extend_timeout(START_TIMEOUT_S)  # imports, state, a cold Numba cache
        self.notifier.status("starting")
        ensure_writable(self.config.state_dir)
        lock = hold_agent_lock(self.config.state_dir, self.config.source)
        try:
            return self._run(exit_when_finished)
        finally:
            lock.close()

    def _run(self, exit_when_finished: bool) -> int:
        self._load_state()
        kept = self.outbox.get(MAX_TASK_BYTES)
        if kept is not None and kept.run == self.run_id:  # resend requests may name it
            self.peer.keep_sent(*self._reply_topics(kept.manifest.round), kept.manifest,
                                kept.body)
        if self.config.dicom.listen or self.config.dicom.watch_dir is not None:
            self._ingest_service()
        if not self.transport.connect(retry=True, stop=self.stop_event,
                                      on_wait=self.notifier.waiting):
            if self.ingest is not None:
                self.ingest.stop()
            return 0  # stopped while waiting for the broker
        if self.config.home_assistant_discovery:
            for topic, payload in home_assistant_discovery(
                    self.fed, self.site_id, topics.site_status(self.fed, self.site_id)):
                self.transport.publish(topic, payload, retain=True)
        self.state = State.IDLE
        self.publish_status()
        self.notifier.ready(f"idle, connected to {self.config.broker.host}:"
                            f"{self.config.broker.port}")
        self.notifier.start_watchdog()
        last_status = time.monotonic()
        try:
            while not self.stop_event.is_set():
                self.notifier.beat()
                events: list[Any] = self.peer.poll(0.1)
                if self._retry is not None and time.monotonic() >= self._retry[1]:
                    events.insert(0, self._retry[0])  # a task the state directory refused
                    self._retry = None
                finished = False
                for event in events:  # all of them: the model may be queued behind "finished"
                    if isinstance(event, BodyReady) and self._handle(event):
                        finished = True
                if finished:
                    self._wait_for_model()
                    self.state = State.FINISHED
                    self.publish_status()
                    if exit_when_finished:
                        return 0
                self.peer.request_missing(lambda _m: topics.site_req(self.fed, self.site_id))
                if time.monotonic() - last_status >= STATUS_EVERY_S:
                    self.publish_status()
                    last_status = time.monotonic()
            return 0
        except _Stopping:
            log.info("stop requested during training: the round's work is dropped")
            return 0
        finally:
            self.notifier.stopping()
            anon, file_backed = resident_split_mib()
            log.info("stopping; peak RSS %.1f MiB (now %.1f MiB private, %.1f MiB file-backed "
                     "shared code)", peak_rss_mib(), anon, file_backed)
            self.state = State.OFFLINE
            final = status_document(role="site", identity=self.site_id, federation=self.fed,
                                    state=State.OFFLINE, round=self.round,
                                    last_error=self.last_error,
                                    extra={"offline_reason": "stopped", **self._status_extra()})
            if self.ingest is not None:  # after the final status: it reads the ingest counters
                self.ingest.stop()
            self.transport.close(final=(topics.site_status(self.fed, self.site_id),
                                        encode_status(final)))
