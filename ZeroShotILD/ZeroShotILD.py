import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
# Only validators go into the parameter node's annotations: the wrapper of Slicer 5.6/5.8 logs
# "Unused annotations" for anything else (Decimals, SingleStep), so decimals and steps are set in the .ui.
from slicer.parameterNodeWrapper import (
    Choice,
    WithinRange,
    parameterNodeWrapper,
)

from slicer import vtkMRMLScalarVolumeNode


def _ensureEngineImportable():
    """Make ZeroShotILDLib importable.

    Installed, CMake copies the engine next to this file; in a source checkout (Extension Wizard or
    a module path in Application Settings) it is the repository folder one level up.
    """
    try:
        import ZeroShotILDLib  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


_ensureEngineImportable()

# Only torch-free parts of the engine are imported here: the module must load before the first
# Apply has installed torch and open_clip.
from ZeroShotILDLib.errors import Cancelled, InputError  # noqa: E402
from ZeroShotILDLib.settings import COMMON_FINDINGS, DEVICES, MONTAGE_SIZES, RETRIEVAL_METHODS, SCORING_MODES  # noqa: E402
from ZeroShotILDMRML import catalog  # noqa: E402
from ZeroShotILDMRML.mrml_results import RANGE_MODES, RELATIVE_RANGE  # noqa: E402
from ZeroShotILDMRML.parameters import DEFAULTS  # noqa: E402

MODEL_CHOICES = tuple(catalog.model_names()) + (catalog.CUSTOM_MODEL, catalog.ENSEMBLE_MODEL)
#: Where the help text sends users for installation, offline weights and usage.
DOCS_URL = "https://github.com/zeroshot-ild/ZeroShotILD#installing-the-module-in-3d-slicer"


#
# ZeroShotILD
#


class ZeroShotILD(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ZeroShotILD")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Chest Imaging Platform")]
        self.parent.dependencies = []
        self.parent.contributors = ["ZeroShotILD contributors"]
        self.parent.helpText = _("""
<p>Zero-shot search for interstitial lung disease (ILD) findings on chest HRCT with CLIP-style
vision-language models.</p>
<p><b>Method.</b> The lungs are segmented (threshold at -400 HU, morphology, hole filling); square
candidate patches are laid over the lungs on axial slices; every patch is encoded by the model's
image tower and scored by comparing it with the text prompt (e.g. "honeycombing") against its
negative ("no honeycombing"), CheXzero style. The most probable patches are outlined and painted
into a heatmap; the top n&times;n patches form a montage, which is classified for the findings and
the ILD subtypes. A new prompt re-ranks the same patches from the kept embeddings without encoding
the scan again.</p>
<p><b>Limits.</b> Research use only: this is <b>not a diagnostic device</b> and must not be used for
clinical decisions. Zero-shot scores are uncalibrated (CheXzero-style probabilities often sit near
0.5: compare patches with each other, not with a fixed cut-off); chest radiograph models see CT
patches out of their training domain; models marked "random" have random weights and their scores
are meaningless, and "phantom-demo" is meaningful on synthetic phantoms only: the panel, the tables
and the saved notes then carry a warning.</p>
<p><b>How to cite.</b> If you use this module, cite the method papers: C. Van Uden, C. Bluethgen,
et al., "Exploring the Versatility of Zero-Shot CLIP for Interstitial Lung Disease
Classification"; J. Jang, D. Kyung, et al., "Significantly Improving Zero-Shot X-ray Pathology
Classification via Fine-tuning Pre-trained Image-Text Encoders"; J. Silva-Rodr&iacute;guez,
J. Dolz, I. Ben Ayed, "A Reality Check of Vision-Language Pre-training in Radiology: Have We
Progressed Using Text?"; and the model you used (e.g. E. Tiu et al., "Expert-level detection of
pathologies from unannotated chest X-ray images via self-supervised learning", Nature Biomedical
Engineering 2022, for CheXzero; A. Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision", ICML 2021, for CLIP).</p>
<p>Documentation (installation, first-run packages, offline weights, usage):
<a href="{url}">{url}</a></p>
""").format(url=DOCS_URL)
        self.parent.acknowledgementText = _("""
Built on 3D Slicer's scripted-module template (J.-C. Fillion-Robin, Kitware; A. Lasso, PerkLab;
S. Pieper, Isomics), the PyTorch extension (F. P&eacute;rez-Garc&iacute;a and A. Lasso) and
OpenCLIP (G. Ilharco, M. Wortsman, R. Wightman, et al.). Model weights belong to their authors and
keep their own licences (see the model list in Resources/models.json).
""")


#
# ZeroShotILDParameterNode
#


@parameterNodeWrapper
class ZeroShotILDParameterNode:
    """
    The module's parameters; each maps onto a field of ZeroShotILDLib.settings.AnalysisSettings
    (ZeroShotILDMRML/parameters.py holds the mapping, CI checks that every field is covered).

    inputVolume - chest CT in HU.
    model - registry model name, "custom checkpoint…" for a DAPT checkpoint in checkpointPath, or
        "ensemble of checkpoints…" for a training run's ensemble.json in checkpointPath.
    checkpointPath - checkpoint (or ensemble.json) file: the custom model, or weights for the chosen registry model.
    weightsDir - folder searched for downloaded weights (empty: the user cache folder).
    prompts - findings separated by ";" (the first is ranked and painted); negatives likewise.
    subtypes - one ILD subtype per line.
    patterns - pattern-map prompts, one per line (empty: no pattern map); normalPrompt - the
        normal-lung text every finding's extent is contrasted with.
    subpleuralMm - depth of the subpleural rind (extent by zone); extentZ - the extent rule's
        threshold in robust SDs above what normal lungs score (the model's calibrated reference);
        extentMinNeighbours - positive grid neighbours (of 6) a positive box needs.
    heatmapOpacity - foreground opacity of the heatmap in the slice views (display only).
    heatmapRange - colour range of the heatmap: the probabilities' own range or the fixed 0-1 (display only).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: Annotated[str, Choice(MODEL_CHOICES)] = DEFAULTS["model"]
    checkpointPath: str = DEFAULTS["checkpointPath"]
    weightsDir: str = DEFAULTS["weightsDir"]
    device: Annotated[str, Choice(DEVICES)] = DEFAULTS["device"]
    batchSize: Annotated[int, WithinRange(1, 1024)] = DEFAULTS["batchSize"]
    prompts: str = DEFAULTS["prompts"]
    negatives: str = DEFAULTS["negatives"]
    subtypes: str = DEFAULTS["subtypes"]
    patterns: str = DEFAULTS["patterns"]
    normalPrompt: str = DEFAULTS["normalPrompt"]
    subpleuralMm: Annotated[float, WithinRange(0.5, 50.0)] = DEFAULTS["subpleuralMm"]
    extentZ: Annotated[float, WithinRange(0.0, 20.0)] = DEFAULTS["extentZ"]
    extentMinNeighbours: Annotated[int, WithinRange(0, 6)] = DEFAULTS["extentMinNeighbours"]
    patchMm: Annotated[float, WithinRange(2.0, 200.0)] = DEFAULTS["patchMm"]
    patchPx: Annotated[int, WithinRange(0, 1024)] = DEFAULTS["patchPx"]
    strideFraction: Annotated[float, WithinRange(0.1, 4.0)] = DEFAULTS["strideFraction"]
    sliceStepMm: Annotated[float, WithinRange(0.1, 100.0)] = DEFAULTS["sliceStepMm"]
    filterThreshold: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULTS["filterThreshold"]
    scoredMinLungFraction: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULTS["scoredMinLungFraction"]
    windowLowHu: Annotated[float, WithinRange(-3000.0, 3000.0)] = DEFAULTS["windowLowHu"]
    windowHighHu: Annotated[float, WithinRange(-3000.0, 3000.0)] = DEFAULTS["windowHighHu"]
    retrieval: Annotated[str, Choice(RETRIEVAL_METHODS)] = DEFAULTS["retrieval"]
    montageSize: Annotated[int, Choice(MONTAGE_SIZES)] = DEFAULTS["montageSize"]
    topK: Annotated[int, WithinRange(1, 256)] = DEFAULTS["topK"]
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = DEFAULTS["seed"]
    scoringMode: Annotated[str, Choice(SCORING_MODES)] = DEFAULTS["scoringMode"]
    proposalGridTokens: Annotated[int, WithinRange(0, 64)] = DEFAULTS["proposalGridTokens"]
    proposalSkipWithinMm: Annotated[float, WithinRange(0.0, 10.0)] = DEFAULTS["proposalSkipWithinMm"]
    fp32SkipWithinMm: Annotated[float, WithinRange(0.0, 10.0)] = DEFAULTS["fp32SkipWithinMm"]
    rescoreFraction: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULTS["rescoreFraction"]
    rescoreMin: Annotated[int, WithinRange(0, 100000)] = DEFAULTS["rescoreMin"]
    lungThresholdHu: Annotated[float, WithinRange(-1000.0, 0.0)] = DEFAULTS["lungThresholdHu"]
    lungMinComponentMl: Annotated[float, WithinRange(0.0, 1000.0)] = DEFAULTS["lungMinComponentMl"]
    lungOpeningMm: Annotated[float, WithinRange(0.0, 50.0)] = DEFAULTS["lungOpeningMm"]
    lungClosingMm: Annotated[float, WithinRange(0.0, 50.0)] = DEFAULTS["lungClosingMm"]
    lungErosionMm: Annotated[float, WithinRange(0.0, 50.0)] = DEFAULTS["lungErosionMm"]
    lungAirwayHu: Annotated[float, WithinRange(-1100.0, 0.0)] = DEFAULTS["lungAirwayHu"]
    lungWorkingSpacingMm: Annotated[float, WithinRange(0.0, 10.0)] = DEFAULTS["lungWorkingSpacingMm"]
    lungFillHoles: bool = DEFAULTS["lungFillHoles"]
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    heatmapRange: Annotated[str, Choice(RANGE_MODES)] = RELATIVE_RANGE


#
# ZeroShotILDWidget
#


class ZeroShotILDWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        #: (input volume, settings) to analyse once a weights download started by Apply has finished.
        self._afterDownload = None
        self._progress = None
        self._pollTimer = None
        # Display settings last pushed to the views: the views are touched only when these change,
        # so a parameter change elsewhere never overrides what the user set in a slice view.
        self._shownOpacity = None
        self._shownRange = None
        self._inputFilterPending = False  # an update of the input selector's hidden nodes is queued

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ZeroShotILD.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ZeroShotILDLogic()

        for finding in COMMON_FINDINGS:
            self.ui.findingsListWidget.addItem(finding)
        self.ui.checkpointPathLineEdit.filters = ctkPathFilters("file")
        self.ui.checkpointPathLineEdit.nameFilters = ["Checkpoints (*.safetensors *.pt *.pth *.bin)",
                                                       "Ensembles (ensemble.json *.json)", "All files (*)"]
        self.ui.weightsDirLineEdit.filters = ctkPathFilters("dir")
        self.ui.progressBar.hide()
        self.ui.modelWarningLabel.hide()
        self.ui.detailsCollapsibleButton.hide()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._pollJob)

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # The input selector lists CT volumes only, not this module's own heatmap and montage volumes
        # (scalar volumes too); a loaded scene brings them with their role attribute already set.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self._scheduleInputFilterUpdate)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self._scheduleInputFilterUpdate)
        self._updateInputFilter()

        # Paths are plain strings in the parameter node (an empty string means "default"), which the
        # wrapper cannot bind to path widgets, so these two are connected by hand.
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onCheckpointPathChanged)
        self.ui.weightsDirLineEdit.connect("currentPathChanged(QString)", self.onWeightsDirChanged)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.repromptButton.connect("clicked(bool)", self.onRepromptButton)
        self.ui.promptLineEdit.connect("returnPressed()", self.onRepromptButton)
        self.ui.findingsListWidget.connect("itemClicked(QListWidgetItem*)", self.onFindingClicked)
        self.ui.openWeightsDirButton.connect("clicked(bool)", self.onOpenWeightsDir)
        self.ui.showMontageButton.connect("clicked(bool)", self.onShowMontage)
        self.ui.saveMontageButton.connect("clicked(bool)", self.onSaveMontage)
        self.ui.saveReportButton.connect("clicked(bool)", self.onSaveReport)
        self.ui.showExtentChartButton.connect("clicked(bool)", self.onShowExtentChart)
        self.ui.patchTableView.connect("selectionChanged()", self.onPatchSelected)

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()

    def _scheduleInputFilterUpdate(self, caller=None, event=None) -> None:
        # Once per batch of added nodes (a result or a scene import adds many), after the batch.
        if not self._inputFilterPending:
            self._inputFilterPending = True
            qt.QTimer.singleShot(0, self._updateInputFilter)

    def _updateInputFilter(self) -> None:
        """Hide the module's own output volumes (heatmaps, montages) from the input selector."""
        from ZeroShotILDMRML import mrml_results

        self._inputFilterPending = False
        proxy = self.ui.inputVolumeSelector.sortFilterProxyModel()
        proxy.hiddenNodeIDs = mrml_results.output_volume_ids(slicer.mrmlScene)

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._stopWorker()
        self.removeObservers()

    def _stopWorker(self) -> None:
        """Drop the running job (its results are not applied) and stop the worker process."""
        self._job = None
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.logic is not None:
            self.logic.shutdownWorker()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # The worker's analysis belongs to this scene's volume: stop it (GPU memory is freed) and
        # start a fresh one with the next Apply.
        self._stopWorker()
        self.ui.progressBar.hide()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        self.logic.forgetSession()
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.GetAttribute("ZeroShotILD.Role"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[ZeroShotILDParameterNode]) -> None:
        """Set and observe parameter node."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # The views already show whatever the scene holds; only later changes are pushed.
            self._shownOpacity = self._parameterNode.heatmapOpacity
            self._shownRange = self._parameterNode.heatmapRange
            # Widgets carry the Qt dynamic property "SlicerParameterName" in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        pn = self._parameterNode
        # A re-prompt's exact re-scoring runs in the background: the panel stays usable meanwhile.
        running = self._job is not None and not self._job.previewed
        if pn is None:
            self.ui.applyButton.enabled = False
            return
        self._setPathWidget(self.ui.checkpointPathLineEdit, pn.checkpointPath)
        self._setPathWidget(self.ui.weightsDirLineEdit, pn.weightsDir or str(catalog.default_weights_dir()))
        self.ui.modelInfoLabel.text = catalog.describe_model(pn.model, pn.weightsDir or None)
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the analysis; the scene is left as it was")
            self.ui.applyButton.enabled = not self._job.cancel_requested
        else:
            self.ui.applyButton.text = _("Apply")
            self.ui.applyButton.enabled = bool(pn.inputVolume)
            self.ui.applyButton.toolTip = (_("Segment the lungs, score patches for the prompt, build the montage and classify")
                                           if pn.inputVolume else _("Select an input CT volume"))
        canReprompt = not running and self.logic.hasSessionFor(pn.inputVolume)
        self.ui.repromptButton.enabled = canReprompt
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.modelCollapsibleButton.enabled = not running
        self.ui.patchesCollapsibleButton.enabled = not running
        self.ui.advancedCollapsibleButton.enabled = not running
        self._updateModelWarning()
        if pn.heatmapOpacity != self._shownOpacity:
            self._shownOpacity = pn.heatmapOpacity
            self.logic.setHeatmapOpacity(pn.heatmapOpacity)
        if pn.heatmapRange != self._shownRange:
            self._shownRange = pn.heatmapRange
            self.logic.setHeatmapRange(pn.heatmapRange)

    def _updateModelWarning(self) -> None:
        """The red line under the model: the result's warning, or (before a run) the selected model's."""
        pn = self._parameterNode
        warning = ""
        if pn is not None and pn.inputVolume is not None:
            if self.logic.hasSessionFor(pn.inputVolume):
                warning = self.logic.modelWarning()
            else:
                warning = catalog.input_warning(pn.model, slicer.util.arrayFromVolume(pn.inputVolume))
        self.ui.modelWarningLabel.text = warning
        self.ui.modelWarningLabel.visible = bool(warning)

    @staticmethod
    def _setPathWidget(widget, path: str) -> None:
        if widget.currentPath != path:
            wasBlocked = widget.blockSignals(True)
            widget.currentPath = path
            widget.blockSignals(wasBlocked)

    def onCheckpointPathChanged(self, path: str) -> None:
        if self._parameterNode:
            self._parameterNode.checkpointPath = path.strip()

    def onWeightsDirChanged(self, path: str) -> None:
        if self._parameterNode:
            path = path.strip()
            # The default folder is stored as "" so that $ZEROSHOT_ILD_WEIGHTS keeps working.
            self._parameterNode.weightsDir = "" if path == str(catalog.default_weights_dir()) else path

    # -- Apply / Cancel ------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        """Run the analysis (or cancel the one running)."""
        if self._job is not None and not self._job.previewed:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling…")
            self._onParameterNodeModified()
            return
        with slicer.util.tryWithErrorDisplay(_("ZeroShotILD could not start."), waitCursor=True):
            if not self.logic.setupPythonRequirements(askConfirmation=True):
                self.ui.statusLabel.text = _("Python packages were not installed; nothing was done.")
                return
            inputVolume = self._parameterNode.inputVolume
            settings = self.logic.settingsFromParameterNode(self._parameterNode)
            if self.logic.canReprompt(inputVolume, settings):
                self._reprompt(settings)
                return
            missing = self.logic.missingDownloadableModel(settings)
            if missing:
                # The first Apply with an openly licensed model: offer its weights instead of an error.
                if not slicer.util.confirmYesNoDisplay(self.logic.downloadQuestion(missing, settings)):
                    self.ui.statusLabel.text = _("The model's weights were not downloaded; nothing was done.")
                    return
                self._afterDownload = (inputVolume, settings)
                self._startJob(self.logic.startDownload(missing, settings.weights_dir), _("downloading weights"))
                return
            self._startJob(self.logic.startProcess(inputVolume, settings), _("starting"))

    def _startJob(self, job, label: str) -> None:
        """Follow a worker job from the poll timer (the worker runs on; nothing here waits for it)."""
        from ZeroShotILDMRML.runner import StagedProgress

        self._job = job
        self._progress = StagedProgress()
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat(label)
        self.ui.progressBar.show()
        self.ui.statusLabel.text = ""
        self._pollTimer.start()
        self._onParameterNodeModified()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        for stage, done, total in job.poll():
            fraction = self._progress.update(stage, done, total)
            self.ui.progressBar.value = int(round(100 * fraction))
            self.ui.progressBar.setFormat(f"%p%  {self._progress.label}")
        if self.logic.applyPreview(job):
            self._showResultSummary()
            self.ui.statusLabel.text = _("Preview (scores partly from the quick proposal pass); re-scoring the best "
                                         "patches exactly…") + "\n" + self.ui.statusLabel.text
            from ZeroShotILDMRML.runner import StagedProgress

            self._progress = StagedProgress()
            self.ui.progressBar.setFormat(_("exact re-scoring"))
            self._onParameterNodeModified()
        if not job.finished:
            return
        self._pollTimer.stop()
        self._job = None
        self.ui.progressBar.hide()
        try:
            from ZeroShotILDMRML import worker_client

            if getattr(job, "kind", "") == "download":
                self._finishDownload(job)
                return
            if job.state == worker_client.SUCCEEDED:
                with slicer.util.tryWithErrorDisplay(_("Failed to add the results to the scene."), waitCursor=True):
                    self.logic.finishProcess(job, opacity=self._parameterNode.heatmapOpacity if self._parameterNode else 0.5)
                    self._showResultSummary()
            elif job.state == worker_client.CANCELLED:
                if job.previewed:
                    self.ui.statusLabel.text = _("Exact re-scoring stopped: the preview is shown (press Apply for the "
                                                 "exact ranking).") + "\n" + self.logic.summary()
                else:
                    self.ui.statusLabel.text = _("Cancelled; the scene was left as it was.")
            else:
                self._reportError(job.error)
        finally:
            self._onParameterNodeModified()

    def _finishDownload(self, job) -> None:
        """After a weights download: report it and, when Apply started it, run the analysis."""
        from ZeroShotILDMRML import worker_client

        pending, self._afterDownload = self._afterDownload, None
        if job.state == worker_client.SUCCEEDED:
            self.ui.statusLabel.text = _("Weights downloaded to {folder}.").format(folder=job.result)
            if pending is not None:
                with slicer.util.tryWithErrorDisplay(_("ZeroShotILD could not start."), waitCursor=True):
                    self._startJob(self.logic.startProcess(*pending), _("starting"))
        elif job.state == worker_client.CANCELLED:
            self.ui.statusLabel.text = _("Download stopped; the next one continues where it stopped.")
        else:
            self._reportError(job.error)

    def _reportError(self, error) -> None:
        from ZeroShotILDMRML.worker_client import WorkerError

        if isinstance(error, (InputError, WorkerError)):
            self.ui.statusLabel.text = str(error)
            slicer.util.errorDisplay(str(error))
        else:
            self.ui.statusLabel.text = _("Analysis failed: see the Python console for details.")
            logging.error("ZeroShotILD analysis failed", exc_info=(type(error), error, error.__traceback__))
            slicer.util.errorDisplay(_("Analysis failed: {error}").format(error=f"{type(error).__name__}: {error}"))

    # -- Re-prompt -----------------------------------------------------------------------------

    def onRepromptButton(self) -> None:
        if (self._job is not None and not self._job.previewed) or not self._parameterNode:
            return
        if not self.logic.hasSessionFor(self._parameterNode.inputVolume):
            return
        with slicer.util.tryWithErrorDisplay(_("Re-ranking failed."), waitCursor=True):
            settings = self.logic.settingsFromParameterNode(self._parameterNode)
            self._reprompt(settings)

    def _reprompt(self, settings) -> None:
        # A re-scoring still running for an older prompt is superseded by this one.
        self._startJob(self.logic.startReprompt(settings), _("re-ranking"))

    def onFindingClicked(self, item) -> None:
        if not self._parameterNode or (self._job is not None and not self._job.previewed):
            return
        self._parameterNode.prompts = item.text()
        if self.logic.hasSessionFor(self._parameterNode.inputVolume):
            self.onRepromptButton()

    # -- Results -------------------------------------------------------------------------------

    def _showResultSummary(self) -> None:
        nodes = self.logic.resultNodes()
        if nodes is None:
            return
        self._updateInputFilter()  # the new heatmap and montage are not inputs
        self.ui.probabilityTableView.setMRMLTableNode(nodes.probabilities)
        self.ui.patchTableView.setMRMLTableNode(nodes.patch_table)
        self.ui.extentTableView.setMRMLTableNode(nodes.extent_table)
        self.ui.extentTableView.visible = nodes.extent_table is not None
        self.ui.patternsSegmentsTableView.setSegmentationNode(nodes.patterns)
        self.ui.patternsSegmentsTableView.visible = nodes.patterns is not None
        self.ui.patternsLabel.visible = nodes.patterns is not None
        self.ui.extentLabel.text = self.logic.extentSummary() or _("Extent by zone (%):")
        self.ui.showExtentChartButton.enabled = nodes.extent_chart is not None
        self.ui.resultsCollapsibleButton.collapsed = False
        if self._parameterNode is not None:
            self._shownRange = self._parameterNode.heatmapRange
            self.logic.setHeatmapRange(self._parameterNode.heatmapRange)
        from ZeroShotILDMRML import mrml_results

        warning = self.logic.modelWarning()
        flag = f" ({mrml_results.short_warning(warning)})" if warning else ""
        self.ui.resultsCollapsibleButton.text = _("Results") + flag
        self.ui.patchTableLabel.text = _("Top patches{flag} (click a row to jump there):").format(flag=flag)
        self._updateModelWarning()
        # The status line is for the user; engineering notes go to the log and the details box.
        self.ui.statusLabel.text = self.logic.summary()
        details = self.logic.details()
        self.ui.detailsTextEdit.plainText = details
        self.ui.detailsCollapsibleButton.visible = bool(details)
        for note in details.splitlines():
            logging.info(f"ZeroShotILD: {note}")

    def onPatchSelected(self) -> None:
        # Read the rank from the clicked row's own "rank" cell through the view's (possibly sorted)
        # model. qMRMLTableModel's row mapping (mrmlTableRowIndex) is a plain C++ method that Slicer
        # does not wrap for Python; the proxy model's index() and data() are Qt API and always are.
        view = self.ui.patchTableView
        selection = view.selectionModel()
        selected = selection.selectedIndexes() if selection is not None else []
        index = selected[0] if selected else view.currentIndex()
        if not index.isValid():
            return
        model = view.model()  # the view's sort proxy: its rows are the rows the user sees
        columns = range(model.columnCount())
        headers = [model.headerData(c, qt.Qt.Horizontal) for c in columns]
        if "rank" not in headers:
            # A table without column titles as headers shows the column names in its first row.
            headers = [model.index(0, c).data() for c in columns]
        cells = [model.index(index.row(), c).data() for c in columns]
        from ZeroShotILDMRML import mrml_results

        rank = mrml_results.rank_from_table_cells(headers, cells)
        if rank is not None:
            self.logic.jumpToPatch(rank)

    def onShowMontage(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot show the montage."), waitCursor=True):
            path = self.logic.saveMontage(os.path.join(slicer.app.temporaryPath, "ZeroShotILD-montage.png"))
            dialog = qt.QDialog(slicer.util.mainWindow())
            dialog.setWindowTitle(_("ZeroShotILD montage: {prompt}").format(prompt=self.logic.primaryPrompt()))
            layout = qt.QVBoxLayout(dialog)
            label = qt.QLabel()
            pixmap = qt.QPixmap(str(path))
            label.setPixmap(pixmap.scaled(2 * pixmap.width(), 2 * pixmap.height(), qt.Qt.KeepAspectRatio, qt.Qt.FastTransformation))
            layout.addWidget(label)
            dialog.setAttribute(qt.Qt.WA_DeleteOnClose)
            dialog.show()

    def onSaveMontage(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot save the montage."), waitCursor=True):
            default = str(self.logic.defaultMontagePath())
            path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Save montage"), default, "PNG (*.png)")
            if path:
                saved = self.logic.saveMontage(path)
                self.ui.statusLabel.text = _("Montage saved to {path}").format(path=saved)

    def onShowExtentChart(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot show the extent chart."), waitCursor=True):
            self.logic.showExtentChart()

    def onSaveReport(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot save the report."), waitCursor=True):
            default = str(self.logic.defaultReportPath())
            path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Save report"), default, "HTML (*.html)")
            if path:
                saved = self.logic.saveReport(path)
                self.ui.statusLabel.text = _("Report saved to {path}").format(path=saved)

    def onOpenWeightsDir(self) -> None:
        folder = Path(self._parameterNode.weightsDir or catalog.default_weights_dir()) if self._parameterNode else catalog.default_weights_dir()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))


def ctkPathFilters(kind: str):
    """ctkPathLineEdit filter flags for existing files or folders."""
    import ctk

    if kind == "dir":
        return ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Executable | ctk.ctkPathLineEdit.NoDot | ctk.ctkPathLineEdit.NoDotDot
    return ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable


#
# ZeroShotILDLogic
#


class ZeroShotILDLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable from the Python console without the widget:

    >>> logic = slicer.util.getModuleLogic("ZeroShotILD")  # or ZeroShotILDLogic()
    >>> nodes = logic.process(getNode("CTChest"), prompts=["honeycombing"], model="tiny-random")
    >>> logic.reprompt(["ground-glass opacity"])   # re-ranks from the kept patch embeddings
    >>> logic.saveMontage()                         # next to the saved scene

    ``process`` runs the engine in this process and blocks. The panel instead uses the analysis
    worker process (``startProcess`` / ``startReprompt`` return a job that a timer polls;
    ``ZeroShotILDMRML/worker.py``), because Slicer's main thread holds the GIL and a Python thread
    would barely run. The last analysed volume is ``self.session``: with the engine's Analyzer and its
    patch embeddings when analysed here, or naming the worker that keeps them.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = None
        self._model = None
        self._modelKey = None
        self._cache = None
        self._worker = None

    def getParameterNode(self):
        return ZeroShotILDParameterNode(super().getParameterNode())

    # -- settings ------------------------------------------------------------------------------

    def settingsFromParameterNode(self, parameterNode=None):
        """``AnalysisSettings`` from the (wrapped or raw) parameter node; InputError if invalid."""
        from ZeroShotILDMRML.parameters import read_settings

        node = parameterNode if parameterNode is not None else self.getParameterNode()
        raw = node.parameterNode if hasattr(node, "parameterNode") else node
        return read_settings(raw)

    def settingsToParameterNode(self, settings, parameterNode=None) -> None:
        from ZeroShotILDMRML.parameters import write_settings

        node = parameterNode if parameterNode is not None else self.getParameterNode()
        raw = node.parameterNode if hasattr(node, "parameterNode") else node
        write_settings(raw, settings, catalog.model_names())

    def _settings(self, settings=None, **overrides):
        """Settings from the argument (or the parameter node) with keyword overrides applied."""
        from ZeroShotILDLib.settings import with_overrides

        settings = settings if settings is not None else self.settingsFromParameterNode()
        return with_overrides(settings, **overrides).validate() if overrides else settings.validate()

    # -- dependencies --------------------------------------------------------------------------

    def setupPythonRequirements(self, askConfirmation: bool = True) -> bool:
        """Install torch (PyTorch extension) and the packages of Resources/requirements.txt if missing.

        Asks first when ``askConfirmation``; returns False if the user declines. pip runs with a
        constraints file that pins every package already in Slicer's Python (torch, numpy, scipy,
        SimpleITK, vtk...). A torch too old for open_clip is reported before anything is installed.
        """
        from ZeroShotILDMRML import dependencies

        dependencies.check_torch()
        requirements = catalog.requirements()
        needTorch = not dependencies.torch_installed() or dependencies.installed_version("torchvision") is None
        missing = dependencies.missing_requirements(requirements)
        if not needTorch and not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("ZeroShotILD needs Python packages that are not installed yet. Installing them needs a network "
              "connection and may take several minutes. The packages Slicer already has (torch, numpy, SimpleITK...) are kept as they are."),
            _("Install Python packages?"),
            detailedText=dependencies.describe_install(missing, needTorch),
        ):
            return False
        if needTorch:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise InputError("ZeroShotILD needs the PyTorch extension: install 'PyTorch' from the Extensions Manager and restart Slicer") from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False,
                torchVersionRequirement=dependencies.TORCH_REQUIREMENT,
                torchvisionVersionRequirement=dependencies.TORCHVISION_REQUIREMENT,
            )
            if torch is None:
                raise InputError("PyTorch was not installed: install it with the 'PyTorch Util' module, then press Apply again")
        missing = dependencies.missing_requirements(requirements)
        if missing:
            constraints = dependencies.write_constraints(slicer.app.temporaryPath, installing=missing)
            slicer.util.pip_install(dependencies.pip_arguments(missing, constraints))
            import importlib

            importlib.invalidate_caches()  # so that this session imports what pip just installed
            still = dependencies.missing_requirements(requirements)
            if still:
                raise InputError(f"pip did not install {', '.join(still)}: see the Python console, or install them "
                                 "offline with PythonSlicer -m pip (README, 'Installing the module in 3D Slicer')")
        return True

    # -- analysis in this process (Python console) -------------------------------------------------

    def process(self, inputVolume, settings=None, *, progress=None, cancel=None, show: bool = True, **overrides):
        """Analyse ``inputVolume`` in this process and put the results in the scene; blocks until done.

        For the Python console and scripts (the panel's Apply uses the worker process instead, see
        :meth:`startProcess`). ``settings`` is an ``AnalysisSettings`` (default: the parameter
        node's); keyword arguments override its fields, e.g. ``prompts=["honeycombing"],
        model="tiny-random"``. ``progress`` is ``progress(stage, done, total)``, ``cancel`` a
        ``ZeroShotILDLib.progress.CancelToken``. Returns the ``ResultNodes``. Raises ``InputError``
        for problems the user can fix and ``Cancelled`` if cancelled (the scene is then unchanged).
        """
        settings = self._settings(settings, **overrides)
        session = self._newSession(inputVolume, settings)
        session.compute(progress or _logProgress, cancel, model=self._reusableModel(settings), cache=self._embeddingCache())
        return self._applySession(session, show=show)

    # -- analysis in the worker process (the panel) ----------------------------------------------

    def missingDownloadableModel(self, settings) -> str:
        """The registry model of ``settings`` whose openly licensed weights are missing ("" when none).

        Read without torch (``ZeroShotILDLib.model_registry``): the panel asks before any work starts.
        """
        from ZeroShotILDLib import model_registry

        if settings.checkpoint or settings.model not in model_registry.model_names():
            return ""
        spec = model_registry.get_spec(settings.model)
        if not spec.download:
            return ""
        state = model_registry.weights_status(spec, model_registry.weights_root(settings.weights_dir), hash_files=False)
        return spec.name if state["state"] == "missing" else ""

    def downloadQuestion(self, model: str, settings) -> str:
        from ZeroShotILDLib import model_registry

        spec = model_registry.get_spec(model)
        folder = model_registry.weights_root(settings.weights_dir) / spec.name
        return _("The weights of '{model}' ({licence} licence, about 0.6 GB) are not in {folder}.\n\n"
                 "Download them now from Hugging Face (pinned version, checked)? This needs internet once; "
                 "the analysis starts when they are in place.").format(model=spec.name, licence=spec.licence,
                                                                       folder=folder)

    def startDownload(self, model: str, weightsDir=None):
        """Download a model's weights in the worker process; returns its job (progress in MB)."""
        return self.workerClient().download(model, weightsDir or None)

    def startProcess(self, inputVolume, settings=None, **overrides):
        """Start the analysis in the worker process; returns a ``WorkerJob`` at once (never blocks on it).

        The worker is started on first use and kept (model, scan and embeddings stay loaded). The
        voxels go to it as a temporary file written straight from the node's array. Poll the job
        from a timer (``job.poll()``), then call :meth:`finishProcess` on the main thread once
        ``job.finished``; ``job.wait()`` blocks instead (console).
        """
        from ZeroShotILDMRML import volumes

        settings = self._settings(settings, **overrides)
        session = self._newSession(inputVolume, settings, copy_voxels=False)
        job = self.workerClient().analyse(settings=settings, placed_by=volumes.transform_name(inputVolume),
                                          **volumes.scan_inputs(inputVolume))
        job.session = session
        return job

    def startReprompt(self, settings, *, exact: bool = True):
        """Re-rank the last analysis for ``settings`` in the worker; returns a ``WorkerJob`` at once.

        In fast mode the job delivers a preview first (``job.take_preview()``, apply it with
        :meth:`applyPreview`) and then the exact re-scoring of the new prompt's best candidates as its
        result (:meth:`finishProcess`), which equals a fresh analysis with these settings.
        """
        from ZeroShotILDMRML.session import reprompt_changes

        session = self.session
        if session is None or session.worker is None or not session.reprompt_ready:
            raise InputError("nothing analysed in the worker (or it was restarted): press Apply to analyse")
        settings = settings.validate()
        if reprompt_changes(session.settings, settings) is None:
            raise InputError("these settings change the patches or the model: press Apply to analyse again")
        job = self.workerClient().reprompt(settings, exact=exact, lung_mask=session.result.lung_mask)
        job.session, job.settings = session, settings
        return job

    def applyPreview(self, job) -> bool:
        """Put a re-prompt job's preview (if one arrived) in the scene; True if it did."""
        from ZeroShotILDMRML import worker_client

        preview = job.take_preview()
        # A preview that arrived together with the exact answer is not worth drawing.
        if preview is None or job.session is not self.session or job.state == worker_client.SUCCEEDED:
            return False
        self.session.apply_reprompt(preview, job.settings, app_logic=_appLogic())
        return True

    def finishProcess(self, job, *, show: bool = True, opacity: float = 0.5):
        """Put a finished job's results in the scene (main thread). Raises its error if it failed."""
        from ZeroShotILDMRML import worker_client

        if job.state == worker_client.CANCELLED:
            raise job.error if isinstance(job.error, Cancelled) else Cancelled("cancelled by the user")
        if job.state != worker_client.SUCCEEDED:
            raise job.error or RuntimeError("the analysis did not finish")
        session = job.session
        if job.kind == "reprompt":
            if session is not self.session:
                raise InputError("the scene changed during the re-prompt: press Apply again")
            return session.apply_reprompt(job.result, job.settings, app_logic=_appLogic())
        session.result = job.result
        session.worker = (job.client, job.id)
        return self._applySession(session, show=show, opacity=opacity)

    def workerClient(self):
        """The ``WorkerClient`` of this logic (the worker process itself starts on first use)."""
        if self._worker is None:
            from ZeroShotILDMRML.worker_client import WorkerClient

            self._worker = WorkerClient(python=_workerPython(), temp_dir=_temporaryPath())
        return self._worker

    def shutdownWorker(self) -> None:
        """Stop the worker process (scene closed, module cleaned up); the next Apply starts a new one."""
        if self._worker is not None:
            self._worker.shutdown()

    def _newSession(self, inputVolume, settings, copy_voxels: bool = True):
        from ZeroShotILDMRML.session import AnalysisSession

        return AnalysisSession(inputVolume, settings, copy_voxels=copy_voxels)

    def _applySession(self, session, *, show: bool, opacity: float = 0.5):
        nodes = session.apply(app_logic=_appLogic())
        self.session = session
        if session.analyzer is not None:
            self._model = session.analyzer.model
            self._modelKey = _modelKey(session.settings)
        if show:
            self.showResult(opacity=opacity)
        return nodes

    def _reusableModel(self, settings):
        return self._model if self._modelKey == _modelKey(settings) else None

    def _embeddingCache(self):
        if self._cache is None:
            from ZeroShotILDLib.embeddings import EmbeddingCache

            self._cache = EmbeddingCache()
        return self._cache

    def forgetSession(self) -> None:
        """Drop the kept analysis (scene closed); the loaded model stays for the next run."""
        self.session = None

    # -- re-prompt -----------------------------------------------------------------------------

    def hasSessionFor(self, inputVolume) -> bool:
        """Whether the last analysis is of ``inputVolume`` and its embeddings are still kept."""
        s = self.session
        return bool(s is not None and inputVolume is not None and s.input_volume_id == inputVolume.GetID()
                    and s.scene is inputVolume.GetScene() and s.scene.GetNodeByID(s.input_volume_id) is not None
                    and s.reprompt_ready)

    def canReprompt(self, inputVolume, settings) -> bool:
        return self.hasSessionFor(inputVolume) and self.session.can_reprompt(inputVolume, settings)

    def reprompt(self, prompts=None, negatives=None, subtypes=None, *, exact: bool = True, **overrides):
        """New prompts on the last analysed volume, from its kept patch embeddings; blocks until done.

        ``exact`` (default): in fast mode the new prompt's best candidates are re-scored exactly, so
        the result equals a fresh analysis with that prompt; ``exact=False`` gives the instant preview.
        """
        if self.session is None:
            raise InputError("nothing analysed yet: run process() (or press Apply) first")
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.session.analyzer is not None:
            return self.session.reprompt(prompts, negatives, subtypes, app_logic=_appLogic(), exact=exact, **overrides)
        import dataclasses

        changes = dict(overrides)
        if prompts is not None:
            changes.update(prompts=list(prompts), negatives=list(negatives) if negatives else None)
        elif negatives is not None:
            changes["negatives"] = list(negatives)
        if subtypes is not None:
            changes["subtypes"] = list(subtypes)
        return self._repromptInWorker(dataclasses.replace(self.session.settings, **changes), exact=exact)

    def repromptTo(self, settings):
        """Re-prompt the last analysis so that its settings become ``settings``; blocks until done."""
        if self.session is None:
            raise InputError("nothing analysed yet: press Apply first")
        if self.session.analyzer is not None:
            return self.session.reprompt_to(settings, app_logic=_appLogic())
        return self._repromptInWorker(settings)

    def _repromptInWorker(self, settings, exact: bool = True):
        job = self.startReprompt(settings, exact=exact)
        job.wait()
        return self.finishProcess(job, show=False)

    # -- results -------------------------------------------------------------------------------

    def resultNodes(self):
        return self.session.nodes if self.session is not None else None

    def primaryPrompt(self) -> str:
        return self.session.result.primary_prompt if self.session and self.session.result else ""

    def summary(self) -> str:
        """What the panel's status line shows: what was found, how long it took, and a model warning.

        Engineering notes (fast-mode details, cache reuse...) are in :meth:`details`, not here.
        """
        if self.session is None or self.session.result is None:
            return ""
        from ZeroShotILDMRML import mrml_results

        r = self.session.result
        lines = []
        warning = mrml_results.result_warning(r)
        if warning:
            lines.append(_("Warning: {warning}.").format(warning=warning))
        lines.append(_("{n} candidate patches, lungs {ml:.0f} mL; model {model}.").format(
            n=len(r.patches), ml=r.lung_volume_ml, model=r.model_name))
        lines += [f"P({k}) = {v:.3f}" for k, v in r.finding_probabilities.items()]
        if r.timings_s:
            lines.append(_("Time: {seconds:.1f} s").format(seconds=r.timings_s.get("total_s", r.timings_s.get("reprompt_s", 0.0))))
        return "\n".join(lines)

    def details(self) -> str:
        """The run's engineering notes (one per line), for the panel's details box and the log."""
        if self.session is None or self.session.result is None:
            return ""
        from ZeroShotILDMRML import mrml_results

        r = self.session.result
        warning = mrml_results.result_warning(r)
        return "\n".join(n for n in r.notes if n != warning)

    def extentSummary(self) -> str:
        """One line on the first prompt's extent: share of the lung and where it predominates."""
        if self.session is None or self.session.result is None:
            return ""
        r = self.session.result
        record = (r.extent or {}).get(r.primary_prompt)
        if not record or record.get("lung_fraction") is None:
            return ""
        where = record.get("predominance") or ""
        line = _("Extent of {prompt}: {pct:.1f} % of the lung{where} (table: % of each zone's lung).").format(
            prompt=r.primary_prompt, pct=100.0 * float(record["lung_fraction"]), where=f", {where}" if where else "")
        if record.get("calibrated") is False:
            line += " " + _("UNCALIBRATED: no normal-lung reference for this model and prompt (zeroshot-ild calibrate).")
        if record.get("not_imaged"):
            line += " " + _("Not imaged: {zones}.").format(zones=", ".join(record["not_imaged"]))
        return line

    def modelWarning(self) -> str:
        """Why the last result's scores are not meaningful ("" when they are, or with no result)."""
        if self.session is None or self.session.result is None:
            return ""
        from ZeroShotILDMRML import mrml_results

        return mrml_results.result_warning(self.session.result)

    #: The view layout is switched to table + plot for the first result only; after that the
    #: user's own layout stays.
    _layoutSwitched = False

    def showResult(self, opacity: float = 0.5) -> None:
        from ZeroShotILDMRML import mrml_results

        if self.session is None or self.session.nodes is None:
            return
        mrml_results.show_result(self.session.nodes, self.session.input_volume, app_logic=_appLogic(), opacity=opacity,
                                 switch_layout=not self._layoutSwitched)
        self._layoutSwitched = True

    def showExtentChart(self) -> None:
        """Show the extent-by-zone table and bar chart in the layout's table and plot views."""
        from ZeroShotILDMRML import mrml_results

        nodes = self.resultNodes()
        if nodes is None or nodes.extent_chart is None:
            raise InputError("no extent yet: press Apply first")
        mrml_results.show_table_and_chart(nodes.extent_table, nodes.extent_chart, _appLogic())

    def setHeatmapRange(self, mode: str) -> None:
        """Colour the heatmap over the probabilities' own range ("relative") or 0-1 ("fixed 0-1")."""
        nodes = self.resultNodes()
        if nodes is not None and nodes.heatmap is not None and nodes.heatmap.GetScene() is not None:
            from ZeroShotILDMRML import mrml_results

            mrml_results.set_heatmap_range(nodes.heatmap, mode)

    def setHeatmapOpacity(self, opacity: float) -> None:
        nodes = self.resultNodes()
        if nodes is not None and nodes.heatmap is not None and nodes.heatmap.GetScene() is not None:
            from ZeroShotILDMRML import mrml_results

            mrml_results.set_heatmap_opacity(nodes.heatmap.GetScene(), nodes.heatmap, opacity)

    def jumpToPatch(self, rank: int) -> None:
        """Centre the slice views on the patch with this rank (1 = most probable)."""
        from ZeroShotILDMRML import mrml_results

        nodes = self.resultNodes()
        if nodes is not None and 1 <= rank <= len(nodes.patch_rois):
            mrml_results.jump_to_patch(nodes.patch_rois[rank - 1])

    def jumpToPatchInTableRow(self, row: int) -> None:
        """Centre the slice views on the patch listed in ``row`` of the top-patches table node."""
        from ZeroShotILDMRML import mrml_results

        nodes = self.resultNodes()
        rank = mrml_results.rank_in_patch_table(nodes.patch_table, row) if nodes is not None else None
        if rank is not None:
            self.jumpToPatch(rank)

    def defaultMontagePath(self) -> Path:
        from ZeroShotILDMRML import mrml_results

        nodes = self.resultNodes()
        if nodes is None or nodes.montage is None:
            raise InputError("no montage yet: press Apply first")
        return mrml_results.default_montage_path(nodes.montage)

    def saveMontage(self, path: Optional[str] = None) -> Path:
        """Save the montage PNG (default: next to the saved scene) and return its path."""
        from ZeroShotILDMRML import mrml_results

        nodes = self.resultNodes()
        if nodes is None or nodes.montage is None:
            raise InputError("no montage yet: press Apply first")
        return mrml_results.save_montage(nodes.montage, path)

    def defaultReportPath(self) -> Path:
        from ZeroShotILDMRML import mrml_results

        if self.session is None or self.session.result is None:
            raise InputError("no result yet: press Apply first")
        return mrml_results.default_report_path(self.session.input_volume)

    def saveReport(self, path: Optional[str] = None) -> Path:
        """Write the one-page report.html of the last result (default: next to the saved scene).

        The same report as the command line's. When the analysis ran in the worker process the
        voxels are not kept here, so the scan is rebuilt from the input volume for the pictures.
        """
        from ZeroShotILDMRML import mrml_results

        if self.session is None or self.session.result is None:
            raise InputError("no result yet: press Apply first")
        volume = self.session.input_volume
        if self.session.scan is None:
            from ZeroShotILDMRML.session import _voxels_mtime

            # The pictures would show voxels the result was not computed on.
            if _voxels_mtime(volume) != self.session.voxels_mtime:
                raise InputError(f"volume '{volume.GetName()}' was edited after it was analysed: press Apply again, "
                                 "then save the report")
        return mrml_results.save_report(self.session.result, volume, path or self.defaultReportPath(),
                                        scan=self.session.scan)


def _modelKey(settings):
    return (settings.model, settings.checkpoint, settings.weights_dir, settings.device)


def _appLogic():
    return slicer.app.applicationLogic() if hasattr(slicer, "app") else None


def _workerPython() -> str:
    """Slicer's own Python for the worker process (see ``worker_client.worker_python``)."""
    import shutil

    from ZeroShotILDMRML.worker_client import worker_python

    return worker_python(shutil.which("PythonSlicer") if hasattr(slicer, "app") else None)


def _temporaryPath():
    path = getattr(getattr(slicer, "app", None), "temporaryPath", None)
    return path if path and os.path.isdir(path) else None


def _logProgress(stage: str, done: int, total: int) -> None:
    if done == 0 or done == total:
        logging.info(f"ZeroShotILD: {stage} {done}/{total}")
    # Keeps the application responsive during a blocking process() from the Python console
    # (there is no application under slicer-core, where the same logic runs in CI).
    app = getattr(slicer, "app", None)
    if app is not None:
        app.processEvents()


#
# ZeroShotILDTest
#


#: Set (to anything) to run only the static part of the self-test, e.g. on a build machine.
SKIP_ANALYSIS_ENV = "ZEROSHOT_ILD_TEST_STATIC_ONLY"


class ZeroShotILDTest(ScriptedLoadableModuleTest):
    """
    Self-test run inside Slicer (`Slicer --testing`, ctest, or the Reload & Test button).

    The static part always runs: the module, its parameter node and the settings mapping, with no
    torch and no network. The analysis part loads the "CTChest" sample, runs the logic with the
    tiny random model and checks the output nodes; like SlicerTotalSegmentator's test, it is skipped
    (never installs torch, never downloads data) when the Python packages are not installed yet,
    on CI (``CI`` set) or when ``ZEROSHOT_ILD_TEST_STATIC_ONLY`` is set.
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_ZeroShotILD_static()
        reason = self.analysisSkipReason()
        if reason:
            self.delayDisplay(f"Analysis test skipped: {reason}")
            return
        self.setUp()
        self.test_ZeroShotILD_CTChest()

    @staticmethod
    def analysisSkipReason() -> str:
        """Why the analysis part must not run here ("" when it may)."""
        if os.environ.get(SKIP_ANALYSIS_ENV):
            return f"{SKIP_ANALYSIS_ENV} is set"
        if os.environ.get("CI"):
            return "running on CI (CI is set): no package installs or sample downloads"
        from ZeroShotILDMRML import dependencies

        missing = dependencies.missing_requirements(catalog.requirements())
        if not dependencies.torch_installed() or missing:
            return "the Python packages are not installed (press Apply once in the module to install them)"
        return ""

    def test_ZeroShotILD_static(self):
        import numpy as np

        from ZeroShotILDLib import phantom_signature
        from ZeroShotILDLib.settings import AnalysisSettings

        from ZeroShotILDMRML import mrml_results

        self.delayDisplay("Parameter node and settings (no torch, no data)")
        logic = ZeroShotILDLogic()
        parameterNode = logic.getParameterNode()
        self.assertEqual(parameterNode.heatmapRange, RELATIVE_RANGE)
        for model in ("tiny-random", "dapt:/runs/a/best.safetensors", "ensemble:/runs/a/ensemble.json"):
            settings = AnalysisSettings(model=model, prompts=["honeycombing", "emphysema"], patch_mm=24.0).validate()
            logic.settingsToParameterNode(settings)
            self.assertIn(parameterNode.model, MODEL_CHOICES)
            self.assertEqual(logic.settingsFromParameterNode(), settings)
        logic.settingsToParameterNode(AnalysisSettings())
        self.assertEqual(mrml_results.legend_label_format(0.497, 0.512), "%.4f")
        real = np.full((4, 8, 32), -1000, dtype=np.int16)
        self.assertIn("phantom", catalog.input_warning("phantom-demo", real))
        self.assertEqual(catalog.input_warning("phantom-demo", phantom_signature.stamp(real.copy())), "")

    def test_ZeroShotILD_CTChest(self):
        import numpy as np
        import SampleData

        from ZeroShotILDMRML import mrml_results, volumes

        self.delayDisplay("Loading CTChest")
        inputVolume = SampleData.downloadSample("CTChest")
        self.assertIsNotNone(inputVolume)

        logic = ZeroShotILDLogic()
        # runTest only gets here with every package installed: this installs nothing.
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))

        self.delayDisplay("Analysing with the tiny random model")
        # Coarse settings keep the test to seconds on a CPU; the tiny model's scores are meaningless.
        nodes = logic.process(inputVolume, model="tiny-random", device="cpu", prompts=["honeycombing"],
                              patch_mm=40.0, slice_step_mm=20.0, top_k=5, montage_size=4)
        result = logic.session.result

        # Lungs: a non-empty segment on the input's grid, with a plausible volume for an adult chest.
        self.assertEqual(nodes.lungs.GetName(), "Lungs")
        self.assertEqual(nodes.lungs.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertGreater(result.lung_volume_ml, 1000.0)
        self.assertLess(result.lung_volume_ml, 10000.0)

        # Heatmap: same grid and geometry as the input, values are the patch probabilities.
        self.assertEqual(nodes.heatmap.GetImageData().GetDimensions(), inputVolume.GetImageData().GetDimensions())
        np.testing.assert_allclose(volumes.ijk_to_ras(nodes.heatmap), volumes.ijk_to_ras(inputVolume))
        heat = slicer.util.arrayFromVolume(nodes.heatmap)
        probs = result.patch_probabilities["honeycombing"]
        self.assertAlmostEqual(float(heat.max()), float(probs.max()), places=5)

        # Top patches: one ROI per rank at the engine's patch centre, named by rank and probability.
        self.assertEqual(len(nodes.patch_rois), 5)
        for rank, (roi, i) in enumerate(zip(nodes.patch_rois, result.ranked), start=1):
            centre = [0.0, 0.0, 0.0]
            roi.GetCenter(centre)
            np.testing.assert_allclose(centre, result.patches.center_ras_mm[i], atol=1e-3)
            self.assertTrue(roi.GetName().startswith(f"#{rank} "))

        # Table: finding and subtype probabilities as the engine computed them.
        table = nodes.probabilities
        self.assertEqual(table.GetNumberOfRows(), 1 + len(result.subtype_probabilities))
        self.assertAlmostEqual(float(table.GetTable().GetValueByName(0, "Probability").ToDouble()),
                               result.finding_probabilities["honeycombing"], places=6)
        self.assertEqual(nodes.montage.GetImageData().GetDimensions()[:2], result.montage.shape[::-1])
        self.assertEqual(mrml_results.find_result_nodes(inputVolume).heatmap, nodes.heatmap)

        self.delayDisplay("Re-prompting")
        encoded = logic.session.analyzer.encoder.images_encoded
        nodes = logic.reprompt(["reticulation"], exact=False)  # the preview: no patch encoded again
        # Only the new montage went through the image encoder (exact=True would also re-score in fast mode).
        self.assertEqual(logic.session.analyzer.encoder.images_encoded, encoded + 1)
        self.assertIn("reticulation", nodes.heatmap.GetName())
        self.assertEqual(len(nodes.patch_rois), 5)

        self.delayDisplay("Parameter node")
        parameterNode = logic.getParameterNode()
        parameterNode.inputVolume = inputVolume
        logic.settingsToParameterNode(logic.session.settings)
        self.assertEqual(parameterNode.prompts, "reticulation")
        self.assertEqual(parameterNode.patchMm, 40.0)
        self.assertEqual(logic.settingsFromParameterNode(), logic.session.settings)
        self.assertTrue(logic.canReprompt(inputVolume, logic.settingsFromParameterNode()))

        self.delayDisplay("Cancelling a run in the worker process")
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()
        try:
            job = logic.startProcess(inputVolume, prompts=["emphysema"], patch_mm=30.0)
            job.cancel()
            self.assertTrue(job.wait(timeout=300))
            with self.assertRaises(Cancelled):
                logic.finishProcess(job)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
            self.assertIn("reticulation", logic.resultNodes().heatmap.GetName())  # the kept result is untouched

            self.delayDisplay("Analysing and re-prompting in the worker process (the panel's path)")
            job = logic.startProcess(inputVolume, model="tiny-random", device="cpu", prompts=["emphysema"],
                                     patch_mm=40.0, slice_step_mm=20.0, top_k=5, montage_size=4)
            self.assertTrue(job.wait(timeout=600))
            nodes = logic.finishProcess(job)
            self.assertIn("emphysema", nodes.heatmap.GetName())
            self.assertIsNone(logic.session.scan)  # the voxels were not copied in Slicer's process
            nodes = logic.reprompt(["honeycombing"])
            self.assertIn("honeycombing", nodes.heatmap.GetName())

            self.delayDisplay("Pattern segmentation, extent table and report")
            result = logic.session.result
            self.assertEqual(nodes.patterns.GetSegmentation().GetNumberOfSegments(), len(result.patterns.names))
            self.assertEqual(nodes.extent_series.GetYColumnName(), "honeycombing")
            report = logic.saveReport(os.path.join(slicer.app.temporaryPath, "ZeroShotILD-test-report.html"))
            self.assertIn("Extent by zone", Path(report).read_text(encoding="utf-8"))
        finally:
            logic.shutdownWorker()

        self.delayDisplay("Test passed")
