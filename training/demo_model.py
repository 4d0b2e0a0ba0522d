"""The phantom-trained demo model: training pairs from phantoms, DAPT from scratch, and its benchmark.

The engine's ``demo`` needs a model whose scores mean something offline, where no pretrained
weights exist. This module trains a small CLIP (``model_configs/zsild-phantom.json``) from random
weights on synthetic phantoms (``ZeroShotILDLib.phantom``) with the DAPT trainer
(``zeroshot_ild_train.dapt.fit``), and measures it with the engine's own pipeline on phantoms it never saw.

The phantoms are the wide generator: 3-100 % of the lung involved (UIP-, NSIP- and HP-like),
three resolutions, image noise 8-40 HU and lung density -880..-815 HU drawn per phantom.

Why the pairs look the way they do: at test time the engine scores *single* lung patches
(upscaled to the model's input size) against "interstitial lung disease" / "no interstitial lung
disease", puts the most probable 16 into a 4 x 4 montage and classifies the *montage* with the
same prompt pair. A model trained on montages alone never sees a single upscaled patch, so the
retrieval step would be guesswork. Each training phantom therefore gives

- ``patch`` pairs: patch crops whose lung is at least half inside the ground-truth disease mask
  (half of them among the faintest such boxes, plus boxes on each pattern's own region) paired
  with a short report naming the patterns in the box, and crops with no disease (from normal and
  from diseased lungs) paired with one that describes normal lung. Half of the captions are the
  bare prompts the engine scores ("interstitial lung disease", "honeycombing", "reticulation",
  "ground-glass opacity" / "no ...", "normal lung"). Boxes go down to 10 % lung, and about a
  third are taken at the pleura (the engine scores every box that holds lung). Normal crops are
  partly the densest lung boxes (vessels, hila, dependent atelectasis): the normal patches a
  retrieval step would otherwise pick;
- ``report`` pairs: the scan's montage (random retrieval, built by
  ``ZeroShotILDLib.pipeline.montage_for_scan`` exactly as the DAPT preprocessing builds it) with
  the phantom's full report (FINDINGS + IMPRESSION, three sentences sampled per step);
- ``retrieved`` pairs: a montage of the patches a good retrieval would pick (diseased boxes of a
  diseased lung, the densest boxes of a normal one) with the same report, i.e. what the montage
  classifier is shown at test time;
- optionally (``build --retrieval-model M``), ``model-retrieved`` pairs: montages that a trained
  model itself retrieves through the engine's ``Analyzer`` (paper 000's best configuration), its
  hardest negatives. The previous recipe used them as a second stage; on the wide generator they
  lowered the scan AUROC on fresh phantoms (0.995 -> 0.935, training/RESULTS.md), so the recipe
  now adds HP-like phantoms instead (``build --subtype``).

All pixels come from the engine (``candidates_for``, ``patch_pixels``, ``build_montage``); nothing
here re-implements patch extraction or montage building. Captions are built from the phantom's
ground-truth labels; they use the engine's default prompt wording, so the zero-shot prompt pair is
in the vocabulary the text tower was trained on.

Commands (``python -m zeroshot_ild_train.demo_model ...``; ``scripts/train_demo_model.sh`` runs the recipe)::

    build     --out DIR [--subtype S] [--retrieval-model M]  phantoms -> cached pair PNGs + pairs.jsonl
    train     --pairs DIR... --out DIR [--init C]  DAPT (training.dapt.fit) -> weights (safetensors, fp16)
    evaluate  --model M --out FILE                 fresh phantoms (training/demo_eval.py): patch AUROC per
                                                   style and per pattern prompt, scan AUROC (95 % CIs),
                                                   montage overlap with the disease mask, CLIP vs random

The pair cache contains report text: keep it out of version control (it is written wherever
``--out`` points, never in the package).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.phantom import PATTERNS
from ZeroShotILDLib.settings import DEFAULT_PROMPT, AnalysisSettings
from ZeroShotILDLib.outputs import json_text
from zeroshot_ild_train.files import atomic_path, atomic_write_text
from zeroshot_ild_train.losses import SAYS_PREFIX

#: The architecture of the demo model (``ZeroShotILDLib/model_configs/zsild-phantom.json``).
ARCHITECTURE = "zsild-phantom"
#: Where the committed weights live (the registry's ``phantom-demo`` entry points here).
DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "ZeroShotILDLib" / "weights" / "phantom_demo.safetensors"
#: Statements a caption can make and a box can make true. Patterns co-exist in real lungs (fibrosis
#: is reticulation *and* honeycombing), so a box carries every statement true of it.
STATEMENTS = ("ild", "normal", "honeycombing", "reticulation", "ground-glass opacity",
              "no honeycombing", "no reticulation", "no ground-glass opacity")
#: Label columns of every pair: what is true of its image, then what its caption says
#: (``losses.split_statement_labels``: a caption is a positive of every image it is true of).
CLASS_NAMES = STATEMENTS + tuple(SAYS_PREFIX + name for name in STATEMENTS)
#: Pixel statistics the model is normalised with (as the registry's phantom-demo entry says).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)


# ----------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhantomGeometry:
    """One phantom resolution of the training mix (shape ``z, y, x``, spacing ``x, y, z`` mm)."""

    shape_zyx: tuple
    spacing_mm: tuple


#: Training resolutions: coarse (cheap, most of the data), near the demo's 1.4 mm, and thick
#: slices, so the 32 mm patches are seen at 13 to 23 native pixels before upscaling.
DEFAULT_GEOMETRIES = (
    PhantomGeometry((48, 128, 128), (2.5, 2.5, 2.5)),
    PhantomGeometry((56, 176, 176), (1.8, 1.8, 3.0)),
    PhantomGeometry((40, 144, 144), (2.2, 2.2, 5.0)),
)
#: Patterns with their own prompt: each gets patches (and "no <pattern>" captions) of its own.
PATTERN_PROMPTS = ("honeycombing", "reticulation", "ground-glass opacity")


@dataclass(frozen=True)
class PairRecipe:
    """What :func:`build_pairs` draws from each phantom."""

    n_phantoms: int = 240
    cohort_seed: int = 20240
    geometries: tuple = DEFAULT_GEOMETRIES
    #: Share of phantoms with ILD.
    positive_fraction: float = 0.6
    #: One style for every positive (e.g. more of the faintest, HP-like); None: the three balanced.
    subtype: Optional[str] = None
    #: Patterns every positive phantom draws whatever its style's own draw (``generate_phantom``'s
    #: ``with_patterns``): e.g. ground glass under UIP-like fibrosis, drawn by the style in one lung in seven.
    with_patterns: tuple = ()
    #: Per positive phantom, the share of the lung diseased is drawn uniformly from this range
    #: (``generate_cohort(involvement=...)``); None keeps the generator's 12-30 %.
    involvement: Optional[tuple] = (0.03, 1.0)
    #: Image noise (HU) and lung density drawn per phantom (scanner and inspiration variety).
    noise_hu: Optional[tuple] = (8.0, 40.0)
    lung_hu: Optional[tuple] = (-880.0, -815.0)
    #: Diseased boxes per positive phantom (disease over >= ``disease_min_fraction`` of the box's lung):
    #: half at random, half among the faintest third (lowest mean HU: hard positives, e.g. faint
    #: ground glass and the dark lobules of mosaic attenuation).
    patches_diseased: int = 14
    #: Extra boxes per pattern present (pattern over >= ``pattern_min_fraction`` of the box's lung),
    #: for every pattern the generator draws: the faint ones (mosaic attenuation: dark lobules, not
    #: dense lung) are the easiest to miss.
    patches_per_pattern: int = 6
    extra_patterns: tuple = PATTERNS
    #: Disease-free boxes per phantom: random, the densest (hard negatives) and pleural ones.
    patches_normal: int = 12
    disease_min_fraction: float = 0.5
    pattern_min_fraction: float = 0.3
    #: ... and known absent below this share ("no <pattern>"); in between a box says neither.
    pattern_absent_fraction: float = 0.05
    #: Per diseased phantom and prompted pattern, diseased boxes *without* it captioned "no <pattern>":
    #: hard negatives (the faint haze of fibrosis is not ground glass; ground glass is not reticulation).
    patches_absent_per_pattern: int = 4
    #: Candidate boxes need this share of lung: the engine scores boxes that straddle the pleura.
    min_lung_fraction: float = 0.1
    #: Share of the chosen boxes taken among those with less than half lung (chest wall in view).
    pleural_share: float = 0.3
    #: Extra ``retrieved`` montages per phantom (each a new draw of 16 boxes).
    retrieved_montages: int = 2
    image_size: int = 64
    #: How pairs are labelled (``pair_labels``); part of the recipe so a folder built under another
    #: labelling is rebuilt, not reused.
    labelling: str = "statements"

    def to_json(self) -> dict:
        out = asdict(self)
        out["geometries"] = [asdict(g) for g in self.geometries]
        return out


# Caption wording. The engine's default prompt pair must be covered verbatim.
_ILD_IMPRESSIONS = (
    DEFAULT_PROMPT, "Interstitial lung disease.", "Findings of interstitial lung disease.",
    "Fibrotic interstitial lung disease.",
)
_NORMAL_IMPRESSIONS = (
    f"no {DEFAULT_PROMPT}", "No interstitial lung disease.", "No evidence of interstitial lung disease.",
    "Normal lung.", "normal lung",
)
_NORMAL_FINDINGS = (
    "Normal lung parenchyma.", "The lungs are clear.", "No reticulation, ground-glass opacity or honeycombing.",
    "No interstitial abnormality.", "No honeycombing.", "No reticulation.", "No ground-glass opacity.",
)
#: Bare prompts, exactly as the engine words them ("<finding>" / "no <finding>", "normal lung").
_BARE_NORMAL = (f"no {DEFAULT_PROMPT}", "normal lung", *(f"no {p}" for p in PATTERN_PROMPTS))
_PATTERN_FINDINGS = {
    "reticulation": ("Reticulation.", "Subpleural reticulation."),
    "honeycombing": ("Honeycombing.", "Subpleural honeycombing."),
    "ground-glass opacity": ("Ground-glass opacity.", "Ground-glass opacity in the affected lung."),
    "traction bronchiectasis": ("Traction bronchiectasis.",),
    "centrilobular nodules": ("Centrilobular nodules.",),
    "mosaic attenuation": ("Mosaic attenuation.",),
}


def patch_caption(diseased: bool, patterns: Sequence[str], subtype: Optional[str], rng: np.random.Generator,
                  bare: float = 0.0) -> str:
    """The caption of :func:`patch_text` alone."""
    return patch_text(diseased, patterns, subtype, rng, bare)[0]


def patch_text(diseased: bool, patterns: Sequence[str], subtype: Optional[str], rng: np.random.Generator,
               bare: float = 0.0, absent: Optional[Sequence[str]] = None) -> tuple:
    """(caption, statements): a short report for one patch crop, built from the phantom's ground truth,
    and the ``STATEMENTS`` it makes.

    Diseased: one of ``patterns`` (those inside the box) as FINDINGS and an ILD impression
    (sometimes naming the subtype, so the subtype prompts mean something too). Normal: a
    normal-lung finding and a negated impression. Both follow the FINDINGS/IMPRESSION layout of
    the phantom reports, so one ``text_choice`` serves every pair. With probability ``bare`` the
    caption is instead a bare prompt exactly as the engine scores it: "interstitial lung disease",
    a pattern of the box or "no <pattern>" for a prompted pattern it lacks (``absent``: those known
    absent; default every prompted pattern not in ``patterns``); "no interstitial lung disease",
    "normal lung" or "no <pattern>".
    """
    prompted = [p for p in patterns if p in PATTERN_PROMPTS]
    absent = [p for p in PATTERN_PROMPTS if p not in prompted] if absent is None else list(absent)
    if rng.random() < bare:
        if diseased:
            options = [(DEFAULT_PROMPT, ("ild",)), *((p, (p,)) for p in prompted),
                       *((f"no {p}", (f"no {p}",)) for p in absent)]
        else:
            options = [(t, _negated(t) or ("normal",)) for t in _BARE_NORMAL]
        text, said = options[int(rng.integers(len(options)))]
        return f"IMPRESSION:\n{text}", tuple(said)
    if diseased:
        options = [(s, p) for p in patterns for s in _PATTERN_FINDINGS.get(p, ())] or [("Interstitial abnormality.", "")]
        finding, named = options[int(rng.integers(len(options)))]
        impression = _ILD_IMPRESSIONS[int(rng.integers(len(_ILD_IMPRESSIONS)))]
        if subtype and rng.random() < 0.3:
            impression = f"{subtype[0].upper()}{subtype[1:]}."
        said = ("ild", named) if named in PATTERN_PROMPTS else ("ild",)
    else:
        finding = _NORMAL_FINDINGS[int(rng.integers(len(_NORMAL_FINDINGS)))]
        impression = _NORMAL_IMPRESSIONS[int(rng.integers(len(_NORMAL_IMPRESSIONS)))]
        said = ("normal", *_negated(finding))
    return f"FINDINGS:\nLUNG PARENCHYMA: {finding}\n\nIMPRESSION:\n{impression}", said


def _negated(text: str) -> tuple:
    """The "no <pattern>" statements of a negative sentence ("No reticulation, ... or honeycombing.")."""
    low = text.lower()
    if not low.startswith("no "):
        return ()
    return tuple(f"no {p}" for p in PATTERN_PROMPTS if p in low)


def box_truths(diseased: bool, patterns: Sequence[str], absent: Optional[Sequence[str]] = None) -> tuple:
    """The ``STATEMENTS`` true of a box: ild, the prompted patterns it holds and "no <p>" for those
    known absent (``absent``; default: every prompted pattern it does not hold); or normal and every "no <p>".

    Why "known absent": a box with a little honeycombing at its pleural edge holds neither
    "honeycombing" (too little to name) nor "no honeycombing" (false); calling it "no honeycombing"
    taught the model to deny the thin subpleural band where honeycombing lives.
    """
    if not diseased:
        return ("normal", *(f"no {p}" for p in PATTERN_PROMPTS))
    present = [p for p in PATTERN_PROMPTS if p in patterns]
    absent = [p for p in PATTERN_PROMPTS if p not in present] if absent is None else \
        [p for p in PATTERN_PROMPTS if p in absent and p not in present]
    return ("ild", *present, *(f"no {p}" for p in absent))


def box_disease_fraction(disease_mask: np.ndarray, patches) -> np.ndarray:
    """Fraction of each candidate box (one axial slice) covered by the ground-truth disease mask."""
    out = np.empty(len(patches), dtype=np.float64)
    rows, cols = patches.size_rows, patches.size_cols
    for i in range(len(patches)):
        z, r, c = int(patches.slice_index[i]), int(patches.row0[i]), int(patches.col0[i])
        out[i] = disease_mask[z, r:r + rows, c:c + cols].mean()
    return out


def box_lung_share(mask: np.ndarray, lung_mask: np.ndarray, patches) -> np.ndarray:
    """Share of each box's *lung* inside ``mask`` (a box at the pleura is judged on its lung only)."""
    rows, cols = patches.size_rows, patches.size_cols
    out = np.zeros(len(patches), dtype=np.float64)
    for i in range(len(patches)):
        z, r, c = int(patches.slice_index[i]), int(patches.row0[i]), int(patches.col0[i])
        lung = lung_mask[z, r:r + rows, c:c + cols]
        n = int(lung.sum())
        out[i] = (mask[z, r:r + rows, c:c + cols] & lung).sum() / n if n else 0.0
    return out


def box_mean_hu(hu: np.ndarray, patches) -> np.ndarray:
    """Mean HU of each candidate box: dense normal boxes are the hard negatives."""
    rows, cols = patches.size_rows, patches.size_cols
    return np.array([hu[int(z), int(r):int(r) + rows, int(c):int(c) + cols].mean()
                     for z, r, c in zip(patches.slice_index, patches.row0, patches.col0)])


# ----------------------------------------------------------------------------------------------
# Pair building
# ----------------------------------------------------------------------------------------------
@dataclass
class PhantomPairs:
    """The pairs of one phantom before they are written: (kind, uint8 image, report, ild)."""

    scan_id: str
    items: list = field(default_factory=list)


def phantom_pairs(phantom, scan_id: str, recipe: PairRecipe, rng: np.random.Generator) -> PhantomPairs:
    """All training pairs of one phantom (see the module docstring for the three kinds)."""
    from dataclasses import replace

    from ZeroShotILDLib.montage import build_montage
    from ZeroShotILDLib.patches import candidates_for, patch_pixels
    from ZeroShotILDLib.pipeline import montage_for_scan
    from ZeroShotILDLib.scan import scan_from_array

    settings = AnalysisSettings(retrieval="random", seed=int(rng.integers(2**31)), device="cpu").validate()
    size = recipe.image_size
    labels = phantom.labels
    ild = bool(labels["ild"])
    out = PhantomPairs(scan_id)
    # Candidates on the true lung mask, down to boxes that are mostly chest wall (the engine scores
    # every box holding lung), labelled by the truth.
    boxes = replace(settings, filter_threshold=recipe.min_lung_fraction)
    patches = candidates_for(phantom.lung_mask, phantom.spacing_mm, boxes)
    if np.count_nonzero(patches.montage_candidates(settings.filter_threshold)) < 16:
        raise InputError(f"phantom {scan_id} has too few candidate patches: use a larger shape")
    disease = box_lung_share(phantom.disease_mask, phantom.lung_mask, patches)
    touched = box_disease_fraction(phantom.disease_mask, patches) > 0
    pleural = patches.lung_fraction < 0.5
    density = box_mean_hu(phantom.hu, patches)
    clean = np.flatnonzero(~touched)
    dense_clean = clean[np.argsort(-density[clean], kind="stable")][: max(16, 3 * recipe.patches_normal)]

    def pick(pool: np.ndarray, k: int) -> np.ndarray:
        k = int(min(k, pool.size))
        return rng.choice(pool, size=k, replace=False) if k else np.zeros(0, np.int64)

    def pick_mixed(pool: np.ndarray, k: int) -> np.ndarray:
        """``k`` boxes of ``pool``, ``pleural_share`` of them among its boxes at the pleura."""
        edge = pool[pleural[pool]]
        first = pick(edge, int(round(k * recipe.pleural_share)))
        rest = np.setdiff1d(pool, first)
        return np.concatenate([first, pick(rest, k - first.size)]).astype(np.int64)

    def crops(indices: np.ndarray) -> np.ndarray:
        pixels = patch_pixels(phantom.hu, patches, indices, image_size=size, hu_window=settings.hu_window)
        return (pixels[:, 0].numpy() * 255.0 + 0.5).astype(np.uint8)

    # Single patches: diseased boxes (any pattern), then more of each prompted pattern present.
    if ild:
        shares = {name: box_lung_share(mask, phantom.lung_mask, patches) for name, mask in phantom.pattern_masks.items()}
        diseased_pool = np.flatnonzero(disease >= recipe.disease_min_fraction)
        faint = diseased_pool[np.argsort(density[diseased_pool], kind="stable")][: max(1, diseased_pool.size // 3)]
        first = pick(faint, recipe.patches_diseased // 2)
        chosen = [first, pick_mixed(np.setdiff1d(diseased_pool, first), recipe.patches_diseased - first.size)]
        for name in recipe.extra_patterns:
            if name in shares:
                pool = np.setdiff1d(np.flatnonzero((shares[name] >= recipe.pattern_min_fraction)
                                                   & (disease >= recipe.disease_min_fraction)), np.concatenate(chosen))
                chosen.append(pick_mixed(pool, recipe.patches_per_pattern))
        chosen_d = np.concatenate(chosen)
        absent_boxes = []
        for name in PATTERN_PROMPTS:
            share = shares.get(name)
            without = diseased_pool if share is None else diseased_pool[share[diseased_pool] < recipe.pattern_absent_fraction]
            picked = pick(np.setdiff1d(without, chosen_d), recipe.patches_absent_per_pattern)
            absent_boxes += [(int(i), name) for i in picked]
        absent_images = crops(np.array([i for i, _ in absent_boxes], dtype=np.int64)) if absent_boxes else []
        for (i, name), image in zip(absent_boxes, absent_images):
            present = [n for n in PATTERNS if shares.get(n) is not None and shares[n][i] >= recipe.pattern_min_fraction]
            absent = [n for n in PATTERN_PROMPTS if shares.get(n) is None or shares[n][i] < recipe.pattern_absent_fraction]
            out.items.append(("patch", image, f"IMPRESSION:\nno {name}", True, box_truths(True, present, absent),
                              (f"no {name}",)))
        for i, image in zip(chosen_d, crops(chosen_d)):
            # Only what this box holds: its caption and its truths must both be true of it.
            present = [name for name in PATTERNS if shares.get(name) is not None
                       and shares[name][i] >= recipe.pattern_min_fraction]
            absent = [name for name in PATTERN_PROMPTS if shares.get(name) is None
                      or shares[name][i] < recipe.pattern_absent_fraction]
            caption, said = patch_text(True, present, labels["subtype"], rng, bare=0.5, absent=absent)
            out.items.append(("patch", image, caption, True, box_truths(True, present, absent), said))
    third = recipe.patches_normal // 3
    chosen_n = np.unique(np.concatenate([
        pick(np.setdiff1d(clean, np.flatnonzero(pleural)), recipe.patches_normal - 2 * third),
        pick(dense_clean, third), pick(clean[pleural[clean]], third)]).astype(np.int64))
    for image in crops(chosen_n):
        caption, said = patch_text(False, (), None, rng, bare=0.5)
        out.items.append(("patch", image, caption, False, box_truths(False, ()), said))

    # The scan's montage as DAPT preprocessing builds it (random retrieval), with the report.
    scan = scan_from_array(phantom.hu, phantom.spacing_mm, phantom.origin_mm, phantom.direction, source=scan_id)
    montage, _ = montage_for_scan(scan, settings, image_size=size)
    # A montage mixes boxes: of a diseased lung only "ild" is known true, of a normal one everything normal.
    truths, said = (("ild",), ("ild",)) if ild else (box_truths(False, ()), ("normal",))
    out.items.append(("report", montage, phantom.report, ild, truths, said))

    # Montages of what a good retrieval picks among the montage's own candidates (>= half lung):
    # diseased boxes, or the densest normal boxes.
    eligible = patches.montage_candidates(settings.filter_threshold)
    if ild:
        ranked = np.flatnonzero(eligible)[np.argsort(-disease[eligible], kind="stable")]
        pool = ranked[disease[ranked] >= recipe.disease_min_fraction]
        pool = pool if pool.size >= 16 else ranked[:16]
    else:
        pool = dense_clean[eligible[dense_clean]]
        pool = pool if pool.size >= 16 else np.flatnonzero(eligible)
    for _ in range(recipe.retrieved_montages):
        chosen = pick(pool, 16)
        pixels = patch_pixels(phantom.hu, patches, chosen, image_size=size, hu_window=settings.hu_window)
        out.items.append(("retrieved", build_montage(pixels, 4, size), phantom.report, ild, truths, said))
    return out


def model_retrieved_pairs(phantom, scan_id: str, analyzer, image_size: int, rng: np.random.Generator,
                          extra_draws: int = 2) -> PhantomPairs:
    """Montages picked by a trained model (paper 000's CLIP retrieval), each with the phantom's report.

    The second stage of the recipe: the montage classifier must learn to reject what the model
    *itself* retrieves from a normal lung (its hardest negatives), and to accept what it retrieves
    from a diseased one. One montage of the top 16 patches (exactly the engine's), plus
    ``extra_draws`` montages of 16 drawn from the top 32 for variety.
    """
    from ZeroShotILDLib.montage import build_montage
    from ZeroShotILDLib.patches import patch_pixels
    from ZeroShotILDLib.ranking import rank_patches
    from ZeroShotILDLib.scan import scan_from_array

    settings = analyzer.settings
    scan = scan_from_array(phantom.hu, phantom.spacing_mm, phantom.origin_mm, phantom.direction, source=scan_id)
    result = analyzer.analyze(scan)  # the engine's default pipeline: lung mask, every patch scored
    out = PhantomPairs(scan_id)
    ild = bool(phantom.labels["ild"])
    top = rank_patches(result.patch_probabilities[settings.prompts[0]], 32, "clip")
    draws = [top[:16]] + [rng.choice(top, size=min(16, top.size), replace=False) for _ in range(extra_draws)]
    for chosen in draws:
        # Cells re-cut at the cache size (the analyzer's own montage is at the model's input size).
        pixels = patch_pixels(scan.hu, result.patches, chosen, image_size=image_size, hu_window=settings.hu_window)
        truths, said = (("ild",), ("ild",)) if ild else (box_truths(False, ()), ("normal",))
        out.items.append(("model-retrieved", build_montage(pixels, 4, image_size), phantom.report, ild, truths, said))
    return out


def cohort_options(recipe: "PairRecipe") -> dict:
    """``generate_cohort`` keywords of a recipe (ranges drawn per phantom; None keeps the default)."""
    out = {"positive_fraction": recipe.positive_fraction}
    if recipe.subtype:
        out["subtype"] = recipe.subtype
    if recipe.with_patterns:
        out["with_patterns"] = tuple(recipe.with_patterns)
    for key in ("involvement", "noise_hu", "lung_hu"):
        value = getattr(recipe, key)
        if value is not None:
            out[key] = tuple(value)
    return out


def iter_phantoms(n: int, seed: int, geometries: Sequence[PhantomGeometry], **cohort) -> Iterator[tuple]:
    """(scan_id, phantom) for a cohort (``generate_cohort`` keywords in ``cohort``), cycling through ``geometries``."""
    from ZeroShotILDLib.phantom import generate_cohort

    per = [n // len(geometries) + (1 if i < n % len(geometries) else 0) for i in range(len(geometries))]
    for g_index, (geometry, count) in enumerate(zip(geometries, per)):
        cohort_i = generate_cohort(count, seed=seed + 7919 * g_index, shape_zyx=geometry.shape_zyx,
                                   spacing_mm=geometry.spacing_mm, **cohort)
        for i, phantom in enumerate(cohort_i):
            yield f"g{g_index}_{i:04d}_s{phantom.labels['seed']}", phantom


def build_pairs(out_dir, recipe: PairRecipe = PairRecipe(), *, retrieval_model: Optional[str] = None,
                progress: bool = True) -> Path:
    """Generate the training phantoms and write their pairs; returns ``out_dir/pairs.jsonl``.

    Images go to ``out_dir/images/<scan_id>_<k>.png`` (grayscale, ``recipe.image_size``). The
    JSONL is written last, through a temporary file, so an interrupted build is never taken for a
    finished one. A finished folder built with the same recipe is reused as it is.
    """
    from PIL import Image
    from tqdm import tqdm

    out_dir = Path(out_dir)
    jsonl = out_dir / "pairs.jsonl"
    recipe_path = out_dir / "recipe.json"
    # Through JSON once, so tuples compare equal to the lists read back from recipe.json.
    described = json.loads(json.dumps(dict(recipe.to_json(), retrieval_model=_model_identity(retrieval_model))))
    if jsonl.is_file() and recipe_path.is_file() and json.loads(recipe_path.read_text(encoding="utf-8")) == described:
        return jsonl
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    analyzer = None
    if retrieval_model is not None:
        from ZeroShotILDLib.pipeline import Analyzer

        analyzer = Analyzer(AnalysisSettings(model=retrieval_model, device="cpu"))
    rows = []
    bar = tqdm(total=recipe.n_phantoms, desc="phantom pairs", disable=not progress, file=sys.stderr)
    for scan_id, phantom in iter_phantoms(recipe.n_phantoms, recipe.cohort_seed, recipe.geometries,
                                          **cohort_options(recipe)):
        rng = np.random.default_rng([recipe.cohort_seed, int(phantom.labels["seed"])])
        if analyzer is None:
            pairs = phantom_pairs(phantom, scan_id, recipe, rng)
        else:
            pairs = model_retrieved_pairs(phantom, scan_id, analyzer, recipe.image_size, rng)
        for k, (kind, image, report, ild, truths, said) in enumerate(pairs.items):
            path = out_dir / "images" / f"{scan_id}_{k:03d}.png"
            with atomic_path(path) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
            rows.append({"image_path": str(path.resolve()), "report": report, "kind": kind, "ild": int(ild),
                         "truths": list(truths), "statements": list(said),
                         "scan_id": f"{scan_id}_{k:03d}", "patient_id": scan_id,
                         "subtype": phantom.labels["subtype"] or ""})
        bar.update(1)
    bar.close()
    atomic_write_text(recipe_path, json_text(described, notes_key=None))
    atomic_write_text(jsonl, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    return jsonl


def _model_identity(model: Optional[str]) -> Optional[str]:
    """A model name plus, for a checkpoint file, its size: a retrained stage-1 model invalidates the cache."""
    if model is None:
        return None
    path = Path(model[5:] if model.startswith("dapt:") else model)
    return f"{model}|{path.stat().st_size}|{int(path.stat().st_mtime)}" if path.is_file() else model


def read_pairs(jsonl) -> list:
    """``pairs.jsonl`` -> ``zeroshot_ild_train.data.PairRecord`` labelled by ``pair_labels``, patient = phantom."""
    from .data import PairRecord

    path = Path(jsonl)
    if not path.is_file():
        raise InputError(f"{path} does not exist: run `python -m zeroshot_ild_train.demo_model build` first")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "truths" not in row or "statements" not in row:
            raise InputError(f"{path} was built by an older recipe (no truths/statements per pair): build it again")
        out.append(PairRecord(image_path=row["image_path"], report=row["report"],
                              labels=pair_labels(row["truths"], row["statements"]), scan_id=row["scan_id"],
                              patient_id=row["patient_id"], source=row["scan_id"]))
    return out


def pair_labels(truths: Sequence[str], statements: Sequence[str]) -> tuple:
    """Label vector over ``CLASS_NAMES``: what the image shows (``STATEMENTS``), then what its caption says.

    Why not one class per pair: a fibrotic box is reticulation *and* honeycombing. With one class
    per caption, a box captioned "honeycombing" was a negative of every "reticulation" caption
    although it holds reticulation, so the model learnt to pick one pattern per box and
    "reticulation" under-read fibrotic lungs by half. Here a caption is a positive of every image
    it is true of (``losses.statement_targets``): "reticulation" of all boxes with reticulation,
    "no honeycombing" of every box without honeycombing, diseased or not.
    """
    unknown = sorted(set(truths) - set(STATEMENTS)) + sorted(set(statements) - set(STATEMENTS))
    if unknown:
        raise InputError(f"unknown statements {unknown}: expected some of {list(STATEMENTS)}")
    return (tuple(float(c in truths) for c in STATEMENTS) + tuple(float(c in statements) for c in STATEMENTS))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def demo_spec():
    """The ModelSpec of the demo model (random init; what the final checkpoint's metadata says)."""
    from ZeroShotILDLib.models import ModelSpec

    return ModelSpec(name="phantom-demo", architecture=ARCHITECTURE, quick_gelu=True, source="random",
                     image_mean=IMAGE_MEAN, image_std=IMAGE_STD, interpolation="bicubic",
                     description="Small CLIP trained from scratch on synthetic phantoms")


def write_initial_checkpoint(path, seed: int = 0) -> Path:
    """Random weights of the demo architecture as an engine checkpoint (DAPT's starting point).

    Built by the engine's own builder (seeded), so DAPT loads it with ``dapt:<path>`` like any
    other checkpoint and no registry entry is needed for the untrained model.
    """
    import torch

    from ZeroShotILDLib import models

    models._register_configs()
    spec = demo_spec()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _ = models._build(spec)
    return models.save_checkpoint(path, model, spec, extra={"training": {"note": "random initialisation"}})


def dapt_config(out_dir, init_checkpoint, *, max_steps: int, batch_size: int, learning_rate: float,
                loss: str = "unicl", seed: int = 0, progress: bool = True):
    """The DAPT settings of the demo recipe.

    ``augment=False``: the weak augmentation's brightness/contrast jitter (x0.5-2) would erase
    the density differences that *are* ground-glass opacity and fibrosis on a fixed lung window.
    UniCL with statement targets (``pair_labels``: a caption is a positive of every image it is true
    of): many pairs share a caption, which plain CLIP would treat as negatives of each other.
    """
    from .dapt import DaptConfig

    return DaptConfig(
        output_dir=str(out_dir), model=f"dapt:{init_checkpoint}", loss=loss,
        class_names=CLASS_NAMES if loss in ("unicl", "dlilp") else (), text_choice="findings+impression",
        sentences_per_sample=3, augment=False, batch_size=batch_size, learning_rate=learning_rate,
        weight_decay=0.1, warmup_steps=min(50, max(1, max_steps // 10)), max_epochs=1000, max_steps=max_steps,
        val_every_steps=max(50, max_steps // 4), patience_steps=10 * max_steps, top_k=1,
        accelerator="cpu", devices=1, precision="32-true", num_workers=0, seed=seed, progress_bar=progress,
    )


def export_demo_weights(checkpoint, output, *, training: Optional[dict] = None) -> Path:
    """Re-save a trained checkpoint as the shipped demo weights: fp16 tensors, clean metadata.

    Half precision halves the file (most of it is the 49,408-token embedding table); the engine
    loads it into its fp32 model, so inference is unchanged apart from fp16 rounding of weights.
    The benchmark is run on the exported file, rounding included.
    """
    from ZeroShotILDLib import models

    loaded = models.load_model(f"dapt:{checkpoint}", device="cpu")
    return models.save_checkpoint(output, loaded.model.half(), demo_spec(), extra={"training": training or {}})


def train(pairs_jsonl, out_dir, *, output=DEMO_WEIGHTS, init: Optional[str] = None, max_steps: int = 400,
          batch_size: int = 32, learning_rate: float = 5e-4, loss: str = "unicl", seed: int = 0,
          progress: bool = True) -> Path:
    """DAPT on the phantom pairs (one JSONL or several); writes fp16 demo weights to ``output``.

    ``init`` is the checkpoint to start from (stage 2 starts from stage 1); None starts from
    seeded random weights of the demo architecture.
    """
    from . import dapt

    paths = [pairs_jsonl] if isinstance(pairs_jsonl, (str, os.PathLike)) else list(pairs_jsonl)
    records = [r for p in paths for r in read_pairs(p)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if init is None:
        init = out_dir / "init.safetensors"
        if not init.is_file():
            write_initial_checkpoint(init, seed)
    config = dapt_config(out_dir / "dapt", init, max_steps=max_steps, batch_size=batch_size,
                         learning_rate=learning_rate, loss=loss, seed=seed, progress=progress)
    result = dapt.fit(config, records, resume=(out_dir / "dapt" / "checkpoints" / dapt.RESUME_NAME).exists())
    best = result.best_checkpoint or result.last_checkpoint
    recipes = [json.loads((Path(p).parent / "recipe.json").read_text(encoding="utf-8")) for p in paths
               if (Path(p).parent / "recipe.json").is_file()]
    training = {"dapt": config.to_json(), "recipes": recipes,
                "best_val_loss": result.best_val_loss, "global_step": result.global_step,
                "train_pairs": result.train_samples, "val_pairs": result.val_samples,
                # Read by the engine: scores of phantom-trained weights mean nothing on a real scan.
                "domain": "phantoms",
                "health": {"collapsed": bool(result.health.get("collapsed")),
                           "at_chance": bool(result.health.get("at_chance"))}}
    training["dapt"]["model"] = "random init" if init == out_dir / "init.safetensors" else Path(str(init)).name
    training["dapt"]["output_dir"] = ""
    return export_demo_weights(best, output, training=training)


# ----------------------------------------------------------------------------------------------
# Evaluation (training/demo_eval.py; re-exported here, where the recipe and its tests look for it)
# ----------------------------------------------------------------------------------------------
from .demo_eval import ScanScore, evaluate, markdown_summary, patches_touch_disease  # noqa: E402,F401


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zeroshot_ild_train.demo_model", description=__doc__.split("\n\n")[0])
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="phantoms -> cached training pairs")
    b.add_argument("--out", required=True)
    b.add_argument("--phantoms", type=int, default=PairRecipe.n_phantoms)
    b.add_argument("--seed", type=int, default=PairRecipe.cohort_seed)
    b.add_argument("--subtype", help="one ILD style for every positive phantom (default: the three, balanced)")
    b.add_argument("--positive-fraction", type=float, default=PairRecipe.positive_fraction,
                   help="share of the phantoms with ILD (default %(default)s)")
    b.add_argument("--with-pattern", action="append", default=[], metavar="PATTERN",
                   help="a pattern every positive phantom draws whatever its style's own draw (repeatable; "
                        "e.g. 'ground-glass opacity' with --subtype 'idiopathic pulmonary fibrosis')")
    b.add_argument("--retrieval-model", help="stage 2: montages retrieved by this (stage-1) model instead of "
                   "patch and ground-truth montage pairs")
    t = sub.add_parser("train", help="DAPT from scratch on the pairs -> demo weights")
    t.add_argument("--pairs", required=True, nargs="+", help="folder(s) written by `build`")
    t.add_argument("--init", help="checkpoint to start from (default: random weights)")
    t.add_argument("--out", required=True, help="folder for the DAPT run (checkpoints, logs)")
    t.add_argument("--weights", default=str(DEMO_WEIGHTS), help="where the fp16 demo weights are written")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--loss", default="unicl")
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="zero-shot benchmark on fresh phantoms")
    e.add_argument("--model", default="phantom-demo", help="registry name, dapt:<checkpoint> or a .safetensors path")
    e.add_argument("--phantoms", type=int, default=40)
    e.add_argument("--seed", type=int, default=777, help="cohort seed (training uses another)")
    e.add_argument("--shape", type=int, nargs=3, default=DEFAULT_GEOMETRIES[0].shape_zyx)
    e.add_argument("--spacing-mm", type=float, nargs=3, default=DEFAULT_GEOMETRIES[0].spacing_mm)
    e.add_argument("--prompt", default=DEFAULT_PROMPT)
    e.add_argument("--default-generator", action="store_true",
                   help="the generator's default 12-30 %% involvement instead of 3-100 %% (and fixed noise/lung density)")
    e.add_argument("--min-lung-fraction", type=float, default=0.1, help="patch level: boxes with at least this share of lung")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    e.add_argument("--out", help="JSON file for the full result (per-scan scores; no report text)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    try:
        if args.command == "build":
            recipe = PairRecipe(n_phantoms=args.phantoms, cohort_seed=args.seed, subtype=args.subtype,
                                positive_fraction=args.positive_fraction, with_patterns=tuple(args.with_pattern))
            path = build_pairs(args.out, recipe, retrieval_model=args.retrieval_model, progress=not args.quiet)
            print(f"{sum(1 for _ in open(path, encoding='utf-8'))} pairs in {path}")
        elif args.command == "train":
            path = train([Path(p) / "pairs.jsonl" for p in args.pairs], args.out, output=args.weights, init=args.init,
                         max_steps=args.steps,
                         batch_size=args.batch_size, learning_rate=args.lr, loss=args.loss, seed=args.seed,
                         progress=not args.quiet)
            print(f"demo weights written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
        else:
            geometry = PhantomGeometry(tuple(args.shape), tuple(args.spacing_mm))
            result = evaluate(args.model, n=args.phantoms, seed=args.seed, geometry=geometry, prompt=args.prompt,
                              cohort={} if args.default_generator else None, min_lung_fraction=args.min_lung_fraction,
                              bootstrap_resamples=args.bootstrap, progress=not args.quiet)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(Path(args.out), json_text(result))
            print(markdown_summary(result))
    except InputError as exc:
        print(f"demo_model: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
