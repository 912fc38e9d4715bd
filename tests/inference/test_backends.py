"""Compiled backends (medseg.inference.backends), ``medseg accelerate`` (medseg.inference.acceleration)
and their gate in ``load_bundle``, on synthetic MR phantoms and tiny two-fold model folders."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import save_tiny_checkpoint

from medseg.atomic import write_json
from medseg.auto.folds import FOLDS_FILE, assign_folds
from medseg.auto.model_folder import read_model_folder, write_model_folder
from medseg.errors import ConfigError, MedsegError
from medseg.inference import backends, compilation
from medseg.inference.acceleration import accelerate, mask_dice
from medseg.inference.bundle import load_bundle
from medseg.manifest import read_manifest
from medseg.outputs import BACKENDS_DIR, BACKENDS_RECORD, INFERENCE_RECORD, MODEL_RECORD
from medseg.synth import generate_dataset

pytest.importorskip("onnx", reason="the compiled backends need onnx: pip install 'medseg[fast]'")
pytest.importorskip("onnxruntime", reason="the compiled backends need onnxruntime: pip install 'medseg[fast]'")

NO_OPENVINO = pytest.mark.skipif(not backends.backend_available("openvino"),
                                 reason="openvino/nncf not installed (pip install 'medseg[fast]')")  # fmt: skip
NO_BF16 = pytest.mark.skipif(not backends.backend_available("openvino") or not torch.backends.cpu.get_cpu_capability()
                             or "AVX512" not in torch.backends.cpu.get_cpu_capability(),
                             reason="openvino bf16 needs openvino and an AVX-512 BF16 / AMX CPU")  # fmt: skip
VARIANTS = [
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    pytest.param("openvino", "fp32", marks=NO_OPENVINO),
    pytest.param("openvino", "bf16", marks=NO_BF16),
    pytest.param("openvino", "int8", marks=NO_OPENVINO),
]
CHANNELS = ["flair", "t1"]
INT8_PHANTOM_DICE = 0.97  # int8 masks of the untrained phantom models against torch's (test docstrings)


def _decisive_checkpoint(path: Path, seed: int) -> Path:
    """A tiny U-Net checkpoint whose logits lie far from 0 (last layer scaled up): an untrained
    network's probabilities all sit near 0.5, where any rounding flips voxels; this one's mask
    has a margin, as a trained model's has."""
    from medseg.models.checkpoint import load_checkpoint, model_from_loaded, save_checkpoint

    save_tiny_checkpoint(path, CHANNELS, seed=seed)
    payload = load_checkpoint(path)
    model, model_cfg = model_from_loaded(payload, path)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(40.0)
        if last.bias is not None:
            last.bias.zero_()
    return save_checkpoint(path, model, model_cfg, payload["extra"])


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Four labelled MR phantoms (the pool manifest)."""
    out = tmp_path_factory.mktemp("pool")
    return generate_dataset(out, n_cases=4, modality="MR", shape=(56, 48, 14), seed=3, val_fraction=0.0,
                            test_fraction=0.0)  # fmt: skip


@pytest.fixture(scope="module")
def model_folder(pool, tmp_path_factory) -> Path:
    """A two-fold model folder (fold_0.pt, fold_1.pt, folds.json over the pool's patients)."""
    work = tmp_path_factory.mktemp("folder")
    cases = read_manifest(pool)
    folds = work / FOLDS_FILE
    folds.write_text(json.dumps(assign_folds(cases, 2, seed=0).as_dict(cases)))
    ckpts = [_decisive_checkpoint(work / f"src_{k}.pt", seed=k) for k in range(2)]
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"arch": "unet", "encoder": "unet", "in_channels": 6, "width": 0.125}}))
    write_model_folder(work / "model", ckpts, config, folds, {"threshold": 0.5, "min_lesion_mm3": 0.0})
    return work / "model"


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    return target


# --------------------------------------------------------------------------- the runtime modules


@pytest.mark.parametrize(("backend", "precision"), VARIANTS)
def test_compiled_model_behaves_like_the_torch_network(backend, precision, tmp_path):
    """Same interface as the torch network: no parameters, eval, ``multiple`` copied, any batch
    and slice size between calls (dynamic axes), (N, K, H, W) float32 logits close to torch's."""
    from medseg.config import ModelConfig
    from medseg.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="unet", encoder="unet", in_channels=6, out_channels=1, width=0.125)).eval()
    rng = np.random.default_rng(0)
    stacks = [rng.standard_normal((1, 6, 48, 64)).astype(np.float32) for _ in range(6)]
    files = compilation.compile_model(model, 6, tmp_path, "fold_0", backend, precision, stacks)
    compiled = backends.load_backend_model(files[0], backend, precision, model.multiple, threads=1)
    assert list(compiled.parameters()) == [] and not compiled.training and compiled.multiple == model.multiple
    tolerance = {"fp32": 1e-4, "bf16": 0.05, "int8": 0.1}[precision]
    for shape in [(3, 6, 64, 48), (1, 6, 80, 112), (2, 6, 33, 50)]:
        x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        with torch.no_grad():
            expected = model(x)
        with torch.inference_mode():
            got = compiled(x)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        scale = float(expected.abs().max())
        assert float((got - expected).abs().max()) <= tolerance * scale, (shape, float((got - expected).abs().max()), scale)
        if precision == "fp32":
            continue
        assert not torch.equal(got, expected)  # a reduced-precision model really ran


def test_int8_files_are_quantized(tmp_path):
    """The ONNX Runtime int8 file holds QDQ pairs with int8 weights; the logits node stays float."""
    import onnx

    from medseg.config import ModelConfig
    from medseg.models import build_model

    model = build_model(ModelConfig(arch="unet", encoder="unet", in_channels=6, out_channels=1, width=0.125)).eval()
    stacks = [np.random.default_rng(1).standard_normal((1, 6, 48, 48)).astype(np.float32) for _ in range(4)]
    (file,) = compilation.compile_model(model, 6, tmp_path, "fold_0", "onnxruntime", "int8", stacks)
    graph = onnx.load(str(file)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") > 5 and ops.count("DequantizeLinear") > 5
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 5
    producer = next(node for node in graph.node if graph.output[0].name in node.output)
    assert producer.op_type != "DequantizeLinear"


def test_calibration_takes_slices_with_and_without_lesion(pool):
    from medseg.config import Config

    cases = read_manifest(pool)[:2]
    config = Config.model_validate({"model": {"arch": "unet", "encoder": "unet", "in_channels": 6, "width": 0.125}})
    stacks = compilation.calibration_stacks(cases, config, stride=16, per_case=6)
    assert set(stacks) == {c.case_id for c in cases}
    for arrays in stacks.values():
        assert len(arrays) == 6
        for a in arrays:
            assert a.dtype == np.float32 and a.shape[:2] == (1, 6) and a.shape[2] % 16 == 0 and a.shape[3] % 16 == 0


def test_mask_dice_by_hand():
    a = np.zeros((4, 4, 4), np.uint8)
    b = a.copy()
    assert mask_dice(a, b) == 1.0  # both empty: they agree
    a[0, 0, :2] = 1
    b[0, 0, 1:3] = 1
    assert mask_dice(a, b) == pytest.approx(2 * 1 / 4)
    b[:] = 0
    assert mask_dice(a, b) == 0.0


# --------------------------------------------------------------------------- accelerate and its record


@pytest.mark.parametrize(("backend", "precision"), VARIANTS)
def test_accelerate_accepts_masks_equal_to_torch(backend, precision, model_folder, pool, tmp_path, monkeypatch):
    """fp32 masks are torch's exactly; bf16 and int8 within the tolerance. The phantoms' models are
    untrained (random features, many voxels near the threshold): their int8 masks reach Dice
    0.987-0.995, so the gate is lowered to 0.97 for them here (a trained BraTS model: 0.997)."""
    tolerance = {"fp32": 1.0, "bf16": backends.ACCEPT_DICE, "int8": INT8_PHANTOM_DICE}[precision]
    monkeypatch.setattr(backends, "ACCEPT_DICE", min(tolerance, backends.ACCEPT_DICE))
    folder = _copy(model_folder, tmp_path)
    result = accelerate(folder, pool, backend, precision, threads=1, calibration_per_case=4)
    entry = result.entry
    assert result.accepted, entry["per_case_dice"]
    folds = json.loads((folder / FOLDS_FILE).read_text())
    assert set(entry["per_case_dice"]) == set(folds["pool_case_ids"])
    assert min(entry["per_case_dice"].values()) == entry["min_dice"] >= tolerance
    assert entry["accepted"] == (entry["min_dice"] >= entry["threshold"])

    # and medseg infer --model takes it: same masks as torch within the tolerance, the record names it
    from medseg.inference.cases import cases_from_manifest
    from medseg.inference.runner import run_inference

    model = read_model_folder(folder)
    bundle = load_bundle(model.checkpoints, device="cpu", model_dir=folder,
                         settings={**model.postprocess, "backend": backend, "precision": precision, "threads": 1})
    assert all(isinstance(m, backends.BackendModel) for m in bundle.models)
    cases = cases_from_manifest(pool, bundle.channels, bundle.modality)
    run_inference(cases, bundle, tmp_path / "pred", show_progress=False)
    record = json.loads((tmp_path / "pred" / INFERENCE_RECORD).read_text())
    assert (record["inference"]["backend"], record["inference"]["precision"]) == (backend, precision)


def test_the_record_says_what_was_checked(model_folder, pool, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "ACCEPT_DICE", INT8_PHANTOM_DICE)  # untrained models (see above)
    folder = _copy(model_folder, tmp_path)
    accelerate(folder, pool, "onnxruntime", "int8", threads=1, calibration_per_case=4)
    accelerate(folder, pool, "onnxruntime", "auto", threads=1)  # auto = fp32, a second entry beside the first
    record = json.loads((folder / BACKENDS_RECORD).read_text())
    assert set(record["entries"]) == {"onnxruntime-int8", "onnxruntime-fp32"}
    entry = record["entries"]["onnxruntime-int8"]
    model = json.loads((folder / MODEL_RECORD).read_text())
    assert entry["checkpoints"] == [{"file": c["file"], "sha256": c["sha256"]} for c in model["checkpoints"]]
    assert entry["threshold"] == INT8_PHANTOM_DICE and entry["accepted"] is True
    assert {f["file"] for f in entry["files"]} == {f"{BACKENDS_DIR}/onnxruntime-int8/fold_{k}.onnx" for k in range(2)}
    for f in entry["files"]:
        assert (folder / f["file"]).is_file() and len(f["sha256"]) == 64
    assert entry["versions"]["onnxruntime"] and entry["versions"]["torch"] == torch.__version__
    assert entry["cpu"] and entry["threads"] == 1
    assert set(entry["timings_s"]) >= {"compile", "torch_fp32_predict", "backend_predict"}
    # each fold model calibrated on its training patients only, never on the ones it is checked on
    folds = json.loads((folder / FOLDS_FILE).read_text())
    for k in range(2):
        held = set(folds["folds"][k]["case_ids"])
        calibrated = set(entry["calibration_cases"][f"fold_{k}.pt"])
        assert calibrated and not calibrated & held


def test_auto_backend_takes_the_fastest_accepted_variant_else_torch(model_folder, pool, tmp_path, monkeypatch):
    """The default ``inference.backend: auto`` runs torch until ``medseg accelerate`` accepted a
    variant, then the accepted one with the fastest measured predictions (a refused or a stale one
    never); plain checkpoints always run torch."""
    folder = _copy(model_folder, tmp_path)
    model = read_model_folder(folder)

    def loaded(**settings):
        bundle = load_bundle(model.checkpoints, device="cpu", model_dir=folder, settings={"threads": 1, **settings})
        return bundle.inference.backend, bundle.inference.precision

    assert loaded()[0] == "torch"
    accelerate(folder, pool, "onnxruntime", "fp32", threads=1)
    assert loaded() == ("onnxruntime", "fp32")
    monkeypatch.setattr(backends, "ACCEPT_DICE", 1.01)  # a refused int8 entry beside it is never chosen
    accelerate(folder, pool, "onnxruntime", "int8", threads=1, calibration_per_case=4)
    assert loaded() == ("onnxruntime", "fp32")
    with pytest.raises(ConfigError, match="no int8 variant accepted"):
        loaded(precision="int8")
    record = json.loads((folder / BACKENDS_RECORD).read_text())  # make the accepted one the slowest of two
    record["entries"]["onnxruntime-int8"].update(accepted=True)
    record["entries"]["onnxruntime-int8"]["timings_s"]["backend_predict"] = 0.0
    write_json(folder / BACKENDS_RECORD, record)
    assert loaded() == ("onnxruntime", "int8")
    assert loaded(precision="fp32") == ("onnxruntime", "fp32")
    plain = load_bundle([model.checkpoints[0]], device="cpu", settings={"threads": 1})
    assert plain.inference.backend == "torch" and not any(isinstance(m, backends.BackendModel) for m in plain.models)


# --------------------------------------------------------------------------- refusals


def test_not_accelerated_is_refused(model_folder):
    model = read_model_folder(model_folder)
    with pytest.raises(MedsegError, match="not checked: run medseg accelerate"):
        load_bundle(model.checkpoints, device="cpu", model_dir=model_folder, settings={"backend": "onnxruntime"})


def test_a_refusing_record_is_refused_naming_the_dice(model_folder, pool, tmp_path, monkeypatch):
    folder = _copy(model_folder, tmp_path)
    monkeypatch.setattr(backends, "ACCEPT_DICE", 1.01)  # no mask can reach it: a real refusal, real Dice
    result = accelerate(folder, pool, "onnxruntime", "int8", threads=1, calibration_per_case=4)
    assert not result.accepted and result.entry["threshold"] == 1.01
    model = read_model_folder(folder)
    with pytest.raises(MedsegError, match=f"refused.*Dice {result.entry['min_dice']} on case {result.entry['worst_case']}"):
        load_bundle(model.checkpoints, device="cpu", model_dir=folder,
                    settings={"backend": "onnxruntime", "precision": "int8"})


def test_changed_checkpoints_or_compiled_files_are_refused(model_folder, pool, tmp_path):
    folder = _copy(model_folder, tmp_path)
    accelerate(folder, pool, "onnxruntime", "fp32", threads=1)
    settings = {"backend": "onnxruntime", "precision": "fp32"}
    model = read_model_folder(folder)
    assert load_bundle(model.checkpoints, device="cpu", model_dir=folder, settings=settings).models
    compiled = folder / BACKENDS_DIR / "onnxruntime-fp32" / "fold_1.onnx"
    original = compiled.read_bytes()
    compiled.write_bytes(original + b"\0")
    with pytest.raises(MedsegError, match="changed since"):
        load_bundle(model.checkpoints, device="cpu", model_dir=folder, settings=settings)
    compiled.write_bytes(original)
    # a retrained fold: the folder's model.json now lists another sha256
    other = _decisive_checkpoint(tmp_path / "other.pt", seed=7)
    cfg = tmp_path / "config.yaml"
    shutil.copy(folder / "config.yaml", cfg)
    write_model_folder(folder, [folder / "fold_0.pt", other], cfg, folder / FOLDS_FILE, model.postprocess)
    model = read_model_folder(folder)
    with pytest.raises(MedsegError, match="checked for other checkpoints"):
        load_bundle(model.checkpoints, device="cpu", model_dir=folder, settings=settings)


def test_plain_checkpoints_with_a_backend_are_refused(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "a.pt", CHANNELS)
    with pytest.raises(MedsegError, match="not a model folder"):
        load_bundle([ckpt], device="cpu", settings={"backend": "onnxruntime"})


def test_unsupported_precisions_are_refused(model_folder, pool):
    with pytest.raises(MedsegError, match="onnxruntime runs fp32, int8"):
        accelerate(model_folder, pool, "onnxruntime", "bf16")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: the check cannot fail here")
def test_read_only_model_folder_fails_clearly(model_folder, pool, tmp_path):
    folder = _copy(model_folder, tmp_path)
    folder.chmod(0o555)
    try:
        with pytest.raises(MedsegError, match="read-only"):
            accelerate(folder, pool, "onnxruntime", "fp32")
        assert not (folder / BACKENDS_DIR).exists()
    finally:
        folder.chmod(0o755)


def test_manifest_without_the_cv_patients_is_refused(model_folder, tmp_path):
    other = generate_dataset(tmp_path / "other", n_cases=1, modality="MR", shape=(24, 24, 6), seed=9,
                             manifest_path=tmp_path / "other.csv")  # fmt: skip
    import pandas as pd

    table = pd.read_csv(other)
    table["case_id"] = table["patient_id"] = "stranger_000"  # the files stay; the case is no CV patient
    table.to_csv(other, index=False)
    with pytest.raises(MedsegError, match="holds none of the"):
        accelerate(model_folder, other, "onnxruntime", "fp32")


def test_accelerate_command_exit_status(model_folder, pool, tmp_path, capsys):
    from medseg.commands import accelerate as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    folder = _copy(model_folder, tmp_path)
    args = parser.parse_args([str(folder), "--manifest", str(pool), "--backend", "onnxruntime", "--threads", "1"])
    assert command.run(args) == 0
    assert "onnxruntime-fp32: accepted: min Dice 1.0000" in capsys.readouterr().out
