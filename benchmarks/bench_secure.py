"""A secure round against a plain round with the same codec: 10 sites, a 1 M-parameter model.

Both rounds run the project's real code in one process, sites one after another (on a
hospital network they run in parallel, so a round's critical path is the slowest site plus the
coordinator): local training of a 1 M-parameter MLP, then the site's update path (plain: int8
encode; secure: key records checked and pairwise seeds derived, fixed point, mask expansion),
then the coordinator's (plain: streamed int8 decode into the weighted sum; secure: masked sum
mod 2^wire and unmasking with the self-mask seeds). MQTT transfer is not timed (bytes printed).
Prints the median of --repeats rounds, the breakdown, and the ratio; figures in docs/perf.md.

    python benchmarks/bench_secure.py [--sites 10] [--params 1000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import kernels
from agent.config import CompressionSpec, ModelSpec, TrainingSpec
from agent.federation.aggregate import FedAvgAccumulator
from agent.federation.codec import encode_update
from agent.learn.layout import build_layout, init_params
from agent.learn.trainer import train_local
from agent.privacy import secagg
from agent.privacy.dp import secure_rng
from agent.security.pki import PKI
from agent.security.signing import Signer, Verifier

PIECE = 1 << 20
ROWS = 256


def _hidden_for(params: int, inputs: int) -> tuple[int, int]:
    """Two equal hidden layers giving about `params` parameters."""
    h = int((-(inputs + 2) + ((inputs + 2) ** 2 + 4 * params) ** 0.5) / 2)
    return (h, h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    k = kernels.get_backend("cpu")
    spec = CompressionSpec(quantize="int8")
    inputs = 16
    hidden = _hidden_for(args.params, inputs)
    layout = build_layout(ModelSpec("mlp", hidden=hidden), inputs, None)
    n = layout.size
    rng = np.random.default_rng(0)
    params = init_params(layout, 0)
    x = rng.standard_normal((ROWS, inputs)).astype(np.float32)
    y = (rng.random(ROWS) < 0.4).astype(np.float32)
    training = TrainingSpec(local_epochs=1, batch_size=32, learning_rate=0.05)
    names = [f"site{i:02d}" for i in range(args.sites)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-secure-"))
    pki = PKI.init(tmp / "pki", "bench")
    for s in names:
        pki.issue("site", s)
    verifier = Verifier(pki.dir / "ca.crt")
    keys = {s: secagg.site_key(tmp / s, "run") for s in names}
    records = {s: secagg.key_record("bench", "run", s, keys[s],
                                    Signer(pki.dir / f"{s}.crt", pki.dir / f"{s}.key"))
               for s in names}
    print(f"{args.sites} sites x {n:,} parameters (MLP hidden {hidden}), "
          f"int8; {args.repeats} rounds each", file=sys.stderr, flush=True)

    def train() -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        r = train_local(layout, params, x, y, training, seed=1, kernels=k)
        return (r.params - params).astype(np.float32), time.perf_counter() - t

    deltas, train_s = [], []
    for _ in names:  # each site's update, once; training time measured per site
        d, s = train()
        deltas.append(d)
        train_s.append(s)
    t_train = statistics.median(train_s)

    def plain_round() -> dict[str, float]:
        site = []
        bodies = []
        for i, d in enumerate(deltas):
            t = time.perf_counter()
            bodies.append(encode_update(d, spec, seed=i, kernels=k))
            site.append(time.perf_counter() - t)
        t = time.perf_counter()
        acc = FedAvgAccumulator(n, k)
        for i, e in enumerate(bodies):
            st = acc.open_update(e.meta, 100.0 + i, spec, label=names[i], body_len=len(e.body))
            for a in range(0, len(e.body), PIECE):
                st.feed(e.body[a:a + PIECE])
            st.finish()
        acc.apply(params)
        coord = time.perf_counter() - t
        return {"encode_s": max(site), "aggregate_s": coord,
                "bytes": float(sum(len(e.body) for e in bodies))}

    def secure_round() -> dict[str, float]:
        bits = secagg.code_bits("int8")
        weights = secagg.integer_weights({s: 100.0 + i for i, s in enumerate(names)}, bits)
        wire = secagg.ring_bits(sum(weights.values()), bits)
        kx, masking, bodies, seeds = [], [], [], []
        for i, s in enumerate(names):
            t = time.perf_counter()
            pair = {}
            for p in names:
                if p != s:
                    public = secagg.check_key_record(records[p], "bench", "run", p, verifier)
                    pair[p] = secagg.pair_seed(keys[s], public, federation="bench", run="run",
                                               rnd=1, epoch=1, a=s, b=p)
            t1 = time.perf_counter()
            fixed = secagg.to_fixed(deltas[i], bound=0.5, bits=bits, weight=weights[s],
                                    rng=secure_rng())
            ks, signs = secagg.mask_keys(s, names, pair)
            seeds.append(secagg.self_seed())
            bodies.append(secagg.mask(fixed.values, ks, signs, seeds[-1], wire, k))
            t2 = time.perf_counter()
            kx.append(t1 - t)
            masking.append(t2 - t1)
        t = time.perf_counter()
        total = secagg.MaskedSum(n, wire)
        for body in bodies:
            st = total.stream()
            for a in range(0, len(body), PIECE):
                st.feed(body[a:a + PIECE])
            st.finish()
        t_sum = time.perf_counter() - t
        t = time.perf_counter()
        values = secagg.unmask(total.total, seeds, wire, k)
        secagg.from_fixed(values, bound=0.5, bits=bits, total_weight=sum(weights.values()))
        t_unmask = time.perf_counter() - t
        return {"key_exchange_s": max(kx), "mask_s": max(masking), "sum_s": t_sum,
                "unmask_s": t_unmask, "bytes": float(sum(len(b) for b in bodies))}

    secure_round()  # compile and warm up both paths once
    plain_round()
    plain = [plain_round() for _ in range(args.repeats)]
    secure = [secure_round() for _ in range(args.repeats)]

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    p_over = med(plain, "encode_s") + med(plain, "aggregate_s")
    s_over = sum(med(secure, key) for key in ("key_exchange_s", "mask_s", "sum_s", "unmask_s"))
    doc = {"sites": args.sites, "params": n, "train_s": t_train,
           "plain": {key: med(plain, key) for key in plain[0]},
           "secure": {key: med(secure, key) for key in secure[0]},
           "plain_round_s": t_train + p_over, "secure_round_s": t_train + s_over,
           "ratio_round": (t_train + s_over) / (t_train + p_over),
           "ratio_protocol_only": s_over / p_over}
    if args.json:
        print(json.dumps(doc))
        return
    print(f"local training (median of {args.sites} sites): {t_train:.3f} s")
    print(f"plain  int8: encode {doc['plain']['encode_s'] * 1e3:.1f} ms (slowest site), "
          f"aggregate {doc['plain']['aggregate_s'] * 1e3:.1f} ms; "
          f"{doc['plain']['bytes'] / 1e6:.1f} MB on the wire")
    print(f"secure int8: key exchange {doc['secure']['key_exchange_s'] * 1e3:.1f} ms, mask "
          f"expansion {doc['secure']['mask_s'] * 1e3:.1f} ms (slowest site), masked sum "
          f"{doc['secure']['sum_s'] * 1e3:.1f} ms, unmasking {doc['secure']['unmask_s'] * 1e3:.1f}"
          f" ms; {doc['secure']['bytes'] / 1e6:.1f} MB on the wire")
    print(f"round: plain {doc['plain_round_s']:.3f} s, secure {doc['secure_round_s']:.3f} s: "
          f"ratio {doc['ratio_round']:.2f} (target <= 2); protocol work alone "
          f"{doc['ratio_protocol_only']:.2f}x")


if __name__ == "__main__":
    main()
