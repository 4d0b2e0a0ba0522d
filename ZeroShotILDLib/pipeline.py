"""The whole chain, scan -> result, as one object that keeps what a new prompt can reuse.

``Analyzer.analyze`` runs lung mask -> candidate patches -> patch embeddings -> probabilities ->
ranking -> montage -> classification. The patch embeddings stay on the analyzer (and optionally in
an on-disk cache), so ``Analyzer.reprompt`` only encodes the new text and the new montage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from . import lung_mask as lung_mask_mod
from .classification import classify_montage, montage_features, subtype_pairs
from .embeddings import EmbeddingCache, ImageEncoder, cache_key, scan_fingerprint
from .errors import InputError
from .models import LoadedModel, load_model
from .montage import build_montage
from .patches import candidates_for, iter_patch_batches, patch_pixels, require_candidates
from .progress import CancelToken, ProgressCallback, resolve
from .ranking import rank_patches
from .results import AnalysisResult, PatchSet
from .scan import Scan, read_scan
from .scoring import TextEncoder, prompt_probabilities
from .settings import AnalysisSettings


@dataclass
class _ScanState:
    """What one analysed scan leaves behind for re-prompting."""

    scan: Scan
    lung_mask: np.ndarray
    lung_volume_ml: float
    patches: PatchSet
    features: np.ndarray  # (N, D) for every candidate (exact) or the exactly re-scored ones (fast)
    encoded_exactly: int
    notes: list
    timings_s: dict


class Analyzer:
    """Runs the pipeline for one settings object; reuses model, text and patch embeddings."""

    def __init__(self, settings: AnalysisSettings, *, progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None, model: Optional[LoadedModel] = None,
                 cache: Optional[EmbeddingCache] = None):
        self.settings = settings.validate()
        self.progress, self.cancel = resolve(progress, cancel)
        self._model = model
        self._encoder: Optional[ImageEncoder] = None
        self._text: Optional[TextEncoder] = None
        self.cache = cache if cache is not None else EmbeddingCache()
        self._state: Optional[_ScanState] = None

    # ------------------------------------------------------------------
    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            s = self.settings
            self.progress("loading model", 0, 1)
            self._model = load_model(s.model, checkpoint=s.checkpoint, weights_dir=s.weights_dir, device=s.device)
            self.progress("loading model", 1, 1)
        return self._model

    @property
    def encoder(self) -> ImageEncoder:
        if self._encoder is None:
            self._encoder = ImageEncoder(self.model, self.settings.batch_size)
        return self._encoder

    @property
    def text(self) -> TextEncoder:
        if self._text is None:
            self._text = TextEncoder(self.model)
        return self._text

    # ------------------------------------------------------------------
    def analyze(self, scan: Union[Scan, str]) -> AnalysisResult:
        """Full run on a scan (or a path to one)."""
        s = self.settings
        timings: dict = {}
        t0 = time.perf_counter()
        if not isinstance(scan, Scan):
            self.progress("reading scan", 0, 1)
            scan = read_scan(scan)
        timings["read_s"] = time.perf_counter() - t0

        t = time.perf_counter()
        mask = lung_mask_mod.segment_lungs(scan.hu, scan.spacing_mm, s.lung, progress=self.progress, cancel=self.cancel)
        volume_ml = lung_mask_mod.lung_volume_ml(mask, scan.spacing_mm)
        timings["lung_mask_s"] = time.perf_counter() - t
        self.cancel.raise_if_cancelled()

        t = time.perf_counter()
        patches = candidates_for(mask, scan.spacing_mm, s, scan.origin_mm, scan.direction)
        require_candidates(patches, scan.source or "the scan", s.filter_threshold)
        timings["patches_s"] = time.perf_counter() - t

        t = time.perf_counter()
        key = cache_key(scan_fingerprint(scan.hu, scan.spacing_mm), self.model.identity, s.patch_key(), s.scoring_mode)
        cached = self.cache.get(key)
        if cached is not None and cached["features"].shape[0] == len(patches):
            features = cached["features"]
            encoded = int(cached["encoded_exactly"])
            notes = list(scan.notes) + ["patch embeddings reused from the cache"]
        else:
            features, encoded = self._encode_all(scan, patches)
            notes = list(scan.notes)
            self.cache.put(key, {"features": features, "encoded_exactly": np.int64(encoded)})
        timings["encode_s"] = time.perf_counter() - t

        self._state = _ScanState(scan, mask, volume_ml, patches, features, encoded, notes, timings)
        result = self._score(s)
        result.timings_s["total_s"] = time.perf_counter() - t0
        return result

    def reprompt(self, prompts: Optional[Sequence[str]] = None, negatives: Optional[Sequence[str]] = None,
                 subtypes: Optional[Sequence[str]] = None, **overrides) -> AnalysisResult:
        """New prompts (and/or ranking settings) on the last analysed scan, without encoding patches again."""
        if self._state is None:
            raise InputError("no scan analysed yet: run analyze() before reprompt()")
        changes = dict(overrides)
        if prompts is not None:
            changes["prompts"] = list(prompts)
            changes["negatives"] = list(negatives) if negatives else None
        elif negatives is not None:
            changes["negatives"] = list(negatives)
        if subtypes is not None:
            changes["subtypes"] = list(subtypes)
        affects_patches = {"patch_mm", "patch_px", "stride_fraction", "slice_step_mm", "filter_threshold",
                           "hu_window", "lung", "model", "checkpoint", "weights_dir", "scoring_mode"}
        if affects_patches & set(changes):
            raise InputError(f"{sorted(affects_patches & set(changes))} change the patches: run analyze() again")
        import dataclasses

        settings = dataclasses.replace(self.settings, **changes).validate()
        self.settings = settings
        t0 = time.perf_counter()
        result = self._score(settings)
        result.timings_s = {"reprompt_s": time.perf_counter() - t0}
        return result

    # ------------------------------------------------------------------
    def _encode_all(self, scan: Scan, patches: PatchSet) -> tuple[np.ndarray, int]:
        s = self.settings
        size = self.model.image_size
        batches = iter_patch_batches(scan.hu, patches, np.arange(len(patches)), batch_size=self.encoder.batch_size,
                                     image_size=size, hu_window=s.hu_window)
        idx, feats = self.encoder.encode_batches(batches, len(patches), progress=self.progress, cancel=self.cancel)
        out = np.empty_like(feats)
        out[idx] = feats
        return out, len(patches)

    def _score(self, s: AnalysisSettings) -> AnalysisResult:
        st = self._state
        assert st is not None
        self.progress("scoring prompts", 0, 1)
        negatives = [s.negative_for(i) for i in range(len(s.prompts))]
        probs = prompt_probabilities(st.features, self.text, s.prompts, negatives)
        primary = probs[s.prompts[0]]
        ranked = rank_patches(primary, s.top_k, "clip")
        montage_idx = rank_patches(primary, s.montage_patches, s.retrieval, s.seed)
        notes = list(st.notes)
        if len(montage_idx) < s.montage_patches:
            notes.append(f"only {len(montage_idx)} candidate patches for a {s.montage_size}x{s.montage_size} montage; "
                         "the remaining cells are black")
        self.progress("building montage", 0, 1)
        pixels = patch_pixels(st.scan.hu, st.patches, montage_idx, image_size=self.model.image_size,
                              hu_window=s.hu_window)
        montage = build_montage(pixels, s.montage_size, self.model.image_size)
        feats = montage_features(self.encoder, montage)
        pairs = list(zip(s.prompts, negatives)) + subtype_pairs(s.subtypes)
        values = classify_montage(feats, self.text, pairs)
        findings = dict(zip(s.prompts, values[:len(s.prompts)]))
        subtypes = dict(zip(s.subtypes, values[len(s.prompts):]))
        if not self.model.spec.meaningful:
            notes.append(f"model '{self.model.spec.name}' has random weights: its scores are meaningless")
        self.progress("done", 1, 1)
        return AnalysisResult(
            settings=s, model_name=self.model.spec.name, model_meaningful=self.model.spec.meaningful,
            source=st.scan.source, shape_zyx=tuple(st.scan.hu.shape), spacing_mm=tuple(st.scan.spacing_mm),
            lung_mask=st.lung_mask, lung_volume_ml=st.lung_volume_ml, patches=st.patches, patch_probabilities=probs,
            ranked=ranked, montage_indices=montage_idx, montage=montage, finding_probabilities=findings,
            subtype_probabilities=subtypes, notes=notes, timings_s=dict(st.timings_s),
            encoded_exactly=st.encoded_exactly,
        )

    @property
    def scan(self) -> Optional[Scan]:
        return self._state.scan if self._state else None


def analyze(scan: Union[Scan, str], settings: Optional[AnalysisSettings] = None, **kwargs) -> AnalysisResult:
    """One-shot convenience: ``Analyzer(settings, **kwargs).analyze(scan)``."""
    return Analyzer(settings or AnalysisSettings(), **kwargs).analyze(scan)
