"""Checkpoints of a DAPT run: engine-format top-k chosen among healthy validations, the ensemble list,
health-aware early stopping, and the weights-only reading of a run's Lightning state."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ZeroShotILDLib import models
from ZeroShotILDLib.errors import InputError

from .dapt_config import MONITORS, DaptConfig
from .label_head import label_head_path
from .lightning_required import EarlyStopping, L, ModelCheckpoint
from .run_json import write_json

RESUME_NAME = "last.ckpt"


class EngineCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose top-k files are engine checkpoints (safetensors via ``save_checkpoint``).

    The top-k files carry the weights only (what the engine and ensembles need); the full
    Lightning state for resuming (optimizer, scheduler, loops, callbacks) is written once, as
    ``last.ckpt``, whenever ``last.safetensors`` is. After every validation the current top-k
    list is written to ``ensemble_json`` (rank 0), so it is on disk whatever the strategy and
    even while training still runs.

    Top-k is chosen among healthy checkpoints (:func:`validation_verdict`): an unhealthy one
    (collapsed, or at chance) ranks after every healthy one, whatever its score, and is left out
    of ``ensemble_json`` once any healthy checkpoint exists. A collapse pulls the validation loss
    towards chance from above, so the lowest loss alone would often pick a collapsed model.
    """

    FILE_EXTENSION = ".safetensors"
    #: Added to (min) or subtracted from (max) an unhealthy checkpoint's score in Lightning's top-k
    #: bookkeeping: a two-tier ranking, healthy first; the real scores are kept in ``scores``.
    UNHEALTHY_OFFSET = 1e6

    def __init__(self, *args, ensemble_json: Union[str, Path], config: DaptConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.ensemble_json = Path(ensemble_json)
        self.config = config
        #: checkpoint path -> {"val_loss", "val_auroc"} at the time it was written.
        self.scores: dict = {}
        #: checkpoint path -> its validation's verdict (:func:`validation_verdict`).
        self.verdicts: dict = {}

    def _save_monitor_checkpoint(self, trainer, monitor_candidates: dict) -> None:
        current = monitor_candidates.get(self.monitor)
        verdict = getattr(trainer.lightning_module, "current_verdict", None)
        if current is not None and verdict is not None and not verdict["healthy"]:
            offset = self.UNHEALTHY_OFFSET if self.mode == "min" else -self.UNHEALTHY_OFFSET
            current = current + offset
        if self.check_monitor_top_k(trainer, current):
            self._update_best_and_save(current, trainer, monitor_candidates)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        path = Path(filepath)
        if path.stem.startswith(self.CHECKPOINT_NAME_LAST):
            trainer.save_checkpoint(str(path.with_name(RESUME_NAME)), weights_only=False)
        metrics = trainer.callback_metrics
        scores = {k: float(metrics[k]) for k in MONITORS if k in metrics}
        self.scores[str(Path(filepath).resolve())] = scores
        verdict = getattr(trainer.lightning_module, "current_verdict", None)
        if verdict is not None and not path.stem.startswith(self.CHECKPOINT_NAME_LAST):
            self.verdicts[str(path.resolve())] = {k: verdict[k] for k in ("healthy", "collapsed", "at_chance")}
        if trainer.is_global_zero:
            extra = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch), **scores}
            trainer.lightning_module.export(path, **extra)
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            label_head_path(filepath).unlink(missing_ok=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.is_global_zero and not trainer.sanity_checking:
            sign = 1.0 if self.mode == "min" else -1.0
            ranked = sorted(((sign * float(v), str(Path(p).resolve())) for p, v in self.best_k_models.items()))
            top_k = []
            for _, p in ranked:
                scores = self.scores.get(p, {})
                verdict = self.verdicts.get(p, {"healthy": True, "collapsed": False, "at_chance": False})
                top_k.append({"path": p, "val_loss": scores.get("val_loss"), "val_auroc": scores.get("val_auroc"),
                              "monitor": self.monitor, "score": scores.get(self.monitor), "step": _step_of(p),
                              **verdict})
            # Only healthy checkpoints are ensembled (and become best) once there is one.
            if any(c["healthy"] for c in top_k):
                top_k = [c for c in top_k if c["healthy"]]
            write_ensemble(self.ensemble_json, top_k, self.config, global_step=int(trainer.global_step))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["scores"] = {p: dict(v) for p, v in self.scores.items()}
        state["verdicts"] = {p: dict(v) for p, v in self.verdicts.items()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.scores = {str(p): {k: float(x) for k, x in v.items()} for p, v in (state_dict.get("scores") or {}).items()}
        self.verdicts = {str(p): {k: bool(x) for k, x in v.items()} for p, v in (state_dict.get("verdicts") or {}).items()}


class HealthAwareEarlyStopping(EarlyStopping):
    """EarlyStopping that counts an unhealthy validation (:func:`validation_verdict`) as no improvement:
    a collapse that lowers the loss must not reset the patience any more than it may become best."""

    def _run_early_stopping_check(self, trainer) -> None:
        self.verdict = getattr(trainer.lightning_module, "current_verdict", None)
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple:
        verdict = getattr(self, "verdict", None)
        if verdict is None or verdict.get("healthy", True) or not torch.isfinite(current):
            return super()._evaluate_stopping_criteria(current)
        if not torch.isfinite(self.best_score):
            return False, None  # nothing healthy yet to be patient about
        return super()._evaluate_stopping_criteria(self.best_score.clone().to(current.device))


class _ValidateAtEnd(L.Callback):
    """Ask for a validation (hence a checkpoint) after the final step, which the fixed interval may miss.

    Lightning validates in the middle of an epoch when ``should_stop`` is set, so setting it at
    the last planned step makes the final weights a scored, exported checkpoint too.
    """

    def __init__(self, total_steps: int):
        self.total_steps = int(total_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.total_steps:
            trainer.should_stop = True


def _step_of(path: str) -> Optional[int]:
    name = Path(path).name
    if name.startswith("step"):
        digits = name[4:].split("-")[0]
        if digits.isdigit():
            return int(digits)
    return None


def write_ensemble(path: Union[str, Path], top_k: Sequence[dict], config: DaptConfig, *, global_step: int = 0) -> Path:
    """The JSON the engine averages over: ``{"checkpoints": [{"path", "val_loss", "step"}, ...]}``, best first.

    Paths are stored relative to the JSON file's folder (``ZeroShotILDLib.ensemble`` resolves them
    against it; absolute paths from older runs are still read).

    ``combine`` names CheXzero's rule: average the probabilities of the checkpoints.
    """
    path = Path(path)
    # Relative to the file's folder: a copied or moved run folder keeps working.
    members = [{**c, "path": os.path.relpath(Path(c["path"]).resolve(), path.resolve().parent)} for c in top_k]
    payload = {"format": "zeroshot-ild-ensemble/1", "base_model": config.model, "loss": config.loss,
               "monitor": config.monitor, "combine": "mean_probability", "global_step": int(global_step),
               "checkpoints": members}
    return write_json(Path(path), payload)


def read_lightning_checkpoint(path: Union[str, Path]) -> dict:
    """A run's Lightning ``.ckpt`` read weights-only; anything else is refused in one line.

    A pickle carrying Python objects (code that would run on loading), a damaged file or a file
    that is not a DAPT run's checkpoint raises ``InputError``, never a traceback.
    """
    import pickle

    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests loading the file unsafely: it is not repeated here.
        raise InputError(f"{path.name} holds pickled Python objects, refused for safety: use the last.ckpt that "
                         "train wrote, or start the run again without --resume") from None
    except Exception as exc:  # noqa: BLE001 - zip/EOF/format errors of damaged files
        raise InputError(f"{path.name} is damaged or not a PyTorch checkpoint ({models._first_line(exc)}): use the "
                         "last.ckpt that train wrote, or start the run again without --resume") from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise InputError(f"{path.name} is not a Lightning checkpoint of a DAPT run: give a run's checkpoints/last.ckpt")
    return state
