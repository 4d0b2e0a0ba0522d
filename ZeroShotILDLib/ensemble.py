"""Ensembles of checkpoints: the members' montage-level probabilities averaged.

CheXzero and paper 000 average the probabilities of their best checkpoints. ``training/`` writes a
run's top-k list as ``ensemble.json``; ``--model ensemble:<ensemble.json>`` (command line, Slicer,
``evaluate``) runs every member on the same lung mask and averages the finding and subtype
probabilities. The patches, ranking, heatmap and montage shown are those of the first (best)
member: an average of per-patch rankings from different models would be a montage no member chose.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .embeddings import EmbeddingCache
from .errors import InputError
from .pipeline import Analyzer
from .progress import CancelToken, ProgressCallback, resolve
from .results import AnalysisResult
from .scan import Scan
from .settings import AnalysisSettings

PREFIX = "ensemble:"
FORMAT = "zeroshot-ild-ensemble/1"


def is_ensemble(model: str) -> bool:
    return str(model).startswith(PREFIX)


def read_ensemble(path: Union[str, Path]) -> list[str]:
    """Member model names (``dapt:<absolute path>``) of an ``ensemble.json``, best first.

    Relative checkpoint paths are taken relative to the JSON file's folder, so a run folder can be
    moved as a whole.
    """
    file = Path(str(path)[len(PREFIX):] if is_ensemble(str(path)) else path).expanduser()
    if not file.is_file():
        raise InputError(f"ensemble {file} does not exist: give a training run's ensemble.json")
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
        paths = [str(c["path"]) for c in payload["checkpoints"]]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{file.name} is not an ensemble.json written by `zeroshot-ild-train train`") from None
    if payload.get("format", FORMAT) != FORMAT:
        raise InputError(f"{file.name} has format {payload.get('format')!r}, expected {FORMAT!r}: "
                         "re-export it with this version of zeroshot-ild-train")
    if not paths:
        raise InputError(f"{file.name} lists no checkpoints: the run has not validated yet")
    members = []
    for p in paths:
        member = Path(p).expanduser()
        if not member.is_absolute():
            member = file.parent / member
        members.append(f"dapt:{member.resolve()}")
    return members


def combine(results: Sequence[AnalysisResult], model_name: str) -> AnalysisResult:
    """The first result with its montage-level probabilities replaced by the members' means."""
    first = results[0]

    def mean(field: str) -> dict:
        return {k: float(np.mean([getattr(r, field)[k] for r in results])) for k in getattr(first, field)}

    return dataclasses.replace(
        first,
        model_name=model_name,
        model_meaningful=all(r.model_meaningful for r in results),
        finding_probabilities=mean("finding_probabilities"),
        subtype_probabilities=mean("subtype_probabilities"),
        notes=list(first.notes) + [f"ensemble of {len(results)} checkpoints: montage probabilities averaged; "
                                   "patches, heatmap and montage from the best checkpoint"],
        timings_s={k: sum(r.timings_s.get(k, 0.0) for r in results) for k in first.timings_s},
    )


class EnsembleAnalyzer:
    """``Analyzer``'s interface (``analyze``, ``reprompt``) over the members of an ensemble."""

    def __init__(self, settings: AnalysisSettings, *, members: Optional[Sequence[str]] = None,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                 cache: Optional[EmbeddingCache] = None):
        self.settings = settings.validate()
        self.members = list(members) if members is not None else read_ensemble(settings.model)
        self.progress, self.cancel = resolve(progress, cancel)
        cache = cache if cache is not None else EmbeddingCache()
        self.analyzers = [Analyzer(dataclasses.replace(settings, model=m), progress=self.progress,
                                   cancel=self.cancel, cache=cache) for m in self.members]

    def analyze(self, scan: Union[Scan, str], lung_mask: Optional[np.ndarray] = None) -> AnalysisResult:
        first = self.analyzers[0].analyze(scan, lung_mask=lung_mask)
        # One lung mask for all: the members differ only in what they make of the same patches.
        rest = [a.analyze(self.analyzers[0].scan, lung_mask=first.lung_mask) for a in self.analyzers[1:]]
        return combine([first, *rest], self.settings.model)

    def reprompt(self, prompts: Optional[Sequence[str]] = None, negatives: Optional[Sequence[str]] = None,
                 subtypes: Optional[Sequence[str]] = None, **overrides) -> AnalysisResult:
        results = [a.reprompt(prompts, negatives, subtypes, **overrides) for a in self.analyzers]
        self.settings = dataclasses.replace(self.analyzers[0].settings, model=self.settings.model)
        return combine(results, self.settings.model)

    @property
    def scan(self) -> Optional[Scan]:
        return self.analyzers[0].scan

    @property
    def model(self):
        """The best member's model (what picks the patches and builds the montage)."""
        return self.analyzers[0].model

    @property
    def encoder(self):
        return self.analyzers[0].encoder


def make_analyzer(settings: AnalysisSettings, **kwargs):
    """An ``EnsembleAnalyzer`` for ``ensemble:<file>`` models, else a plain ``Analyzer``."""
    return EnsembleAnalyzer(settings, **kwargs) if is_ensemble(settings.model) else Analyzer(settings, **kwargs)
