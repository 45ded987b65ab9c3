"""The image store makes its batches durable by fsyncing what it wrote, never by syncfs(2),
which would flush (and wait for) every other writer on the file system."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.test_dicom_helpers import write_series

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")

_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from agent.config import ImagingSpec
    from agent.ingest.pipeline import IngestPipeline
    p = IngestPipeline(Path(sys.argv[1]), ImagingSpec(modality="CT", depth=4, size=16),
                       kernel_backend="reference")
    p.ingest_tree(Path(sys.argv[2]))
    done = p.complete_series(quiet_s=0.0)
    p.close()
    print(len(done))
""")


def test_tree_ingest_fsyncs_its_files_and_never_the_whole_file_system(tmp_path):
    write_series(tmp_path / "in", 6)
    log = tmp_path / "strace.log"
    run = subprocess.run(
        ["strace", "-f", "-e", "trace=syncfs,fsync,fdatasync", "-o", str(log),
         sys.executable, "-c", _SCRIPT, str(tmp_path / "state"), str(tmp_path / "in")],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "1"  # the series was stored and completed
    calls = log.read_text()
    assert not re.search(r"\bsyncfs\(", calls), calls
    assert len(re.findall(r"\bfsync\(\d+\)\s+= 0", calls)) >= 4  # files and directories
    # What was made durable is really there for the next process.
    from agent.ingest.store import ImageStore
    store = ImageStore(tmp_path / "state" / "images")
    try:
        assert store.counts()["series"]["complete"] == 1
        assert len(store.series_for_patients()) == 1
    finally:
        store.close()
