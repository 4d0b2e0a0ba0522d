"""The one-page report: ``report.html``, self-contained, for people who will not open result.json.

Every picture is embedded as a ``data:`` URI (PNG, base64), the style sheet is inline and charts are
inline SVG, so the file opens offline in any browser, can be mailed or archived alone, and makes no
network request. It shows the montage, the heatmap overlay at the slices of the best patches, the
probabilities, extent by zone (when the result carries it), the model and whether its scores mean
anything, the settings, the notes and the research-use notice.

The input is named by its file or folder name only; nothing from a DICOM header (patient name, ID)
is read or shown. No PDF: the page prints to one A4/Letter page from any browser (print CSS below),
and a PDF library (WeasyPrint and its system libraries) would be a heavy dependency for that.
"""
from __future__ import annotations

import base64
import datetime as _dt
import io
from html import escape
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from . import __version__
from .results import AnalysisResult
from .scan import Scan

REPORT_NAME = "report.html"
RESEARCH_TITLE = "Research software, not a diagnostic device"
RESEARCH_NOTICE = (f"{RESEARCH_TITLE}: not for clinical decisions. Zero-shot scores of a vision-language model are "
                   "not calibrated probabilities of disease.")
#: Zones in the order the extent chart shows them (the keys of ``extent[prompt]["by_zone"]``).
ZONES = ("upper", "middle", "lower", "left", "right", "subpleural", "central")
#: Overlays in the report: the slices of the best patches, at most this many distinct slices.
OVERLAY_SLICES = 3

_CSS = """
*{box-sizing:border-box}
body{font:13px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1b1f24;
 margin:0;background:#f3f4f6}
main{max-width:1180px;margin:0 auto;padding:14px 18px;background:#fff}
h1{font-size:20px;margin:0 0 2px}h2{font-size:14px;margin:10px 0 6px;border-bottom:1px solid #d0d4da;
 padding-bottom:2px;text-transform:uppercase;letter-spacing:.04em;color:#374151}
.sub{color:#4b5563;margin:0 0 8px}
.notice{background:#fff7e6;border:1px solid #f0b429;padding:6px 10px;margin:6px 0;border-radius:4px}
.warn{background:#fdecec;border:1px solid #d64545;padding:6px 10px;margin:6px 0;border-radius:4px;font-weight:600}
.ok{color:#1f7a3a;font-weight:600}
.grid{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:14px}
.overlays{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:8px}
figure{margin:0}figure img{width:100%;height:auto;display:block;border:1px solid #d0d4da;background:#000}
figcaption{font-size:11px;color:#4b5563;margin-top:2px}
table{border-collapse:collapse;width:100%}td,th{padding:2px 6px;text-align:left;vertical-align:top;
 border-bottom:1px solid #eceef1}th{font-weight:600;color:#374151}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.bar{height:10px;background:#e5e7eb;border-radius:2px;min-width:80px}
.bar span{display:block;height:10px;background:#3b6fb6;border-radius:2px}
ul.notes{margin:0;padding-left:18px}ul.notes li{margin:1px 0}
footer{margin-top:10px;font-size:11px;color:#6b7280}
svg text{font:11px system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;fill:#1b1f24}
@media print{body{background:#fff}main{padding:0;max-width:none}@page{size:A4;margin:10mm}
 .grid{gap:8px}h2{margin:6px 0 4px}}
"""


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------
def png_data_uri(image) -> str:
    """A PIL image or uint8 array as a ``data:image/png;base64,...`` URI."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    # zlib level 3: on a 512x512 overlay 0.016 s and 206 kB, against 0.28 s and 187 kB with
    # optimize=True, which made the report ~1 s of a 1 mm scan's analysis.
    image.save(buffer, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def best_slices(result: AnalysisResult, count: int = OVERLAY_SLICES) -> list:
    """The slices of the best-ranked patches, best first, each slice once."""
    seen: list = []
    for i in result.ranked:
        z = int(result.patches.slice_index[int(i)])
        if z not in seen:
            seen.append(z)
            if len(seen) == count:
                break
    return seen


def _overlays(scan: Scan, result: AnalysisResult, heat: np.ndarray, count: int) -> list:
    from .figures import overlay_figure

    out = []
    for z in best_slices(result, count):
        image = overlay_figure(scan, result, heat, slice_index=z)
        if max(image.size) > 640:  # keeps the report small; the full-size overlay is overlay.png
            scale = 640 / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)))
        out.append((z, png_data_uri(image)))
    return out


# ----------------------------------------------------------------------------------------------
# Charts and tables
# ----------------------------------------------------------------------------------------------
def extent_chart_svg(by_zone: Mapping[str, float], *, title: str = "", width: int = 520, height: int = 170) -> str:
    """An inline SVG bar chart of extent (0-1) by zone, in percent of that zone's lung volume."""
    zones = [z for z in ZONES if z in by_zone] + [z for z in by_zone if z not in ZONES]
    left, right, top, bottom = 34, 8, 18 if title else 8, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [_fraction(by_zone[z]) for z in zones]
    peak = max([v for v in values if v is not None] + [0.0])
    # The axis reaches the next 10 % above the largest bar: small extents stay readable.
    top_pct = min(100, max(10, int(np.ceil(peak * 100 / 10.0)) * 10))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" aria-label="{escape(title or "extent by zone")}">']
    if title:
        parts.append(f'<text x="{left}" y="12" font-weight="600">{escape(title)}</text>')
    for k in range(0, top_pct + 1, max(10, top_pct // 5 // 10 * 10 or 10)):
        y = top + plot_h * (1 - k / top_pct)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{k}%</text>')
    slot = plot_w / max(1, len(zones))
    colours = {"upper": "#6d8fc7", "middle": "#3b6fb6", "lower": "#1d4e89", "left": "#8a6fb6", "right": "#5b3f8c",
               "subpleural": "#c0773b", "central": "#8c5323"}
    for k, (zone, value) in enumerate(zip(zones, values)):
        x = left + k * slot + slot * 0.15
        bar_w = slot * 0.7
        label_x = left + (k + 0.5) * slot
        parts.append(f'<text x="{label_x:.1f}" y="{height - bottom + 14}" text-anchor="middle">{escape(zone)}</text>')
        if value is None:
            parts.append(f'<text x="{label_x:.1f}" y="{top + plot_h - 4}" text-anchor="middle">n/a</text>')
            continue
        bar_h = plot_h * min(1.0, value * 100 / top_pct)
        parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - bar_h:.1f}" width="{bar_w:.1f}" height="{bar_h:.1f}" '
                     f'fill="{colours.get(zone, "#3b6fb6")}"><title>{escape(zone)}: {value * 100:.1f}%</title></rect>'
                     f'<text x="{label_x:.1f}" y="{top + plot_h - bar_h - 3:.1f}" text-anchor="middle">'
                     f'{value * 100:.0f}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#6b7280"/>')
    parts.append("</svg>")
    return "".join(parts)


def _fraction(value) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _pct(value) -> str:
    v = _fraction(value)
    return "n/a" if v is None else f"{v * 100:.1f}%"


def _probability_rows(values: Mapping[str, float]) -> str:
    rows = []
    for name, value in values.items():
        v = _fraction(value)
        shown = "n/a" if v is None else f"{v:.3f}"
        width = 0 if v is None else max(0.0, min(1.0, v)) * 100
        rows.append(f'<tr><td>{escape(str(name))}</td><td class="num">{shown}</td>'
                    f'<td style="width:40%"><div class="bar"><span style="width:{width:.1f}%"></span></div></td></tr>')
    return "".join(rows)


def _extent_section(extent: Mapping[str, Mapping]) -> str:
    parts = ["<h2>Extent by zone</h2>"]
    for prompt, entry in extent.items():
        entry = entry or {}
        by_zone = entry.get("by_zone") or {}
        lead = f"<b>{escape(str(prompt))}</b>: {_pct(entry.get('lung_fraction'))} of the lung"
        if entry.get("predominance"):
            lead += f"; <b>{escape(str(entry['predominance']))}</b>"
        if entry.get("calibrated") is False:
            lead += ' <span class="warn">UNCALIBRATED: no normal-lung reference for this model and prompt</span>'
        parts.append(f"<p>{lead}</p>")
        if entry.get("not_imaged"):
            parts.append(f'<p class="warn">Not imaged: {escape(", ".join(entry["not_imaged"]))} zone(s) '
                         "(the lungs are cut off by the scan)</p>")
        elif entry.get("thirds_not_anatomical"):
            parts.append('<p class="warn">The lungs are cut off at both ends: upper/middle/lower split the '
                         "imaged part only</p>")
        if by_zone:
            parts.append(extent_chart_svg(by_zone, title=f"{prompt}: % of each zone's lung volume"))
        if entry.get("rule"):
            parts.append(f'<p class="sub">Rule: {escape(str(entry["rule"]))}</p>')
    return "".join(parts)


def _patterns_section(patterns: Mapping) -> str:
    """Extent per pattern: ``{name: fraction}`` or ``{name: {"lung_fraction": f, ...}}``."""
    rows = []
    for name, value in patterns.items():
        fraction = value.get("lung_fraction") if isinstance(value, Mapping) else value
        rows.append((str(name), fraction))
    body = "".join(
        f'<tr><td>{escape(n)}</td><td class="num">{_pct(f)}</td><td style="width:40%"><div class="bar">'
        f'<span style="width:{max(0.0, min(1.0, _fraction(f) or 0.0)) * 100:.1f}%"></span></div></td></tr>'
        for n, f in rows)
    return f"<h2>Pattern map</h2><table><tr><th>pattern</th><th class=\"num\">lung</th><th></th></tr>{body}</table>"


def _settings_rows(result: AnalysisResult) -> str:
    s = result.settings
    patch = f"{s.patch_px} px" if s.patch_px else f"{s.patch_mm:g} mm"
    negatives = ", ".join(s.negative_for(i) for i in range(len(s.prompts)))
    spacing = " x ".join(f"{float(v):.2f}" for v in result.spacing_mm)
    shape = " x ".join(str(int(v)) for v in result.shape_zyx)
    rows = [
        ("prompts", ", ".join(s.prompts)), ("negative prompts", negatives), ("subtypes", ", ".join(s.subtypes)),
        ("patches", f"{patch}, stride {s.stride_fraction:g} of the side, every {s.slice_step_mm:g} mm, "
                    f"at least {s.filter_threshold:g} lung"),
        ("montage", f"{s.montage_size}x{s.montage_size}, {s.retrieval} retrieval, seed {s.seed}"),
        ("HU window", f"{s.hu_window[0]:g} to {s.hu_window[1]:g}"), ("scoring", s.scoring_mode),
        ("scan", f"{shape} voxels (z, y, x), spacing {spacing} mm (x, y, z)"),
        ("lung", f"{result.lung_volume_ml:.0f} mL, {len(result.patches)} candidate patches"
                 + (f", {result.encoded_exactly} encoded exactly" if result.encoded_exactly is not None else "")),
    ]
    return "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)


def input_name(source: str) -> str:
    """The file or folder name the user gave, without the folders above it."""
    text = str(source or "").rstrip("/\\")
    return text.replace("\\", "/").rsplit("/", 1)[-1] or "scan"


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------
def report_html(result: AnalysisResult, scan: Scan, heat: np.ndarray, *, extent: Optional[Mapping] = None,
                pattern_extent: Optional[Mapping] = None, output_files: Sequence[str] = (),
                created: Optional[_dt.datetime] = None) -> str:
    """The report as one HTML string.

    ``heat`` is the primary prompt's heatmap on the scan's grid (as painted for heatmap.nii.gz).
    ``extent`` is result.json's ``extent`` object (per prompt: ``lung_fraction``, ``by_zone``,
    ``predominance``, ``rule``) and ``pattern_extent`` the share of the lung per pattern; both are
    drawn only when given.
    """
    created = created or _dt.datetime.now(_dt.timezone.utc)
    name = input_name(result.source)
    if result.model_meaningful:
        model_line = '<span class="ok">scores are meaningful for this scan</span>'
        banner = ""
    else:
        reason = result.model_warning or "the model's scores are not meaningful for this scan"
        model_line = f"<b>not meaningful</b>: {escape(reason)}"
        banner = (f'<div class="warn">The scores below are NOT meaningful: {escape(reason)}. This report shows what '
                  "the tool computes, not a finding.</div>")
    overlays = "".join(
        f'<figure><img alt="heatmap overlay, slice {z}" src="{uri}"><figcaption>slice {z}'
        f'{" (best patch)" if k == 0 else ""}</figcaption></figure>'
        for k, (z, uri) in enumerate(_overlays(scan, result, heat, OVERLAY_SLICES)))
    montage = png_data_uri(result.montage)
    # One table, so the columns of findings and subtypes line up.
    probabilities = "<table><tr><th>finding (montage)</th><th class=\"num\">p</th><th></th></tr>" + \
        _probability_rows(result.finding_probabilities)
    if result.subtype_probabilities:
        probabilities += "<tr><th>subtype</th><th class=\"num\">p</th><th></th></tr>" + \
            _probability_rows(result.subtype_probabilities)
    probabilities += "</table>"
    notes = "".join(f"<li>{escape(str(n))}</li>" for n in result.notes) or "<li>none</li>"
    files = ""
    if output_files:
        files = f"<p class=\"sub\">Files in this folder: {escape(', '.join(output_files))}</p>"
    right = [f"<h2>Probabilities</h2>{probabilities}"]
    if extent:
        right.append(_extent_section(extent))
    if pattern_extent:
        right.append(_patterns_section(pattern_extent))
    right.append(f"<h2>Model</h2><p><b>{escape(result.model_name)}</b>"
                 f"{' (' + escape(Path(result.settings.checkpoint).name) + ')' if result.settings.checkpoint else ''}"
                 f": {model_line}</p>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ZeroShotILD report: {escape(name)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>ZeroShotILD report</h1>
<p class="sub">Input <b>{escape(name)}</b> &middot; model <b>{escape(result.model_name)}</b> &middot;
primary prompt <b>{escape(result.primary_prompt)}</b> &middot; {escape(created.strftime("%Y-%m-%d %H:%M UTC"))}</p>
<div class="notice"><b>{escape(RESEARCH_TITLE)}</b>{escape(RESEARCH_NOTICE[len(RESEARCH_TITLE):])}</div>
{banner}
<div class="grid">
<section>
<h2>Heatmap at the best slices</h2>
<div class="overlays">{overlays}</div>
<h2>Montage ({result.settings.montage_size}x{result.settings.montage_size} patches)</h2>
<figure><img alt="montage of the top patches" src="{montage}" style="max-width:360px"></figure>
</section>
<section>
{''.join(right)}
<h2>Settings</h2>
<table>{_settings_rows(result)}</table>
</section>
</div>
<h2>Notes</h2>
<ul class="notes">{notes}</ul>
{files}
<footer>zeroshot-ild {escape(__version__)} &middot; {escape(RESEARCH_NOTICE)}</footer>
</main>
</body>
</html>
"""


def write_report(result: AnalysisResult, scan: Scan, path, heat: np.ndarray, **kwargs) -> Path:
    """Write :func:`report_html` to ``path`` (UTF-8). The caller stages and renames (see ``outputs``)."""
    path = Path(path)
    path.write_text(report_html(result, scan, heat, **kwargs), encoding="utf-8")
    return path


def embedded_images(html_text: str) -> Iterable[str]:
    """Every ``src`` of an ``<img>`` in ``html_text`` (for checks: all must be ``data:`` URIs)."""
    from html.parser import HTMLParser

    found: list = []

    class _Images(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                found.append(dict(attrs).get("src") or "")

    _Images().feed(html_text)
    return found
