"""`model.arch: monai:<Name>`: every listed MONAI 2-D network builds from YAML, keeps medseg's
shape contract, trains one step and predicts a case through medseg; bad options are clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medseg.config import Config, ModelConfig, load_config
from medseg.errors import ConfigError
from medseg.model_names import MONAI_NETWORKS
from medseg.models.registry import build_model, list_monai_networks

# small settings so every network trains in seconds on a CPU (the defaults also build)
SMALL = {
    "BasicUNet": {"features": [8, 8, 16, 32, 64, 8]},
    "BasicUNetPlusPlus": {"features": [8, 8, 16, 32, 64, 8]},
    "UNet": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
    "AttentionUnet": {"channels": [8, 16, 32], "strides": [2, 2]},
    "SegResNet": {"init_filters": 8},
    "DynUNet": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [8, 16, 32]},
    "FlexibleUNet": {"backbone": "resnet10", "decoder_channels": [32, 16, 8, 8, 8]},
    "SwinUNETR": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]},
}


def test_every_listed_network_has_small_settings():
    assert sorted(SMALL) == sorted(MONAI_NETWORKS)


@pytest.mark.parametrize("name", list(MONAI_NETWORKS))
def test_builds_from_yaml_and_keeps_the_shape_contract(tmp_path, name):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": f"monai:{name}", "in_channels": 9, "out_channels": 2,
                                              "options": SMALL[name]}}))  # fmt: skip
    cfg = load_config(path)
    model = build_model(cfg.model).eval()
    for h, w in ((64, 64), (50, 38)):  # any size: padded to the pooling grid and cropped back
        with torch.no_grad():
            out = model(torch.randn(2, 9, h, w))
        assert out.shape == (2, 2, h, w)
    assert model.multiple >= 1


def test_defaults_build_every_network():
    for arch in list_monai_networks():
        assert build_model(ModelConfig(arch=arch, in_channels=3)) is not None


def test_bad_names_and_options_are_clear_errors():
    with pytest.raises(ValueError, match="listed 2-D networks: monai:BasicUNet"):
        ModelConfig(arch="monai:VNet")
    with pytest.raises(ConfigError, match=r"filterz not accepted by MONAI SegResNet; its arguments: .*init_filters"):
        build_model(ModelConfig(arch="monai:SegResNet", options={"filterz": 8}))
    with pytest.raises(ConfigError, match="never downloads"):
        build_model(ModelConfig(arch="monai:FlexibleUNet", options={"pretrained": True}))
    with pytest.raises(ConfigError, match="not a FlexibleUNet backbone"):
        build_model(ModelConfig(arch="monai:FlexibleUNet", options={"backbone": "vit"}))
    # the built-in architectures' settings are dropped for a MONAI network (one log line), not an error
    assert ModelConfig(arch="monai:SegResNet", width=0.5, dropout=0.1).model_dump(include={"width", "dropout"}) == {
        "width": None, "dropout": None}
    with pytest.raises(ValueError, match="model.options is for monai"):
        ModelConfig(arch="unet", encoder="resnet18", options={"x": 1})


@pytest.fixture(scope="module")
def phantoms(phantom_manifest) -> Path:
    return phantom_manifest(3, (64, 56, 8), seed=1, val_fraction=0.34, test_fraction=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MONAI_NETWORKS))
def test_one_training_step_and_one_inference_through_medseg(tmp_path, phantoms, name):
    from medseg.engine import train
    from medseg.inference.cases import cases_from_manifest
    from medseg.inference.runner import load_bundle, run_inference

    cfg = Config.model_validate({
        "data": {"manifest": str(phantoms)},
        "preprocess": {"context_slices": 1},
        "model": {"arch": f"monai:{name}", "in_channels": 6, "options": SMALL[name]},
        "train": {"epochs": 1, "samples_per_epoch": 2, "batch_size": 2, "patch_size": [64, 64] if name == "SwinUNETR" else [32, 32], "num_workers": 0,
                  "threads": 1, "amp": "off", "cache_dir": str(tmp_path / "cache")},
    })  # fmt: skip (SwinUNETR's instance norms need > 1 pixel at stride 32: a 64-pixel patch)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.epochs_done == 1
    bundle = load_bundle([tmp_path / "run" / "last.pt"], device="cpu")
    cases = cases_from_manifest(phantoms, bundle.channels, bundle.modality, "val")
    summary = run_inference(cases, bundle, tmp_path / "pred", show_progress=False)
    assert not summary.failures and len(summary.done) == 1
    import nibabel as nib

    mask = nib.load(str(tmp_path / "pred" / f"{summary.done[0]}_mask.nii.gz"))
    assert mask.shape == (64, 56, 8) and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_models_compare_configs(tmp_path, capsys):
    from medseg.cli import main

    paths = []
    for name, model in (("unet.yaml", {"arch": "unet", "encoder": "resnet18", "width": 0.125, "in_channels": 3}),
                        ("segresnet.yaml", {"arch": "monai:SegResNet", "in_channels": 3, "options": {"init_filters": 8}})):  # fmt: skip
        path = tmp_path / name
        path.write_text(yaml.safe_dump({"model": model, "train": {"patch_size": [64, 64]}}))
        paths.append(str(path))
    assert main(["models", "--compare", *paths, "--format", "markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| config | model | params (M) | GFLOPs / slice | CPU slices/s | RF (px) | patch |")
    rows = [line.strip("|").split("|") for line in lines[2:]]
    assert [r[0].strip() for r in rows] == ["unet.yaml", "segresnet.yaml"]
    assert rows[1][1].strip() == "monai:SegResNet" and all(float(r[4]) > 0 for r in rows)
    assert float(rows[1][2]) == pytest.approx(
        sum(p.numel() for p in build_model(ModelConfig(arch="monai:SegResNet", in_channels=3,
                                                       options={"init_filters": 8})).parameters()) / 1e6, abs=0.006)  # fmt: skip


@pytest.mark.parametrize("name", list(MONAI_NETWORKS))
def test_torchscript_export_of_monai_networks(tmp_path, name):
    from medseg.models.export import export_model, verify_export

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=f"monai:{name}", in_channels=3, options=SMALL[name])).eval()
    size = 64 if name == "SwinUNETR" else 32
    path = export_model(model, tmp_path / "model.torchscript", "torchscript", torch.randn(1, 3, size, size))
    assert verify_export(model, path, "torchscript", [torch.randn(2, 3, size, size)]) < 1e-4
    other = verify_export(model, path, "torchscript", [torch.randn(1, 3, 2 * size, size)])
    if name == "SwinUNETR":  # its window partition is traced at the example size (the export command warns)
        assert other > 1e-4
    else:
        assert other < 1e-4


def test_models_lists_monai_networks_and_flexible_unet_backbones(capsys):
    from medseg.cli import main

    assert main(["models", "--arch", "monai:FlexibleUNet", "--arch", "monai:SegResNet"]) == 0
    out = capsys.readouterr().out
    assert "monai:SegResNet" in out and "resnet50" in out and "efficientnet-b0" in out
