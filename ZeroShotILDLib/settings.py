"""One settings type shared by the command line, the Slicer module and training.

A parameter means the same thing everywhere: the CLI flags, the Slicer parameter node and the
training configs are all read into ``AnalysisSettings``. Names carry their units.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .errors import InputError

DEFAULT_PROMPT = "interstitial lung disease"
DEFAULT_SUBTYPES = (
    "idiopathic pulmonary fibrosis",
    "systemic sclerosis",
    "hypersensitivity pneumonitis",
)
#: Findings offered as quick picks in the Slicer module and documented for the CLI.
COMMON_FINDINGS = (
    "interstitial lung disease",
    "honeycombing",
    "reticulation",
    "ground-glass opacity",
    "traction bronchiectasis",
    "emphysema",
    "consolidation",
)
#: Lung window (level -600 HU, width 1500 HU), the usual reading window for HRCT parenchyma.
LUNG_WINDOW_HU = (-1350.0, 150.0)
MONTAGE_SIZES = (4, 8, 16)
RETRIEVAL_METHODS = ("clip", "random")
DEVICES = ("auto", "cpu", "cuda", "mps")
SCORING_MODES = ("exact", "fast")
#: Pattern map prompts by default (plus the normal-lung prompt ``AnalysisSettings.normal_prompt``).
DEFAULT_PATTERNS = ("honeycombing", "reticulation", "ground-glass opacity", "consolidation", "emphysema")


@dataclass
class LungMaskSettings:
    """Parameters of the paper-000 lung segmentation (threshold + morphology + hole filling)."""

    threshold_hu: float = -400.0
    #: Components smaller than this (mL) are dropped (noise, bowel gas).
    min_component_ml: float = 5.0
    #: Radius (mm) of the in-plane opening that cuts thin bridges to airways.
    opening_mm: float = 2.0
    #: Radius (mm) of the in-plane closing that pulls vessels and dense subpleural tissue in.
    closing_mm: float = 6.0
    #: Radius (mm) of the final erosion that keeps the mask off the chest wall.
    erosion_mm: float = 0.0
    #: Airway lumen below this HU is taken for trachea/main bronchi candidates.
    airway_hu: float = -950.0
    fill_holes: bool = True
    #: Segment on a grid of about this spacing (mm) and upsample the mask; None = full resolution.
    #: Off by default: at 1.4 mm the mask's Dice against full resolution is 0.9895 on the 0.7 mm
    #: reference phantom (bench/RESULTS.md), under the 0.99 floor, for a 2.5x faster mask.
    working_spacing_mm: Optional[float] = None


@dataclass
class AnalysisSettings:
    """Everything that decides what ``analyze`` computes."""

    # Model: an openly licensed one a new user can get in one step (`zeroshot-ild models download
    # clip-vit-b-32-laion`, or the Slicer panel's offer); CheXzero, the best model of Van Uden et al.
    # 2023, needs a credentialed licence and a manual download (`--model chexzero`).
    model: str = "clip-vit-b-32-laion"
    checkpoint: Optional[str] = None
    weights_dir: Optional[str] = None
    device: str = "auto"
    batch_size: int = 64

    # Prompts (paper 000: positive prompt vs "no {prompt}")
    prompts: list[str] = field(default_factory=lambda: [DEFAULT_PROMPT])
    negatives: Optional[list[str]] = None
    subtypes: list[str] = field(default_factory=lambda: list(DEFAULT_SUBTYPES))

    # Candidate patches
    patch_mm: float = 32.0
    #: If set, the patch is this many pixels at the scan's native in-plane spacing instead of patch_mm.
    patch_px: Optional[int] = None
    #: Grid stride as a fraction of the patch side (1.0 = non-overlapping).
    stride_fraction: float = 1.0
    slice_step_mm: float = 1.0
    #: Montage and top patches: only boxes with at least this share of lung (the papers' filter).
    filter_threshold: float = 0.5
    #: Extent and heatmap: every box with at least this share of lung is scored, so the pleura is
    #: looked at (0.05 scores >= 0.99 of the lung on real and phantom scans; bench/RESULTS.md).
    scored_min_lung_fraction: float = 0.05
    hu_window: tuple[float, float] = LUNG_WINDOW_HU

    # Ranking and montage
    retrieval: str = "clip"
    montage_size: int = 4
    top_k: int = 16
    seed: int = 0
    #: "exact" encodes every candidate in fp32; "fast" (default) ranks them with a bf16 copy of the
    #: image tower (on thin slices: every few slices, then the neighbours of the best) and re-scores
    #: the best exactly: the same top-16 and montage as exact on every bench row in a fraction of the
    #: time; it runs exact itself where bf16 does not pay (CUDA, CPUs without bf16 units, small
    #: scans) and says so in the result's notes.
    scoring_mode: str = "fast"
    #: Fast mode: ViT tokens per side in the (bf16) proposal pass; 0 = the model's full input size.
    #: Lower grids are cheaper but lost the exact top patches on random weights (bench/RESULTS.md).
    proposal_grid_tokens: int = 0
    #: Fast mode: the proposal pass skips slices that lie within this distance of a slice it encodes
    #: (1 mm at 1 mm slices: two of every three), then encodes the skipped slices next to its best
    #: boxes and interpolates the rest in z. 0, or slices thicker than this, encodes every slice.
    #: Measured: within 1 mm kept the exact top-16 on every 1 mm phantom; 1.5 mm (every other slice
    #: of a 1.5 mm CT) lost 1 of 16, so it is not the default (bench/RESULTS.md).
    proposal_skip_within_mm: float = 1.0
    #: Fast mode without native bf16 (the fp32 search, ``proposals``): its first pass leaves each
    #: skipped slice within this distance of an encoded one. Replayed for six prompts
    #: (bench/bench_fp32_search.py): 4 mm finds the exact top-16 for the default prompt on the
    #: reference at ~0.24 of the candidates but as few as 12-13/16 for other prompts or models;
    #: 1 mm finds >= 15/16 on every input and prompt replayed, at ~0.42. 0 = every slice (exact).
    fp32_skip_within_mm: float = 4.0
    #: Fast mode: share of the candidates re-scored exactly in fp32 (never fewer than rescore_min).
    rescore_fraction: float = 0.02
    rescore_min: int = 64

    # Extent and pattern map (extent.py, patterns.py)
    #: Depth (mm) of the subpleural rind measured from the pleural surface.
    subpleural_mm: float = 10.0
    #: A patch counts as the finding when its contrast with the normal-lung text stands this many
    #: robust SDs above normal lungs' (the model's calibrated reference; see extent.py, calibration.py).
    extent_z: float = 4.0
    #: ... and when at least this many of its 6 grid neighbours count too (0 = off): a finding is a
    #: region; a zero-shot model's errors on normal lung are scattered boxes (bench/RESULTS.md: 3 kept
    #: normal lungs under 3 % where 2 let one reach 4-6 %).
    extent_min_neighbours: int = 3
    #: Pattern prompts labelled together into patterns.nii.gz; empty = no pattern map.
    patterns: list[str] = field(default_factory=lambda: list(DEFAULT_PATTERNS))
    #: The normal-lung text every finding's extent is scored against (finding minus normal-lung similarity).
    normal_prompt: str = "normal lung"

    lung: LungMaskSettings = field(default_factory=LungMaskSettings)

    # ------------------------------------------------------------------
    def negative_for(self, index: int) -> str:
        if self.negatives and index < len(self.negatives) and self.negatives[index]:
            return self.negatives[index]
        return f"no {self.prompts[index]}"

    def validate(self) -> "AnalysisSettings":
        """Raise ``InputError`` with a one-line reason for the first invalid setting."""
        self.prompts = [p.strip() for p in self.prompts]
        if not self.prompts or any(not p for p in self.prompts):
            raise InputError("empty prompt: give a finding to search for, e.g. --prompt 'honeycombing'")
        if self.negatives is not None and len(self.negatives) > len(self.prompts):
            raise InputError("more --negative prompts than --prompt: give one negative per prompt at most")
        self.subtypes = [s.strip() for s in self.subtypes if s and s.strip()]
        if self.montage_size not in MONTAGE_SIZES:
            raise InputError(f"montage size {self.montage_size} is not supported: use one of {MONTAGE_SIZES}")
        if not 0.0 <= self.filter_threshold <= 1.0:
            raise InputError(f"filter threshold {self.filter_threshold} must be between 0 and 1")
        if not 0.0 <= self.scored_min_lung_fraction <= 1.0:
            raise InputError(f"scored minimum lung fraction {self.scored_min_lung_fraction} must be between 0 and 1")
        if self.patch_px is None and not self.patch_mm > 0:
            raise InputError(f"patch size {self.patch_mm} mm must be positive")
        if self.patch_px is not None and self.patch_px < 4:
            raise InputError(f"patch size {self.patch_px} px is too small: use at least 4 pixels")
        if not 0.1 <= self.stride_fraction <= 4.0:
            raise InputError(f"stride fraction {self.stride_fraction} must be between 0.1 and 4")
        if not self.slice_step_mm > 0:
            raise InputError(f"slice step {self.slice_step_mm} mm must be positive")
        lo, hi = self.hu_window
        if not hi > lo:
            raise InputError(f"HU window {self.hu_window} is empty: give (low, high) with high > low")
        if self.retrieval not in RETRIEVAL_METHODS:
            raise InputError(f"retrieval '{self.retrieval}' is unknown: use one of {RETRIEVAL_METHODS}")
        if self.device not in DEVICES:
            raise InputError(f"device '{self.device}' is unknown: use one of {DEVICES}")
        if self.scoring_mode not in SCORING_MODES:
            raise InputError(f"scoring mode '{self.scoring_mode}' is unknown: use one of {SCORING_MODES}")
        if not 0 <= self.proposal_grid_tokens <= 64:
            raise InputError(f"proposal grid {self.proposal_grid_tokens} tokens must be between 0 (full) and 64")
        if not 0.0 <= self.proposal_skip_within_mm <= 10.0:
            raise InputError(f"proposal skip distance {self.proposal_skip_within_mm} mm must be between 0 "
                             "(every slice) and 10")
        if not 0.0 <= self.fp32_skip_within_mm <= 10.0:
            raise InputError(f"fp32 skip distance {self.fp32_skip_within_mm} mm must be between 0 (every slice) and 10")
        if not 0.0 <= self.rescore_fraction <= 1.0:
            raise InputError(f"re-score fraction {self.rescore_fraction} must be between 0 and 1")
        if self.rescore_min < 0:
            raise InputError(f"re-score minimum {self.rescore_min} must be 0 or more")
        if not 0.0 < self.subpleural_mm <= 50.0:
            raise InputError(f"subpleural rind {self.subpleural_mm} mm must be between 0 and 50")
        if not (isinstance(self.extent_min_neighbours, int) and 0 <= self.extent_min_neighbours <= 6):
            raise InputError(f"extent neighbours {self.extent_min_neighbours!r} must be a whole number from 0 to 6")
        if not 0.0 <= self.extent_z <= 20.0:
            raise InputError(f"extent threshold {self.extent_z} must be between 0 and 20 robust SDs")
        self.patterns = list(dict.fromkeys(p.strip() for p in (self.patterns or []) if p and p.strip()))
        if len(self.patterns) > 254:
            raise InputError(f"{len(self.patterns)} pattern prompts: give at most 254")
        self.normal_prompt = (self.normal_prompt or "").strip()
        if self.patterns and not self.normal_prompt:
            raise InputError("empty normal-lung prompt: give one, e.g. --normal-prompt 'normal lung'")
        if self.top_k < 1:
            raise InputError("top-k must be at least 1")
        if self.batch_size < 1:
            raise InputError("batch size must be at least 1")
        return self

    @property
    def montage_patches(self) -> int:
        return self.montage_size * self.montage_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AnalysisSettings":
        data = dict(data)
        lung = LungMaskSettings(**data.pop("lung", {}) or {})
        if "hu_window" in data:
            data["hu_window"] = tuple(data["hu_window"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown settings {sorted(unknown)}: check the spelling against AnalysisSettings")
        return cls(lung=lung, **data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def patch_key(self) -> dict:
        """The settings that decide which patches exist and what their pixels are (cache key)."""
        return {
            "patch_mm": self.patch_mm,
            "patch_px": self.patch_px,
            "stride_fraction": self.stride_fraction,
            "slice_step_mm": self.slice_step_mm,
            "filter_threshold": self.filter_threshold,
            "scored_min_lung_fraction": self.scored_min_lung_fraction,
            "hu_window": list(self.hu_window),
            "lung": dataclasses.asdict(self.lung),
        }


def with_overrides(settings: AnalysisSettings, **overrides) -> AnalysisSettings:
    """Copy of ``settings`` with fields replaced (the Slicer re-prompt path uses this)."""
    return dataclasses.replace(settings, **overrides)


def as_list(value: Optional[Sequence[str]]) -> list[str]:
    return list(value) if value else []


# ----------------------------------------------------------------------------------------------
# Command lines and --config files: every problem is one line naming the setting
# ----------------------------------------------------------------------------------------------
import argparse  # noqa: E402  (kept with the code that needs it)
from pathlib import Path  # noqa: E402

#: A settings file is a few hundred bytes; anything this large is not one.
CONFIG_MAX_BYTES = 1 << 20
#: Settings are flat (a value or a list of values: ``config_value`` refuses anything deeper, naming
#: the key). Nesting beyond this many levels is refused before YAML composes it: PyYAML recurses per
#: level, and thousands of levels end in a RecursionError thousands of lines long.
CONFIG_MAX_DEPTH = 32


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse`` that reports a wrong option (``--seed abc``) in one line instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _nesting_depth_of_text(text: str) -> int:
    """Deepest nesting of flow brackets or block indentation levels, counted cheaply on the text."""
    deepest = depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
    indents = sorted({len(line) - len(line.lstrip(" -")) for line in text.splitlines() if line.strip()
                      and not line.lstrip().startswith("#")})
    return max(deepest, len(indents))


def read_config_file(path, *, option: str = "--config") -> dict:
    """The mapping in a YAML settings file; one line (InputError) for every way it can be wrong.

    Checked: the file exists and is a regular file below ``CONFIG_MAX_BYTES``, is UTF-8 text, is YAML
    (``safe_load``: no Python tags), is not nested deeper than ``CONFIG_MAX_DEPTH``, and is a
    mapping with text keys.
    """
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"{option} {path}: no such file")
    try:
        size = file.stat().st_size
        if size > CONFIG_MAX_BYTES:
            raise InputError(f"{option} {file.name} is {size} bytes: a settings file is a short YAML mapping "
                             f"(at most {CONFIG_MAX_BYTES} bytes)")
        raw = file.read_bytes()
    except OSError as exc:
        raise InputError(f"{option} {file.name} cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{option} {file.name} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at position "
                         f"{exc.start}): save it as UTF-8") from None
    if _nesting_depth_of_text(text) > CONFIG_MAX_DEPTH:
        raise InputError(f"{option} {file.name} is nested too deeply: settings are `key: value` or "
                         "`key: [values]` (see --print-config)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{option} {file.name} is not valid YAML{where} ({problem})") from None
    except RecursionError:
        raise InputError(f"{option} {file.name} is nested too deeply: settings are `key: value` or "
                         "`key: [values]`") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{option} {file.name} must be a mapping of settings (key: value), not "
                         f"{type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise InputError(f"{option} {file.name}: setting names are text, not {key!r}")
    return data


def _scalar_text(key: str, value, where: str, expected: str):
    if isinstance(value, (dict, list, tuple, set)):
        kind = "a mapping" if isinstance(value, dict) else "a list"
        raise InputError(f"{where}: {key} must be {expected}, not {kind}")
    return value


def config_value(key: str, value, action: argparse.Action, *, where: str = "--config") -> object:
    """``value`` from a settings file, checked and converted as the command line would ``--key value``.

    ``null`` stays None: the setting's "not given" (what ``--print-config`` writes for it).
    """
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise InputError(f"{where}: {key} must be true or false, not {value!r}"[:300])
        return value
    if isinstance(action, (argparse._StoreConstAction, argparse._CountAction)):
        if isinstance(action, argparse._CountAction):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{where}: {key} must be a whole number >= 0")
            return value
        return action.const if value is True else (action.default if value is False else
                                                   _bad(where, key, "true or false", value))
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*") or \
        (isinstance(action.nargs, int) and action.nargs > 1)
    expected = _expected(action)
    if many:
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and action.nargs > 1 and len(items) != action.nargs:
            raise InputError(f"{where}: {key} must be a list of {action.nargs} values ({expected}), "
                             f"not {len(items)}")
        return [_one(key, _scalar_text(key, v, where, expected + " in a list"), action, where) for v in items]
    return _one(key, _scalar_text(key, value, where, expected), action, where)


def _bad(where, key, expected, value):
    raise InputError(f"{where}: {key} must be {expected}, not {str(value)[:80]!r}")


def _expected(action: argparse.Action) -> str:
    if action.choices:
        return "one of " + ", ".join(str(c) for c in action.choices)
    kind = getattr(action.type, "__name__", "")
    return {"int": "a whole number", "float": "a number"}.get(kind, "text" if action.type is None else "a value")


def _one(key: str, value, action: argparse.Action, where: str):
    expected = _expected(action)
    if value is None:
        _bad(where, key, expected, value)
    if isinstance(value, bool) and action.type in (int, float):
        _bad(where, key, expected, value)
    if action.type is not None:
        try:
            converted = action.type(value if isinstance(value, str) else str(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError, InputError):
            _bad(where, key, expected, value)
    else:
        if not isinstance(value, (str, int, float)):
            _bad(where, key, expected, value)
        converted = value if isinstance(value, str) else str(value)
    if action.choices is not None and converted not in action.choices:
        _bad(where, key, expected, value)
    return converted
