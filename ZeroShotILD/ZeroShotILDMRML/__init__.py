"""Qt-free helpers of the ZeroShotILD Slicer module.

Everything here imports ``slicer`` and ``vtk`` (MRML; ``worker``/``worker_client`` not even those) but
never ``qt``/``ctk``, so the same code runs inside the Slicer application and under the
``slicer-core`` wheel in CI:

- ``catalog``: the model list (``Resources/models.json``) and the requirements file, read without torch;
- ``parameters``: the parameter node's string parameters <-> ``AnalysisSettings``;
- ``volumes``: a Slicer volume node -> the engine's ``Scan`` (geometry in LPS, voxels [z, y, x]);
- ``mrml_results``: an ``AnalysisResult`` -> segmentation, heatmap, patch ROIs, montage, tables, chart;
- ``session``: one analysed volume with the engine's ``Analyzer`` kept for re-prompting;
- ``worker`` / ``worker_client``: the analysis worker process (the engine runs there) and the
  non-blocking client the panel polls from its timer; the protocol is in ``worker``'s docstring;
- ``runner``: staged progress reports -> the progress bar's fraction and label;
- ``dependencies``: which Python packages are missing and the pip constraints that protect Slicer's own;
- ``figure``: headless rendering of a slice with the heatmap and patch outlines (docs, tests).
"""
