"""CMBDetect: cerebral microbleed detection and review in 3D Slicer.

Module / Widget / Logic / Test, following Slicer's scripted-module conventions. The Widget only binds the
.ui to the Logic; the Logic is usable from the Python console (``slicer.util.getModuleLogic("CMBDetect")``)
and delegates everything that touches the scene to ``CMBDetectLib.mrml`` (tested headless with slicer-core).
Inference runs in a background ``PythonSlicer`` process (``cmbdetect detect --progress json``) polled by a
QTimer, so the GUI never freezes and Cancel leaves the scene exactly as it was.
"""

import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODALITIES = ("swi", "t2s", "qsm")          # order of modalityComboBox items
DEVICES = ("auto", "cuda", "cpu")           # order of deviceComboBox items (auto / GPU / CPU)
SETTINGS_DEVICE = "CMBDetect/Device"
SETTINGS_REVIEW_DIR = "CMBDetect/ReviewDirectory"
ENGINE_REQUIREMENTS = ("monai>=1.3", "scikit-image>=0.21")   # torch comes from the PyTorch extension


#
# CMBDetect
#


class CMBDetect(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CMB Detect")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["CMBDetect developers"]
        self.parent.helpText = _(
            "Detects cerebral microbleeds on SWI, T2*-GRE and QSM with a two-stage deep-learning method "
            "(candidate detection, then candidate discrimination), and lets you review every candidate: "
            "A = accept, R = reject, N / Right = next, P / Left = previous, M = add a missed microbleed. "
            "Thresholds update the result instantly without re-running the networks.")
        self.parent.acknowledgementText = _(
            "Method: Sundaresan et al., automated detection of cerebral microbleeds on MR images using "
            "knowledge distillation.")
        # The one-click demo case appears in the Sample Data module once the application has started.
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: generated locally (CMBDetectLib.sample_data), verified by sha256 on every re-use
#


def registerSampleData() -> None:
    """Register "CMBDetect synthetic SWI" with the SampleData module (generated, not downloaded)."""
    import SampleData

    moduleDirectory = os.path.dirname(os.path.abspath(__file__))
    if moduleDirectory not in sys.path:   # the engine package ships next to this file
        sys.path.insert(0, moduleDirectory)
    from CMBDetectLib.sample_data import SAMPLE_TITLE

    iconPath = os.path.join(moduleDirectory, "Resources", "Icons", "CMBDetect.png")
    # No URL: the customDownloader generates the case (seeded) into Slicer's cache folder, or re-uses the
    # cached file after checking its sha256 against the record written with it.
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="CMBDetect", sampleName=SAMPLE_TITLE, uris=[], fileNames=[], nodeNames=[],
        thumbnailFileName=iconPath, customDownloader=loadSyntheticSample)


def loadSyntheticSample(*source):
    """Generate (or re-use, sha256-verified) the synthetic SWI case and load it; returns the volume node."""
    from CMBDetectLib.sample_data import SAMPLE_NAME, get_sample

    with slicer.util.tryWithErrorDisplay(_("Failed to generate the CMBDetect sample."), waitCursor=True):
        slicer.util.showStatusMessage(_("Generating the synthetic SWI sample (about 10 s the first time)..."))
        slicer.app.processEvents()
        sample = get_sample(os.path.join(slicer.app.cachePath, "CMBDetect"))
        node = slicer.util.loadVolume(str(sample.image), {"name": SAMPLE_NAME})
        node.SetAttribute("CMBDetect.sampleSha256", sample.sha256)
        node.SetAttribute("CMBDetect.groundTruth", str(sample.truth))
        slicer.util.showStatusMessage(_("Loaded the synthetic SWI sample with {n} microbleeds.").format(
            n=sample.n_cmbs), 5000)
        return node
    return None


#
# Parameter node
#


@parameterNodeWrapper
class CMBDetectParameterNode:
    """User choices of this scene (saved with the scene); machine preferences live in QSettings."""

    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: vtkMRMLScalarVolumeNode
    modality: str = "swi"
    thDet: Annotated[float, WithinRange(0, 1)] = 0.5
    thDisc: Annotated[float, WithinRange(0, 1)] = 0.5
    minVolumeMm3: Annotated[float, Minimum(0)] = 2.5
    maxEllipticity: Annotated[float, WithinRange(0, 1)] = 0.2
    minEdgeDistanceMm: Annotated[float, Minimum(0)] = 4.0
    # The model whose recommended thresholds were last put into the fields above ("" = none yet).
    thresholdsFromModel: str = ""
    segmentation: vtkMRMLSegmentationNode
    candidateTable: vtkMRMLTableNode


#
# Widget
#


class CMBDetectWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shortcuts = []
        self._placeNode = None
        self._updatingTable = False
        self._appliedThresholds = None

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMBDetect.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CMBDetectLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.cpuNoteLabel.setVisible(False)
        self.ui.candidateTable.horizontalHeader().setStretchLastSection(True)
        self.ui.candidateTable.verticalHeader().setVisible(False)
        self.ui.progressBar.setVisible(False)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.modalityComboBox.connect("currentIndexChanged(int)", self.onModalityChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modelDefaultsButton.connect("clicked(bool)", self.onModelDefaults)
        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.acceptButton.connect("clicked(bool)", self.onAccept)
        self.ui.rejectButton.connect("clicked(bool)", self.onReject)
        self.ui.nextButton.connect("clicked(bool)", self.onNext)
        self.ui.previousButton.connect("clicked(bool)", self.onPrevious)
        self.ui.addMissedButton.connect("toggled(bool)", self.onAddMissedToggled)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.saveReviewButton.connect("clicked(bool)", self.onSaveReview)
        self.ui.loadReviewButton.connect("clicked(bool)", self.onLoadReview)
        self.ui.candidateTable.connect("itemSelectionChanged()", self.onTableSelectionChanged)
        self.ui.locateButton.connect("clicked(bool)", self.onLocate)
        self.ui.exportReportButton.connect("clicked(bool)", self.onExportReport)
        self.ui.showAtlasOutlineCheckBox.connect("toggled(bool)", self.onShowAtlasOutline)
        self.ui.regionsTable.horizontalHeader().setStretchLastSection(True)
        self.ui.regionsTable.verticalHeader().setVisible(False)

        # Detection progress is polled, never waited for: the GUI thread stays free.
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(200)
        self.pollTimer.connect("timeout()", self.onPollDetection)
        # Slider drags fire many signals; re-threshold at most once per 30 ms (well under the 100 ms budget).
        self.thresholdTimer = qt.QTimer()
        self.thresholdTimer.setSingleShot(True)
        self.thresholdTimer.setInterval(30)
        self.thresholdTimer.connect("timeout()", self.applyThresholds)
        # A Th_Cdet change shows new candidates at once with a provisional score (the nesting component's at a
        # threshold already seen, else one student view); their real (test-time-flipped) score is then computed
        # a few candidates per event-loop turn.
        self.refineTimer = qt.QTimer()
        self.refineTimer.setInterval(0)
        self.refineTimer.connect("timeout()", self.onRefineScores)

        self.populateModels()
        settings = qt.QSettings()
        device = str(settings.value(SETTINGS_DEVICE, "auto"))
        self.ui.deviceComboBox.setCurrentIndex(DEVICES.index(device) if device in DEVICES else 0)
        self.createShortcuts()
        self.initializeParameterNode()
        self.updateGUI()

    def createShortcuts(self) -> None:
        """A / R / N / P / M (+ arrows) while this module is shown; released in exit() for other modules."""
        bindings = (("A", self.onAccept), ("R", self.onReject), ("N", self.onNext), ("Right", self.onNext),
                    ("P", self.onPrevious), ("Left", self.onPrevious), ("M", self.onAddMissedShortcut))
        for key, callback in bindings:
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.setContext(qt.Qt.ApplicationShortcut)
            shortcut.setEnabled(False)
            shortcut.connect("activated()", callback)
            self._shortcuts.append(shortcut)

    def populateModels(self) -> None:
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for label, value in self.logic.availableModels():
            self.ui.modelComboBox.addItem(label, value)
        # The registry (shared with CMBDetectTraining and `cmbdetect models select`) knows the chosen version.
        preferred = self.logic.selectedModelPath()
        index = self.ui.modelComboBox.findData(preferred) if preferred else -1
        self.ui.modelComboBox.setCurrentIndex(max(index, 0))
        self.ui.modelComboBox.blockSignals(False)

    def cleanup(self) -> None:
        self.logic.cancelDetection()
        self.pollTimer.stop()
        self.refineTimer.stop()
        self.removeObservers()
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        self._shortcuts = []
        self.stopPlacing()

    def enter(self) -> None:
        self.initializeParameterNode()
        for shortcut in self._shortcuts:
            shortcut.setEnabled(True)

    def exit(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)
        self.stopPlacing()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.onParameterNodeModified)

    # ------------------------------------------------------------------ scene and parameter node
    def onSceneStartClose(self, caller, event) -> None:
        # Closing the scene during detection: stop the process; nothing will be added to the closed scene.
        if self.logic.isDetecting():
            self.logic.cancelDetection()
            self.pollTimer.stop()
            self.setStatus(_("Detection cancelled: the scene was closed."))
        self.stopPlacing()
        self.logic.reviewSession = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.updateGUI()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolume
        # A new scene starts from the chosen model's calibrated operating point, not the class defaults.
        model = self.ui.modelComboBox.currentData
        if model and not self._parameterNode.thresholdsFromModel and self.logic.reviewSession is None:
            with slicer.util.tryWithErrorDisplay(_("Cannot read the model's recommended thresholds.")):
                self.logic.applyModelDefaults(model)

    def setParameterNode(self, inputParameterNode: Optional[CMBDetectParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Sliders and spin boxes are bound through their SlicerParameterName property in the .ui.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.updateGUI()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        # Thresholds may be changed by the sliders or from the Python console: both re-threshold.
        if self.logic.reviewSession is not None and self.currentThresholds() != self._appliedThresholds:
            self.thresholdTimer.start()
        self.updateGUI()

    def currentThresholds(self):
        node = self._parameterNode
        if node is None:
            return None
        return (node.thDet, node.thDisc, node.minVolumeMm3, node.maxEllipticity, node.minEdgeDistanceMm)

    # ------------------------------------------------------------------ GUI state
    def updateGUI(self) -> None:
        node = self._parameterNode
        detecting = self.logic.isDetecting() if self.logic else False
        hasInput = bool(node and node.inputVolume)
        self.ui.detectButton.enabled = hasInput and not detecting and self.ui.modelComboBox.count > 0
        self.ui.detectButton.toolTip = (_("Find microbleed candidates in the selected volume.") if hasInput
                                        else _("Select an input volume first."))
        if self.ui.modelComboBox.count == 0:
            self.ui.detectButton.toolTip = _("No model is installed: add one with CMBDetectTraining.")
        self.ui.cancelButton.enabled = detecting
        if node is not None:
            index = MODALITIES.index(node.modality) if node.modality in MODALITIES else 0
            if self.ui.modalityComboBox.currentIndex != index:
                self.ui.modalityComboBox.blockSignals(True)
                self.ui.modalityComboBox.setCurrentIndex(index)
                self.ui.modalityComboBox.blockSignals(False)
        reviewing = self.logic is not None and self.logic.reviewSession is not None
        for widget in (self.ui.acceptButton, self.ui.rejectButton, self.ui.nextButton, self.ui.previousButton,
                       self.ui.addMissedButton, self.ui.segmentEditorButton, self.ui.saveReviewButton):
            widget.enabled = reviewing and not detecting
        self.ui.loadReviewButton.enabled = hasInput and not detecting
        self.ui.locateButton.enabled = reviewing and not detecting
        located = reviewing and self.logic.reviewSession.anatomy is not None
        self.ui.exportReportButton.enabled = located and not detecting
        self.ui.showAtlasOutlineCheckBox.enabled = located
        self.ui.inputsCollapsibleButton.enabled = not detecting
        self.ui.modelCollapsibleButton.enabled = not detecting
        self.updateCpuNote()

    def updateCpuNote(self, deviceUsed: Optional[str] = None) -> None:
        choice = DEVICES[max(self.ui.deviceComboBox.currentIndex, 0)]
        onCpu = choice == "cpu" or (deviceUsed or "").lower().startswith("cpu")
        self.ui.cpuNoteLabel.setVisible(onCpu)

    def setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text, 3000)

    def refreshReview(self) -> None:
        """Table + counts from the logic (the table widget only mirrors the review)."""
        session = self.logic.reviewSession
        table = self.ui.candidateTable
        self._updatingTable = True
        try:
            if session is None:
                table.setRowCount(0)
                self.ui.countsLabel.text = _("No detection yet.")
                self.refreshSummary()
                return
            rows = session.table_rows()
            table.setRowCount(len(rows))
            for row, values in enumerate(rows):
                cells = (str(values["id"]), f"{values['volume_mm3']:.1f}",
                         _formatProbability(values["p_det"]), _formatProbability(values["p_disc"]),
                         values["status"], values.get("region") or "")
                for column, text in enumerate(cells):
                    item = table.item(row, column)
                    if item is None:
                        item = qt.QTableWidgetItem()
                        table.setItem(row, column, item)
                    item.setText(text)
                if values["id"] == session.current_id:
                    table.selectRow(row)
            if session.current_id is None:
                table.clearSelection()
            counts = self.logic.counts()
            self.ui.countsLabel.text = _("{cmbs} CMBs: {accepted} accepted, {added} added, "
                                         "{rejected} rejected, {pending} pending").format(**counts)
        finally:
            self._updatingTable = False

    def refreshSummary(self) -> None:
        """Summary text and regions table of the last "Locate and summarise" (empty before)."""
        session = self.logic.reviewSession if self.logic else None
        located = session.anatomy if session is not None else None
        table = self.ui.regionsTable
        if located is None:
            self.ui.summaryTextEdit.setPlainText("")
            table.setRowCount(0)
            return
        self.ui.summaryTextEdit.setPlainText(located.text())
        rows = located.region_counts()
        table.setRowCount(len(rows))
        for row, values in enumerate(rows):
            for column, value in enumerate(values):
                table.setItem(row, column, qt.QTableWidgetItem(str(value)))

    # ------------------------------------------------------------------ inputs
    def onInputVolumeChanged(self, node) -> None:
        if node is not None and self._parameterNode is not None:
            self.logic.setModality(self.logic.guessModality(node))

    def onModalityChanged(self, index: int) -> None:
        if self._parameterNode is not None and 0 <= index < len(MODALITIES):
            self.logic.setModality(MODALITIES[index])

    def onDeviceChanged(self, index: int) -> None:
        qt.QSettings().setValue(SETTINGS_DEVICE, DEVICES[max(index, 0)])
        self.updateCpuNote()

    def onModelChanged(self, index: int) -> None:
        path = self.ui.modelComboBox.itemData(index)
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("This model version cannot be used."), waitCursor=True):
            try:
                self.logic.selectModel(path)
            except Exception:
                self.populateModels()  # back to the version that is still selected
                raise
            self.logic.applyModelDefaults(path)

    def onModelDefaults(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot read the model's recommended thresholds.")):
            self.logic.applyModelDefaults(self.ui.modelComboBox.currentData or None)

    # ------------------------------------------------------------------ detection
    def onDetectButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the detection."), waitCursor=True):
            node = self._parameterNode
            if self.logic.reviewSession is not None and not slicer.util.confirmOkCancelDisplay(
                    _("Start a new detection? The current review stays in the scene; save it first if "
                      "you want to resume it later.")):
                return
            self.logic.ensureDependencies()
            self.logic.startDetection(
                node.inputVolume, node.modality, node.brainMask,
                model=self.ui.modelComboBox.currentData, device=DEVICES[self.ui.deviceComboBox.currentIndex],
                parameters=self.logic.parametersFromNode(node))
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.value = 0
            self.setStatus(_("Starting detection..."))
            self.pollTimer.start()
        self.updateGUI()

    def onPollDetection(self) -> None:
        try:
            runner = self.logic.pollDetection()
        except Exception as error:   # an unexpected failure must not leave the timer firing forever
            self.pollTimer.stop()
            slicer.util.errorDisplay(_("Detection failed: {error}").format(error=error))
            self.updateGUI()
            return
        if runner is None:
            self.pollTimer.stop()
            return
        self.ui.progressBar.value = int(1000 * runner.fraction)
        if runner.message:
            self.ui.statusLabel.text = runner.message
            if " cpu" in runner.message.lower():
                self.updateCpuNote("cpu")
        if runner.is_running:
            return
        self.pollTimer.stop()
        self.ui.progressBar.setVisible(False)
        if runner.state == "cancelled":
            self.logic.discardJob()
            self.setStatus(_("Detection cancelled; the scene was not changed."))
        elif runner.state == "failed":
            self.logic.discardJob()
            self.setStatus(_("Detection failed."))
            slicer.util.errorDisplay(_("Detection failed: {error}").format(error=runner.error_message))
        else:
            with slicer.util.tryWithErrorDisplay(_("Failed to show the detection result."), waitCursor=True):
                self.logic.finishDetection()
                self._appliedThresholds = self.currentThresholds()
                self.updateCpuNote((runner.result or {}).get("device"))
                self.setStatus(self.logic.lastSummary)
                self.logic.nextCandidate()
        self.refreshReview()
        self.updateGUI()

    def onCancelButton(self) -> None:
        self.logic.cancelDetection()
        self.onPollDetection()

    def applyThresholds(self) -> None:
        if self.logic.reviewSession is None or self._parameterNode is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to apply the thresholds.")):
            self._appliedThresholds = self.currentThresholds()
            self.logic.setParameters(self.logic.parametersFromNode(self._parameterNode), preview=True)
        self.refreshReview()
        if self.logic.reviewSession is not None and self.logic.reviewSession.provisional:
            self.refineTimer.start()

    def onRefineScores(self) -> None:
        session = self.logic.reviewSession
        if session is None or self.logic.isDetecting():
            self.refineTimer.stop()
            return
        if self.thresholdTimer.isActive():   # the slider is still moving: its next step restarts this
            return
        remaining = 0
        with slicer.util.tryWithErrorDisplay(_("Failed to score the new candidates.")):
            from CMBDetectLib.pipeline import REFINE_CHUNK

            remaining = self.logic.refineScores(REFINE_CHUNK)
        if remaining:
            self.ui.statusLabel.text = _("Scoring {count} new candidates...").format(count=remaining)
            return
        self.refineTimer.stop()
        self.ui.statusLabel.text = ""
        self.refreshReview()

    # ------------------------------------------------------------------ review
    def onTableSelectionChanged(self) -> None:
        if self._updatingTable or self.logic.reviewSession is None:
            return
        rows = self.ui.candidateTable.selectionModel().selectedRows()
        if rows:
            cmbId = int(self.ui.candidateTable.item(rows[0].row(), 0).text())
            with slicer.util.tryWithErrorDisplay(_("Cannot show this candidate.")):
                self.logic.selectCandidate(cmbId)

    def _decide(self, decision: str) -> None:
        if self.logic.reviewSession is None or self.logic.isDetecting():
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot record the decision.")):
            if self.logic.reviewSession.current_id is None:
                self.logic.nextCandidate()
                return self.refreshReview()
            self.logic.setDecision(None, decision)
            # Move on to the next undecided candidate: reviewing 30 candidates is 30 key presses.
            if self.logic.nextCandidate(pendingOnly=True) is None:
                self.setStatus(_("All candidates reviewed."))
        self.refreshReview()

    def onAccept(self) -> None:
        self._decide("accepted")

    def onReject(self) -> None:
        self._decide("rejected")

    def onNext(self) -> None:
        if self.logic.reviewSession is not None:
            self.logic.nextCandidate()
            self.refreshReview()

    def onPrevious(self) -> None:
        if self.logic.reviewSession is not None:
            self.logic.previousCandidate()
            self.refreshReview()

    def onAddMissedShortcut(self) -> None:
        if self.ui.addMissedButton.enabled:
            self.ui.addMissedButton.checked = not self.ui.addMissedButton.checked

    def onAddMissedToggled(self, checked: bool) -> None:
        if not checked:
            self.stopPlacing()
            return
        # A temporary, hidden point list in place mode: the click in a slice view gives the RAS position.
        self._placeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "CMBDetect click")
        self._placeNode.SetHideFromEditors(True)
        self._placeNode.SetSaveWithScene(False)
        self.addObserver(self._placeNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                         self.onPointPlaced)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selection.SetActivePlaceNodeID(self._placeNode.GetID())
        slicer.app.applicationLogic().GetInteractionNode().SetCurrentInteractionMode(
            slicer.vtkMRMLInteractionNode.Place)
        self.setStatus(_("Click the missed microbleed in a slice view."))

    def onPointPlaced(self, caller, event) -> None:
        if caller.GetNumberOfControlPoints() < 1:
            return
        position = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(0, position)
        # Leave the observer callback before changing the scene (markups is still handling the click).
        qt.QTimer.singleShot(0, lambda: self.addMissedAt(position))

    def addMissedAt(self, position) -> None:
        self.ui.addMissedButton.checked = False   # stops placing and removes the temporary node
        with slicer.util.tryWithErrorDisplay(_("Cannot add a microbleed here.")):
            entry = self.logic.addMissed(position)
            self.setStatus(_("Added CMB {id}.").format(id=entry.id))
        self.refreshReview()

    def stopPlacing(self) -> None:
        if self._placeNode is None:
            return
        self.removeObserver(self._placeNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                            self.onPointPlaced)
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        if interaction is not None:
            interaction.SetCurrentInteractionMode(slicer.vtkMRMLInteractionNode.ViewTransform)
        if self._placeNode.GetScene() is not None:
            slicer.mrmlScene.RemoveNode(self._placeNode)
        self._placeNode = None

    def onOpenSegmentEditor(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot open the Segment Editor.")):
            self.logic.openSegmentEditor()

    def onSaveReview(self) -> None:
        settings = qt.QSettings()
        directory = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Save review to folder"),
            str(settings.value(SETTINGS_REVIEW_DIR, "")))
        if not directory:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to save the review."), waitCursor=True):
            paths = self.logic.saveReview(directory)
            settings.setValue(SETTINGS_REVIEW_DIR, directory)
            self.setStatus(_("Review saved: {path}").format(path=paths["review"]))

    def onLoadReview(self) -> None:
        settings = qt.QSettings()
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Resume review"), str(settings.value(SETTINGS_REVIEW_DIR, "")),
            _("CMBDetect review (*.review.json)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to resume the review."), waitCursor=True):
            self.logic.loadReview(self._parameterNode.inputVolume, path)
            self._appliedThresholds = self.currentThresholds()
            self.setStatus(_("Review resumed from {path}").format(path=path))
        self.refreshReview()
        self.updateGUI()

    # ------------------------------------------------------------------ summary
    def onLocate(self) -> None:
        # Registration runs here on the main thread (5-10 s) with a wait cursor; the progress callback
        # repaints the status line between its stages. See CMBDetectLogic.locateAndSummarise for why.
        def progress(fraction, message):
            self.ui.statusLabel.text = message
            slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents)

        with slicer.util.tryWithErrorDisplay(_("Could not locate the microbleeds in the atlas."),
                                             waitCursor=True):
            located = self.logic.locateAndSummarise(showOutline=self.ui.showAtlasOutlineCheckBox.checked,
                                                    progress=progress)
            self.setStatus(_("{n} CMBs located (registration Dice {dice:.2f}).").format(
                n=located.summary.total, dice=located.registration.dice))
        self.refreshReview()
        self.refreshSummary()
        self.updateGUI()

    def onExportReport(self) -> None:
        settings = qt.QSettings()
        directory = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Export report to folder"),
            str(settings.value(SETTINGS_REVIEW_DIR, "")))
        if not directory:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to export the report."), waitCursor=True):
            paths = self.logic.exportReport(directory)
            self.setStatus(_("Report written: {path}").format(path=paths["report"]))
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(paths["report"])))

    def onShowAtlasOutline(self, checked: bool) -> None:
        if self.logic.reviewSession is not None:
            self.logic.setAtlasOutlineVisible(checked)


def _formatProbability(value) -> str:
    return "-" if value is None else f"{float(value):.3f}"


#
# Logic
#


class DetectionJob:
    """A running background detection: everything needed to finish it or clean it up."""

    def __init__(self, runner, workDir: str, volumeNodeId: str, modality: str, model, parameters):
        self.runner = runner
        self.workDir = workDir
        self.volumeNodeId = volumeNodeId
        self.modality = modality
        self.model = model
        self.parameters = parameters
        self.startTime = time.time()


class CMBDetectLogic(ScriptedLoadableModuleLogic):
    """Everything a user can do, callable from the Python console:

    >>> logic = slicer.util.getModuleLogic("CMBDetect")
    >>> logic.detect(volumeNode)            # blocking convenience; the GUI uses startDetection + polling
    >>> logic.setThresholds(thDisc=0.7)      # instant, from the cached networks' output
    >>> logic.accept(3); logic.reject(5); logic.addMissed([x, y, z])
    >>> logic.saveReview("/path/to/folder")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.reviewSession = None
        self.job: Optional[DetectionJob] = None
        self.lastSummary = ""
        self._ensureEngineOnPath()

    def getParameterNode(self):
        return CMBDetectParameterNode(super().getParameterNode())

    @staticmethod
    def moduleDirectory() -> str:
        return os.path.dirname(os.path.abspath(__file__))

    def _ensureEngineOnPath(self) -> None:
        import sys

        if self.moduleDirectory() not in sys.path:
            sys.path.insert(0, self.moduleDirectory())

    # ------------------------------------------------------------------ inputs and environment
    def guessModality(self, volumeNode) -> str:
        """``swi`` / ``t2s`` / ``qsm`` from the node name and series description (the user can override)."""
        from CMBDetectLib.modality import guess_modality
        from CMBDetectLib.mrml import geometry

        # The DICOM series description says more than a node name such as "5: Ax 3D".
        description = volumeNode.GetAttribute("DICOM.SeriesDescription") or ""
        storage = volumeNode.GetStorageNode()
        fileName = os.path.basename(storage.GetFileName() or "") if storage else ""
        name = " ".join(part for part in (description, volumeNode.GetName() or "", fileName) if part)
        try:
            array = geometry.array_from_node(volumeNode)
        except Exception:   # no voxels yet: the name alone decides
            array = None
        return guess_modality(name, array)[0]

    def availableModels(self) -> list:
        """(label, value) of bundled then user model versions (from the registry); value is the folder."""
        from CMBDetectLib.model_registry import list_versions

        models = []
        for version in list_versions():
            where = _("bundled") if version.source == "bundled" else _("user")
            label = f"{version.name}-{version.version} ({where})"
            if version.problem:
                label += " - " + _("unusable: {problem}").format(problem=version.problem)
            models.append((label, str(version.path)))
        return models

    def selectedModelPath(self) -> str:
        """Folder of the model version in use (the registry's selection, else the bundled default)."""
        from CMBDetectLib.errors import ModelError
        from CMBDetectLib.model_registry import active_model_path

        try:
            return str(active_model_path()[0])
        except ModelError:
            return ""

    def selectModel(self, path: str) -> None:
        """Use this model version from now on (its checksums are verified; a corrupted one is refused)."""
        from CMBDetectLib.model_registry import select_model

        select_model(path)

    def applyModelDefaults(self, model: Optional[str] = None):
        """Put the model's recommended operating point (``model.json``: calibrated Th_Cdet, Th_Cdisc and
        post-processing limits) into the parameter node; an open review re-thresholds through the node."""
        from CMBDetectLib.model_package import ModelPackage
        from CMBDetectLib.pipeline import DetectionParameters

        path = model or self.selectedModelPath() or "default"
        node = self.getParameterNode()
        parameters = DetectionParameters.for_model(ModelPackage.load(path), node.modality)
        self.parametersToNode(parameters, node)
        node.thresholdsFromModel = str(path)
        return parameters

    def setModality(self, modality: str) -> None:
        """Change the modality; Th_Cdisc follows the model's value for it while the user has not changed it
        (``DetectionParameters.following_modality``)."""
        from CMBDetectLib.model_package import ModelPackage

        node = self.getParameterNode()
        old = node.modality
        if modality == old:
            return
        node.modality = modality
        if node.thresholdsFromModel and self.reviewSession is None:
            try:
                model = ModelPackage.load(node.thresholdsFromModel)
            except Exception:  # the model is gone: keep the thresholds as they are
                return
            self.parametersToNode(self.parametersFromNode(node).following_modality(model, old, modality), node)

    def ensureDependencies(self) -> None:
        """Install what the engine needs, only when the user asks for a detection (never at import)."""
        try:
            import torch  # noqa: F401
        except ImportError:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("CMBDetect needs PyTorch: install the 'PyTorch' extension from the "
                                     "Extensions Manager, restart Slicer and try again.")) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if torchLogic.installTorch(askConfirmation=True) is None:
                    raise RuntimeError(_("PyTorch is required for detection and was not "
                                         "installed.")) from None
        missing = []
        for module, requirement in (("monai", ENGINE_REQUIREMENTS[0]), ("skimage", ENGINE_REQUIREMENTS[1])):
            try:
                __import__(module)
            except ImportError:
                missing.append(requirement)
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                    _("CMBDetect needs these Python packages: {packages}. Install them now?").format(
                        packages=", ".join(missing))):
                raise RuntimeError(_("Required Python packages are not installed."))
            with slicer.util.WaitCursor():
                slicer.util.pip_install(missing)

    @staticmethod
    def pythonExecutable() -> str:
        """``PythonSlicer`` next to the Slicer executable (the background process shares Slicer's Python)."""
        found = shutil.which("PythonSlicer")
        if found:
            return found
        directory = slicer.app.applicationDirPath()
        for name in ("PythonSlicer.exe", "PythonSlicer", "../bin/PythonSlicer"):
            candidate = os.path.join(directory, name)
            if os.path.isfile(candidate):
                return candidate
        raise RuntimeError(_("PythonSlicer was not found next to {directory}").format(directory=directory))

    @staticmethod
    def parametersToNode(parameters, node) -> None:
        node.thDet, node.thDisc = parameters.th_det, parameters.th_disc
        node.minVolumeMm3, node.maxEllipticity = parameters.min_volume_mm3, parameters.max_ellipticity
        node.minEdgeDistanceMm = parameters.min_edge_distance_mm

    def parametersFromNode(self, node):
        from CMBDetectLib.pipeline import DetectionParameters

        return DetectionParameters.from_dict({
            "th_det": node.thDet, "th_disc": node.thDisc, "min_volume_mm3": node.minVolumeMm3,
            "max_ellipticity": node.maxEllipticity, "min_edge_distance_mm": node.minEdgeDistanceMm})

    # ------------------------------------------------------------------ detection
    def isDetecting(self) -> bool:
        return self.job is not None and self.job.runner.is_running

    def startDetection(self, volumeNode, modality: str, maskNode=None, model: Optional[str] = None,
                       device: str = "auto", parameters=None):
        """Write the inputs to a private folder and start ``cmbdetect detect`` in the background."""
        from CMBDetectLib.mrml import geometry
        from CMBDetectLib.runner import ProcessRunner, detect_command, engine_environment
        from CMBDetectLib.validation import normalise_modality, validate_image, validate_mask
        from CMBDetectLib.volume import write_volume_atomic

        if self.isDetecting():
            raise RuntimeError(_("A detection is already running; cancel it first."))
        volume = geometry.volume_from_node(volumeNode)   # labelmap, 2D, empty... -> one clear message
        validate_image(volume)
        modality = normalise_modality(modality)
        if model is not None and not Path(model).exists():
            raise RuntimeError(_("The model '{model}' is missing; choose another model.").format(model=model))
        workDir = tempfile.mkdtemp(prefix="CMBDetect-")
        try:
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", volumeNode.GetName() or "volume").strip("._") or "volume"
            imagePath = write_volume_atomic(volume, os.path.join(workDir, f"{stem}.nii.gz"))
            maskPath = None
            if maskNode is not None:
                mask = geometry.volume_from_node(maskNode) if not maskNode.IsA("vtkMRMLLabelMapVolumeNode") \
                    else _labelmapVolume(maskNode)
                validate_mask(mask, volume)
                maskPath = write_volume_atomic(mask, os.path.join(workDir, f"{stem}_mask.nii.gz"))
            command = detect_command(self.pythonExecutable(), imagePath, os.path.join(workDir, "out"),
                                     modality=modality, mask=maskPath, model=model, device=device,
                                     th_det=parameters.th_det if parameters else None,
                                     th_disc=parameters.th_disc if parameters else None, save_prob=True)
            runner = ProcessRunner(command, env=engine_environment(self.moduleDirectory())).start()
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        if runner.state == "failed":
            shutil.rmtree(workDir, ignore_errors=True)
            raise RuntimeError(runner.error_message)
        self.job = DetectionJob(runner, workDir, volumeNode.GetID(), modality, model, parameters)
        logging.info("CMBDetect: started %s", " ".join(command))
        return runner

    def pollDetection(self):
        """New progress of the running detection (called by the Widget's QTimer); ``None`` if none."""
        if self.job is None:
            return None
        self.job.runner.poll()
        return self.job.runner

    def discardJob(self) -> None:
        """Forget a cancelled or failed detection and delete its private folder."""
        if self.job is not None and not self.job.runner.is_running:
            shutil.rmtree(self.job.workDir, ignore_errors=True)
            self.job = None

    def cancelDetection(self) -> None:
        """Kill the background process tree; the scene is untouched (nothing is added before the end)."""
        if self.job is None:
            return
        self.job.runner.cancel()
        if not self.job.runner.is_running:
            shutil.rmtree(self.job.workDir, ignore_errors=True)

    def finishDetection(self):
        """Load the finished detection into the scene (segmentation + table), in one step."""
        from CMBDetectLib.pipeline import DetectionSession

        job, self.job = self.job, None
        if job is None or job.runner.state != "finished":
            raise RuntimeError(_("There is no finished detection to show."))
        try:
            volumeNode = slicer.mrmlScene.GetNodeByID(job.volumeNodeId)
            if volumeNode is None:
                raise RuntimeError(_("The input volume was removed from the scene during detection; the "
                                     "result was discarded."))
            outputs = (job.runner.result or {}).get("outputs", {})
            sessionFile = outputs.get("session")
            if not sessionFile or not os.path.isfile(sessionFile):
                raise RuntimeError(_("The detection finished without its session file."))
            keptSession = os.path.join(tempfile.mkdtemp(prefix="CMBDetect-session-"), Path(sessionFile).name)
            shutil.move(sessionFile, keptSession)
            detectionSession = DetectionSession.load(keptSession, model=self._loadModelQuietly(job.model))
            result = detectionSession.refilter(job.parameters) if job.parameters else \
                detectionSession.refilter(self.parametersFromNode(self.getParameterNode()))
            self.showResult(volumeNode, result, job.modality, detectionSession, keptSession)
            self.lastSummary = _("{final} CMBs from {candidates} candidates in {seconds:.0f} s on "
                                 "{device}.").format(
                final=len(result.final_candidates), candidates=len(result.candidates),
                seconds=time.time() - job.startTime, device=job.runner.result.get("device", "?"))
            return self.reviewSession
        finally:
            shutil.rmtree(job.workDir, ignore_errors=True)

    @staticmethod
    def _loadModelQuietly(model):
        """The model lets a lower Th_Cdet score new candidates; without torch the review still works."""
        try:
            from CMBDetectLib.model_package import ModelPackage

            return ModelPackage.load(model or "default")
        except Exception as error:
            logging.warning("CMBDetect: model not loaded in the Slicer process (%s)", error)
            return None

    def showResult(self, volumeNode, result, modality: str, detectionSession=None, sessionFile=None):
        """Result -> segmentation + table referencing ``volumeNode`` (also usable from the console)."""
        from CMBDetectLib.mrml.review_session import ReviewSession

        session = ReviewSession.create(volumeNode, result, modality, detection_session=detectionSession)
        session.session_file = Path(sessionFile) if sessionFile else None
        self._useSession(session)
        return session

    def _useSession(self, session) -> None:
        self.reviewSession = session
        parameterNode = self.getParameterNode()
        parameterNode.segmentation = session.segmentation_node
        parameterNode.candidateTable = session.table_node
        session.segmentation_node.GetDisplayNode().SetVisibility(True)
        slicer.util.setSliceViewerLayers(background=session.volume_node)

    def detect(self, volumeNode, modality: Optional[str] = None, maskNode=None, model=None, device="auto",
               parameters=None, timeout: float = 3600):
        """Blocking detection for scripts and the self-test (processes Qt events while waiting)."""
        modality = modality or self.guessModality(volumeNode)
        self.startDetection(volumeNode, modality, maskNode, model, device, parameters)
        runner = self.job.runner
        deadline = time.time() + timeout
        while runner.is_running and time.time() < deadline:
            runner.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        if runner.is_running:
            self.cancelDetection()
            raise RuntimeError(_("Detection timed out."))
        if runner.state != "finished":
            self.discardJob()
            raise RuntimeError(_("Detection failed: {error}").format(error=runner.error_message))
        return self.finishDetection()

    # ------------------------------------------------------------------ review (delegates to ReviewSession)
    def _session(self):
        if self.reviewSession is None:
            raise RuntimeError(_("No detection result to review: run Detect or resume a review first."))
        return self.reviewSession

    def setParameters(self, parameters, preview: bool = False):
        """Re-threshold the review; ``preview``: new candidates get a quick score, see refineScores."""
        return self._session().set_parameters(parameters, preview=preview)

    def refineScores(self, limit: int) -> int:
        """Real student scores for up to ``limit`` previewed candidates; 0 when all are done."""
        return self._session().refine_scores(limit)

    def setThresholds(self, thDet=None, thDisc=None, minVolumeMm3=None, maxEllipticity=None,
                      minEdgeDistanceMm=None):
        """Change thresholds (parameter node and overlay); ``None`` keeps a value."""
        node = self.getParameterNode()
        for name, value in (("thDet", thDet), ("thDisc", thDisc), ("minVolumeMm3", minVolumeMm3),
                            ("maxEllipticity", maxEllipticity), ("minEdgeDistanceMm", minEdgeDistanceMm)):
            if value is not None:
                setattr(node, name, float(value))
        return self.setParameters(self.parametersFromNode(node))

    def setDecision(self, cmbId, decision: str):
        session = self._session()
        return session.set_decision(cmbId if cmbId is not None else session._id_or_current(None), decision)

    def accept(self, cmbId=None):
        return self._session().accept(cmbId)

    def reject(self, cmbId=None):
        return self._session().reject(cmbId)

    def selectCandidate(self, cmbId):
        return self._session().select(cmbId)

    def nextCandidate(self, pendingOnly: bool = False):
        return self._session().next(pending_only=pendingOnly)

    def previousCandidate(self, pendingOnly: bool = False):
        return self._session().previous(pending_only=pendingOnly)

    def addMissed(self, positionRas):
        return self._session().add_missed(positionRas)

    def counts(self) -> dict:
        return self._session().counts()

    def openSegmentEditor(self) -> None:
        session = self._session()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(session.segmentation_node)
        editor.setSourceVolumeNode(session.volume_node)
        if session.current_id is not None:
            editor.setCurrentSegmentID(session.review.get(session.current_id).segment_id)

    def saveReview(self, directory, case: Optional[str] = None) -> dict:
        return self._session().save(directory, case=case)

    def loadReview(self, volumeNode, reviewPath):
        """Resume a saved review on ``volumeNode`` (its thresholds stay live if the session was saved)."""
        from CMBDetectLib.mrml.review_session import ReviewSession, session_file_of
        from CMBDetectLib.pipeline import DetectionParameters, DetectionSession

        detectionSession = None
        sessionFile = session_file_of(reviewPath)
        if sessionFile is not None:
            detectionSession = DetectionSession.load(sessionFile, model=self._loadModelQuietly(None))
        session = ReviewSession.load(volumeNode, reviewPath, detection_session=detectionSession)
        session.session_file = sessionFile
        parameters = DetectionParameters.from_dict(session.review.parameters)
        node = self.getParameterNode()
        node.inputVolume = volumeNode
        node.modality = session.review.modality
        self.parametersToNode(parameters, node)
        self._useSession(session)
        return session

    # ------------------------------------------------------------------ anatomy and clinical summary
    def locateAndSummarise(self, thDefinite: float = 0.8, showOutline: bool = False, reregister: bool = False,
                           progress=None):
        """Atlas region of every CMB (segment tags + table), clinical summary, atlas outline overlay.

        Runs on the calling thread: the atlas registration takes 5-10 s once per case (later calls re-use it
        unless ``reregister``). It is not sent to a background process like detection because its result
        (the transform and the atlas, in memory) is needed in this process anyway to name regions and to
        draw the outline, and because it is short and user-initiated. Raises ``InputError`` (scene
        unchanged) for an image the atlas cannot be registered to.
        """
        from CMBDetectLib.mrml import anatomy

        session = self._session()
        previous = session.anatomy
        registration = previous.registration if previous is not None and not reregister else None
        maskNode = self.getParameterNode().brainMask
        mask = None
        if maskNode is not None and registration is None:
            from CMBDetectLib.mrml import geometry

            mask = _labelmapVolume(maskNode) if maskNode.IsA("vtkMRMLLabelMapVolumeNode") else \
                geometry.volume_from_node(maskNode)
        return anatomy.locate_and_summarise(session, mask=mask, registration=registration,
                                            th_definite=thDefinite, show_outline=showOutline,
                                            progress=progress)

    def exportReport(self, directory, stem: Optional[str] = None) -> dict:
        """Summary CSV, CMB table CSV and the one-page HTML report of the last locateAndSummarise."""
        from CMBDetectLib.mrml import anatomy

        session = self._session()
        if session.anatomy is None:
            raise RuntimeError(_("Press 'Locate and summarise' first."))
        return anatomy.export_report(session, session.anatomy, directory, stem=stem)

    def setAtlasOutlineVisible(self, visible: bool) -> bool:
        from CMBDetectLib.mrml import anatomy

        return anatomy.set_outline_visible(self._session(), visible)

    def loadSampleData(self):
        """The generated synthetic SWI sample (sha256-verified cache), loaded as a volume node."""
        return loadSyntheticSample()


def _labelmapVolume(node):
    """A label map node as an engine volume (label maps are refused as *input*, but fine as a mask)."""
    from CMBDetectLib.mrml import geometry
    from CMBDetectLib.volume import Volume

    array = geometry.array_from_node(node).copy()
    spacing, origin, direction = geometry.geometry_from_ijk_to_ras(geometry.node_ijk_to_ras(node))
    return Volume(array, spacing, origin, direction)


#
# Test
#


class CMBDetectTest(ScriptedLoadableModuleTest):
    """Whole workflow inside Slicer on a synthetic sample: detect, review, thresholds, save, resume."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_WholeWorkflow()
        self.setUp()
        self.test_BadInputs()

    def _sampleVolume(self):
        import numpy as np

        from CMBDetectLib.mrml import geometry
        from CMBDetectLib.volume import Volume

        rng = np.random.default_rng(0)
        shape = (48, 96, 96)
        k, j, i = np.indices(shape, dtype=np.float32)
        centre = (np.array(shape) - 1) / 2
        brain = (((k - centre[0]) / 20) ** 2 + ((j - centre[1]) / 40) ** 2 + ((i - centre[2]) / 38) ** 2) <= 1
        image = np.where(brain, 700.0, 30.0).astype(np.float32) + rng.normal(0, 10, shape).astype(np.float32)
        self.cmbCentres = [(24, 40, 40), (20, 60, 55), (28, 50, 30)]
        for ck, cj, ci in self.cmbCentres:
            distance = np.sqrt(((k - ck) * 2.0) ** 2 + ((j - cj) * 0.9) ** 2 + ((i - ci) * 0.9) ** 2)
            image[distance <= 2.0] = 150.0
        return geometry.volume_to_node(Volume(image, (0.9, 0.9, 2.0)), "sample_swi", scene=slicer.mrmlScene)

    def test_WholeWorkflow(self):
        self.delayDisplay("Whole CMBDetect workflow")
        logic = CMBDetectLogic()
        models = logic.availableModels()
        if not models:
            self.delayDisplay("No model package installed: run `make model` first. Workflow test skipped.")
            return
        volumeNode = self._sampleVolume()
        self.assertEqual(logic.guessModality(volumeNode), "swi")
        node = logic.getParameterNode()
        node.thDisc = 0.0    # keep every stage-1 candidate so the review has something to review
        node.minVolumeMm3 = 0.0
        node.maxEllipticity = 1.0
        node.minEdgeDistanceMm = 0.0
        session = logic.detect(volumeNode, "swi", model=models[0][1], device="cpu",
                               parameters=logic.parametersFromNode(node), timeout=1800)
        self.assertIsNotNone(session.segmentation_node.GetScene())
        self.assertEqual(session.segmentation_node.GetNodeReference(
            session.segmentation_node.GetReferenceImageGeometryReferenceRole()), volumeNode)
        ids = session.ids()
        self.assertEqual(len(session.table_rows()), len(ids))
        if len(ids) >= 2:
            logic.accept(ids[0])
            logic.reject(ids[1])
        from CMBDetectLib.mrml import geometry

        kji = self.cmbCentres[2]
        matrix = geometry.node_ijk_to_ras(volumeNode)
        clicked = (matrix @ [kji[2], kji[1], kji[0], 1.0])[:3]
        added = logic.addMissed(clicked)
        before = {c.id: c.decision for c in session.review.cmbs if c.decision.value != "pending"}
        start = time.perf_counter()
        logic.setThresholds(thDisc=0.99)
        elapsed = time.perf_counter() - start
        self.delayDisplay(f"Th_Cdisc change applied in {1000 * elapsed:.0f} ms")
        after = {c.id: c.decision for c in session.review.cmbs if c.decision.value != "pending"}
        self.assertEqual(before, after)
        self.assertIn(added.id, session.ids())

        directory = tempfile.mkdtemp(prefix="CMBDetectTest-")
        paths = logic.saveReview(directory, case="sample")
        state = session.state()
        slicer.mrmlScene.RemoveNode(session.segmentation_node)
        slicer.mrmlScene.RemoveNode(session.table_node)
        resumed = logic.loadReview(volumeNode, paths["review"])
        self.assertEqual(resumed.state(), state)
        shutil.rmtree(directory, ignore_errors=True)
        self.delayDisplay("Workflow test passed")

    def test_BadInputs(self):
        self.delayDisplay("Bad inputs give clear messages and leave the scene unchanged")
        import numpy as np

        from CMBDetectLib.errors import InputError
        from CMBDetectLib.mrml import geometry
        from CMBDetectLib.volume import Volume

        logic = CMBDetectLogic()
        count = slicer.mrmlScene.GetNumberOfNodes()
        labelmap = geometry.volume_to_node(Volume(np.ones((10, 10, 10), np.uint8)), "labels", labelmap=True)
        slicer.mrmlScene.AddNode(labelmap)
        with self.assertRaises(InputError):
            logic.startDetection(labelmap, "swi")
        flat = geometry.volume_to_node(Volume(np.ones((1, 32, 32), np.float32)), "slice")
        slicer.mrmlScene.AddNode(flat)
        with self.assertRaises(InputError):
            logic.startDetection(flat, "swi")
        with self.assertRaises(InputError):
            logic.startDetection(None, "swi")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count + 2)
        self.assertIsNone(logic.job)
        self.delayDisplay("Bad-input test passed")
