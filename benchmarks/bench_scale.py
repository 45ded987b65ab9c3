"""One coordinator and one Mosquitto against hundreds of sites: round time, memory and bytes.

Every site is the project's real `Site` (its own MQTT client and client id, its own signing
certificate, state directory and cohort) run as a thread in one of a few worker processes that
share the Numba kernels: a process per hospital would need 200 x ~125 MiB on this VM. The
coordinator is its own `fedsilo coordinator run` process and Mosquitto its own, so their peak
resident memory (VmHWM, from wait4 and /proc) and CPU time are theirs alone. Model: an MLP of
~1 M parameters, int8 updates; each site trains on at most --patients rows so that hundreds of
hospitals' training fits on a few cores.

Printed per federation size (3, 50, 200 by default): the median round's wall time, its
overhead (round time minus the slowest site's training), the coordinator's peak RSS and CPU,
Mosquitto's peak RSS and CPU, bytes per round (the task's fan-out and the updates, from the
coordinator's round records) and through the broker per run ($SYS counters), resends. The
baseline for memory is the 3-site run in the same invocation (issue 15: coordinator peak at
200 sites within 1.3x of 3). On one small host the sites' own training shares the cores with
the coordinator, so round time here grows with sites x training; the coordinator's and the
broker's CPU seconds are the part that a federation of real hospitals would see.

Usage: python benchmarks/bench_scale.py [--sites 3,50,200] [--rounds 3] [--repeats 1]
                                        [--workers 4] [--patients 60] [--json FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import CompressionSpec, ModelSpec

MODEL = ModelSpec(kind="mlp", hidden=(1000, 1000))  # 14 x 1000 + 1000 x 1000 + ...: ~1.0 M
TICK = os.sysconf("SC_CLK_TCK")


def _status_mib(pid: int, key: str) -> float:
    """A memory figure of a live process from /proc/PID/status (VmHWM: peak, VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    """utime + stime of a live process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _reap(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int, float, float]:
    """Wait for a child; (exit status, peak RSS MiB, CPU seconds) from its own rusage."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
        time.sleep(0.2)
    proc.kill()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return -9, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def _broker_bytes(port: int) -> dict[str, int]:
    """Mosquitto's own totals since it started ($SYS/broker/bytes/{received,sent})."""
    import paho.mqtt.client as mqtt

    got: dict[str, int] = {}
    done = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got[msg.topic.rsplit("/", 1)[1]] = int(msg.payload)
        if len(got) == 2:
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-scale-sys")
    c.on_message = on_message
    c.on_connect = lambda cl, *_a: cl.subscribe("$SYS/broker/bytes/+")
    c.connect("127.0.0.1", port)
    c.loop_start()
    time.sleep(1.5)  # sys_interval 1: let the counters include the last messages
    done.wait(5)
    c.loop_stop()
    c.disconnect()
    return got


def worker(log_file: Path, configs: list[Path]) -> int:
    """Run the sites of `configs` as threads of this process until each has finished."""
    logging.basicConfig(filename=log_file, level=logging.WARNING,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    from agent.config import load_site_config
    from agent.config.verify import verify_site
    from agent.federation.site import Site

    sites = [Site(verify_site(load_site_config(c)), backend="cpu") for c in configs]
    codes: dict[str, int] = {}

    def run(site: Site) -> None:
        try:
            codes[site.site_id] = site.run(exit_when_finished=True)
        except Exception:
            logging.getLogger("bench").exception("site %s failed", site.site_id)
            codes[site.site_id] = 1

    threads = [threading.Thread(target=run, args=(s,), name=s.site_id) for s in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = sorted(s for s, rc in codes.items() if rc != 0)
    if failed:
        print(f"sites failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def run_federation(work: Path, n: int, rounds: int, workers: int, patients: int
                   ) -> dict[str, Any]:
    from agent.demo.run import coordinator_for, prepare_demo, write_site_config
    from agent.federation.broker import LocalMosquitto

    t0 = time.monotonic()
    files = prepare_demo(work, sites=n, rounds=rounds, seed=0, verbose=False, model=MODEL,
                         compression=CompressionSpec(quantize="int8"), min_sites=n,
                         round_deadline_s=1800.0, max_patients=patients)
    names = [p.name for p in files.profiles]
    prepared = time.monotonic() - t0
    with LocalMosquitto(files.out / "broker", extra_config="sys_interval 1\n") as broker:
        coordinator_for(files, broker.port)  # writes coordinator.toml, clears old state
        configs = [write_site_config(files.out, s, broker.port, files.plan.federation)
                   for s in names]
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               # one Numba thread per site thread, on a thread-safe layer: many sites share a
               # process (the default workqueue layer refuses concurrent parallel regions)
               "NUMBA_NUM_THREADS": "1", "NUMBA_THREADING_LAYER": "omp"}
        k = min(workers, n)
        groups = [configs[i::k] for i in range(k)]
        t_start = time.monotonic()
        pool = [subprocess.Popen(
            [sys.executable, __file__, "--worker", str(files.out / f"worker{i}.log"),
             *map(str, group)], env=env, stdout=subprocess.DEVNULL,
            stderr=open(files.out / f"worker{i}.err", "wb")) for i, group in enumerate(groups)]
        coord = subprocess.Popen(
            [sys.executable, "-m", "agent", "coordinator", "run", "--config",
             str(files.out / "coordinator.toml"), "--plan", str(files.out / "plan.toml")],
            stdout=subprocess.DEVNULL, stderr=open(files.out / "coordinator.log", "wb"))
        trace = open(files.out / "rss.csv", "w")  # noqa: SIM115 - closed by the watcher
        trace.write("clock,coordinator_rss_mib,broker_rss_mib\n")

        def watch() -> None:
            with trace:
                while coord.returncode is None and broker.proc.poll() is None:
                    try:
                        rss = [_status_mib(p, "VmRSS") for p in (coord.pid, broker.proc.pid)]
                    except OSError:
                        break
                    trace.write(f"{time.strftime('%H:%M:%S')},{rss[0]:.0f},{rss[1]:.0f}\n")
                    time.sleep(0.25)

        threading.Thread(target=watch, daemon=True).start()
        rc, coord_peak, coord_cpu = _reap(coord, 3600)
        wall = time.monotonic() - t_start
        site_rc = [_reap(p, 300) for p in pool]
        b_peak, b_cpu = _status_mib(broker.proc.pid, "VmHWM"), _cpu_s(broker.proc.pid)
        traffic = _broker_bytes(broker.port)
    if rc != 0:
        raise SystemExit(f"coordinator exited with {rc}; see {files.out / 'coordinator.log'}")
    bad = [i for i, r in enumerate(site_rc) if r[0] != 0]
    if bad:
        raise SystemExit(f"worker(s) {bad} failed; see {files.out}/worker*.err and *.log")
    metrics = json.loads((files.out / "coordinator" / "metrics.json").read_text())
    log_text = (files.out / "coordinator.log").read_text()
    resent = sum(int(m) for m in re.findall(r"resent (\d+) chunk", log_text))
    asked = sum(int(m) for m in re.findall(r"asking \S+ again for (\d+) chunk", log_text))
    rec = [r for r in metrics["rounds"] if "round" in r]
    warm = rec[1:] or rec  # the first round also loads every process's kernels
    return {
        "sites": n, "rounds": len(rec), "first_round_s": rec[0]["seconds"],
        "prepare_s": prepared, "wall_s": wall,
        "round_s": statistics.median(r["seconds"] for r in warm),
        "overhead_s": statistics.median(r["overhead_s"] for r in warm),
        "slowest_train_s": statistics.median(r["slowest_train_s"] for r in warm),
        "sites_per_round": min(len(r["sites"]) for r in rec),
        "coordinator_peak_mib": coord_peak, "coordinator_cpu_s": coord_cpu,
        "broker_peak_mib": b_peak, "broker_cpu_s": b_cpu,
        "worker_peak_mib": max(r[1] for r in site_rc),
        "task_mb": rec[0]["bytes_sent"] / 1e6,
        "updates_mb_per_round": statistics.median(r["bytes_received"] for r in warm) / 1e6,
        "broker_in_mb": traffic.get("received", 0) / 1e6,
        "broker_out_mb": traffic.get("sent", 0) / 1e6,
        # task chunks sent again at the sites' request (each reaches every site: a broadcast),
        # and update chunks the coordinator asked for again
        "task_chunks_resent": resent, "update_chunks_asked_again": asked,
    }


def _progress(i: int, repeats: int, r: dict[str, Any]) -> None:
    print(f"  [{i}/{repeats}] round {r['round_s']:.1f} s (overhead {r['overhead_s']:.1f} s, "
          f"slowest training {r['slowest_train_s']:.1f} s); coordinator peak "
          f"{r['coordinator_peak_mib']:.0f} MiB, CPU {r['coordinator_cpu_s']:.1f} s; Mosquitto "
          f"peak {r['broker_peak_mib']:.0f} MiB, CPU {r['broker_cpu_s']:.1f} s; broker in/out "
          f"{r['broker_in_mb']:.0f}/{r['broker_out_mb']:.0f} MB; task chunks resent "
          f"{r['task_chunks_resent']}, update chunks asked again "
          f"{r['update_chunks_asked_again']} ({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="3,50,200", help="federation sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4, help="processes hosting the sites")
    ap.add_argument("--repeats", type=int, default=1, help="runs per size; medians printed")
    ap.add_argument("--patients", type=int, default=60, help="rows per site at most")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, state)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        raise SystemExit(worker(Path(args.worker[0]), [Path(c) for c in args.worker[1:]]))
    sizes = [int(s) for s in args.sites.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-scale-") as tmp:
        if args.keep is not None:
            tmp = str(args.keep)
        for n in sizes:
            print(f"{n} sites, {args.rounds} rounds, MLP {list(MODEL.hidden)} (~1.0 M "
                  f"parameters), int8 updates, {min(args.workers, n)} worker processes ...",
                  file=sys.stderr, flush=True)
            runs = []
            for i in range(args.repeats):
                runs.append(run_federation(Path(tmp) / f"s{n}", n, args.rounds, args.workers,
                                           args.patients))
                _progress(i + 1, args.repeats, runs[-1])
            r = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            r["coordinator_peak_runs_mib"] = [round(run["coordinator_peak_mib"]) for run in runs]
            results.append(r)
    base = results[0]
    print(f"\n{'sites':>6} {'round s':>8} {'overhead s':>10} {'coord peak MiB':>14} "
          f"{'x base':>6} {'coord CPU s':>11} {'broker peak MiB':>15} {'broker CPU s':>12} "
          f"{'down MB/round':>13} {'up MB/round':>11} {'broker in/out MB (run)':>22}")
    for r in results:
        print(f"{r['sites']:>6} {r['round_s']:>8.2f} {r['overhead_s']:>10.2f} "
              f"{r['coordinator_peak_mib']:>14.0f} "
              f"{r['coordinator_peak_mib'] / base['coordinator_peak_mib']:>6.2f} "
              f"{r['coordinator_cpu_s']:>11.1f} {r['broker_peak_mib']:>15.0f} "
              f"{r['broker_cpu_s']:>12.1f} {r['task_mb'] * r['sites']:>13.0f} "
              f"{r['updates_mb_per_round']:>11.0f} "
              f"{r['broker_in_mb']:>11.0f}/{r['broker_out_mb']:<10.0f}")
    last = results[-1]
    ratio = last["coordinator_peak_mib"] / base["coordinator_peak_mib"]
    print(f"\ncoordinator peak RSS, {last['sites']} sites / {base['sites']} sites: {ratio:.2f} "
          f"(target <= 1.3)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
