"""`fedsilo report`: the HTML is well formed and self-contained, and shows what the rounds were:
scores per round as charts, who took part, partial updates, bytes, the final model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from agent.ops.report import render


def metrics() -> dict:
    rounds = []
    for r in range(1, 6):
        sites = ["north", "south"] + (["east"] if r != 3 else [])  # east missed round 3
        rounds.append({
            "round": r, "sites": sites, "samples": 100 * len(sites),
            "train_loss": 0.7 - 0.05 * r, "bytes_received": 1000 * len(sites),
            "bytes_sent": 5000, "partial": {"east": 0.5} if r == 4 else {},
            "strategy": "multi_krum",
            "discounted": {"south": "krum_outlier"} if r == 5 else {},
            "eval_before": {"auc": 0.6 + 0.04 * r, "loss": 0.7 - 0.04 * r, "n": 90},
            "per_site": {s: {"eval": {"auc": 0.55 + 0.05 * r + 0.01 * i,
                                      "loss": 0.6 - 0.03 * r, "n": 30}}
                         for i, s in enumerate(sites)}})
    rounds.append({"round": 6, "sites": ["east", "north", "south"],
                   "final": {"eval": {"auc": 0.812, "loss": 0.45, "accuracy": 0.77, "n": 90},
                             "per_site": {"north": {"auc": 0.8, "loss": 0.5, "accuracy": 0.7,
                                                    "n": 30}}}})
    return {"federation": "stroke-eu", "run": "abc123", "rounds": rounds}


class Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.external.append(value)


def test_report_shows_the_rounds_and_fetches_nothing():
    page = render(metrics())
    parser = Collect()
    parser.feed(page)
    assert parser.external == [] and "script" not in parser.tags  # self-contained, no JS
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == 4
    for svg in svgs:
        root = ET.fromstring(svg)  # well-formed XML
        for line in root.iter("{http://www.w3.org/2000/svg}polyline"):
            assert len(line.get("points").split()) >= 4  # a point per round (5; east 4)
    auc = ET.fromstring(svgs[0])
    names = {t.text for t in auc.iter("{http://www.w3.org/2000/svg}title")}
    assert names == {"global (sample-weighted)", "north", "south", "east"}
    # participation: east is out in round 3 and partial in round 4
    row3 = re.search(r"<tr><td>3</td>(.*?)</tr>", page).group(1)
    assert row3.count("class='out'") == 1 and row3.count("class='in'") == 2
    assert "east 50%" in re.search(r"<tr><td>4</td>(.*?)</tr>", page).group(1)
    assert "0.812" in page and "stroke-eu" in page
    # what the strategy discounted: south in round 5, marked and named
    row5 = re.search(r"<tr><td>5</td>(.*?)</tr>", page).group(1)
    assert row5.count("class='disc'") == 1 and "south: krum_outlier" in row5
    assert "title='krum_outlier'" in row5 and "Strategy multi_krum" in page


def test_cli_writes_the_report_and_refuses_what_is_not_metrics(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics()))
    run = subprocess.run([sys.executable, "-m", "agent", "report", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 0 and (tmp_path / "report.html").stat().st_size > 5000
    (tmp_path / "bad.json").write_text("[1, 2]")
    bad = subprocess.run([sys.executable, "-m", "agent", "report", str(tmp_path / "bad.json")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "not a fedsilo metrics.json" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_report_renders_in_headless_chromium_without_console_errors(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:  # `make test` installs it: a miss is a failure
        pytest.fail("chromium missing: `make test` installs the chromium package")
    page = tmp_path / "report.html"
    page.write_text(render(metrics()))
    shot = tmp_path / "report.png"
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                          "--hide-scrollbars", "--window-size=1000,1600", "--enable-logging=stderr",
                          "--v=0", f"--screenshot={shot}", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert console == []  # the page logs nothing: no script, no error
