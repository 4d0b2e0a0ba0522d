"""The whole chain, scan -> result, as one object that keeps what a new prompt can reuse.

``Analyzer.analyze`` runs lung mask -> candidate patches -> patch embeddings -> probabilities ->
ranking -> montage -> classification. The patch embeddings stay on the analyzer (and optionally in
an on-disk cache), so ``Analyzer.reprompt`` only encodes the new text and the new montage.

In fast mode the exactly re-scored candidates are the best ones *for the prompt that was analysed*;
a re-prompt ranks the new prompt from the kept (partly proposal-pass) features, which is an instant
preview. ``Analyzer.reprompt(..., exact=True)`` then encodes what the new prompt's answer needs
(proposal-pass neighbours of its best boxes, fp32 features of its best candidates), exactly as a
fresh analysis with that prompt on the same embeddings would, so the result equals that run.
Without native bf16 the proposal pass is the fp32 model itself (see ``proposals``): its encodings
are exact rows, and the exact re-prompt continues its best-first search for the new prompt.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from . import extent as extent_mod
from . import lung_mask as lung_mask_mod
from . import patterns as patterns_mod
from . import proposals
from .classification import classify_montage, montage_features, subtype_pairs
from .embeddings import EmbeddingCache, ImageEncoder, cache_key, scan_fingerprint
from .errors import InputError
from .file_hashes import sha256_file
from .models import LoadedModel, load_model, read_checkpoint_metadata
from .montage import build_montage
from . import calibration
from .patches import (candidates_for, iter_patch_batches, patch_pixels, require_candidates, scored_patches,
                      slice_step_voxels)
from .progress import CancelToken, ProgressCallback, resolve
from .ranking import rank_patches
from .results import AnalysisResult, PatchSet, model_warning
from .phantom_signature import carries_signature
from .scan import Scan, read_scan
from .scoring import TextEncoder, prompt_probabilities, softmax_probability
from .settings import AnalysisSettings


@dataclass
class _ScanState:
    """What one analysed scan leaves behind for re-prompting."""

    scan: Scan
    lung_mask: np.ndarray
    lung_volume_ml: float
    patches: PatchSet
    #: (N, D) unit features: full-resolution rows where ``exact``, proposal-pass rows elsewhere (fast mode).
    features: np.ndarray
    exact: np.ndarray  # (N,) bool
    #: (prompt, negative) whose proposal ranking chose the exactly re-scored set; None when all are exact.
    rescored_for: Optional[tuple]
    notes: list
    timings_s: dict
    #: The embedding record behind ``features`` (as cached): exact rows, proposal-pass rows and which are
    #: encoded; a later exact re-scoring continues from it when the cache has dropped the entry.
    record: Optional[dict] = None
    #: (N + 1, 12) lung mL per candidate and zone code (extent.zone_volume_table), and the zone geometry.
    zone_table: Optional[np.ndarray] = None
    zones: Optional[dict] = None
    #: (N, 6) grid neighbours of each box (extent.box_neighbours), for the extent's region rule.
    neighbours: Optional[np.ndarray] = None
    #: Whether the voxels carry the phantom generator's signature (read once per scan).
    is_phantom: bool = False

    @property
    def encoded_exactly(self) -> int:
        return int(np.count_nonzero(self.exact))


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
        self._fast_model = None  # the bf16 proposal tower, built on first use (False: none on this device)
        self._weights_sha256: Optional[str] = None  # of the loaded weights, for the extent references
        self._weights_provenance: Optional[tuple] = None  # (training domain, health verdict) of the loaded weights

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
    def analyze(self, scan: Union[Scan, str], lung_mask: Optional[np.ndarray] = None) -> AnalysisResult:
        """Full run on a scan (or a path to one); ``lung_mask`` skips the segmentation when given."""
        s = self.settings
        timings: dict = {}
        t0 = time.perf_counter()
        if not isinstance(scan, Scan):
            self.progress("reading scan", 0, 1)
            scan = read_scan(scan)
        timings["read_s"] = time.perf_counter() - t0

        t = time.perf_counter()
        if lung_mask is not None:
            if lung_mask.shape != scan.hu.shape:
                raise InputError(f"lung mask shape {lung_mask.shape} differs from the scan's {scan.hu.shape}")
            mask = lung_mask.astype(bool, copy=False)
        else:
            mask = lung_mask_mod.segment_lungs(scan.hu, scan.spacing_mm, s.lung, progress=self.progress,
                                               cancel=self.cancel, working_spacing_mm=_lung_working_spacing(s),
                                               direction=scan.direction)
        volume_ml = scan.mask_volume_ml(mask)  # each slice over its slab: right for interval series too
        timings["lung_mask_s"] = time.perf_counter() - t
        self.cancel.raise_if_cancelled()

        t = time.perf_counter()
        # Every box holding lung is scored (the extent and the heatmap reach the pleura); the montage
        # and the top patches choose among those that pass the lung-fraction filter (``eligible``).
        patches = scored_patches(mask, scan.spacing_mm, s, scan.origin_mm, scan.direction, scan.slice_positions_mm)
        require_candidates(patches, scan.source or "the scan", s.filter_threshold,
                           eligible=int(np.count_nonzero(patches.montage_candidates(s.filter_threshold))))
        timings["patches_s"] = time.perf_counter() - t

        notes = list(scan.notes)
        features, exact, rescored_for, record = self._embed(scan, patches, notes, timings)

        self._state = _ScanState(scan, mask, volume_ml, patches, features, exact, rescored_for, notes, timings,
                                 record=record, is_phantom=carries_signature(scan.hu))
        t = time.perf_counter()
        self._zone_table(s)
        timings["zones_s"] = time.perf_counter() - t
        result = self._score(s)
        result.timings_s["total_s"] = time.perf_counter() - t0
        return result

    def reprompt(self, prompts: Optional[Sequence[str]] = None, negatives: Optional[Sequence[str]] = None,
                 subtypes: Optional[Sequence[str]] = None, *, exact: bool = False, **overrides) -> AnalysisResult:
        """New prompts (and/or ranking settings) on the last analysed scan.

        Without ``exact`` no patch is encoded again: in fast mode the new prompt is then ranked partly
        on proposal-pass scores (a preview; the notes say how many of its top patches). With ``exact``
        the new prompt's best candidates are re-scored exactly first (see :attr:`needs_exact_rescoring`),
        so the result equals a fresh analysis with these settings on the same embeddings.
        """
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
                           "hu_window", "lung", "model", "checkpoint", "weights_dir", "scoring_mode",
                           "proposal_grid_tokens", "proposal_skip_within_mm", "fp32_skip_within_mm",
                           "rescore_fraction", "rescore_min"}
        if affects_patches & set(changes):
            raise InputError(f"{sorted(affects_patches & set(changes))} change the patches: run analyze() again")
        settings = dataclasses.replace(self.settings, **changes).validate()
        self.settings = settings
        t0 = time.perf_counter()
        timings: dict = {}
        if exact and self.needs_exact_rescoring:
            timings = self._rescore_exactly()
        result = self._score(settings)
        result.timings_s = {**timings, "reprompt_s": time.perf_counter() - t0}
        return result

    @property
    def needs_exact_rescoring(self) -> bool:
        """True when the first prompt's top patches may carry proposal-pass scores: fast mode re-scored
        the candidates for another prompt (or negative), and ``reprompt(exact=True)`` would encode more."""
        st = self._state
        if st is None or st.rescored_for is None:
            return False
        s = self.settings
        return st.rescored_for != (s.prompts[0], s.negative_for(0))

    def _rescore_exactly(self) -> dict:
        """Fast mode's encoding steps again, for the current first prompt, continuing from the kept record.

        The same ``_embed`` a fresh analysis runs (cache entry, or this scan's record if the cache
        dropped it): proposal neighbours of the new prompt's best boxes, then fp32 features of its
        best candidates. The state is replaced only when everything is encoded, so a cancel leaves
        the previous state (and the preview) as they were.
        """
        st = self._state
        notes, timings = list(st.scan.notes), {}
        features, exact, rescored_for, record = self._embed(st.scan, st.patches, notes, timings, prior=st.record)
        self._state = dataclasses.replace(st, features=features, exact=exact, rescored_for=rescored_for,
                                          notes=notes, record=record)
        return timings

    # ------------------------------------------------------------------
    def _embed(self, scan: Scan, patches: PatchSet, notes: list, timings: dict, prior: Optional[dict] = None):
        """Patch features for ``patches``: all exact, or proposal pass + exact re-scoring (fast mode).

        One cache entry per (scan content, model, patch settings) serves both modes: it holds the
        exact features computed so far, a mask of which rows they are, and the proposal features.
        A later run encodes only what the entry lacks (exact mode: the rows not yet exact; fast mode
        with another prompt: the new prompt's re-scoring set). ``prior`` stands in for an entry the
        cache no longer holds. Returns (features, exact rows, re-scored-for pair, the entry).
        """
        s = self.settings
        n = len(patches)
        key = cache_key(scan_fingerprint(scan.hu, scan.spacing_mm), self.model.identity, s.patch_key(),
                        "patch-embeddings/3")
        entry = self.cache.get(key)
        rec = _EmbeddingRecord.from_entry(entry if entry is not None else prior, n)
        volume = self._device_volume(scan.hu)
        plan = self._fast_plan(scan, patches, rec, notes) if s.scoring_mode == "fast" and not rec.exact.all() else None

        rescored_for, ranking_features = None, None
        t = time.perf_counter()
        if plan is not None:
            ranking_features, todo = self._proposal_search(plan, rec, volume, patches)
            timings["proposals_s"] = time.perf_counter() - t
            t = time.perf_counter()
            rescored_for = plan.pair
        else:
            todo = np.flatnonzero(~rec.exact)
        if todo.size:
            rec.put_exact(todo, self._encode_exact(volume, patches, todo))
        timings["encode_s"] = time.perf_counter() - t
        if rec.loaded and not rec.changed:
            notes.append("patch embeddings reused from the cache")
        if rec.changed:
            self.cache.put(key, rec.to_entry())
        entry = rec.to_entry() if rec.changed else (entry if entry is not None else prior)

        features = rec.exact_feats.copy()
        if not rec.exact.all():
            features[~rec.exact] = ranking_features[~rec.exact]
            skipped = n - int(rec.proposal_encoded.sum())
            how = (f", {skipped} on skipped slices interpolated from the boxes {rec.proposal_step} candidate slices "
                   "apart" if skipped else "")
            notes.append(f"fast mode: {n} candidates ranked by a{'n' if rec.proposal_precision == 'fp32' else ''} "
                         f"{rec.proposal_precision} proposal pass ({rec.proposal_grid}x{rec.proposal_grid} "
                         f"tokens{how}), {int(rec.exact.sum())} scored exactly in fp32 (the best of them re-scored); "
                         "top patches and montage come from the exact ones, the heatmap elsewhere shows proposal "
                         "scores")
        else:
            rescored_for = None
        return features, rec.exact, rescored_for, entry

    def _fast_plan(self, scan: Scan, patches: PatchSet, rec: "_EmbeddingRecord", notes: list) -> Optional["_FastPlan"]:
        """How fast mode proposes candidates on this scan, or None (with a note) when exact is as cheap."""
        s = self.settings
        n = len(patches)
        fast_model = self._proposal_model()
        grid = s.proposal_grid_tokens or proposals.full_grid_tokens(self.model)
        if fast_model is None:
            notes.append("fast mode: no cheaper proposal pass on this device (a GPU runs exact under autocast); "
                         "every patch was encoded exactly")
            return None
        if s.proposal_grid_tokens and not proposals.supports_low_resolution(self.model):
            notes.append(f"fast mode: '{self.model.spec.name}' cannot run at another resolution; "
                         "every patch was encoded exactly")
            return None
        count = proposals.rescore_count(n, top_k=s.top_k, montage_patches=s.montage_patches,
                                        rescore_fraction=s.rescore_fraction, rescore_min=s.rescore_min)
        stride = slice_step_voxels(scan.spacing_mm, s.slice_step_mm)  # scan slices between candidate slices
        bf16 = proposals.proposal_precision(fast_model) == "bf16"
        # Each path its own distance: the fp32 search encodes exactly what it encodes, so it
        # skips farther (settings.fp32_skip_within_mm says what that costs in fidelity).
        skip_mm = s.proposal_skip_within_mm if bf16 else s.fp32_skip_within_mm
        step = proposals.proposal_slice_step(scan.spacing_mm[2] * stride, skip_mm)
        neighbours = proposals.slice_neighbours(patches.slice_index, patches.row0, patches.col0, step, stride)
        n_first = int(proposals.first_pass(patches.slice_index, neighbours, step, stride).sum())
        depth = None if bf16 else proposals.fp32_search_depth(n, s.top_k, s.montage_patches)
        if not proposals.proposals_pay_off(
                n, count, grid, proposals.full_grid_tokens(self.model),
                proposals.BF16_RELATIVE_COST if bf16 else proposals.FP32_RELATIVE_COST,
                n_proposals=proposals.expected_proposals(n_first, n, count, step, depth)):
            if not bf16:  # a small scan (or no slice to skip in fp32): exact is as cheap
                why = ("the fp32 skip distance is 0 mm, so no slice is skipped" if not skip_mm > 0 else
                       "this scan has too few to skip")
                notes.append("fast mode: without native bf16, fast mode saves work only by skipping thin "
                             f"slices, and {why}; every patch was encoded exactly")
            return None
        pair = (s.prompts[0], s.negative_for(0))
        return _FastPlan(fast_model, grid, count, stride, step, neighbours, pair,
                         proposals.proposals_are_exact(fast_model, self.model, grid))

    def _proposal_search(self, plan: "_FastPlan", rec: "_EmbeddingRecord", volume, patches: PatchSet):
        """Fast mode's proposal pass for ``plan.pair``: (ranking features, candidates to encode exactly).

        First the proposal slices; then, in fp32 (whose encodings are exact), best-first until the best
        ``depth`` by interpolated score are encoded, or, in bf16, the skipped neighbours of the best
        boxes. Only boxes passing the lung-fraction filter compete (the others are never top patches).
        """
        s = self.settings
        n = len(patches)
        precision = proposals.proposal_precision(plan.fast_model)
        text_pair = self.text.pair(*plan.pair)
        rec.reset_proposals_unless(plan.grid, plan.step, precision)

        def encode(indices, stage):
            feats = self._encode_proposals(plan.fast_model, volume, patches, plan.grid, indices, stage)
            rec.put_proposals(indices, feats, also_exact=plan.proposals_exact)

        def scores(features):
            return eligible_only(softmax_probability(features, *text_pair), patches, s)

        def interpolated():
            return proposals.interpolate_skipped(rec.proposal, rec.proposal_encoded, patches.slice_index,
                                                 plan.neighbours)

        if rec.proposal is None:
            first = np.flatnonzero(proposals.first_pass(patches.slice_index, plan.neighbours, plan.step, plan.stride))
            if plan.proposals_exact and rec.exact_feats is not None:
                # Rows already exact (from an earlier run) are their own proposals.
                rec.proposal, rec.proposal_encoded = rec.exact_feats.copy(), rec.exact.copy()
                first = first[~rec.exact[first]]
            if first.size:
                encode(first, "proposal pass")
            rec.proposal_grid, rec.proposal_step, rec.proposal_precision = plan.grid, plan.step, precision
            rec.changed = True
        if plan.step > 1 and plan.proposals_exact:
            # Best-first: encode the best-scoring candidates not yet encoded (interpolated scores)
            # until the best ``depth`` are all exact; each batch sharpens the interpolation near it.
            depth = proposals.fp32_search_depth(n, s.top_k, s.montage_patches)
            while True:
                more = proposals.next_to_encode(scores(interpolated()), rec.proposal_encoded, depth,
                                                proposals.FP32_SEARCH_BATCH)
                if not more.size:
                    break
                encode(np.sort(more), "proposal pass: best first")
        elif plan.step > 1:
            # The slices skipped next to this prompt's best boxes: where its top patches may be.
            more = proposals.neighbours_to_refine(scores(rec.proposal), rec.proposal_encoded, plan.neighbours,
                                                  proposals.REFINE_PER_RESCORED * plan.count)
            if more.size:
                encode(more, "proposal pass: neighbours")
        ranking_features = interpolated()
        return ranking_features, proposals.select_for_rescoring(scores(ranking_features), plan.count, rec.exact)

    def _device_volume(self, hu: np.ndarray):
        """The scan where patches are cut: the numpy array on CPU, a GPU copy (via pinned memory) on CUDA.

        On a GPU the whole volume is uploaded once (int16, ~160 MB for 512x512x300), so windowing,
        cropping and resizing of every batch run there and the CPU only launches kernels.
        """
        device = self.model.device
        if device.type != "cuda":
            return hu
        host = torch.from_numpy(np.ascontiguousarray(hu))
        return host.pin_memory().to(device, non_blocking=True)

    def _encode_exact(self, volume, patches: PatchSet, indices: np.ndarray) -> np.ndarray:
        s = self.settings
        batches = iter_patch_batches(volume, patches, indices, batch_size=self.encoder.batch_size,
                                     image_size=self.model.image_size, hu_window=s.hu_window,
                                     device=self.model.device)
        idx, feats = self.encoder.encode_batches(batches, len(indices), progress=self.progress, cancel=self.cancel)
        return _in_requested_order(idx, feats, indices)

    def _proposal_model(self) -> Optional[LoadedModel]:
        if self._fast_model is None:
            self._fast_model = proposals.proposal_model(self.model) or False
        return self._fast_model or None

    def _encode_proposals(self, fast_model: LoadedModel, volume, patches: PatchSet, grid_tokens: int,
                          indices: np.ndarray, stage: str) -> np.ndarray:
        """``patches[indices]`` encoded by the proposal tower (bf16 copy, or the fp32 model) at ``grid_tokens``^2 tokens, in ``indices`` order."""
        s = self.settings
        # The fp32 pass runs the model itself: its encodings count with the exact ones.
        encoder = self.encoder if fast_model is self.model else ImageEncoder(fast_model, self.encoder.batch_size)
        if grid_tokens == proposals.full_grid_tokens(self.model):
            context = contextlib.nullcontext(self.model.image_size)
        else:
            context = proposals.low_resolution(fast_model, grid_tokens)
        with context as size:
            batches = iter_patch_batches(volume, patches, indices, batch_size=encoder.batch_size,
                                         image_size=size, hu_window=s.hu_window, device=self.model.device)
            idx, feats = encoder.encode_batches(batches, len(indices), progress=self.progress, cancel=self.cancel,
                                                stage=stage)
        return _in_requested_order(idx, feats, indices)

    def _score(self, s: AnalysisSettings) -> AnalysisResult:
        st = self._state
        assert st is not None
        self.progress("scoring prompts", 0, 1)
        negatives = [s.negative_for(i) for i in range(len(s.prompts))]
        probs = prompt_probabilities(st.features, self.text, s.prompts, negatives)
        primary = probs[s.prompts[0]]
        # Boxes under the lung-fraction filter are scored for the extent but never shown as top patches.
        ranking_scores = eligible_only(primary, st.patches, s)
        notes = list(st.notes)
        if st.rescored_for is not None and st.rescored_for == (s.prompts[0], negatives[0]):
            # The re-scored set holds this prompt's best proposals: rank within its exact scores,
            # so a proposal score never outranks an exact one.
            ranked = proposals.rank_exact_first(ranking_scores, st.exact, s.top_k)
            montage_idx = (proposals.rank_exact_first(ranking_scores, st.exact, s.montage_patches)
                           if s.retrieval == "clip" else _random_eligible(st.patches, s))
        else:
            ranked = rank_patches(ranking_scores, s.top_k, "clip")
            montage_idx = (rank_patches(ranking_scores, s.montage_patches, "clip") if s.retrieval == "clip"
                           else _random_eligible(st.patches, s))
            if st.rescored_for is not None:
                approx = int(np.count_nonzero(~st.exact[ranked]))
                notes.append(f"fast mode: the patches were re-scored for '{st.rescored_for[0]}'; {approx} of the top "
                             f"{len(ranked)} for '{s.prompts[0]}' carry proposal-pass scores (a preview: re-prompt with exact "
                             "re-scoring, or analyse again, for the exact ranking)")
        eligible = st.patches.montage_candidates(s.filter_threshold)
        ranked, montage_idx = ranked[eligible[ranked]], montage_idx[eligible[montage_idx]]
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
        # A text longer than the text tower's context is cut off without a word: say which (issue 25).
        too_long = self.text.too_long([t for pair in pairs for t in pair] + [s.normal_prompt, *s.patterns])
        if too_long:
            notes.append("prompt(s) longer than the text encoder reads, scored on their beginning only: " + "; ".join(
                f"'{t[:60]}{'...' if len(t) > 60 else ''}' ({n} tokens, {c} read)" for t, (n, c) in too_long.items()))
        table = self._zone_table(s)
        extent, pattern_map, extent_notes = self._extent(s, table)
        notes.extend(extent_notes)
        coverage_note = ((st.zones or {}).get("coverage") or {}).get("note")
        if coverage_note:
            notes.append(coverage_note)
        spec = self.model.spec
        if self._weights_provenance is None:  # the model never changes under an analyzer: its metadata is read once
            self._weights_provenance = _provenance(self.model)
        trained_on, health = self._weights_provenance
        warning = model_warning(spec.name, random_weights=not spec.meaningful, trained_on=trained_on,
                                is_phantom=st.is_phantom, training_health=health)
        if warning:
            notes.append(warning)
        self.progress("done", 1, 1)
        return AnalysisResult(
            settings=s, model_name=spec.name, model_meaningful=not warning, model_warning=warning,
            source=st.scan.source, shape_zyx=tuple(st.scan.hu.shape), spacing_mm=tuple(st.scan.spacing_mm),
            lung_mask=st.lung_mask, lung_volume_ml=st.lung_volume_ml, patches=st.patches, patch_probabilities=probs,
            ranked=ranked, montage_indices=montage_idx, montage=montage, finding_probabilities=findings,
            subtype_probabilities=subtypes, notes=notes, timings_s=dict(st.timings_s),
            encoded_exactly=st.encoded_exactly, extent=extent, patterns=pattern_map, zones=dict(st.zones or {}),
        )

    def contrast_scores(self, prompts: Sequence[str]) -> dict:
        """{prompt: (N,) cos(patch, prompt) - cos(patch, normal prompt)} on the kept embeddings (text only)."""
        return self.contrasts_against(prompts, [self.settings.normal_prompt] * len(prompts))

    def contrasts_against(self, prompts: Sequence[str], others: Sequence[str]) -> dict:
        """{prompt: (N,) cos(patch, prompt) - cos(patch, other)} for each (prompt, other) pair (text only)."""
        st = self._state
        if st is None:
            raise InputError("no scan analysed yet: run analyze() before contrast_scores()")
        texts = list(dict.fromkeys([*prompts, *others]))
        emb = {t: e.numpy() for t, e in zip(texts, self.text.embed_many(texts))}
        return {p: extent_mod.contrasts(st.features, emb[p], emb[o]) for p, o in zip(prompts, others)}

    def negation_text(self, name: str) -> str:
        """The text a finding is weighed against for its probability: the user's negative when ``name`` is a
        prompt with one, else "no <name>" (patterns too, so a word gets one negation wherever it is used)."""
        s = self.settings
        return s.negative_for(s.prompts.index(name)) if name in s.prompts else f"no {name}"

    def references(self, prompts: Sequence[str]) -> tuple[dict, str]:
        """The normal-lung references stored beside the loaded weights for ``prompts`` (see ``calibration``)."""
        weights = self.model.checkpoint
        # Hashed once per analyzer (the model never changes under it): a 600 MB CheXzero file takes
        # seconds, and a re-prompt must stay instant.
        if self._weights_sha256 is None and weights is not None:
            self._weights_sha256 = sha256_file(weights)
        return calibration.load_references(weights, self._weights_sha256, prompts, self.settings.normal_prompt,
                                           self.settings.patch_key())

    def _extent(self, s: AnalysisSettings, table: np.ndarray):
        """Extent per prompt and the pattern map, by one rule (``extent.positive_patches``) for both."""
        st = self._state
        names = list(dict.fromkeys([*s.prompts, *s.patterns]))
        scores = self.contrast_scores(names)
        negation_texts = [self.negation_text(n) for n in names]
        negation_scores = self.contrasts_against(names, negation_texts)
        negations = {n: (t, negation_scores[n]) for n, t in zip(names, negation_texts)}
        references, note = self.references(names)
        coverage = (st.zones or {}).get("coverage")
        positives: dict = {}
        if st.neighbours is None:
            st.neighbours = extent_mod.box_neighbours(st.patches.slice_index, st.patches.row0, st.patches.col0)
        records = extent_mod.extents_for(table, scores, names, s.normal_prompt, s.extent_z, s.subpleural_mm,
                                         references, coverage, st.patches.lung_fraction, st.neighbours,
                                         s.extent_min_neighbours, negations=negations, positives_out=positives)
        extent = {p: records[p] for p in s.prompts}
        notes = [note] if note else []
        pattern_map = None
        # A model trained to name some findings only (phantom-demo) answers any other text at random: such a
        # pattern would paint the map with noise ("emphysema" over a fibrotic phantom), so it is left out.
        named = set(self.model.spec.named_findings or ())
        shown = [p for p in s.patterns if not named or p in named]
        if len(shown) < len(s.patterns):
            left = [p for p in s.patterns if p not in shown]
            notes.append(f"pattern map without {', '.join(repr(p) for p in left)}: model {self.model.spec.name} was "
                         "not trained to name them (a typed prompt still gets its number)")
        if shown:
            # Painted from the same positives as each pattern's extent: the map and the numbers agree.
            pattern_map = patterns_mod.pattern_map_from_positives(
                shown, s.normal_prompt, scores, references, {n: positives[n] for n in shown},
                rule=records[shown[0]]["rule"], lung_fraction=st.patches.lung_fraction)
            pattern_map.extent = {name: records[name] for name in shown}
        uncalibrated = [p for p in [*s.prompts, *shown] if references.get(p) is None]
        if uncalibrated and not note:
            notes.append(f"extent uncalibrated for {', '.join(repr(p) for p in uncalibrated[:4])}"
                         f"{' and others' if len(uncalibrated) > 4 else ''}: no normal-lung reference for these "
                         "weights; run 'zeroshot-ild calibrate' on a few normal scans")
        return extent, pattern_map, notes

    def _zone_table(self, s: AnalysisSettings) -> np.ndarray:
        """The scan's lung volume per candidate and zone (computed once per scan and rind depth)."""
        st = self._state
        assert st is not None
        if st.zone_table is None or (st.zones or {}).get("subpleural_mm") != s.subpleural_mm:
            scan = st.scan
            zones = extent_mod.lung_zones(st.lung_mask, scan.spacing_mm, scan.origin_mm, scan.direction,
                                          scan.slice_positions_mm, s.subpleural_mm)
            slab = slice_step_voxels(scan.spacing_mm, s.slice_step_mm)
            st.zone_table = extent_mod.zone_volume_table(zones.codes, st.patches, scan.spacing_mm, slab, scan.slab_mm)
            scored = extent_mod.zone_volumes_ml(st.zone_table[:-1])
            share, share_by_zone = extent_mod.scored_share(st.zone_table)
            st.zones = {"subpleural_mm": float(s.subpleural_mm), "midline_r_mm": round(zones.midline_r_mm, 2),
                        "coverage": dict(zones.coverage or {}),
                        "scored_share": round(share, 5),
                        "scored_share_by_zone": {k: (round(v, 5) if np.isfinite(v) else None)
                                                 for k, v in share_by_zone.items()},
                        "s_range_mm": {k: [round(v[0], 2), round(v[1], 2)] for k, v in zones.s_range_mm.items()},
                        "scored_lung_ml": {k: round(v, 2) for k, v in scored.items()},
                        "unscored_lung_ml": round(float(st.zone_table[-1].sum()), 2)}
        return st.zone_table

    @property
    def scan(self) -> Optional[Scan]:
        return self._state.scan if self._state else None


@dataclass
class _FastPlan:
    """Fast mode on one scan: the proposal tower, its grid, how many to re-score, slice skipping, prompt pair."""

    fast_model: LoadedModel
    grid: int
    count: int
    stride: int
    step: int
    neighbours: np.ndarray
    pair: tuple
    #: fp32 at the model's own size: each proposal encoding is an exact one, kept as such.
    proposals_exact: bool


@dataclass
class _EmbeddingRecord:
    """The cached embedding entry while it is filled: exact rows, proposal rows, which are encoded."""

    n: int
    exact_feats: Optional[np.ndarray] = None
    exact: np.ndarray = None
    #: Proposal features as encoded (zero rows where a slice was skipped) and which rows they are.
    proposal: Optional[np.ndarray] = None
    proposal_encoded: np.ndarray = None
    proposal_grid: int = 0
    proposal_step: int = 0
    proposal_precision: str = ""
    loaded: bool = False
    changed: bool = False

    @classmethod
    def from_entry(cls, entry: Optional[dict], n: int) -> "_EmbeddingRecord":
        rec = cls(n, exact=np.zeros(n, bool), proposal_encoded=np.zeros(n, bool))
        if entry is None or not (entry.get("features") is not None and entry["features"].shape[0] == n
                                 and entry.get("exact") is not None and entry["exact"].shape == (n,)):
            return rec
        rec.loaded = True
        rec.exact_feats, rec.exact = entry["features"].copy(), entry["exact"].astype(bool)
        if entry.get("proposal") is not None and entry.get("proposal_encoded") is not None:
            rec.proposal, rec.proposal_encoded = entry["proposal"].copy(), entry["proposal_encoded"].astype(bool)
            rec.proposal_grid, rec.proposal_step = int(entry["proposal_grid"]), int(entry["proposal_step"])
            # Entries written before the fp32 pass existed hold bf16 proposals.
            rec.proposal_precision = str(entry.get("proposal_precision", "bf16"))
        return rec

    def reset_proposals_unless(self, grid: int, step: int, precision: str) -> None:
        """Drop kept proposals made with another grid, slice step or precision."""
        if (self.proposal is None or self.proposal.shape[0] != self.n or self.proposal_grid != grid
                or self.proposal_step != step or self.proposal_precision != precision):
            self.proposal, self.proposal_encoded = None, np.zeros(self.n, bool)

    def put_proposals(self, indices: np.ndarray, feats: np.ndarray, also_exact: bool) -> None:
        if self.proposal is None:
            self.proposal = np.zeros((self.n, feats.shape[1]), np.float32)
        self.proposal[indices] = feats
        self.proposal_encoded[indices] = True
        if also_exact:
            self.put_exact(indices, feats)
        self.changed = True

    def put_exact(self, indices: np.ndarray, feats: np.ndarray) -> None:
        if self.exact_feats is None:
            self.exact_feats = np.zeros((self.n, feats.shape[1]), np.float32)
        self.exact_feats[indices] = feats
        self.exact[indices] = True
        self.changed = True

    def to_entry(self) -> dict:
        entry = {"features": self.exact_feats, "exact": self.exact}
        if self.proposal is not None:
            entry.update(proposal=self.proposal, proposal_encoded=self.proposal_encoded,
                         proposal_grid=np.int64(self.proposal_grid), proposal_step=np.int64(self.proposal_step),
                         proposal_precision=np.str_(self.proposal_precision))
        return entry


def _provenance(model: LoadedModel) -> tuple[str, Optional[dict]]:
    """(training domain, health verdict) of the loaded weights: the model list's ``trained_on`` for a
    registry model; for a DAPT checkpoint what its run recorded in the metadata (``training.domain``,
    ``training.health``), read as untrusted input (only booleans and a short name are taken)."""
    trained_on = model.spec.trained_on
    if model.checkpoint is None or model.spec.source != "checkpoint":
        return trained_on, None
    try:
        meta = read_checkpoint_metadata(model.checkpoint) or {}
    except InputError:
        return trained_on, None
    training = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(training, dict):
        return trained_on, None
    domain = training.get("domain")
    if isinstance(domain, str) and domain in ("phantoms", "ct", "images"):
        trained_on = "phantoms" if domain == "phantoms" else trained_on
    health = training.get("health")
    if not isinstance(health, dict):
        return trained_on, None
    return trained_on, {k: health.get(k) is True for k in ("collapsed", "at_chance")}


def eligible_only(scores: np.ndarray, patches: PatchSet, settings: AnalysisSettings) -> np.ndarray:
    """``scores`` with the boxes under the lung-fraction filter put last (they are not montage candidates)."""
    return np.where(patches.montage_candidates(settings.filter_threshold), np.asarray(scores, dtype=np.float64), -np.inf)


def _random_eligible(patches: PatchSet, settings: AnalysisSettings) -> np.ndarray:
    """Random retrieval among the boxes that pass the lung-fraction filter (seeded)."""
    pool = np.flatnonzero(patches.montage_candidates(settings.filter_threshold))
    return pool[rank_patches(np.zeros(pool.size), settings.montage_patches, "random", settings.seed)]


def _in_requested_order(encoded_indices: np.ndarray, feats: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Rows of ``feats`` (batches come back in slice order) put back in the order of ``indices``."""
    row_of = {int(i): k for k, i in enumerate(encoded_indices)}
    return feats[[row_of[int(i)] for i in indices]]


def _lung_working_spacing(settings: AnalysisSettings) -> Optional[float]:
    """Grid spacing (mm) for lung segmentation, once LungMaskSettings carries it; None = full resolution."""
    return getattr(settings.lung, "working_spacing_mm", None)


def montage_for_scan(scan: Scan, settings: AnalysisSettings, *, analyzer: Optional[Analyzer] = None,
                     whole_image_if_no_lungs: bool = False, image_size: int = 224) -> tuple[np.ndarray, dict]:
    """The montage of one scan as DAPT preprocessing needs it, plus what it was built from.

    Random retrieval needs no model: lung mask -> candidates -> seeded draw -> montage at
    ``image_size``. CLIP retrieval runs the analyzer (whose model picks the patches). With
    ``whole_image_if_no_lungs`` a scan in which no lungs are found (a 2-D figure crop) is taken
    whole instead of refused.
    """
    try:
        mask = lung_mask_mod.segment_lungs(scan.hu, scan.spacing_mm, settings.lung,
                                           working_spacing_mm=_lung_working_spacing(settings),
                                           direction=scan.direction)
    except InputError:
        if not whole_image_if_no_lungs:
            raise
        mask = np.ones(scan.hu.shape, dtype=bool)
    if settings.retrieval == "clip":
        analyzer = analyzer or Analyzer(settings)
        result = analyzer.analyze(scan, lung_mask=mask)
        patches, chosen, montage = result.patches, result.montage_indices, result.montage
        probabilities = {k: [float(v[i]) for i in chosen] for k, v in result.patch_probabilities.items()}
    else:
        patches = candidates_for(mask, scan.spacing_mm, settings, scan.origin_mm, scan.direction,
                                 scan.slice_positions_mm)
        require_candidates(patches, scan.source or "the scan", settings.filter_threshold)
        chosen = rank_patches(np.zeros(len(patches)), settings.montage_patches, "random", settings.seed)
        pixels = patch_pixels(scan.hu, patches, chosen, image_size=image_size, hu_window=settings.hu_window)
        montage = build_montage(pixels, settings.montage_size, image_size)
        probabilities = {}
    info = {
        "candidates": len(patches),
        "patches": [{"slice_index": int(patches.slice_index[i]), "row0": int(patches.row0[i]),
                     "col0": int(patches.col0[i]), "size_rows": int(patches.size_rows),
                     "size_cols": int(patches.size_cols)} for i in chosen],
        "probabilities": probabilities,
    }
    return montage, info


def analyze(scan: Union[Scan, str], settings: Optional[AnalysisSettings] = None, **kwargs) -> AnalysisResult:
    """One-shot convenience: ``Analyzer(settings, **kwargs).analyze(scan)``."""
    return Analyzer(settings or AnalysisSettings(), **kwargs).analyze(scan)
