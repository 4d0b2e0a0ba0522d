"""The module's panel hosted the way Slicer hosts Python, outside pytest (issue 23).

Used by ``test_slicer_light_process.py`` (run in a fresh interpreter, so that ``sys.modules``
afterwards shows exactly what the module's path imported into "Slicer's process") and by
``bench/bench_slicer_apply.py`` (main-thread time to apply a result). It is the same host as
``test_slicer_event_loop.py``'s: ``ZeroShotILD.py`` with the application-only modules stood in for
(``test_slicer_logic._stand_ins``), the real widget methods with inert Qt stand-ins, the real logic,
worker process and slicer-core scene, and a main thread that holds the GIL between 100 ms polls
(``usleep`` through ``ctypes.PyDLL``, as Slicer's Qt event loop never releases it).

    .venv/bin/python Testing/slicer_host.py --check-light [CT.nii.gz]   # prints one JSON line

Only torch-free imports at module level: whatever this file imports lands in the checked process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "ZeroShotILD", REPO / "Testing", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

#: Modules that must never be imported into Slicer's own process (the worker has them).
HEAVY = ("torch", "open_clip", "lightning", "pytorch_lightning", "torchvision")
POLL_US = 100_000  # the widget's POLL_INTERVAL_MS
_LIBC = None


def hold_gil_sleep(us: int = POLL_US) -> None:
    """Sleep as Slicer's event loop waits: without releasing the GIL (PyDLL calls keep it)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.PyDLL(ctypes.util.find_library("c"))
    _LIBC.usleep(us)


def heavy_modules() -> list:
    """The heavy top-level packages imported into this process so far."""
    return sorted(name for name in HEAVY if name in sys.modules)


def load_module():
    """ZeroShotILD.py imported with the application-only modules (qt, ctk, ...) stood in for."""
    from test_slicer_logic import _stand_ins

    sys.modules.update(_stand_ins())
    spec = importlib.util.spec_from_file_location("ZeroShotILD", REPO / "ZeroShotILD" / "ZeroShotILD.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ZeroShotILD"] = module
    spec.loader.exec_module(module)
    return module


class _QtStandIn:
    """Any Qt widget: attributes spring into existence, calls do nothing, set values are kept."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        child = _QtStandIn()
        object.__setattr__(self, name, child)
        return child

    def __call__(self, *args, **kwargs):
        return _QtStandIn()


def panel_widget(module, volume):
    """The module's widget with stand-ins for its Qt parts, a real logic and ``volume`` as its input."""
    widget = module.ZeroShotILDWidget()
    widget.ui = _QtStandIn()
    widget.logic = module.ZeroShotILDLogic()
    widget._pollTimer = _Timer()
    widget._parameterNode = widget.logic.getParameterNode()
    widget._parameterNode.inputVolume = volume
    return widget


class _Timer:
    def __init__(self):
        self.active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class Host:
    """The widget on a real logic and scene; ``run()`` is Slicer's event loop for its poll timer.

    ``poll_s`` collects the main-thread time of every ``_pollJob`` call of the last ``run()``: the
    longest one is the freeze a user would see (the poll that applies the result to the scene).
    """

    def __init__(self, module, headless, volume, temp_dir):
        import slicer

        self.errors = []
        slicer.app = types.SimpleNamespace(
            temporaryPath=str(temp_dir), testingEnabled=lambda: True, setOverrideCursor=lambda *a: None,
            restoreOverrideCursor=lambda: None, applicationLogic=lambda: headless.app_logic)
        sys.modules["qt"] = _QtStandIn()  # slicer.util's wait cursor imports qt
        slicer.util.errorDisplay = lambda text, *a, **k: self.errors.append(text)
        widget = panel_widget(module, volume)
        self.widget, self.logic, self.scene, self.volume = widget, widget.logic, headless.scene, volume
        self.poll_s = []

    def set(self, **fields) -> None:
        from ZeroShotILDLib.settings import AnalysisSettings

        self.logic.settingsToParameterNode(AnalysisSettings(**fields).validate())

    def press_apply(self) -> float:
        """Press Apply; returns its main-thread seconds (writing the voxels, sending the request)."""
        t0 = time.perf_counter()
        self.widget.onApplyButton()
        return time.perf_counter() - t0

    def run(self, timeout_s: float) -> float:
        """Poll like the module's QTimer, holding the GIL in between; returns the wall seconds it took."""
        self.poll_s = []
        t0 = time.monotonic()
        while self.widget._pollTimer.active:
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"not finished after {timeout_s} s: {self.status}")
            hold_gil_sleep()
            p0 = time.perf_counter()
            self.widget._pollJob()
            self.poll_s.append(time.perf_counter() - p0)
        return time.monotonic() - t0

    @property
    def status(self) -> str:
        return str(self.widget.ui.statusLabel.text)

    def close(self) -> None:
        self.widget.cleanup()


def host_for(path=None, temp_dir=None):
    """(module, host) on the CT at ``path`` (NIfTI), or on a small IPF phantom when ``path`` is None."""
    import tempfile

    from ZeroShotILDMRML.headless import add_ct_volume, make_scene

    module = load_module()
    if path is None:
        from ZeroShotILDLib.phantom import generate_phantom

        p = generate_phantom(3, shape_zyx=(48, 128, 128), spacing_mm=(2.5, 2.5, 5.0),
                             subtype="idiopathic pulmonary fibrosis")
        hu, spacing, origin, direction = p.hu, p.spacing_mm, p.origin_mm, p.direction
    else:
        from ZeroShotILDLib.scan import read_scan

        scan = read_scan(Path(path))
        hu, spacing, origin, direction = scan.hu, scan.spacing_mm, scan.origin_mm, scan.direction
    headless = make_scene()
    volume = add_ct_volume(headless.scene, hu, spacing, origin, direction, "Chest CT")
    return module, Host(module, headless, volume, temp_dir or tempfile.mkdtemp(prefix="zsild-host-"))


def check_light(path=None) -> dict:
    """Run the module's whole path in this process; report what it imported and what it did."""
    from ZeroShotILDMRML import mrml_results

    module, host = host_for(path)
    out = {"after_load": heavy_modules()}
    settings = dict(model="tiny-random", device="cpu", scoring_mode="exact", slice_step_mm=6.0 if path else 5.0,
                    patch_mm=30.0, top_k=4, prompts=["honeycombing"])
    try:
        host.set(**settings)
        host.press_apply()
        host.run(timeout_s=600.0)
        result = host.logic.session.result
        out["apply"] = {"prompt": result.primary_prompt if result else None, "errors": list(host.errors)}
        out["after_apply"] = heavy_modules()
        out["patterns"] = host.logic.resultNodes().patterns is not None

        host.set(**{**settings, "prompts": ["emphysema"]})
        host.press_apply()  # only the prompt changed: a re-prompt in the worker
        host.run(timeout_s=120.0)
        out["reprompt"] = {"prompt": host.logic.session.result.primary_prompt, "errors": list(host.errors),
                           "heatmap": host.logic.resultNodes().heatmap.GetName()}
        out["after_reprompt"] = heavy_modules()

        # What the panel's result buttons do.
        host.logic.setHeatmapRange(mrml_results.FIXED_RANGE)
        host.logic.setHeatmapOpacity(0.4)
        host.logic.jumpToPatch(1)
        host.logic.jumpToPatchInTableRow(0)
        if host.logic.resultNodes().extent_chart is not None:
            host.logic.showExtentChart()
        host.logic.summary(), host.logic.details(), host.logic.extentSummary()
        report = host.logic.saveReport(str(Path(module.slicer.app.temporaryPath) / "report.html"))
        montage = host.logic.saveMontage(str(Path(module.slicer.app.temporaryPath) / "montage.png"))
        out["outputs"] = [Path(report).is_file(), Path(montage).is_file()]
        out["after_report"] = heavy_modules()
    finally:
        host.close()
    out["worker_stopped"] = not host.logic.workerClient().alive
    return out


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-light", action="store_true", help="run the module's path and print a JSON line")
    parser.add_argument("ct", nargs="?", help="NIfTI CT (default: a small phantom)")
    args = parser.parse_args(argv)
    if not args.check_light:
        parser.error("nothing to do: pass --check-light")
    print(json.dumps(check_light(args.ct)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
