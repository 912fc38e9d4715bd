"""`--out` that cannot be written, disk full, concurrent runs on one folder, stale outputs of
older settings: one clear line before any work, never a traceback or a half-written folder."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.run_folder import LOCK_NAME

from .conftest import ENV, assert_refused, case_rows, leftovers, run_cli, write_rows

COMMANDS = ["stats", "infer", "evaluate", "synth", "import", "export", "plan"]


def command_args(command: str, out: Path, manifest: Path, checkpoint: Path, predictions: Path) -> list[str | Path]:
    """A valid invocation of ``command`` writing to ``out``."""
    return {
        "stats": ["stats", manifest, "--out", out, "--no-progress"],
        "infer": ["infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", out, "--no-progress"],
        "evaluate": ["evaluate", "--pred", predictions, "--manifest", manifest, "--out", out, "--no-progress"],
        "synth": ["synth", "--out", out, "--n", "1", "--shape", "16", "16", "4"],
        "import": ["import", "files", "--images", manifest.parent / "one_image.nii.gz", "--modality", "MR", "--out", out],
        "export": ["export", checkpoint, "--format", "inference", "--out", out],
        "plan": ["plan", manifest, "--out", out, "--no-progress"],
    }[command]


@pytest.fixture
def flat_manifest(tmp_path: Path, manifest: Path, dataset) -> Path:
    """A copy of one image beside the manifest (for ``import files``) and the manifest itself."""
    import shutil

    shutil.copyfile(dataset[0].images["flair"], tmp_path / "one_image.nii.gz")
    return manifest


@pytest.mark.parametrize("command", COMMANDS)
def test_out_that_is_an_existing_file_is_refused_before_any_work(tmp_path, flat_manifest, checkpoint, predictions, command):
    needs_folder = command in ("stats", "infer", "evaluate", "synth")
    out = tmp_path / "taken"
    (out if needs_folder else tmp_path / "taken").write_text("not a folder")
    if not needs_folder:  # commands writing one file refuse an existing folder instead
        out.unlink()
        out.mkdir()
    proc = run_cli(*command_args(command, out, flat_manifest, checkpoint, predictions))
    line = assert_refused(proc, str(out))
    assert ("existing file" in line) if needs_folder else ("existing folder" in line)
    assert not leftovers(tmp_path)


def _not_writable(folder: Path) -> bool:
    try:
        fd = os.open(folder / ".medseg-test-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return True
    os.close(fd)
    (folder / ".medseg-test-probe").unlink()
    return False


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """An existing folder this process cannot write into: a ``chmod 555`` folder, or, as root
    (whom permissions do not stop), ``/sys/kernel`` (sysfs refuses new files even to root)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if not _not_writable(folder):
            folder = Path("/sys/kernel")
            if not folder.is_dir() or not _not_writable(folder):
                pytest.skip("no folder this user cannot write into (root without a read-only sysfs)")
        yield folder
    finally:
        (tmp_path / "read_only").chmod(0o755)


@pytest.mark.parametrize("command", ["stats", "infer", "evaluate", "synth"])
def test_read_only_out_is_refused_before_any_work(read_only_folder, flat_manifest, checkpoint, predictions, command):
    out = read_only_folder / "sub" if command == "synth" else read_only_folder
    before = sorted(os.listdir(read_only_folder))
    proc = run_cli(*command_args(command, out, flat_manifest, checkpoint, predictions))
    line = assert_refused(proc, str(out))
    assert "cannot be created" in line or "not writable" in line
    assert "predicted" not in proc.stderr  # infer checked the folder before computing any case
    assert sorted(os.listdir(read_only_folder)) == before


def _full_disk() -> None:
    """In the child: files may not grow past 256 bytes (EFBIG, like a full disk), the signal ignored."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))


def test_disk_full_while_writing_names_the_file_and_leaves_no_partial_file(tmp_path, manifest, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "infer", "--checkpoint", str(checkpoint), "--manifest", str(manifest),
         "--out", str(out), "--no-progress", "--write-prob"],
        capture_output=True, text=True, env=ENV, timeout=300, check=False, preexec_fn=_full_disk,
    )  # fmt: skip
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    text = proc.stderr
    assert "File too large" in text or "cannot write" in text, text
    assert str(out) in text  # the file that could not be written is named
    assert not leftovers(out)


def test_second_run_on_a_locked_folder_is_refused_with_the_holder(tmp_path, manifest, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                 "command": "medseg infer", "started": "2026-12-01T10:00:00+00:00"}))
        proc = run_cli("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", out, "--no-progress")
        line = assert_refused(proc, str(out), "another medseg run", f"pid {holder.pid}", "medseg infer", LOCK_NAME)
        assert "this host" in line
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing computed, the holder's lock kept


def test_lock_of_another_host_is_refused(tmp_path, manifest):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "command": "medseg stats",
                                             "started": "2026-12-01T10:00:00+00:00"}))
    assert_refused(run_cli("stats", manifest, "--out", out, "--no-progress"), "host elsewhere.example")


def test_stale_lock_of_a_dead_run_is_taken_over_and_released(tmp_path, manifest):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "medseg stats",
                                             "started": "2026-12-01T10:00:00+00:00"}))
    proc = run_cli("stats", manifest, "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "taking over the lock" in proc.stderr
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert (out / "failures.csv").is_file()


def test_two_concurrent_runs_one_refused_and_results_consistent(tmp_path, dataset):
    """Really concurrent: the second run starts while the first holds the folder (the lock is
    the first thing a command takes; the first then reads 30 cases)."""
    rows = [{**row, "case_id": f"c{i:02d}_{row['case_id']}", "patient_id": f"p{i:02d}_{row['patient_id']}", "split": ""}
            for i in range(10) for row in case_rows(dataset)]  # fmt: skip
    manifest = write_rows(tmp_path / "many.csv", rows)
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "medseg.cli", "stats", str(manifest), "--out", str(out),
                              "--no-progress"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        import time

        deadline = time.monotonic() + 60
        while not (out / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if first.poll() is not None:
            pytest.skip("the first run finished before the second could start (machine too fast for this check)")
        second = run_cli("stats", manifest, "--out", out, "--no-progress")
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    if second.returncode == 0:  # the first one released the lock before the second looked
        pytest.skip("the first run finished before the second took the lock")
    assert_refused(second, "another medseg run", f"pid {first.pid}")
    import pandas as pd

    assert len(pd.read_csv(out / "failures.csv")) == 0  # the first run's record is intact
    assert not leftovers(out)


def test_rerun_with_other_settings_removes_the_old_probability_maps(tmp_path, manifest, checkpoint):
    out = tmp_path / "out"
    first = run_cli("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", out, "--no-progress", "--write-prob")
    assert first.returncode == 0, first.stderr
    assert len(list(out.glob("*_prob.nii.gz"))) == 3
    second = run_cli("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", out, "--no-progress")
    assert second.returncode == 0, second.stderr
    assert not list(out.glob("*_prob.nii.gz"))  # no probability map of the old settings beside the new masks
    assert len(list(out.glob("*_mask.nii.gz"))) == 3


# one contender: wait until every contender is ready, try to take the lock with the window
# between creating and writing the record widened to 1 s, hold it until every contender answered
_CONTENDER = """
import sys, time
from pathlib import Path
from medseg.errors import OutputError
from medseg.run_folder import OutputLock

folder, sync, me, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
record = OutputLock._record
def slow_record(self):
    time.sleep(1.0)  # a slow disk: the lock file exists, its record is not written yet
    return record(self)
OutputLock._record = slow_record
(sync / f"ready-{me}").touch()
while len(list(sync.glob("ready-*"))) < n:
    time.sleep(0.001)
lock = OutputLock(folder, "medseg race", mark=False)
try:
    lock.acquire()
except OutputError as exc:
    (sync / f"result-{me}").write_text("refused " + str(exc))
    sys.exit(0)
(sync / f"result-{me}").write_text("acquired")
deadline = time.monotonic() + 120
while len(list(sync.glob("result-*"))) < n and time.monotonic() < deadline:
    time.sleep(0.01)
lock.release()
"""


@pytest.mark.parametrize("round_", range(2))
def test_runs_racing_for_the_lock_one_wins(tmp_path, round_):
    """Four processes take the lock of one folder at the same moment, the record written 1 s after
    the lock file is created: exactly one holds it, the others are refused naming the holder
    (before the guard, a contender read the empty lock file, called it stale, deleted it and took
    the lock too: two or more held it)."""
    out, sync = tmp_path / "out", tmp_path / "sync"
    out.mkdir()
    sync.mkdir()
    n = 4
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(out), str(sync), str(i), str(n)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    results = sorted((sync / f"result-{i}").read_text() for i in range(n))
    assert sum(r == "acquired" for r in results) == 1, results
    refused = [r for r in results if r != "acquired"]
    assert len(refused) == n - 1 and all("another medseg run" in r and "medseg race" in r for r in refused), refused
    assert list(out.iterdir()) == []  # the lock released, nothing else written


def test_unreadable_lock_is_refused_while_young_and_taken_over_when_old(tmp_path, caplog):
    """An empty lock file: a run (of another host, out of the guard's reach) between creating it
    and writing its record -- refused -- or, seconds later, one killed there -- taken over."""
    import time

    from medseg.errors import OutputError
    from medseg.run_folder import UNREADABLE_STALE_S, OutputLock

    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("")
    with pytest.raises(OutputError, match="another medseg run is taking this output folder .* not written yet"):
        OutputLock(out, "medseg stats", mark=False).acquire()
    assert (out / LOCK_NAME).read_text() == ""  # not touched
    then = time.time() - UNREADABLE_STALE_S - 1
    os.utime(out / LOCK_NAME, (then, then))
    lock = OutputLock(out, "medseg stats", mark=False)
    lock.acquire()
    assert lock.held and "taking over the lock" in caplog.text
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert list(out.iterdir()) == []
