"""The module's parameter node <-> ``AnalysisSettings``, field by field.

The typed parameter node in ``ZeroShotILD.py`` (``@parameterNodeWrapper``) stores each value as a
string parameter of a ``vtkMRMLScriptedModuleNode``, so the settings persist in saved scenes. This
file owns the mapping between those parameters and the engine's one settings type, and encodes
values exactly as the wrapper's serializers do (str as is, int/float via ``str``, bool as
"True"/"False"), so the wrapper and :func:`read_settings` / :func:`write_settings` read each
other's values. It needs no Qt and no wrapper, which is what lets CI test it under ``slicer-core``.

Multi-valued settings are single text fields in the panel: prompts and negatives are separated by
";" (the first prompt is the one ranked and painted), subtypes and pattern-map prompts are one per
line (no pattern prompts: no pattern map).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.settings import AnalysisSettings, LungMaskSettings

from .catalog import CUSTOM_MODEL, ENSEMBLE_MODEL

PROMPT_SEPARATOR = ";"
SUBTYPE_SEPARATOR = "\n"
DAPT_PREFIX = "dapt:"
#: ZeroShotILDLib.ensemble.PREFIX (not imported: that module needs torch).
ENSEMBLE_PREFIX = "ensemble:"


@dataclass(frozen=True)
class Parameter:
    """One string parameter of the parameter node and the settings field(s) it carries."""

    name: str
    kind: type
    default: object
    #: Dotted AnalysisSettings field(s) this parameter maps onto (documentation and coverage test).
    fields: tuple


def _defaults() -> tuple:
    s = AnalysisSettings()
    lung = s.lung
    return (
        Parameter("model", str, s.model, ("model",)),
        Parameter("checkpointPath", str, s.checkpoint or "", ("checkpoint", "model")),
        Parameter("weightsDir", str, s.weights_dir or "", ("weights_dir",)),
        Parameter("device", str, s.device, ("device",)),
        Parameter("batchSize", int, s.batch_size, ("batch_size",)),
        Parameter("prompts", str, PROMPT_SEPARATOR.join(s.prompts), ("prompts",)),
        Parameter("negatives", str, PROMPT_SEPARATOR.join(s.negatives or []), ("negatives",)),
        Parameter("subtypes", str, SUBTYPE_SEPARATOR.join(s.subtypes), ("subtypes",)),
        Parameter("patterns", str, SUBTYPE_SEPARATOR.join(s.patterns), ("patterns",)),
        Parameter("normalPrompt", str, s.normal_prompt, ("normal_prompt",)),
        Parameter("subpleuralMm", float, float(s.subpleural_mm), ("subpleural_mm",)),
        Parameter("extentZ", float, float(s.extent_z), ("extent_z",)),
        Parameter("extentMinNeighbours", int, int(s.extent_min_neighbours), ("extent_min_neighbours",)),
        Parameter("patchMm", float, float(s.patch_mm), ("patch_mm",)),
        Parameter("patchPx", int, int(s.patch_px or 0), ("patch_px",)),
        Parameter("strideFraction", float, float(s.stride_fraction), ("stride_fraction",)),
        Parameter("sliceStepMm", float, float(s.slice_step_mm), ("slice_step_mm",)),
        Parameter("filterThreshold", float, float(s.filter_threshold), ("filter_threshold",)),
        Parameter("scoredMinLungFraction", float, float(s.scored_min_lung_fraction), ("scored_min_lung_fraction",)),
        Parameter("windowLowHu", float, float(s.hu_window[0]), ("hu_window",)),
        Parameter("windowHighHu", float, float(s.hu_window[1]), ("hu_window",)),
        Parameter("retrieval", str, s.retrieval, ("retrieval",)),
        Parameter("montageSize", int, int(s.montage_size), ("montage_size",)),
        Parameter("topK", int, int(s.top_k), ("top_k",)),
        Parameter("seed", int, int(s.seed), ("seed",)),
        Parameter("scoringMode", str, s.scoring_mode, ("scoring_mode",)),
        Parameter("proposalGridTokens", int, int(s.proposal_grid_tokens), ("proposal_grid_tokens",)),
        Parameter("proposalSkipWithinMm", float, float(s.proposal_skip_within_mm), ("proposal_skip_within_mm",)),
        Parameter("fp32SkipWithinMm", float, float(s.fp32_skip_within_mm), ("fp32_skip_within_mm",)),
        Parameter("rescoreFraction", float, float(s.rescore_fraction), ("rescore_fraction",)),
        Parameter("rescoreMin", int, int(s.rescore_min), ("rescore_min",)),
        Parameter("lungThresholdHu", float, float(lung.threshold_hu), ("lung.threshold_hu",)),
        Parameter("lungMinComponentMl", float, float(lung.min_component_ml), ("lung.min_component_ml",)),
        Parameter("lungOpeningMm", float, float(lung.opening_mm), ("lung.opening_mm",)),
        Parameter("lungClosingMm", float, float(lung.closing_mm), ("lung.closing_mm",)),
        Parameter("lungErosionMm", float, float(lung.erosion_mm), ("lung.erosion_mm",)),
        Parameter("lungAirwayHu", float, float(lung.airway_hu), ("lung.airway_hu",)),
        Parameter("lungFillHoles", bool, bool(lung.fill_holes), ("lung.fill_holes",)),
        Parameter("lungWorkingSpacingMm", float, float(lung.working_spacing_mm or 0.0), ("lung.working_spacing_mm",)),
    )


#: Every settings parameter, in panel order.
PARAMETERS: tuple = _defaults()
BY_NAME: dict = {p.name: p for p in PARAMETERS}
#: Typed defaults by parameter name (the wrapper's ``= DEFAULTS["patchMm"]`` etc.).
DEFAULTS: dict = {p.name: p.default for p in PARAMETERS}


# ----------------------------------------------------------------------------------------------
# Encoding, identical to slicer.parameterNodeWrapper's serializers
# ----------------------------------------------------------------------------------------------
def encode(value, kind: type) -> str:
    if kind is bool:
        return "True" if value else "False"
    if kind is int:
        return str(int(value))
    if kind is float:
        return str(float(value))
    return str(value)


def decode(text: str, kind: type):
    if kind is bool:
        return text == "True"
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    return text


# ----------------------------------------------------------------------------------------------
# Typed values <-> AnalysisSettings
# ----------------------------------------------------------------------------------------------
def split_prompts(text: str) -> list[str]:
    return [p.strip() for p in (text or "").split(PROMPT_SEPARATOR) if p.strip()]


def split_subtypes(text: str) -> list[str]:
    return [s.strip() for s in (text or "").splitlines() if s.strip()]


def _split_negatives(text: str) -> Optional[list[str]]:
    # Positions matter (negative i belongs to prompt i), so empty entries stay as "" = default "no {prompt}".
    if not (text or "").strip():
        return None
    parts = [n.strip() for n in text.split(PROMPT_SEPARATOR)]
    while parts and not parts[-1]:
        parts.pop()
    return parts or None


def settings_to_values(settings: AnalysisSettings, model_names: Sequence[str]) -> dict:
    """Typed parameter values (name -> str/int/float/bool) for ``settings``."""
    model, checkpoint = settings.model, settings.checkpoint or ""
    if model.startswith(DAPT_PREFIX):
        model, checkpoint = CUSTOM_MODEL, model[len(DAPT_PREFIX):]
    elif model.startswith(ENSEMBLE_PREFIX):
        # The panel's model list cannot hold a path: the ensemble.json goes into the file field.
        model, checkpoint = ENSEMBLE_MODEL, model[len(ENSEMBLE_PREFIX):]
    elif model not in model_names:
        # A bare checkpoint path: the engine loads it as one of our (DAPT) checkpoints.
        model, checkpoint = CUSTOM_MODEL, model
    lung = settings.lung
    return {
        "model": model,
        "checkpointPath": checkpoint,
        "weightsDir": settings.weights_dir or "",
        "device": settings.device,
        "batchSize": int(settings.batch_size),
        "prompts": PROMPT_SEPARATOR.join(settings.prompts),
        "negatives": PROMPT_SEPARATOR.join(settings.negatives or []),
        "subtypes": SUBTYPE_SEPARATOR.join(settings.subtypes),
        "patterns": SUBTYPE_SEPARATOR.join(settings.patterns or []),
        "normalPrompt": settings.normal_prompt,
        "subpleuralMm": float(settings.subpleural_mm),
        "extentZ": float(settings.extent_z),
        "extentMinNeighbours": int(settings.extent_min_neighbours),
        "patchMm": float(settings.patch_mm),
        "patchPx": int(settings.patch_px or 0),
        "strideFraction": float(settings.stride_fraction),
        "sliceStepMm": float(settings.slice_step_mm),
        "filterThreshold": float(settings.filter_threshold),
        "scoredMinLungFraction": float(settings.scored_min_lung_fraction),
        "windowLowHu": float(settings.hu_window[0]),
        "windowHighHu": float(settings.hu_window[1]),
        "retrieval": settings.retrieval,
        "montageSize": int(settings.montage_size),
        "topK": int(settings.top_k),
        "seed": int(settings.seed),
        "scoringMode": settings.scoring_mode,
        "proposalGridTokens": int(settings.proposal_grid_tokens),
        "proposalSkipWithinMm": float(settings.proposal_skip_within_mm),
        "fp32SkipWithinMm": float(settings.fp32_skip_within_mm),
        "rescoreFraction": float(settings.rescore_fraction),
        "rescoreMin": int(settings.rescore_min),
        "lungThresholdHu": float(lung.threshold_hu),
        "lungMinComponentMl": float(lung.min_component_ml),
        "lungOpeningMm": float(lung.opening_mm),
        "lungClosingMm": float(lung.closing_mm),
        "lungErosionMm": float(lung.erosion_mm),
        "lungAirwayHu": float(lung.airway_hu),
        "lungFillHoles": bool(lung.fill_holes),
        "lungWorkingSpacingMm": float(lung.working_spacing_mm or 0.0),
    }


def values_to_settings(values: Mapping, *, validate: bool = True) -> AnalysisSettings:
    """``AnalysisSettings`` from typed parameter values; missing names take their defaults.

    Raises ``InputError`` (one line) for values the engine would refuse.
    """
    v = dict(DEFAULTS)
    v.update({k: values[k] for k in values if k in BY_NAME})
    model = str(v["model"]).strip()
    checkpoint = str(v["checkpointPath"]).strip() or None
    if model == CUSTOM_MODEL:
        if not checkpoint:
            raise InputError(f"'{CUSTOM_MODEL}' needs a checkpoint file: pick a .safetensors file written by training/")
        model, checkpoint = DAPT_PREFIX + checkpoint, None
    elif model == ENSEMBLE_MODEL:
        if not checkpoint:
            raise InputError(f"'{ENSEMBLE_MODEL}' needs an ensemble file: pick the ensemble.json of a training run")
        model, checkpoint = ENSEMBLE_PREFIX + checkpoint, None
    prompts = split_prompts(v["prompts"])
    if not prompts:
        raise InputError("empty prompt: type a finding to search for, e.g. 'honeycombing'")
    settings = AnalysisSettings(
        model=model,
        checkpoint=checkpoint,
        weights_dir=str(v["weightsDir"]).strip() or None,
        device=v["device"],
        batch_size=int(v["batchSize"]),
        prompts=prompts,
        negatives=_split_negatives(v["negatives"]),
        subtypes=split_subtypes(v["subtypes"]),
        patterns=split_subtypes(v["patterns"]),
        normal_prompt=str(v["normalPrompt"]).strip(),
        subpleural_mm=float(v["subpleuralMm"]),
        extent_z=float(v["extentZ"]),
        extent_min_neighbours=int(v["extentMinNeighbours"]),
        patch_mm=float(v["patchMm"]),
        patch_px=int(v["patchPx"]) or None,
        stride_fraction=float(v["strideFraction"]),
        slice_step_mm=float(v["sliceStepMm"]),
        filter_threshold=float(v["filterThreshold"]),
        scored_min_lung_fraction=float(v["scoredMinLungFraction"]),
        hu_window=(float(v["windowLowHu"]), float(v["windowHighHu"])),
        retrieval=v["retrieval"],
        montage_size=int(v["montageSize"]),
        top_k=int(v["topK"]),
        seed=int(v["seed"]),
        scoring_mode=v["scoringMode"],
        proposal_grid_tokens=int(v["proposalGridTokens"]),
        proposal_skip_within_mm=float(v["proposalSkipWithinMm"]),
        fp32_skip_within_mm=float(v["fp32SkipWithinMm"]),
        rescore_fraction=float(v["rescoreFraction"]),
        rescore_min=int(v["rescoreMin"]),
        lung=LungMaskSettings(
            threshold_hu=float(v["lungThresholdHu"]),
            min_component_ml=float(v["lungMinComponentMl"]),
            opening_mm=float(v["lungOpeningMm"]),
            closing_mm=float(v["lungClosingMm"]),
            erosion_mm=float(v["lungErosionMm"]),
            airway_hu=float(v["lungAirwayHu"]),
            fill_holes=bool(v["lungFillHoles"]),
            working_spacing_mm=float(v["lungWorkingSpacingMm"]) or None,
        ),
    )
    return settings.validate() if validate else settings


# ----------------------------------------------------------------------------------------------
# Parameter node (any object with GetParameter/SetParameter/HasParameter: vtkMRMLScriptedModuleNode)
# ----------------------------------------------------------------------------------------------
def read_values(node) -> dict:
    """Typed values of the settings parameters present on ``node`` (absent ones are left out)."""
    out = {}
    for p in PARAMETERS:
        if node.HasParameter(p.name):
            try:
                out[p.name] = decode(node.GetParameter(p.name), p.kind)
            except ValueError:
                raise InputError(f"parameter {p.name}={node.GetParameter(p.name)!r} is not a valid {p.kind.__name__}: "
                                 "reset it in the module panel") from None
    return out


def write_values(node, values: Mapping) -> None:
    """Set the given typed values as string parameters in one modification batch."""
    was = node.StartModify()
    try:
        for name, value in values.items():
            node.SetParameter(name, encode(value, BY_NAME[name].kind))
    finally:
        node.EndModify(was)


def read_settings(node, *, validate: bool = True) -> AnalysisSettings:
    return values_to_settings(read_values(node), validate=validate)


def write_settings(node, settings: AnalysisSettings, model_names: Sequence[str]) -> None:
    write_values(node, settings_to_values(settings, model_names))


def ensure_defaults(node) -> None:
    """Give every absent settings parameter its default (what the wrapper does for its fields)."""
    missing = {p.name: p.default for p in PARAMETERS if not node.HasParameter(p.name)}
    if missing:
        write_values(node, missing)


def settings_fields_covered() -> set:
    """Dotted AnalysisSettings fields the parameters carry (a test compares this with the dataclasses)."""
    return {f for p in PARAMETERS for f in p.fields}


#: Settings the panel does not carry (none at present: every engine setting has its parameter).
NOT_IN_PANEL: frozenset = frozenset()


def all_settings_fields() -> set:
    top = {f.name for f in dataclasses.fields(AnalysisSettings) if f.name != "lung" and f.name not in NOT_IN_PANEL}
    return top | {f"lung.{f.name}" for f in dataclasses.fields(LungMaskSettings)}
