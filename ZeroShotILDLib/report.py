"""The report: ``report.html``, self-contained, for people who will not open result.json; it prints on one
A4 or Letter page for one prompt (two with the pattern map) and is also written as ``report.pdf``
(``report_pdf``).

Every picture is embedded as a ``data:`` URI (PNG, base64), the style sheet is inline and the chart is
inline SVG, so the file opens offline in any browser, can be mailed or archived alone, and makes no
network request. It shows the key images (heatmap over the CT at the slices of the best patches, each
captioned with where a PACS viewer finds it: DICOM Instance Number and z in mm), the montage and its
probabilities, extent by zone in % and mL for every prompt on one chart scale, the pattern map as a
picture with its legend in the Slicer segment colours, the rule stated once in plain words, the model
and whether its scores mean anything, the settings (an interval series described as one), the notes and
the research-use notice.

The input is named by its file or folder name only; nothing from a DICOM header that names the patient
is read or shown (the Instance Number and Image Position of the key images are read, nothing else).
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
#: Zones in the order the extent table and chart show them (the keys of ``extent[prompt]["by_zone"]``).
ZONES = ("upper", "middle", "lower", "left", "right", "subpleural", "central")
#: Key images in the report: the slices of the best patches, at most this many distinct slices.
OVERLAY_SLICES = 3
#: Pattern map pictures: at most one slice per cranio-caudal third of the lungs.
PATTERN_SLICES = 3
#: Bar colours of the chart's prompts, in prompt order (colour-blind-safe Okabe-Ito hues).
SERIES_COLOURS = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#000000")

# Print: one A4 or Letter page (no @page size: the printer's paper decides; margins fit both). Headings
# stay with what follows them, and no figure, chart or table row is cut across pages.
_CSS = """
*{box-sizing:border-box}
body{font:13px/1.35 "DejaVu Sans",system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1b1f24;
 margin:0;background:#f3f4f6}
main{max-width:1120px;margin:0 auto;padding:14px 18px;background:#fff}
h1{font-size:20px;margin:0 0 2px}h2{font-size:13px;margin:10px 0 5px;border-bottom:1px solid #d0d4da;
 padding-bottom:2px;text-transform:uppercase;letter-spacing:.04em;color:#374151;break-after:avoid;
 page-break-after:avoid}
p{margin:3px 0}.sub{color:#4b5563;margin:0 0 6px}
.notice{background:#fff7e6;border:1px solid #f0b429;padding:4px 8px;margin:5px 0;border-radius:4px}
.warn{background:#fdecec;border:1px solid #d64545;padding:4px 8px;margin:5px 0;border-radius:4px;font-weight:600}
.flag{color:#b42318;font-weight:600}.ok{color:#1f7a3a;font-weight:600}
.row{display:flex;gap:14px;align-items:flex-start}.row>*{flex:1 1 0;min-width:0}
.keys{display:flex;gap:8px}.keys figure{flex:1 1 0;min-width:0}
figure{margin:0;break-inside:avoid;page-break-inside:avoid}
figure img{width:100%;height:auto;display:block;border:1px solid #d0d4da;background:#000}
figcaption{font-size:12px;color:#1b1f24;margin-top:2px;font-weight:600}
.explain{font-size:11.5px;color:#4b5563}
table{border-collapse:collapse;width:100%}td,th{padding:1px 5px;text-align:left;vertical-align:top;
 border-bottom:1px solid #eceef1}th{font-weight:600;color:#374151}tr{break-inside:avoid;page-break-inside:avoid}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.bar{height:9px;background:#e5e7eb;border-radius:2px;min-width:60px}
.bar span{display:block;height:9px;background:#3b6fb6;border-radius:2px}
.swatch{display:inline-block;width:11px;height:11px;border:1px solid #555;vertical-align:-1px;margin-right:4px}
.block{break-inside:avoid;page-break-inside:avoid}
ul.notes{margin:0;padding-left:16px;font-size:11.5px}ul.notes li{margin:0}
footer{margin-top:8px;font-size:11px;color:#6b7280}
svg{display:block}svg text{fill:#1b1f24}
@page{margin:8mm}
@media print{body{background:#fff;font-size:8.3pt;line-height:1.22}main{padding:0;max-width:none}
 h1{font-size:13pt}h2{font-size:8.6pt;margin:5px 0 3px}.notice,.warn{padding:2px 6px;margin:3px 0}
 figcaption{font-size:8.2pt}.explain,ul.notes{font-size:7.6pt}footer{font-size:7.4pt;margin-top:4px}}
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


def pattern_slices(labels: np.ndarray, lung_mask: np.ndarray, count: int = PATTERN_SLICES) -> list:
    """Up to ``count`` slices to show the pattern map on: the lungs' slices cut into ``count`` runs (thirds),
    and in each the slice with the most labelled voxels; runs without any label are left out."""
    per_slice = np.count_nonzero(np.asarray(labels).reshape(labels.shape[0], -1), axis=1)
    lung = np.flatnonzero(np.asarray(lung_mask).reshape(lung_mask.shape[0], -1).any(axis=1))
    if lung.size == 0 or not per_slice.any():
        return []
    chosen = []
    for run in np.array_split(lung, min(count, lung.size)):
        best = int(run[np.argmax(per_slice[run])])
        if per_slice[best] > 0:
            chosen.append(best)
    return chosen


def _key_images(scan: Scan, result: AnalysisResult, heat: np.ndarray, slices: Sequence[int], crop) -> str:
    from .figures import heat_range, key_image, slice_position

    scale = heat_range(heat, result.lung_mask, slices)
    parts = []
    for k, z in enumerate(slices):
        image = key_image(scan, result, heat, z, crop=crop, scale=scale)
        caption = slice_position(scan, z).caption() + (" (best patch)" if k == 0 else "")
        parts.append(f'<figure><img alt="heatmap, {escape(caption)}" src="{png_data_uri(image)}">'
                     f"<figcaption>{escape(caption)}</figcaption></figure>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# Chart and tables
# ----------------------------------------------------------------------------------------------
def _fraction(value) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _pct(value) -> str:
    v = _fraction(value)
    return "n/a" if v is None else f"{v * 100:.1f}%"


def _ml(value) -> str:
    v = _fraction(value)
    return "" if v is None else f"{v:.0f} mL" if v >= 10 else f"{v:.1f} mL"


def extent_chart_svg(series: Mapping[str, Mapping[str, float]], *, width: int = 340, height: int = 104,
                     colours: Optional[Mapping[str, str]] = None) -> str:
    """One inline SVG bar chart of extent (0-1) by zone for every prompt in ``series`` ({prompt: by_zone}),
    grouped by zone and drawn on one scale: the axis reaches the next 10 % above the largest bar of any
    prompt, so small extents stay readable and bars of different prompts compare by height."""
    names = list(series)
    zones = [z for z in ZONES if any(z in (series[n] or {}) for n in names)]
    zones += [z for n in names for z in (series[n] or {}) if z not in zones]
    left, right, top, bottom = 28, 4, 6, 16
    plot_w, plot_h = width - left - right, height - top - bottom
    values = {n: [_fraction((series[n] or {}).get(z)) for z in zones] for n in names}
    peak = max([v for vs in values.values() for v in vs if v is not None] + [0.0])
    top_pct = min(100, max(10, int(np.ceil(round(peak * 100, 6) / 10.0)) * 10))
    colours = dict(colours or {})
    for k, n in enumerate(names):
        colours.setdefault(n, SERIES_COLOURS[k % len(SERIES_COLOURS)])
    # Sized in px with the font on every text element: WeasyPrint's SVG renderer neither scales an inline
    # SVG to its column nor applies the page's CSS to SVG text.
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
             f'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="9" '
             f'viewBox="0 0 {width} {height}" aria-label="extent by zone, % of each zone\'s lung volume">']
    step = 10 if top_pct <= 50 else 20
    for k in range(0, top_pct + 1, step):
        y = top + plot_h * (1 - k / top_pct)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{left - 3}" y="{y + 3:.1f}" text-anchor="end">{k}%</text>')
    slot = plot_w / max(1, len(zones))
    bar_w = slot * 0.8 / max(1, len(names))
    for k, zone in enumerate(zones):
        label_x = left + (k + 0.5) * slot
        parts.append(f'<text x="{label_x:.1f}" y="{height - bottom + 12}" text-anchor="middle">{escape(zone)}</text>')
        for j, n in enumerate(names):
            value = values[n][k]
            x = left + k * slot + slot * 0.1 + j * bar_w
            if value is None:
                parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h - 3}" text-anchor="middle" '
                             f'font-size="7">n/a</text>')
                continue
            bar_h = plot_h * min(1.0, value * 100 / top_pct)
            parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - bar_h:.1f}" width="{bar_w:.1f}" height="{bar_h:.1f}" '
                         f'fill="{colours[n]}"><title>{escape(n)}, {escape(zone)}: {value * 100:.1f}%</title></rect>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#6b7280"/>')
    parts.append("</svg>")
    return "".join(parts)


def _probability_rows(values: Mapping[str, float]) -> str:
    rows = []
    for name, value in values.items():
        v = _fraction(value)
        shown = "n/a" if v is None else f"{v:.3f}"
        width = 0 if v is None else max(0.0, min(1.0, v)) * 100
        rows.append(f'<tr><td>{escape(str(name))}</td><td class="num">{shown}</td>'
                    f'<td style="width:28%"><div class="bar"><span style="width:{width:.1f}%"></span></div></td></tr>')
    return "".join(rows)


def zone_volumes_ml(result: AnalysisResult) -> dict:
    """{zone: lung mL} (the whole zone, scored or not) from result.zones, where it is known."""
    zones = result.zones or {}
    scored, share = zones.get("scored_lung_ml") or {}, zones.get("scored_share_by_zone") or {}
    out = {}
    for zone in ZONES:
        s, f = _fraction(scored.get(zone)), _fraction(share.get(zone))
        if s is not None and f:
            out[zone] = s / f
    return out


def _extent_section(result: AnalysisResult, extent: Mapping[str, Mapping]) -> tuple:
    """(the extent heading, words and table; the chart), drawn in the page's two columns."""
    names = list(extent)
    colours = {n: SERIES_COLOURS[k % len(SERIES_COLOURS)] for k, n in enumerate(names)}
    volumes = zone_volumes_ml(result)
    not_imaged = set()
    for entry in extent.values():
        not_imaged |= set((entry or {}).get("not_imaged") or [])
    head = "".join(f'<th class="num" colspan="2"><span class="swatch" style="background:{colours[n]}"></span>'
                   f"{escape(str(n))}</th>" for n in names)
    rows = [f'<tr><th>zone</th><th class="num">lung</th>{head}</tr>']

    def cells(entry, zone):
        entry = entry or {}
        if zone is None:
            value = entry.get("lung_fraction")
            sides = [_fraction((entry.get("positive_ml") or {}).get(k)) for k in ("left", "right")]
            # Left and right split the whole lung, so their positive mL add up to the lung's.
            ml = sum(sides) if None not in sides else (
                _fraction(value) * result.lung_volume_ml if _fraction(value) is not None else None)
        else:
            value, ml = (entry.get("by_zone") or {}).get(zone), (entry.get("positive_ml") or {}).get(zone)
        if zone in not_imaged:
            return '<td class="num" colspan="2">not imaged</td>'
        return f'<td class="num">{_pct(value)}</td><td class="num">{_ml(ml)}</td>'

    rows.append(f'<tr><td><b>whole lung</b></td><td class="num">{_ml(result.lung_volume_ml)}</td>'
                + "".join(cells(extent[n], None) for n in names) + "</tr>")
    for zone in ZONES:
        if not any(zone in ((extent[n] or {}).get("by_zone") or {}) for n in names):
            continue
        rows.append(f'<tr><td>{zone}</td><td class="num">{_ml(volumes.get(zone))}</td>'
                    + "".join(cells(extent[n], zone) for n in names) + "</tr>")
    words = []
    for n in names:
        entry = extent[n] or {}
        line = f"<b>{escape(str(n))}</b>: {_pct(entry.get('lung_fraction'))} of the lung"
        if entry.get("predominance"):
            line += f", {escape(str(entry['predominance']))}"
        if entry.get("calibrated") is False:
            line += ' <span class="flag">UNCALIBRATED</span>'
        words.append(line)
    parts = ['<div class="block"><h2>Extent by zone (% of the zone\'s lung, and mL)</h2>',
             f"<p>{'; '.join(words)}.</p>"]
    if not_imaged:
        parts.append(f'<p class="flag">Not imaged: {escape(", ".join(sorted(not_imaged)))} (the scan cuts the lungs '
                     "off there; no figure is given for it)</p>")
    elif any((e or {}).get("thirds_not_anatomical") for e in extent.values()):
        parts.append('<p class="flag">The lungs are cut off at both ends: upper/middle/lower split the imaged part '
                     "only</p>")
    parts.append(f"<table>{''.join(rows)}</table></div>")
    chart = extent_chart_svg({n: (extent[n] or {}).get("by_zone") or {} for n in names}, colours=colours)
    return "".join(parts), f'<figure class="chart">{chart}<figcaption>Extent by zone, % (the table\'s figures; ' \
        f'one scale for all prompts)</figcaption></figure>'


def rule_in_plain_words(result: AnalysisResult, extent: Mapping[str, Mapping]) -> str:
    """The extent rule once, for every prompt, in words a reader without the method paper follows (result.json
    keeps each prompt's full technical rule)."""
    s = result.settings
    patch = f"{s.patch_px} px" if s.patch_px else f"{s.patch_mm:g} mm"
    calibrated = [n for n, e in extent.items() if (e or {}).get("calibrated")]
    uncalibrated = [n for n, e in extent.items() if not (e or {}).get("calibrated")]
    text = (f"The lung is cut into {patch} boxes ({_slice_step_text(result)}); the model scores each box against the "
            f"finding's words and against \u201c{s.normal_prompt}\u201d. ")
    if calibrated:
        scans = sorted({str(((extent[n] or {}).get("reference") or {}).get("scans", "?")) for n in calibrated})
        text += (f"A box counts when its score is more than {s.extent_z:g} times the normal spread above what normal "
                 f"lungs score with this model (reference: {'/'.join(scans)} normal scans)")
        text += f" for {', '.join(calibrated)}. " if uncalibrated else ". "
    if uncalibrated:
        text += (f"UNCALIBRATED ({', '.join(uncalibrated)}): no normal scans were scored with this model, so a box "
                 f"counts when it is nearer the finding's words than \u201c{s.normal_prompt}\u201d; that figure "
                 "depends on the model. ")
    text += ("It must also be nearer the finding's words than their negation (e.g. \u201cno honeycombing\u201d): far "
             "from normal says diseased, this says with what. ")
    if s.extent_min_neighbours:
        text += f"A box also needs {s.extent_min_neighbours} of its 6 neighbours to count. "
    text += (f"Extent = lung volume in counted boxes / the zone's lung volume. Zones: thirds of each lung's height; "
             f"left, right; subpleural = within {s.subpleural_mm:g} mm of the pleura, central = the rest.")
    share = _fraction((result.zones or {}).get("scored_share"))
    if share is not None:
        text += f" {share * 100:.1f}% of the lung lies in a scored box."
    return text


def _patterns_section(scan: Scan, result: AnalysisResult, pattern_extent: Optional[Mapping], crop) -> str:
    """The pattern map: pictures (with the Slicer segment colours), its legend and each pattern's extent."""
    pm = result.patterns
    pattern_extent = dict(pattern_extent or {})
    names = list(pm.names) if pm is not None else list(pattern_extent)
    colours = {n: tuple(int(v) for v in c) for n, c in zip(pm.names, pm.colours)} if pm is not None else {}
    pictures = ""
    if pm is not None and len(result.patches) and len(pm.labels) == len(result.patches):
        from .figures import pattern_image, slice_position
        from .patterns import label_volume

        labels = label_volume(result)
        shown = sorted(pattern_slices(labels, result.lung_mask), key=lambda z: -slice_position(scan, z).z_mm)
        figures = []
        for z in shown:
            image = pattern_image(scan, labels, pm.colours, z, hu_window=result.settings.hu_window, crop=crop)
            caption = slice_position(scan, z).caption()
            figures.append(f'<figure><img alt="pattern map, {escape(caption)}" src="{png_data_uri(image)}">'
                           f"<figcaption>{escape(caption)}</figcaption></figure>")
        pictures = f'<div class="keys">{"".join(figures)}</div>' if figures else \
            '<p class="explain">No box was labelled with a pattern.</p>'
    rows = []
    for name in names:
        value = pattern_extent.get(name)
        fraction = value.get("lung_fraction") if isinstance(value, Mapping) else value
        ml = None
        if isinstance(value, Mapping) and _fraction(fraction) is not None:
            ml = _fraction(fraction) * result.lung_volume_ml
        colour = colours.get(name)
        swatch = (f'<span class="swatch" style="background:rgb{colour}"></span>' if colour else "")
        flag = ' <span class="flag">UNCALIBRATED</span>' if isinstance(value, Mapping) and \
            value.get("calibrated") is False else ""
        rows.append(f"<tr><td>{swatch}{escape(str(name))}{flag}</td><td class=\"num\">{_pct(fraction)}</td>"
                    f'<td class="num">{_ml(ml)}</td></tr>')
    legend = (f'<table style="width:auto;min-width:50%"><tr><th>pattern (colour as in Slicer)</th>'
              f'<th class="num">lung</th><th class="num"></th></tr>{"".join(rows)}</table>')
    return (f'<section class="pattern"><div class="block"><h2>Pattern map</h2>{pictures}{legend}'
            '<p class="explain">Each box takes the pattern it shows most (the extent rule above, per pattern); '
            "uncoloured lung shows none.</p></div></section>")


def _slices_text(scan: Scan) -> str:
    nz = scan.hu.shape[0]
    if scan.slice_positions_mm is not None and nz > 1:
        gaps = np.diff(np.asarray(scan.slice_positions_mm, dtype=float))
        return (f"interval series: {nz} slices acquired at their own positions, {gaps.min():.2f} to "
                f"{gaps.max():.2f} mm apart (no slice in between), spanning {scan.slice_positions_mm[-1]:.1f} mm")
    if nz == 1:
        return f"1 slice, {float(scan.spacing_mm[2]):.2f} mm thick"
    return f"{nz} slices, evenly {float(scan.spacing_mm[2]):.2f} mm apart"


def _slice_step_text(result: AnalysisResult) -> str:
    """Which slices carry boxes, as the analysis took them (a 1 mm step on a 10 mm series is every slice)."""
    from .geometry import slice_step_voxels

    k = slice_step_voxels(result.spacing_mm, result.settings.slice_step_mm)
    return "on every slice" if k == 1 else f"on one slice in {k} (a {result.settings.slice_step_mm:g} mm step)"


def _settings_rows(result: AnalysisResult, scan: Scan) -> str:
    s = result.settings
    patch = f"{s.patch_px} px" if s.patch_px else f"{s.patch_mm:g} mm"
    negatives = ", ".join(s.negative_for(i) for i in range(len(s.prompts)))
    nx, ny = int(result.shape_zyx[2]), int(result.shape_zyx[1])
    rows = [
        ("scan", f"{nx} \u00d7 {ny} pixels (x \u00d7 y, as everywhere here) of {float(result.spacing_mm[0]):.2f} "
                 f"\u00d7 {float(result.spacing_mm[1]):.2f} mm; {_slices_text(scan)}"),
        ("prompts", ", ".join(s.prompts) + f" (against: {negatives}); subtypes: {', '.join(s.subtypes) or 'none'}"),
        ("patches", f"{patch} boxes, stride {s.stride_fraction:g} of the side, {_slice_step_text(result)}; "
                    f"the montage's from boxes with at least {s.filter_threshold:g} lung"),
        ("montage", f"{s.montage_size} \u00d7 {s.montage_size}, {s.retrieval} retrieval, seed {s.seed}; scoring "
                    f"{s.scoring_mode}; HU window {s.hu_window[0]:g} to {s.hu_window[1]:g}"),
        ("lung", f"{result.lung_volume_ml:.0f} mL, {len(result.patches)} scored boxes"
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
    ``positive_ml``, ``predominance``, ``calibrated``) and ``pattern_extent`` the extent per pattern; both
    are drawn only when given. The pattern map's pictures come from ``result.patterns``.
    """
    from .figures import body_crop

    created = created or _dt.datetime.now(_dt.timezone.utc)
    name = input_name(result.source)
    if result.model_meaningful:
        model_line = '<span class="ok">scores are meaningful for this scan</span>'
        banner = ""
    else:
        reason = result.model_warning or "the model's scores are not meaningful for this scan"
        model_line = '<span class="flag">scores NOT meaningful for this scan</span> (see the warning above)'
        banner = (f'<div class="warn">The scores below are NOT meaningful: {escape(reason)}. This report shows what '
                  "the tool computes, not a finding.</div>")
    keys = best_slices(result, OVERLAY_SLICES) if len(result.ranked) else []
    crop = body_crop(scan, keys or [scan.hu.shape[0] // 2], result.lung_mask)
    key_html = _key_images(scan, result, heat, keys, crop) if keys else "<p>No patch was scored.</p>"
    probabilities = ("<table><tr><th>finding (montage)</th><th class=\"num\">p</th><th></th></tr>"
                     + _probability_rows(result.finding_probabilities))
    if result.subtype_probabilities:
        probabilities += ("<tr><th>subtype</th><th class=\"num\">p</th><th></th></tr>"
                          + _probability_rows(result.subtype_probabilities))
    probabilities += "</table>"
    # The model warning is the banner at the top; the notes list does not repeat it.
    notes = "".join(f"<li>{escape(str(n))}</li>" for n in result.notes
                    if result.model_meaningful or str(n) != result.model_warning) or "<li>none</li>"
    files = ""
    if output_files:
        files = f"<p class=\"explain\">Files in this folder: {escape(', '.join(output_files))}</p>"
    checkpoint = f" ({escape(Path(result.settings.checkpoint).name)})" if result.settings.checkpoint else ""
    extent_html = rule_html = chart_html = ""
    if extent:
        extent_html, chart_html = _extent_section(result, extent)
        rule_html = (f'<div class="block"><h2>How extent is measured</h2><p class="explain">'
                     f"{escape(rule_in_plain_words(result, extent))}</p></div>")
    # One prompt: its table fits beside the probabilities. Several: two columns each would be cut at half a
    # page, so the table takes the page's width below, and the chart and the rule sit beside the probabilities.
    beside, below = f"{extent_html}{rule_html}", ""
    if extent and len(extent) > 1:
        beside, below, chart_html = f"{chart_html}{rule_html}", extent_html, ""
    patterns_html = ""
    if result.patterns is not None or pattern_extent:
        patterns_html = _patterns_section(scan, result, pattern_extent, crop)
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
<p class="sub">Input <b>{escape(name)}</b> &middot; model <b>{escape(result.model_name)}</b>{checkpoint} &middot;
primary prompt <b>{escape(result.primary_prompt)}</b> &middot; {escape(created.strftime("%Y-%m-%d %H:%M UTC"))}</p>
<div class="notice"><b>{escape(RESEARCH_TITLE)}</b>{escape(RESEARCH_NOTICE[len(RESEARCH_TITLE):])}</div>
{banner}
<div class="block">
<h2>Key images: {escape(result.primary_prompt)}</h2>
<div class="keys">{key_html}</div>
<p class="explain">Colour: the probability of \u201c{escape(result.primary_prompt)}\u201d per box, over the lungs
(scale at the right of each image, the same for all three); cyan boxes: the top patches, numbered by rank;
letters: the patient's sides. Image number and z as a DICOM viewer shows them (z: the patient's head-foot axis).</p>
</div>
<div class="row">
<section class="block">
<h2>Probabilities (montage)</h2>
{probabilities}
<div class="row" style="margin-top:4px;gap:8px">
<figure style="flex:0 0 90px"><img alt="montage of the top patches" src="{png_data_uri(result.montage)}">
<figcaption>montage, {result.settings.montage_size} \u00d7 {result.settings.montage_size} patches</figcaption></figure>
<p><b>Model</b> {escape(result.model_name)}{checkpoint}: {model_line}</p>
</div>
{chart_html}
</section>
<section>{beside}</section>
</div>
{below}
<div class="block">
<h2>Scan and settings</h2>
<table>{_settings_rows(result, scan)}</table>
</div>
<div>
<h2>Notes</h2>
<ul class="notes">{notes}</ul>
{files}
</div>
{patterns_html}
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
