"""The report's files: ``report.html``, ``report.pdf`` (the same page printed by WeasyPrint) and, for a DICOM
input, ``report.pdf.dcm`` (that PDF as an Encapsulated PDF in the source study, so it shows in PACS
beside the scan).

WeasyPrint (BSD-3-Clause, pure Python over the Pango library) is optional: ``pip install
'zeroshot-ild[pdf]'``. Without it, or without Pango, the HTML is written and a note says how to get
the PDF. Rendering is offline: the page embeds everything, and the URL fetcher refuses anything that
is not a ``data:`` URI, so no request can leave the machine.

Whether the PDF and its DICOM copy will be written is decided before the page is drawn, so that the
page's file list and notes say what the folder will hold; a PDF that then fails to render replaces
its line with the reason and the HTML is drawn again.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from .report import REPORT_NAME, best_slices, report_html
from .results import AnalysisResult
from .scan import Scan

PDF_NAME = "report.pdf"
PDF_INSTALL_HINT = "pip install 'zeroshot-ild[pdf]' (WeasyPrint; it needs the Pango library of the system)"


def pdf_engine_problem() -> str:
    """"" when WeasyPrint can render here, else one line saying why not (not installed, Pango missing)."""
    try:
        import weasyprint  # noqa: F401
    except ImportError:
        return f"WeasyPrint is not installed; {PDF_INSTALL_HINT}"
    except OSError as exc:  # WeasyPrint is there but the Pango/GObject libraries are not
        return f"WeasyPrint cannot load its system libraries ({str(exc).splitlines()[0][:120]}); {PDF_INSTALL_HINT}"
    return ""


def html_to_pdf(html_text: str) -> bytes:
    """The report page as PDF bytes (A4, WeasyPrint's default paper; the page's print style sheet applies)."""
    from weasyprint import HTML, URLFetcher

    # WeasyPrint and fontTools log what they skip (a CSS property they do not know) as warnings: the
    # page is ours and checked by tests, so they are not the user's business.
    loggers = [logging.getLogger(n) for n in ("weasyprint", "fontTools")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        # Only data: URIs (the report embeds everything it shows); anything else is an error, not a request.
        fetcher = URLFetcher(allowed_protocols=("data",), fail_on_errors=True)
        return HTML(string=html_text, url_fetcher=fetcher).write_pdf()
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def write_report_files(result: AnalysisResult, scan: Scan, folder, heat: np.ndarray, *,
                       extent: Optional[Mapping] = None, pattern_extent: Optional[Mapping] = None,
                       output_files: Sequence[str] = (), dicom_written: bool = False, pdf: bool = True) -> list:
    """Write report.html, report.pdf (when WeasyPrint renders here and ``pdf``) and, when ``dicom_written`` (the
    run wrote DICOM results for this DICOM input), report.pdf.dcm into ``folder``. Returns the optional names
    written (report.pdf, report.pdf.dcm); notes in ``result`` say why one was not written."""
    from .dicom_results import PDF_DICOM_NAME

    folder = Path(folder)
    problem = pdf_engine_problem() if pdf else "turned off"
    planned = [PDF_NAME] + ([PDF_DICOM_NAME] if dicom_written else []) if not problem else []
    if problem and pdf:
        result.notes.append(f"{PDF_NAME} not written: {problem}")

    def page() -> str:
        return report_html(result, scan, heat, extent=extent, pattern_extent=pattern_extent,
                           output_files=[n for n in output_files if n != "result.json"] + planned + ["result.json"])

    html_text = page()
    written: list = []
    if planned:
        try:
            document = html_to_pdf(html_text)
        except Exception as exc:  # noqa: BLE001 - a renderer failure must not cost the analysis
            result.notes.append(f"{PDF_NAME} not written: the PDF could not be rendered "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})")
            planned = []
            html_text = page()
        else:
            (folder / PDF_NAME).write_bytes(document)
            written.append(PDF_NAME)
            if PDF_DICOM_NAME in planned:
                from .dicom_results import write_encapsulated_pdf

                why = write_encapsulated_pdf(document, scan, folder / PDF_DICOM_NAME, best_slices(result))
                if why:
                    result.notes.append(f"{PDF_DICOM_NAME} not written: {why}")
                else:
                    written.append(PDF_DICOM_NAME)
    (folder / REPORT_NAME).write_text(html_text, encoding="utf-8")
    return written
