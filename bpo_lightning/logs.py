"""The run's metrics file: Lightning's CSV logger, made to keep what an earlier attempt of the run logged.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when its folder is not empty, so a resumed run (or a
refused one) lost every earlier row. ``RunCSVLogger`` appends instead: the rows of every attempt stay, in order,
under one header (widened when a later attempt logs new metrics).

Metrics are mostly float32 tensors that Lightning hands over as Python floats, which print with float32's rounding
error (``0.8999999761581421``). A value that is exactly a float32 number is written in float32's shortest form
(``0.9``): reading it back gives the same float32; other values are written as they are.
"""

from __future__ import annotations

import csv
import math

import numpy as np
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

_F32_MAX = float(np.finfo(np.float32).max)


def _shortest(value):
    if not isinstance(value, float) or not math.isfinite(value) or abs(value) > _F32_MAX:
        return value
    if float(np.float32(value)) == value:  # compared in float64
        return float(str(np.float32(value)))
    return value


class _AppendingWriter(ExperimentWriter):
    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        super().log_metrics({key: _shortest(value) for key, value in metrics_dict.items()}, step)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the run's ``metrics.csv`` instead of replacing it (same arguments)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
