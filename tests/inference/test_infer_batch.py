"""`medseg infer` batches: outputs, failures, resume after interruption, inputs, overrides, ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import make_affine, make_case_files, save_tiny_checkpoint

from medseg.cli import main
from medseg.config import Config, InferenceConfig
from medseg.errors import ConfigError, MedsegError
from medseg.evaluation.runner import evaluate
from medseg.inference.case_files import expected_outputs, is_complete
from medseg.inference.cases import cases_from_inputs, cases_from_manifest, check_cases
from medseg.inference.runner import apply_inference_overrides, inference_patch, load_bundle, merge_failures
from medseg.runtime import shard

CHANNELS = ["flair", "t1"]


def _manifest(tmp: Path, n: int, shape=(40, 36, 12), corrupt: int | None = None) -> Path:
    rows = []
    for i in range(n):
        files = make_case_files(tmp, f"case{i}", make_affine(["lps", "ras", "oblique"][i % 3]), shape=shape,
                                channels=CHANNELS, rng=np.random.default_rng(i))
        if i == corrupt:
            data = files["t1"].read_bytes()
            files["t1"].write_bytes(data[: len(data) // 2])  # truncated gzip
        rows.append({"case_id": f"case{i}", "patient_id": f"p{i}", "modality": "MR", "image_flair": files["flair"].name,
                     "image_t1": files["t1"].name, "label": files["label"].name, "split": "test"})
    path = tmp / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", CHANNELS, "MR")


def _complete(out: Path, case_id: str, ckpt: Path) -> bool:
    bundle = load_bundle([ckpt])
    return is_complete(out, case_id, expected_outputs(case_id, False, True), bundle.fingerprint())


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_corrupt_case_is_recorded_and_the_batch_goes_on(tmp_path, checkpoint, overlap):
    """``overlap`` (``inference.prefetch``): the next case is read and the previous one written
    in background threads; failures and outputs must be the same as one case at a time."""
    manifest = _manifest(tmp_path, 3, corrupt=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "case1_mask.nii.gz").write_bytes(b"stale output of an earlier run")
    code = main(["infer", "--checkpoint", str(checkpoint), "--manifest", str(manifest), "--out", str(out), "--no-progress",
                 "--set", f"inference.prefetch={str(overlap).lower()}", "--overwrite"])  # the stale file: not infer's own
    assert code == 1
    assert sorted(p.name for p in out.glob("*_mask.nii.gz")) == ["case0_mask.nii.gz", "case2_mask.nii.gz"]
    failures = pd.read_csv(out / "failures.csv")
    assert failures.case_id.tolist() == ["case1"] and "truncated" in failures.error[0] and "case1_t1" in failures.error[0]
    for case_id in ("case0", "case2"):
        label = nib.load(str(tmp_path / f"{case_id}_seg.nii.gz"))
        mask = nib.load(str(out / f"{case_id}_mask.nii.gz"))
        assert mask.shape == label.shape and mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, label.affine, atol=1e-4)
        table = pd.read_csv(out / f"{case_id}_lesions.csv")
        assert {"lesion_id", "voxels", "volume_ml", "score_mean", "score_max"} <= set(table.columns)
    record = json.loads((out / "inference.json").read_text())
    assert record["rank0"] == {"done": 2, "skipped": 0, "failed": 1, "seconds": record["rank0"]["seconds"]}
    # the evaluation stage reads this folder as it is (its contract)
    good = pd.read_csv(manifest).drop(index=1)
    good.to_csv(tmp_path / "good.csv", index=False)
    summary = evaluate(out, tmp_path / "good.csv", tmp_path / "eval", progress=False)
    assert summary["score_source"] == "lesions_csv"


def test_overlapped_batch_writes_what_the_sequential_one_writes(tmp_path, checkpoint):
    """The reader, the network and the finisher run on different cases at once (sharing the
    checkpoint's transform chain); the outputs must be those of one case at a time."""
    from medseg.inference import runner

    manifest = _manifest(tmp_path, 4)
    cases = cases_from_manifest(manifest, ["flair", "t1"], "MR")
    for overlap in (False, True):
        bundle = load_bundle([checkpoint], [f"inference.prefetch={str(overlap).lower()}", "inference.write_prob=true"])
        summary = runner.run_inference(cases, bundle, tmp_path / f"out_{overlap}", show_progress=False)
        assert summary.done == [f"case{i}" for i in range(4)]
    for i in range(4):
        for suffix in ("_mask.nii.gz", "_prob.nii.gz", "_lesions.nii.gz"):
            a, b = (nib.load(str(tmp_path / f"out_{o}" / f"case{i}{suffix}")) for o in (False, True))
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            np.testing.assert_array_equal(a.affine, b.affine)
        tables = [pd.read_csv(tmp_path / f"out_{o}" / f"case{i}_lesions.csv") for o in (False, True)]
        pd.testing.assert_frame_equal(*tables)


def test_written_files_are_what_finish_computes(tmp_path, checkpoint):
    """``run_case`` hands each output to the writer as it is made (``finish_and_write``); the
    files must hold exactly what ``finish`` computes in memory, in their documented types."""
    from medseg.inference.runner import CasePredictor
    from medseg.rounding import round_table

    bundle = load_bundle([checkpoint], ["inference.write_prob=true", "inference.min_lesion_mm3=0"])
    predictor = CasePredictor(bundle)
    case = cases_from_manifest(_manifest(tmp_path, 1), CHANNELS, "MR")[0]
    prepared = predictor.prepare(case)
    result = predictor.finish(prepared, predictor.probabilities(prepared)[0])
    out = tmp_path / "out"
    predictor.run_case(case, out)
    expected = {"_mask.nii.gz": (result.mask, np.uint8), "_prob.nii.gz": (result.lesion_prob, np.float32),
                "_lesions.nii.gz": (result.lesions, np.uint8)}  # a few lesions: ids fit uint8
    for suffix, (array, dtype) in expected.items():
        image = nib.load(str(out / f"case0{suffix}"))
        assert image.get_data_dtype() == dtype
        np.testing.assert_array_equal(np.asarray(image.dataobj), array)
    table = pd.read_csv(out / "case0_lesions.csv")
    assert len(table) == len(result.table) > 0  # a random tiny network marks some voxels: the lesion files are not empty
    numbers = [c for c in table.columns if c != "score_source"]
    written = round_table(result.table)  # csv: each column to its measurement's digits (medseg.rounding)
    np.testing.assert_allclose(table[numbers].to_numpy(float), written[numbers].to_numpy(float), rtol=1e-12)
    assert (table["score_source"] == result.table["score_source"]).all() and set(table["score_source"]) == {"probability"}
    assert is_complete(out, "case0", expected_outputs("case0", True, True), bundle.fingerprint())


@pytest.mark.parametrize(("n", "dtype"), [(0, np.uint8), (255, np.uint8), (256, np.uint16), (65535, np.uint16),
                                          (65536, np.uint32)])
def test_lesion_map_file_type_is_the_smallest_that_holds_the_ids(n, dtype):
    from medseg.inference.case_files import lesion_map_dtype

    assert lesion_map_dtype(n) is dtype


@pytest.mark.parametrize("stage", ["marker", "table"])
@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_a_failure_while_writing_is_recorded_and_its_files_removed(tmp_path, checkpoint, overlap, stage, monkeypatch):
    """``marker``: every file and the marker written, then an error; ``table``: an error while
    the mask and lesion map are still being written in the writer's threads."""
    from medseg.inference import case, case_files, runner

    real_close, real_table = case_files.CaseWriter.close, case.lesion_table

    def close(self, info=None):
        if self.case_id == "case0":
            real_close(self, info)  # files and marker on disk, then the failure
            raise OSError("disk full")
        return real_close(self, info)

    tables: list[int] = []

    def lesion_table(*args, **kwargs):
        tables.append(1)
        if len(tables) == 1:  # case0's: cases are finished in order, also when overlapped
            raise OSError("disk full")
        return real_table(*args, **kwargs)

    real_write_volume = case_files.write_volume

    def slow_write_volume(*args, **kwargs):
        time.sleep(0.3)  # still writing when the table fails: the files land after the error
        return real_write_volume(*args, **kwargs)

    if stage == "marker":
        monkeypatch.setattr(case_files.CaseWriter, "close", close)
    else:
        monkeypatch.setattr(case, "lesion_table", lesion_table)
        monkeypatch.setattr(case_files, "write_volume", slow_write_volume)
    manifest = _manifest(tmp_path, 3)
    out = tmp_path / "out"
    cases = cases_from_manifest(manifest, ["flair", "t1"], "MR")
    bundle = load_bundle([checkpoint], [f"inference.prefetch={str(overlap).lower()}"])
    summary = runner.run_inference(cases, bundle, out, show_progress=False)
    assert summary.done == ["case1", "case2"] and [c for c, _ in summary.failures] == ["case0"]
    assert "disk full" in summary.failures[0][1]
    assert pd.read_csv(out / "failures.csv").case_id.tolist() == ["case0"]
    assert not list(out.glob("case0_*"))  # no output of the failed case may pass for a result
    assert all(_complete(out, c, checkpoint) for c in ("case1", "case2"))


@pytest.mark.slow
def test_interrupted_batch_resumes_without_truncated_files(tmp_path, checkpoint):
    manifest = _manifest(tmp_path, 3)
    out = tmp_path / "out"
    args = ["infer", "--checkpoint", str(checkpoint), "--manifest", str(manifest), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    done_mtime = (out / "case0_mask.nii.gz").stat().st_mtime_ns
    # case1: killed while writing its mask -- a partial temp file, a truncated mask, no marker
    (out / "case1_complete.json").unlink()
    (out / ".case1_mask.partial-999.nii.gz").write_bytes(b"\x1f\x8b partial")
    data = (out / "case1_mask.nii.gz").read_bytes()
    (out / "case1_mask.nii.gz").write_bytes(data[: len(data) // 2])
    # case2: its marker survived but a file it vouches for was truncated afterwards
    data = (out / "case2_lesions.nii.gz").read_bytes()
    (out / "case2_lesions.nii.gz").write_bytes(data[:100])
    assert not _complete(out, "case1", checkpoint) and not _complete(out, "case2", checkpoint)
    assert main(args) == 0
    record = json.loads((out / "inference.json").read_text())
    assert record["rank0"]["done"] == 2 and record["rank0"]["skipped"] == 1
    assert (out / "case0_mask.nii.gz").stat().st_mtime_ns == done_mtime  # the complete case was not redone
    assert not list(out.glob(".*partial*"))
    for case_id in ("case0", "case1", "case2"):
        assert _complete(out, case_id, checkpoint)
        for name in expected_outputs(case_id, False, True):
            if name.endswith(".nii.gz"):
                assert np.asarray(nib.load(str(out / name)).dataobj).shape == (40, 36, 12)
    # other settings (write_prob) make the cases incomplete: they are redone with the prob maps
    assert main([*args, "--write-prob"]) == 0
    assert len(list(out.glob("*_prob.nii.gz"))) == 3


@pytest.mark.slow
def test_killed_run_resumes(tmp_path, checkpoint):
    manifest = _manifest(tmp_path, 4, shape=(64, 60, 24))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medseg.cli", "infer", "--checkpoint", str(checkpoint), "--manifest", str(manifest),
           "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("*_complete.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    markers = list(out.glob("*_complete.json"))
    assert 1 <= len(markers) < 4, "the run should have been killed part-way"
    assert main(cmd[3:]) == 0
    assert not list(out.glob(".*partial*"))
    record = json.loads((out / "inference.json").read_text())
    assert record["rank0"]["skipped"] >= len(markers) and record["rank0"]["done"] + record["rank0"]["skipped"] == 4
    for i in range(4):
        assert _complete(out, f"case{i}", checkpoint)
        assert np.asarray(nib.load(str(out / f"case{i}_lesions.nii.gz")).dataobj).shape == (64, 60, 24)


def test_input_groups_and_single_channel_lists(tmp_path):
    for name in ("a_flair.nii.gz", "a_t1.nii.gz", "b.nrrd", "c.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dicom_dir").mkdir()
    a_flair, a_t1 = str(tmp_path / "a_flair.nii.gz"), str(tmp_path / "a_t1.nii.gz")
    plain = cases_from_inputs([[a_flair, a_t1]], CHANNELS)
    named = cases_from_inputs([[f"t1={a_t1}", f"flair={a_flair}", "case=A7"]], CHANNELS)
    assert plain[0].case_id == "a" and plain[0].images == {"flair": Path(a_flair), "t1": Path(a_t1)}
    assert named[0].case_id == "A7" and named[0].images == plain[0].images and named[0].problem is None
    wrong = cases_from_inputs([[a_flair]], CHANNELS)[0]
    assert "1 path(s) given but the checkpoint needs 2 channels" in wrong.problem
    single = check_cases(cases_from_inputs([[str(tmp_path / "b.nrrd"), str(tmp_path / "dicom_dir"), str(tmp_path / "c.nii.gz")]], ["ct"]))
    assert [c.case_id for c in single] == ["b", "dicom_dir", "c"] and all(c.problem is None for c in single)
    missing = check_cases(cases_from_inputs([[str(tmp_path / "nope.nii.gz")]], ["ct"]))[0]
    assert "not found" in missing.problem
    with pytest.raises(MedsegError, match="duplicate case id"):
        check_cases(cases_from_inputs([[str(tmp_path / "c.nii.gz"), str(tmp_path / "c.nii.gz")]], ["ct"]))


def test_input_channel_mismatch_is_a_failure_row(tmp_path, checkpoint):
    files = make_case_files(tmp_path, "solo", make_affine("lps"), channels=CHANNELS)
    out = tmp_path / "out"
    code = main(["infer", "--checkpoint", str(checkpoint), "--input", "case=half", str(files["flair"]), "--input",
                 str(files["flair"]), str(files["t1"]), "--out", str(out), "--no-progress"])
    assert code == 1  # the first --input has one path for a two-channel model
    failures = pd.read_csv(out / "failures.csv")
    assert failures.case_id.tolist() == ["half"] and "checkpoint needs 2 channels" in failures.error[0]
    assert (out / "solo_mask.nii.gz").is_file() and not (out / "half_mask.nii.gz").exists()


def test_manifest_channels_must_match_the_checkpoint(tmp_path):
    manifest = _manifest(tmp_path, 1)
    with pytest.raises(MedsegError, match=r"manifest channels \['flair', 't1'\] differ from the model's \['flair', 't1ce', 't2'\]"):
        cases_from_manifest(manifest, ["flair", "t1ce", "t2"], "MR")
    ct = cases_from_manifest(manifest, ["t1", "flair"], "CT")
    assert "model was trained on CT" in ct[0].problem and list(ct[0].images) == ["t1", "flair"]


def test_overrides_only_touch_the_inference_section(tmp_path):
    cfg = apply_inference_overrides(InferenceConfig(), ["inference.min_lesion_mm3=50", "inference.tta=true"])
    assert cfg.min_lesion_mm3 == 50 and cfg.tta
    with pytest.raises(ConfigError, match="only inference"):
        apply_inference_overrides(InferenceConfig(), ["preprocess.context_slices=2"])
    with pytest.raises(ConfigError, match="threshold"):
        apply_inference_overrides(InferenceConfig(), ["inference.threshold=2"])


def test_typed_settings_go_over_the_overrides_and_are_validated_once(checkpoint):
    assert inference_patch(["inference.tta=true", "inference.min_lesion_mm3=5"]) == {"tta": True, "min_lesion_mm3": 5}
    bundle = load_bundle([checkpoint], ["inference.tta=false", "inference.min_lesion_mm3=5"], settings={"tta": True})
    assert bundle.inference.tta is True and bundle.inference.min_lesion_mm3 == 5
    with pytest.raises(ConfigError, match="threshold"):
        load_bundle([checkpoint], settings={"threshold": 2.0})
    with pytest.raises(ConfigError, match="unknown key"):
        load_bundle([checkpoint], settings={"not_a_setting": 1})


def test_load_bundle_reads_each_checkpoint_once(tmp_path, checkpoint, monkeypatch):
    import torch

    other = save_tiny_checkpoint(tmp_path / "other.pt", CHANNELS, "MR", seed=1)
    real_load, reads = torch.load, []

    def counting_load(path, *args, **kwargs):
        reads.append((Path(path).name, kwargs.get("weights_only")))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    load_bundle([checkpoint, other])
    assert reads == [(checkpoint.name, True), ("other.pt", True)]


def test_checkpoint_without_the_training_contract_is_refused(tmp_path):
    import torch

    from medseg.config import ModelConfig
    from medseg.models import build_model
    from medseg.models.checkpoint import save_checkpoint

    model_cfg = ModelConfig(arch="unet", encoder="unet", in_channels=3, width=0.125)
    path = save_checkpoint(tmp_path / "bare.pt", build_model(model_cfg), model_cfg, {"epoch": 1})
    with pytest.raises(MedsegError, match="bare.pt: checkpoint lacks extra"):
        load_bundle([path])
    extra = {"config": Config(model=model_cfg).model_dump(mode="json"), "channels": ["a", "b"], "modality": "MR"}
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "wrong.pt", build_model(model_cfg), model_cfg, extra)
    with pytest.raises(MedsegError, match="3 input channels but 2 channel"):
        load_bundle([path])


def test_ensemble_of_checkpoints_and_fingerprint(tmp_path, checkpoint):
    other = save_tiny_checkpoint(tmp_path / "other.pt", CHANNELS, "MR", seed=1)
    import torch

    threads = torch.get_num_threads()
    try:
        bundle = load_bundle([checkpoint, other], ["inference.batch_size=2", "inference.threads=1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert len(bundle.models) == 2 and bundle.inference.batch_size == 2
    assert bundle.fingerprint() == load_bundle([checkpoint, other]).fingerprint()  # batch size changes nothing written
    assert bundle.fingerprint() != load_bundle([checkpoint]).fingerprint()
    mismatched = save_tiny_checkpoint(tmp_path / "ct.pt", CHANNELS, "CT")
    with pytest.raises(MedsegError, match="an ensemble needs identical inputs"):
        load_bundle([checkpoint, mismatched])


def test_shards_and_failure_merge(tmp_path):
    cases = list(range(7))
    parts = [shard(cases, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == cases and max(map(len, parts)) - min(map(len, parts)) <= 1
    pd.DataFrame([("b", "boom")], columns=["case_id", "error"]).to_csv(tmp_path / ".failures.rank1.csv", index=False)
    pd.DataFrame([("a", "bad file")], columns=["case_id", "error"]).to_csv(tmp_path / ".failures.rank0.csv", index=False)
    merged = merge_failures(tmp_path, 3)
    assert merged.case_id.tolist() == ["a", "b"]
    assert pd.read_csv(tmp_path / "failures.csv").error.tolist() == ["bad file", "boom"]
    assert not list(tmp_path.glob(".failures*"))


@pytest.mark.slow
def test_torchrun_ranks_share_the_cases(tmp_path, checkpoint):
    manifest = _manifest(tmp_path, 3, corrupt=2)
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "medseg.cli", "infer", "--checkpoint", str(checkpoint),
         "--manifest", str(manifest), "--out", str(out), "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode != 0  # rank 0 had the corrupt case... or rank 1: either way a failure
    assert sorted(p.name for p in out.glob("*_mask.nii.gz")) == ["case0_mask.nii.gz", "case1_mask.nii.gz"]
    failures = pd.read_csv(out / "failures.csv")
    assert failures.case_id.tolist() == ["case2"]
    assert json.loads((out / "inference.json").read_text())["world_size"] == 2
