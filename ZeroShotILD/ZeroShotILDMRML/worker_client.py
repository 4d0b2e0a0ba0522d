"""The Slicer side of the analysis worker (``worker.py``): start it, talk to it, never wait for it.

``WorkerClient`` starts the worker on first use and keeps it; ``analyse``/``reprompt`` send a request
and return a ``WorkerJob`` at once. Nothing here blocks or needs a thread: the pipes are read
without blocking whenever the UI's timer calls ``job.poll()`` (every 100 ms in the module), which
also notices a worker that died and escalates a cancel the worker did not acknowledge in time.
Only ``WorkerJob.wait`` blocks (console use and tests). No Qt, no ``slicer`` import: the same code
runs in Slicer and under plain Python in CI.

The CT goes to the worker as a ``.npy`` file in a private temporary folder, written straight from
the array the caller passes (in the module: ``arrayFromVolume``, a view of the node's own voxels,
so the Slicer process holds no second copy); the worker deletes it once read. Results come back as
files (``worker.write_result``) and are read here, on the caller's thread.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Optional

from ZeroShotILDLib.errors import Cancelled, InputError

from . import worker as protocol

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

#: A cancel the worker has not acknowledged after this many seconds stops the worker (it may sit in
#: a long step with no cancel check, e.g. one large encoder batch on a CPU).
CANCEL_GRACE_S = 0.8
#: Seconds a new worker has to answer the client's ``hello`` (it imports no torch before answering).
HELLO_TIMEOUT_S = 60.0
#: Lines of the worker's stderr kept to explain a crash.
STDERR_LINES = 20
#: ``python -c`` program that starts the worker with the module's folders (its arguments) on ``sys.path``:
#: the same as ``python -m ZeroShotILDMRML.worker`` with them on ``PYTHONPATH``, but independent of
#: how a launcher such as ``PythonSlicer`` sets ``PYTHONPATH``.
BOOTSTRAP = "import sys; sys.path[:0] = sys.argv[1:]; del sys.argv[1:]; from ZeroShotILDMRML.worker import main; main()"

log = logging.getLogger("ZeroShotILD.worker")


class WorkerError(RuntimeError):
    """The worker failed: it died, or reported an internal error. The message is one line for the panel."""


class WorkerJob:
    """One request to the worker, polled like a background job: ``poll()``, ``state``, ``result``, ``error``.

    A re-prompt may deliver a preview before its final result: ``take_preview()`` returns it once.
    """

    def __init__(self, client: "WorkerClient", job_id: int, kind: str, folder: Path, lung_mask=None):
        self.client, self.id, self.kind, self.folder = client, job_id, kind, folder
        #: Set by the caller: the session the result belongs to, and a re-prompt's requested settings.
        self.session = None
        self.settings = None
        self.state = RUNNING
        self.result = None
        self.error: Optional[BaseException] = None
        self.preview = None
        self.previewed = False  # a preview arrived (the job is in its exact re-scoring)
        self._lung_mask = lung_mask
        self._events: list = []
        self._cancel_sent_at: Optional[float] = None
        self._superseded = False

    # -- the poll-style API ------------------------------------------------------------------
    def poll(self) -> list:
        """Progress reports ``(stage, done, total)`` since the last poll, oldest first. Never blocks."""
        self.client.pump()
        out, self._events = self._events, []
        return out

    def take_preview(self):
        """The preview result that arrived since the last call, or None."""
        preview, self.preview = self.preview, None
        return preview

    def cancel(self) -> None:
        if self.state == RUNNING and self._cancel_sent_at is None:
            self._cancel_sent_at = time.monotonic()
            self.client._send({"op": "cancel", "id": self.id}, quiet=True)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_sent_at is not None

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the job ends (console and tests); True if it ended."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if end is not None and time.monotonic() >= end:
                return False
            self.client.pump(wait_s=0.05)
        return True

    # -- called by the client ----------------------------------------------------------------
    def _finish(self, state: str, result=None, error: Optional[BaseException] = None) -> None:
        if self.state != RUNNING:
            return
        self.state, self.result, self.error = state, result, error
        shutil.rmtree(self.folder, ignore_errors=True)

    def _on_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            self._events.append((str(event.get("stage", "")), int(event.get("done", 0)), int(event.get("total", 0))))
        elif kind == "result" and self.kind == "download":
            # The weights stay where they were written; only a cancel that came too late is honoured.
            if self._cancel_sent_at is not None:
                self._finish(CANCELLED, error=Cancelled("cancelled by the user"))
            else:
                self._finish(SUCCEEDED, str(event.get("weights", "")))
        elif kind == "result":
            if self._cancel_sent_at is not None:
                # Finished before the cancel landed: the user asked for the scene as it was.
                shutil.rmtree(event["path"], ignore_errors=True)
                if event.get("final", True):
                    self._finish(CANCELLED, error=Cancelled("cancelled by the user"))
                return
            result = protocol.read_result(event["path"], lung_mask=self._lung_mask)
            shutil.rmtree(event["path"], ignore_errors=True)
            if event.get("final", True):
                self._finish(SUCCEEDED, result)
            else:
                self.preview, self.previewed = result, True
        elif kind == "cancelled":
            self._finish(CANCELLED, error=Cancelled("cancelled by the user"))
        elif kind == "error":
            message = str(event.get("message", "the worker reported an error"))
            if event.get("kind") == "input":
                self._finish(FAILED, error=InputError(message))
            else:
                self._finish(FAILED, error=WorkerError(f"the analysis worker failed: {message}"))


class WorkerClient:
    """Starts the worker on first use, sends requests, and reads its events without blocking.

    ``python``: the interpreter to run it (Slicer: ``PythonSlicer``; default ``sys.executable``).
    ``env``: the environment to start it in (default ``os.environ``); the folders holding
    ``ZeroShotILDMRML`` and ``ZeroShotILDLib`` are put in front of its ``sys.path`` (``BOOTSTRAP``).
    ``temp_dir``: where the private folder for volumes and results is made.
    """

    def __init__(self, *, python: Optional[str] = None, env: Optional[dict] = None,
                 temp_dir: Optional[str] = None, cancel_grace_s: float = CANCEL_GRACE_S):
        self.python = python or sys.executable
        self.env = env
        self.temp_dir = temp_dir
        self.cancel_grace_s = cancel_grace_s
        self.process: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None
        #: Id of the analyse request whose analysis the running worker keeps (for re-prompts).
        self.analysis_id: Optional[int] = None
        self._ids = itertools.count(1)
        self._jobs: dict = {}
        self._stdout = _PipeReader()
        self._stderr = _PipeReader()
        self._stderr_tail: list = []
        self._hello: Optional[dict] = None
        self._started_at = 0.0
        self._folder: Optional[Path] = None
        self._finalizer = None

    # -- process -----------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start a fresh worker (stopping any previous one)."""
        self.shutdown()
        import ZeroShotILDLib

        paths = [str(Path(__file__).resolve().parent.parent), str(Path(ZeroShotILDLib.__file__).resolve().parent.parent)]
        env = dict(self.env if self.env is not None else os.environ)
        env["PYTHONIOENCODING"] = "utf-8"
        self._folder = Path(tempfile.mkdtemp(prefix="ZeroShotILD-worker-", dir=self.temp_dir))
        # The worker reads volumes from, deletes in and writes results to this folder only (worker.SESSION_ENV).
        env["ZEROSHOT_ILD_WORKER_SESSION"] = str(self._folder)
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # a Ctrl-C in Slicer's terminal is not meant for the worker
        self.process = subprocess.Popen([self.python, "-c", BOOTSTRAP, *dict.fromkeys(paths)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=env,
                                        cwd=str(self._folder), close_fds=True, **kwargs)
        self.pid = self.process.pid
        self._stdout = _PipeReader(self.process.stdout)
        self._stderr = _PipeReader(self.process.stderr)
        self._stderr_tail, self._hello, self.analysis_id = [], None, None
        self._started_at = time.monotonic()
        # If the client is dropped (module reloaded) or Python exits, the worker goes too.
        self._finalizer = weakref.finalize(self, _close_and_stop, self.process, self._folder)
        self._send({"op": "hello", "protocol": protocol.PROTOCOL})

    def shutdown(self, timeout_s: float = 2.0) -> None:
        """Ask the worker to exit, stop it if it does not, and remove the temporary folder."""
        process, folder = self.process, self._folder
        self.process, self._folder, self.analysis_id = None, None, None
        for job in list(self._jobs.values()):
            job._finish(CANCELLED, error=Cancelled("the analysis worker was shut down"))
        self._jobs.clear()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is not None:
            try:
                _write(process, {"op": "shutdown"})
                process.stdin.close()
            except OSError:
                pass
            _stop_process(process, folder, timeout_s=timeout_s)

    # -- requests ----------------------------------------------------------------------------
    def analyse(self, hu, spacing_mm, origin_mm, direction, source: str, settings, slice_positions_mm=None,
                placed_by: str = "") -> WorkerJob:
        """Analyse the CT ``hu`` ([z, y, x]; written to a temporary file here) with ``settings``.

        The first five arguments are those of ``scan_from_array`` (``volumes.scan_inputs`` in Slicer);
        the worker calls it with them, as the in-process path does."""
        import numpy as np

        from ZeroShotILDLib.atomic_files import atomic_path

        if not self.alive:
            self.start()
        job_id = next(self._ids)
        folder = self._folder / f"job-{job_id}"
        folder.mkdir()
        volume = folder / "volume.npy"
        with atomic_path(volume) as tmp, open(tmp, "wb") as handle:
            np.save(handle, hu, allow_pickle=False)
        job = WorkerJob(self, job_id, "analyse", folder)
        self._jobs[job_id] = job
        self._send({"op": "analyse", "id": job_id, "volume": str(volume), "spacing_mm": [float(v) for v in spacing_mm],
                    "origin_mm": [float(v) for v in origin_mm], "direction": [float(v) for v in direction],
                    "source": source, "settings": settings.to_dict(), "out": str(folder / "result"),
                    "slice_positions_mm": None if slice_positions_mm is None else [float(v) for v in slice_positions_mm],
                    "placed_by": placed_by})
        return job

    def download(self, model: str, weights_dir: Optional[str] = None) -> WorkerJob:
        """Fetch an openly licensed model's weights in the worker (progress in MB); ``job.result`` is the folder.

        A cancel that the worker cannot answer at once stops it (the transfer is one blocking read);
        the bytes received stay in a ``.part`` file that the next download continues.
        """
        if not self.alive:
            self.start()
        job_id = next(self._ids)
        folder = self._folder / f"job-{job_id}"
        folder.mkdir()
        job = WorkerJob(self, job_id, "download", folder)
        self._jobs[job_id] = job
        self._send({"op": "download", "id": job_id, "model": str(model), "weights_dir": weights_dir or None})
        return job

    def reprompt(self, settings, *, exact: bool = True, lung_mask=None) -> WorkerJob:
        """Re-rank the kept analysis for ``settings``' prompts and ranking fields (see the protocol)."""
        if not self.alive or self.analysis_id is None:
            raise InputError("the analysis worker holds no analysis (it was restarted): press Apply to analyse again")
        for job in self._jobs.values():  # a running exact re-scoring is superseded, not waited for
            if job.kind == "reprompt" and job.state == RUNNING:
                job._superseded = True
                job._finish(CANCELLED, error=Cancelled("superseded by a newer prompt"))
        job_id = next(self._ids)
        folder = self._folder / f"job-{job_id}"
        folder.mkdir()
        job = WorkerJob(self, job_id, "reprompt", folder, lung_mask=lung_mask)
        self._jobs[job_id] = job
        values = {k: getattr(settings, k) for k in protocol.REPROMPT_FIELDS}
        self._send({"op": "reprompt", "id": job_id, "settings": values, "exact": bool(exact), "out": str(folder / "result")})
        return job

    # -- reading -----------------------------------------------------------------------------
    def pump(self, wait_s: float = 0.0) -> None:
        """Handle everything the worker has written so far; ``wait_s`` > 0 may block that long (console)."""
        if self.process is None:
            return
        if wait_s > 0:
            self._stdout.wait(wait_s)
        for line in self._stderr.lines():
            self._stderr_tail = (self._stderr_tail + [line])[-STDERR_LINES:]
            log.info("ZeroShotILD worker: %s", line)
        for line in self._stdout.lines():
            try:
                event = json.loads(line)
            except ValueError:
                log.warning("ZeroShotILD worker: unreadable line on the protocol channel")
                continue
            self._on_event(event)
            if self.process is None:  # the event stopped the worker (another protocol version)
                return
        if self._stdout.eof or self.process.poll() is not None:
            self._on_exit()
            return
        now = time.monotonic()
        if self._hello is None and now - self._started_at > HELLO_TIMEOUT_S:
            self._fail_all(WorkerError(f"the analysis worker did not answer within {HELLO_TIMEOUT_S:.0f} s "
                                       f"({self.python}); see the log for its messages"))
            self.shutdown(timeout_s=0.5)
            return
        for job in list(self._jobs.values()):
            if job.state == RUNNING and job._cancel_sent_at is not None and now - job._cancel_sent_at > self.cancel_grace_s:
                log.info("ZeroShotILD worker: no answer to cancel within %.1f s; stopping the worker", self.cancel_grace_s)
                job._finish(CANCELLED, error=Cancelled("cancelled by the user (the worker was stopped)"))
                self.shutdown(timeout_s=0.5)
                return
        self._jobs = {k: j for k, j in self._jobs.items() if j.state == RUNNING}

    def _on_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "hello":
            if event.get("answer"):
                self._hello = event
            if event.get("protocol") != protocol.PROTOCOL:
                error = WorkerError(f"the analysis worker speaks protocol {event.get('protocol')}, this module "
                                    f"{protocol.PROTOCOL}: restart Slicer after updating the extension")
                self._fail_all(error)
                self.shutdown(timeout_s=0.5)
            return
        job = self._jobs.get(event.get("id"))
        if job is not None and job._superseded:
            job = None
        if job is None:
            if kind == "error":
                log.warning("ZeroShotILD worker: %s", event.get("message"))
            elif kind == "result":
                shutil.rmtree(event["path"], ignore_errors=True)
            return
        job._on_event(event)
        if kind == "result" and event.get("final", True) and job.kind == "analyse":
            # The worker now keeps this analysis; if the result was discarded (cancelled too late),
            # it matches no session in the scene.
            self.analysis_id = job.id if job.state == SUCCEEDED else None
        if kind == "error" and event.get("kind") != "input":
            self.analysis_id = None  # the worker exits after an internal error

    def _on_exit(self) -> None:
        process = self.process
        try:
            code = process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # stdout closed but the process lingers: stop it
            _kill_tree(process)
            code = process.wait()
        else:
            if os.name != "nt":
                # The process we started is gone; with the PythonSlicer launcher (build trees) the
                # worker is its child and may still run: end what is left of its process group.
                _kill_tree(process)
        # Events still in the pipe (e.g. the error line an internal error sends before exiting).
        for line in self._stdout.lines():
            try:
                self._on_event(json.loads(line))
            except ValueError:
                pass
        reason = _exit_reason(code)
        last = next((line for line in reversed(self._stderr_tail) if line.strip()), "")
        message = f"the analysis worker stopped unexpectedly ({reason})"
        if last:
            message += f"; last message: {protocol.one_line(last, 200)}"
        message += "; press Apply to start a new one"
        self._fail_all(WorkerError(message))
        self.process = process  # so that shutdown() removes the folder
        self.shutdown(timeout_s=0.1)

    def _fail_all(self, error: BaseException) -> None:
        for job in list(self._jobs.values()):
            job._finish(FAILED, error=error)

    def _send(self, request: dict, quiet: bool = False) -> None:
        try:
            _write(self.process, request)
        except OSError:  # the worker is gone; the next pump() reports why
            if not quiet:
                self.pump()


def worker_python(launcher: Optional[str]) -> str:
    """The interpreter to start the worker with, given Slicer's ``PythonSlicer`` launcher (or None).

    ``PythonSlicer`` is a CTK application launcher: it sets up the environment, then runs
    ``python-real`` beside it as a child QProcess. CTKAppLauncher 0.1.31 (what Slicer 5.6 and 5.8
    ship) forwards its stdin to that child (``setInputChannelMode(ForwardedInputChannel)``, since
    2018), so the worker's protocol works through it; it was checked with a launcher built from
    that source. ``python-real`` is still preferred: Slicer itself was started through the same
    launcher settings, so its environment (which the worker inherits) already is the one
    ``PythonSlicer`` would build, and without the launcher in between the pid we start is the
    worker itself (one process less; killing the launcher does not kill its child, which is why
    ``_kill_tree`` ends the whole process group). The launcher is the fallback (build trees name
    the interpreter ``python``), and ``sys.executable`` outside Slicer.
    """
    if not launcher:
        return sys.executable
    folder = Path(launcher).resolve().parent
    for name in ("python-real.exe", "python-real") if os.name == "nt" else ("python-real",):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return launcher


def _write(process, request: dict) -> None:
    if process is None or process.stdin is None:
        raise BrokenPipeError("no worker")
    data = (json.dumps(request) + "\n").encode("utf-8")
    view = memoryview(data)
    while view:
        view = view[os.write(process.stdin.fileno(), view):]


def _exit_reason(code: int) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ", e.g. out of memory" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


def _close_and_stop(process, folder) -> None:
    """Close the worker's stdin (it exits on its own at end of input), then stop it like ``shutdown``."""
    try:
        process.stdin.close()
    except OSError:
        pass
    _stop_process(process, folder)


def _kill_tree(process) -> None:
    """Kill the process we started and every process it started (the whole worker), at once.

    With the ``PythonSlicer`` launcher as fallback (``worker_python``) the process we start is the
    CTK launcher and the worker is its child: killing only the launcher's pid leaves the worker
    running until it notices that its parent changed. On POSIX the worker was started in a session
    of its own (``start_new_session``), so its process group is exactly the launcher, the worker and
    their children; on Windows ``taskkill /T`` ends the tree.
    """
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False,
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # the group is already empty
            pass
    if process.poll() is None:
        process.kill()


def _stop_process(process, folder, timeout_s: float = 2.0) -> None:
    """Wait a little for the worker to leave, then kill it; remove its temporary folder."""
    if process is not None and process.poll() is None:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_tree(process)
            process.wait()
    if process is not None:
        for stream in (process.stdin, process.stdout, process.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


class _PipeReader:
    """Reads whatever a pipe holds without blocking and splits it into lines.

    POSIX: the pipe is switched to non-blocking mode. Windows (where Slicer's Python 3.9 cannot make
    a pipe non-blocking): ``PeekNamedPipe`` says how many bytes are waiting and only those are read.
    The Windows branch is not exercised by the tests (they run on Linux).
    """

    def __init__(self, stream=None):
        self.stream = stream
        self.eof = stream is None
        self._buffer = b""
        self._peek = None
        if stream is not None:
            if os.name == "nt":
                self._peek = _windows_peek(stream.fileno())
            else:
                os.set_blocking(stream.fileno(), False)

    def _read(self) -> bytes:
        fd = self.stream.fileno()
        chunks = []
        while True:
            if self._peek is not None:
                available = self._peek()
                if available is None:
                    self.eof = True
                    break
                if available == 0:
                    break
                data = os.read(fd, available)
            else:
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
            if not data:
                self.eof = True
                break
            chunks.append(data)
        return b"".join(chunks)

    def lines(self) -> list:
        if self.stream is None or self.stream.closed:
            return []
        self._buffer += self._read()
        *complete, self._buffer = self._buffer.split(b"\n")
        if self.eof and self._buffer:
            complete.append(self._buffer)
            self._buffer = b""
        return [line.decode("utf-8", "replace").rstrip("\r") for line in complete if line.strip()]

    def wait(self, timeout_s: float) -> None:
        """Block until the pipe is readable or ``timeout_s`` passed (console waits only)."""
        if self.stream is None or self.stream.closed:
            return
        if self._peek is None:
            import select

            select.select([self.stream.fileno()], [], [], timeout_s)
        else:
            time.sleep(timeout_s)


def _windows_peek(fd: int):
    """A function returning the bytes waiting in pipe ``fd`` (None once the writer has closed it)."""
    import ctypes
    import msvcrt
    from ctypes import wintypes

    handle = msvcrt.get_osfhandle(fd)
    peek = ctypes.windll.kernel32.PeekNamedPipe
    peek.argtypes = [wintypes.HANDLE, ctypes.c_void_p, wintypes.DWORD, ctypes.c_void_p,
                     ctypes.POINTER(wintypes.DWORD), ctypes.c_void_p]
    peek.restype = wintypes.BOOL

    def available() -> Optional[int]:
        count = wintypes.DWORD(0)
        if not peek(handle, None, 0, None, ctypes.byref(count), None):
            return None  # ERROR_BROKEN_PIPE: the worker closed its end
        return int(count.value)

    return available
