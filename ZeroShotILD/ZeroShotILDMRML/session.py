"""One analysed input volume, its result nodes, and where its patch embeddings are kept.

Two ways to compute a session share this class:

- in this process (``logic.process`` from the Python console): the session copies the voxels out of
  the volume node, :meth:`AnalysisSession.compute` runs the engine (blocking), and the engine's
  ``Analyzer`` with its patch embeddings stays in :attr:`AnalysisSession.analyzer`;
- in the analysis worker process (the module's Apply): the session copies nothing (the voxels go to
  the worker as a file), the worker keeps the ``Analyzer`` and :attr:`AnalysisSession.worker`
  names it; results arrive as ``AnalysisResult`` objects and are applied here.

Either way the scene is changed only on the main thread, by :meth:`apply` / :meth:`apply_reprompt`,
and a re-prompt re-ranks the same patches from the kept embeddings.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.settings import AnalysisSettings

from . import mrml_results
from .volumes import check_ct_volume, scan_from_volume_node
# The settings a re-prompt may change: the worker protocol's set, so the in-process and worker paths
# agree. Any other difference needs a new analysis (new patches or model).
from .worker import REPROMPT_FIELDS

#: Settings that change neither the patches nor the scores.
IGNORED_FIELDS = ("batch_size",)


def reprompt_changes(old: AnalysisSettings, new: AnalysisSettings) -> Optional[dict]:
    """The re-prompt overrides that turn ``old`` into ``new``, or None if a new analysis is needed."""
    changes = {}
    for f in dataclasses.fields(AnalysisSettings):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b or f.name in IGNORED_FIELDS:
            continue
        if f.name not in REPROMPT_FIELDS:
            return None
        changes[f.name] = b
    return changes


def _voxels_mtime(volume_node) -> int:
    image = volume_node.GetImageData()
    return int(image.GetMTime()) if image is not None else 0


class AnalysisSession:
    """Analysis of one volume node, kept for re-prompting."""

    def __init__(self, input_volume, settings: AnalysisSettings, *, copy_voxels: bool = True):
        check_ct_volume(input_volume)  # a one-line InputError before anything touches the node
        self.scene = input_volume.GetScene()
        self.input_volume_id = input_volume.GetID()
        self.settings = settings.validate()
        self.scan = scan_from_volume_node(input_volume) if copy_voxels else None
        # Voxels edited after Apply (Segment Editor, filters) make the kept embeddings stale.
        self.voxels_mtime = _voxels_mtime(input_volume)
        self.analyzer = None
        #: (WorkerClient, analysis id) when the embeddings are kept by the analysis worker process.
        self.worker = None
        self.result = None
        self.nodes: Optional[mrml_results.ResultNodes] = None

    @property
    def reprompt_ready(self) -> bool:
        """Whether the patch embeddings are still at hand (here, or in the same running worker)."""
        if self.analyzer is not None:
            return True
        if self.worker is None:
            return False
        client, analysis_id = self.worker
        return client.alive and client.analysis_id == analysis_id

    # -- any thread ---------------------------------------------------------------------------
    def compute(self, progress=None, cancel=None, *, model=None, cache=None):
        """Run the engine on the copied voxels; returns the ``AnalysisResult``. Touches no MRML."""
        from ZeroShotILDLib.ensemble import EnsembleAnalyzer, is_ensemble
        from ZeroShotILDLib.pipeline import Analyzer

        if is_ensemble(self.settings.model):  # a training run's top-k checkpoints (ensemble.json)
            analyzer = EnsembleAnalyzer(self.settings, progress=progress, cancel=cancel, cache=cache)
        else:
            analyzer = Analyzer(self.settings, progress=progress, cancel=cancel, model=model, cache=cache)
        result = analyzer.analyze(self.scan)
        self.analyzer, self.result = analyzer, result
        return result

    # -- main thread --------------------------------------------------------------------------
    @property
    def input_volume(self):
        node = self.scene.GetNodeByID(self.input_volume_id) if self.scene is not None else None
        if node is None:
            raise InputError("the input volume was removed from the scene: select it again and press Apply")
        return node

    def apply(self, *, app_logic=None) -> mrml_results.ResultNodes:
        """Write the computed result into the scene (the only step that changes the scene)."""
        if self.result is None:
            raise RuntimeError("apply() before compute() finished")
        self.nodes = mrml_results.write_result(self.input_volume, self.result, app_logic=app_logic)
        return self.nodes

    def can_reprompt(self, input_volume, settings: AnalysisSettings) -> bool:
        """True when ``settings`` on ``input_volume`` differ from this session only in re-prompt fields
        and the volume's voxels are unchanged since they were copied."""
        if not self.reprompt_ready or input_volume is None or input_volume.GetID() != self.input_volume_id:
            return False
        if _voxels_mtime(input_volume) != self.voxels_mtime:
            return False
        return reprompt_changes(self.settings, settings) is not None

    def apply_reprompt(self, result, settings: AnalysisSettings, *, app_logic=None) -> mrml_results.ResultNodes:
        """Write a re-prompt's result (heatmap, patch markups, montage, tables); the lungs stay.

        ``settings`` are the ones asked for (an ensemble's result carries its best member's model)."""
        self.result, self.settings = result, settings
        self.nodes = mrml_results.write_prompt_outputs(self.input_volume, result, app_logic=app_logic)
        return self.nodes

    def reprompt(self, prompts: Optional[Sequence[str]] = None, negatives: Optional[Sequence[str]] = None,
                 subtypes: Optional[Sequence[str]] = None, *, app_logic=None, exact: bool = True,
                 **overrides) -> mrml_results.ResultNodes:
        """New prompts on the kept embeddings (in this process); updates heatmap, patch markups, montage
        and tables. ``exact``: in fast mode, re-score the new prompt's best candidates first, so the
        result equals a fresh analysis (``Analyzer.reprompt(exact=True)``)."""
        if self.analyzer is None:
            raise InputError("nothing analysed in this process: press Apply first")
        result = self.analyzer.reprompt(prompts, negatives, subtypes, exact=exact, **overrides)
        return self.apply_reprompt(result, self.analyzer.settings, app_logic=app_logic)

    def reprompt_to(self, settings: AnalysisSettings, *, app_logic=None) -> mrml_results.ResultNodes:
        """Re-prompt so that this session's settings become ``settings`` (see :func:`reprompt_changes`)."""
        changes = reprompt_changes(self.settings, settings)
        if changes is None:
            raise InputError("these settings change the patches or the model: press Apply to analyse again")
        prompts = changes.pop("prompts", settings.prompts)
        negatives = changes.pop("negatives", settings.negatives)
        subtypes = changes.pop("subtypes", settings.subtypes)
        return self.reprompt(prompts, negatives, subtypes, app_logic=app_logic, **changes)
