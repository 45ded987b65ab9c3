"""What signing and verifying manifests add to a round: 1 M-parameter model, 3 sites.

Runs the demo federation (embedded Mosquitto, the coordinator in this process, three
`fedsilo site run` processes) with an MLP of about 1 M parameters, alternately with every
manifest signed and checked (the default) and with no identities at all, and compares the
median round time of each run; runs alternate so drift on this noisy machine hits both alike.
Also prints the cost of one signature and one verification on a real manifest header, and how
many of each a round makes. Issue 5's target: signing and verification add <= 5 % to a round.

Usage: python benchmarks/bench_signing.py [--repeats 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from agent.config import ModelSpec
from agent.demo.run import coordinator_for, prepare_demo, start_sites, wait_sites
from agent.federation.broker import LocalMosquitto
from agent.federation.envelope import BodyKind, make_manifest
from agent.security.signing import Signer, Verifier

MODEL = ModelSpec(kind="mlp", hidden=(1000, 1000))  # ~1.02 M parameters


def round_seconds(work: Path, rounds: int, signed: bool) -> float:
    files = prepare_demo(work, sites=3, rounds=rounds, seed=0, verbose=False, model=MODEL)
    with LocalMosquitto(files.out / "broker") as broker:
        procs = start_sites(files, broker.port, signed=signed)
        coordinator = coordinator_for(files, broker.port, signed=signed)
        try:
            coordinator.run()
        finally:
            wait_sites(procs, timeout_s=60)
    return statistics.median(h["seconds"] for h in coordinator.history
                             if "round" in h and "final" not in h)


def per_message_cost(pki: Path, n_params: int) -> tuple[float, float]:
    body = bytes(4 * n_params)
    header = make_manifest(federation="f", round=3, sender="city-csc", body_kind=BodyKind.UPDATE,
                           body=body, created=time.time(), meta={"n_samples": 1000}).header()
    signer = Signer(pki / "city-csc.crt", pki / "city-csc.key")
    verifier = Verifier(pki / "ca.crt", pki / "crl.pem")
    signed = signer.sign(header)
    verifier.verify(signed, sender="city-csc", role="site")  # certificate now cached
    t = time.perf_counter()
    for _ in range(200):
        signer.sign(header)
    sign_s = (time.perf_counter() - t) / 200
    t = time.perf_counter()
    for _ in range(200):
        verifier.verify(signed, sender="city-csc", role="site")
    return sign_s, (time.perf_counter() - t) / 200


def main() -> None:
    if __name__ != "__main__":
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    logging.getLogger("agent").setLevel(logging.ERROR)
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-sign-") as tmp:
        for i in range(args.repeats):
            for signed in (False, True):
                label = "signed" if signed else "unsigned"
                print(f"[{i + 1}/{args.repeats}] {label}: 3 sites, MLP {list(MODEL.hidden)}, "
                      f"{args.rounds} rounds ...", flush=True)
                times[signed].append(round_seconds(Path(tmp) / label, args.rounds, signed))
                print(f"  median round {times[signed][-1]:.3f} s", flush=True)
        sign_s, verify_s = per_message_cost(Path(tmp) / "signed" / "pki", 1_020_000)
    signed_s, plain_s = statistics.median(times[True]), statistics.median(times[False])
    print(f"\nround, 3 sites, ~1 M parameters: signed {signed_s:.3f} s, unsigned {plain_s:.3f} s "
          f"(median of {args.repeats} runs' medians): {100 * (signed_s / plain_s - 1):+.1f} % "
          f"(target <= +5 %)")
    # a round: the coordinator signs 1 task, each site verifies it and signs 1 update, the
    # coordinator verifies 3 updates
    direct = 4 * sign_s + 6 * verify_s
    print(f"one signature {sign_s * 1e6:.0f} us, one verification {verify_s * 1e6:.0f} us; "
          f"a round makes 4 and 6: {direct * 1e3:.2f} ms = {100 * direct / plain_s:.2f} % of "
          f"the unsigned round")


main()
