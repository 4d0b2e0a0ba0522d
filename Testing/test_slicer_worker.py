"""The analysis worker process and its client (ZeroShotILDMRML/worker.py, worker_client.py), without Slicer.

Neither file imports ``slicer`` or Qt, so the protocol is tested here under plain Python: the raw
JSON lines of the worker, one-line errors, versions, orphan handling and the client's recovery.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, tiny_settings

sys.path.insert(0, str(REPO / "ZeroShotILD"))

from ZeroShotILDLib.errors import InputError  # noqa: E402
from ZeroShotILDMRML import worker, worker_client  # noqa: E402
from ZeroShotILDMRML.worker_client import WorkerClient, WorkerError  # noqa: E402


def _spawn(session=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "ZeroShotILD"), str(REPO)]))
    if session is not None:  # what WorkerClient passes: the private folder the worker may use
        env[worker.SESSION_ENV] = str(session)
    return subprocess.Popen([sys.executable, "-m", "ZeroShotILDMRML.worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _event(process) -> dict:
    return json.loads(process.stdout.readline())


def test_raw_protocol_hello_bad_request_and_internal_error(tmp_path):
    session = tmp_path / "session"
    session.mkdir(mode=0o700)
    process = _spawn(session)
    try:
        hello = _event(process)
        assert hello["event"] == "hello" and hello["protocol"] == worker.PROTOCOL and hello["pid"] == process.pid
        process.stdin.write(b"this is not json\n")
        process.stdin.write(json.dumps({"op": "hello", "protocol": worker.PROTOCOL}).encode() + b"\n")
        process.stdin.flush()
        bad = _event(process)
        assert bad["event"] == "error" and bad["id"] is None and "unreadable request" in bad["message"]
        assert _event(process)["event"] == "hello"
        # A volume file that is not there: an internal error in one line, then the worker exits.
        request = {"op": "analyse", "id": 7, "volume": str(session / "missing.npy"), "spacing_mm": [1, 1, 1],
                   "origin_mm": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1], "source": "x",
                   "settings": tiny_settings().to_dict(), "out": str(session / "out")}
        process.stdin.write(json.dumps(request).encode() + b"\n")
        process.stdin.flush()
        error = _event(process)
        assert error["event"] == "error" and error["id"] == 7 and error["kind"] == "internal"
        assert "FileNotFoundError" in error["message"] and "\n" not in error["message"]
        assert process.wait(timeout=30) == 1
        assert "Traceback" in process.stderr.read().decode()  # the details go to the log, not the panel
    finally:
        if process.poll() is None:
            process.kill()


def test_worker_exits_when_its_stdin_closes():
    process = _spawn()
    assert _event(process)["event"] == "hello"
    process.stdin.close()  # what happens when Slicer exits or is killed
    assert process.wait(timeout=30) == 0


def test_result_files_round_trip(small_scan, tiny_model, tmp_path):
    from ZeroShotILDLib.pipeline import Analyzer

    result = Analyzer(tiny_settings(prompts=["honeycombing", "emphysema"]), model=tiny_model).analyze(small_scan)
    back = worker.read_result(worker.write_result(result, tmp_path / "r"))
    for f in dataclasses.fields(result):
        a, b = getattr(result, f.name), getattr(back, f.name)
        if f.name in ("patches", "patterns"):
            assert a is not None, f.name  # the default settings draw a pattern map: it must travel too
            for g in dataclasses.fields(a):
                if isinstance(getattr(a, g.name), np.ndarray):
                    np.testing.assert_array_equal(getattr(a, g.name), getattr(b, g.name))
                else:
                    assert getattr(a, g.name) == getattr(b, g.name), (f.name, g.name)
        elif f.name == "patch_probabilities":
            assert list(a) == list(b)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        elif isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
        else:
            assert a == b, f.name
    # Re-prompt results leave the lung mask out; the caller's stands in.
    mask = np.zeros(1, bool)
    assert worker.read_result(worker.write_result(result, tmp_path / "p", with_lung_mask=False), lung_mask=mask).lung_mask is mask


@pytest.fixture()
def client(tmp_path):
    # No PYTHONPATH: the client puts the module's folders on the worker's sys.path itself.
    c = WorkerClient(temp_dir=str(tmp_path), env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    yield c
    c.shutdown()


def _analyse(client, phantom, **settings):
    p = phantom
    return client.analyse(p.hu, p.spacing_mm, p.origin_mm, p.direction, "phantom",
                          tiny_settings(slice_step_mm=10.0, **settings).validate())


def test_input_errors_come_back_in_one_line_and_the_worker_stays(client, small_phantom):
    job = _analyse(client, small_phantom, filter_threshold=1.0, patch_mm=190.0)
    assert job.wait(120) and job.state == worker_client.FAILED
    assert isinstance(job.error, InputError) and "\n" not in str(job.error)
    pid = client.pid
    job = _analyse(client, small_phantom)
    assert job.wait(120) and job.state == worker_client.SUCCEEDED and client.pid == pid
    assert client.analysis_id == job.id
    assert not any(client._folder.iterdir()), "job files are removed once read"


def test_reprompt_needs_a_kept_analysis(client):
    with pytest.raises(InputError, match="press Apply"):
        client.reprompt(tiny_settings())


def test_pattern_and_extent_settings_are_a_reprompt_not_a_new_analysis(client, small_phantom, small_scan, tiny_model):
    # The panel's pattern prompts, normal prompt, rind depth and extent cut read the kept embeddings:
    # changing them re-prompts (no lung mask, no encoding), with the same answer as in process.
    pytest.importorskip("slicer", reason="ZeroShotILDMRML.session needs slicer-core (no Python 3.9 wheels)")
    from ZeroShotILDLib.pipeline import Analyzer
    from ZeroShotILDMRML.session import reprompt_changes

    base = tiny_settings(slice_step_mm=10.0).validate()
    changes = dict(patterns=["honeycombing", "emphysema"], normal_prompt="healthy lung", subpleural_mm=5.0,
                   extent_z=2.0)
    changed = dataclasses.replace(base, **changes).validate()
    assert reprompt_changes(base, changed) == changes
    job = _analyse(client, small_phantom)
    assert job.wait(120) and job.state == worker_client.SUCCEEDED, job.error
    again = client.reprompt(changed, lung_mask=job.result.lung_mask)
    assert again.wait(120) and again.state == worker_client.SUCCEEDED, again.error
    got = again.result
    assert "lung_mask_s" not in got.timings_s and "reprompt_s" in got.timings_s
    assert got.patterns.names == changes["patterns"] and got.zones["subpleural_mm"] == 5.0

    local = Analyzer(base, model=tiny_model)
    local.analyze(small_scan)
    want = local.reprompt(**changes)
    np.testing.assert_array_equal(got.patterns.labels, want.patterns.labels)
    assert got.extent == want.extent and got.zones == want.zones


def test_a_worker_with_another_protocol_is_refused(client, small_phantom, monkeypatch):
    monkeypatch.setattr(worker, "PROTOCOL", worker.PROTOCOL + 1)
    job = _analyse(client, small_phantom)
    assert job.wait(120) and job.state == worker_client.FAILED
    assert isinstance(job.error, WorkerError) and "protocol" in str(job.error)
    assert not client.alive


def test_a_dropped_client_leaves_no_worker(tmp_path):
    c = WorkerClient(temp_dir=str(tmp_path))
    c.start()
    process, folder = c.process, c._folder
    t0 = time.monotonic()
    del c  # e.g. the module was reloaded
    assert process.wait(timeout=30) == 0 and not folder.exists()  # it left on its own (end of input)
    assert time.monotonic() - t0 < 2.0


def test_an_unanswered_cancel_stops_the_worker(client, small_phantom):
    job = _analyse(client, small_phantom)
    os.kill(client.pid, __import__("signal").SIGSTOP)  # a worker stuck in a step without cancel checks
    try:
        t0 = time.monotonic()
        job.cancel()
        assert job.wait(5) and job.state == worker_client.CANCELLED
        assert time.monotonic() - t0 < 1.5 and not client.alive
    finally:
        if client.process is not None and client.process.poll() is None:
            os.kill(client.pid, __import__("signal").SIGCONT)


def test_fast_reprompt_sends_a_preview_then_the_exact_result(client, tiny_model):
    from ZeroShotILDLib import proposals
    from ZeroShotILDLib.phantom import generate_phantom

    if not proposals.cpu_has_fast_bf16():
        pytest.skip("the bf16 proposal pass needs a CPU with AMX or AVX512-BF16")
    p = generate_phantom(4, shape_zyx=(40, 128, 128), spacing_mm=(2.5, 2.5, 5.0), ild=True)
    fast = tiny_settings(patch_mm=30.0, scoring_mode="fast", rescore_fraction=0.0, rescore_min=16, top_k=16,
                         prompts=["interstitial lung disease"]).validate()
    job = client.analyse(p.hu, p.spacing_mm, p.origin_mm, p.direction, "phantom", fast)
    assert job.wait(300) and job.state == worker_client.SUCCEEDED, job.error
    job = client.reprompt(dataclasses.replace(fast, prompts=["emphysema"]), lung_mask=job.result.lung_mask)
    assert job.wait(120) and job.state == worker_client.SUCCEEDED, job.error
    preview = job.take_preview()
    assert job.previewed and preview is not None
    assert any("proposal-pass scores" in n for n in preview.notes)
    assert not any("proposal-pass scores" in n for n in job.result.notes)
    # Asking again for the same prompt: already exact, so no preview.
    again = client.reprompt(dataclasses.replace(fast, prompts=["emphysema"]))
    assert again.wait(120) and not again.previewed
    np.testing.assert_array_equal(again.result.ranked, job.result.ranked)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the orphan go")
def test_an_orphaned_worker_exits_even_if_its_stdin_stays_open():
    # The parent dies while another process still holds the write end of the worker's stdin (so no
    # end of input): the worker notices that its parent changed and leaves by itself.
    code = (
        "import os, subprocess, sys\n"
        "r, w = os.pipe()\n"
        "worker = subprocess.Popen([sys.executable, '-m', 'ZeroShotILDMRML.worker'], stdin=r,\n"
        "                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)\n"
        "worker.stdout.readline()  # its hello: it is up and watching its parent\n"
        "keeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], pass_fds=[w],\n"
        "                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(worker.pid, keeper.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "ZeroShotILD"), str(REPO)]))
    middle = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    worker_pid, keeper_pid = (int(v) for v in middle.stdout.split())

    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
                return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    try:
        deadline = time.monotonic() + 10 * worker.PARENT_CHECK_S + 5
        while running(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(worker_pid), "the orphaned worker is still running"
        assert running(keeper_pid)  # its stdin really stayed open
    finally:
        for pid in (worker_pid, keeper_pid):
            if running(pid):
                os.kill(pid, 9)


def test_a_worker_that_never_answers_is_reported(client, small_phantom, monkeypatch):
    # E.g. a launcher that does not pass the worker's input through: the worker starts, hears nothing.
    monkeypatch.setattr(worker_client, "BOOTSTRAP", "import time; time.sleep(60)")
    monkeypatch.setattr(worker_client, "HELLO_TIMEOUT_S", 1.0)
    job = _analyse(client, small_phantom)
    assert job.wait(30) and job.state == worker_client.FAILED
    assert isinstance(job.error, WorkerError) and "did not answer" in str(job.error) and not client.alive


def test_worker_python_prefers_python_real_beside_the_launcher(tmp_path):
    from ZeroShotILDMRML.worker_client import worker_python

    launcher = tmp_path / "bin" / "PythonSlicer"
    launcher.parent.mkdir()
    launcher.write_text("#!/bin/sh\n", encoding="utf-8")
    launcher.chmod(0o755)
    assert worker_python(None) == sys.executable  # outside Slicer
    assert worker_python(str(launcher)) == str(launcher)  # no python-real beside it: the launcher
    real = tmp_path / "bin" / ("python-real.exe" if os.name == "nt" else "python-real")
    real.write_text("#!/bin/sh\n", encoding="utf-8")
    real.chmod(0o755)
    assert worker_python(str(launcher)) == str(real.resolve())


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process (Linux: /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the worker go")
def test_the_launcher_fallback_ends_the_whole_process_tree(tmp_path):
    """Through a launcher (PythonSlicer in a build tree) the worker is the launcher's child.

    The stand-in launcher behaves as CTKAppLauncher 0.1.31 does: it runs the interpreter as a child
    with its own stdin forwarded, and waits for it. The worker answers through it (stdin reaches
    it); when it must be stopped, the launcher and the worker go. The worker is frozen (SIGSTOP)
    first, so it cannot leave by itself (end of input, parent watch): only the client can end it.
    """
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nexit $?\n', encoding="utf-8")
    launcher.chmod(0o755)
    client = WorkerClient(python=str(launcher), temp_dir=str(tmp_path))
    client.start()
    worker_pid = None
    try:
        deadline = time.monotonic() + 60
        while client._hello is None and client.alive and time.monotonic() < deadline:
            client.pump(wait_s=0.1)
        assert client._hello is not None, "no answer through the launcher"
        worker_pid = int(client._hello["pid"])
        assert worker_pid != client.pid and _running(worker_pid) and _running(client.pid)
        os.kill(worker_pid, signal.SIGSTOP)
        launcher_pid = client.pid
        client.shutdown(timeout_s=0.2)  # no answer: the client has to kill
        deadline = time.monotonic() + 10
        while (_running(worker_pid) or _running(launcher_pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(launcher_pid)
        assert not _running(worker_pid), "the worker outlived its launcher"
    finally:
        if worker_pid is not None and _running(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
