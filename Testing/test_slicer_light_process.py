"""Slicer's own process stays light (issue 23): the module's path never imports torch, open_clip or Lightning.

Applying the first result used to import torch into Slicer's process (``mrml_results.heatmap_array``
-> ``ZeroShotILDLib.patches``), freezing the application for 6-7 s and holding ~1 GB; the engine
belongs in the worker process. A fresh interpreter runs the panel's whole path as Slicer hosts it
(``slicer_host.check_light``: load the module, Apply with the worker doing the analysis, apply the
result, re-prompt, heatmap range and opacity, jump to a patch, save the report and the montage)
and reports which heavy packages its ``sys.modules`` holds after each step. A fresh process is
needed because pytest's own process has imported torch long before.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package here is not slicer-core", allow_module_level=True)


def test_the_module_path_imports_no_torch_open_clip_or_lightning_in_slicers_process():
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, str(REPO / "Testing" / "slicer_host.py"), "--check-light"],
                          capture_output=True, text=True, timeout=600, cwd=str(REPO), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # The path really ran: the worker analysed, the re-prompt reached the scene, the outputs were written.
    assert out["apply"] == {"prompt": "honeycombing", "errors": []}
    assert out["reprompt"]["prompt"] == "emphysema" and not out["reprompt"]["errors"]
    assert "emphysema" in out["reprompt"]["heatmap"]
    assert out["patterns"] and out["outputs"] == [True, True] and out["worker_stopped"]
    for step in ("after_load", "after_apply", "after_reprompt", "after_report"):
        assert out[step] == [], f"{step}: {out[step]} imported into Slicer's process"


def test_torch_free_helpers_are_shared_with_the_engine():
    from ZeroShotILDLib import geometry, patches

    # Moved out of patches (torch) and re-exported: one function, so engine and Slicer agree.
    assert patches.slice_step_voxels is geometry.slice_step_voxels
    assert geometry.slice_step_voxels((0.7, 0.7, 1.25), 6.0) == 5
    assert geometry.slice_step_voxels((0.7, 0.7, 5.0), 1.0) == 1
