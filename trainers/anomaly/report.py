"""AXOL1TL's report: one self-contained ``report.html`` (plots embedded) and ``report.pdf``.

The HTML needs no other file: figures are embedded as base64 PNGs, the styles inline.
The PDF is the same page printed by a headless Chromium (``chromium --headless
--print-to-pdf``); without Chromium the HTML is still written and the PDF step says
how to get it (``apt-get install chromium``).
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 980px;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #bbb; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #eee; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; }
.figs figure { margin: 0; flex: 1 1 400px; max-width: 48%; }
.figs img { width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: .8em; }
.pair { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
h3 { font-size: 1em; margin: 1em 0 .2em; }
@media print { .figs figure { break-inside: avoid; } }
"""


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _figure(path: str, caption: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _score_section(score: str, table: Mapping[str, Any]) -> str:
    rates = table["rates_khz"]
    thresholds = _table(["target rate (kHz)", "threshold"],
                        [[f"{r:g}", f"{t:.6g}"] for r, t in zip(rates, table["thresholds"], strict=True)])
    eff_rows = [[name, s["events"], f"{s['auc']:.4f}", *[f"{100 * e:.2f}%" for e in s["efficiency"]]]
                for name, s in table["signals"].items()]
    efficiencies = _table(["signal", "events", "ROC AUC", *[f"eff. @ {r:g} kHz" for r in rates]], eff_rows)
    return (f"<h3>{html.escape(score)}</h3><div class=\"pair\"><div>{thresholds}</div><div>{efficiencies}</div></div>")


def render_html(*, title: str, facts: Mapping[str, Any], tables: Mapping[str, Mapping[str, Any]],
                figures: Mapping[str, str], config: Mapping[str, Any], summary: Sequence[Sequence[Any]] = ()) -> str:
    """The report page as one HTML string: run facts, a summary table (``summary`` rows: score,
    signal, AUC, ...), thresholds and efficiencies per score kind (``tables``: ``{score kind:
    score_table(...)}``), the figures (``{caption: PNG path}``, embedded) and the config."""
    fact_rows = _table(["fact", "value"], [[k, v] for k, v in facts.items()])
    first = next(iter(tables.values()), None)
    rate_note = (f"<p>Total input rate {first['total_rate_khz']:g} kHz; background test events: "
                 f"{first['background_events']}.</p>") if first else "<p>No scores were computed for this run.</p>"
    sections = "".join(_score_section(score, table) for score, table in tables.items())
    best = _table(["score", "signal", "ROC AUC"], summary) if summary else ""
    figs = "".join(_figure(path, caption) for caption, path in figures.items())
    cfg = html.escape(json.dumps(config, indent=2, sort_keys=True, default=str))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="pair"><div><h2>Best ROC AUC per signal</h2>{best}</div><div><h2>Run</h2>{fact_rows}</div></div>
<h2>Figures</h2><div class="figs">{figs}</div>
<h2>Thresholds and signal efficiencies</h2>{rate_note}
{sections}
<h2>Configuration</h2><pre>{cfg}</pre>
</body></html>
"""


def write_html(path: str, page: str) -> str:
    """Write ``page`` to ``path`` atomically; returns ``path``."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


def find_chromium() -> str | None:
    """The headless browser used for the PDF (``$CHROMIUM``, else chromium / google-chrome on PATH)."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _chromium(args: Sequence[str], what: str, timeout: float) -> None:
    browser = find_chromium()
    if browser is None:
        raise RuntimeError(f"{what} needs a headless Chromium, which was not found: apt-get install chromium "
                           "(or set CHROMIUM to its path)")
    with tempfile.TemporaryDirectory(prefix="tandem-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed: {browser} exited with {out.returncode}: {out.stderr.strip()[-800:]}")


def write_pdf(html_path: str, pdf_path: str, timeout: float = 120) -> str:
    """Print ``html_path`` to ``pdf_path`` with headless Chromium (atomically); returns ``pdf_path``."""
    tmp = pdf_path + ".tmp.pdf"
    _chromium(["--no-pdf-header-footer", f"--print-to-pdf={tmp}", "file://" + os.path.abspath(html_path)],
              "printing the report to PDF", timeout)
    os.replace(tmp, pdf_path)
    return pdf_path


def screenshot(html_path: str, png_path: str, width: int = 1100, height: int = 1400, timeout: float = 120) -> str:
    """A PNG of the page as Chromium renders it (for checks, and the README's picture)."""
    _chromium([f"--window-size={width},{height}", "--hide-scrollbars", f"--screenshot={png_path}",
               "file://" + os.path.abspath(html_path)], "the report screenshot", timeout)
    return png_path
