"""Radiology report text: sections, text choice, sentences, sentence sampling and weak labels.

Paper 000 trains on the IMPRESSION or on the lung-specific sections of the FINDINGS; paper 001
splits FINDINGS + IMPRESSION into sentences and samples ``n = 3`` of them per training step.

Parsing is tolerant of the ways reports are really written:

- headers in any case, ending in ``:`` or `` -`` (``FINDINGS:``, ``Findings -``), alone on their
  line, wrapped in Markdown bold, or inline after a sentence (``... Impression: ...``);
- synonyms (``IMPRESSIONS``, ``CONCLUSION``, ``CLINICAL HISTORY`` ...);
- lung subsections inside FINDINGS on their own lines (``LUNG PARENCHYMA: ...``) or inline
  (``Lungs: clear. Pleura: no effusion.``);
- numbered impressions (``1. ... 2. ...``), bullets, wrapped lines;
- missing sections (a caption with no headers at all is one untitled preamble).

Nothing here logs or prints report text; error messages name the report (``source``), never
its content.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from ZeroShotILDLib.errors import InputError

#: Text choices for training pairs. ``full`` is the whole report (for captions without headers).
TEXT_CHOICES = ("impression", "lung", "findings+impression", "full")

#: Paper 001's number of sentences sampled per report per step.
DEFAULT_SENTENCES_PER_SAMPLE = 3

# Top-level headers: canonical name -> spellings (lower case). Longest spellings are tried first
# so that "clinical history" wins over "history".
_SECTION_SYNONYMS: dict[str, tuple[str, ...]] = {
    # A combined "FINDINGS AND IMPRESSION" section counts as findings: choose
    # --text findings+impression for such reports.
    "findings": ("findings", "finding", "findings and impression", "findings/impression"),
    "impression": (
        "impression", "impressions", "final impression", "overall impression",
        "conclusion", "conclusions",
    ),
    "comparison": ("comparison", "comparisons", "prior studies", "prior study"),
    "indication": (
        "indication", "indications", "clinical indication", "history", "clinical history",
        "clinical information", "reason for exam", "reason for examination",
    ),
    "technique": ("technique", "protocol"),
    "exam": ("exam", "examination", "procedure", "study"),
}
_SYNONYM_TO_SECTION = {s: k for k, spellings in _SECTION_SYNONYMS.items() for s in spellings}

# Subsection headings seen inside FINDINGS. Any short heading at the start of a line counts as a
# subsection; these are also recognised inline after a sentence ("Lungs: clear. Pleura: ...").
_KNOWN_SUBSECTIONS = (
    "lung parenchyma", "parenchyma", "lungs", "lung", "lung fields", "lung bases",
    "lungs and airways", "lungs and pleura", "lungs/pleura", "lungs/airways",
    "airways", "airway", "large airways", "central airways", "bronchi",
    "pleura", "pleurae", "pleural space", "pleural spaces",
    "heart and mediastinum", "heart", "mediastinum", "mediastinum and hila", "hila",
    "heart and pericardium", "cardiovascular", "vessels", "vasculature", "lymph nodes",
    "thoracic inlet", "thyroid", "chest wall", "soft tissues", "bones",
    "osseous structures", "musculoskeletal", "upper abdomen", "lines and tubes",
    "support devices", "esophagus",
)
# A heading is lung-specific when one of its words is one of these.
_LUNG_WORDS = frozenset(
    {"lung", "lungs", "parenchyma", "airway", "airways", "pleura", "pleurae", "pleural",
     "bronchi", "bronchial"}
)

_SEP = r"(?::|[ \t]+[-\u2013\u2014](?=\s|$))"
_BOLD = r"(?:\*\*|__)?"


def _alternation(words) -> str:
    return "|".join(re.escape(w).replace(r"\ ", r"[ \t]+") for w in sorted(words, key=len, reverse=True))


_SECTION_RE = re.compile(
    rf"{_BOLD}(?<![A-Za-z])(?P<name>{_alternation(_SYNONYM_TO_SECTION)})(?![A-Za-z])"
    rf"{_BOLD}[ \t]*(?P<sep>{_SEP}|(?=\r?\n)|$){_BOLD}",
    re.IGNORECASE,
)
_KNOWN_SUB_RE = re.compile(
    rf"{_BOLD}(?<![A-Za-z])(?P<name>{_alternation(_KNOWN_SUBSECTIONS)})(?![A-Za-z])"
    rf"{_BOLD}[ \t]*(?P<sep>{_SEP}){_BOLD}",
    re.IGNORECASE,
)
# Any short heading at the start of a line: up to 6 words of letters, then a colon.
_LINE_SUB_RE = re.compile(
    rf"^[ \t]*(?:[-*\u2022][ \t]*)?{_BOLD}(?P<name>[A-Za-z][A-Za-z/&,'()-]*(?:[ \t]+[A-Za-z/&,'()-]+){{0,5}})"
    rf"{_BOLD}[ \t]*(?P<sep>:){_BOLD}(?=\s|$)",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Subsection:
    """One titled part of FINDINGS, e.g. ``LUNG PARENCHYMA: ...``."""

    #: The heading as written, whitespace-normalised (e.g. ``"LUNG PARENCHYMA"``).
    heading: str
    #: Lower-case heading with single spaces, for matching (e.g. ``"lung parenchyma"``).
    key: str
    text: str = field(repr=False)
    #: True for lung parenchyma, lungs, airways, pleura and combinations of them.
    lung: bool = False


@dataclass(frozen=True)
class ParsedReport:
    """A report split into its sections. Text fields are hidden from ``repr`` on purpose."""

    #: Canonical section name (``findings``, ``impression``, ``comparison``, ``indication``,
    #: ``technique``, ``exam``) -> body. A section written twice is joined in order.
    sections: Mapping[str, str] = field(repr=False)
    #: Titled parts of FINDINGS (or of an untitled report), in order.
    subsections: tuple[Subsection, ...] = ()
    #: Text before the first header (the whole report when it has no headers).
    preamble: str = field(default="", repr=False)
    #: The whole report, whitespace-normalised.
    full_text: str = field(default="", repr=False)

    @property
    def findings(self) -> Optional[str]:
        return self.sections.get("findings") or None

    @property
    def impression(self) -> Optional[str]:
        return self.sections.get("impression") or None

    @property
    def lung_subsections(self) -> tuple[Subsection, ...]:
        return tuple(s for s in self.subsections if s.lung and s.text)

    @property
    def lung_text(self) -> Optional[str]:
        """Lung-specific subsections, one per line as ``Heading: text``; None if there are none."""
        parts = [f"{_heading_case(s.heading)}: {s.text}" for s in self.lung_subsections]
        return "\n".join(parts) or None

    def available_texts(self) -> tuple[str, ...]:
        """The entries of ``TEXT_CHOICES`` this report can provide."""
        out = []
        if self.impression:
            out.append("impression")
        if self.lung_text:
            out.append("lung")
        if self.findings or self.impression:
            out.append("findings+impression")
        if self.full_text:
            out.append("full")
        return tuple(out)


def _heading_case(heading: str) -> str:
    return heading[:1].upper() + heading[1:].lower()


def _clean(text: str) -> str:
    """Strip each line, collapse runs of spaces, drop blank lines; keep line breaks (lists)."""
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _line_start(text: str, pos: int) -> bool:
    i = pos - 1
    while i >= 0 and text[i] in " \t":
        i -= 1
    return i < 0 or text[i] in "\r\n"


_LABEL_PREFIX = re.compile(r"[ \t]*[A-Za-z][A-Za-z ]{0,30}:[ \t]*")


def _after_label(text: str, pos: int) -> bool:
    """Only a short ``Label:`` stands between the line start and ``pos`` ("Report: Findings - ...")."""
    start = max(text.rfind("\n", 0, pos), text.rfind("\r", 0, pos)) + 1
    return _LABEL_PREFIX.fullmatch(text, start, pos) is not None


def _after_sentence(text: str, pos: int) -> bool:
    i = pos - 1
    while i >= 0 and text[i] in " \t*_":
        i -= 1
    return i < 0 or text[i] in ".!?;\r\n"


def _section_headers(text: str):
    """Yield (start, end, canonical name) of accepted top-level headers, in order."""
    for m in _SECTION_RE.finditer(text):
        start = m.start()
        sep = m.group("sep")
        name = m.group("name")
        at_line = _line_start(text, start)
        if sep == "":
            # A bare word is a header only when capitalised and alone on its line
            # ("FINDINGS\n..."); a wrapped line reading "findings" is prose.
            if not (at_line and name[0].isupper()):
                continue
        elif sep.strip() != ":":
            # "Findings - ..." only at the start of a line (or after a leading "Report:" label):
            # a dash mid-sentence is prose.
            if not (at_line or (name[0].isupper() and _after_label(text, start))):
                continue
        elif not (at_line or _after_sentence(text, start) or name[0].isupper()):
            # Lower-case "findings:" mid-sentence is prose; capitalised "Findings:" is a header
            # even after a sentence that lacks its full stop (real reports do this).
            continue
        yield start, m.end(), _SYNONYM_TO_SECTION[re.sub(r"\s+", " ", name.lower())]


def _subsection_headers(body: str):
    """Yield (start, end, heading) of subsection headings inside a FINDINGS body."""
    found = {}
    for m in _LINE_SUB_RE.finditer(body):
        found[m.start()] = (m.end(), m.group("name"))
    for m in _KNOWN_SUB_RE.finditer(body):
        if m.start() in found:
            continue
        if _line_start(body, m.start()) or _after_sentence(body, m.start()):
            if m.group("sep").strip() != ":" and not _line_start(body, m.start()):
                continue
            found[m.start()] = (m.end(), m.group("name"))
    for start in sorted(found):
        end, heading = found[start]
        yield start, end, re.sub(r"\s+", " ", heading.strip())


def _split_subsections(body: str) -> tuple[Subsection, ...]:
    heads = list(_subsection_headers(body))
    out = []
    for i, (start, end, heading) in enumerate(heads):
        stop = heads[i + 1][0] if i + 1 < len(heads) else len(body)
        key = heading.lower()
        words = set(re.split(r"[^a-z]+", key))
        out.append(Subsection(heading=heading, key=key, text=_clean(body[end:stop]),
                              lung=bool(words & _LUNG_WORDS)))
    return tuple(out)


def parse_report(text: str) -> ParsedReport:
    """Split a free-text report into FINDINGS, IMPRESSION, other sections and lung subsections.

    Parameters
    ----------
    text : str
        The report as written. ``None`` or an empty string gives an empty report.

    Returns
    -------
    ParsedReport
        Sections keyed by canonical name; subsections of FINDINGS (of the whole text when there
        is no FINDINGS header) with ``lung=True`` for lung parenchyma / lungs / airways / pleura.
    """
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    heads = list(_section_headers(text))
    sections: dict[str, str] = {}
    preamble = _clean(text[: heads[0][0]] if heads else text)
    for i, (start, end, name) in enumerate(heads):
        stop = heads[i + 1][0] if i + 1 < len(heads) else len(text)
        body = _clean(text[end:stop])
        if body:
            sections[name] = f"{sections[name]}\n{body}" if name in sections else body
    findings_body = sections.get("findings")
    if findings_body is None and not heads:
        findings_body = preamble
    subsections = _split_subsections(findings_body) if findings_body else ()
    return ParsedReport(sections=sections, subsections=subsections, preamble=preamble,
                        full_text=_clean(text))


def select_text(report, text: str = "impression", *, source: Optional[str] = None,
                missing: str = "error") -> Optional[str]:
    """The part of a report used as the training text.

    Parameters
    ----------
    report : ParsedReport or str
        A parsed report, or raw text (parsed here).
    text : {"impression", "lung", "findings+impression", "full"}
        ``impression``: the IMPRESSION (paper 000's "Impressions" models). ``lung``: the
        lung-specific FINDINGS subsections (paper 000's "Sections" models).
        ``findings+impression``: both, whichever exist (paper 001). ``full``: everything.
    source : str, optional
        Names the report in error messages (row number, file name); report text never is.
    missing : {"error", "none"}
        What to do when the report lacks the requested part: raise ``InputError`` or return None.

    Returns
    -------
    str or None
    """
    if text not in TEXT_CHOICES:
        raise InputError(f"unknown text choice {text!r}; choose one of {', '.join(TEXT_CHOICES)}")
    if missing not in ("error", "none"):
        raise ValueError(f"missing must be 'error' or 'none', not {missing!r}")
    parsed = report if isinstance(report, ParsedReport) else parse_report(report)
    if text == "impression":
        out = parsed.impression
    elif text == "lung":
        out = parsed.lung_text
    elif text == "findings+impression":
        parts = [p for p in (parsed.findings, parsed.impression) if p]
        out = "\n".join(parts) or None
    else:
        out = parsed.full_text or None
    if out is None and missing == "error":
        where = f" ({source})" if source else ""
        wanted = {
            "impression": "no IMPRESSION section",
            "lung": "no lung section (LUNG PARENCHYMA, LUNGS, AIRWAYS or PLEURA in FINDINGS)",
            "findings+impression": "neither a FINDINGS nor an IMPRESSION section",
            "full": "no text",
        }[text]
        others = [c for c in parsed.available_texts() if c != text]
        hint = (f"choose --text {' or '.join(others)}" if others
                else "fix or drop this report")
        raise InputError(f"report{where} has {wanted}: {hint}")
    return out


#: Above this share of reports without the chosen text, commands warn (the choice does not fit the cohort).
MOSTLY_EMPTY_SHARE = 0.5


def text_yield(texts: Sequence[Optional[str]], text: str) -> dict:
    """How many reports give text for choice ``text``, and for every other choice (counts only, no text).

    Returns ``{"choice", "n", "with_text", "by_choice": {choice: count}}``; empty reports count as none.
    """
    if text not in TEXT_CHOICES:
        raise InputError(f"unknown text choice {text!r}; choose one of {', '.join(TEXT_CHOICES)}")
    by_choice = dict.fromkeys(TEXT_CHOICES, 0)
    for t in texts:
        for c in parse_report(t or "").available_texts():
            by_choice[c] += 1
    return {"choice": text, "n": len(texts), "with_text": by_choice[text], "by_choice": by_choice}


def yield_warning(counts: dict) -> Optional[str]:
    """One line when most reports give no text for the chosen part (None otherwise); names counts, never text."""
    n, got = counts["n"], counts["with_text"]
    if n == 0 or (n - got) <= MOSTLY_EMPTY_SHARE * n:
        return None
    better = sorted((c for c in TEXT_CHOICES if c != counts["choice"] and counts["by_choice"][c] > got),
                    key=lambda c: -counts["by_choice"][c])
    hint = (f"; --text {better[0]} gives text for {counts['by_choice'][better[0]]}" if better else "")
    return (f"--text {counts['choice']} finds no text in {n - got} of {n} reports{hint} "
            f"(see `preview-text` for what each choice picks)")


# ---------------------------------------------------------------------------------------------
# Sentences

#: Words that end in a full stop without ending a sentence (compared in lower case, no dot).
ABBREVIATIONS = frozenset(
    {"dr", "drs", "mr", "mrs", "ms", "prof", "vs", "approx", "cf", "fig", "figs", "st", "jr",
     "sr", "incl", "resp", "pt", "pts", "hx", "dx", "ref", "no", "nos", "vol", "ca", "esp"}
)
_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\(?\d{1,2}[.)])\s+")
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)|(?<=[a-z]{2})\.(?=[A-Z][a-z])")


def _chunks(text: str) -> list[str]:
    """Join wrapped lines; a line break before a capital, digit or bullet starts a new chunk."""
    chunks: list[str] = []
    for line in text.replace("\r", "\n").split("\n"):
        line = line.strip()
        if not line:
            continue
        if chunks and not re.match(r"[A-Z0-9(\-*\u2022]", line):
            chunks[-1] += " " + line
        else:
            chunks.append(line)
    return chunks


def _is_boundary(chunk: str, sent_start: int, m: re.Match) -> bool:
    if not m.group(0).startswith("."):
        return True
    before = chunk[sent_start:m.start()]
    token = before.split()[-1] if before.split() else ""
    bare = token.lstrip("([\"'")
    if re.fullmatch(r"\(?\d{1,2}", token) and (
        not before[: len(before) - len(token)].strip()
        or before[: len(before) - len(token)].rstrip().endswith(":")
    ):
        return False  # a list number ("1. ..."), not the end of a sentence
    rest = chunk[m.end():].lstrip()
    if rest[:1].islower():
        return False  # "e.g. the", "approx. two"
    if bare.lower() in ABBREVIATIONS or re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", bare):
        return False  # "Dr. Smith", "e.g. Honeycombing", "3 p.m. Findings"
    return True


def _tidy_sentence(s: str) -> str:
    s = _LIST_MARKER.sub("", s)
    s = re.sub(r"(?<=:)\s+\(?\d{1,2}[.)]\s+", " ", s)  # "Chest: 1. No acute ..." -> "Chest: No ..."
    return re.sub(r"\s+", " ", s).strip()


def split_sentences(text: Optional[str]) -> list[str]:
    """Split report text into sentences.

    Breaks after ``.``, ``!``, ``?`` and at line breaks that start a new item, but not after
    abbreviations (``e.g.``, ``i.e.``, ``Dr.``, ``vs.``, ``p.m.``), inside decimals (``1.5 cm``)
    or after list numbers (``1.``, ``2)``); the list numbers and bullets are removed. A missing
    space after a full stop (``apex.There``) still ends the sentence.

    Returns
    -------
    list of str
        Non-empty sentences in reading order, whitespace-normalised; [] for empty text.
    """
    out: list[str] = []
    for chunk in _chunks(text or ""):
        start = 0
        for m in _BOUNDARY.finditer(chunk):
            if m.end() <= start or not _is_boundary(chunk, start, m):
                continue
            out.append(chunk[start:m.end()])
            start = m.end()
        out.append(chunk[start:])
    sentences = (_tidy_sentence(s) for s in out)
    return [s for s in sentences if re.search(r"[A-Za-z0-9]", s)]


def sample_sentences(sentences: Sequence[str], n: int = DEFAULT_SENTENCES_PER_SAMPLE, *,
                     rng: np.random.Generator) -> list[str]:
    """Pick ``n`` sentences at random without replacement (paper 001's text augmentation).

    Parameters
    ----------
    sentences : sequence of str
        A report's sentences (``split_sentences``).
    n : int, default 3
        Sentences per sample. Reports with ``n`` or fewer sentences are returned whole.
    rng : numpy.random.Generator
        Source of randomness; pass a seeded one for reproducible runs.

    Returns
    -------
    list of str
        The chosen sentences in their original order, so the sample reads like the report.
    """
    if n < 1:
        raise InputError(f"sentences per sample must be at least 1, got {n}")
    if len(sentences) <= n:
        return list(sentences)
    idx = np.sort(rng.choice(len(sentences), size=n, replace=False))
    return [sentences[i] for i in idx]


def sample_text(sentences: Sequence[str], n: int = DEFAULT_SENTENCES_PER_SAMPLE, *,
                rng: np.random.Generator) -> str:
    """``sample_sentences`` joined with spaces: the text of one training pair for one step."""
    return " ".join(sample_sentences(sentences, n, rng=rng))


# ---------------------------------------------------------------------------------------------
# Weak labels

#: Class -> MeSH major headings (the part before the first "/"), lower case, for
#: ``labels_from_mesh`` on the IU chest X-ray reports.
DEFAULT_MESH_CLASSES: dict[str, tuple[str, ...]] = {
    "normal": ("normal",),
    "interstitial lung disease": ("lung diseases, interstitial", "pulmonary fibrosis", "fibrosis"),
    "opacity": ("opacity", "infiltrate", "density", "airspace disease", "consolidation"),
    "pleural effusion": ("pleural effusion",),
    "emphysema": ("emphysema", "pulmonary emphysema", "bullous emphysema"),
    "cardiomegaly": ("cardiomegaly",),
    "atelectasis": ("pulmonary atelectasis",),
    "nodule": ("nodule",),
    "edema": ("pulmonary edema",),
    "pneumonia": ("pneumonia",),
    "pneumothorax": ("pneumothorax",),
}


def mesh_terms(mesh_major: Optional[str]) -> list[str]:
    """MeSH major headings of a ``mesh_major`` field (``"Opacity/lung/base;Cardiomegaly"``),
    lower case, qualifiers after ``/`` dropped, duplicates removed, order kept."""
    seen: dict[str, None] = {}
    for term in (mesh_major or "").split(";"):
        head = re.sub(r"\s+", " ", term.split("/")[0]).strip().lower()
        if head:
            seen[head] = None
    return list(seen)


def labels_from_mesh(mesh_major: Optional[str],
                     classes: Mapping[str, Sequence[str]] = DEFAULT_MESH_CLASSES) -> dict[str, int]:
    """Weak 0/1 labels from MeSH major headings: 1 when any of a class's headings is present."""
    terms = set(mesh_terms(mesh_major))
    return {name: int(any(h.lower() in terms for h in heads)) for name, heads in classes.items()}


#: Words that negate a finding mentioned after them in the same sentence.
NEGATION_CUES = (
    "no", "not", "without", "negative for", "free of", "clear of", "absence of",
    "no evidence of", "resolved", "resolution of", "rather than", "ruled out",
)
#: Words that negate a finding mentioned before them ("effusion has resolved").
POST_NEGATION_CUES = ("resolved", "has resolved", "have resolved", "is not seen", "are not seen",
                      "not identified", "is absent", "are absent", "ruled out")
#: Words that end the reach of a negation ("no cardiomegaly with small effusions").
NEGATION_TERMINATORS = ("but", "however", "although", "though", "with", "which", "except",
                        "apart from", "aside from", "whereas")
_NEGATION_RE = re.compile(r"\b(?:" + _alternation(NEGATION_CUES) + r")\b", re.IGNORECASE)
_POST_NEGATION_RE = re.compile(r"\b(?:" + _alternation(POST_NEGATION_CUES) + r")\b", re.IGNORECASE)
_TERMINATOR_RE = re.compile(r"\b(?:" + _alternation(NEGATION_TERMINATORS) + r")\b", re.IGNORECASE)


def _negated(sentence: str, start: int, end: int) -> bool:
    before = sentence[:start]
    cues = list(_NEGATION_RE.finditer(before))
    if cues and not _TERMINATOR_RE.search(before[cues[-1].end():]):
        return True
    after = sentence[end:]
    post = _POST_NEGATION_RE.search(after)
    return bool(post and not _TERMINATOR_RE.search(after[:post.start()]))


def keyword_labels(text: Optional[str], keywords: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Weak 0/1 labels from text: 1 when a class keyword is mentioned without a negation.

    A deliberately simple NegEx-style rule, per sentence: a mention is negated by a cue from
    ``NEGATION_CUES`` before it ("No pleural effusion or pneumothorax" negates both) or from
    ``POST_NEGATION_CUES`` after it ("the effusion has resolved"), unless a word from
    ``NEGATION_TERMINATORS`` stands between them. Hedged mentions ("may represent effusion")
    count as positive.

    Parameters
    ----------
    text : str
        Report text (any part).
    keywords : mapping
        Class name -> phrases, matched case-insensitively on word boundaries.

    Returns
    -------
    dict
        Class name -> 0 or 1.
    """
    sentences = split_sentences(text)
    out = {}
    for name, phrases in keywords.items():
        pattern = re.compile(r"\b(?:" + _alternation(p.lower() for p in phrases) + r")\b",
                             re.IGNORECASE)
        out[name] = int(any(not _negated(s, m.start(), m.end())
                            for s in sentences for m in pattern.finditer(s)))
    return out
