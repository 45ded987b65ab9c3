"""Scoring at the site: every series completed after the model arrived, with its patient's
clinical row, by the federation's exported model; the result kept locally and, opt-in, sent to
the PACS as a DICOM SR.

Why it polls the store instead of hooking series completion: a series completes on the ingest
thread or inside a training round, and a crash can come between completion and scoring; asking
the store for "complete since the watermark, not yet in the book" finds every one of them,
after a restart too. The watermark is the moment this model was first loaded: the federation's
training studies (and anything older) are not re-scored and flood nobody's worklist.

Results (`<state_dir>/results/scores.sqlite`) are keyed by pseudonyms and the model file's
SHA-256, like the image store: nothing identifying. What the SR needs to be filed beside its
study is in the ReferenceBook (agent/results/reference.py) until the SR is sent.

Automatic scoring is for imaging models, where an arriving series is both the trigger and an
input; a table-only model scores tables with `fedsilo predict --table`.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import ImagingSpec
from agent.config.site import DataSources, ResultsConfig
from agent.errors import DataError
from agent.ingest.deid import Pseudonyms, pseudonym
from agent.ops.sqlitetx import immediate_tx

log = logging.getLogger(__name__)

SCORED, NO_ROW, UNSCORABLE, BAD_IMAGE = "scored", "no_clinical_row", "unscorable", "bad_image"
SR_PENDING, SR_SENT, SR_FAILED, SR_NO_REFERENCE = "pending", "sent", "failed", "no_reference"
PAGE = 200  # series asked of the store at a time

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scores (
    series TEXT NOT NULL, model_sha256 TEXT NOT NULL, study TEXT NOT NULL,
    patient TEXT NOT NULL, model_version TEXT NOT NULL, completed REAL NOT NULL,
    status TEXT NOT NULL, probability REAL, scored_at REAL NOT NULL,
    sr_status TEXT, sr_uid TEXT, sr_attempt REAL, detail TEXT,
    PRIMARY KEY (series, model_sha256));
CREATE INDEX IF NOT EXISTS scores_sr ON scores(sr_status);
"""


@dataclass(frozen=True)
class Score:
    series: str
    study: str
    patient: str
    model_sha256: str
    model_version: str
    status: str
    probability: float | None
    sr_status: str | None
    sr_uid: str | None
    detail: str | None


class ScoreBook:
    """Every scoring outcome with the model it came from; thread-safe, one connection."""

    def __init__(self, state_dir: Path) -> None:
        root = Path(state_dir) / "results"
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = root / "scores.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_tx(self._db, self._lock)

    def since(self, model_sha256: str, now: float) -> float:
        """The watermark of this model: when it was first loaded (set now if never)."""
        key = f"since:{model_sha256}"
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, repr(now)))
            (value,), = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchall()
        return float(value)

    def known(self, model_sha256: str, series: list[str]) -> set[str]:
        if not series:
            return set()
        marks = ",".join("?" * len(series))
        with self._lock:
            rows = self._db.execute(f"SELECT series FROM scores WHERE model_sha256 = ? AND "
                                    f"series IN ({marks})", (model_sha256, *series)).fetchall()
        return {r[0] for r in rows}

    def record(self, *, series: str, study: str, patient: str, model_sha256: str,
               model_version: str, completed: float, status: str, probability: float | None,
               sr_status: str | None, detail: str | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (series, model_sha256, study, patient, model_version, completed, status,
                        probability, time.time(), sr_status, None, None, detail))

    def set_sr(self, series: str, model_sha256: str, sr_status: str, *,
               sr_uid: str | None = None, detail: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE scores SET sr_status = ?, sr_uid = coalesce(?, sr_uid), "
                       "sr_attempt = ?, detail = ? WHERE series = ? AND model_sha256 = ?",
                       (sr_status, sr_uid, time.time(), detail, series, model_sha256))

    def waiting(self, model_sha256: str) -> list[tuple[str, str, str, float]]:
        """(series, study, patient, completed) still without a clinical row for this model."""
        with self._lock:
            return self._db.execute(
                "SELECT series, study, patient, completed FROM scores WHERE model_sha256 = ? "
                "AND status = ? ORDER BY completed", (model_sha256, NO_ROW)).fetchall()

    def sr_due(self, model_sha256: str, before: float) -> list[Score]:
        """Results whose SR is pending, or failed before `before` (time to try again)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT series FROM scores WHERE model_sha256 = ? AND (sr_status = ? OR "
                "(sr_status = ? AND sr_attempt < ?)) ORDER BY completed",
                (model_sha256, SR_PENDING, SR_FAILED, before)).fetchall()
        return [s for s in (self.get(r[0], model_sha256) for r in rows) if s is not None]

    def get(self, series: str, model_sha256: str) -> Score | None:
        with self._lock:
            row = self._db.execute(
                "SELECT series, study, patient, model_sha256, model_version, status, "
                "probability, sr_status, sr_uid, detail FROM scores WHERE series = ? AND "
                "model_sha256 = ?", (series, model_sha256)).fetchone()
        return Score(*row) if row else None

    def all(self) -> list[Score]:
        with self._lock:
            rows = self._db.execute(
                "SELECT series, study, patient, model_sha256, model_version, status, "
                "probability, sr_status, sr_uid, detail FROM scores ORDER BY completed"
            ).fetchall()
        return [Score(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, count(*) FROM scores GROUP BY status "
                                    "UNION ALL SELECT 'sr_' || sr_status, count(*) FROM scores "
                                    "WHERE sr_status IS NOT NULL GROUP BY sr_status").fetchall()
        return {k: int(n) for k, n in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SiteScorer:
    """Runs on the ingest thread (`poll` every few seconds); never raises into it."""

    def __init__(self, state_dir: Path, results: ResultsConfig, data: DataSources, *,
                 store: Any, secret: bytes, verifier: Any | None,
                 set_imaging: Callable[[ImagingSpec], None]) -> None:
        self.state_dir = Path(state_dir)
        self.results = results
        self.data = data
        self.store = store
        self.secret = secret
        self.verifier = verifier  # agent.security.signing.Verifier; None: a site without PKI
        self.set_imaging = set_imaging
        self.model_dir = results.model_dir or self.state_dir / "model"
        self.book = ScoreBook(self.state_dir)
        self.references = None
        self.pacs = None
        if results.pacs is not None:
            from agent.results.reference import ReferenceBook

            self.references = ReferenceBook(self.state_dir)
            self.pacs = results.pacs
        self.model: Any = None  # agent.learn.onnx_runtime.ExportedModel
        self._model_stat: tuple[int, int] | None = None
        self._cursor: tuple[float, str] = (0.0, "")  # (completed, series) last looked at
        self._rows: dict[str, dict[str, Any]] = {}
        self._table_stat: tuple[int, int] | None = None
        self._refused: set[str] = set()

    # ------------------------------------------------------------------ ingest side

    def capture(self, path: Path, ids: Pseudonyms) -> None:
        """Called for each stored instance while its file still exists: keep what the SR
        needs (only with [results.pacs]); a file without it costs its SR, not the image."""
        if self.references is None:
            return
        from agent.results.reference import read_reference

        try:
            self.references.add(ids.series, read_reference(path))
        except (DataError, OSError, sqlite3.Error) as exc:
            log.warning("series %s: no SR reference kept (%s)", ids.series[:8],
                        type(exc).__name__ if not isinstance(exc, DataError) else
                        str(exc).rsplit(":", 1)[-1].strip())

    # ------------------------------------------------------------------ the loop

    def poll(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        try:
            if not self._refresh_model(now):
                return
            table_changed = self._refresh_table()
            if table_changed:
                self._retry_waiting()
            self._score_new()
            if self.pacs is not None:
                self._send_due(now)
        except Exception:  # noqa: BLE001 - scoring must never stop the ingest thread
            log.exception("scoring failed; trying again at the next poll")

    def _refresh_model(self, now: float) -> bool:
        """Load (verified) the model when its file appears or changes; False: none usable."""
        from agent.learn.distribution import check_card, verify_model
        from agent.learn.onnx_runtime import load_exported

        path = self.model_dir / "model.onnx"
        try:
            st = path.stat()
        except FileNotFoundError:
            return self.model is not None  # removed: keep the loaded one until a new one
        stat = (st.st_mtime_ns, st.st_size)
        if stat == self._model_stat:
            return self.model is not None
        self._model_stat = stat
        try:
            verified = verify_model(self.model_dir, self.verifier,
                                    allow_unsigned=self.verifier is None, check_onnx=False)
            model = load_exported(path)  # onnxruntime checks the graph; no onnx import
            if model.sha256 != verified.sha256:
                raise DataError(f"{path}: changed while it was being verified")
            check_card(path, model.card, verified.manifest)
        except DataError as exc:
            log.error("model not used for scoring: %s", exc)
            return self.model is not None
        if model.imaging is None:
            log.warning("the model in %s reads no image: series are not scored on arrival "
                        "(score tables with fedsilo predict --table)", self.model_dir)
            self.model = None
            return False
        self.model = model
        since = self.book.since(model.sha256, now)
        self._cursor = (since, "")
        self._table_stat = None  # the new model may read other features
        self.set_imaging(model.imaging)
        log.info("scoring series completed from %s on with model %s (%s, federation %s)",
                 datetime.fromtimestamp(since, timezone.utc).isoformat(timespec="seconds"),
                 model.version, model.card["model_kind"], model.card["federation"])
        return True

    def _refresh_table(self) -> bool:
        """Re-read the clinical table when it changed (new patients); True when re-read."""
        from agent.ingest.tables import load_table
        from agent.learn.onnx_runtime import rows_from_encoded

        table = self.data.table
        if table is None or self.data.id_column is None:
            return False
        try:
            st = table.stat()
        except OSError as exc:
            log.warning("clinical table %s unreadable (%s); waiting", table, exc.strerror)
            return False
        stat = (st.st_mtime_ns, st.st_size)
        if stat == self._table_stat:
            return False
        self._table_stat = stat
        t = load_table(table, self.model.features, None, self.model.card["missing"],
                       self.data.id_column)
        rows = rows_from_encoded(self.model.features, t.x)
        assert t.ids is not None
        self._rows = {pseudonym(self.secret, i): r for i, r in zip(t.ids, rows, strict=True)}
        return True

    def _score_new(self) -> None:
        """Page through the series completed since the cursor (first the model's watermark,
        then the last series seen): each is scored once per model, after a restart too."""
        model = self.model
        while True:
            found = self.store.completed_since(self._cursor[0], model.imaging,
                                               after=self._cursor[1], limit=PAGE)
            known = self.book.known(model.sha256, [f[0] for f in found])
            for series, study, patient, array, completed in found:
                if series not in known:
                    self._score(series, study, patient, array, completed)
                self._cursor = (completed, series)
            if len(found) < PAGE:
                return

    def _retry_waiting(self) -> None:
        for series, study, patient, completed in self.book.waiting(self.model.sha256):
            if patient in self._rows:
                self._score(series, study, patient, self.store.series_array(series),
                            completed)

    def _score(self, series: str, study: str, patient: str, array: Path,
               completed: float) -> None:
        from agent.learn.onnx_runtime import score

        model = self.model
        row = self._rows.get(patient)
        status, p, detail = SCORED, None, None
        if row is None:
            status, detail = NO_ROW, "no usable clinical row for this patient yet"
        else:
            try:
                image = np.load(array, allow_pickle=False)
                (value,) = score(model, [row], image[None]).tolist()
            except (OSError, ValueError) as exc:
                status, detail = BAD_IMAGE, f"{type(exc).__name__}: {exc}"[:200]
            else:
                if value != value:
                    status, detail = UNSCORABLE, "the row has a value the model cannot read"
                else:
                    p = float(value)
        sr = None
        if status == SCORED and self.pacs is not None:
            sr = SR_PENDING
        self.book.record(series=series, study=study, patient=patient,
                         model_sha256=model.sha256, model_version=model.version,
                         completed=completed, status=status, probability=p, sr_status=sr,
                         detail=detail)
        if status in (UNSCORABLE, BAD_IMAGE) and self.references is not None:
            self.references.drop(series)  # no SR will ever need these identifiers
        if status == SCORED:
            log.info("series %s scored: P(%s) = %.4f (model %s)", series[:8], model.target,
                     p, model.version)
        else:
            log.info("series %s not scored: %s", series[:8], detail)

    def _send_due(self, now: float) -> None:
        from agent.results.pacs import PacsError, send_sr
        from agent.results.sr import ModelResult, build_sr

        assert self.references is not None and self.pacs is not None
        model = self.model
        for s in self.book.sr_due(model.sha256, now - self.results.retry_s):
            ref = self.references.get(s.series)
            if ref is None:
                self.book.set_sr(s.series, model.sha256, SR_NO_REFERENCE,
                                 detail="the series' identifiers were not kept (it arrived "
                                        "before [results.pacs] was set, or from a folder)")
                continue
            card = model.card
            result = ModelResult(
                probability=float(s.probability), target=model.target,
                model_kind=card["model_kind"], model_version=model.version,
                federation=card["federation"],
                round=int(card.get("rounds_completed", card["rounds"])),
                created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            ds = build_sr(ref, result, now=datetime.now().astimezone(),
                          sop_instance_uid=s.sr_uid)
            try:
                send_sr(ds, self.pacs)
            except PacsError as exc:
                self.book.set_sr(s.series, model.sha256, SR_FAILED, sr_uid=ds.SOPInstanceUID,
                                 detail=str(exc)[:300])
                log.warning("series %s: result SR not stored: %s; trying again in %.0f s",
                            s.series[:8], exc, self.results.retry_s)
                # The PACS is down or refusing: the others would each wait out the same
                # timeout on the ingest thread. They stay due for the next poll.
                return
            self.book.set_sr(s.series, model.sha256, SR_SENT, sr_uid=ds.SOPInstanceUID)
            self.references.drop(s.series)
            log.info("series %s: result SR sent to %s", s.series[:8], self.pacs)

    # ------------------------------------------------------------------ status

    def status_extra(self) -> dict[str, Any]:
        counts = self.book.counts()
        out: dict[str, Any] = {"scored_series": counts.get(SCORED, 0)}
        if self.model is not None:
            out["scoring_model"] = self.model.version
        if self.pacs is not None:
            out["results_sent"] = counts.get(f"sr_{SR_SENT}", 0)
            out["results_failed"] = counts.get(f"sr_{SR_FAILED}", 0)
        return out

    def close(self) -> None:
        self.book.close()
        if self.references is not None:
            self.references.close()
