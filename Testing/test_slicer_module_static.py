"""Static checks of the Slicer module that need neither the Slicer application nor slicer-core.

ZeroShotILD.py imports ``qt``, ``ctk`` and ``slicer.ScriptedLoadableModule``, which exist only inside
Slicer, so CI cannot import it. These tests read its source instead: every file compiles, every
widget the code uses exists in the ``.ui``, every widget bound to the parameter node can be bound
by ``slicer.parameterNodeWrapper`` for its type, the parameter node covers the engine's settings,
nothing installs packages at import or in ``setup()``, and CMake ships every file.
"""
from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import REPO

MODULE_DIR = REPO / "ZeroShotILD"
MODULE_FILE = MODULE_DIR / "ZeroShotILD.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "ZeroShotILD.ui"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))  # ZeroShotILDMRML, as Slicer's module path makes it importable

#: Widget classes slicer.parameterNodeWrapper.guiConnectors binds, by the parameter's Python type
#: (QComboBox needs a Choice annotation). Fields connected by hand are listed in HAND_CONNECTED.
CONNECTABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "QComboBox"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "node": {"qMRMLNodeComboBox"},
}
#: Parameters that are plain strings in the node but shown in path widgets, connected in the widget code.
HAND_CONNECTED = {"checkpointPath": "checkpointPathLineEdit", "weightsDir": "weightsDirLineEdit"}
#: Wrapper fields that are not engine settings.
MODULE_ONLY = {"inputVolume", "heatmapOpacity", "heatmapRange"}


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found in {MODULE_FILE.name}")


def _ui_widgets() -> dict:
    """name -> (class, {property name: text value}) of every widget in the .ui file."""
    root = ET.parse(UI_FILE).getroot()
    out = {}
    for widget in root.iter("widget"):
        props = {}
        for prop in widget.findall("property"):
            value = prop.find("*")
            props[prop.get("name")] = value.text if value is not None else None
        out[widget.get("name")] = (widget.get("class"), props)
    return out


def _wrapper_fields() -> dict:
    """Field name -> (python type name, annotation source, default source) of ZeroShotILDParameterNode."""
    tree = _module_tree()
    cls = _class(tree, "ZeroShotILDParameterNode")
    decorators = [ast.unparse(d) for d in cls.decorator_list]
    assert "parameterNodeWrapper" in decorators
    fields = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign):
            annotation = ast.unparse(stmt.annotation)
            match = re.match(r"Annotated\[(\w+),", annotation)
            base = match.group(1) if match else annotation
            kind = "node" if base.startswith("vtkMRML") else base
            fields[stmt.target.id] = (kind, annotation, ast.unparse(stmt.value) if stmt.value else None)
    return fields


# ----------------------------------------------------------------------------------------------
def test_every_module_python_file_compiles():
    files = sorted(MODULE_DIR.rglob("*.py"))
    assert MODULE_FILE in files and len(files) >= 10
    for path in files:
        compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_ui_file_has_every_widget_the_module_uses():
    widgets = _ui_widgets()
    source = MODULE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert len(used) > 10
    missing = sorted(used - set(widgets))
    assert not missing, f"ZeroShotILD.py uses widgets absent from {UI_FILE.name}: {missing}"
    # Children of the top-level widget are reached as self.ui.<objectName>; names must be unique.
    names = [w.get("name") for w in ET.parse(UI_FILE).getroot().iter("widget")]
    assert len(names) == len(set(names))


def test_ui_widgets_bound_to_the_parameter_node_can_be_bound():
    widgets = _ui_widgets()
    fields = _wrapper_fields()
    bound = {props["SlicerParameterName"]: (name, cls) for name, (cls, props) in widgets.items()
             if "SlicerParameterName" in props}
    unknown = sorted(set(bound) - set(fields))
    assert not unknown, f"widgets name parameters the parameter node lacks: {unknown}"
    for parameter, (widget, cls) in bound.items():
        kind, annotation, _ = fields[parameter]
        assert cls in CONNECTABLE[kind], f"{widget} ({cls}) cannot be bound to {parameter}: {annotation}"
        if cls == "QComboBox":
            assert "Choice(" in annotation, f"{parameter} needs a Choice annotation for its combo box"
        if cls == "ctkSliderWidget":
            assert "WithinRange(" in annotation, f"{parameter} needs a WithinRange for its slider"
    # Every field is shown: bound by the wrapper or connected by hand to the widget named here.
    unshown = sorted(set(fields) - set(bound) - set(HAND_CONNECTED))
    assert not unshown, f"parameters without a widget: {unshown}"
    for parameter, widget in HAND_CONNECTED.items():
        assert widget in widgets and "SlicerParameterName" not in widgets[widget][1]


def test_parameter_node_fields_are_the_engine_settings_mapping():
    parameters = pytest.importorskip("ZeroShotILDMRML.parameters", reason="engine not importable")
    fields = _wrapper_fields()
    assert set(fields) - MODULE_ONLY == {p.name for p in parameters.PARAMETERS}
    for p in parameters.PARAMETERS:
        kind, annotation, default = fields[p.name]
        assert kind == p.kind.__name__, f"{p.name}: {annotation} in the wrapper, {p.kind.__name__} in parameters.py"
        assert default == f"DEFAULTS[{p.name!r}]", f"{p.name} must default to DEFAULTS[{p.name!r}]"


def test_choices_are_the_engine_choices():
    from ZeroShotILDLib import settings

    from ZeroShotILDMRML import catalog

    fields = _wrapper_fields()
    expected = {"device": "DEVICES", "retrieval": "RETRIEVAL_METHODS", "montageSize": "MONTAGE_SIZES",
                "scoringMode": "SCORING_MODES", "model": "MODEL_CHOICES"}
    for name, constant in expected.items():
        assert f"Choice({constant})" in fields[name][1]
        if constant != "MODEL_CHOICES":
            assert getattr(settings, constant)
    assert catalog.CUSTOM_MODEL not in catalog.model_names()
    # The module builds MODEL_CHOICES from the model list plus the custom-checkpoint entry.
    assert ("MODEL_CHOICES = tuple(catalog.model_names()) + (catalog.CUSTOM_MODEL, catalog.ENSEMBLE_MODEL)"
            in MODULE_FILE.read_text(encoding="utf-8"))
    assert catalog.ENSEMBLE_MODEL not in catalog.model_names()


def _calls_in(node: ast.AST) -> set:
    out = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            func = call.func
            out.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return out


INSTALLERS = {"setupPythonRequirements", "pip_install", "installTorch", "pip_ensure"}


def test_nothing_is_installed_at_import_or_in_setup():
    tree = _module_tree()
    top_level = [n for n in tree.body if not isinstance(n, (ast.ClassDef, ast.FunctionDef))]
    assert not _calls_in(ast.Module(body=top_level, type_ignores=[])) & INSTALLERS
    widget = _class(tree, "ZeroShotILDWidget")
    methods = {f.name: f for f in widget.body if isinstance(f, ast.FunctionDef)}
    for name in ("__init__", "setup", "enter", "initializeParameterNode"):
        assert not _calls_in(methods[name]) & INSTALLERS, f"{name} installs packages"
    # ... but the first Apply does, before anything needs torch.
    assert "setupPythonRequirements" in _calls_in(methods["onApplyButton"])
    # Top-level imports stay torch-free so that the module loads before torch is installed.
    heavy = {"torch", "open_clip", "skimage", "ZeroShotILDLib.pipeline", "ZeroShotILDLib.models"}
    for stmt in top_level:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            names = [stmt.module] if isinstance(stmt, ast.ImportFrom) else [a.name for a in stmt.names]
            assert not set(filter(None, names)) & heavy, ast.unparse(stmt)


def test_module_follows_the_scripted_module_template():
    tree = _module_tree()
    bases = {c.name: [ast.unparse(b) for b in c.bases] for c in tree.body if isinstance(c, ast.ClassDef)}
    assert bases["ZeroShotILD"] == ["ScriptedLoadableModule"]
    assert bases["ZeroShotILDWidget"][0] == "ScriptedLoadableModuleWidget"
    assert bases["ZeroShotILDLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["ZeroShotILDTest"] == ["ScriptedLoadableModuleTest"]
    logic = {f.name for f in _class(tree, "ZeroShotILDLogic").body if isinstance(f, ast.FunctionDef)}
    assert {"process", "reprompt", "getParameterNode", "setupPythonRequirements"} <= logic
    test = _class(tree, "ZeroShotILDTest")
    run = next(f for f in test.body if isinstance(f, ast.FunctionDef) and f.name == "runTest")
    assert "test_ZeroShotILD_CTChest" in _calls_in(run)
    source = ast.unparse(test)
    assert "'CTChest'" in source and "'tiny-random'" in source and "images_encoded" in source
    # Help text: method, limits and citation; acknowledgement set.
    module_init = ast.unparse(_class(tree, "ZeroShotILD"))
    for phrase in ("not a diagnostic device", "How to cite", "acknowledgementText", "DOCS_URL"):
        assert phrase in module_init


def test_cmake_ships_every_module_file_and_resource():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"\$\{MODULE_NAME\}(MRML/\w+\.py|\.py)", cmake))
    on_disk = {"MRML/" + p.name for p in (MODULE_DIR / "ZeroShotILDMRML").glob("*.py")} | {".py"}
    assert listed == on_disk, f"CMakeLists.txt MODULE_PYTHON_SCRIPTS differs from the files: {sorted(listed ^ on_disk)}"
    for resource in re.findall(r"Resources/[\w/]+/\$\{MODULE_NAME\}\.\w+", cmake):
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "ZeroShotILD")).is_file(), resource
    assert "WITH_GENERIC_TESTS" in cmake and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    extension = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"?PyTorch"?\)', extension)
    assert "add_subdirectory(ZeroShotILD)" in extension
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL"):
        assert key in extension
    assert (REPO / "Resources" / "Icons" / "ZeroShotILD.png").is_file()


def test_every_mrml_widget_gets_the_scene():
    root = ET.parse(UI_FILE).getroot()
    mrml_widgets = {w.get("name") for w in root.iter("widget") if w.get("class", "").startswith("qMRML")
                    and w.get("name") != root.find("widget").get("name")}
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml_widgets and mrml_widgets <= receivers, f"no setMRMLScene connection for {sorted(mrml_widgets - receivers)}"


# ----------------------------------------------------------------------------------------------
# Methods Slicer's Python cannot call
# ----------------------------------------------------------------------------------------------
#: Qt/MRML widget methods that Slicer does not expose to Python (PythonQt wraps only slots,
#: properties and Q_INVOKABLE methods; these are plain public C++ methods, so calling them raises
#: AttributeError inside Slicer although they are in the C++ API docs). Checked against
#: Libs/MRML/Widgets/qMRMLTableModel.h and qMRMLTableView.h of Slicer 5.6.2 and 5.8.1. Add a
#: method here when Slicer turns out not to wrap it.
UNEXPOSED_METHODS = {
    "mrmlTableRowIndex": "qMRMLTableModel: plain public method",
    "mrmlTableColumnIndex": "qMRMLTableModel: plain public method",
    "removeSelectionFromMRML": "qMRMLTableModel: plain public method",
    "updateModelFromMRML": "qMRMLTableModel: plain public method",
    "updateMRMLFromModel": "qMRMLTableModel: plain public method",
    "selectedMRMLTableColumnIndices": "qMRMLTableView: plain public method, not Q_INVOKABLE",
}


def _module_python_files() -> list:
    return [MODULE_FILE, *sorted((MODULE_DIR / "ZeroShotILDMRML").glob("*.py"))]


def _attribute_calls(tree: ast.AST) -> list:
    """(method name, line) of every ``something.method(...)`` call and ``getattr(x, "method")``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute):
                out.append((node.func.attr, node.lineno))
            elif isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                out.append((node.args[1].value, node.lineno))
    return out


def test_the_module_calls_no_method_slicer_does_not_expose():
    files = _module_python_files()
    assert len(files) >= 8
    found = []
    for path in files:
        for name, line in _attribute_calls(ast.parse(path.read_text(encoding="utf-8"))):
            if name in UNEXPOSED_METHODS:
                found.append(f"{path.name}:{line} calls {name} ({UNEXPOSED_METHODS[name]})")
    assert not found, "; ".join(found)


def test_the_unexposed_method_scan_sees_a_call():
    # The scan must catch the call the panel used to make (AttributeError in Slicer 5.6/5.8).
    bad = "row = view.tableModel().mrmlTableRowIndex(view.sortFilterProxyModel().mapToSource(index))"
    assert [n for n, _ in _attribute_calls(ast.parse(bad)) if n in UNEXPOSED_METHODS] == ["mrmlTableRowIndex"]
    assert [n for n, _ in _attribute_calls(ast.parse("getattr(model, 'mrmlTableColumnIndex')(i)"))
            if n in UNEXPOSED_METHODS] == ["mrmlTableColumnIndex"]


def test_patch_selection_reads_the_rank_from_the_views_model():
    widget = _class(_module_tree(), "ZeroShotILDWidget")
    method = next(f for f in widget.body if isinstance(f, ast.FunctionDef) and f.name == "onPatchSelected")
    calls = _calls_in(method)
    assert {"currentIndex", "headerData", "rank_from_table_cells", "jumpToPatch"} <= calls


# ----------------------------------------------------------------------------------------------
# Parameter node wrapper: no "Unused annotations" warnings
# ----------------------------------------------------------------------------------------------
#: What slicer.parameterNodeWrapper (5.6, 5.8) consumes in an Annotated[...]: validators and
#: Default. Anything else (e.g. guiConnectors.Decimals, SingleStep) is logged as
#: "Unused annotations: [...]" at every Slicer start.
WRAPPER_ANNOTATIONS = {"WithinRange", "Choice", "Minimum", "Maximum", "Exclude", "RangeBounds", "IsInstance",
                       "NotNone", "IsNone", "Default"}


def test_parameter_node_annotations_are_all_used_by_the_wrapper():
    cls = _class(_module_tree(), "ZeroShotILDParameterNode")
    annotated = 0
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.annotation, ast.Subscript) \
                and ast.unparse(stmt.annotation.value) == "Annotated":
            annotated += 1
            extras = stmt.annotation.slice.elts[1:]
            for extra in extras:
                name = ast.unparse(extra.func if isinstance(extra, ast.Call) else extra)
                assert name in WRAPPER_ANNOTATIONS, f"{stmt.target.id}: {name} would log 'Unused annotations'"
    assert annotated >= 16


def test_float_widgets_set_their_decimals_and_step_in_the_ui():
    # Decimals and steps live in the .ui (the wrapper does not use annotations for them).
    widgets = _ui_widgets()
    fields = _wrapper_fields()
    for name, (cls, props) in widgets.items():
        parameter = props.get("SlicerParameterName")
        if parameter and fields[parameter][0] == "float" and cls in ("QDoubleSpinBox", "ctkSliderWidget"):
            assert "decimals" in props and "singleStep" in props, f"{name} ({parameter}) lacks decimals/singleStep"


# ----------------------------------------------------------------------------------------------
# Extensions Index readiness
# ----------------------------------------------------------------------------------------------
def _github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _readme_anchors() -> set:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    in_code, anchors = False, set()
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            anchors.add(_github_anchor(line.lstrip("#")))
    return anchors


def test_homepage_and_help_link_point_at_a_real_readme_heading():
    assert _github_anchor("Installing the module in 3D Slicer") == "installing-the-module-in-3d-slicer"
    anchors = _readme_anchors()
    extension = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', extension).group(1)
    assert "#" in homepage and homepage.split("#", 1)[1] in anchors, homepage
    docs = re.search(r'DOCS_URL = "([^"]+)"', MODULE_FILE.read_text(encoding="utf-8")).group(1)
    assert docs == homepage
    assert "<a href" in ast.unparse(_class(_module_tree(), "ZeroShotILD"))


def test_license_file_matches_pyproject():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")  # Slicer 5.8: Python 3.9

    licence = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["license"]
    licence = licence if isinstance(licence, str) else licence.get("text", "")
    assert licence == "Apache-2.0"
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10000  # the full text, not a stub


def test_extension_and_module_category_is_the_chest_imaging_platform():
    # SlicerCIP and SlicerLungCTAnalyzer list themselves under "Chest Imaging Platform".
    extension = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r'set\(EXTENSION_CATEGORY "Chest Imaging Platform"\)', extension)
    assert 'translate("qSlicerAbstractCoreModule", "Chest Imaging Platform")' in MODULE_FILE.read_text(encoding="utf-8")


def test_self_test_installs_and_downloads_nothing_unless_everything_is_there():
    test = _class(_module_tree(), "ZeroShotILDTest")
    methods = {f.name: f for f in test.body if isinstance(f, ast.FunctionDef)}
    run = methods["runTest"]
    # The analysis part runs only after analysisSkipReason() said it may.
    body = [ast.unparse(stmt) for stmt in run.body]
    skip_at = next(i for i, line in enumerate(body) if "analysisSkipReason" in line)
    heavy_at = next(i for i, line in enumerate(body) if "test_ZeroShotILD_CTChest" in line)
    assert skip_at < heavy_at and any("return" in line for line in body[skip_at:heavy_at])
    reason = ast.unparse(methods["analysisSkipReason"])
    for needed in ("SKIP_ANALYSIS_ENV", "'CI'", "missing_requirements", "torch_installed"):
        assert needed in reason, needed
    static = methods["test_ZeroShotILD_static"]
    assert not _calls_in(static) & (INSTALLERS | {"downloadSample", "process", "startProcess"})
