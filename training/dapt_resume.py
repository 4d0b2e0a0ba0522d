"""Stopping and resuming a DAPT run: signals end in a resumable checkpoint, SLURM requeues, and the checks
a resume must pass."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ZeroShotILDLib import models
from ZeroShotILDLib.errors import InputError

from .dapt_checkpoints import RESUME_NAME
from .dapt_config import DaptConfig
from .lightning_required import L
from .run_json import jsonable


class RunInterrupted(Exception):
    """SIGTERM/SIGINT stopped a run after a resumable checkpoint was written.

    ``exit_code`` is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), what a shell
    reports for a process ended by that signal; ``result`` is the partial :class:`FitResult`.
    """

    def __init__(self, signal_name: str, exit_code: int, result: "FitResult"):
        super().__init__(f"interrupted by {signal_name} at step {result.global_step}: a resumable checkpoint is in "
                         f"{Path(result.output_dir) / 'checkpoints' / RESUME_NAME}; resume with --resume")
        self.signal_name = signal_name
        self.exit_code = exit_code
        self.result = result


class _SignalCatcher(L.Callback):
    """Turn SIGTERM/SIGINT into a stop at the next step boundary, then write a resumable checkpoint.

    SIGTERM is Lightning's own notifier (it raises ``SIGTERMException`` after the current batch);
    SIGINT is routed to the same path here instead of Lightning's KeyboardInterrupt handling,
    which would exit 1 in the middle of a step without a checkpoint.
    """

    def __init__(self, checkpoints: Path):
        self.checkpoints = checkpoints
        self.signal_name: Optional[str] = None
        self._previous: dict = {}

    def install(self, trainer) -> None:
        import signal

        def handler(signum, frame):
            self.signal_name = signal.Signals(signum).name
            # Lightning stops after the current batch and raises SIGTERMException.
            trainer._signal_connector.received_sigterm = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)

    def uninstall(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        # A signal can also surface as another error: Ctrl+C reaches data-loader workers too, and
        # the loader then fails between two steps. The state is a step boundary either way.
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and self.signal_name is None:
            return
        self.signal_name = self.signal_name or ("SIGINT" if isinstance(exception, KeyboardInterrupt) else "SIGTERM")
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(self.checkpoints / RESUME_NAME), weights_only=False)
        if trainer.is_global_zero:
            pl_module.export(self.checkpoints / "last.safetensors", global_step=int(trainer.global_step),
                             epoch=int(trainer.current_epoch))


def _signal_number(name: str) -> int:
    import signal

    return int(getattr(signal, name, signal.SIGTERM))


#: Settings that may differ when a run is resumed (they do not change what is trained).
RESUMABLE_CHANGES = ("output_dir", "max_steps", "max_epochs", "progress_bar", "num_workers", "logger",
                     "patience_steps")


def check_resume_settings(config: DaptConfig, stored: Optional[dict]) -> None:
    """Refuse (one line) a resume whose settings differ from the run's, listing each difference."""
    if not stored:
        return
    given = config.to_json()
    differ = []
    for name, value in given.items():
        if name in RESUMABLE_CHANGES or name not in stored:
            continue
        old = stored[name]
        if jsonable(old) != jsonable(value) and not (isinstance(old, (int, float)) and isinstance(value, (int, float))
                                                      and float(old) == float(value)):
            differ.append(f"{name} ({_short(old)} -> {_short(value)})")
    if differ:
        raise InputError(f"--resume with settings that differ from the run's: {', '.join(differ)}: give the run's "
                         "own flags (or its --config), or start a new run in another --out")


def _short(value) -> str:
    text = json.dumps(jsonable(value)) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _stored_settings(output: Path) -> Optional[dict]:
    summary = output / "dapt_summary.json"
    if summary.is_file():
        try:
            return json.loads(summary.read_text(encoding="utf-8"))["config"]
        except (ValueError, KeyError, TypeError):
            return None
    last = output / "checkpoints" / "last.safetensors"
    if last.is_file():
        meta = models.read_checkpoint_metadata(last) or {}
        if isinstance(meta.get("training"), dict):
            return meta["training"]
    return None


def _int_or(text, default: int) -> int:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return default


def _slurm_plugins() -> list:
    """SLURMEnvironment(auto_requeue=True) when running under SLURM: on the requeue signal Lightning
    saves a checkpoint and requeues the job, which then resumes (see :func:`fit`)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=True)]
    return []


def _slurm_requeued() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID")) and _int_or(os.environ.get("SLURM_RESTART_COUNT"), 0) > 0


def _resume_source(output: Path, resume_path: Path) -> Optional[Path]:
    """The newest resumable state: ``last.ckpt`` or a Lightning SLURM ``hpc_ckpt_*.ckpt``."""
    candidates = [p for p in [resume_path, *output.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
