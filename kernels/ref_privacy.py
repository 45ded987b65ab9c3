"""Plain-numpy privacy kernels: the oracle for the cpu/gpu versions of mask expansion (secure
aggregation) and per-example clipping (DP-SGD).

Secure aggregation: a site adds, for every pair it shares a key with, a pseudo-random mask to
its quantized update (+ for one side of the pair, - for the other), in uint32 arithmetic mod
2^32; the coordinator's sum of all masked updates is then the plain sum, while each single
update looks uniformly random. Mask j is the ChaCha20 keystream (RFC 8439 block function, key
keys[j], 96-bit nonce all zero, 32-bit block counter from 0) read as little-endian uint32
words. Key agreement, and folding the round into the key so no mask is used twice, are the
caller's business: a mask key must never be reused for different data.

`mask_accumulate(acc, keys, signs, start)` adds words start .. start+len(acc)-1 of every mask,
so a caller can expand a slice of a long vector; results are exact integers, so every backend
gives the oracle's result bit for bit.

DP-SGD: `clip_rows_sum(rows, clip)` scales each per-example gradient to L2 norm at most `clip`
and sums them. Numerics, which every backend reproduces: norms accumulate in float64; a row
with norm > clip is scaled by the float64 factor clip / norm (other rows, zero norm included,
by 1); the scaled rows are summed in float64 in row order and rounded once to float32. Rows
must be finite (with a NaN the result is unspecified).
"""

from __future__ import annotations

import numpy as np

from kernels.ref_checks import check_f32

# "expand 32-byte k" as four little-endian words (RFC 8439 section 2.3).
SIGMA = np.frombuffer(b"expand 32-byte k", dtype="<u4").astype(np.uint32)
MAX_WORDS = 16 << 32  # a 32-bit block counter: 2^32 blocks of 16 words per key
ZERO_NONCE = bytes(12)
_CHUNK_BLOCKS = 1 << 15  # blocks per vectorised pass: a [16, 32768] state is 2 MiB


# ---------------------------------------------------------------------------- ChaCha20


def _rotl(v: np.ndarray, r: int, tmp: np.ndarray) -> None:
    """In place: v = v <<< r (32-bit words)."""
    np.left_shift(v, r, out=tmp)
    v >>= 32 - r
    v |= tmp


def _quarter(x: np.ndarray, a: int, b: int, c: int, d: int, tmp: np.ndarray) -> None:
    """RFC 8439 2.1 quarter round on rows a, b, c, d of the [16, blocks] state."""
    xa, xb, xc, xd = x[a], x[b], x[c], x[d]
    xa += xb
    xd ^= xa
    _rotl(xd, 16, tmp)
    xc += xd
    xb ^= xc
    _rotl(xb, 12, tmp)
    xa += xb
    xd ^= xa
    _rotl(xd, 8, tmp)
    xc += xd
    xb ^= xc
    _rotl(xb, 7, tmp)


def chacha20_blocks(key_words: np.ndarray, nonce_words: np.ndarray,
                    counters: np.ndarray) -> np.ndarray:
    """uint32 [blocks, 16]: the ChaCha20 block function for every counter at once.

    The state is held word-major ([16, blocks], each word's row contiguous, so every step of
    the 10 double rounds is one numpy operation over all blocks) and transposed at the end.
    """
    m = counters.shape[0]
    init = np.empty((16, m), dtype=np.uint32)
    init[0:4] = SIGMA[:, None]
    init[4:12] = key_words.astype(np.uint32)[:, None]
    init[12] = counters
    init[13:16] = nonce_words.astype(np.uint32)[:, None]
    x = init.copy()
    tmp = np.empty(m, dtype=np.uint32)
    for _ in range(10):
        _quarter(x, 0, 4, 8, 12, tmp)  # columns
        _quarter(x, 1, 5, 9, 13, tmp)
        _quarter(x, 2, 6, 10, 14, tmp)
        _quarter(x, 3, 7, 11, 15, tmp)
        _quarter(x, 0, 5, 10, 15, tmp)  # diagonals
        _quarter(x, 1, 6, 11, 12, tmp)
        _quarter(x, 2, 7, 8, 13, tmp)
        _quarter(x, 3, 4, 9, 14, tmp)
    x += init
    return np.ascontiguousarray(x.T)


def _words(name: str, value: bytes | np.ndarray, nbytes: int) -> np.ndarray:
    raw = bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) \
        else np.ascontiguousarray(value, dtype=np.uint8).tobytes()
    if len(raw) != nbytes:
        raise ValueError(f"{name} must be {nbytes} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


def chacha20_block_words(key: bytes | np.ndarray, nonce: bytes | np.ndarray,
                         counter: int) -> np.ndarray:
    """uint32 [16]: one ChaCha20 block (RFC 8439 2.3), to check the published test vector."""
    if not 0 <= counter < 1 << 32:
        raise ValueError(f"counter must lie in [0, 2^32), got {counter}")
    return chacha20_blocks(_words("key", key, 32), _words("nonce", nonce, 12),
                           np.array([counter], dtype=np.uint32))[0]


def _keystream(key_words: np.ndarray, nonce_words: np.ndarray, start: int,
               count: int) -> np.ndarray:
    """uint32 [count]: words start .. start+count-1 of one keystream, in bounded chunks."""
    out = np.empty(count, dtype=np.uint32)
    b0 = start // 16
    b1 = (start + count + 15) // 16
    for lo in range(b0, b1, _CHUNK_BLOCKS):
        hi = min(lo + _CHUNK_BLOCKS, b1)
        words = chacha20_blocks(key_words, nonce_words,
                                np.arange(lo, hi, dtype=np.uint32)).reshape(-1)
        first = max(start, lo * 16)
        last = min(start + count, hi * 16)
        out[first - start:last - start] = words[first - lo * 16:last - lo * 16]
    return out


def chacha20_keystream_words(key: bytes | np.ndarray, start: int, count: int,
                             nonce: bytes | np.ndarray = ZERO_NONCE) -> np.ndarray:
    """uint32 [count]: keystream words start .. start+count-1 (block counter from 0), so the
    masks can be checked against an independent ChaCha20 (the `cryptography` package)."""
    start, count = check_int("start", start, 0), check_int("count", count, 0)
    if start + count > MAX_WORDS:
        raise ValueError(f"words up to {start + count} exceed the 32-bit block counter "
                         f"({MAX_WORDS} words per key)")
    return _keystream(_words("key", key, 32), _words("nonce", nonce, 12), start, count)


# ---------------------------------------------------------------------------- checks


def check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_masks(acc: np.ndarray, keys: np.ndarray, signs: np.ndarray, start: object,
                types: tuple[type, ...] = (np.ndarray,)) -> tuple[int, np.ndarray, np.ndarray]:
    """Validate mask_accumulate's arguments (keys and signs on the host); return (start, key
    words uint32 [k, 8], signs int32 [k]) as every backend's kernel takes them."""
    if not isinstance(acc, types):
        kinds = " or ".join(t.__module__.split(".")[0] for t in types)
        raise TypeError(f"acc must be a {kinds} array, got {type(acc).__name__}")
    if acc.dtype != np.uint32 or acc.ndim != 1:
        raise TypeError(f"acc must be a 1-D uint32 array, got {acc.dtype} {acc.shape}")
    if not acc.flags.c_contiguous:
        raise ValueError("acc must be C-contiguous")
    if not getattr(acc.flags, "writeable", True):
        raise ValueError("acc is updated in place but is read-only")
    if not isinstance(keys, np.ndarray) or keys.dtype != np.uint8 or keys.ndim != 2 \
            or keys.shape[1] != 32:
        raise TypeError("keys must be a uint8 array [k, 32] (one ChaCha20 key per mask), got "
                        f"{getattr(keys, 'dtype', type(keys).__name__)} "
                        f"{getattr(keys, 'shape', '')}")
    k = keys.shape[0]
    if not isinstance(signs, np.ndarray) or signs.dtype != np.int32 or signs.shape != (k,):
        raise TypeError(f"signs must be an int32 array of shape ({k},), got "
                        f"{getattr(signs, 'dtype', type(signs).__name__)} "
                        f"{getattr(signs, 'shape', '')}")
    if k and not np.all((signs == 1) | (signs == -1)):
        raise ValueError("signs must be +1 or -1")
    s = check_int("start", start, 0)
    if s + acc.shape[0] > MAX_WORDS:
        raise ValueError(f"words up to {s + acc.shape[0]} exceed the 32-bit block counter "
                         f"({MAX_WORDS} words per key)")
    words = np.ascontiguousarray(keys).view("<u4").astype(np.uint32).reshape(k, 8)
    return s, words, np.ascontiguousarray(signs)


def check_clip(clip: object) -> float:
    if isinstance(clip, bool) or not isinstance(clip, (int, float, np.floating, np.integer)) \
            or not np.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    return float(clip)


def check_rows(rows: np.ndarray, types: tuple[type, ...] = (np.ndarray,)) -> None:
    """Per-example gradients: a float32 C-contiguous [B, n] matrix (B may be 0)."""
    check_f32("rows", rows, 2, types=types)


# ---------------------------------------------------------------------------- kernels


def mask_accumulate(acc: np.ndarray, keys: np.ndarray, signs: np.ndarray,
                    start: int = 0) -> None:
    """In place, mod 2^32: acc[i] += signs[j] * mask_j[start + i] for every key j.

    Pairwise masks cancel in the coordinator's sum; `start` lets a long vector be expanded in
    slices (any word offset). One vectorised keystream per key, in chunks of blocks.
    """
    s, words, sg = check_masks(acc, keys, signs, start)
    nonce = np.zeros(3, dtype=np.uint32)
    for j in range(words.shape[0]):
        ks = _keystream(words[j], nonce, s, acc.shape[0])
        if sg[j] > 0:
            acc += ks
        else:
            acc -= ks


def clip_rows_sum(rows: np.ndarray, clip: float) -> tuple[np.ndarray, int]:
    """(float32 [n] sum of the rows, each scaled to L2 norm <= clip, number of rows scaled
    down): DP-SGD's per-example clipping, which bounds one example's influence on the step."""
    check_rows(rows)
    c = check_clip(clip)
    x = rows.astype(np.float64)
    norms = np.sqrt(np.sum(x * x, axis=1))
    over = norms > c
    scale = np.ones(rows.shape[0])
    scale[over] = c / norms[over]
    total = np.zeros(rows.shape[1])
    for r in range(rows.shape[0]):  # row order, as every backend sums
        total += x[r] * scale[r]
    return total.astype(np.float32), int(np.count_nonzero(over))
