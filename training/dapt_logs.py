"""What a DAPT run logs: ``logs/metrics.csv`` (kept across resumes), the chosen logger, throughput, curves,
and Lightning's own start-up chatter turned down."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

from ZeroShotILDLib import csv_files
from ZeroShotILDLib.errors import InputError

from .dapt_config import DaptConfig
from .dapt_resume import _int_or
from .files import atomic_path
from .lightning_required import CSVLogger, L

log = logging.getLogger(__name__)


def _check_logger(config: DaptConfig) -> None:
    """One line before any work when the chosen logger's package is not installed."""
    import importlib.util

    if config.logger == "tensorboard" and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise InputError("--logger tensorboard needs TensorBoard: pip install tensorboard (or use --logger csv)")
    if config.logger == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise InputError("--logger mlflow needs MLflow: pip install mlflow (or use --logger csv)")


class _StepCSVLogger(CSVLogger):
    """``metrics.csv`` with every row numbered by the optimizer steps completed when it was measured,
    as the checkpoints are (``step0000020-…`` and the validation row ``20``; the base model's row is
    ``0``, the first training step's ``1``). Lightning passes the 0-based index of the step."""

    #: Added to Lightning's step; the base model's row is written with ``-STEP_OFFSET``.
    STEP_OFFSET = 1

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(metrics, None if step is None else int(step) + self.STEP_OFFSET)


def _loggers(config: DaptConfig, output: Path) -> list:
    """CSV always (``logs/metrics.csv``, one folder per run, appended to on resume), plus the chosen one."""
    
    loggers = [_StepCSVLogger(str(output), name="logs", version="", flush_logs_every_n_steps=max(1, config.val_every_steps))]
    _check_logger(config)
    if config.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(output), name="tensorboard", version=""))
    elif config.logger == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(experiment_name="zeroshot-ild-dapt", run_name=output.name,
                                    tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or (output / "mlruns").as_uri()))
    return loggers


class _Throughput(L.Callback):
    """Log ``samples_per_s``: pairs of the global batch per second of each training step (data
    loading included, validation not)."""

    def __init__(self):
        self._started: Optional[float] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        if self._started is None:
            return
        elapsed = time.perf_counter() - self._started
        samples = pl_module.config.batch_size * max(1, trainer.world_size)
        if elapsed > 0:
            pl_module.log("samples_per_s", samples / elapsed, on_step=True, on_epoch=False, batch_size=samples)


def _plot_curves(metrics_csv: Path, path: Path) -> Optional[Path]:
    """``curves.png`` beside the summary; a run is never failed by its plot (one warning line)."""
    if not metrics_csv.is_file():
        return None
    try:
        from .plots import plot_training_curves

        return plot_training_curves(metrics_csv, path)
    except Exception as exc:  # matplotlib missing or a broken font cache: the run itself is done
        log.warning("no curves plot (%s): the numbers are in %s", exc, metrics_csv)
        return None


class _FlushLogs(L.Callback):
    """Write the logged metrics to disk after every validation (a crash keeps the curves so far)."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for logger in trainer.loggers:
            logger.save()


class _PreviousLogs:
    """Keeps a resumed run's ``metrics.csv`` rows: Lightning's CSV writer starts the file afresh."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list = []
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as handle:
                self.rows = list(csv_files.DictReader(handle))

    def merge(self, up_to_step: int) -> None:
        if not self.rows or not self.path.is_file():
            return
        with self.path.open(newline="", encoding="utf-8") as handle:
            new = list(csv_files.DictReader(handle))
        old = [r for r in self.rows if _int_or(r.get("step"), -1) < up_to_step]
        rows = old + new
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_path(self.path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv_files.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's start-up lines (GPU/TPU available, LOCAL_RANK, model summary adverts) at WARNING
    for the length of the run: scoped to Lightning's own loggers, never the root logger."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
             "lightning.pytorch.accelerators.cuda", "lightning_fabric")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                            ".*litlogger.*", ".*litmodels.*", ".*Checkpoint directory .* exists and is not empty.*",
                            ".*resuming from a checkpoint that ended before the epoch ended.*",
                            ".*Experiment logs directory .* exists and is not empty.*", ".*treespec.*"):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
