"""Private memory (USS) of a site agent that receives a study over DICOM, without and with
scoring it (`[results] score = true`: onnxruntime on the distributed model), same run.

Each configuration is a real `fedsilo site run` process on an embedded Mosquitto with its DICOM
listener; dcmtk's storescu sends one synthetic CT study of a patient in the clinical table; the
process is measured (USS = Private_Clean + Private_Dirty of /proc/PID/smaps; the re-based site
target counts this, not shared library pages) once it has ingested (and scored) the study and
settled. The baseline is the same site without [results]. Medians of --repeats runs.

Usage: python benchmarks/bench_site_memory.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tomli_w import dumps

from agent.demo import ct
from agent.demo.models import demo_model
from agent.federation.broker import LocalMosquitto, free_port, wait_listening
from agent.federation.envelope import BodyKind, make_manifest
from agent.learn import onnx_export as ox
from agent.learn.distribution import save_received_model

PATIENT = "SYN-00042"
ROW = {"age": "74", "sex": "female", "nihss": "14", "onset_to_door_min": "", "glucose_mmol_l":
       "7.9", "systolic_bp": "162", "atrial_fibrillation": "yes", "prestroke_mrs": "1",
       "thrombolysis": "no", "thrombectomy": "yes"}
SETTLE_S = 8.0


def memory_mib(pid: int) -> tuple[float, float]:
    """(USS, anonymous) of a process: USS counts private pages, file-backed ones too (the
    pages of a library only this process maps, e.g. onnxruntime's); anonymous is the heap."""
    uss = anon = 0
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                uss += int(line.split()[1])
            elif line.startswith("Anonymous:"):
                anon += int(line.split()[1])
    return uss / 1024, anon / 1024


def one_run(base: Path, files: list[Path], table: Path, body: bytes, score: bool
            ) -> tuple[float, float]:
    state = base / f"state-{score}-{time.monotonic_ns()}"
    header = make_manifest(federation="stroke-imaging", round=6, sender="coordinator",
                           body_kind=BodyKind.MODEL, body=body, created=time.time(),
                           meta={"run": "r-1"}).header()
    save_received_model(state / "model", header, body)
    port = free_port()
    with LocalMosquitto() as broker:
        doc = {"site": {"id": "north", "federation": "stroke-imaging", "state_dir": str(state)},
               "broker": {"host": "127.0.0.1", "port": broker.port},
               "data": {"table": str(table), "id_column": "patient_id"},
               "dicom": {"listen": True, "port": port, "bind": "127.0.0.1",
                         "allowed_callers": ["BENCH"], "series_quiet_s": 1.0}}
        if score:
            doc["results"] = {"score": True}
        cfg = base / "site.toml"
        cfg.write_text(dumps(doc))
        with (base / f"site-{score}.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "agent", "site", "run", "--config",
                                     str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_listening(port, proc, "the site's DICOM listener", 60)
            subprocess.run(["storescu", "-aet", "BENCH", "-aec", "FEDSILO", "127.0.0.1",
                            str(port), *map(str, files)], check=True, capture_output=True,
                           timeout=60)
            time.sleep(SETTLE_S)
            value = memory_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if score and "scored: P(" not in (base / f"site-{score}.log").read_text():
        raise SystemExit("the scoring site did not score the study; see its log")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("storescu") is None:
        raise SystemExit("dcmtk's storescu is needed (make system-deps)")
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-mem-") as tmp:
        base = Path(tmp)
        scanner = ct.scanner_for_site(0)
        files = ct.write_series(base / "study", PATIENT, ct.head_phantom_hu(
            scanner, 25.0, np.random.default_rng(4)), scanner)
        table = base / "clinical.csv"
        with table.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["patient_id", *ROW])
            w.writeheader()
            w.writerow({"patient_id": PATIENT, **ROW})
        body = ox.to_onnx(demo_model("cnn_fused")).SerializeToString()
        figures: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for i in range(args.repeats):
            for score in (False, True):
                print(f"[{i + 1}/{args.repeats}] listener site{' + scoring' if score else ''} "
                      f"...", end="", flush=True)
                figures[score].append(one_run(base, files, table, body, score))
                uss, anon = figures[score][-1]
                print(f" USS {uss:.1f} MiB, anonymous {anon:.1f} MiB", flush=True)
    med = {k: [statistics.median(v[j] for v in figures[k]) for j in (0, 1)] for k in figures}
    print(f"\nfigure (median of {args.repeats})                 value    baseline  target")
    print(f"site USS, listener + scoring            {med[True][0]:6.1f} MiB  {med[False][0]:6.1f} "
          f"MiB  <= 100 MiB  (baseline: the same site without [results])")
    print(f"  of which anonymous (heap)             {med[True][1]:6.1f} MiB  {med[False][1]:6.1f} "
          f"MiB")
    print(f"scoring's share: USS {med[True][0] - med[False][0]:+.1f} MiB, anonymous "
          f"{med[True][1] - med[False][1]:+.1f} MiB")


if __name__ == "__main__":
    main()
