"""ROC/PR figures and grid tables."""
import csv

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from zeroshot_ild_train import metrics as M
from zeroshot_ild_train import plots


def _curves():
    rng = np.random.default_rng(0)
    y = (rng.random(120) < 0.4).astype(int)
    return y, {"CheXzero": (y, rng.normal(size=120) + 1.5 * y),
               "random": (y, rng.normal(size=120))}


def test_roc_and_pr_figures_have_one_curve_per_model_with_auc(tmp_path):
    y, curves = _curves()
    fig = plots.roc_figure(curves, title="ILD")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    auc = M.roc_auc(*curves["CheXzero"])
    assert labels[0].startswith("chance")
    assert labels[1] == f"CheXzero (AUC = {auc:.3f})" and labels[2].startswith("random (AUC = ")
    fig = plots.pr_figure(curves)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == f"CheXzero (AP = {M.average_precision(*curves['CheXzero']):.3f})"
    assert labels[-1] == f"chance (AP = {y.mean():.3f})"
    for fn, name in ((plots.plot_roc_curves, "roc.png"), (plots.plot_pr_curves, "sub/pr.png")):
        p = fn(curves, tmp_path / name)
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def _grid_rows():
    rng = np.random.default_rng(1)
    rows = []
    for method in ("Random", "CLIP"):
        for model in ("CheXzero (ViT-B/32)", "BioMed-CLIP (ViT-B/16)"):
            for size in (4, 8):
                y = (rng.random(80) < 0.5).astype(int)
                s = rng.normal(size=80) + (0.2 * size / 4) * y
                rep = M.evaluate_binary(y, s, n_resamples=50, seed=2)
                rows.append(plots.grid_row({"retrieval": method, "model": model,
                                            "montage_size": size}, rep))
    return rows


def test_grid_tables_csv_and_markdown(tmp_path):
    rows = _grid_rows()
    csv_path, md_path = plots.write_grid_tables(
        rows, tmp_path / "table2", factors=("retrieval", "model", "montage_size"),
        caption="Table 2. Validation set, filter threshold 0.5.")
    with csv_path.open() as f:
        got = list(csv.DictReader(f))
    assert list(got[0])[:6] == ["retrieval", "model", "montage_size", "auroc", "auroc_low", "auroc_high"]
    assert "threshold" in got[0] and "n_positive" in got[0]
    assert len(got) == 8
    assert float(got[3]["f1_high"]) == rows[3]["f1"].ci_high
    md = md_path.read_text(encoding="utf-8").splitlines()
    assert md[0].startswith("Table 2.")
    assert md[2] == "| Patch Montage Method | Classification Model | Montage Size | AUROC | AUPRC | F1 |"
    body = [line for line in md[4:] if line.startswith("|")]  # (a degenerate-classifier note may follow)
    assert len(body) == 8
    first, second = body[0].split(" | "), body[1].split(" | ")
    assert first[0] == "| Random" and first[2] == "4 × 4"
    assert second[0] == "| " and second[1] == "" and second[2] == "8 × 8"  # grouped rows
    best = max(r["auroc"].value for r in rows)
    assert sum(f"**{best:.3f}**" in line for line in body) == 1
    e = rows[0]["auroc"]
    assert f"{e.value:.3f}" in body[0] and f"({e.ci_low:.3f}–{e.ci_high:.3f})" in body[0]


def test_markdown_accepts_plain_numbers_and_missing_values():
    rows = [{"group": "Positive", "method": "DAPT-CLIP", "percent_ild": 63.2, "icc3_1": 0.794},
            {"group": "Positive", "method": "Random", "percent_ild": 37.1, "icc3_1": float("nan")}]
    md = plots.grid_markdown(rows, factors=("group", "method"), metrics=("percent_ild", "icc3_1"),
                             digits=1, bold_best=False)
    lines = md.splitlines()
    assert lines[0] == "| ILD | Patch Montage Method | % of Patch Montage with ILD (Average) | ICC(3,1) Score |"
    assert lines[2] == "| Positive | DAPT-CLIP | 63.2 | 0.8 |"
    assert lines[3] == "|  | Random | 37.1 | – |"
