"""What the module panel shows, through ``ZeroShotILDLogic`` on a real slicer-core scene.

The widget itself needs Qt; what it displays comes from the logic (status line, details box,
model warning, layout, heatmap colour range, dependency checks), which runs here with the
application-only modules stood in for exactly as in ``test_slicer_logic.py``.
"""
from __future__ import annotations

import sys
import types

import pytest

from conftest import REPO

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package here is not slicer-core", allow_module_level=True)

if str(REPO / "ZeroShotILD") not in sys.path:
    sys.path.insert(0, str(REPO / "ZeroShotILD"))

from ZeroShotILDLib.errors import InputError  # noqa: E402
from ZeroShotILDMRML import dependencies, mrml_results  # noqa: E402
from ZeroShotILDMRML.headless import add_ct_volume, make_scene  # noqa: E402
from test_slicer_logic import TINY, module  # noqa: E402,F401  (module: the shared ZeroShotILD.py fixture)


def test_status_line_is_user_facing_and_notes_go_to_details(module, small_phantom):
    headless = make_scene()
    volume = add_ct_volume(headless.scene, small_phantom.hu, small_phantom.spacing_mm, small_phantom.origin_mm,
                           small_phantom.direction, "chest_crop_b")
    layout = headless.scene.AddNewNodeByClass("vtkMRMLLayoutNode")
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
    logic = module.ZeroShotILDLogic()
    assert logic.summary() == "" and logic.details() == "" and logic.modelWarning() == ""
    logic.process(volume, prompts=["honeycombing"], **TINY)
    # The first result switches to the table + plot layout; the user then picks another one.
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)

    # A second Apply on the same voxels reuses the cached embeddings: an engineering note.
    logic.process(volume, prompts=["emphysema"], **TINY)
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView
    notes = logic.session.result.notes
    assert "patch embeddings reused from the cache" in notes
    summary, details = logic.summary(), logic.details()
    assert summary.splitlines()[0] == f"Warning: {logic.modelWarning()}."
    assert "random weights" in logic.modelWarning()
    assert "P(emphysema) = " in summary and "candidate patches" in summary
    assert "cache" not in summary and "fast mode" not in summary
    assert "patch embeddings reused from the cache" in details.splitlines()
    assert logic.modelWarning() not in details  # shown once, in the status line and the warning label

    # The panel's colour range choice reaches the heatmap and its legend.
    heatmap = logic.resultNodes().heatmap
    logic.setHeatmapRange(mrml_results.FIXED_RANGE)
    assert heatmap.GetDisplayNode().GetWindowLevelMax() == 1.0
    assert mrml_results._legend_node(heatmap).GetTitleText() == "P(emphysema), range 0-1"
    # ... and a re-prompt keeps it.
    nodes = logic.reprompt(["reticulation"])
    assert nodes.heatmap is heatmap and mrml_results._legend_node(heatmap).GetTitleText() == "P(reticulation), range 0-1"
    logic.setHeatmapRange(mrml_results.RELATIVE_RANGE)
    assert heatmap.GetDisplayNode().GetWindowLevelMax() < 1.0


def _fake_versions(monkeypatch, versions: dict):
    real = dependencies.importlib.metadata.version

    def version(name):
        if name in versions:
            return versions[name]
        return real(name)

    monkeypatch.setattr(dependencies.importlib.metadata, "version", version)


def test_old_torch_stops_before_anything_is_asked_or_installed(module, monkeypatch, tmp_path):
    asked, pip = [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: asked.append(a) or True, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: pip.append(args), raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)
    _fake_versions(monkeypatch, {"torch": "1.13.1"})
    monkeypatch.setattr(dependencies, "missing_requirements", lambda reqs, *a, **k: ["open_clip_torch>=3.0"])
    logic = module.ZeroShotILDLogic()
    with pytest.raises(InputError, match="PyTorch 1.13.1 is older"):
        logic.setupPythonRequirements(askConfirmation=True)
    assert asked == [] and pip == []


def test_pip_runs_with_every_installed_package_pinned_but_the_one_it_installs(module, monkeypatch, tmp_path):
    pip = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: True, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)
    missing = ["open_clip_torch>=3.0"]
    monkeypatch.setattr(dependencies, "missing_requirements", lambda reqs, *a, **k: list(missing))

    def install(args):
        pip.append(list(args))
        missing.clear()

    monkeypatch.setattr(slicer.util, "pip_install", install, raising=False)
    assert module.ZeroShotILDLogic().setupPythonRequirements(askConfirmation=False)
    (args,) = pip
    constraints = open(args[args.index("-c") + 1], encoding="utf-8").read()
    for name in ("numpy", "scipy", "SimpleITK", "vtk", "torch", "Pillow"):
        version = dependencies.installed_version(name)
        assert version is not None and f"=={version}\n" in constraints, name
    # open_clip_torch is installed here too, but it is what pip was asked to upgrade: not pinned.
    assert dependencies.installed_version("open_clip_torch") is not None
    assert "open_clip_torch==" not in constraints.replace("open-clip-torch", "open_clip_torch")


def test_an_ensemble_chosen_in_the_panel_runs_and_survives_the_parameter_node(module, small_phantom, tmp_path):
    import json

    import torch

    from ZeroShotILDLib import models

    entries = []
    for i in range(2):
        member = models.load_model("tiny-random", device="cpu")
        generator = torch.Generator().manual_seed(7 + i)
        with torch.no_grad():
            for p in member.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        path = models.save_checkpoint(tmp_path / f"step{i}.safetensors", member.model, member.spec)
        entries.append({"path": path.name, "val_loss": 1.0 + i, "step": 10 * (i + 1)})
    ensemble = tmp_path / "ensemble.json"
    ensemble.write_text(json.dumps({"format": "zeroshot-ild-ensemble/1", "checkpoints": entries}), encoding="utf-8")

    headless = make_scene()
    volume = add_ct_volume(headless.scene, small_phantom.hu, small_phantom.spacing_mm, small_phantom.origin_mm,
                           small_phantom.direction, "Phantom CT")
    logic = module.ZeroShotILDLogic()
    # What the panel stores when the user picks "ensemble of checkpoints…" and the ensemble.json.
    node = logic.getParameterNode().parameterNode
    node.SetParameter("model", module.catalog.ENSEMBLE_MODEL)
    node.SetParameter("checkpointPath", str(ensemble))
    assert module.catalog.ENSEMBLE_MODEL in module.MODEL_CHOICES
    settings = logic.settingsFromParameterNode()
    assert settings.model == f"ensemble:{ensemble}"
    tiny = {k: v for k, v in TINY.items() if k != "model"}
    logic.process(volume, settings, prompts=["honeycombing"], **tiny)
    result = logic.session.result
    assert result.model_name == f"ensemble:{ensemble}"
    assert any("ensemble of 2" in n for n in result.notes)
    # Written back (e.g. after a re-prompt) it is still the ensemble, not "dapt:ensemble:...".
    logic.settingsToParameterNode(logic.session.settings)
    assert node.GetParameter("model") == module.catalog.ENSEMBLE_MODEL
    assert logic.settingsFromParameterNode().model == f"ensemble:{ensemble}"


def test_input_selector_lists_only_ct_volumes(module, small_phantom, tmp_path, monkeypatch):
    """The module's heatmap and montage are scalar volumes too: hidden from the input selector, refused as input."""
    import os

    if os.name != "posix":
        pytest.skip("the hosted widget holds the GIL with libc usleep (POSIX)")
    from test_slicer_event_loop import Host

    headless = make_scene()
    volume = add_ct_volume(headless.scene, small_phantom.hu, small_phantom.spacing_mm, small_phantom.origin_mm,
                           small_phantom.direction, "Chest CT")
    other = add_ct_volume(headless.scene, small_phantom.hu, small_phantom.spacing_mm, small_phantom.origin_mm,
                          small_phantom.direction, "Second CT")
    host = Host(module, headless, volume, tmp_path, monkeypatch)
    proxy = types.SimpleNamespace(hiddenNodeIDs=[])  # qMRMLSortFilterProxyModel's property
    host.widget.ui.inputVolumeSelector = types.SimpleNamespace(sortFilterProxyModel=lambda: proxy)
    try:
        host.set(patch_mm=30.0, slice_step_mm=10.0, top_k=4)
        host.press_apply()
        host.run(timeout_s=300.0)
        nodes = host.logic.resultNodes()
        assert nodes is not None and not host.errors, host.status
        assert sorted(proxy.hiddenNodeIDs) == sorted([nodes.heatmap.GetID(), nodes.montage.GetID()])
        assert volume.GetID() not in proxy.hiddenNodeIDs and other.GetID() not in proxy.hiddenNodeIDs
        # Chosen anyway (console, an old parameter node): one line, before anything is sent to the worker.
        with pytest.raises(InputError, match="ZeroShotILD's heatmap output, not a CT") as error:
            host.logic.startProcess(nodes.heatmap, prompts=["honeycombing"], **TINY)
        assert "\n" not in str(error.value)
    finally:
        host.widget.cleanup()
