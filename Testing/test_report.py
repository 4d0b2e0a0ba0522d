"""report.html (issue 14): one self-contained page that opens offline and shows what the run found.

Checked here: the HTML parses with every tag closed, nothing in it points outside the file (every
<img> is a data: URI holding a valid PNG, no external src/href/url()), user text is escaped, the
input is named by its file name only, the model's meaning and the research notice are there, and
the extent chart appears exactly when extent is given. When chromium is installed, the page is
rendered headless with the network blocked and the screenshot is checked.
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
from PIL import Image

from conftest import tiny_settings
from ZeroShotILDLib import outputs
from ZeroShotILDLib.heatmap import paint_heatmap
from ZeroShotILDLib.patches import slice_step_voxels
from ZeroShotILDLib.report import ZONES, best_slices, embedded_images, extent_chart_svg, report_html

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
#: Hand-made extent in the shape the extent step writes into result.json.
EXTENT = {"interstitial lung disease": {
    "lung_fraction": 0.23, "predominance": "lower, subpleural", "rule": "patch positive when p > the scan's median",
    "by_zone": {"upper": 0.05, "middle": 0.2, "lower": 0.44, "left": 0.25, "right": 0.21, "subpleural": 0.35,
                "central": 0.1}}}


class StrictPage(HTMLParser):
    """Collects tags and flags unbalanced ones, and every URL-bearing attribute."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.urls, self.tags, self.text = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "poster", "data", "xlink:href"):
                self.urls.append((tag, name, value or ""))
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
                         slab_voxels=slab)


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
    overlays = len(best_slices(result))
    assert len(images) == overlays + 1  # overlays at the best slices + the montage
    montage = images[-1]
    np.testing.assert_array_equal(np.asarray(montage), result.montage)
    for image in images[:-1]:
        rgb = np.asarray(image.convert("RGB")).astype(int)
        assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 30).any(), "an overlay without heat colours"
    words = " ".join(page.text)
    for prompt, p in result.finding_probabilities.items():
        assert prompt in words and f"{p:.3f}" in words
    for subtype, p in result.subtype_probabilities.items():
        assert subtype in words and f"{p:.3f}" in words
    assert "Research software, not a diagnostic device" in words
    assert "NOT meaningful" in words and result.model_warning in words  # tiny-random has random weights
    # The engine now computes extent for every prompt: the report shows it with its chart.
    assert result.extent and "Extent by zone" in words and "<svg" in text


def test_overlays_show_distinct_best_slices_in_rank_order(analysed):
    scan, result = analysed
    slices = best_slices(result, 3)
    ranked_slices = [int(result.patches.slice_index[i]) for i in result.ranked]
    assert slices[0] == ranked_slices[0]
    assert len(set(slices)) == len(slices)
    assert slices == sorted(set(ranked_slices), key=ranked_slices.index)[:3]


def test_extent_section_and_chart_when_extent_is_given(analysed):
    scan, result = analysed
    text = report_html(result, scan, heat_of(scan, result), extent=EXTENT,
                       pattern_extent={"honeycombing": 0.04, "reticulation": {"lung_fraction": 0.12}})
    page = parse(text)
    words = " ".join(page.text)
    assert "Extent by zone" in words and "23.0% of the lung" in words and "lower, subpleural" in words
    assert EXTENT["interstitial lung disease"]["rule"] in words
    assert "honeycombing" in words and "4.0%" in words and "12.0%" in words
    assert text.count("<svg") == 1
    bars = re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="[\d.]+" height="([\d.]+)"', text)
    heights = [float(h) for h in bars]
    assert len(heights) == len(ZONES)
    fractions = [EXTENT["interstitial lung disease"]["by_zone"][z] for z in ZONES]
    # bar heights proportional to the extent of each zone
    np.testing.assert_allclose(np.array(heights) / max(heights), np.array(fractions) / max(fractions), atol=0.01)


def test_chart_marks_missing_zones_and_keeps_small_extents_visible():
    svg = extent_chart_svg({"upper": 0.01, "middle": 0.02, "lower": None, "left": float("nan")})
    parse(svg)
    assert svg.count("n/a") == 2
    # The axis reaches 10 %, so 2 % is a fifth of the plot, not a sliver of a 0-100 % axis.
    heights = [float(h) for h in re.findall(r'height="([\d.]+)" fill', svg)]
    assert len(heights) == 2 and heights[1] == pytest.approx(2 * heights[0])
    assert max(heights) > 20


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
    assert prompt in words  # shown as text
    assert "chest_ct.nii.gz" in words
    assert "Doe_Jane" not in text and "/home/someone" not in text


def test_meaningful_model_says_so_without_the_warning(analysed):
    scan, result = analysed
    good = copy.copy(result)
    good.model_meaningful, good.model_warning = True, ""
    words = " ".join(parse(report_html(good, scan, heat_of(scan, result))).text)
    assert "scores are meaningful for this scan" in words
    assert "NOT meaningful" not in words


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser installed (apt-get install chromium)")
def test_report_renders_in_a_headless_browser_without_network(analysed, tmp_path):
    scan, result = analysed
    path = tmp_path / "report.html"
    path.write_text(report_html(result, scan, heat_of(scan, result), extent=EXTENT), encoding="utf-8")
    shot = tmp_path / "shot.png"
    # Every host name resolves to nothing: an image or style sheet fetched from the network would be missing.
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1200,1500",
                          f"--screenshot={shot}", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), run.stderr[-2000:]
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert rgb.shape[:2] == (1500, 1200)

    def has(colour, tolerance=6):
        return int((np.abs(rgb - np.array(colour)).max(axis=2) <= tolerance).sum())

    assert has((0xff, 0xf7, 0xe6)) > 1000  # the research notice box: inline CSS applied
    assert has((0x1d, 0x4e, 0x89)) > 200  # the "lower" bar of the SVG chart
    assert has((0xfd, 0xec, 0xec)) > 1000  # the not-meaningful warning box
    # The embedded pictures are drawn: heat colours (red well above blue) in the left column, below the
    # banners, where the overlays are (the orange chart bars and the red banner border lie elsewhere).
    left = rgb[230:600, :600]
    assert int(((left[..., 0] - left[..., 2]) > 60).sum()) > 500
