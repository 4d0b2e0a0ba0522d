"""Normal-lung references for the extent rule: built from normal scans, stored beside the weights.

A reference says what *normal* lung scores for one set of weights, one finding text and one
normal-lung text: the median and robust SD (1.4826 x MAD) of ``extent.contrasts`` over every
scored box of a few normal scans. ``extent.positive_patches`` counts a box as the finding when it
stands ``z`` of those SDs above that median. Why per weights and per text: a zero-shot contrast has
an offset that differs between models and prompts, so no fixed cut means the same thing twice,
while the normal lung of one model and prompt is stable across scans.

File: ``<weights file>.extent-reference.json`` in the weights' folder (for the demo model, in the
package). It records the weights' SHA-256, so a reference is never applied to other weights (a
fine-tuned copy, a damaged file): it is then ignored and the extent is marked uncalibrated.

    zeroshot-ild calibrate NORMAL_SCAN... --model M [--checkpoint C] [--prompt P ...]
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from .atomic_files import atomic_path
from .errors import InputError

FORMAT = "zeroshot-ild-extent-reference/1"
SUFFIX = ".extent-reference.json"
#: A reference from fewer boxes than this is too thin to put a tail on.
MIN_PATCHES = 200


def reference_path(weights: Path) -> Path:
    """Where the reference for ``weights`` lives: beside it, named after it."""
    weights = Path(weights)
    return weights.with_name(weights.name + SUFFIX)


#: Lung-fraction bins of the reference: a box straddling the pleura shows chest wall as well as lung,
#: and normal boxes score differently there (measured on phantom-demo: a median contrast of +0.19 for
#: boxes under 25 % lung against -0.06 for whole-lung boxes), so each box is compared with normal boxes
#: of its own kind.
FRACTION_BINS = (0.0, 0.25, 0.5, 0.8, 1.0)
#: A bin with fewer normal boxes than this uses the pooled reference.
MIN_BIN_PATCHES = 50


def _centre_spread(values: np.ndarray) -> tuple[float, float]:
    centre = float(np.median(values))
    return centre, 1.4826 * float(np.median(np.abs(values - centre)))


def build_reference(scores: Sequence[np.ndarray], lung_fractions: Optional[Sequence[np.ndarray]] = None) -> dict:
    """{centre, spread, scans, patches, q99[, bins]} from the contrasts of each normal scan's scored boxes
    (and their lung fractions, for a reference per ``FRACTION_BINS`` bin)."""
    arrays = [np.asarray(s, dtype=np.float64).ravel() for s in scores]
    pooled = np.concatenate(arrays) if arrays else np.zeros(0)
    finite = np.isfinite(pooled)
    if int(finite.sum()) < MIN_PATCHES:
        raise InputError(f"only {int(finite.sum())} scored boxes in the normal scans: give more or larger normal "
                         f"scans (at least {MIN_PATCHES} boxes) to calibrate")
    centre, spread = _centre_spread(pooled[finite])
    if not spread > 0:
        raise InputError("every box of the normal scans scored the same: this model cannot be calibrated")
    out = {"centre": centre, "spread": spread, "scans": len(arrays), "patches": int(finite.sum()),
           "q99": float(np.quantile(pooled[finite], 0.99))}
    if lung_fractions is not None:
        fractions = np.concatenate([np.asarray(f, dtype=np.float64).ravel() for f in lung_fractions])
        bins = []
        for lo, hi in zip(FRACTION_BINS[:-1], FRACTION_BINS[1:]):
            sel = finite & (fractions > lo) & (fractions <= hi)
            if sel.sum() >= MIN_BIN_PATCHES:
                c, sp = _centre_spread(pooled[sel])
                if sp > 0:
                    bins.append({"lo": lo, "hi": hi, "centre": c, "spread": sp, "patches": int(sel.sum())})
        if bins:
            out["bins"] = bins
    return out


def reference_arrays(reference, lung_fraction: Optional[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(centre, spread) per box: its lung-fraction bin's where the reference has one, else the pooled values."""
    centre = np.full(n, float(reference["centre"]))
    spread = np.full(n, float(reference["spread"]))
    bins = reference.get("bins") if lung_fraction is not None else None
    if bins:
        f = np.asarray(lung_fraction, dtype=np.float64)
        for b in bins:
            sel = (f > float(b["lo"])) & (f <= float(b["hi"]))
            centre[sel], spread[sel] = float(b["centre"]), float(b["spread"])
    return centre, spread


def write_references(weights: Path, weights_sha256: str, model_name: str, normal_prompt: str,
                     references: Mapping[str, dict], settings: Mapping, made_by: str = "") -> Path:
    """Merge ``references`` (prompt -> ``build_reference``) into the file beside ``weights``, atomically.

    Prompts calibrated earlier for the same weights and normal text are kept; a file made for other
    weights is replaced whole (it could never be used again).
    """
    path = reference_path(weights)
    doc = _read(path)
    if not doc or doc.get("weights_sha256") != weights_sha256 or doc.get("normal_prompt") != normal_prompt:
        doc = {"format": FORMAT, "model": model_name, "weights_file": Path(weights).name,
               "weights_sha256": weights_sha256, "normal_prompt": normal_prompt, "prompts": {}}
    created = time.strftime("%Y-%m-%d")
    for prompt, ref in references.items():
        doc["prompts"][prompt] = dict(ref, created=created, settings=dict(settings), made_by=made_by)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write the reference beside the weights ({path}): {exc.strerror or exc}; "
                         "copy the weights to a folder you can write and pass --checkpoint") from None
    return path


def _read(path: Path) -> Optional[dict]:
    try:
        if not path.is_file() or path.stat().st_size > 4 * 1024 * 1024:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("prompts"), dict) else None


def _valid(ref) -> bool:
    """A reference read from disk (untrusted): finite centres, positive finite spreads, sane bins."""
    try:
        parts = [ref] + list(ref.get("bins") or [])
        ok = all(np.isfinite(float(b["centre"])) and np.isfinite(float(b["spread"])) and float(b["spread"]) > 0
                 for b in parts)
        bins_ok = all(0.0 <= float(b["lo"]) < float(b["hi"]) <= 1.0 for b in parts[1:])
        return bool(ok and bins_ok and int(ref["scans"]) >= 1)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


#: Patch settings that change what a box's score means: a reference made with others does not apply.
REFERENCE_SETTINGS = ("patch_mm", "patch_px", "hu_window", "scored_min_lung_fraction")


def load_references(weights: Optional[Path], weights_sha256: Optional[str], prompts: Iterable[str],
                    normal_prompt: str, patch_settings: Optional[Mapping] = None) -> tuple[dict, str]:
    """({prompt: reference or None}, note): the references stored beside ``weights`` that belong to
    exactly these weights (SHA-256), this normal-lung text and these patch settings (``patch_settings``,
    e.g. ``AnalysisSettings.patch_key()``); the note says why one did not apply."""
    prompts = list(prompts)
    empty = {p: None for p in prompts}
    if weights is None or not weights_sha256:
        return empty, "no weights file (random weights): nothing to calibrate against"
    doc = _read(reference_path(weights))
    if doc is None:
        return empty, ""
    if doc.get("weights_sha256") != weights_sha256:
        return empty, (f"the normal-lung reference beside {Path(weights).name} was made for other weights; "
                       "it was ignored (run 'zeroshot-ild calibrate' again)")
    if doc.get("normal_prompt") != normal_prompt:
        return empty, (f"the normal-lung reference was made against '{doc.get('normal_prompt')}', not "
                       f"'{normal_prompt}'; it was ignored")
    out, other_settings = {}, []
    for p in prompts:
        ref = doc["prompts"].get(p)
        if not _valid(ref):
            out[p] = None
            continue
        made_with = ref.get("settings") if isinstance(ref.get("settings"), dict) else {}
        if patch_settings is not None and any(
                k in made_with and k in patch_settings and not _same(made_with[k], patch_settings[k])
                for k in REFERENCE_SETTINGS):
            out[p] = None
            other_settings.append(p)
            continue
        out[p] = dict(ref, weights_sha256=weights_sha256, normal_prompt=normal_prompt)
    note = (f"the normal-lung reference for {', '.join(repr(p) for p in other_settings)} was made with other patch "
            "settings (patch size, HU window or scored lung fraction); it was ignored (calibrate with these "
            "settings)" if other_settings else "")
    return out, note


def _same(a, b) -> bool:
    """Whether two stored setting values agree (lists vs tuples, ints vs floats compared as numbers)."""
    if a is None or b is None:
        return a is None and b is None
    try:
        return bool(np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)))
    except (TypeError, ValueError):
        return a == b


def calibrate(scans: Sequence, settings, *, progress=None, cancel=None, model=None) -> tuple[dict, object]:
    """({prompt: reference}, the loaded model) for ``settings.prompts`` and ``settings.patterns`` from
    normal ``scans``.

    Each scan runs through the one pipeline (lung mask, every scored box, embeddings), and the
    contrasts of every box are pooled per prompt. ``scans``: paths or ``Scan`` objects.
    """
    from .pipeline import Analyzer

    analyzer = Analyzer(settings, progress=progress, cancel=cancel, model=model)
    prompts = list(dict.fromkeys([*settings.prompts, *settings.patterns]))
    pooled: dict = {p: [] for p in prompts}
    fractions = []
    for scan in scans:
        result = analyzer.analyze(scan)
        scores = analyzer.contrast_scores(prompts)
        for p in prompts:
            pooled[p].append(scores[p])
        fractions.append(result.patches.lung_fraction)
    return {p: build_reference(v, fractions) for p, v in pooled.items()}, analyzer.model
