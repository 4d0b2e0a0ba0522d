"""A background job with staged progress and cancel, polled from the UI thread (no Qt here).

Why a thread and not a child ``PythonSlicer`` process (as MONAIAuto3DSeg does): the re-prompt must
re-rank from the patch embeddings and the loaded text encoder of the last run in well under a
second, so both have to stay in this process; a child process would have to be kept alive as a
server or reload the model for every prompt. Python threads do run inside Slicer (MONAIAuto3DSeg
reads its child process's output in a ``threading.Thread`` into a queue that a ``QTimer`` drains,
the pattern used here); the heavy work (torch, numpy, scikit-image) releases
the GIL, so Slicer's event loop keeps running; the worker never touches MRML (it gets a private copy
of the voxels and returns an ``AnalysisResult``), so the scene is only changed on the main thread
after a successful run, and a cancelled run leaves it as it was. Cancel sets the engine's
``CancelToken``, which the pipeline checks between batches, so the thread stops within one batch.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

from ZeroShotILDLib.errors import Cancelled
from ZeroShotILDLib.progress import CancelToken

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

#: Expected stages of a full run with their share of the time on a typical scan (ViT-B/32, CPU).
STAGES = (
    ("loading model", 5.0),
    ("lung mask", 10.0),
    ("encoding patches", 75.0),
    ("scoring prompts", 3.0),
    ("building montage", 5.0),
    ("done", 2.0),
)


class StagedProgress:
    """Turns ``(stage, done, total)`` reports into one monotonic fraction and a label.

    Stages the table above does not name (the lung mask reports its own sub-steps) count towards the
    stage that comes before the encoding, so the bar never jumps backwards.
    """

    def __init__(self, stages=STAGES):
        self.names = [name for name, _ in stages]
        total = sum(weight for _, weight in stages)
        self.start = {}
        acc = 0.0
        for name, weight in stages:
            self.start[name] = (acc / total, weight / total)
            acc += weight
        self.fraction = 0.0
        self.label = "starting"

    def update(self, stage: str, done: int, total: int) -> float:
        key = stage if stage in self.start else self._stage_for(stage)
        begin, share = self.start[key]
        part = (done / total) if total else 0.0
        self.fraction = max(self.fraction, min(1.0, begin + share * max(0.0, min(1.0, part))))
        self.label = f"{stage} ({done}/{total})" if total > 1 else stage
        return self.fraction

    def _stage_for(self, stage: str) -> str:
        return "lung mask" if "lung" in stage or "airway" in stage or "mask" in stage else self._current()

    def _current(self) -> str:
        for name in reversed(self.names):
            begin, _ = self.start[name]
            if begin <= self.fraction:
                return name
        return self.names[0]


class BackgroundJob:
    """Runs ``work(progress, cancel)`` in a daemon thread.

    The UI calls :meth:`poll` on a timer to drain progress reports, and reads :attr:`state`,
    :attr:`result` and :attr:`error` once it is no longer ``RUNNING``.
    """

    def __init__(self, work: Callable, name: str = "ZeroShotILD"):
        self._work = work
        self._events: "queue.Queue[tuple]" = queue.Queue()
        self.cancel_token = CancelToken()
        self.state = RUNNING
        self.result = None
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "BackgroundJob":
        self._thread.start()
        return self

    def _progress(self, stage: str, done: int, total: int) -> None:
        self._events.put((stage, int(done), int(total)))

    def _run(self) -> None:
        try:
            result = self._work(self._progress, self.cancel_token)
        except Cancelled as exc:
            self.error, state = exc, CANCELLED
        except BaseException as exc:  # noqa: BLE001 - handed to the UI thread, which reports it
            self.error, state = exc, (CANCELLED if self.cancel_token.cancelled else FAILED)
        else:
            self.result, state = result, (CANCELLED if self.cancel_token.cancelled else SUCCEEDED)
        self.state = state

    def cancel(self) -> None:
        self.cancel_token.cancel()

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_token.cancelled

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    def poll(self) -> list:
        """Progress reports since the last poll, oldest first."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the work ends (console and tests); True if it ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
