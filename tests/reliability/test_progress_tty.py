"""Progress bars only on a terminal (issue 32): a redirected ``medseg train`` log holds plain
lines (one per epoch), no bar frames; on a terminal the bars are still drawn."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

from medseg.progress import progress_enabled

from .conftest import ENV, case_rows, write_rows
from .test_plausibility import write_train_config

BAR_MARKS = ("\r", "it/s", "step/s", "case/s")


def test_progress_enabled_only_when_asked_and_on_a_terminal(tmp_path):
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as terminal, (tmp_path / "log.txt").open("w") as log_file:
            assert progress_enabled(True, terminal)
            assert not progress_enabled(False, terminal)
            assert not progress_enabled(True, log_file)
            assert not progress_enabled(True, io.StringIO())
    finally:
        os.close(master)
        os.close(slave)


def _train_command(tmp_path: Path, dataset) -> list[str]:
    config = write_train_config(tmp_path / "c.yaml", write_rows(tmp_path / "m.csv", case_rows(dataset)), epochs=2,
                                cache_dir=str(tmp_path / "cache"))
    return [sys.executable, "-m", "medseg.cli", "train", str(config), "--out", str(tmp_path / "run")]


def test_train_with_stderr_in_a_file_writes_plain_lines(tmp_path, dataset):
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log_file:
        proc = subprocess.run(_train_command(tmp_path, dataset), stdout=subprocess.PIPE, stderr=log_file, text=True,
                              env=ENV, timeout=300, check=False)
    log = log_path.read_text()
    assert proc.returncode == 0, log
    for mark in BAR_MARKS:
        assert mark not in log + proc.stdout, (mark, log)
    epoch_lines = [line for line in log.splitlines() if line.startswith("INFO medseg.engine.trainer: epoch ")]
    assert [line.split(":")[1].strip().split()[1] for line in epoch_lines] == ["1", "2"], log
    assert all("train_loss" in line and "val_dice" in line for line in epoch_lines), epoch_lines


def test_train_on_a_terminal_draws_bars(tmp_path, dataset):
    master, slave = os.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # the terminal must be read while the run writes, or its buffer fills
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO once the child has closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(_train_command(tmp_path, dataset), stdout=subprocess.PIPE, stderr=slave, env=ENV,
                              timeout=300, check=False)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, screen
    assert "\r" in screen and "step" in screen, screen
