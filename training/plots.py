"""ROC / PR curve figures and the tables of grid results (paper 000 Tables 2, 3, 5, 7, 8).

Figures are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas directly, so nothing
here touches pyplot's global state or needs a display.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ZeroShotILDLib import csv_files

from . import metrics as M

#: Column titles of paper 000's tables for the usual grid factors.
FACTOR_TITLES = {
    "retrieval": "Patch Montage Method",
    "model": "Classification Model",
    "montage_size": "Montage Size",
    "filter_threshold": "Filter Threshold",
    "dapt_model": "Classification Model (DAPT-CLIP)",
    "test_retrieval": "Patch Montage Method",
    "subtype": "ILD Subtype",
    "group": "ILD",
    "method": "Patch Montage Method",
}
METRIC_TITLES = {"auroc": "AUROC", "auprc": "AUPRC", "f1": "F1", "mcc": "MCC",
                 "percent_ild": "% of Patch Montage with ILD (Average)", "icc3_1": "ICC(3,1) Score"}


# ---------------------------------------------------------------------------------------------
# Training curves

def training_curves_figure(rows: Sequence[Mapping], *, title: Optional[str] = None):
    """Loss (train, validation and their chance levels), validation AUROC and learning rate against
    the optimizer step, from the rows of a run's ``logs/metrics.csv``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(name: str) -> tuple:
        points = [(float(r["step"]), float(r[name])) for r in rows
                  if r.get(name) not in (None, "") and r.get("step") not in (None, "")]
        points = [(x, y) for x, y in points if math.isfinite(y)]
        return tuple(zip(*points)) if points else ((), ())

    fig = Figure(figsize=(7.0, 7.0), dpi=130)
    FigureCanvasAgg(fig)
    loss_ax, auc_ax, lr_ax = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 1]})
    for name, style in (("train_loss", dict(lw=0.8, alpha=0.6)), ("train_chance", dict(ls=":", lw=0.8)),
                        ("val_loss", dict(marker="o", lw=1.5)), ("val_chance", dict(ls="--", lw=1.0))):
        x, y = series(name)
        if x:
            loss_ax.plot(x, y, label=name.replace("_", " "), **style)
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=7)
    loss_ax.grid(True, alpha=0.3)
    for name in ("val_auroc", "val_recall_at_5", "val_mean_cosine"):
        x, y = series(name)
        if x:
            auc_ax.plot(x, y, marker="o", lw=1.2, label=name.replace("_", " "))
    auc_ax.axhline(0.5, ls="--", lw=0.8, color="grey")
    auc_ax.set_ylim(0, 1.02)
    auc_ax.legend(fontsize=7)
    auc_ax.grid(True, alpha=0.3)
    x, y = series("lr")
    if x:
        lr_ax.plot(x, y, lw=1.2)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(True, alpha=0.3)
    if title:
        loss_ax.set_title(title)
    return fig


def plot_training_curves(metrics_csv: Union[str, Path], path: Union[str, Path], *, title: Optional[str] = None) -> Path:
    """Write :func:`training_curves_figure` of ``metrics_csv`` as a PNG."""
    import csv

    with open(metrics_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return _save(training_curves_figure(rows, title=title), path)


# ---------------------------------------------------------------------------------------------
# Curves

def _figure(title: Optional[str]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 5.0), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if title:
        ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    return fig, ax


def roc_figure(curves: Mapping[str, tuple], *, title: Optional[str] = None):
    """ROC curves of several models in one figure; the legend gives each AUROC."""
    fig, ax = _figure(title)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="chance (AUC = 0.500)")
    for name, (y, s) in curves.items():
        fpr, tpr, _ = M.roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC = {M.roc_auc(y, s):.3f})")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.legend(loc="lower right", fontsize=7)
    return fig


def pr_figure(curves: Mapping[str, tuple], *, title: Optional[str] = None):
    """Precision-recall curves in one figure; the legend gives each AUPRC (average precision)."""
    fig, ax = _figure(title)
    prevalences = set()
    for name, (y, s) in curves.items():
        precision, recall, _ = M.pr_curve(y, s)
        ax.step(recall, precision, where="post", lw=1.5,
                label=f"{name} (AP = {M.average_precision(y, s):.3f})")
        prevalences.add(round(float(np.mean(np.asarray(y))), 6))
    if len(prevalences) == 1:
        p = prevalences.pop()
        ax.axhline(p, ls="--", lw=0.8, color="grey", label=f"chance (AP = {p:.3f})")
    ax.set_xlabel("Recall (sensitivity)")
    ax.set_ylabel("Precision (positive predictive value)")
    ax.legend(loc="lower left", fontsize=7)
    return fig


def _save(fig, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_roc_curves(curves: Mapping[str, tuple], path: Union[str, Path], *,
                    title: Optional[str] = None) -> Path:
    """Write ``roc_figure`` as a PNG. ``curves``: name -> ``(y_true, y_score)``."""
    return _save(roc_figure(curves, title=title), path)


def plot_pr_curves(curves: Mapping[str, tuple], path: Union[str, Path], *,
                   title: Optional[str] = None) -> Path:
    """Write ``pr_figure`` as a PNG. ``curves``: name -> ``(y_true, y_score)``."""
    return _save(pr_figure(curves, title=title), path)


# ---------------------------------------------------------------------------------------------
# Tables

def grid_row(factors: Mapping[str, object], report: "M.BinaryReport") -> dict:
    """One table row: the grid factors followed by a ``BinaryReport``'s estimates."""
    row = dict(factors)
    row.update(auroc=report.auroc, auprc=report.auprc, f1=report.f1, mcc=report.mcc,
               threshold=report.threshold, n=report.n, n_positive=report.n_positive,
               degenerate=getattr(report, "degenerate", ""))
    return row


def _value(cell):
    """(value, low, high) of a table cell: an Estimate, a number, or missing."""
    if isinstance(cell, M.Estimate):
        return cell.value, cell.ci_low, cell.ci_high
    if cell is None or cell == "":
        return float("nan"), float("nan"), float("nan")
    return float(cell), float("nan"), float("nan")


def _default_format(factor: str, value) -> str:
    if factor == "montage_size" and isinstance(value, (int, np.integer)):
        return f"{value} × {value}"
    return str(value)


def write_grid_csv(rows: Sequence[Mapping], path: Union[str, Path], *,
                   factors: Sequence[str], metrics: Sequence[str] = ("auroc", "auprc", "f1")
                   ) -> Path:
    """Grid results as CSV: factor columns, then ``<metric>, <metric>_low, <metric>_high``,
    then any other keys of the rows (threshold, n, ...)."""
    other = [k for k in dict.fromkeys(k for r in rows for k in r)
             if k not in factors and k not in metrics
             and not any(k == f"{m}_low" or k == f"{m}_high" for m in metrics)]
    header = list(factors) + [c for m in metrics for c in (m, f"{m}_low", f"{m}_high")] + other
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv_files.writer(f)
        w.writerow(header)
        for r in rows:
            line = [r.get(k, "") for k in factors]
            for m in metrics:
                v, lo, hi = _value(r.get(m))
                lo = r.get(f"{m}_low", lo)
                hi = r.get(f"{m}_high", hi)
                line += ["" if _nan(x) else repr(float(x)) for x in (v, lo, hi)]
            line += [_plain(r.get(k, "")) for k in other]
            w.writerow(line)
    return path


def _nan(x) -> bool:
    try:
        return x is None or x == "" or math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def _plain(v):
    if isinstance(v, M.Estimate):
        return repr(v.value)
    if isinstance(v, float):
        return repr(v)
    return v


def grid_markdown(rows: Sequence[Mapping], *, factors: Sequence[str],
                  metrics: Sequence[str] = ("auroc", "auprc", "f1"), digits: int = 3,
                  titles: Optional[Mapping[str, str]] = None,
                  formats: Optional[Mapping[str, Callable]] = None,
                  bold_best: bool = True, caption: Optional[str] = None) -> str:
    """Grid results as a Markdown table laid out like paper 000's.

    A factor value equal to the one in the row above is left blank (rows are grouped by the
    leading factors, as in the paper); metric cells read ``0.771 (0.702–0.835)`` when an
    interval is known; the best value of each metric column is bold. F1 and MCC of a row whose
    threshold gives every scan the same call (``degenerate``) carry a dagger and a note below.
    """
    titles = {**FACTOR_TITLES, **METRIC_TITLES, **(titles or {})}
    formats = dict(formats or {})
    best = {}
    for m in metrics:  # a degenerate row's F1/MCC is never "best"
        values = [_value(r.get(m))[0] for r in rows if not (m in ("f1", "mcc") and r.get("degenerate"))]
        finite = [v for v in values if not math.isnan(v)]
        best[m] = max(finite) if finite else None
    lines = []
    if caption:
        lines += [caption, ""]
    head = [titles.get(f, f.replace("_", " ").title()) for f in factors]
    head += [titles.get(m, m.upper()) for m in metrics]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join([" --- "] * len(factors) + [" ---: "] * len(metrics)) + "|")
    previous: list = [None] * len(factors)
    for r in rows:
        cells = []
        same_so_far = True
        for i, f in enumerate(factors):
            v = r.get(f, "")
            same_so_far = same_so_far and v == previous[i]
            text = formats[f](v) if f in formats else _default_format(f, v)
            cells.append("" if same_so_far else text)
            previous[i] = v
        for m in metrics:
            v, lo, hi = _value(r.get(m))
            lo = r.get(f"{m}_low", lo)
            hi = r.get(f"{m}_high", hi)
            if math.isnan(v):
                cells.append("–")
                continue
            text = f"{v:.{digits}f}"
            if bold_best and best[m] is not None and v == best[m]:
                text = f"**{text}**"
            if not (_nan(lo) or _nan(hi)):
                text += f" ({float(lo):.{digits}f}–{float(hi):.{digits}f})"
            if m in ("f1", "mcc") and r.get("degenerate"):
                text += " †"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    flags = sorted({str(r["degenerate"]) for r in rows if r.get("degenerate")})
    if flags:
        lines += ["", f"† Degenerate classifier: {'; '.join(flags)}, so "
                      "F1 only restates the share of positives and MCC is 0; read AUROC/AUPRC."]
    return "\n".join(lines) + "\n"


def write_grid_tables(rows: Sequence[Mapping], path_stem: Union[str, Path], *,
                      factors: Sequence[str], metrics: Sequence[str] = ("auroc", "auprc", "f1"),
                      caption: Optional[str] = None, **markdown_kwargs) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` and ``<stem>.md`` for the same grid results."""
    stem = Path(path_stem)
    csv_path = write_grid_csv(rows, stem.with_suffix(".csv"), factors=factors, metrics=metrics)
    md_path = stem.with_suffix(".md")
    md_path.write_text(grid_markdown(rows, factors=factors, metrics=metrics, caption=caption,
                                     **markdown_kwargs), encoding="utf-8")
    return csv_path, md_path
