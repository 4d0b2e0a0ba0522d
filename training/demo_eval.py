"""The demo model's benchmark on fresh phantoms: patch AUROC per style and per pattern prompt, scan AUROC.

Per scan of a fresh cohort (seeds never used in training; the wide generator: 3-100 % of the lung
involved, UIP-, NSIP- and HP-like, noise and lung density drawn per phantom):

- **scan level**: one ``Analyzer.analyze`` with the engine's defaults (own lung segmentation, every
  box holding lung scored, CLIP retrieval of 16 boxes, 4 x 4 montage classified with
  ``prompt`` vs ``no {prompt}``) and one ``reprompt(retrieval="random")`` on the same embeddings
  (the random-retrieval baseline). AUROC of the montage probability, diseased vs normal scans.
- **patch level**: the engine's candidate boxes on the *true* lung mask down to
  ``min_lung_fraction`` of lung (boxes at the pleura included), cut by ``patch_pixels``, encoded by
  the analyzer's own image encoder and scored by ``prompt_probabilities`` (softmax over
  ``[prompt, "no prompt"]``, as the engine scores a patch). Positives: disease over >= half of the
  box's lung (for a pattern prompt: that pattern's region over >= half); negatives: boxes without
  any disease voxel, from every scan. AUROC per style (default prompt, positives from that style's
  scans) and per pattern prompt, and, for each pattern, against the *other* diseased boxes
  (pattern-free disease) as a specificity check.

CIs are 95 % bootstrap intervals; for patch AUROCs the scans are resampled (boxes of one scan are
not independent), for the scan AUROC the scans themselves.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from ZeroShotILDLib.settings import DEFAULT_PROMPT, AnalysisSettings

#: Patterns with their own prompt in the benchmark (each scored against "no <pattern>").
PATTERN_PROMPTS = ("honeycombing", "reticulation", "ground-glass opacity")
#: The fresh cohort's generator options (the training mix's ranges).
EVAL_COHORT = {"involvement": (0.03, 1.0), "noise_hu": (8.0, 40.0), "lung_hu": (-880.0, -815.0)}
STYLE_NAMES = {"idiopathic pulmonary fibrosis": "UIP-like (IPF)", "systemic sclerosis": "NSIP-like (SSc)",
               "hypersensitivity pneumonitis": "HP-like (HP)"}


def patches_touch_disease(disease_mask: np.ndarray, patches, indices) -> list:
    """For each chosen box: does it contain any ground-truth disease voxel (reader-study analogue)."""
    rows, cols = patches.size_rows, patches.size_cols
    return [bool(disease_mask[int(patches.slice_index[i]), int(patches.row0[i]):int(patches.row0[i]) + rows,
                              int(patches.col0[i]):int(patches.col0[i]) + cols].any()) for i in indices]


@dataclass
class ScanScore:
    scan_id: str
    ild: int
    subtype: str
    p_clip: float
    p_random: float
    touch_clip: list
    touch_random: list
    candidates: int
    involvement: float = 0.0
    disease_fraction: float = 0.0
    #: Patch level: counts of boxes per label (the scores themselves are kept out of the JSON).
    patch_counts: dict = field(default_factory=dict)


@dataclass
class _PatchTable:
    """Every scored box of the cohort: scan index, labels and one probability per prompt."""

    scan: list = field(default_factory=list)
    diseased: list = field(default_factory=list)   # disease over >= half the box's lung
    clean: list = field(default_factory=list)      # no disease voxel in the box
    pattern: dict = field(default_factory=dict)    # name -> pattern over >= half the box's lung
    pattern_free: dict = field(default_factory=dict)  # name -> no voxel of the pattern
    probs: dict = field(default_factory=dict)      # prompt -> probability

    def add(self, scan_index, diseased, clean, pattern, pattern_free, probs):
        self.scan.append(np.full(len(diseased), scan_index))
        self.diseased.append(diseased)
        self.clean.append(clean)
        for name in PATTERN_PROMPTS:
            self.pattern.setdefault(name, []).append(pattern[name])
            self.pattern_free.setdefault(name, []).append(pattern_free[name])
        for prompt, p in probs.items():
            self.probs.setdefault(prompt, []).append(p)

    def arrays(self):
        cat = np.concatenate
        return (cat(self.scan), cat(self.diseased), cat(self.clean), {k: cat(v) for k, v in self.pattern.items()},
                {k: cat(v) for k, v in self.pattern_free.items()}, {k: cat(v) for k, v in self.probs.items()})


def clustered_auroc(y: np.ndarray, score: np.ndarray, groups: np.ndarray, *, n_resamples: int = 1000,
                    seed: int = 0) -> dict:
    """AUROC with a 95 % CI from resampling ``groups`` (scans) with replacement."""
    from .metrics import roc_auc

    y = np.asarray(y, bool)
    out = {"auroc": float("nan"), "ci95": [float("nan"), float("nan")], "n_positive": int(y.sum()),
           "n_negative": int((~y).sum())}
    if y.all() or not y.any():
        return out
    out["auroc"] = float(roc_auc(y.astype(int), score))
    if n_resamples <= 0:
        return out
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in ids}
    values = []
    for _ in range(n_resamples):
        take = np.concatenate([members[g] for g in rng.choice(ids, size=ids.size, replace=True)])
        yy = y[take]
        if yy.all() or not yy.any():
            continue
        values.append(roc_auc(yy.astype(int), score[take]))
    if values:
        out["ci95"] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    return out


def _box_shares(mask, lung_mask, patches):
    """(share of each box's lung inside ``mask``, any voxel of ``mask`` in the box)."""
    rows, cols = patches.size_rows, patches.size_cols
    share = np.zeros(len(patches))
    touch = np.zeros(len(patches), bool)
    for i in range(len(patches)):
        z, r, c = int(patches.slice_index[i]), int(patches.row0[i]), int(patches.col0[i])
        m = mask[z, r:r + rows, c:c + cols]
        lung = lung_mask[z, r:r + rows, c:c + cols]
        n = int(lung.sum())
        share[i] = (m & lung).sum() / n if n else 0.0
        touch[i] = bool(m.any())
    return share, touch


def evaluate(model: str = "phantom-demo", *, n: int = 40, seed: int = 777, geometry=None,
             prompt: str = DEFAULT_PROMPT, patterns: Sequence[str] = PATTERN_PROMPTS,
             cohort: Optional[dict] = None, min_lung_fraction: float = 0.1, bootstrap_resamples: int = 1000,
             progress: bool = True) -> dict:
    """The benchmark (module docstring) on ``n`` fresh phantoms; returns a JSON-ready dict.

    ``cohort``: ``generate_cohort`` keywords (default ``EVAL_COHORT``: 3-100 % involvement, noise
    and lung density drawn per phantom; ``{}`` gives the generator's default 12-30 %).
    """
    from dataclasses import replace

    from tqdm import tqdm

    from ZeroShotILDLib.patches import candidates_for, patch_pixels
    from ZeroShotILDLib.phantom import generate_cohort
    from ZeroShotILDLib.pipeline import Analyzer
    from ZeroShotILDLib.scan import scan_from_array
    from ZeroShotILDLib.scoring import prompt_probabilities

    from .demo_model import DEFAULT_GEOMETRIES
    from .metrics import bootstrap_ci, roc_auc
    from .reader_study import patch_overlap_percent

    geometry = geometry or DEFAULT_GEOMETRIES[0]
    cohort = dict(EVAL_COHORT if cohort is None else cohort)
    settings = AnalysisSettings(model=model, device="cpu", prompts=[prompt]).validate()
    analyzer = Analyzer(settings)
    boxes = replace(settings, filter_threshold=min_lung_fraction)
    prompts = [prompt, *patterns]
    negatives = [f"no {p}" for p in prompts]
    table = _PatchTable()
    scores = []
    phantoms = generate_cohort(n, seed=seed, shape_zyx=geometry.shape_zyx, spacing_mm=geometry.spacing_mm, **cohort)
    for i, phantom in enumerate(tqdm(phantoms, total=n, desc="evaluating", disable=not progress, file=sys.stderr)):
        scan = scan_from_array(phantom.hu, phantom.spacing_mm, phantom.origin_mm, phantom.direction, source=f"eval{i}")
        result = analyzer.analyze(scan)
        random_result = analyzer.reprompt(retrieval="random", seed=i)
        analyzer.settings = settings  # reprompt changed the retrieval; the next scan uses CLIP again

        # Patch level: every box with lung, scored as the engine scores a patch.
        patches = candidates_for(phantom.lung_mask, phantom.spacing_mm, boxes)
        pixels = patch_pixels(phantom.hu, patches, np.arange(len(patches)), image_size=analyzer.model.image_size,
                              hu_window=settings.hu_window)
        feats = analyzer.encoder.encode(pixels).numpy()
        probs = prompt_probabilities(feats, analyzer.text, prompts, negatives)
        share, touch = _box_shares(phantom.disease_mask, phantom.lung_mask, patches)
        pattern, pattern_free = {}, {}
        for name in PATTERN_PROMPTS:
            p_share, p_touch = _box_shares(phantom.pattern_mask(name), phantom.lung_mask, patches)
            pattern[name], pattern_free[name] = p_share >= 0.5, ~p_touch
        table.add(i, share >= 0.5, ~touch, pattern, pattern_free, probs)

        scores.append(ScanScore(
            scan_id=f"seed{phantom.labels['seed']}", ild=int(phantom.labels["ild"]), subtype=phantom.labels["subtype"] or "",
            p_clip=float(result.finding_probabilities[prompt]), p_random=float(random_result.finding_probabilities[prompt]),
            touch_clip=patches_touch_disease(phantom.disease_mask, result.patches, result.montage_indices),
            touch_random=patches_touch_disease(phantom.disease_mask, result.patches, random_result.montage_indices),
            candidates=len(result.patches), involvement=float(phantom.labels.get("involvement") or 0.0),
            disease_fraction=float(phantom.labels["disease_fraction"]),
            patch_counts={"boxes": len(patches), "diseased": int((share >= 0.5).sum()), "clean": int((~touch).sum()),
                          **{name: int(pattern[name].sum()) for name in PATTERN_PROMPTS}}))

    y = np.array([s.ild for s in scores])
    out = {"model": model, "prompt": prompt, "n_scans": len(scores), "n_positive": int(y.sum()), "cohort_seed": seed,
           "geometry": asdict(geometry), "cohort": {k: list(v) if isinstance(v, tuple) else v for k, v in cohort.items()},
           "min_lung_fraction": min_lung_fraction, "settings": settings.to_dict()}
    for method in ("clip", "random"):
        p = np.array([getattr(s, f"p_{method}") for s in scores])
        est = bootstrap_ci(roc_auc, y, p, n_resamples=bootstrap_resamples, seed=0)
        touches = [getattr(s, f"touch_{method}") for s in scores if s.ild]
        out[method] = {"auroc": est.value, "auroc_ci95": [est.ci_low, est.ci_high],
                       "overlap_percent_positive": patch_overlap_percent(touches),
                       "patches_touching_per_positive": [int(sum(t)) for t in touches]}

    groups, diseased, clean, pat, pat_free, probs = table.arrays()
    subtype_of = np.array([s.subtype for s in scores])[groups]
    patch = {}
    for sub, name in STYLE_NAMES.items():
        keep = (diseased & (subtype_of == sub)) | clean
        patch[f"{prompt} | {name}"] = clustered_auroc(diseased[keep], probs[prompt][keep], groups[keep],
                                                       n_resamples=bootstrap_resamples)
    keep = diseased | clean
    patch[f"{prompt} | all styles"] = clustered_auroc(diseased[keep], probs[prompt][keep], groups[keep],
                                                      n_resamples=bootstrap_resamples)
    for name in patterns:
        keep = pat[name] | clean
        patch[f"{name} | vs normal"] = clustered_auroc(pat[name][keep], probs[name][keep], groups[keep],
                                                      n_resamples=bootstrap_resamples)
        # specificity: the pattern's boxes against diseased boxes without any of it
        keep = pat[name] | (diseased & pat_free[name])
        patch[f"{name} | vs other disease"] = clustered_auroc(pat[name][keep], probs[name][keep], groups[keep],
                                                             n_resamples=bootstrap_resamples)
    out["patch"] = patch
    out["scans"] = [asdict(s) for s in scores]
    return out


def markdown_summary(result: dict) -> str:
    """The benchmark's tables (scan level, then patch level) in Markdown."""
    lines = ["| scan level: montage P(finding), diseased vs normal scans | AUROC (95 % CI) | % of montage patches on disease (positives) |",
             "|---|---|---|"]
    for method in ("clip", "random"):
        r = result[method]
        lines.append(f"| {method} retrieval | {r['auroc']:.3f} [{r['auroc_ci95'][0]:.3f}, {r['auroc_ci95'][1]:.3f}] "
                     f"| {r['overlap_percent_positive']:.1f} |")
    if "patch" in result:
        lines += ["", "| patch level: prompt \\| positives vs negatives | positives / negatives | AUROC (95 % CI, scans resampled) |",
                  "|---|---|---|"]
        for key, r in result["patch"].items():
            prompt, what = key.split(" | ")
            desc = {"vs normal": "boxes on the pattern vs disease-free boxes",
                    "vs other disease": "boxes on the pattern vs diseased boxes without it"}.get(
                what, f"diseased boxes ({what}) vs disease-free boxes")
            lines.append(f"| \"{prompt}\" \\| {desc} | {r['n_positive']} / {r['n_negative']} | "
                         f"{r['auroc']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] |")
    return "\n".join(lines)
