"""Metrics history of a run: ``history.csv`` (one row per epoch) and TensorBoard events.

Only rank 0 creates one. On resume the CSV keeps the rows up to the resumed epoch, so a
resumed run's history reads as if it had never stopped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from medseg import atomic


class MetricsHistory:
    """``log(row)`` appends an epoch row to ``<out>/history.csv`` and its numbers to
    ``<out>/tensorboard`` (tag ``<group>/<name>``, step = epoch)."""

    def __init__(self, out_dir: Path, resume_epoch: int = 0, tensorboard: bool = True) -> None:
        self.path = out_dir / "history.csv"
        self.rows: list[dict[str, Any]] = []
        if resume_epoch > 0 and self.path.is_file():
            frame = pd.read_csv(self.path)
            self.rows = frame[frame["epoch"] <= resume_epoch].to_dict("records")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=resume_epoch + 1)

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        atomic.write_csv(self.path, pd.DataFrame(self.rows))
        if self.writer is not None:
            epoch = int(row["epoch"])
            for key, value in row.items():
                if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(float(value)):
                    group = "val" if key.startswith("val_") else "train"
                    self.writer.add_scalar(f"{group}/{key}", float(value), epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
