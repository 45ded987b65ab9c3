"""Compressed pixel data is decoded in worker processes, so a codec crash costs one file.

The JPEG / JPEG-LS / JPEG 2000 codecs are C libraries fed with bytes a PACS (or anyone who can
reach the listener) sent us. A segfault in one of them must not take the agent down: each
worker is a separate "spawn" process that receives a file path and answers with the decoded
array, or a reason code. A worker that dies becomes `decode_crashed` for the file it held and
is replaced; one that takes longer than the per-file limit is killed (`decode_timeout`).

The wire between agent and worker is two byte messages, never pickle: a small JSON header
(`{"dtype", "shape"}` or `{"reason"}`) and the raw array bytes.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from agent.ingest.deid import kept, quiet_pydicom
from agent.ingest.dicom_read import (
    ImageHeader,
    check_pixel_format,
    read_dataset,
    transfer_syntax,
)
from agent.ingest.quarantine import (
    DECODE_CRASHED,
    DECODE_FAILED,
    DECODE_TIMEOUT,
    TOO_LARGE,
    Rejected,
)

log = logging.getLogger(__name__)

ALLOWED_DTYPES = frozenset({"|u1", "|i1", "<u2", "<i2", ">u2", ">i2", "<u4", "<i4", ">u4",
                            ">i4", "<f4", ">f4", "<f8", ">f8", "|b1"})
DEFAULT_TIMEOUT_S = 60.0


_LITTLE_NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                            "1.2.840.10008.1.2.1.99"})


def decode_native(ds: pydicom.Dataset, header: ImageHeader | None = None) -> np.ndarray:
    """Stored values of native (uncompressed) pixel data; the header was checked first.

    Little-endian data is viewed straight from the PixelData bytes (pydicom's pixel_array
    costs about as much as parsing the file); the result equals pixel_array: same dtype, and
    the bits above BitsStored masked or sign-extended the same way. Anything else goes
    through pixel_array."""
    if header is not None and header.transfer_syntax in _LITTLE_NATIVE:
        fast = _view_native(ds, header)
        if fast is not None:
            return fast
    try:
        return ds.pixel_array
    except MemoryError:
        raise Rejected(TOO_LARGE) from None
    except Exception:  # noqa: BLE001 - any pydicom/numpy failure on this file
        raise Rejected(DECODE_FAILED) from None


def _view_native(ds: pydicom.Dataset, header: ImageHeader) -> np.ndarray | None:
    data = kept(ds, "PixelData")
    bits = header.bits_allocated
    try:
        signed = int(kept(ds, "PixelRepresentation") or 0) == 1
        stored = int(kept(ds, "BitsStored") or bits)
    except (TypeError, ValueError):
        return None
    if not isinstance(data, (bytes, memoryview)) or bits not in (8, 16, 32):
        return None
    count = header.frames * header.rows * header.columns
    if len(data) < count * bits // 8:
        return None
    arr = np.frombuffer(data, dtype=f"<{'i' if signed else 'u'}{bits // 8}", count=count)
    if stored < bits and not _within_stored_bits(arr, stored, signed):
        # As pydicom's correct_unused_bits; most files need nothing (one read to check).
        arr = arr.copy()
        np.left_shift(arr, bits - stored, out=arr)
        np.right_shift(arr, bits - stored, out=arr)
    return arr


def _within_stored_bits(arr: np.ndarray, stored: int, signed: bool) -> bool:
    """Whether masking/sign-extending above bit `stored` would leave every value as it is."""
    if arr.size == 0 or stored < 1:
        return True
    if signed:
        return -(1 << (stored - 1)) <= int(arr.min()) and int(arr.max()) < 1 << (stored - 1)
    return int(arr.max()) < 1 << stored


def as_frames(pixels: np.ndarray, header: ImageHeader) -> np.ndarray:
    """[frames, rows, columns] in a dtype the imaging kernels take (int16, uint16, int32,
    float32), C-contiguous."""
    shape = (header.frames, header.rows, header.columns)
    if pixels.size != math.prod(shape):
        raise Rejected(DECODE_FAILED)
    a = pixels.reshape(shape)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype in (np.uint8, np.int8, np.bool_):
        a = a.astype(np.int16)
    elif a.dtype == np.uint32:
        a = a.astype(np.int32) if a.size == 0 or int(a.max()) < 2**31 else a.astype(np.float32)
    elif a.dtype not in (np.int16, np.uint16, np.int32, np.float32):
        a = a.astype(np.float32)
    if a.dtype == np.float32 and not np.all(np.isfinite(a)):
        raise Rejected(DECODE_FAILED)
    return np.ascontiguousarray(a)


def decode_file(path: str) -> np.ndarray:
    """Runs in the worker: read the file again, re-check the declared size, decode."""
    with quiet_pydicom():
        ds = read_dataset(Path(path))
        check_pixel_format(ds)
        transfer_syntax(ds)
        return ds.pixel_array


def _serve(conn: Connection, decode: Callable[[str], np.ndarray]) -> None:
    """Worker main loop: one path in, one answer out, until the agent closes the pipe."""
    import warnings

    warnings.simplefilter("ignore")  # this process's warnings could quote file values
    logging.disable(logging.CRITICAL)
    conn.send_bytes(READY)  # imports done: from now on every wait is a file's decode time
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            arr = np.ascontiguousarray(decode(os.fsdecode(request)))
            conn.send_bytes(json.dumps({"dtype": arr.dtype.str, "shape": arr.shape}).encode())
            conn.send_bytes(memoryview(arr.reshape(-1).view(np.uint8)))
            continue
        except Rejected as exc:
            reason = exc.reason
        except MemoryError:
            reason = TOO_LARGE
        except Exception:  # noqa: BLE001 - any codec error is this file's problem
            reason = DECODE_FAILED
        conn.send_bytes(json.dumps({"reason": reason}).encode())


READY = b"ready"
STARTUP_TIMEOUT_S = 120.0


def _until_hangup(target: Callable[..., None], conn: Connection, *args: Any) -> None:
    """Run a worker's loop; the agent closing its end of the pipe (it finished, or exited
    while this worker was still starting) is a normal end, not a traceback on stderr."""
    try:
        target(conn, *args)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass


class WorkerProcess:
    """A child process that serves requests over its end of a pipe (`target(conn, *args)`);
    `stop` closes the pipe, joins, and kills what does not end."""

    def __init__(self, ctx: Any, target: Callable[..., None], args: tuple[Any, ...],
                 name: str) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_until_hangup, args=(target, child, *args),
                                   daemon=True, name=name)
        self.process.start()
        child.close()

    def stop(self, kill: bool = False) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if kill and self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)


class DecodePool:
    """Up to `workers` decoder processes, started on first use and replaced when they die.

    Thread-safe: concurrent callers each hold one worker for the duration of one file."""

    def __init__(self, workers: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S,
                 decode: Callable[[str], np.ndarray] = decode_file) -> None:
        if workers < 1:
            raise ValueError("decode workers must be >= 1")
        self.workers = workers
        self.timeout_s = timeout_s
        self._decode = decode
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: list[WorkerProcess] = []
        self._started = 0
        self._cond = threading.Condition()
        self._closed = False
        self.restarts = 0

    def _checkout(self) -> WorkerProcess:
        with self._cond:
            while not self._idle and self._started >= self.workers:
                self._cond.wait()
            if self._closed:
                raise RuntimeError("decode pool is closed")
            if self._idle:
                return self._idle.pop()
            self._started += 1
        try:
            worker = WorkerProcess(self._ctx, _serve, (self._decode,), "fedsilo-decode")
        except BaseException:
            self._release(None)
            raise
        # A spawned worker first imports pydicom and numpy, which can take seconds on a busy
        # host; that start-up must not count against the first file's decode timeout.
        try:
            ready = worker.conn.poll(STARTUP_TIMEOUT_S) and worker.conn.recv_bytes() == READY
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._discard(worker, kill=True)
            raise Rejected(DECODE_CRASHED)
        return worker

    def _release(self, worker: WorkerProcess | None) -> None:
        with self._cond:
            closed = self._closed
            if worker is not None and not closed:
                self._idle.append(worker)
            else:
                self._started -= 1
            self._cond.notify()
        if worker is not None and closed:
            worker.stop()

    def _discard(self, worker: WorkerProcess, *, kill: bool) -> None:
        worker.stop(kill=kill)
        self.restarts += 1
        self._release(None)

    def decode(self, path: Path) -> np.ndarray:
        """The decoded pixel array of `path`, or `Rejected` with a decode_* reason."""
        for attempt in (0, 1):
            worker = self._checkout()
            try:
                worker.conn.send_bytes(os.fsencode(str(path)))
            except OSError:
                # The worker died while idle: not this file's fault. Retry once on a new one.
                self._discard(worker, kill=True)
                if attempt:
                    raise Rejected(DECODE_CRASHED) from None
                continue
            try:
                arr = self._receive(worker)
            except Rejected as exc:
                if exc.reason in (DECODE_CRASHED, DECODE_TIMEOUT):
                    log.warning("decoder process %s; starting a new one",
                                "crashed" if exc.reason == DECODE_CRASHED else "timed out")
                    self._discard(worker, kill=True)
                else:
                    self._release(worker)
                raise
            self._release(worker)
            return arr
        raise AssertionError("unreachable")

    def _receive(self, worker: WorkerProcess) -> np.ndarray:
        conn = worker.conn
        try:
            if not conn.poll(self.timeout_s):
                raise Rejected(DECODE_TIMEOUT)
            head = json.loads(conn.recv_bytes(maxlength=4096))
            if "reason" in head:
                raise Rejected(str(head["reason"]))
            dtype, shape = head["dtype"], tuple(int(n) for n in head["shape"])
            if dtype not in ALLOWED_DTYPES or any(n < 0 for n in shape):
                raise Rejected(DECODE_FAILED)
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if not conn.poll(self.timeout_s):
                raise Rejected(DECODE_TIMEOUT)
            data = conn.recv_bytes(maxlength=max(nbytes, 1))
        except (EOFError, OSError):
            raise Rejected(DECODE_CRASHED) from None
        except (ValueError, KeyError, TypeError):
            raise Rejected(DECODE_FAILED) from None
        if len(data) != nbytes:
            raise Rejected(DECODE_FAILED)
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for worker in idle:
            worker.stop()
