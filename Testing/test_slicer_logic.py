"""``ZeroShotILDLogic`` from ZeroShotILD.py, the module's console API, on a real slicer-core scene.

ZeroShotILD.py imports a few modules that only the Slicer application provides:
``slicer.ScriptedLoadableModule`` (base classes), ``slicer.parameterNodeWrapper`` (the typed
parameter node), ``slicer.i18n``, ``qt`` and ``ctk``. Here they are replaced by minimal stand-ins
for the duration of this file — the base classes do nothing, the wrapper keeps the raw
``vtkMRMLScriptedModuleNode`` — so that the logic's own code (``process``, ``reprompt``,
``startProcess``/``finishProcess`` through the analysis worker process, ``setupPythonRequirements``,
montage saving, parameter node mapping) runs for real against MRML nodes, the engine and the tiny
model. The widget's Apply path is hosted in test_slicer_event_loop.py; ``ZeroShotILDTest`` covers
the module inside Slicer.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types

import numpy as np
import pytest

from conftest import REPO

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package here is not slicer-core", allow_module_level=True)

if str(REPO / "ZeroShotILD") not in sys.path:
    sys.path.insert(0, str(REPO / "ZeroShotILD"))

from ZeroShotILDLib.errors import Cancelled, InputError  # noqa: E402
from ZeroShotILDLib.settings import AnalysisSettings  # noqa: E402
from ZeroShotILDMRML import dependencies, mrml_results, parameters  # noqa: E402
from ZeroShotILDMRML.headless import add_ct_volume, make_scene  # noqa: E402

APP_ONLY = ("qt", "ctk", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "slicer.i18n")


def _stand_ins() -> dict:
    class _Anything:
        """qt/ctk stand-in: the logic never touches Qt; the widget class only needs the names."""

        def __init__(self, *args, **kwargs):
            pass

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Anything()

        def __call__(self, *args, **kwargs):
            return _Anything()

    qt, ctk = types.ModuleType("qt"), types.ModuleType("ctk")
    def module_getattr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything

    qt.__getattr__ = ctk.__getattr__ = module_getattr

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[:-len("Logic")]

        def getParameterNode(self):
            # As the real base class: one singleton scripted-module node per module in the scene.
            scene = slicer.mrmlScene
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", self.moduleName)
                node.SetSingletonTag(self.moduleName)
                node.SetAttribute("ModuleName", self.moduleName)
            return node

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *a, **k: None}))
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                   "ScriptedLoadableModuleTest"]

    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    class _Annotation:
        def __init__(self, *args):
            self.args = args

    for name in ("Choice", "Decimals", "SingleStep", "WithinRange"):
        setattr(pnw, name, _Annotation)

    def parameterNodeWrapper(cls):
        # Like the real wrapper: holds the raw node as .parameterNode and writes absent defaults.
        def __init__(self, node):
            self.parameterNode = node
            parameters.ensure_defaults(node)

        cls.__init__ = __init__
        return cls

    pnw.parameterNodeWrapper = parameterNodeWrapper
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    return {"qt": qt, "ctk": ctk, "slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnw,
            "slicer.i18n": i18n}


@pytest.fixture(scope="module")
def module():
    """ZeroShotILD.py imported with the application-only modules stood in for, then put back."""
    saved = {name: sys.modules.get(name) for name in (*APP_ONLY, "ZeroShotILD")}
    sys.modules.update(_stand_ins())
    try:
        spec = importlib.util.spec_from_file_location("ZeroShotILD", REPO / "ZeroShotILD" / "ZeroShotILD.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ZeroShotILD"] = mod
        spec.loader.exec_module(mod)
        yield mod
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


@pytest.fixture(scope="module")
def scene_and_volume(small_phantom):
    headless = make_scene()
    volume = add_ct_volume(headless.scene, small_phantom.hu, small_phantom.spacing_mm, small_phantom.origin_mm,
                           small_phantom.direction, "Chest CT")
    return headless, volume


TINY = dict(model="tiny-random", device="cpu", patch_mm=30.0, slice_step_mm=20.0, top_k=4, scoring_mode="exact")


def test_process_reprompt_and_rerun_from_the_console(module, scene_and_volume, tmp_path):
    headless, volume = scene_and_volume
    logic = module.ZeroShotILDLogic()
    with pytest.raises(InputError, match="nothing analysed"):
        logic.reprompt(["emphysema"])
    with pytest.raises(InputError, match="no input volume"):
        logic.process(None, **TINY)

    nodes = logic.process(volume, prompts=["honeycombing"], **TINY)
    result = logic.session.result
    assert nodes.lungs.GetName() == "Lungs" and len(nodes.patch_rois) == 4
    assert mrml_results.find_result_nodes(volume).heatmap is nodes.heatmap
    assert logic.hasSessionFor(volume) and logic.primaryPrompt() == "honeycombing"
    summary = logic.summary()
    assert f"{len(result.patches)} candidate patches" in summary and "meaningless" in summary
    assert f"P(honeycombing) = {result.finding_probabilities['honeycombing']:.3f}" in summary
    # The parameter node is the default when no settings are given; keyword overrides still apply.
    assert logic.settingsFromParameterNode() == AnalysisSettings().validate()

    encoded = logic.session.analyzer.encoder.images_encoded
    nodes = logic.reprompt("reticulation")
    assert logic.session.analyzer.encoder.images_encoded == encoded + 1
    assert "reticulation" in nodes.heatmap.GetName() and logic.primaryPrompt() == "reticulation"

    # A second Apply with the same model on the same voxels: model and embeddings are reused.
    model = logic.session.analyzer.model
    nodes2 = logic.process(volume, prompts=["emphysema"], **TINY)
    assert logic.session.analyzer.model is model
    assert logic.session.analyzer.encoder.images_encoded == 1  # the montage only
    assert nodes2.heatmap is nodes.heatmap and nodes2.lungs is nodes.lungs

    png = logic.saveMontage(str(tmp_path / "montage.png"))
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(png)), logic.session.result.montage)
    logic.jumpToPatchInTableRow(0)  # no slice views here: must not fail

    # Only re-prompt fields changed -> re-prompt; patch geometry changed -> analyse again.
    settings = logic.session.settings
    assert logic.canReprompt(volume, dataclasses.replace(settings, top_k=2))
    assert not logic.canReprompt(volume, dataclasses.replace(settings, patch_mm=20.0))
    nodes = logic.repromptTo(dataclasses.replace(settings, top_k=2))
    assert len(nodes.patch_rois) == 2


def test_worker_run_reprompt_and_cancel_through_the_logic(module, scene_and_volume):
    """The panel's path: the worker process analyses, the logic applies; cancel changes nothing."""
    headless, volume = scene_and_volume
    scene = headless.scene
    logic = module.ZeroShotILDLogic()
    try:
        count = scene.GetNumberOfNodes()
        job = logic.startProcess(volume, prompts=["consolidation"], **{**TINY, "batch_size": 4})
        job.cancel()
        assert job.wait(timeout=300)
        with pytest.raises(Cancelled):
            logic.finishProcess(job)
        assert scene.GetNumberOfNodes() == count and logic.session is None

        job = logic.startProcess(volume, prompts=["consolidation"], **TINY)
        assert job.wait(timeout=300)
        nodes = logic.finishProcess(job)
        assert "consolidation" in nodes.heatmap.GetName() and logic.session.result.primary_prompt == "consolidation"
        assert [e[0] for e in job.poll()][-1] == "done"
        # The same engine and settings as in this process: identical result.
        here = module.ZeroShotILDLogic()
        here.process(volume, prompts=["consolidation"], **TINY)
        expected = here.session.result
        np.testing.assert_array_equal(logic.session.result.ranked, expected.ranked)
        np.testing.assert_array_equal(logic.session.result.lung_mask, expected.lung_mask)
        assert logic.session.result.finding_probabilities == expected.finding_probabilities
        assert logic.session.scan is None  # no copy of the voxels kept in the Slicer process

        # Re-prompt from the console goes to the worker (which keeps the embeddings).
        assert logic.hasSessionFor(volume)
        nodes = logic.reprompt("emphysema")
        assert "emphysema" in nodes.heatmap.GetName() and logic.session.settings.prompts == ["emphysema"]
        assert logic.canReprompt(volume, dataclasses.replace(logic.session.settings, top_k=2))
        assert len(logic.repromptTo(dataclasses.replace(logic.session.settings, top_k=2)).patch_rois) == 2

        # A stopped worker holds nothing: no re-prompt, and the next Apply starts a fresh one.
        logic.shutdownWorker()
        assert not logic.hasSessionFor(volume)
        with pytest.raises(InputError, match="press Apply"):
            logic.startReprompt(logic.session.settings)
        job = logic.startProcess(volume, prompts=["honeycombing"], **TINY)
        assert job.wait(timeout=300)
        assert "honeycombing" in logic.finishProcess(job).heatmap.GetName()
    finally:
        logic.shutdownWorker()
    assert not logic.workerClient().alive


def test_settings_round_trip_through_the_logic_parameter_node(module, scene_and_volume):
    logic = module.ZeroShotILDLogic()
    settings = AnalysisSettings(model="dapt:/ckpt/model.safetensors", prompts=["ground-glass opacity", "emphysema"],
                                negatives=["normal lung"], subtypes=["sarcoidosis"], montage_size=16, top_k=9,
                                patch_mm=22.5).validate()
    logic.settingsToParameterNode(settings)
    node = logic.getParameterNode().parameterNode
    assert node.GetParameter("model") == module.catalog.CUSTOM_MODEL
    assert node.GetParameter("checkpointPath") == "/ckpt/model.safetensors"
    assert logic.settingsFromParameterNode() == settings
    node.SetParameter("prompts", "  ")
    with pytest.raises(InputError, match="empty prompt"):
        logic.settingsFromParameterNode()
    logic.settingsToParameterNode(AnalysisSettings())


class _Recorder:
    def __init__(self, confirm: bool):
        self.confirm, self.asked, self.pip = confirm, [], []

    def confirmOkCancelDisplay(self, text, title=None, **kwargs):
        self.asked.append((title, kwargs.get("detailedText", "")))
        return self.confirm

    def pip_install(self, args):
        self.pip.append(list(args))


def _patch_slicer_util(monkeypatch, recorder, tmp_path):
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", recorder.confirmOkCancelDisplay, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", recorder.pip_install, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)


def test_dependencies_are_asked_for_and_installed_under_constraints(module, monkeypatch, tmp_path):
    logic = module.ZeroShotILDLogic()
    # Everything present (this environment): nothing is asked, nothing installed.
    recorder = _Recorder(confirm=True)
    _patch_slicer_util(monkeypatch, recorder, tmp_path)
    assert logic.setupPythonRequirements(askConfirmation=True)
    assert recorder.asked == [] and recorder.pip == []

    # open_clip missing: the user is asked; declining installs nothing.
    missing = ["open_clip_torch>=3.0"]
    monkeypatch.setattr(dependencies, "missing_requirements", lambda reqs, *a, **k: list(missing))
    recorder = _Recorder(confirm=False)
    _patch_slicer_util(monkeypatch, recorder, tmp_path)
    assert not logic.setupPythonRequirements(askConfirmation=True)
    assert len(recorder.asked) == 1 and "open_clip_torch>=3.0" in recorder.asked[0][1] and recorder.pip == []

    # Accepting installs with a constraints file pinning Slicer's own numpy (and torch, SimpleITK).
    recorder = _Recorder(confirm=True)
    _patch_slicer_util(monkeypatch, recorder, tmp_path)

    def install(args):
        recorder.pip_install(args)
        missing.clear()  # pip succeeded

    monkeypatch.setattr(slicer.util, "pip_install", install)
    assert logic.setupPythonRequirements(askConfirmation=True)
    (args,) = recorder.pip
    assert args[0] == "open_clip_torch>=3.0" and args[1] == "-c"
    constraints = open(args[2], encoding="utf-8").read()
    assert f"numpy=={dependencies.installed_version('numpy')}" in constraints
    assert f"torch=={dependencies.installed_version('torch')}" in constraints

    # pip "succeeding" without installing is reported, not ignored.
    missing[:] = ["open_clip_torch>=3.0"]
    monkeypatch.setattr(slicer.util, "pip_install", recorder.pip_install)
    with pytest.raises(InputError, match="did not install"):
        logic.setupPythonRequirements(askConfirmation=False)


def test_apply_offers_the_default_models_weights_when_they_are_missing(module, tmp_path):
    """The first Apply with the defaults: the model is openly licensed, so the panel offers its download."""
    logic = module.ZeroShotILDLogic()
    defaults = AnalysisSettings(weights_dir=str(tmp_path))
    assert defaults.model == "clip-vit-b-32-laion"
    assert logic.missingDownloadableModel(defaults) == "clip-vit-b-32-laion"
    question = logic.downloadQuestion("clip-vit-b-32-laion", defaults)
    assert "MIT" in question and str(tmp_path / "clip-vit-b-32-laion") in question
    # Weights in place, a user checkpoint, a model with nothing to download, CheXzero: nothing offered.
    (tmp_path / "clip-vit-b-32-laion").mkdir()
    (tmp_path / "clip-vit-b-32-laion" / "open_clip_model.safetensors").write_bytes(b"x")
    assert logic.missingDownloadableModel(defaults) == ""
    for settings in (dataclasses.replace(defaults, model="openai-vit-b-32", checkpoint=str(tmp_path / "mine.pt")),
                     dataclasses.replace(defaults, model="tiny-random"),
                     dataclasses.replace(defaults, model="chexzero")):
        assert logic.missingDownloadableModel(settings) == ""
