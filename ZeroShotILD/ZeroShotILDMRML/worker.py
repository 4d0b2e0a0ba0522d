"""The analysis worker: a child process that runs the engine for the Slicer module.

Why a process: Slicer hosts Python without thread support, so its main thread holds the GIL while
it waits in the Qt event loop and a Python thread there barely runs (notes: "Python threads inside
Slicer"). A child process runs at full speed whatever the main thread does, isolates crashes (CUDA
errors, out of memory) and gives its GPU memory back when it exits. It stays alive while the
module is used, keeping the loaded model, the last analysed scan and its patch embeddings, so a new
prompt re-ranks in a fraction of a second. It runs the same ``Analyzer`` with the same
``AnalysisSettings`` as the command line. Start it with Slicer's own Python (``PythonSlicer``; any
Python with the engine's packages in tests): ``python -m ZeroShotILDMRML.worker``, with the folders
holding ``ZeroShotILDMRML`` and ``ZeroShotILDLib`` on ``PYTHONPATH`` (the client passes them on the
command line instead, ``worker_client.BOOTSTRAP``). This file imports neither
``slicer`` nor (at import time) torch; ``worker_client.WorkerClient`` is the Slicer side.

Protocol, version 1 (``PROTOCOL``)
----------------------------------
One JSON object per line, UTF-8, on the worker's stdin (requests) and stdout (events). The worker
moves its own file descriptor 1 to stderr before importing anything, so a library that prints
cannot corrupt the protocol. stderr is free text (log lines, tracebacks); the client keeps its last
lines to explain a crash. Requests carry an integer ``id`` chosen by the client; every event about
a request repeats it.

Requests (client -> worker):

- ``{"op": "hello", "protocol": 1}``: the worker answers with a ``hello`` event with ``"answer": true``
  (it also sends one unasked when it starts). The answer proves that requests reach the worker; a
  client that gets none in time, or another ``protocol`` than its own, stops the worker.
- ``{"op": "analyse", "id": 1, "volume": "<path>.npy", "spacing_mm": [x, y, z], "origin_mm": [x, y, z],
  "direction": [9 floats, row-major LPS], "source": "<name>", "settings": {AnalysisSettings.to_dict()},
  "out": "<folder>", "slice_positions_mm": [z0, z1, ...] or null, "placed_by": "<transform name>"}``:
  analyse the CT in the ``.npy`` file ([z, y, x] HU, any real dtype; the worker deletes the file once
  it has read it); ``slice_positions_mm`` (optional) are the true slice positions of an interval series
  (``scan.place_slices``). Keeps the analysis for re-prompts when it succeeds; a
  failed or cancelled analysis leaves the previous one in place.
- ``{"op": "reprompt", "id": 2, "settings": {"prompts": [...], "negatives": [...] or null,
  "subtypes": [...], "top_k": 16, "retrieval": "clip", "montage_size": 4, "seed": 0, "patterns": [...],
  "normal_prompt": "normal lung", "subpleural_mm": 10.0, "extent_z": 3.0}, "exact": true,
  "out": "<folder>"}``: new prompts, ranking, extent and pattern-map settings on the kept analysis
  (``REPROMPT_FIELDS``; the values to use, not a
  difference, so both sides always agree on them). With ``exact`` in fast mode, a first ``result``
  with ``"final": false`` (the instant preview) is followed by the exact re-scoring of the new
  prompt's best candidates (``Analyzer.reprompt(exact=True)``) and a final ``result``. A new
  analyse/reprompt request arriving during that re-scoring cancels it (``cancelled`` event).
- ``{"op": "download", "id": 3, "model": "<registry name>", "weights_dir": "<folder>" or null}``: fetch
  the model's openly licensed weights (``ZeroShotILDLib.weights_download``: pinned revision, SHA-256
  checked, resumable), with ``progress`` events in MB; the final ``result`` carries ``"weights": "<folder>"``
  instead of a result folder. Added in protocol 1 without a version change: an older worker answers it
  with an ``error`` (unknown request), which the panel shows.
- Files: the worker owns only the private folder its client made for this session (``mkdtemp``,
  mode 0700), named in the environment variable ``ZEROSHOT_ILD_WORKER_SESSION`` when it is started.
  ``volume`` must be a regular ``.npy`` file inside it and ``out`` a folder inside it; anything else is
  an ``input`` error, and then nothing is read, written or deleted. Without that folder (a worker
  started by hand) no analyse request is served.
- ``{"op": "cancel", "id": 1}``: stop request 1 (read by a thread, so it lands while the engine
  runs: the engine stops at its next check, between batches). A client that sees no ``cancelled``
  within a second stops the worker instead.
- ``{"op": "shutdown"}``: exit. The worker also exits when its stdin closes (Slicer exited or was
  killed) and when its parent process changes (POSIX).

Events (worker -> client):

- ``{"event": "hello", "protocol": 1, "pid": 123, "python": "3.9.10", "answer": false}``
- ``{"event": "progress", "id": 1, "stage": "encoding patches", "done": 64, "total": 412}``
- ``{"event": "result", "id": 1, "path": "<folder>", "final": true}``: the ``AnalysisResult`` is in the
  folder (``result.json`` + ``arrays.npz``, see :func:`write_result`; the lung mask only for an
  analyse). The client reads it and deletes the folder.
- ``{"event": "cancelled", "id": 1}``
- ``{"event": "error", "id": 1, "kind": "input" | "internal", "message": "<one line>"}``: ``input`` is a
  problem the user can fix (``InputError``); after an ``internal`` error (a bug, out of memory, a CUDA
  error) the worker exits, so the next request starts a fresh one. ``id`` is null for a request
  that could not be read.
"""
from __future__ import annotations

import json
import os
import platform
import queue
import stat
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

PROTOCOL = 1

#: Settings a re-prompt request carries and may change (``session.reprompt_changes`` uses the same set):
#: prompts, ranking, montage, and the extent and pattern map, which read the kept patch embeddings.
REPROMPT_FIELDS = ("prompts", "negatives", "subtypes", "top_k", "retrieval", "montage_size", "seed",
                   "patterns", "normal_prompt", "subpleural_mm", "extent_z", "extent_min_neighbours")
#: Seconds between checks that the parent process is still the one that started the worker.
PARENT_CHECK_S = 1.0
#: Least seconds between two progress events of one stage (the last one of a stage is always sent).
PROGRESS_INTERVAL_S = 0.05


# ----------------------------------------------------------------------------------------------
# Results on disk (both sides; numpy only)
# ----------------------------------------------------------------------------------------------
def write_result(result, folder, *, with_lung_mask: bool = True) -> Path:
    """Write an ``AnalysisResult`` as ``folder/arrays.npz`` + ``folder/result.json`` (written last)."""
    import numpy as np

    from ZeroShotILDLib.atomic_files import atomic_path, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = result.patches
    prompts = list(result.patch_probabilities)
    arrays = {
        "slice_index": p.slice_index, "row0": p.row0, "col0": p.col0, "lung_fraction": p.lung_fraction,
        "center_ras_mm": p.center_ras_mm, "ranked": np.asarray(result.ranked),
        "montage_indices": np.asarray(result.montage_indices), "montage": result.montage,
    }
    for k, prompt in enumerate(prompts):
        arrays[f"probability_{k}"] = np.asarray(result.patch_probabilities[prompt])
    if with_lung_mask:
        arrays["lung_mask"] = result.lung_mask
    pm = result.patterns
    if pm is not None:
        arrays["pattern_labels"], arrays["pattern_scores"] = pm.labels, pm.scores
    with atomic_path(folder / "arrays.npz") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    meta = {
        "settings": result.settings.to_dict(), "model_name": result.model_name,
        "model_meaningful": bool(result.model_meaningful), "model_warning": result.model_warning,
        "source": result.source,
        "shape_zyx": [int(v) for v in result.shape_zyx], "spacing_mm": [float(v) for v in result.spacing_mm],
        "lung_volume_ml": float(result.lung_volume_ml), "size_rows": int(p.size_rows), "size_cols": int(p.size_cols),
        "prompts": prompts,
        "finding_probabilities": [[k, float(v)] for k, v in result.finding_probabilities.items()],
        "subtype_probabilities": [[k, float(v)] for k, v in result.subtype_probabilities.items()],
        "notes": list(result.notes), "timings_s": {k: float(v) for k, v in result.timings_s.items()},
        "encoded_exactly": None if result.encoded_exactly is None else int(result.encoded_exactly),
        "extent": result.extent, "zones": result.zones,
        "patterns": None if pm is None else {"names": list(pm.names), "normal_prompt": pm.normal_prompt,
                                             "colours": [list(c) for c in pm.colours], "extent": pm.extent,
                                             "rule": pm.rule},
    }
    atomic_write_text(folder / "result.json", json.dumps(meta))
    return folder


def read_result(folder, *, lung_mask=None):
    """The ``AnalysisResult`` in ``folder``; ``lung_mask`` stands in where the folder has none (re-prompts)."""
    import numpy as np

    from ZeroShotILDLib.results import AnalysisResult, PatchSet
    from ZeroShotILDLib.settings import AnalysisSettings

    folder = Path(folder)
    meta = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    with np.load(folder / "arrays.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    patches = PatchSet(arrays["slice_index"], arrays["row0"], arrays["col0"], meta["size_rows"], meta["size_cols"],
                       arrays["lung_fraction"], arrays["center_ras_mm"])
    return AnalysisResult(
        settings=AnalysisSettings.from_dict(meta["settings"]), model_name=meta["model_name"],
        model_meaningful=meta["model_meaningful"], source=meta["source"], shape_zyx=tuple(meta["shape_zyx"]),
        spacing_mm=tuple(meta["spacing_mm"]), lung_mask=arrays.get("lung_mask", lung_mask),
        lung_volume_ml=meta["lung_volume_ml"], patches=patches,
        patch_probabilities={prompt: arrays[f"probability_{k}"] for k, prompt in enumerate(meta["prompts"])},
        ranked=arrays["ranked"], montage_indices=arrays["montage_indices"], montage=arrays["montage"],
        finding_probabilities=dict(meta["finding_probabilities"]),
        subtype_probabilities=dict(meta["subtype_probabilities"]), notes=list(meta["notes"]),
        timings_s=dict(meta["timings_s"]), encoded_exactly=meta["encoded_exactly"],
        model_warning=meta.get("model_warning", ""), extent=meta.get("extent") or {},
        zones=meta.get("zones") or {}, patterns=_read_patterns(meta.get("patterns"), arrays),
    )


def _read_patterns(record, arrays):
    if record is None:
        return None
    from ZeroShotILDLib.patterns import PatternMap

    return PatternMap(names=list(record["names"]), normal_prompt=record["normal_prompt"], labels=arrays["pattern_labels"],
                      scores=arrays["pattern_scores"], colours=[tuple(c) for c in record["colours"]],
                      extent=record["extent"], rule=record["rule"])


def one_line(text: str, limit: int = 300) -> str:
    """First non-empty line of ``text``, shortened: what the panel can show."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[:limit - 1] + "…"


# ----------------------------------------------------------------------------------------------
# The worker process
# ----------------------------------------------------------------------------------------------
class _Job:
    def __init__(self, request: dict):
        from ZeroShotILDLib.progress import CancelToken

        self.id = request.get("id")
        self.request = request
        self.token = CancelToken()
        #: A re-prompt's exact re-scoring: a newer request cancels it instead of waiting for it.
        self.supersedable = False


class _JobCancel:
    """The ``CancelToken`` the analyzers hold for their lifetime: it asks the current job's token."""

    def __init__(self, worker: "Worker"):
        self._worker = worker

    def _token(self):
        job = self._worker.current
        return job.token if job is not None else None

    def cancel(self) -> None:
        token = self._token()
        if token is not None:
            token.cancel()

    @property
    def cancelled(self) -> bool:
        token = self._token()
        return token is not None and token.cancelled

    def raise_if_cancelled(self) -> None:
        token = self._token()
        if token is not None:
            token.raise_if_cancelled()


class Worker:
    """Reads requests (a thread, so that cancel lands while the engine runs) and runs them in order."""

    def __init__(self, out_fd: int):
        self._out = out_fd
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._requests: "queue.Queue[Optional[dict]]" = queue.Queue()
        self._cancelled_ids: set = set()
        self.current: Optional[_Job] = None
        self.analyzer = None
        self._model = None
        self._model_key = None
        self._cache = None
        self._cancel = _JobCancel(self)
        self._last_progress = (None, 0.0)

    # -- output ------------------------------------------------------------------------------
    def send(self, event: str, **fields) -> None:
        data = (json.dumps({"event": event, **fields}) + "\n").encode("utf-8")
        with self._write_lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._out, view):]

    def _progress(self, stage: str, done: int, total: int) -> None:
        job = self.current
        if job is None:
            return
        now = time.monotonic()
        last_stage, last_time = self._last_progress
        if stage == last_stage and done not in (0, total) and now - last_time < PROGRESS_INTERVAL_S:
            return
        self._last_progress = (stage, now)
        self.send("progress", id=job.id, stage=str(stage), done=int(done), total=int(total))

    # -- input (reader thread) ---------------------------------------------------------------
    def read_requests(self, stream) -> None:
        for raw in stream:
            try:
                request = json.loads(raw)
                if not isinstance(request, dict) or "op" not in request:
                    raise ValueError("not a request object")
            except ValueError as exc:
                self.send("error", id=None, kind="internal", message=f"unreadable request: {one_line(exc)}")
                continue
            op = request["op"]
            with self._lock:
                if op == "cancel":
                    job = self.current
                    if job is not None and job.id == request.get("id"):
                        job.token.cancel()
                    else:
                        self._cancelled_ids.add(request.get("id"))
                    continue
                if op in ("analyse", "reprompt", "shutdown") and self.current is not None and (
                        self.current.supersedable or op == "shutdown"):
                    self.current.token.cancel()
            self._requests.put(request)
        # stdin closed: the client is gone (Slicer exited or was killed). Stop whatever runs.
        with self._lock:
            if self.current is not None:
                self.current.token.cancel()
        self._requests.put(None)

    def watch_parent(self, parent: int) -> None:
        while True:
            time.sleep(PARENT_CHECK_S)
            if os.getppid() != parent:
                os._exit(3)  # orphaned (the parent died without closing our stdin)

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self.send("hello", protocol=PROTOCOL, pid=os.getpid(), python=platform.python_version(), answer=False)
        while True:
            request = self._requests.get()
            if request is None or request["op"] == "shutdown":
                return 0
            op = request["op"]
            if op == "hello":
                self.send("hello", protocol=PROTOCOL, pid=os.getpid(), python=platform.python_version(), answer=True)
                continue
            if op not in ("analyse", "reprompt", "download"):
                self.send("error", id=request.get("id"), kind="internal", message=f"unknown request '{op}'")
                continue
            if not self._run_job(request):
                return 1

    def _run_job(self, request: dict) -> bool:
        """Run one analyse/reprompt request; False after an internal error (the worker then exits)."""
        from ZeroShotILDLib.errors import Cancelled, InputError

        job = _Job(request)
        with self._lock:
            self.current = job
            if job.id in self._cancelled_ids:
                self._cancelled_ids.discard(job.id)
                job.token.cancel()
        self._last_progress = (None, 0.0)
        try:
            job.token.raise_if_cancelled()
            if request["op"] == "analyse":
                self._analyse(job)
            elif request["op"] == "download":
                self._download(job)
            else:
                self._reprompt(job)
        except Cancelled:
            self.send("cancelled", id=job.id)
        except InputError as exc:
            self.send("error", id=job.id, kind="input", message=one_line(exc))
        except BaseException as exc:  # noqa: BLE001 - reported in one line; the traceback goes to stderr
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            self.send("error", id=job.id, kind="internal", message=f"{type(exc).__name__}: {one_line(exc)}")
            return False
        finally:
            with self._lock:
                self.current = None
        return True

    def _analyse(self, job: _Job) -> None:
        import numpy as np

        from ZeroShotILDLib.embeddings import EmbeddingCache
        from ZeroShotILDLib.ensemble import EnsembleAnalyzer, is_ensemble
        from ZeroShotILDLib.pipeline import Analyzer
        from ZeroShotILDLib.scan import place_slices, scan_from_array
        from ZeroShotILDLib.settings import AnalysisSettings

        r = job.request
        settings = AnalysisSettings.from_dict(r["settings"]).validate()
        # Both checked before anything is read, written or deleted (see "Files" in the protocol).
        volume = session_volume(r.get("volume"))
        session_path(r.get("out"), "result folder")
        try:
            # The same conversion as ``volumes.scan_from_volume_node`` in-process: a private int16 copy.
            scan = scan_from_array(np.load(volume, mmap_mode="r", allow_pickle=False), r["spacing_mm"],
                                   r["origin_mm"], r["direction"], source=r.get("source", ""))
            place_slices(scan, r.get("slice_positions_mm"), r.get("placed_by", ""))
        finally:
            try:
                volume.unlink(missing_ok=True)
            except OSError:  # still mapped (Windows); the client removes its folder at shutdown
                pass
        if self._cache is None:
            self._cache = EmbeddingCache()
        key = _model_key(settings)
        if is_ensemble(settings.model):
            analyzer = EnsembleAnalyzer(settings, progress=self._progress, cancel=self._cancel, cache=self._cache)
        else:
            model = self._model if key == self._model_key else None
            analyzer = Analyzer(settings, progress=self._progress, cancel=self._cancel, model=model, cache=self._cache)
        result = analyzer.analyze(scan)
        self.analyzer = analyzer  # only now: a failed or cancelled run keeps the previous analysis
        if not is_ensemble(settings.model):
            self._model, self._model_key = analyzer.model, key
        self.send("result", id=job.id, path=str(write_result(result, session_path(r["out"], "result folder"))),
                  final=True)

    def _download(self, job: _Job) -> None:
        from ZeroShotILDLib.weights_download import download_model

        r = job.request

        def progress(stage: str, done: int, total: int) -> None:
            self.send("progress", id=job.id, stage=stage, done=int(done), total=int(total))

        folder = download_model(str(r["model"]), r.get("weights_dir") or None,
                                log=lambda line: print(f"ZeroShotILD worker: {line}", file=sys.stderr, flush=True),
                                progress_bars=False, progress=progress)
        self.send("result", id=job.id, weights=str(folder), final=True)

    def _reprompt(self, job: _Job) -> None:
        from ZeroShotILDLib.errors import InputError

        analyzer = self.analyzer
        if analyzer is None:
            raise InputError("the analysis worker holds no analysis (it was restarted): press Apply to analyse again")
        r = job.request
        out = session_path(r.get("out"), "result folder")
        values = {k: v for k, v in r["settings"].items() if k in REPROMPT_FIELDS}
        prompts, negatives, subtypes = values.pop("prompts"), values.pop("negatives", None), values.pop("subtypes", None)
        result = analyzer.reprompt(prompts, negatives, subtypes, **values)
        if r.get("exact", True) and _needs_exact_rescoring(analyzer):
            self.send("result", id=job.id, path=str(write_result(result, out / "preview",
                                                                 with_lung_mask=False)), final=False)
            with self._lock:
                job.supersedable = True
                if not self._requests.empty():  # a newer request is already waiting
                    job.token.cancel()
            result = analyzer.reprompt(exact=True)
        self.send("result", id=job.id, path=str(write_result(result, out / "final", with_lung_mask=False)),
                  final=True)


#: Set by ``worker_client.WorkerClient`` to the private folder it made for this worker.
SESSION_ENV = "ZEROSHOT_ILD_WORKER_SESSION"


def session_folder() -> Optional[Path]:
    """The client's private folder for this worker (resolved), or None when there is no usable one.

    Usable: a real folder (not a link) of this user that only this user can enter (``mkdtemp``'s
    0700; not checked on Windows, which has no such bits).
    """
    text = os.environ.get(SESSION_ENV)
    if not text:
        return None
    try:
        st = os.lstat(text)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    if os.name == "posix" and (st.st_uid != os.getuid() or st.st_mode & 0o077):
        return None
    return Path(os.path.realpath(text))


def session_path(path, what: str) -> Path:
    """``path`` if it lies inside the session folder (after resolving links), else an InputError line."""
    from ZeroShotILDLib.errors import InputError

    session = session_folder()
    if session is None:
        raise InputError(f"the analysis worker has no session folder from its client ({SESSION_ENV}): {what} refused, "
                         "nothing read or deleted")
    if not isinstance(path, str) or not path:
        raise InputError(f"the request names no {what}")
    real = Path(os.path.realpath(path))
    if real == session or session not in real.parents:
        raise InputError(f"{what} {path} is outside the worker's session folder: refused, nothing read, written or "
                         "deleted")
    return real


def session_volume(path) -> Path:
    """The request's volume: a regular ``.npy`` file (not a link) inside the session folder."""
    from ZeroShotILDLib.errors import InputError

    real = session_path(path, "volume")
    if real.suffix != ".npy":
        raise InputError(f"volume {path} is not a .npy file written by the client: refused, nothing read or deleted")
    st = os.lstat(path)  # missing: FileNotFoundError, the client's own bug (an internal error)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"volume {path} is not a regular file: refused, nothing read or deleted")
    return real


def _model_key(settings) -> tuple:
    return (settings.model, settings.checkpoint, settings.weights_dir, settings.device)


def _needs_exact_rescoring(analyzer) -> bool:
    members = getattr(analyzer, "analyzers", None) or [analyzer]  # an ensemble re-scores each member
    return any(getattr(a, "needs_exact_rescoring", False) for a in members)


def main() -> int:
    # Protocol on a private copy of stdout; anything else that writes to fd 1 lands in stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    worker = Worker(out_fd)
    threading.Thread(target=worker.read_requests, args=(sys.stdin.buffer,), name="requests", daemon=True).start()
    if os.name == "posix":
        threading.Thread(target=worker.watch_parent, args=(os.getppid(),), name="parent", daemon=True).start()
    code = worker.run()
    sys.stderr.flush()
    # Daemon threads may sit in a blocking read; leave without waiting for them (torch's own
    # threads and CUDA memory go with the process).
    os._exit(code)


if __name__ == "__main__":
    main()
