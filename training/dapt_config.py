"""Settings of a DAPT run and the names they may take, importable without torch or Lightning.

``zeroshot-ild-train --help`` reads its defaults from here, so it answers at once; ``dapt`` (which
needs torch and Lightning) re-exports every name.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

from ZeroShotILDLib.errors import InputError

#: Paper 001's eq. 3 defaults; the same values as ``losses.RELAX_THRESHOLD`` / ``RELAX_SLOPE`` (a test keeps them equal).
RELAX_THRESHOLD = 0.5
RELAX_SLOPE = 10.0

LOSSES = ("clip", "relaxed", "slip", "uniclip", "unicl", "dlilp")
OPTIMIZERS = ("adamw", "adam")
#: Image views each loss needs (``augment=False`` turns "weak" into "original" where it is optional).
LOSS_VIEWS = {
    "clip": ("weak",), "relaxed": ("weak",), "unicl": ("weak",), "dlilp": ("weak",),
    "slip": ("weak", "strong1", "strong2"), "uniclip": ("original", "weak"),
}
LOGIT_SCALE_MAX = math.log(100.0)
#: Text and sentence sampling of the two papers' recipes; paper 000's is the default.
RECIPES = {"paper000": {"text_choice": "impression", "sentences_per_sample": 0},
           "paper001": {"text_choice": "findings+impression", "sentences_per_sample": 3}}
DEFAULT_RECIPE = "paper000"
#: Paper 000's epoch limit, used only when neither max_epochs nor max_steps is given.
DEFAULT_MAX_EPOCHS = 10
#: Checkpoint / early-stopping / sweep criteria and their direction.
MONITORS = {"val_loss": "min", "val_auroc": "max"}
LOGGERS = ("csv", "tensorboard", "mlflow")
#: Mean pairwise cosine of the validation image embeddings at or above which a run is "collapsed".
COLLAPSE_COSINE = 0.95
#: ... and the spread 1 - cosine at most this share of the base model's.
COLLAPSE_SPREAD_RATIO = 0.25
#: A best validation loss within this fraction of the chance level counts as "at chance".
CHANCE_MARGIN = 0.02


# ----------------------------------------------------------------------------------------------
# Settings and results
# ----------------------------------------------------------------------------------------------
@dataclass
class DaptConfig:
    """Settings of one DAPT run. Defaults follow paper 000's recipe (and paper 001's loss settings).

    Model and output
        output_dir : folder for checkpoints, logs and the summary.
        model, checkpoint, weights_dir : the base model, as for ``models.load_model``.
    Loss
        loss : ``clip`` | ``relaxed`` (CLIP with paper 001's eq. 3) | ``slip`` | ``uniclip`` |
            ``unicl`` | ``dlilp`` (the last two need labels and ``class_names``).
        relaxed_positives : also apply eq. 3 to the positives of ``slip``/``uniclip`` (paper 001's
            "w/ ours"); ``relaxed`` implies it for CLIP.
        relax_threshold, relax_slope : t (0.5) and alpha (10) of eq. 3.
        ssl_weight, ssl_temperature : weight (1) and fixed temperature (0.1) of SLIP's NT-Xent.
        dlilp_text_weight : lambda of DLILP's image-text term (0.1).
        class_names : label classes in the order of ``PairRecord.labels``.
    Text and images
        recipe : ``paper000`` (default) or ``paper001``: where text_choice and
            sentences_per_sample came from (see :data:`RECIPES`; :func:`recipe_config` applies it).
        text_choice : report part, see ``reports.TEXT_CHOICES`` (``impression``, paper 000).
        sentences_per_sample : n sentences sampled per step (0 = the whole text, paper 000;
            paper 001: 3). Validation always uses the whole text, unaugmented images.
        augment : weak geometric augmentation of the CLIP/UniCL/DLILP image (paper 001's WA).
        intensity_augment : add brightness/contrast 0.5-2 to augmented views (off: it changes
            the HU-window density that separates ground glass from fibrosis).
    Optimisation
        batch_size : samples per device and step; the loss sees batch_size x devices x nodes.
        learning_rate : peak learning rate after warm-up (1e-4).
        optimizer : ``adamw`` or ``adam``; weight_decay (0.1) applies to matrices only.
        warmup_steps : linear warm-up in optimizer steps, then cosine decay to 0 at the end.
            None (default): 10 % of the run's real number of steps, at most 100 (paper 000's 100
            steps on a long run; one step on a 10-step run), so every run reaches ``learning_rate``.
            An explicit value longer than the run is refused (:func:`warmup_for`).
        max_epochs (None), max_steps (-1 = none): whichever ends training first; with neither
            given, paper 000's 10 epochs; an explicit max_steps alone is never cut by epochs.
        gradient_clip_norm : max global L2 norm of the gradients (1.0; None = off).
        logit_scale_max : clamp of log(1/tau) after every step (ln 100).
    Validation and checkpoints
        val_fraction : share of patients held out when the records carry no split (0.1).
        val_every_steps : validation and checkpoint interval, optimizer steps (100).
        patience_steps : stop after this many steps without a better validation loss (1000).
        top_k : checkpoints kept by the monitor (5).
        monitor : ``val_loss`` (paper 000) or ``val_auroc`` (zero-shot AUROC on validation
            labels): ranks checkpoints, drives early stopping and the sweep.
        collapse_cosine, chance_margin : thresholds of the health verdict (0.95, 0.02).
        val_label : the label whose zero-shot AUROC every validation reports (``val_auroc``):
            ``ild`` (default) or the name of any ``label_<name>`` column, e.g. ``covid``.
        val_prompt, val_negative : the texts scored for that AUROC; default the prompt the
            montages were built with (``montage_settings``), its negative ``no <prompt>``.
        logger : ``csv`` (always written), ``tensorboard`` or ``mlflow`` in addition.
    Hardware
        accelerator (``auto``/``cpu``/``gpu``), devices (per node), num_nodes, strategy
        (``auto`` = DDP when more than one process), precision (``auto`` = bf16-mixed on GPUs
        that support it, else 16-mixed; 32-true on CPU), num_workers (data loader processes; None:
        one fewer than the CPUs this process may use, at most 4, :func:`default_workers`).
    Reproducibility
        seed : seeds the model head initialisation, the sample order, sentence sampling and
        augmentations; deterministic : ask torch for deterministic kernels (slower on GPU).
        progress_bar : Lightning's tqdm bar.
    Provenance
        montage_settings : the engine ``AnalysisSettings.to_dict()`` the cached montages were
            built with (retrieval, montage size, filter threshold, HU window, patch size, seed);
            stored in every exported checkpoint so that test-time montages can match them.
    """

    output_dir: str
    model: str = "chexzero"
    checkpoint: Optional[str] = None
    weights_dir: Optional[str] = None
    loss: str = "clip"
    relaxed_positives: bool = False
    relax_threshold: float = RELAX_THRESHOLD
    relax_slope: float = RELAX_SLOPE
    ssl_weight: float = 1.0
    ssl_temperature: float = 0.1
    dlilp_text_weight: float = 0.1
    class_names: tuple = ()
    recipe: str = DEFAULT_RECIPE
    text_choice: str = RECIPES[DEFAULT_RECIPE]["text_choice"]
    sentences_per_sample: int = RECIPES[DEFAULT_RECIPE]["sentences_per_sample"]
    augment: bool = True
    intensity_augment: bool = False
    batch_size: int = 64
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    warmup_steps: Optional[int] = None
    max_epochs: Optional[int] = None
    max_steps: int = -1
    gradient_clip_norm: Optional[float] = 1.0
    logit_scale_max: float = LOGIT_SCALE_MAX
    val_fraction: float = 0.1
    val_every_steps: int = 100
    patience_steps: int = 1000
    top_k: int = 5
    monitor: str = "val_loss"
    collapse_cosine: float = COLLAPSE_COSINE
    chance_margin: float = CHANCE_MARGIN
    val_label: str = "ild"
    val_prompt: Optional[str] = None
    val_negative: Optional[str] = None
    logger: str = "csv"
    accelerator: str = "auto"
    devices: Union[int, str] = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    num_workers: Optional[int] = None
    seed: int = 0
    deterministic: bool = False
    progress_bar: bool = True
    montage_settings: Optional[dict] = None

    def validate(self) -> None:
        """Raise ``InputError`` (one line) for settings that cannot work."""
        if self.loss not in LOSSES:
            raise InputError(f"unknown loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}: use adamw or adam")
        if self.loss in ("unicl", "dlilp") and not self.class_names:
            raise InputError(f"loss {self.loss} needs labels: give class names (label columns in the manifest)")
        for name in ("batch_size", "val_every_steps", "top_k", "num_nodes"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_epochs is not None and int(self.max_epochs) < 1:
            raise InputError(f"max_epochs must be at least 1, got {self.max_epochs}")
        if self.recipe not in RECIPES:
            raise InputError(f"unknown recipe {self.recipe!r}: use one of {', '.join(RECIPES)}")
        if self.monitor not in MONITORS:
            raise InputError(f"unknown monitor {self.monitor!r}: use one of {', '.join(MONITORS)}")
        if self.logger not in LOGGERS:
            raise InputError(f"unknown logger {self.logger!r}: use one of {', '.join(LOGGERS)}")
        if self.learning_rate <= 0:
            raise InputError(f"learning rate must be positive, got {self.learning_rate}")
        if not 0.0 < self.relax_threshold < 1.0:
            raise InputError(f"relax threshold must lie in (0, 1), got {self.relax_threshold}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"val fraction must lie in [0, 1), got {self.val_fraction}")
        if self.warmup_steps is not None and int(self.warmup_steps) < 0:
            raise InputError(f"warmup steps must be 0 or more, got {self.warmup_steps}")
        if self.val_prompt is not None and not str(self.val_prompt).strip():
            raise InputError("the validation prompt is empty: give --prompt a text")
        if self.sentences_per_sample < 0:
            raise InputError(f"sentences per sample must be 0 (whole text) or more, got {self.sentences_per_sample}")

    def to_json(self) -> dict:
        """The settings as plain JSON values (stored in every exported checkpoint)."""
        out = dataclasses.asdict(self)
        out["class_names"] = list(self.class_names)
        return out

    @property
    def views(self) -> tuple:
        views = LOSS_VIEWS[self.loss]
        if not self.augment and self.loss in ("clip", "relaxed", "unicl", "dlilp"):
            views = ("original",)
        return views


#: Warm-up of a run without an explicit ``warmup_steps``: this share of its steps, at most ...
WARMUP_FRACTION = 0.1
#: ... this many steps (paper 000's warm-up).
WARMUP_MAX_STEPS = 100


def warmup_for(config: "DaptConfig", total_steps: int) -> int:
    """Warm-up steps of a run of ``total_steps`` optimizer steps.

    Default: ``WARMUP_FRACTION`` of the run, at least 1 and at most ``WARMUP_MAX_STEPS``, so the
    learning rate reaches its peak in every run (at step ``warmup``; :func:`dapt.lr_factor`). An
    explicit ``warmup_steps`` longer than the run is refused in one line: that run would never reach ``learning_rate``.
    """
    total = max(1, int(total_steps))
    if config.warmup_steps is None:
        return max(1, min(WARMUP_MAX_STEPS, math.ceil(WARMUP_FRACTION * total)))
    warmup = int(config.warmup_steps)
    if warmup > total:
        raise InputError(f"--warmup-steps {warmup} is longer than the run's {total} steps: the learning rate would "
                         f"never reach --lr {config.learning_rate:g}; lower --warmup-steps or leave it out "
                         f"(default: {WARMUP_FRACTION:.0%} of the run, at most {WARMUP_MAX_STEPS})")
    return warmup


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM allocation), not the machine's count."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS / Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def default_workers(cap: int = 4) -> int:
    """Data-loader processes when none are asked for: one CPU stays for the training process."""
    return max(0, min(cap, available_cpus() - 1))


def recipe_config(recipe: str) -> dict:
    """The DaptConfig fields a recipe sets (``text_choice``, ``sentences_per_sample``)."""
    if recipe not in RECIPES:
        raise InputError(f"unknown recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    return dict(RECIPES[recipe])
