"""The one prepared GPU run (issue 4): kernel tests on the gpu backend, then the GPU figures.

Run on a CUDA host from the repository root:  python benchmarks/gpu_check.py [OUTDIR]
It writes OUTDIR/device.txt, tests.log, bench.json (what `fedsilo bench --backend gpu --json`
prints, 10 sites x 10 M parameters) and big.json (the fused aggregation at 10 sites x 100 M
parameters: 10 M float32 fit in an H100's 50 MB L2 cache, 100 M do not), and prints a short
table last. Everything is measured in this one run, against this device's copy bandwidth.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_kernels_codec.py",
                "tests/test_kernels_conv.py", "tests/test_kernels_imaging.py",
                "tests/test_kernels_gpu.py", "tests/test_kernels_privacy.py"]


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    import cupy

    import kernels
    from agent.ops import bench

    props = cupy.cuda.runtime.getDeviceProperties(0)
    device = (f"{props['name'].decode()}, {props['totalGlobalMem'] / 2**30:.0f} GiB, "
              f"{props['multiProcessorCount']} SMs, L2 {props['l2CacheSize'] / 2**20:.0f} MiB; "
              f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
              f"driver {cupy.cuda.runtime.driverGetVersion()}; cupy {cupy.__version__}")
    (out / "device.txt").write_text(device + "\n")
    print(device, flush=True)
    print("backends:", kernels.available_backends(), flush=True)

    # Kernel tests: every gpu case plus the oracle's own (the cpu cases would only spend
    # device time compiling Numba).
    t = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-k", "not cpu", *KERNEL_TESTS], capture_output=True, text=True)
    (out / "tests.log").write_text(tests.stdout + tests.stderr)
    summary = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"kernel tests ({time.perf_counter() - t:.0f} s): {summary}", flush=True)
    if tests.returncode != 0:
        print(tests.stdout[-6000:], flush=True)

    doc = bench.run_bench(backend="gpu", repeats=20)
    (out / "bench.json").write_text(json.dumps(doc, indent=1))
    print(bench.format_report(doc), flush=True)

    place = bench.place_of("gpu")
    k = kernels.get_backend("gpu")
    copy = bench.device_copy_gbps(place, 1 << 28, 20)
    results = bench._aggregate_int8(k, place, 100_000_000, 10, 10)
    big_doc = {"device": device, "memory_bandwidth_gbps": round(copy, 1),
               "parameters": 100_000_000, "sites": 10,
               "benchmarks": [r.as_dict(copy) for r in results]}
    (out / "big.json").write_text(json.dumps(big_doc, indent=1))
    for r in results:
        print(f"{r.name} 10 sites x 100 M: {r.value:.0f} GB/s = {100 * r.value / copy:.0f} % "
              f"of copy {copy:.0f} GB/s; CuPy unfused {r.baseline:.0f} GB/s "
              f"({r.value / r.baseline:.1f}x)", flush=True)
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
