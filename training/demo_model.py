"""The phantom-trained demo model: training pairs from phantoms, DAPT from scratch, and its benchmark.

The engine's ``demo`` needs a model whose scores mean something offline, where no pretrained
weights exist. This module trains a small CLIP (``model_configs/zsild-phantom.json``) from random
weights on synthetic phantoms (``ZeroShotILDLib.phantom``) with the DAPT trainer
(``training.dapt.fit``), and measures it with the engine's own pipeline on phantoms it never saw.

Why the pairs look the way they do: at test time the engine scores *single* lung patches
(upscaled to the model's input size) against "interstitial lung disease" / "no interstitial lung
disease", puts the most probable 16 into a 4 x 4 montage and classifies the *montage* with the
same prompt pair. A model trained on montages alone never sees a single upscaled patch, so the
retrieval step would be guesswork. Each training phantom therefore gives

- ``patch`` pairs: patch crops inside the ground-truth disease mask paired with a short report
  that describes disease, and crops with no disease (from normal and from diseased lungs) paired
  with one that describes normal lung. Normal crops are partly the densest lung boxes (vessels,
  hila, dependent atelectasis): the normal patches a retrieval step would otherwise pick;
- ``report`` pairs: the scan's montage (random retrieval, built by
  ``ZeroShotILDLib.pipeline.montage_for_scan`` exactly as the DAPT preprocessing builds it) with
  the phantom's full report (FINDINGS + IMPRESSION, three sentences sampled per step);
- ``retrieved`` pairs: a montage of the patches a good retrieval would pick (diseased boxes of a
  diseased lung, the densest boxes of a normal one) with the same report, i.e. what the montage
  classifier is shown at test time;
- stage 2, ``model-retrieved`` pairs: montages that the stage-1 model itself retrieves through
  the engine's ``Analyzer`` (paper 000's best configuration, where the DAPT model both picks the
  patches and classifies the montage). After stage 1 the retrieval is right but what the model
  picks from a *normal* lung is its own hardest negative, and the montage classifier must learn
  to reject exactly that.

All pixels come from the engine (``candidates_for``, ``patch_pixels``, ``build_montage``); nothing
here re-implements patch extraction or montage building. Captions are built from the phantom's
ground-truth labels; they use the engine's default prompt wording, so the zero-shot prompt pair is
in the vocabulary the text tower was trained on.

Commands (``python -m training.demo_model ...``; ``scripts/train_demo_model.sh`` runs the recipe)::

    build     --out DIR [--retrieval-model M]      phantoms -> cached pair PNGs + pairs.jsonl
    train     --pairs DIR... --out DIR [--init C]  DAPT (training.dapt.fit) -> weights (safetensors, fp16)
    evaluate  --model M --out FILE                 fresh phantoms: zero-shot AUROC (95 % CI) and montage
                                                   overlap with the disease mask, CLIP vs random retrieval

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
from ZeroShotILDLib.settings import DEFAULT_PROMPT, AnalysisSettings
from ZeroShotILDLib.outputs import json_text
from training.files import atomic_path, atomic_write_text

#: The architecture of the demo model (``ZeroShotILDLib/model_configs/zsild-phantom.json``).
ARCHITECTURE = "zsild-phantom"
#: Where the committed weights live (the registry's ``phantom-demo`` entry points here).
DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "ZeroShotILDLib" / "weights" / "phantom_demo.safetensors"
#: Label classes of every pair (UniCL targets: pairs sharing a class are positives of each other).
CLASS_NAMES = ("ild", "no ild")
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


#: Training resolutions: coarse (cheap, most of the data) and near the demo's 1.4 mm, so the
#: 32 mm patches are seen at both 13 and ~20 native pixels before upscaling.
DEFAULT_GEOMETRIES = (
    PhantomGeometry((48, 128, 128), (2.5, 2.5, 2.5)),
    PhantomGeometry((56, 176, 176), (1.8, 1.8, 3.0)),
)


@dataclass(frozen=True)
class PairRecipe:
    """What :func:`build_pairs` draws from each phantom."""

    n_phantoms: int = 120
    cohort_seed: int = 20240
    geometries: tuple = DEFAULT_GEOMETRIES
    #: Diseased boxes per positive phantom (disease fraction of the box >= ``disease_min_fraction``).
    patches_diseased: int = 14
    #: Disease-free boxes per phantom: half random, half the densest (hard negatives).
    patches_normal: int = 10
    disease_min_fraction: float = 0.2
    #: Extra ``retrieved`` montages per phantom (each a new draw of 16 boxes).
    retrieved_montages: int = 2
    image_size: int = 64

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
    "Normal lung.",
)
_NORMAL_FINDINGS = (
    "Normal lung parenchyma.", "The lungs are clear.", "No reticulation, ground-glass opacity or honeycombing.",
    "No interstitial abnormality.",
)
_PATTERN_FINDINGS = {
    "reticulation": ("Reticulation.", "Subpleural reticulation."),
    "honeycombing": ("Honeycombing.", "Subpleural honeycombing."),
    "ground-glass opacity": ("Ground-glass opacity.", "Ground-glass opacity in the affected lung."),
    "traction bronchiectasis": ("Traction bronchiectasis.",),
    "centrilobular nodules": ("Centrilobular nodules.",),
    "mosaic attenuation": ("Mosaic attenuation.",),
}


def patch_caption(diseased: bool, patterns: Sequence[str], subtype: Optional[str], rng: np.random.Generator) -> str:
    """A short report for one patch crop, built from the phantom's ground truth.

    Diseased: one of the phantom's patterns as FINDINGS and an ILD impression (sometimes naming
    the subtype, so the subtype prompts mean something too). Normal: a normal-lung finding and a
    negated impression. Both follow the FINDINGS/IMPRESSION layout of the phantom reports, so one
    ``text_choice`` serves every pair.
    """
    if diseased:
        options = [s for p in patterns for s in _PATTERN_FINDINGS.get(p, ())] or ["Interstitial abnormality."]
        finding = options[int(rng.integers(len(options)))]
        impression = _ILD_IMPRESSIONS[int(rng.integers(len(_ILD_IMPRESSIONS)))]
        if subtype and rng.random() < 0.3:
            impression = f"{subtype[0].upper()}{subtype[1:]}."
    else:
        finding = _NORMAL_FINDINGS[int(rng.integers(len(_NORMAL_FINDINGS)))]
        impression = _NORMAL_IMPRESSIONS[int(rng.integers(len(_NORMAL_IMPRESSIONS)))]
    return f"FINDINGS:\nLUNG PARENCHYMA: {finding}\n\nIMPRESSION:\n{impression}"


def box_disease_fraction(disease_mask: np.ndarray, patches) -> np.ndarray:
    """Fraction of each candidate box (one axial slice) covered by the ground-truth disease mask."""
    out = np.empty(len(patches), dtype=np.float64)
    rows, cols = patches.size_rows, patches.size_cols
    for i in range(len(patches)):
        z, r, c = int(patches.slice_index[i]), int(patches.row0[i]), int(patches.col0[i])
        out[i] = disease_mask[z, r:r + rows, c:c + cols].mean()
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
    from ZeroShotILDLib.montage import build_montage
    from ZeroShotILDLib.patches import candidates_for, patch_pixels
    from ZeroShotILDLib.pipeline import montage_for_scan
    from ZeroShotILDLib.scan import scan_from_array

    settings = AnalysisSettings(retrieval="random", seed=int(rng.integers(2**31)), device="cpu").validate()
    size = recipe.image_size
    labels = phantom.labels
    ild = bool(labels["ild"])
    out = PhantomPairs(scan_id)
    # Candidates on the true lung mask: the boxes the engine would offer, labelled by the truth.
    patches = candidates_for(phantom.lung_mask, phantom.spacing_mm, settings)
    if len(patches) < 16:
        raise InputError(f"phantom {scan_id} has only {len(patches)} candidate patches: use a larger shape")
    disease = box_disease_fraction(phantom.disease_mask, patches)
    density = box_mean_hu(phantom.hu, patches)
    clean = np.flatnonzero(disease == 0)
    dense_clean = clean[np.argsort(-density[clean], kind="stable")][: max(16, 3 * recipe.patches_normal)]

    def pick(pool: np.ndarray, k: int) -> np.ndarray:
        return rng.choice(pool, size=min(k, pool.size), replace=False) if pool.size else pool

    def crops(indices: np.ndarray) -> np.ndarray:
        pixels = patch_pixels(phantom.hu, patches, indices, image_size=size, hu_window=settings.hu_window)
        return (pixels[:, 0].numpy() * 255.0 + 0.5).astype(np.uint8)

    # Single patches.
    diseased_pool = np.flatnonzero(disease >= recipe.disease_min_fraction) if ild else np.zeros(0, int)
    chosen_d = pick(diseased_pool, recipe.patches_diseased)
    half = recipe.patches_normal // 2
    chosen_n = np.unique(np.concatenate([pick(clean, recipe.patches_normal - half), pick(dense_clean, half)]))
    for image in crops(chosen_d):
        out.items.append(("patch", image, patch_caption(True, labels["patterns"], labels["subtype"], rng), True))
    for image in crops(chosen_n):
        out.items.append(("patch", image, patch_caption(False, (), None, rng), False))

    # The scan's montage as DAPT preprocessing builds it (random retrieval), with the report.
    scan = scan_from_array(phantom.hu, phantom.spacing_mm, phantom.origin_mm, phantom.direction, source=scan_id)
    montage, _ = montage_for_scan(scan, settings, image_size=size)
    out.items.append(("report", montage, phantom.report, ild))

    # Montages of what a good retrieval picks: diseased boxes, or the densest normal boxes.
    if ild:
        touched = np.flatnonzero(disease > 0)
        pool = diseased_pool if diseased_pool.size >= 16 else touched[np.argsort(-disease[touched], kind="stable")][:16]
    else:
        pool = dense_clean
    for _ in range(recipe.retrieved_montages):
        chosen = pick(pool, 16)
        pixels = patch_pixels(phantom.hu, patches, chosen, image_size=size, hu_window=settings.hu_window)
        out.items.append(("retrieved", build_montage(pixels, 4, size), phantom.report, ild))
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
        out.items.append(("model-retrieved", build_montage(pixels, 4, image_size), phantom.report, ild))
    return out


def iter_phantoms(n: int, seed: int, geometries: Sequence[PhantomGeometry]) -> Iterator[tuple]:
    """(scan_id, phantom) for a balanced cohort, cycling through ``geometries``."""
    from ZeroShotILDLib.phantom import generate_cohort

    per = [n // len(geometries) + (1 if i < n % len(geometries) else 0) for i in range(len(geometries))]
    for g_index, (geometry, count) in enumerate(zip(geometries, per)):
        cohort = generate_cohort(count, seed=seed + 7919 * g_index, shape_zyx=geometry.shape_zyx,
                                 spacing_mm=geometry.spacing_mm)
        for i, phantom in enumerate(cohort):
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
    for scan_id, phantom in iter_phantoms(recipe.n_phantoms, recipe.cohort_seed, recipe.geometries):
        rng = np.random.default_rng([recipe.cohort_seed, int(phantom.labels["seed"])])
        if analyzer is None:
            pairs = phantom_pairs(phantom, scan_id, recipe, rng)
        else:
            pairs = model_retrieved_pairs(phantom, scan_id, analyzer, recipe.image_size, rng)
        for k, (kind, image, report, ild) in enumerate(pairs.items):
            path = out_dir / "images" / f"{scan_id}_{k:03d}.png"
            with atomic_path(path) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
            rows.append({"image_path": str(path.resolve()), "report": report, "kind": kind, "ild": int(ild),
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
    """``pairs.jsonl`` -> ``training.data.PairRecord`` with (ild, no ild) labels, patient = phantom."""
    from .data import PairRecord

    path = Path(jsonl)
    if not path.is_file():
        raise InputError(f"{path} does not exist: run `python -m training.demo_model build` first")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out.append(PairRecord(image_path=row["image_path"], report=row["report"],
                              labels=(float(row["ild"]), float(1 - row["ild"])), scan_id=row["scan_id"],
                              patient_id=row["patient_id"], source=row["scan_id"]))
    return out



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
    UniCL with (ild, no ild) labels: many pairs share a caption, which plain CLIP would treat as
    negatives of each other.
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
                "train_pairs": result.train_samples, "val_pairs": result.val_samples}
    training["dapt"]["model"] = "random init" if init == out_dir / "init.safetensors" else Path(str(init)).name
    training["dapt"]["output_dir"] = ""
    return export_demo_weights(best, output, training=training)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
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


def evaluate(model: str = "phantom-demo", *, n: int = 40, seed: int = 777, geometry: PhantomGeometry = DEFAULT_GEOMETRIES[0],
             prompt: str = DEFAULT_PROMPT, bootstrap_resamples: int = 1000, progress: bool = True) -> dict:
    """Zero-shot benchmark on ``n`` fresh phantoms (half with ILD) with the engine's default pipeline.

    Per scan, one ``Analyzer.analyze`` (lung segmentation, every candidate patch encoded, CLIP
    retrieval of 16 patches, 4 x 4 montage classified with ``prompt`` vs ``no {prompt}``) and one
    ``reprompt(retrieval="random")`` (the same patch embeddings, a seeded random montage): the
    random-retrieval baseline of the same run. Returns AUROC with bootstrap 95 % CIs for both
    retrievals and the mean percentage of montage patches touching the true disease mask on
    positive scans.
    """
    from tqdm import tqdm

    from ZeroShotILDLib.phantom import generate_cohort
    from ZeroShotILDLib.pipeline import Analyzer
    from ZeroShotILDLib.scan import scan_from_array

    from .metrics import bootstrap_ci, roc_auc
    from .reader_study import patch_overlap_percent

    settings = AnalysisSettings(model=model, device="cpu", prompts=[prompt]).validate()
    analyzer = Analyzer(settings)
    scores = []
    cohort = generate_cohort(n, seed=seed, shape_zyx=geometry.shape_zyx, spacing_mm=geometry.spacing_mm)
    for i, phantom in enumerate(tqdm(cohort, total=n, desc="evaluating", disable=not progress, file=sys.stderr)):
        scan = scan_from_array(phantom.hu, phantom.spacing_mm, phantom.origin_mm, phantom.direction, source=f"eval{i}")
        result = analyzer.analyze(scan)
        random_result = analyzer.reprompt(retrieval="random", seed=i)
        scores.append(ScanScore(
            scan_id=f"seed{phantom.labels['seed']}", ild=int(phantom.labels["ild"]), subtype=phantom.labels["subtype"] or "",
            p_clip=float(result.finding_probabilities[prompt]), p_random=float(random_result.finding_probabilities[prompt]),
            touch_clip=patches_touch_disease(phantom.disease_mask, result.patches, result.montage_indices),
            touch_random=patches_touch_disease(phantom.disease_mask, result.patches, random_result.montage_indices),
            candidates=len(result.patches)))
        analyzer.settings = settings  # reprompt changed the retrieval; the next scan uses CLIP again
    y = np.array([s.ild for s in scores])
    out = {"model": model, "prompt": prompt, "n_scans": len(scores), "n_positive": int(y.sum()), "cohort_seed": seed,
           "geometry": asdict(geometry), "settings": settings.to_dict()}
    for method in ("clip", "random"):
        p = np.array([getattr(s, f"p_{method}") for s in scores])
        est = bootstrap_ci(roc_auc, y, p, n_resamples=bootstrap_resamples, seed=0)
        touches = [getattr(s, f"touch_{method}") for s in scores if s.ild]
        out[method] = {"auroc": est.value, "auroc_ci95": [est.ci_low, est.ci_high],
                       "overlap_percent_positive": patch_overlap_percent(touches),
                       "patches_touching_per_positive": [int(sum(t)) for t in touches]}
    out["scans"] = [asdict(s) for s in scores]
    return out


def markdown_summary(result: dict) -> str:
    lines = ["| retrieval | AUROC (95 % CI) | % of montage patches on disease (positives) |",
             "|---|---|---|"]
    for method in ("clip", "random"):
        r = result[method]
        lines.append(f"| {method} | {r['auroc']:.3f} [{r['auroc_ci95'][0]:.3f}, {r['auroc_ci95'][1]:.3f}] "
                     f"| {r['overlap_percent_positive']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.demo_model", description=__doc__.split("\n\n")[0])
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="phantoms -> cached training pairs")
    b.add_argument("--out", required=True)
    b.add_argument("--phantoms", type=int, default=PairRecipe.n_phantoms)
    b.add_argument("--seed", type=int, default=PairRecipe.cohort_seed)
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
    e.add_argument("--out", help="JSON file for the full result (per-scan scores; no report text)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build":
            recipe = PairRecipe(n_phantoms=args.phantoms, cohort_seed=args.seed)
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
                              progress=not args.quiet)
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
