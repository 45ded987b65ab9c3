"""`fedsilo report`: one self-contained HTML file from a federation's metrics.json.

For the clinical data scientist and the consortium: the global and per-site held-out loss and
AUC per round, training loss, who took part in each round, bytes on the wire, and the final
model's scores. Charts are inline SVG drawn here (no scripts, no fonts or files fetched), so
the file opens anywhere, offline, and can be mailed or archived as it is.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from pathlib import Path
from typing import Any

from agent import __version__
from agent.errors import DataError

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22")
W, H, PAD = 780, 260, 44
LEFT, LEGEND = 72, 200  # room for tick labels on the left, for the legend on the right


def load_metrics(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rounds"), list):
        raise DataError(f"{path}: not a fedsilo metrics.json (no 'rounds' list)")
    return doc


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) \
        and math.isfinite(v) else None


def line_chart(title: str, series: dict[str, list[tuple[int, float | None]]],
               y_label: str) -> str:
    """An SVG line chart: one polyline per series over rounds, axes with a few ticks."""
    points = [(x, y) for s in series.values() for x, y in s if y is not None]
    if not points:
        return f"<p>{html.escape(title)}: no data.</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * (W - LEFT - LEGEND)

    def sy(y: float) -> float:
        return H - PAD + (y0 - y) / (y1 - y0) * (H - 2 * PAD)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{W / 2}" y="16" text-anchor="middle" font-weight="bold">'
             f'{html.escape(title)}</text>',
             f'<line x1="{LEFT}" y1="{H - PAD}" x2="{W - LEGEND}" y2="{H - PAD}" '
             f'stroke="#333"/>',
             f'<line x1="{LEFT}" y1="{PAD}" x2="{LEFT}" y2="{H - PAD}" stroke="#333"/>',
             f'<text x="{(LEFT + W - LEGEND) / 2}" y="{H - 8}" text-anchor="middle">round</text>',
             f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" '
             f'text-anchor="middle">{html.escape(y_label)}</text>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{LEFT - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" '
                     f'font-size="10">{y:.4g}</text>')
    for x in sorted(set(xs))[:: max(1, len(set(xs)) // 10)]:
        parts.append(f'<text x="{sx(x):.1f}" y="{H - PAD + 14}" text-anchor="middle" '
                     f'font-size="10">{x}</text>')
    for i, (name, s) in enumerate(sorted(series.items())):
        color = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s if y is not None)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                     f'points="{pts}"><title>{html.escape(name)}</title></polyline>')
        parts.append(f'<text x="{W - LEGEND + 10}" y="{PAD + 14 * i}" fill="{color}" '
                     f'font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render(metrics: dict[str, Any]) -> str:
    rounds = [r for r in metrics["rounds"] if isinstance(r, dict) and "round" in r
              and "final" not in r]
    final = next((r["final"] for r in metrics["rounds"] if isinstance(r, dict)
                  and isinstance(r.get("final"), dict)), None)
    sites = sorted({s for r in rounds for s in r.get("per_site", {})})
    def per_site(key: str) -> dict[str, list[tuple[int, float | None]]]:
        return {s: [(r["round"], _num((r.get("per_site", {}).get(s) or {}).get("eval", {}
                                                                              ).get(key)))
                    for r in rounds] for s in sites}

    auc = {"global (sample-weighted)": [(r["round"], _num(r.get("eval_before", {}).get("auc")))
                                        for r in rounds], **per_site("auc")}
    loss = {"global (sample-weighted)": [(r["round"], _num(r.get("eval_before", {}).get("loss")))
                                         for r in rounds], **per_site("loss")}
    train = {"train loss (sample-weighted)": [(r["round"], _num(r.get("train_loss")))
                                              for r in rounds]}
    traffic = {"up (all sites)": [(r["round"], _num(r.get("bytes_received"))) for r in rounds],
               "down (task, once)": [(r["round"], _num(r.get("bytes_sent"))) for r in rounds]}
    esc = html.escape
    rows = []
    for r in rounds:
        discounted = r.get("discounted") or {}
        cells = "".join(
            f"<td class='{_cell(s, r, discounted)}' title='{esc(discounted.get(s, ''))}'>"
            f"{'●' if s in r.get('sites', []) else '○'}</td>" for s in sites)
        partial = ", ".join(f"{esc(k)} {v:.0%}" for k, v in (r.get("partial") or {}).items())
        why = ", ".join(f"{esc(k)}: {esc(v)}" for k, v in discounted.items())
        rows.append(f"<tr><td>{r['round']}</td>{cells}<td>{r.get('samples', '')}</td>"
                    f"<td>{esc(partial)}</td><td>{why}</td></tr>")
    final_rows = ""
    if final is not None:
        ev = final.get("eval", {})
        final_rows = "".join(
            f"<tr><td>{esc(name)}</td><td>{_fmt(d.get('auc'))}</td><td>{_fmt(d.get('loss'))}"
            f"</td><td>{_fmt(d.get('accuracy'))}</td><td>{_count(d.get('n'))}</td></tr>"
            for name, d in [("all sites (sample-weighted)", ev),
                            *sorted((final.get("per_site") or {}).items())])
    fed = esc(str(metrics.get("federation", "")))
    made = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fedsilo report: {fed}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1000px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: center; }}
td.in {{ color: #2ca02c; }} td.out {{ color: #d62728; }} td.disc {{ color: #ff7f0e; }}
svg {{ display: block; margin: 1em 0; }}
</style></head><body>
<h1>Federation {fed}</h1>
<p>{len(rounds)} rounds, {len(sites)} sites; run {esc(str(metrics.get("run", "")))}.
Report made {made} by fedsilo {__version__}. Held-out scores are each site's own held-out
patients, scored with the model the site received that round.</p>
<h2>Final model</h2>
<table><tr><th>held-out patients of</th><th>AUC</th><th>loss</th><th>accuracy</th><th>n</th></tr>
{final_rows}</table>
<h2>Quality per round</h2>
{line_chart("Held-out AUC", auc, "AUC")}
{line_chart("Held-out loss", loss, "log loss")}
{line_chart("Training loss", train, "loss")}
<h2>Participation per round</h2>
<p>Strategy {esc(str(next((r.get("strategy") for r in rounds if r.get("strategy")), "fedavg")))}.
● took part, ○ did not, orange: its update was discounted by the strategy (why: last column).</p>
<table><tr><th>round</th>{"".join(f"<th>{esc(s)}</th>" for s in sites)}<th>samples</th>
<th>partial updates</th><th>discounted by the strategy</th></tr>
{"".join(rows)}</table>
<h2>Bytes on the wire per round</h2>
{line_chart("Bytes per round", traffic, "bytes")}
</body></html>
"""


def _cell(site: str, record: dict[str, Any], discounted: dict[str, str]) -> str:
    if site in discounted:
        return "disc"
    return "in" if site in record.get("sites", []) else "out"


def _count(v: Any) -> str:
    n = _num(v)
    return "" if n is None else f"{n:.0f}"


def _fmt(v: Any) -> str:
    n = _num(v)
    return "" if n is None else f"{n:.3f}"


def write_report(metrics_path: Path, out: Path) -> Path:
    out = Path(out)
    out.write_text(render(load_metrics(metrics_path)), encoding="utf-8")
    return out
