"""The panel's progress bar: staged progress reports -> one monotonic fraction and a label (no Qt here).

The analysis itself runs in the worker process (``worker.py``, driven by ``worker_client.py``): a
Python thread cannot do it inside Slicer, whose main thread holds the GIL while it waits in the Qt
event loop (measured: a thread-run analysis of a real CT took 1 s with the GIL released between
polls and did not finish in 120 s with it held, as in Slicer).
"""
from __future__ import annotations

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
