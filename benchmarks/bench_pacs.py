"""PACS round trip against inference alone: what answering a PACS costs on top of predicting.

A real Orthanc with its DICOMweb plugin (Debian's ``orthanc`` + ``orthanc-dicomweb``;
``scripts/ensure_orthanc.sh`` installs them) is started on free loopback ports with a
throw-away storage folder, exactly as ``tests/pacs/conftest.py`` does (its ``Orthanc`` class is
imported from there). ``--n`` synthetic CT series (``--shape`` I J K voxels, int16, each its own
patient and study) are written with pydicom and uploaded through Orthanc's REST API. Then,
each as a subprocess (``python -m medseg``, the same interpreter):

- (a) baseline: ``medseg infer --checkpoint CKPT --input <the same series folders>
  --output-format both`` -- inference alone from local folders (NIfTI masks + DICOM SEGs).
- (b) pacs: ``medseg run pipelines/pacs.yaml --set pacs.dicomweb_url=URL --set
  pipeline.checkpoint=CKPT`` -- query + retrieve + import (pacs_pull), validate, infer
  (``output_format: both``), store the SEGs back (pacs_push), prediction_stats, report.
  Its stage seconds come from the run folder's ``state.json``.

``--rounds`` times (a) then (b), each (b) into a new run folder after the SEGs of the round
before were deleted from Orthanc (else the new run would leave the answered series out).
Prints each round (with the load average: on a shared machine the infer stage swings most),
then the best of the rounds: seconds per case, the ratio (b) / (a) (wall, and CPU seconds of
the medseg process), and the ratio of the PACS transfer stages (pull + push) to the
pipeline's own infer stage. The model is the planned network (``deeplabv3plus`` /
``resnet18``, width 0.5, 3 input channels = 1 CT channel with one context slice on each side)
with untrained weights, its threshold set so that masks are ``--lesion-fraction`` lesion,
unless ``--checkpoint`` names one; only the time matters here. Orthanc is stopped at the end,
also on an error. Leave the page cache warm and the machine idle for wall ratios.

    .venv/bin/python benchmarks/bench_pacs.py [--n 4] [--shape 256 256 60] [--rounds 3] [--checkpoint CKPT]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # dicom_helpers.py
sys.path.insert(0, str(REPO / "tests" / "inference"))  # infer_helpers.py
from dicom_helpers import write_series  # noqa: E402
from infer_helpers import ct_phantom  # noqa: E402

from medseg.io import Geometry, read_volume  # noqa: E402

PIPELINE = REPO / "pipelines" / "pacs.yaml"
UID_ROOT = "1.2.826.0.1.3680043.8.498.88"
STAGES = ("pacs_pull", "validate", "infer", "pacs_push", "prediction_stats", "report")


def load_orthanc_fixture():
    """``tests/pacs/conftest.py`` as a module (its ``Orthanc`` class, ``dicomweb_plugin``, user)."""
    spec = importlib.util.spec_from_file_location("pacs_conftest", REPO / "tests" / "pacs" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).is_file()), None)


def planned_checkpoint(path: Path, calibration_series: Path, lesion_fraction: float) -> Path:
    """The planned CPU network with untrained weights, saved following the training contract.

    Untrained, it calls every voxel lesion at the default threshold 0.5 (one 100 % mask per
    case would inflate the lesion table, the SEG and the stats). So its ``inference.threshold``
    is set to the (1 - ``lesion_fraction``) quantile of its probabilities on
    ``calibration_series``: masks of a few percent lesion, as a trained model's would be."""
    import torch

    from medseg.config import Config, InferenceConfig, ModelConfig, PreprocessConfig
    from medseg.inference.bundle import load_bundle
    from medseg.inference.case import CasePredictor
    from medseg.inference.cases import cases_from_inputs
    from medseg.models import build_model
    from medseg.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model_cfg = ModelConfig(arch="deeplabv3plus", encoder="resnet18", width=0.5, in_channels=3, out_channels=1)
    model = build_model(model_cfg)

    def save(threshold: float) -> Path:
        config = Config(model=model_cfg, preprocess=PreprocessConfig(context_slices=1),
                        inference=InferenceConfig(threshold=threshold))  # fmt: skip
        extra = {"config": config.model_dump(mode="json"), "channels": ["ct"], "modality": "CT"}
        return save_checkpoint(path, model, model_cfg, extra)

    save(0.5)
    predictor = CasePredictor(load_bundle([path], device="cpu"))
    prepared = predictor.prepare(cases_from_inputs([[str(calibration_series)]], ["ct"])[0])
    prob, _ = predictor.probabilities(prepared)
    source = predictor.to_source(prob[None] if prob.ndim == 3 else prob, prepared)
    return save(float(np.quantile(source, 1.0 - lesion_fraction)))


def write_cases(root: Path, n: int, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[Path]:
    """``n`` CT series folders, each its own patient and study (UIDs under ``UID_ROOT``)."""
    import pydicom

    rng = np.random.default_rng(0)
    folders = []
    for i in range(n):
        image, _ = ct_phantom(shape, rng)
        geometry = Geometry(shape, spacing, (-100.0, -100.0, 10.0 * i), tuple(np.eye(3).ravel()))
        folder = root / f"series_{i}"
        files = write_series(folder, image, geometry, series_uid=f"{UID_ROOT}.{i + 1}",
                             frame_of_reference=f"{UID_ROOT}.900{i + 1}")  # fmt: skip
        for path in files:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.PatientID, ds.AccessionNumber = f"{UID_ROOT}.500{i + 1}", f"BENCH-{i}", f"A{i}"
            ds.save_as(path)
        folders.append(folder)
    return folders


def children_cpu() -> float:
    """User + system CPU seconds of the finished (waited-for) child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Wall and CPU (user + system, all threads) seconds of ``command``; its output goes to ``log``;
    a non-zero exit raises with the log's end. Orthanc's own CPU time is not in it (it is waited
    for only at the end): on a machine shared with other jobs the CPU time varies much less than
    the wall time, but leaves out the server's side of the transfers."""
    start, cpu = time.perf_counter(), children_cpu()
    with open(log, "wb") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    seconds, cpu = time.perf_counter() - start, children_cpu() - cpu
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {code}:\n{log.read_text()[-3000:]}")
    return seconds, cpu


def lesion_fraction(folder: Path) -> float:
    masks = sorted(folder.glob("*_mask.nii.gz"))
    return float(np.mean([np.mean(np.asarray(read_volume(m).array) > 0) for m in masks])) if masks else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4, help="series (cases), default 4")
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 60], help="I J K voxels, default 256 256 60")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5], help="mm, default 0.8 0.8 2.5")
    parser.add_argument("--checkpoint", type=Path, help="a CT checkpoint (default: the planned network, untrained)")
    parser.add_argument("--rounds", type=int, default=3, help="(a) then (b), this many times; best reported")
    parser.add_argument("--lesion-fraction", type=float, default=0.02,
                        help="the untrained planned network's threshold gives masks about this fraction lesion")
    parser.add_argument("--keep", type=Path, help="copy the run folders here (default: removed)")
    args = parser.parse_args()

    binary = orthanc_binary()
    fixture = load_orthanc_fixture()
    plugin = fixture.dicomweb_plugin()
    if binary is None or plugin is None:
        sys.exit("Orthanc or its DICOMweb plugin is not installed (scripts/ensure_orthanc.sh installs them)")

    with tempfile.TemporaryDirectory(prefix="medseg-bench-pacs-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "orthanc").mkdir()
        shape = tuple(args.shape)
        folders = write_cases(tmp / "series", args.n, shape, tuple(args.spacing))
        checkpoint = args.checkpoint or planned_checkpoint(tmp / "planned.pt", folders[0], args.lesion_fraction)
        env = dict(os.environ, MEDSEG_PACS_USER=fixture.USER, MEDSEG_PACS_PASSWORD=fixture.PASSWORD)
        env.setdefault("MEDSEG_SITE_SECRET", "00112233445566778899aabbccddeeff")
        medseg = [sys.executable, "-m", "medseg"]
        n = args.n

        server = fixture.Orthanc(tmp / "orthanc", binary, plugin)
        server.start()
        rounds: list[dict[str, float]] = []
        try:
            start = time.perf_counter()
            server.upload(sorted(p for folder in folders for p in folder.glob("*.dcm")))
            upload = time.perf_counter() - start
            before = server.instance_count()
            for r in range(args.rounds):
                base_out, run_out = tmp / f"infer_{r}", tmp / f"run_{r}"
                baseline, baseline_cpu = timed([*medseg, "infer", "--checkpoint", str(checkpoint), "--input", *map(str, folders),
                                  "--out", str(base_out), "--output-format", "both", "--no-progress"],
                                 env, tmp / f"infer_{r}.log")  # fmt: skip
                pacs, pacs_cpu = timed([*medseg, "run", str(PIPELINE), "--set", f"pacs.dicomweb_url={server.dicomweb_url}",
                              "--set", f"pipeline.checkpoint={checkpoint}", "--out", str(run_out), "--no-progress"],
                             env, tmp / f"run_{r}.log")  # fmt: skip
                stored = server.instance_count() - before
                if stored != n:
                    raise RuntimeError(f"round {r}: {stored} SEG(s) stored in Orthanc, expected {n}")
                state = json.loads((run_out / "state.json").read_text())
                rounds.append({"baseline": baseline, "pacs": pacs, "load": os.getloadavg()[0],
                               "baseline_cpu": baseline_cpu, "pacs_cpu": pacs_cpu,
                               **{name: float(state[name]["seconds"]) for name in STAGES}})  # fmt: skip
                # the next round's new run folder would leave out every series a medseg SEG answers
                for orthanc_id in server.seg_instances():
                    server._request(f"/instances/{orthanc_id}", method="DELETE")
        finally:
            server.stop()
        fraction = lesion_fraction(tmp / "infer_0")
        if args.keep:
            for r in range(args.rounds):
                for name in (f"infer_{r}", f"run_{r}"):
                    shutil.copytree(tmp / name, args.keep / name, dirs_exist_ok=True)
                    shutil.copy(tmp / f"{name}.log", args.keep / f"{name}.log")

    print(f"{n} CT series {shape[0]}x{shape[1]}x{shape[2]} ({n * shape[2]} instances, uploaded in {upload:.1f} s), "
          f"checkpoint {args.checkpoint or 'planned deeplabv3plus/resnet18 w0.5, untrained'}, "
          f"masks {100 * fraction:.1f}% lesion, {n} SEGs stored in Orthanc per round")  # fmt: skip
    for r, row in enumerate(rounds):
        print(f"round {r}: (a) {row['baseline']:.2f} s, (b) {row['pacs']:.2f} s (ratio {row['pacs'] / row['baseline']:.2f}), "
              f"CPU (a) {row['baseline_cpu']:.1f} s, (b) {row['pacs_cpu']:.1f} s, pull {row['pacs_pull']:.2f} s, infer {row['infer']:.2f} s, push {row['pacs_push']:.2f} s, "
              f"load average {row['load']:.2f}")  # fmt: skip
    best_a = min(row["baseline"] for row in rounds)
    best = min(rounds, key=lambda row: row["pacs"])  # its stages are shown
    ratios = [row["pacs"] / row["baseline"] for row in rounds]
    transfer = [(row["pacs_pull"] + row["pacs_push"]) / row["infer"] for row in rounds]
    print()
    print(f"best of {args.rounds} rounds (the stages: those of (b)'s best round)")
    print()
    cpu_a = min(row["baseline_cpu"] for row in rounds)
    cpu_b = min(row["pacs_cpu"] for row in rounds)
    print(f"| {'what':<40} | {'seconds':>8} | {'per case':>8} | {'ratio':>6} | {'CPU s':>6} | {'ratio':>6} |")
    print(f"|{'-' * 42}|{'-' * 9}:|{'-' * 9}:|{'-' * 7}:|{'-' * 7}:|{'-' * 7}:|")
    rows = [("(a) medseg infer --input (baseline)", best_a, 1.0, cpu_a),
            ("(b) medseg run pipelines/pacs.yaml", best["pacs"], best["pacs"] / best_a, cpu_b)]  # fmt: skip
    rows += [(f"    stage {name}", best[name], None, None) for name in STAGES]
    for label, seconds, ratio, cpu in rows:
        ratio_text = f"{ratio:.2f}" if ratio is not None else ""
        cpu_text = f"{cpu:6.1f} | {cpu / cpu_a:6.2f}" if cpu is not None else f"{'':6} | {'':6}"
        print(f"| {label:<40} | {seconds:8.2f} | {seconds / n:8.2f} | {ratio_text:>6} | {cpu_text} |")
    print()
    print(f"ratio (b) / (a), best / best:            {best['pacs'] / best_a:.2f} "
          f"(per round, median {float(np.median(ratios)):.2f}, range {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"ratio (b) / (a), CPU seconds, best:      {cpu_b / cpu_a:.2f}")
    print(f"ratio (pull + push) / infer, per round:  median {float(np.median(transfer)):.2f}, "
          f"range {min(transfer):.2f}-{max(transfer):.2f}")


if __name__ == "__main__":
    main()
