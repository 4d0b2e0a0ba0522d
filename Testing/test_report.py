"""report.html / report.pdf (issues 14 and 21): one self-contained page a radiologist can read on screen and
on paper, with key images a PACS user can find.

Checked here: the HTML parses with every tag closed, nothing in it points outside the file (every <img>
is a data: URI holding a valid PNG), user text is escaped, the input is named by its file name only;
key images are captioned with the DICOM Instance Number and z (mm) of their source image, or slice
index and z for other input, are cropped to the body, carry the patient's sides from the scan geometry
and a colour scale; extent is given per zone in % and mL, every prompt on one chart scale, the rule once
in plain words; the pattern map is a picture with its legend in the Slicer colours; an interval series
is described as one. Printing: headless Chromium (network blocked) prints the page to PDF, and the PDF
is read back with pypdf: one page for one prompt (two with the pattern map), the text present, every
image decoded; report.pdf (WeasyPrint) likewise. The command line prints the not-meaningful warning
before the probabilities.
"""
from __future__ import annotations

import base64
import copy
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import tiny_settings
from ZeroShotILDLib import outputs
from ZeroShotILDLib.figures import SCALE_WIDTH, body_crop, edge_labels, key_image, slice_position
from ZeroShotILDLib.heatmap import paint_heatmap
from ZeroShotILDLib.patches import slice_step_voxels
from ZeroShotILDLib.patterns import colour_table_text
from ZeroShotILDLib.report import ZONES, best_slices, embedded_images, extent_chart_svg, report_html
from ZeroShotILDLib.report_pdf import PDF_NAME, pdf_engine_problem
from ZeroShotILDLib.scan import place_slices, read_scan

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
#: Hand-made extent in the shape the extent step writes into result.json.
EXTENT = {"interstitial lung disease": {
    "lung_fraction": 0.23, "predominance": "limited, lower, subpleural", "calibrated": True,
    "rule": "A box of lung counts as 'x' when its similarity ... robust standard deviations (jargon)",
    "reference": {"scans": 12},
    "by_zone": {"upper": 0.05, "middle": 0.2, "lower": 0.44, "left": 0.25, "right": 0.21, "subpleural": 0.35,
                "central": 0.1},
    "positive_ml": {"upper": 40.0, "middle": 160.0, "lower": 352.0, "left": 300.0, "right": 252.0,
                    "subpleural": 420.0, "central": 132.0}}}
#: A second prompt with a larger peak: the chart's one scale is set by it.
SECOND = {"honeycombing": {"lung_fraction": 0.3, "predominance": "limited, lower", "calibrated": False,
                           "rule": "jargon", "by_zone": {z: 0.6 if z == "lower" else 0.1 for z in ZONES}}}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
PDF_PROBLEM = pdf_engine_problem()


class StrictPage(HTMLParser):
    """Collects tags and flags unbalanced ones, and every URL-bearing attribute."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.urls, self.tags, self.text, self.alts = [], [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "poster", "data", "xlink:href"):
                self.urls.append((tag, name, value or ""))
        if tag == "img":
            self.alts.append(dict(attrs).get("alt") or "")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(html_text: str) -> StrictPage:
    page = StrictPage()
    page.feed(html_text)
    page.close()
    assert not page.errors, page.errors
    assert not page.stack, f"unclosed tags: {page.stack}"
    return page


def words_of(html_text: str) -> str:
    return " ".join(" ".join(parse(html_text).text).split())


def decode_png(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,"), uri[:40]
    raw = base64.b64decode(uri.split(",", 1)[1], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(raw)).verify()
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


@pytest.fixture(scope="module")
def analysed(small_scan, tiny_model):
    from ZeroShotILDLib.pipeline import Analyzer

    result = Analyzer(tiny_settings(patch_mm=20.0), model=tiny_model).analyze(small_scan)
    return small_scan, result


def heat_of(scan, result):
    slab = slice_step_voxels(scan.spacing_mm, result.settings.slice_step_mm)
    return paint_heatmap(result.patches, result.patch_probabilities[result.primary_prompt], scan.hu.shape,
                         slab_voxels=slab, lung_mask=result.lung_mask)


def write_ct_series(folder, scan, first_instance=40):
    """``scan`` as a CT series whose Instance Numbers start at ``first_instance`` (a PACS number, not an index)."""
    folder.mkdir(parents=True)
    d = np.asarray(scan.direction).reshape(3, 3)
    orientation = "\\".join(f"{v:.6f}" for v in list(d[:, 0]) + list(d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(scan.hu.shape[0]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(scan.hu[k], dtype=np.int16))
        image.SetSpacing(tuple(float(v) for v in scan.spacing_mm[:2]))
        position = np.asarray(scan.origin_mm) + d[:, 2] * k * scan.spacing_mm[2]
        for key, value in {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                           "0020|000d": "1.2.826.0.1.3680043.8.498.4001", "0020|000e": "1.2.826.0.1.3680043.8.498.4002",
                           "0020|0052": "1.2.826.0.1.3680043.8.498.4003",
                           "0008|0018": f"1.2.826.0.1.3680043.8.498.4002.{k + 1}",
                           "0020|0013": str(first_instance + k), "0010|0010": "Reportpatient^Jane",
                           "0020|0032": "\\".join(f"{v:.4f}" for v in position), "0020|0037": orientation,
                           "0028|1052": "-1024", "0028|1053": "1"}.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{k:04d}.dcm"))
        writer.Execute(image)


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------
def test_analyze_writes_a_self_contained_report(analysed, tmp_path):
    scan, result = analysed
    out = outputs.write_outputs(result, scan, tmp_path / "res")
    assert (out / "report.html").is_file()
    manifest = json.loads((out / outputs.MANIFEST_NAME).read_text(encoding="utf-8"))
    assert "report.html" in manifest["files"]
    text = (out / "report.html").read_text(encoding="utf-8")
    page = parse(text)
    assert page.tags[:3] == ["html", "head", "meta"]
    # Nothing points outside the file: the only URLs are embedded images.
    assert page.urls and all(tag == "img" and name == "src" and value.startswith("data:image/png;base64,")
                             for tag, name, value in page.urls), page.urls
    assert "url(" not in text and "<script" not in text and "@import" not in text
    images = [decode_png(uri) for uri in embedded_images(text)]
    keys = [im for im, alt in zip(images, page.alts) if alt.startswith("heatmap")]
    assert len(keys) == len(best_slices(result))
    montage = [im for im, alt in zip(images, page.alts) if alt.startswith("montage")]
    np.testing.assert_array_equal(np.asarray(montage[0]), result.montage)
    for image in keys:
        rgb = np.asarray(image.convert("RGB")).astype(int)
        assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 30).any(), "a key image without heat colours"
    words = " ".join(page.text)
    for prompt, p in result.finding_probabilities.items():
        assert prompt in words and f"{p:.3f}" in words
    for subtype, p in result.subtype_probabilities.items():
        assert subtype in words and f"{p:.3f}" in words
    assert "Research software, not a diagnostic device" in words
    assert "NOT meaningful" in words and result.model_warning in words  # tiny-random has random weights
    assert words.count(result.model_warning) == 1  # in the banner, not repeated in the notes
    assert result.extent and "Extent by zone" in words and "<svg" in text
    if not PDF_PROBLEM:  # report.pdf beside it, named in the page's file list and the manifest
        assert (out / PDF_NAME).read_bytes()[:5] == b"%PDF-" and PDF_NAME in manifest["files"]
        assert PDF_NAME in words
    else:
        assert any(n.startswith(f"{PDF_NAME} not written") for n in result.notes)


def test_key_images_are_the_best_slices_in_rank_order(analysed):
    scan, result = analysed
    slices = best_slices(result, 3)
    ranked_slices = [int(result.patches.slice_index[i]) for i in result.ranked]
    assert slices[0] == ranked_slices[0]
    assert slices == sorted(set(ranked_slices), key=ranked_slices.index)[:3]


def test_key_image_captions_name_slice_index_and_z_for_other_input(analysed):
    scan, result = analysed
    words = words_of(report_html(result, scan, heat_of(scan, result)))
    for z in best_slices(result):
        s_mm = float(scan.index_to_ras(np.array([[z, (scan.hu.shape[1] - 1) / 2, (scan.hu.shape[2] - 1) / 2]]))[0, 2])
        assert f"slice {z + 1} of {scan.hu.shape[0]}, z = {s_mm:.1f} mm" in words
    assert "image " not in words.split("Key images")[1].split("Probabilities")[0]  # no DICOM number invented


def test_key_image_captions_give_the_dicom_instance_number_and_z(tmp_path, small_scan, tiny_model):
    from ZeroShotILDLib.pipeline import Analyzer

    write_ct_series(tmp_path / "series", small_scan, first_instance=40)
    scan = read_scan(tmp_path / "series")
    result = Analyzer(tiny_settings(patch_mm=20.0), model=tiny_model).analyze(scan)
    text = report_html(result, scan, heat_of(scan, result))
    words = words_of(text)
    pydicom = pytest.importorskip("pydicom")  # the [dicom] extra (pydicom 3 needs Python 3.10+)

    for z in best_slices(result):
        source = pydicom.dcmread(scan.dicom_files[z], stop_before_pixels=True)
        caption = f"image {int(source.InstanceNumber)}, z = {float(source.ImagePositionPatient[2]):.1f} mm"
        assert caption in words and slice_position(scan, z).instance == 40 + z
    assert "Reportpatient" not in text


def test_patient_sides_come_from_the_geometry():
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)  # LPS: columns run to the patient's left, rows to posterior
    assert edge_labels(identity) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    flipped = (-1, 0, 0, 0, -1, 0, 0, 0, 1)  # stored rotated by 180 degrees
    assert edge_labels(flipped) == {"left": "L", "right": "R", "top": "P", "bottom": "A"}


def test_key_image_is_cropped_to_the_body_with_a_colour_scale(analysed):
    scan, result = analysed
    heat = heat_of(scan, result)
    z = best_slices(result)[0]
    r0, r1, c0, c1 = body_crop(scan, [z], result.lung_mask)
    body = scan.hu[z] > -500
    assert body[r0:r1, c0:c1].sum() >= 0.97 * body.sum()  # the body is inside (the table may not be)
    assert (r1 - r0) * (c1 - c0) < 0.9 * body.size  # and the air around it is not
    image = np.asarray(key_image(scan, result, heat, z, scale=(0.2, 0.8)).convert("RGB")).astype(int)
    # The colour scale at the right: a ramp from bright yellow (high) at the top to near black (low) below.
    column = image[:, image.shape[1] - SCALE_WIDTH + 14]
    lit = np.flatnonzero(column.sum(axis=1) > 0)
    top, bottom = column[lit[0] + 2], column[lit[-1] - 2]
    assert top.sum() > 500 and bottom.sum() < 150 and top[0] > top[2]


def test_extent_by_zone_in_percent_and_ml_with_the_rule_once_in_plain_words(analysed):
    scan, result = analysed
    text = report_html(result, scan, heat_of(scan, result), extent=EXTENT)
    words = words_of(text)
    assert "23.0% of the lung" in words and "limited, lower, subpleural" in words
    for zone in ZONES:
        pct = EXTENT["interstitial lung disease"]["by_zone"][zone] * 100
        ml = EXTENT["interstitial lung disease"]["positive_ml"][zone]
        assert re.search(rf"{zone} (\d+ mL )?{pct:.1f}% {ml:.0f} mL", words), zone
    assert "whole lung" in words and "552 mL" in words  # left + right positive mL
    assert words.count("How extent is measured") == 1
    assert "robust standard deviations" not in words and "(jargon)" not in words
    assert "12 normal scans" in words and "subpleural = within 10 mm of the pleura" in words
    assert text.count("<svg") == 1
    bars = [float(h) for h in re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="[\d.]+" height="([\d.]+)"', text)]
    fractions = [EXTENT["interstitial lung disease"]["by_zone"][z] for z in ZONES]
    np.testing.assert_allclose(np.array(bars) / max(bars), np.array(fractions) / max(fractions), atol=0.01)


def test_every_prompt_on_one_chart_scale_and_uncalibrated_named_once(analysed):
    scan, result = analysed
    text = report_html(result, scan, heat_of(scan, result), extent={**EXTENT, **SECOND})
    words = words_of(text)
    assert text.count("<svg") == 1 and words.count("How extent is measured") == 1
    assert "UNCALIBRATED (honeycombing)" in words
    heights = {t: float(h) for h, t in re.findall(r'height="([\d.]+)" fill="[^"]+"><title>([^<]+)</title>', text)}
    low = heights["interstitial lung disease, lower: 44.0%"]
    high = heights["honeycombing, lower: 60.0%"]
    assert high / low == pytest.approx(60 / 44, rel=0.01)  # one scale: heights compare across prompts


def test_chart_marks_missing_zones_and_keeps_small_extents_visible():
    svg = extent_chart_svg({"a": {"upper": 0.01, "middle": 0.02, "lower": None, "left": float("nan")}})
    parse(svg)
    assert svg.count("n/a") == 2
    heights = [float(h) for h in re.findall(r'height="([\d.]+)" fill', svg)]
    assert len(heights) == 2 and heights[1] == pytest.approx(2 * heights[0])
    assert max(heights) > 15  # the axis reaches 10 %, so 2 % is a fifth of the plot


def test_pattern_map_picture_with_its_legend_in_the_slicer_colours(tmp_path, small_scan, tiny_model):
    from conftest import self_referenced
    from ZeroShotILDLib.pipeline import Analyzer

    with self_referenced():
        result = Analyzer(tiny_settings(patch_mm=20.0, extent_z=0.5, extent_min_neighbours=0,
                                        patterns=["honeycombing", "emphysema"]), model=tiny_model).analyze(small_scan)
    pm = result.patterns
    assert pm is not None and (pm.labels > 0).any()
    text = report_html(result, small_scan, heat_of(small_scan, result),
                       pattern_extent={n: pm.extent[n] for n in pm.names})
    page = parse(text)
    ctbl = colour_table_text(pm.names, pm.colours).splitlines()[3:]
    for line, name in zip(ctbl, pm.names):
        r, g, b = (int(v) for v in line.split()[2:5])
        assert f"background:rgb({r}, {g}, {b})" in text and name in " ".join(page.text)
    pictures = [decode_png(uri).convert("RGB") for uri, alt in zip(embedded_images(text), page.alts)
                if alt.startswith("pattern map")]
    assert pictures
    shown = np.concatenate([np.asarray(p).reshape(-1, 3) for p in pictures]).astype(int)
    gray = np.abs(shown[:, 0] - shown[:, 1]) + np.abs(shown[:, 1] - shown[:, 2]) > 40
    assert gray.sum() > 50, "no pattern colour in the pattern map pictures"


def test_interval_series_settings_say_so_with_their_gaps(analysed):
    scan, result = analysed
    nz = scan.hu.shape[0]
    positions = np.cumsum([0.0] + [1.0 if k % 2 == 0 else 9.0 for k in range(nz - 1)])
    interval = place_slices(copy.copy(scan), positions)
    words = words_of(report_html(result, interval, heat_of(scan, result)))
    assert f"interval series: {nz} slices acquired at their own positions, 1.00 to 9.00 mm apart" in words
    assert "evenly" not in words and "slice spacing" not in words
    even = words_of(report_html(result, scan, heat_of(scan, result)))
    assert f"{nz} slices, evenly {scan.spacing_mm[2]:.2f} mm apart" in even
    assert "(x \u00d7 y, as everywhere here)" in even and "(z, y, x)" not in even


def test_user_text_is_escaped_and_only_the_file_name_is_shown(analysed):
    scan, result = analysed
    evil = copy.copy(result)
    prompt = "<script>alert('x')</script> & honeycombing"
    evil.finding_probabilities = {prompt: 0.7}
    evil.source = "/home/someone/patients/Doe_Jane/chest_ct.nii.gz"
    evil.notes = ["<img src=http://example.org/x.png>"]
    text = report_html(evil, scan, heat_of(scan, result), extent={prompt: EXTENT["interstitial lung disease"]})
    page = parse(text)
    assert "script" not in page.tags
    assert all(value.startswith("data:") for _, _, value in page.urls)
    words = " ".join(page.text)
    assert prompt in words and "chest_ct.nii.gz" in words
    assert "Doe_Jane" not in text and "/home/someone" not in text


def test_meaningful_model_says_so_without_the_warning(analysed):
    scan, result = analysed
    good = copy.copy(result)
    good.model_meaningful, good.model_warning = True, ""
    words = " ".join(parse(report_html(good, scan, heat_of(scan, result))).text)
    assert "scores are meaningful for this scan" in words and "NOT meaningful" not in words


def test_command_line_warns_before_the_probabilities(small_phantom, tmp_path, capsys):
    from ZeroShotILDLib.cli import main

    path = tmp_path / "chest.nii.gz"
    small_phantom.save(path)
    assert main(["analyze", str(path), "-o", str(tmp_path / "out"), "--model", "tiny-random", "--device", "cpu",
                 "--patch-mm", "30", "--slice-step-mm", "5", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    warning = next(k for k, line in enumerate(lines) if "NOT meaningful" in line)
    first_p = next(k for k, line in enumerate(lines) if line.strip().startswith("P("))
    assert warning < first_p
    assert sum("has random weights" in line for line in lines) == 1  # said once, first


def test_a_prompt_longer_than_the_text_encoder_reads_is_noted(small_scan, tiny_model):
    from ZeroShotILDLib.pipeline import Analyzer

    long_prompt = "subpleural reticulation with traction bronchiectasis " * 12  # ~100 tokens, the context is 77
    analyzer = Analyzer(tiny_settings(patch_mm=30.0, prompts=["honeycombing", long_prompt]), model=tiny_model)
    notes = [n for n in analyzer.analyze(small_scan).notes if "longer than the text encoder reads" in n]
    assert len(notes) == 1 and long_prompt[:40] in notes[0] and "77 read" in notes[0]
    assert "'honeycombing'" not in notes[0]


def test_without_weasyprint_the_html_is_written_and_a_note_says_how_to_get_the_pdf(analysed, tmp_path, monkeypatch):
    from ZeroShotILDLib import report_pdf

    scan, result = analysed
    reason = f"WeasyPrint is not installed; {report_pdf.PDF_INSTALL_HINT}"
    monkeypatch.setattr(report_pdf, "pdf_engine_problem", lambda: reason)
    shown = copy.copy(result)
    shown.notes = list(result.notes)
    out = outputs.write_outputs(shown, scan, tmp_path / "res")
    assert (out / "report.html").is_file() and not (out / PDF_NAME).exists()
    note = next(n for n in shown.notes if n.startswith(f"{PDF_NAME} not written"))
    assert "zeroshot-ild[pdf]" in note
    assert note in json.loads((out / "result.json").read_text(encoding="utf-8"))["notes"]
    words = words_of((out / "report.html").read_text(encoding="utf-8"))
    assert note in words and "report.pdf," not in words.split("Files in this folder:")[1]


@pytest.mark.skipif(bool(PDF_PROBLEM), reason=f"report.pdf not rendered here: {PDF_PROBLEM}")
def test_a_pdf_that_fails_to_render_leaves_the_html_and_one_note(analysed, tmp_path, monkeypatch):
    from ZeroShotILDLib import report_pdf

    def broken(html_text):
        raise RuntimeError("cairo said no\nsecond line")

    scan, result = analysed
    monkeypatch.setattr(report_pdf, "html_to_pdf", broken)
    shown = copy.copy(result)
    shown.notes = list(result.notes)
    out = outputs.write_outputs(shown, scan, tmp_path / "res")
    assert not (out / PDF_NAME).exists()
    notes = [n for n in shown.notes if n.startswith(f"{PDF_NAME} not written")]
    assert notes == [f"{PDF_NAME} not written: the PDF could not be rendered (RuntimeError: cairo said no)"]
    words = words_of((out / "report.html").read_text(encoding="utf-8"))
    assert notes[0] in words and PDF_NAME not in words.split("Files in this folder:")[1]


# ----------------------------------------------------------------------------------------------
# Print
# ----------------------------------------------------------------------------------------------
def read_pdf(path):
    """(pages, text, images decoded) of a PDF, read with pypdf."""
    pypdf = pytest.importorskip("pypdf", reason="pypdf not installed (pip install 'zeroshot-ild[test]')")
    reader = pypdf.PdfReader(str(path))
    text = " ".join(" ".join((page.extract_text() or "").split()) for page in reader.pages)
    images = []
    for page in reader.pages:
        for image in page.images:
            decoded = image.image
            decoded.load()
            images.append(decoded)
    return len(reader.pages), text, images


def print_with_chromium(html_path, pdf_path):
    # Every host name resolves to nothing: anything fetched from the network would be missing.
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--host-resolver-rules=MAP * ~NOTFOUND", "--no-pdf-header-footer",
                          f"--print-to-pdf={pdf_path}", html_path.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert pdf_path.is_file(), run.stderr[-2000:]


def expected_text(result, scan):
    """Phrases the printed page must hold (pypdf joins words the PDF places apart; compare without spaces)."""
    caption = slice_position(scan, best_slices(result)[0]).caption()
    return [caption, "Research software, not a diagnostic device", "How extent is measured",
            f"{result.lung_volume_ml:.0f} mL", f"{result.finding_probabilities[result.primary_prompt]:.3f}"]


def squash(text: str) -> str:
    """Without spaces and case (headings print in capitals)."""
    return re.sub(r"\s+", "", text).lower()


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser installed (apt-get install chromium)")
@pytest.mark.parametrize("with_patterns", [False, True])
def test_the_page_prints_on_one_page_per_prompt_and_two_with_the_pattern_map(analysed, tmp_path, with_patterns):
    scan, result = analysed
    shown = copy.copy(result)
    if not with_patterns:
        shown.patterns = None
    html_path = tmp_path / "report.html"
    html_text = report_html(shown, scan, heat_of(scan, result), extent=result.extent,
                            pattern_extent={n: result.patterns.extent[n] for n in result.patterns.names}
                            if with_patterns else None)
    html_path.write_text(html_text, encoding="utf-8")
    pdf = tmp_path / "printed.pdf"
    print_with_chromium(html_path, pdf)
    pages, text, images = read_pdf(pdf)
    assert pages == (2 if with_patterns else 1)  # Chromium's default paper is Letter, the shorter of the two
    for phrase in expected_text(result, scan):
        assert squash(phrase) in squash(text), phrase
    # Every picture of the page is in the PDF and decodes (Chromium may merge identical ones, never drop one).
    assert len(images) >= len(set(embedded_images(html_text))) and all(im.width > 20 for im in images)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser installed (apt-get install chromium)")
def test_report_renders_on_screen_without_network(analysed, tmp_path):
    scan, result = analysed
    path = tmp_path / "report.html"
    path.write_text(report_html(result, scan, heat_of(scan, result), extent=EXTENT), encoding="utf-8")
    shot = tmp_path / "shot.png"
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1200,1500",
                          f"--screenshot={shot}", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), run.stderr[-2000:]
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)

    def has(colour, tolerance=6):
        return int((np.abs(rgb - np.array(colour)).max(axis=2) <= tolerance).sum())

    assert has((0xff, 0xf7, 0xe6)) > 1000  # the research notice box: inline CSS applied
    assert has((0x00, 0x72, 0xb2)) > 200  # the chart's bars
    assert has((0xfd, 0xec, 0xec)) > 1000  # the not-meaningful warning box
    keys = rgb[200:700, :]  # the key images under the banners: heat colours (red well above blue)
    assert int(((keys[..., 0] - keys[..., 2]) > 60).sum()) > 500


@pytest.mark.skipif(bool(PDF_PROBLEM), reason=f"report.pdf not rendered here: {PDF_PROBLEM}")
def test_report_pdf_is_the_page_on_a4(analysed, tmp_path):
    scan, result = analysed
    out = outputs.write_outputs(result, scan, tmp_path / "res")
    pages, text, images = read_pdf(out / PDF_NAME)
    assert pages <= 2  # one page and the pattern map
    for phrase in expected_text(result, scan):
        assert squash(phrase) in squash(text), phrase
    html_text = (out / "report.html").read_text(encoding="utf-8")
    assert len(images) >= len(set(embedded_images(html_text))) and all(im.width > 20 for im in images)
    import pypdf

    box = pypdf.PdfReader(str(out / PDF_NAME)).pages[0].mediabox
    assert (round(float(box.width) / 72 * 25.4), round(float(box.height) / 72 * 25.4)) == (210, 297)
