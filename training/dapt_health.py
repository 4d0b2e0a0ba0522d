"""Health of a DAPT run: embedding spread and retrieval per validation, and the collapsed / at-chance verdicts.

The verdicts decide which checkpoints may become best (``dapt_checkpoints``), when early stopping
counts a validation as progress, and what the run's warning line says.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .dapt_config import COLLAPSE_SPREAD_RATIO, DaptConfig


def embedding_health(image: torch.Tensor, text: torch.Tensor, paired_image: Optional[torch.Tensor] = None) -> dict:
    """Spread of L2-normalised image embeddings (N, D) and image->text retrieval of the pairs
    ``paired_image`` (default ``image``) / ``text``, row i of each paired.

    ``val_mean_cosine``: mean cosine over all pairs of different images (1 = every image maps to
    one point). ``val_effective_rank``: exp of the entropy of the normalised singular values
    (Roy & Vetterli 2007; 1 = one direction, up to min(N, D)). ``val_recall_at_k``: share of
    images whose own text is among the k most similar texts (chance k/N), for k < N.
    """
    image = image.double()
    n = image.shape[0]
    out: dict = {}
    if n >= 2:
        gram = image @ image.t()
        out["val_mean_cosine"] = float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))
    singular = torch.linalg.svdvals(image)
    p = singular / singular.sum().clamp_min(1e-12)
    p = p[p > 0]
    out["val_effective_rank"] = float(torch.exp(-(p * p.log()).sum()))
    paired = (image if paired_image is None else paired_image.double())
    similarity = paired @ text.double().t()
    rank = (similarity > similarity.diagonal()[:, None]).sum(dim=1)
    for k in (1, 5):
        if k < paired.shape[0]:
            out[f"val_recall_at_{k}"] = float((rank < k).double().mean())
    return out


def validation_verdict(metrics: dict, initial: Optional[dict], config: DaptConfig, *, step: int = -1) -> dict:
    """Health of one validation: ``collapsed``, ``at_chance`` and ``healthy`` (neither).

    ``collapsed``: the mean pairwise image cosine is at least ``config.collapse_cosine`` and, when
    the base model was measured (``initial``, the validation before any step), the spread
    ``1 - cosine`` is at most ``COLLAPSE_SPREAD_RATIO`` of the base model's (a base model whose
    montage embeddings were already that close is not called collapsed by training).
    ``at_chance``: the validation loss is not more than ``config.chance_margin`` (relative) below
    the loss's chance level ``val_chance``. The chance level and the values read travel along.
    """
    cosine = metrics.get("val_mean_cosine")
    base = initial.get("val_mean_cosine") if initial else None
    collapsed = bool(cosine is not None and cosine >= config.collapse_cosine
                     and (base is None or (1.0 - cosine) <= COLLAPSE_SPREAD_RATIO * (1.0 - base)))
    loss, chance = metrics.get("val_loss"), metrics.get("val_chance")
    ratio = loss / chance if (chance and loss is not None and math.isfinite(loss)) else None
    at_chance = ratio is None or ratio >= 1.0 - config.chance_margin
    out = {"step": int(step), "collapsed": collapsed, "at_chance": bool(at_chance),
           "healthy": not collapsed and not at_chance, "val_loss": loss, "val_chance": chance,
           "chance_margin": config.chance_margin, "val_mean_cosine": cosine, "base_mean_cosine": base,
           "collapse_cosine": config.collapse_cosine}
    if "val_auroc" in metrics:
        out["val_auroc"] = metrics["val_auroc"]
    return out


def validation_verdicts(history: Sequence, config: DaptConfig) -> list:
    """:func:`validation_verdict` of every validation after training started, in order."""
    history = list(history)
    initial = history[0][1] if history and history[0][0] == 0 else None
    return [validation_verdict(m, initial, config, step=s) for s, m in history if s > 0]


def checkpoint_verdict(history: Sequence, config: DaptConfig, step: int) -> dict:
    """What an exported checkpoint's metadata says about its health (``training.health``).

    The verdict of the validation at ``step`` (the checkpoint's own), else of the latest one before
    it, with ``validated`` saying which; ``run`` adds the whole run's verdict so far. The engine
    reads ``collapsed`` and ``at_chance`` (``ZeroShotILDLib.results.model_warning``).
    """
    verdicts = validation_verdicts(history, config)
    if not verdicts:
        return {}
    own = [v for v in verdicts if v["step"] == step]
    before = [v for v in verdicts if v["step"] <= step] if step >= 0 else verdicts
    chosen = own[-1] if own else (before[-1] if before else verdicts[-1])
    run = health_verdict(history, config)
    return {**chosen, "validated": bool(own), "validations": len(verdicts),
            "run": {"collapsed": run.get("collapsed"), "at_chance": run.get("at_chance"),
                    "healthy_steps": run.get("healthy_steps")}}


def health_verdict(history: Sequence, config: DaptConfig, *, warmup_steps: Optional[int] = None,
                   best_step: Optional[int] = None) -> dict:
    """Whether a run collapsed or stayed at chance, from its validations' health metrics.

    ``collapsed``: the last validation collapsed (:func:`validation_verdict`); ``collapsed_steps``
    every validation that did. ``at_chance``: no validation after training started scored a loss
    more than ``config.chance_margin`` (relative) below the chance level. ``verdicts``: every
    validation's verdict; ``healthy_steps`` the steps whose checkpoints may be chosen as best.
    ``warning`` is one line saying what went wrong and what to try, from what happened (the
    training loss against its chance level, the warm-up), or None.
    """
    history = list(history)
    if not history:
        return {}
    initial = history[0][1] if history[0][0] == 0 else None
    trained = [m for step, m in history if step > 0] or [history[-1][1]]
    verdicts = validation_verdicts(history, config) or [validation_verdict(trained[-1], None, config)]
    last = trained[-1]
    out: dict = {"validations": len(trained), "last": last, "initial": initial, "verdicts": verdicts,
                 "healthy_steps": [v["step"] for v in verdicts if v["healthy"]],
                 "collapsed_steps": [v["step"] for v in verdicts if v["collapsed"]]}
    cosine = last.get("val_mean_cosine")
    out["collapsed"] = bool(verdicts[-1]["collapsed"])
    ratios = [m["val_loss"] / m["val_chance"] for m in trained
              if m.get("val_chance") and math.isfinite(m.get("val_loss", float("nan")))]
    out["at_chance"] = bool(ratios) and min(ratios) >= 1.0 - config.chance_margin
    problems, advice = [], []
    if out["collapsed"] or out["collapsed_steps"]:
        before = f" (base model {initial['val_mean_cosine']:.3f})" if initial and "val_mean_cosine" in initial else ""
        if out["collapsed"]:
            problems.append(f"image embeddings collapsed: mean pairwise cosine {cosine:.3f}{before}, "
                            f"effective rank {last.get('val_effective_rank', float('nan')):.2f}")
        else:
            problems.append(f"image embeddings collapsed at step {out['collapsed_steps'][0]}{before}")
        advice.append("try a lower --lr (the updates destroyed the image features)")
    if out["at_chance"]:
        best = min(trained, key=lambda m: m.get("val_loss", float("inf")))
        problems.append(f"validation loss stayed at chance (best {best['val_loss']:.4f}, chance {best['val_chance']:.4f})")
        train_ratios = [m["train_loss_ratio"] for m in trained if "train_loss_ratio" in m]
        steps_done = max((s for s, _ in history), default=0)
        if warmup_steps is not None and steps_done < warmup_steps:
            advice.append(f"the run ended after {steps_done} steps, inside its {warmup_steps}-step warm-up: train longer")
        elif train_ratios and train_ratios[-1] < 1.0 - config.chance_margin:
            advice.append(f"the training loss fell to {train_ratios[-1]:.2f} of chance while validation did not: the "
                          "model memorises its training texts; add pairs or more distinct texts, or stop earlier")
        elif train_ratios:
            advice.append(f"the training loss stayed at chance too ({train_ratios[-1]:.2f} of it): train longer or "
                          "try a higher --lr; check that texts describe their images")
        else:
            advice.append("train longer, or check the texts")
    # Retrieval below chance (k / N) says the image and text towers pull apart, even with a loss below chance.
    pairs = last.get("val_pairs")
    below = [f"recall@{k} {last[f'val_recall_at_{k}']:.3f} < chance {k / pairs:.3f}" for k in (1, 5)
             if pairs and f"val_recall_at_{k}" in last and last[f"val_recall_at_{k}"] < k / pairs]
    out["notes"] = [f"image->text retrieval below chance at the last validation ({', '.join(below)})"] if below else []
    healthy_note = ""
    if problems and verdicts and not out["healthy_steps"]:
        healthy_note = "; no validation was healthy, so no checkpoint of this run is"
    elif problems and best_step is not None:
        healthy_note = f"; best is the healthy step {best_step}"
    out["advice"] = advice
    out["warning"] = ("run is not learning: " + "; ".join(problems) + healthy_note + ": " + "; ".join(advice)
                      if problems else None)
    return out
