"""CMBDetectTraining: turn reviewed cases into a training dataset, retrain, and manage model versions.

Every accepted, rejected and added CMB reviewed in the CMBDetect module can make the next model better:
this module exports reviewed cases (from the scene or from saved reviews) into a dataset, shows the
dataset and its deterministic train / validation split by subject, fine-tunes the selected model in a
background process (progress, Cancel, before/after metrics side by side), and registers the result as a
new model version that CMBDetect can use, without ever overwriting the model that works today. A new model
that is worse than the one it started from on the validation subjects is not registered unless the user
ticks "Register even if worse" (the rule is in ``CMBDetectLib.model_comparison``).

The engine (``CMBDetectLib``) is shared with the CMBDetect module; see :func:`engineDirectory` for how it
is found.
"""

import logging
import os
import pathlib
import sys
import time
from typing import Annotated, Optional

import qt
import slicer
from slicer import vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

POLL_INTERVAL_MS = 250
# QSettings keys of the CMBDetect module (its device and model preferences), shared so that "Use this
# version" here is what CMBDetect's model selector shows.
SETTINGS_DEVICE = "CMBDetect/Device"


def engineDirectory() -> str:
    """Folder that contains the shared ``CMBDetectLib`` package.

    Two modules of one extension share a library the way Slicer extensions usually do it: the library is
    listed in the CMBDetect module's ``MODULE_PYTHON_SCRIPTS`` and installed with it, and every scripted
    module of an extension lands in the same ``qt-scripted-modules`` folder, so in an installed extension
    ``CMBDetectLib`` sits next to this file. When the modules are used from the source tree (Developer
    mode, "Additional module paths"), the library is in the sibling ``CMBDetect`` module folder instead.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.join(os.path.dirname(here), "CMBDetect")):
        if os.path.isdir(os.path.join(candidate, "CMBDetectLib")):
            return candidate
    return here


def ensureEngineImportable() -> None:
    """Make ``import CMBDetectLib`` work (only a sys.path entry: nothing is installed here)."""
    directory = engineDirectory()
    if directory not in sys.path:
        sys.path.insert(0, directory)


ensureEngineImportable()


#
# CMBDetectTraining
#


class CMBDetectTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CMBDetect Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        # CMBDetect ships the engine this module imports, and the review that is exported.
        self.parent.dependencies = ["CMBDetect"]
        self.parent.contributors = ["CMBDetect developers"]
        self.parent.helpText = _("""
Export cases reviewed in the CMBDetect module into a training dataset (accepted and added CMBs become
labels, rejected candidates hard negatives), inspect the dataset and its train/validation split by subject,
fine-tune the current model on it in the background, compare before/after metrics on the validation
subjects, and switch between model versions. A new version never replaces an existing one, and a new
version that is worse than the model it started from is not registered unless you ask for it.
""")
        self.parent.acknowledgementText = _("""
Method: Sundaresan et al., cerebral microbleed detection with a two-stage network and knowledge
distillation. Dataset layout: nnU-Net v2.
""")


#
# Parameter node
#


@parameterNodeWrapper
class CMBDetectTrainingParameterNode:
    """User choices of the panel (saved with the scene)."""

    datasetDirectory: pathlib.Path
    reviewSegmentation: vtkMRMLSegmentationNode
    reviewer: str = ""
    allowPending: bool = False
    validationFraction: Annotated[float, WithinRange(0.0, 0.5)] = 0.2
    timeBudgetMinutes: Annotated[float, WithinRange(5.0, 480.0)] = 30.0
    pseudoLabels: bool = False
    unreviewedDirectory: pathlib.Path
    pseudoLabelThreshold: Annotated[float, WithinRange(0.5, 1.0)] = 0.9
    registerWorse: bool = False


def _pathOrNone(path) -> Optional[str]:
    """The parameter node stores an unset path as ``.``: treat that as "not chosen"."""
    text = str(path or "").strip()
    return None if text in ("", ".") else text


#
# CMBDetectTrainingWidget
#


class CMBDetectTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runner = None
        self._notBetter = None   # the "not_better" event of the running retraining, if it sent one
        self._timer = None
        self._modelPaths = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMBDetectTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        # Only segmentations made by the CMBDetect review are offered for export.
        self.ui.reviewSegmentationSelector.addAttribute("vtkMRMLSegmentationNode", "CMBDetect.review", "1")

        self.logic = CMBDetectTrainingLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollRetraining)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.exportSceneButton.connect("clicked(bool)", self.onExportScene)
        self.ui.exportFilesButton.connect("clicked(bool)", self.onExportFiles)
        self.ui.refreshDatasetButton.connect("clicked(bool)", self.updateDatasetView)
        self.ui.validateDatasetButton.connect("clicked(bool)", self.onValidateDataset)
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)",
                                            lambda _path: self.updateDatasetView())
        self.ui.validationFractionSlider.connect("valueChanged(double)", lambda _v: self.updateDatasetView())
        self.ui.retrainButton.connect("clicked(bool)", self.onRetrain)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.useVersionButton.connect("clicked(bool)", self.onUseVersion)
        self.ui.useDefaultButton.connect("clicked(bool)", self.onUseDefault)
        self.ui.verifyModelsButton.connect("clicked(bool)", lambda: self.updateModelsView(verify=True))
        self.ui.pseudoLabelsCheckBox.connect("toggled(bool)", self._updatePseudoLabelWidgets)

        self._setUpTables()
        self.initializeParameterNode()
        self.updateModelsView()
        self.updateDatasetView()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._runner is not None and self._runner.is_running:
            self._runner.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.updateModelsView()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[CMBDetectTrainingParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
        self._updatePseudoLabelWidgets()

    # ------------------------------------------------------------------ helpers
    def _setUpTables(self) -> None:
        self.ui.casesTableWidget.setColumnCount(7)
        self.ui.casesTableWidget.setHorizontalHeaderLabels(
            [_("Case"), _("Subject"), _("Split"), _("CMBs"), _("Hard neg."), _("Pending"), _("Reviewer")])
        self.ui.metricsTableWidget.setColumnCount(3)
        self.ui.metricsTableWidget.setHorizontalHeaderLabels([_("Metric"), _("Before"), _("After")])
        self.ui.modelsTableWidget.setColumnCount(6)
        self.ui.modelsTableWidget.setHorizontalHeaderLabels(
            [_("In use"), _("Version"), _("Source"), _("Created"), _("From"), _("Validation (after)")])
        for table in (self.ui.casesTableWidget, self.ui.metricsTableWidget, self.ui.modelsTableWidget):
            table.horizontalHeader().setStretchLastSection(True)
            table.verticalHeader().setVisible(False)

    def _datasetDirectory(self) -> Optional[str]:
        return _pathOrNone(self.ui.datasetPathLineEdit.currentPath)

    def _updatePseudoLabelWidgets(self, *args) -> None:
        enabled = self.ui.pseudoLabelsCheckBox.checked
        for widget in (self.ui.unreviewedPathLineEdit, self.ui.pseudoThresholdSlider):
            widget.setEnabled(enabled)

    @staticmethod
    def _setRow(table, row: int, values) -> None:
        for column, value in enumerate(values):
            item = qt.QTableWidgetItem("" if value is None else str(value))
            table.setItem(row, column, item)

    # ------------------------------------------------------------------ export
    def onExportScene(self) -> None:
        datasetDir = self._datasetDirectory()
        segmentationNode = self.ui.reviewSegmentationSelector.currentNode()
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            if not datasetDir:
                raise ValueError(_("Choose a dataset folder first."))
            if segmentationNode is None:
                raise ValueError(_("Select a segmentation reviewed in the CMBDetect module."))
            result = self.logic.exportSegmentation(
                segmentationNode, datasetDir, allowPending=self.ui.allowPendingCheckBox.checked,
                reviewer=self.ui.reviewerLineEdit.text.strip() or None)
            self._reportExports([result], [])

    def onExportFiles(self) -> None:
        datasetDir = self._datasetDirectory()
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=False):
            if not datasetDir:
                raise ValueError(_("Choose a dataset folder first."))
            paths = qt.QFileDialog.getOpenFileNames(
                slicer.util.mainWindow(), _("Saved reviews to export"), "",
                _("CMBDetect reviews (*.review.json)"))
            if not paths:
                return
            qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
            try:
                results, errors = self.logic.exportSavedReviews(
                    list(paths), datasetDir, allowPending=self.ui.allowPendingCheckBox.checked,
                    reviewer=self.ui.reviewerLineEdit.text.strip() or None)
            finally:
                qt.QApplication.restoreOverrideCursor()
            self._reportExports(results, errors)

    def _reportExports(self, results, errors) -> None:
        lines = [result.summary() for result in results]
        lines += [_("Not exported: {path}: {error}").format(path=path, error=error) for path, error in errors]
        self.updateDatasetView()
        if errors:
            slicer.util.warningDisplay("\n".join(lines), windowTitle=_("CMBDetect export"))
        elif any(result.warnings for result in results):
            slicer.util.infoDisplay("\n".join(lines), windowTitle=_("CMBDetect export"))
        else:
            slicer.util.showStatusMessage("; ".join(lines), 5000)

    # ------------------------------------------------------------------ dataset view
    def updateDatasetView(self) -> None:
        table = self.ui.casesTableWidget
        table.setRowCount(0)
        datasetDir = self._datasetDirectory()
        if not datasetDir or not os.path.isfile(os.path.join(datasetDir, "dataset.json")):
            self.ui.datasetSummaryLabel.text = _("No dataset yet: the first export creates it.")
            return
        try:
            summary = self.logic.datasetSummary(datasetDir, self.ui.validationFractionSlider.value)
        except Exception as error:  # a broken dataset must not break the panel: show why instead
            self.ui.datasetSummaryLabel.text = _("Cannot read the dataset: {error}").format(error=error)
            return
        counts = summary["counts"]
        self.ui.datasetSummaryLabel.text = _(
            "{cases} cases from {subjects} subjects ({modality}): {cmbs} CMBs, {negatives} hard negatives; "
            "{train} training / {validation} validation cases.").format(
            cases=counts["cases"], subjects=counts["subjects"], modality=summary["modality"] or "?",
            cmbs=counts["cmbs"], negatives=counts["hard_negatives"], train=len(summary["train"]),
            validation=len(summary["validation"]))
        validation = set(summary["validation"])
        table.setRowCount(len(summary["cases"]))
        for row, case in enumerate(summary["cases"]):
            split = _("validation") if case.case in validation else _("training")
            self._setRow(table, row, [case.case, case.subject, split, case.n_cmbs, case.n_hard_negatives,
                                      case.n_pending, case.reviewer])

    def onValidateDataset(self) -> None:
        datasetDir = self._datasetDirectory()
        with slicer.util.tryWithErrorDisplay(_("Dataset check failed."), waitCursor=True):
            if not datasetDir:
                raise ValueError(_("Choose a dataset folder first."))
            problems = self.logic.validateDataset(datasetDir)
            if problems:
                slicer.util.warningDisplay("\n".join(problems[:30]), windowTitle=_("Dataset problems"))
            else:
                slicer.util.infoDisplay(_("The dataset is consistent."), windowTitle=_("Dataset check"))

    # ------------------------------------------------------------------ retraining
    def onRetrain(self) -> None:
        datasetDir = self._datasetDirectory()
        with slicer.util.tryWithErrorDisplay(_("Retraining could not start."), waitCursor=True):
            if not datasetDir:
                raise ValueError(_("Choose a dataset folder first."))
            row = self.ui.initModelComboBox.currentIndex
            if row < 0 or row >= len(self._modelPaths):
                raise ValueError(_("No model to start from."))
            if not self.logic.ensureDependencies():
                return
            unreviewed = []
            if self.ui.pseudoLabelsCheckBox.checked:
                folder = _pathOrNone(self.ui.unreviewedPathLineEdit.currentPath)
                if not folder:
                    raise ValueError(_("Choose the folder of unreviewed scans for pseudo-labels."))
                unreviewed = self.logic.imagesInFolder(folder)
            self._runner = self.logic.startRetraining(
                self._modelPaths[row], datasetDir, validationFraction=self.ui.validationFractionSlider.value,
                timeBudgetMinutes=self.ui.timeBudgetSlider.value, pseudoLabelImages=unreviewed,
                pseudoLabelThreshold=self.ui.pseudoThresholdSlider.value,
                registerWorse=self.ui.registerWorseCheckBox.checked)
            self._notBetter = None
            self._setRunning(True)
            self.ui.metricsTableWidget.setRowCount(0)
            self.ui.statusLabel.text = _("Starting...")
            self._timer.start()

    def onCancel(self) -> None:
        if self._runner is not None and self._runner.is_running:
            self.ui.statusLabel.text = _("Cancelling...")
            self._runner.cancel()
            self.onPollRetraining()

    def onPollRetraining(self) -> None:
        runner = self._runner
        if runner is None:
            self._timer.stop()
            return
        for event in runner.poll():
            if event.type == "log" and event.message:
                logging.info(event.message)
            elif event.type == "not_better":
                self._notBetter = event.data
        self.ui.progressBar.value = int(round(runner.fraction * 1000))
        if runner.message:
            self.ui.statusLabel.text = runner.message
        if runner.is_running:
            return
        self._timer.stop()
        self._setRunning(False)
        from CMBDetectLib.runner import CANCELLED, FINISHED

        if runner.state == FINISHED:
            result = runner.result or {}
            model = result.get("model", {})
            status = _("New version {name}-{version} registered.").format(
                name=model.get("name", "?"), version=model.get("version", "?"))
            comparison = self.logic.describeComparison(result)
            self.ui.statusLabel.text = f"{status}\n{comparison}" if comparison else status
            self.showMetrics(result.get("metrics_before"), result.get("metrics_after"))
            self.updateModelsView()
            for warning in result.get("warnings", []):
                logging.warning(warning)
        elif runner.state == CANCELLED:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled: no model version was registered.")
        elif self._notBetter is not None:
            # Not a failure: the guard kept the current model. Show the numbers and how to keep it anyway.
            message = self.logic.notRegisteredMessage(self._notBetter)
            self.ui.statusLabel.text = message
            self.showMetrics(*self.logic.comparedMetrics(self._notBetter))
            slicer.util.warningDisplay(message, windowTitle=_("CMBDetect retraining"))
        else:
            self.ui.statusLabel.text = _("Retraining failed: {error}").format(error=runner.error_message)
            slicer.util.errorDisplay(_("Retraining failed: {error}").format(error=runner.error_message),
                                     detailedText="\n".join(runner.stderr_tail))

    def _setRunning(self, running: bool) -> None:
        self.ui.retrainButton.enabled = not running
        self.ui.cancelButton.enabled = running
        self.ui.exportSceneButton.enabled = not running
        self.ui.exportFilesButton.enabled = not running

    def showMetrics(self, before: Optional[dict], after: Optional[dict]) -> None:
        rows = self.logic.metricsRows(before, after)
        table = self.ui.metricsTableWidget
        table.setRowCount(len(rows))
        for row, values in enumerate(rows):
            self._setRow(table, row, values)

    # ------------------------------------------------------------------ model versions
    def updateModelsView(self, verify: bool = False) -> None:
        try:
            versions = self.logic.modelVersions(verify=verify)
        except Exception as error:  # an unreadable model folder must not break the panel
            logging.error(f"Cannot list model versions: {error}")
            versions = []
        table = self.ui.modelsTableWidget
        table.setRowCount(len(versions))
        self._modelPaths = [str(v.path) for v in versions]
        currentInit = self.ui.initModelComboBox.currentText
        self.ui.initModelComboBox.clear()
        selectedRow = None
        for row, version in enumerate(versions):
            parent = f"{version.parent.get('name')}-{version.parent.get('version')}" if version.parent else ""
            after = self.logic.describeValidation(version.metrics)
            inUse = "*" if version.selected else ""
            if version.problem:
                after = _("REFUSED: {problem}").format(problem=version.problem)
            self._setRow(table, row,
                         [inUse, version.label, version.source, version.created[:10], parent, after])
            self.ui.initModelComboBox.addItem(version.label)
            if version.selected:
                selectedRow = row
        if not any(v.selected for v in versions):
            # No explicit choice: CMBDetect uses the bundled default; show that as "in use".
            defaultPath = self.logic.activeModelPath()
            for row, version in enumerate(versions):
                if defaultPath and os.path.normpath(str(version.path)) == os.path.normpath(defaultPath):
                    table.setItem(row, 0, qt.QTableWidgetItem("*"))
                    selectedRow = row
        index = self.ui.initModelComboBox.findText(currentInit) if currentInit else -1
        self.ui.initModelComboBox.setCurrentIndex(index if index >= 0 else (selectedRow or 0))

    def onUseVersion(self) -> None:
        rows = {index.row() for index in self.ui.modelsTableWidget.selectionModel().selectedRows()}
        with slicer.util.tryWithErrorDisplay(_("Cannot use this model version."), waitCursor=True):
            if not rows:
                raise ValueError(_("Select a model version in the table first."))
            package = self.logic.useModelVersion(self._modelPaths[rows.pop()])
            slicer.util.showStatusMessage(_("CMBDetect now uses {label}.").format(label=package.label), 5000)
            self.updateModelsView()

    def onUseDefault(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot switch model."), waitCursor=True):
            self.logic.useDefaultModel()
            self.updateModelsView()


#
# CMBDetectTrainingLogic
#


class CMBDetectTrainingLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, callable from the Python console without the GUI:

    ``logic = slicer.util.getModuleLogic("CMBDetectTraining")``
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return CMBDetectTrainingParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ dependencies
    @staticmethod
    def ensureDependencies() -> bool:
        """torch via the PyTorch extension and MONAI, installed only when the user asks for retraining."""
        try:
            import torch  # noqa: F401

            haveTorch = True
        except ImportError:
            haveTorch = False
        if not haveTorch:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("Retraining needs PyTorch: install the PyTorch extension from the "
                                     "Extensions Manager and restart Slicer.")) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if not slicer.util.confirmOkCancelDisplay(
                        _("Retraining needs PyTorch, which is not installed yet. Install it now?")):
                    return False
                if torchLogic.installTorch(askConfirmation=False) is None:
                    raise RuntimeError(_("PyTorch could not be installed."))
        try:
            import monai  # noqa: F401
        except ImportError:
            if not slicer.util.confirmOkCancelDisplay(_("Retraining needs MONAI. Install it now?")):
                return False
            slicer.util.pip_install("monai>=1.3")
        return True

    # ------------------------------------------------------------------ export
    @staticmethod
    def reviewSessionForSegmentation(segmentationNode):
        """The CMBDetect review (``CMBDetectLib.mrml.ReviewSession``) that owns ``segmentationNode``.

        The CMBDetect module keeps one review session per reviewed segmentation; its logic is asked first.
        A review that only exists as saved files must be exported with :meth:`exportSavedReviews`.
        """
        cmbLogic = slicer.util.getModuleLogic("CMBDetect")
        session = getattr(cmbLogic, "reviewSession", None)   # the review open in CMBDetect
        if session is not None and getattr(session, "segmentation_node", None) is segmentationNode:
            return session
        raise ValueError(_("'{name}' is not a review open in the CMBDetect module; save the review there and "
                           "use 'Export saved reviews...'.").format(name=segmentationNode.GetName()))

    def exportSegmentation(self, segmentationNode, datasetDir: str, allowPending: bool = False,
                           reviewer: Optional[str] = None):
        """Export the case reviewed on ``segmentationNode`` (returns ``dataset_export.ExportResult``)."""
        from CMBDetectLib.dataset_export import export_review_session

        session = self.reviewSessionForSegmentation(segmentationNode)
        return export_review_session(datasetDir, session, allow_pending=allowPending, reviewer=reviewer)

    @staticmethod
    def exportSavedReviews(reviewPaths, datasetDir: str, allowPending: bool = False,
                           reviewer: Optional[str] = None):
        """Export ``<case>.review.json`` files; returns (results, [(path, error message)])."""
        from CMBDetectLib.dataset_export import export_saved_review
        from CMBDetectLib.errors import CMBDetectError

        results, errors = [], []
        for path in reviewPaths:
            try:
                results.append(export_saved_review(path, datasetDir, allow_pending=allowPending,
                                                   reviewer=reviewer))
            except CMBDetectError as error:   # one bad review must not stop the others
                errors.append((path, str(error)))
        return results, errors

    # ------------------------------------------------------------------ dataset
    @staticmethod
    def datasetSummary(datasetDir: str, validationFraction: float = 0.2, seed: int = 0) -> dict:
        """Cases, counts and the deterministic split by subject that retraining will use."""
        from CMBDetectLib.dataset import load_dataset, split_by_subject

        dataset = load_dataset(datasetDir)
        train, validation = split_by_subject(dataset.cases, validationFraction, seed)
        return {"cases": dataset.cases, "counts": dataset.counts(), "modality": dataset.modality,
                "train": [c.case for c in train], "validation": [c.case for c in validation]}

    @staticmethod
    def validateDataset(datasetDir: str) -> list:
        from CMBDetectLib.dataset import validate_dataset
        from CMBDetectLib.dataset_export import recover_interrupted_exports

        recover_interrupted_exports(datasetDir)
        return validate_dataset(datasetDir)

    @staticmethod
    def imagesInFolder(folder: str) -> list:
        suffixes = (".nii.gz", ".nii", ".nrrd", ".mha")
        return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                      if name.lower().endswith(suffixes) and not name.lower().endswith(".seg.nrrd"))

    # ------------------------------------------------------------------ retraining
    @staticmethod
    def retrainingCommand(initModel: str, datasetDir: str, validationFraction: float = 0.2,
                          timeBudgetMinutes: float = 30.0, pseudoLabelImages=(),
                          pseudoLabelThreshold: float = 0.9, device: Optional[str] = None,
                          registerWorse: bool = False) -> list:
        """``PythonSlicer -m CMBDetectLib.retraining ...`` with JSON progress lines.

        ``registerWorse``: register the new version even if it is worse than ``initModel`` on the validation
        subjects (``--register-worse``; off by default, see ``CMBDetectLib.model_comparison``).
        """
        device = device or str(qt.QSettings().value(SETTINGS_DEVICE, "auto") or "auto")
        command = [CMBDetectTrainingLogic.pythonExecutable(), "-m", "CMBDetectLib.retraining",
                   "--init", str(initModel), "--dataset", str(datasetDir),
                   "--validation-fraction", f"{float(validationFraction):g}", "--device", str(device),
                   "--time-budget", f"{float(timeBudgetMinutes):g}", "--progress", "json"]
        if pseudoLabelImages:
            command += ["--pseudo-labels", *[str(p) for p in pseudoLabelImages],
                        "--pseudo-label-threshold", f"{float(pseudoLabelThreshold):g}"]
        if registerWorse:
            command.append("--register-worse")
        return command

    @staticmethod
    def pythonExecutable() -> str:
        """``PythonSlicer`` (Slicer's Python with the right environment) for background processes."""
        return _pythonSlicer()

    def startRetraining(self, initModel: str, datasetDir: str, **options):
        """Start retraining in a background process; poll the returned ``ProcessRunner``."""
        from CMBDetectLib.runner import ProcessRunner, engine_environment

        command = self.retrainingCommand(initModel, datasetDir, **options)
        logging.info("CMBDetectTraining: " + " ".join(command))
        return ProcessRunner(command, env=engine_environment(engineDirectory())).start()

    def retrain(self, initModel: str, datasetDir: str, **options) -> dict:
        """Blocking variant for scripts: runs the same background process and waits (returns its result).

        Raises ``CMBDetectLib.errors.NotBetterError`` when the new model was worse than ``initModel`` and
        therefore not registered (``registerWorse=True`` registers it anyway), ``RuntimeError`` otherwise.
        """
        from CMBDetectLib.errors import NotBetterError
        from CMBDetectLib.runner import FINISHED

        runner = self.startRetraining(initModel, datasetDir, **options)
        notBetter = None
        while runner.is_running:
            for event in runner.poll():
                if event.type == "not_better":
                    notBetter = event.data
            time.sleep(0.1)
        if runner.state != FINISHED:
            if notBetter is not None:
                raise NotBetterError(self.notRegisteredMessage(notBetter))
            raise RuntimeError(runner.error_message or _("retraining failed"))
        return runner.result

    @staticmethod
    def describeComparison(result: Optional[dict]) -> str:
        """``Compared with tiny-1.0.0: better, F1 0.62 -> 0.70 (...).``; "" when the result has none."""
        comparison = (result or {}).get("comparison") or {}
        verdict = comparison.get("verdict")
        if not verdict:
            return ""
        parent = (result or {}).get("parent") or {}
        label = f"{parent.get('name', '?')}-{parent.get('version', '?')}"
        words = {"better": _("better"), "equal": _("as good (within tolerance)"),
                 "worse": _("worse, registered because 'Register even if worse' was ticked"),
                 "unknown": _("not compared")}
        return _("Compared with {parent}: {verdict}, {reason}.").format(
            parent=label, verdict=words.get(verdict, verdict), reason=comparison.get("reason", ""))

    @staticmethod
    def comparedMetrics(notBetter: dict) -> tuple:
        """(before, after) metrics records for :meth:`metricsRows` from a ``not_better`` event."""
        comparison = notBetter.get("comparison") or {}
        return {"clusterwise": comparison.get("before") or {}}, {"clusterwise": comparison.get("after") or {}}

    @staticmethod
    def notRegisteredMessage(notBetter: dict) -> str:
        """What the panel says when the retraining process reported ``{"type": "not_better", ...}``."""
        comparison = notBetter.get("comparison") or {}
        parent = notBetter.get("parent") or _("the current model")
        return _("Not registered: the fine-tuned model is worse than {parent} on the {n} validation case(s): "
                 "{reason}. Your model versions are unchanged. Tick 'Register even if worse than the current "
                 "model' to keep it anyway.").format(parent=parent, n=len(notBetter.get("validation_cases") or []),
                                              reason=comparison.get("reason", "?"))

    @staticmethod
    def metricsRows(before: Optional[dict], after: Optional[dict]) -> list:
        """Table rows ``(metric, before, after)``: cluster-wise TPR, FPavg, precision, F1."""
        def value(metrics, key, digits):
            number = ((metrics or {}).get("clusterwise") or {}).get(key)
            return "-" if number is None else f"{number:.{digits}f}"

        rows = [(_("Cluster-wise TPR"), "tpr", 3), (_("FPavg (per scan)"), "fp_avg", 2),
                (_("Precision"), "precision", 3), (_("F1"), "f1", 3)]
        if not before and not after:
            return [(_("No validation subject"), "-", "-")]
        return [(label, value(before, key, digits), value(after, key, digits)) for label, key, digits in rows]

    # ------------------------------------------------------------------ model versions
    @staticmethod
    def modelVersions(verify: bool = False) -> list:
        from CMBDetectLib.model_registry import list_versions

        return list_versions(verify=verify)

    @staticmethod
    def describeValidation(metrics: dict) -> str:
        from CMBDetectLib.model_registry import describe_metrics

        after = ((metrics or {}).get("validation") or {}).get("after") or {}
        return describe_metrics(after.get("clusterwise"))

    @staticmethod
    def useModelVersion(path: str):
        """Make ``path`` the model CMBDetect uses (checksums verified; a corrupted package is refused)."""
        from CMBDetectLib.model_registry import select_model

        package = select_model(path)
        CMBDetectTrainingLogic._refreshDetectionModule()
        return package

    @staticmethod
    def useDefaultModel() -> None:
        from CMBDetectLib.model_registry import clear_selection

        clear_selection()
        CMBDetectTrainingLogic._refreshDetectionModule()

    @staticmethod
    def _refreshDetectionModule() -> None:
        """Let an open CMBDetect panel show the newly chosen model in its selector."""
        module = getattr(getattr(slicer, "modules", None), "cmbdetect", None)
        widget = getattr(module, "widgetRepresentation", None)
        try:
            representation = widget() if callable(widget) else None
            instance = representation.self() if representation is not None else None
        except Exception:  # the CMBDetect panel was never opened: it reads the setting when it is
            instance = None
        if instance is not None and hasattr(instance, "populateModels"):
            instance.populateModels()

    @staticmethod
    def activeModelPath() -> Optional[str]:
        from CMBDetectLib.errors import ModelError
        from CMBDetectLib.model_registry import active_model_path

        try:
            return str(active_model_path()[0])
        except ModelError:
            return None


def _pythonSlicer() -> str:
    """Path of ``PythonSlicer`` next to the Slicer executable (falls back to this interpreter)."""
    import shutil

    found = shutil.which("PythonSlicer")
    if found:
        return found
    binDir = os.path.dirname(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = os.path.join(binDir, name)
        if os.path.isfile(candidate):
            return candidate
    return sys.executable


#
# CMBDetectTrainingTest
#


class CMBDetectTrainingTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test). The full pipeline is tested headless by Testing/test_*.py."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ExportSavedReviewAndDatasetView()

    def test_ExportSavedReviewAndDatasetView(self):
        import json
        import tempfile

        import numpy as np

        from CMBDetectLib.volume import Volume, write_volume_atomic

        self.delayDisplay("Exporting a synthetic reviewed case")
        folder = tempfile.mkdtemp(prefix="CMBDetectTrainingTest-")
        image = np.full((16, 24, 24), 500, np.float32)
        labels = np.zeros(image.shape, np.uint16)
        labels[7:10, 5:8, 5:8] = 1      # accepted CMB
        labels[7:10, 15:18, 15:18] = 2  # rejected candidate
        image[labels > 0] = 100
        spacing = (0.9, 0.9, 2.0)
        write_volume_atomic(Volume(image, spacing), os.path.join(folder, "case1.nii.gz"))
        write_volume_atomic(Volume(labels, spacing), os.path.join(folder, "case1.instances.nii.gz"))
        review = {"schema": "cmbdetect.review/1", "case": "case1", "subject": "case1", "modality": "swi",
                  "image": {"path": "case1.nii.gz"}, "reviewer": "selftest",
                  "model": {"name": "test", "version": "1.0.0"},
                  "cmbs": [{"id": 1, "decision": "accepted"}, {"id": 2, "decision": "rejected"}]}
        reviewPath = os.path.join(folder, "case1.review.json")
        with open(reviewPath, "w", encoding="utf-8") as stream:
            json.dump(review, stream)

        logic = CMBDetectTrainingLogic()
        datasetDir = os.path.join(folder, "dataset")
        results, errors = logic.exportSavedReviews([reviewPath], datasetDir)
        self.assertEqual(errors, [])
        self.assertEqual((results[0].n_cmbs, results[0].n_hard_negatives), (1, 1))
        self.assertEqual(logic.validateDataset(datasetDir), [])
        summary = logic.datasetSummary(datasetDir)
        self.assertEqual(summary["counts"]["cases"], 1)
        # a second export of the same case replaces it
        results, _ = logic.exportSavedReviews([reviewPath], datasetDir)
        self.assertTrue(results[0].replaced)
        self.assertEqual(logic.datasetSummary(datasetDir)["counts"]["cases"], 1)
        rows = logic.metricsRows({"clusterwise": {"tpr": 0.5, "fp_avg": 2.0, "precision": 0.25, "f1": 0.33}},
                                 {"clusterwise": {"tpr": 0.75, "fp_avg": 1.0, "precision": 0.6, "f1": 0.67}})
        self.assertEqual(rows[0][1:], ("0.500", "0.750"))
        # better-or-equal guard: off unless asked for, explained on the status line
        command = logic.retrainingCommand("tiny-1.0.0", datasetDir, device="cpu")
        self.assertNotIn("--register-worse", command)
        self.assertIn("--register-worse", logic.retrainingCommand("tiny-1.0.0", datasetDir, device="cpu",
                                                                  registerWorse=True))
        self.assertFalse(logic.getParameterNode().registerWorse)
        comparison = {"verdict": "worse", "reason": "F1 0.70 -> 0.60 (TPR 0.80 -> 0.70, FPavg 1.00 -> 1.00)"}
        self.assertIn("Not registered", logic.notRegisteredMessage(
            {"parent": "tiny-1.0.0", "validation_cases": ["a"], "comparison": comparison}))
        self.assertIn("F1 0.70 -> 0.60", logic.describeComparison(
            {"parent": {"name": "tiny", "version": "1.0.0"}, "comparison": comparison}))
        self.delayDisplay("Test passed")
