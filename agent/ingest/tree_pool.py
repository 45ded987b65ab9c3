"""Worker processes for the one-shot tree walk, so reading a folder uses every core.

`ingest_tree` is CPU-bound in pydicom (parsing, value conversion) and the in-plane kernel, one
file at a time. Here each worker reads, checks, pseudonymises, decodes and in-plane
preprocesses one *uncompressed* file and answers with de-identified header fields (JSON) and
the small array; the agent keeps every store write, so durability and duplicate handling stay
in one place. Anything else — a rejected file, compressed pixel data (decoded in `DecodePool`'s
crash-isolated workers), a worker error — is answered "fallback" and the agent ingests that
file itself, with the exact outcome `ingest_file` gives. A worker that dies or hangs costs the
file it held (`decode_crashed` / `decode_timeout`) and is replaced.

Workers come from a "forkserver" that has imported numpy, pydicom and the kernels once, so a
pool starts in milliseconds after the first. The wire is byte messages, never pickle: the file
path, a JSON header, the raw array bytes. The pseudonymisation key is read by the worker from
the state directory; raw identifiers never leave it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import ImagingSpec
from agent.ingest.decode_worker import ALLOWED_DTYPES, WorkerProcess, as_frames, decode_native
from agent.ingest.deid import Pseudonyms, load_or_create_secret, pseudonymise, quiet_pydicom
from agent.ingest.dicom_read import (
    FrameGeometry,
    ImageHeader,
    classify,
    parse_header,
    read_dataset,
)
from agent.ingest.preprocess import preprocess_planes
from agent.ingest.quarantine import DECODE_CRASHED, DECODE_TIMEOUT

log = logging.getLogger(__name__)

DEPTH = 2  # requests in flight per worker, so none waits while the agent stores
_PRELOAD = ["numpy", "pydicom", "agent.ingest.tree_pool", "agent.ingest._reader_preload"]


@dataclass(frozen=True)
class Parsed:
    """A file a worker handled: what `IngestPipeline` stores (no raw value of the file)."""

    ids: Pseudonyms
    header: ImageHeader
    pixels: np.ndarray
    grid: str | None


# One per file, in submission order: Parsed, FALLBACK, or a decode_* reason (worker died).
FALLBACK = "fallback"
Result = Parsed | str


# ---------------------------------------------------------------------------- worker side


def _work(path: Path, secret: bytes, imaging: ImagingSpec | None,
          kernels: Any) -> tuple[dict[str, Any], np.ndarray] | None:
    with quiet_pydicom():
        ds = read_dataset(path)
        modality = classify(ds)
        ids = pseudonymise(ds, secret)
        header = parse_header(ds, modality)
        if header.compressed:
            return None
        pixels = as_frames(decode_native(ds, header), header)
        del ds
    planes, grid = preprocess_planes(pixels, [(g.slope, g.intercept) for g in header.geometry],
                                     modality, imaging, kernels)
    planes = np.ascontiguousarray(planes)
    head = {"ids": asdict(ids), "header": asdict(header), "grid": grid,
            "dtype": planes.dtype.str, "shape": planes.shape}
    return head, planes


def _serve(conn: Connection, state_dir: str, imaging_json: str, backend: str) -> None:
    """Worker main loop: one path in, one answer out, until the agent closes the pipe."""
    import warnings

    warnings.simplefilter("ignore")  # this process's warnings could quote file values
    logging.disable(logging.CRITICAL)
    secret = load_or_create_secret(Path(state_dir))
    imaging = ImagingSpec(**json.loads(imaging_json)) if imaging_json else None
    kernels: Any = None
    if imaging is not None:
        try:
            import kernels as registry

            kernels = registry.get_backend(backend)
        except Exception:  # noqa: BLE001 - the agent stores raw values; completion reports
            kernels = None
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            done = _work(Path(os.fsdecode(request)), secret, imaging, kernels)
        except Exception:  # noqa: BLE001 - the agent redoes the file and classifies it
            done = None
        if done is None:
            conn.send_bytes(b'{"fallback": true}')
            continue
        head, arr = done
        conn.send_bytes(json.dumps(head).encode())
        conn.send_bytes(memoryview(arr.reshape(-1).view(np.uint8)))


# ---------------------------------------------------------------------------- agent side


def _parsed(head: dict[str, Any], data: bytes) -> Parsed:
    """Rebuild typed values from a worker's JSON (floats round-trip exactly)."""
    h = dict(head["header"])
    h["geometry"] = tuple(FrameGeometry(position=tuple(g["position"]),
                                        orientation=tuple(g["orientation"]),
                                        pixel_spacing=tuple(g["pixel_spacing"]),
                                        slope=float(g["slope"]), intercept=float(g["intercept"]))
                          for g in h["geometry"])
    header = ImageHeader(**h)
    dtype, shape = str(head["dtype"]), tuple(int(n) for n in head["shape"])
    if dtype not in ALLOWED_DTYPES or len(shape) != 3 or shape[0] != header.frames:
        raise ValueError("bad worker answer")
    pixels = np.frombuffer(data, dtype=dtype).reshape(shape)
    grid = head["grid"]
    return Parsed(Pseudonyms(**head["ids"]), header, pixels,
                  None if grid is None else str(grid))


class _Worker(WorkerProcess):
    """A reader process plus the files sent to it and not yet answered, in order."""

    def __init__(self, ctx: Any, args: tuple[str, str, str]) -> None:
        super().__init__(ctx, _serve, args, "fedsilo-tree")
        self.pending: deque[Path] = deque()


class TreePool:
    """`workers` reader processes for one tree walk; use as a context manager."""

    def __init__(self, workers: int, state_dir: Path, imaging: ImagingSpec | None,
                 backend: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._ctx = multiprocessing.get_context("forkserver")
        try:
            self._ctx.set_forkserver_preload(_PRELOAD)
        except Exception:  # noqa: BLE001 - only an optimisation
            pass
        self._args = (str(state_dir), "" if imaging is None else json.dumps(asdict(imaging)),
                      backend)
        self._workers = [_Worker(self._ctx, self._args) for _ in range(max(1, workers))]

    def __enter__(self) -> TreePool:
        return self

    def __exit__(self, *exc: object) -> None:
        for w in self._workers:
            w.stop(kill=any(exc))

    def map(self, paths: list[Path]) -> Iterator[tuple[Path, Result]]:
        """(path, result) for every path, in order; up to DEPTH requests per worker ahead."""
        todo = deque(paths)
        n = len(self._workers)
        sent = done = 0  # file k goes to worker k % n, which answers in order
        while done < len(paths):
            while todo and len(self._workers[sent % n].pending) < DEPTH:
                self._send(sent % n, todo.popleft())
                sent += 1
            yield self._receive(done % n)
            done += 1

    def _send(self, i: int, path: Path) -> None:
        w = self._workers[i]
        w.pending.append(path)
        try:
            w.conn.send_bytes(os.fsencode(str(path)))
        except OSError:
            pass  # the worker is gone: _receive sees it and replaces it

    def _receive(self, i: int) -> tuple[Path, Result]:
        w = self._workers[i]
        path = w.pending[0]
        try:
            if not w.conn.poll(self.timeout_s):
                return path, self._replace(i, DECODE_TIMEOUT)
            head = json.loads(w.conn.recv_bytes(maxlength=1 << 20))
            if head.get("fallback"):
                w.pending.popleft()
                return path, FALLBACK
            if not w.conn.poll(self.timeout_s):
                return path, self._replace(i, DECODE_TIMEOUT)
            data = w.conn.recv_bytes()
        except (EOFError, OSError):
            return path, self._replace(i, DECODE_CRASHED)
        except (ValueError, KeyError, TypeError, AttributeError):
            return path, self._replace(i, FALLBACK)
        w.pending.popleft()
        try:
            return path, _parsed(head, data)
        except (ValueError, KeyError, TypeError):
            return path, FALLBACK

    def _replace(self, i: int, reason: str) -> str:
        """Kill worker i; the file it held gets `reason`; the files queued behind it go to a
        fresh worker (they were never started)."""
        old = self._workers[i]
        old.stop(kill=True)
        log.warning("tree reader process %s; starting a new one",
                    "timed out" if reason == DECODE_TIMEOUT else "failed")
        queued = list(old.pending)[1:]
        old.pending.clear()
        self._workers[i] = _Worker(self._ctx, self._args)
        for path in queued:
            self._send(i, path)
        return reason
