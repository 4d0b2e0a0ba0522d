"""Training and evaluation for ZeroShotILD: data in, DAPT, metrics and the papers' reports.

Modules (each one job, CLI-free; the ``zeroshot-ild-train`` command is a thin adapter):

- ``manifest``: read/validate a manifest (CSV or JSONL) and split it by patient.
- ``reports``: report sections, text choice, sentence splitting and sampling, weak labels.
- ``metrics``: AUROC, AUPRC, F1 at a validation-chosen threshold, MCC, bootstrap CIs, ensembles.
- ``plots``: ROC/PR curve PNGs and CSV/Markdown tables of grid results.
- ``reader_study``: numbered montage sheets for readers, their counts, ICC.
- ``linear_probe``: K-shot linear probing and the base/new report (paper 002).
- ``alignment``: image-text alignment (paper 001).
- ``losses``, ``dapt``, ``data``, ``checkpoint``, ``distributed``: domain-adaptive pretraining.

Submodules are not imported here so that ``import training`` stays cheap and does not need
the optional training dependencies.
"""
