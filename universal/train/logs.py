"""The training log: a CSV row per step, TensorBoard scalars, progress lines, and the validation log."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from universal.core.atomic import atomic_output

CSV_COLUMNS = ("step", "loss", "bce", "dice", "lr", "seconds", "grad_norm")
VAL_COLUMNS = ("step", "dataset", "case_id", "class", "dice")
TRAIN_LOG_NAME = "train_log.csv"
VAL_LOG_NAME = "val_log.csv"

log = logging.getLogger("universal.train")


class TrainLog:
    """The CSV log (rewritten up to ``start_step`` on resume), TensorBoard scalars and a progress line in the log
    every ``print_every`` steps."""

    def __init__(self, out_dir: Path, start_step: int, total_steps: int, print_every: int) -> None:
        self.csv_path = out_dir / TRAIN_LOG_NAME
        kept = read_rows(self.csv_path, start_step)
        self._file = self.csv_path.open("w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
        self._csv.writeheader()
        self._csv.writerows(kept)
        self._file.flush()
        self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start_step + 1)
        self.total_steps = total_steps
        self.print_every = print_every

    def write(self, row: dict) -> None:
        self._csv.writerow({k: row[k] for k in CSV_COLUMNS})
        self._file.flush()
        step = row["step"]
        for key in ("loss", "bce", "dice", "lr", "grad_norm"):
            self._tb.add_scalar(f"train/{key}", row[key], step)
        if step % self.print_every == 0 or step in (1, self.total_steps):
            log.info("step %d/%d loss %.4f (bce %.4f dice %.4f) lr %.2e %.2f s/step", step, self.total_steps,
                     row["loss"], row["bce"], row["dice"], row["lr"], row["seconds"])

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def truncate_log(path: Path, columns: tuple[str, ...], up_to_step: int) -> None:
    """Rewrite a CSV log with its rows of steps <= ``up_to_step`` only (a resumed run redoes the others)."""
    if not path.exists():
        return
    kept = read_rows(path, up_to_step)
    with atomic_output(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)


def read_rows(path: Path, up_to_step: int) -> list[dict]:
    """Rows of an existing CSV log with step <= ``up_to_step`` (the rest are redone after a resume)."""
    if up_to_step == 0 or not path.exists():
        return []
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["step"]) <= up_to_step]


def write_val_rows(path: Path, rows: list[dict], step: int) -> None:
    """Append validation rows to ``val_log.csv`` and log the mean Dice (over non-NaN values)."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=VAL_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    values = [r["dice"] for r in rows if not math.isnan(r["dice"])]
    mean = sum(values) / len(values) if values else float("nan")
    log.info("step %d validation: mean Dice %.4f over %d (case, class) pairs", step, mean, len(values))
