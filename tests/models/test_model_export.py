"""Export to TorchScript (always) and ONNX (where onnxruntime imports): same output as PyTorch."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from medseg.cli import main
from medseg.config import ModelConfig
from medseg.models import build_model
from medseg.models.checkpoint import save_checkpoint
from medseg.models.export import export_model, verify_export

TOL = 1e-4
MODELS = [("unet_inception", "resnet18"), ("deeplabv3plus", "xception"), ("segnet", "unet")]
needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="onnx/onnxruntime not installed (pip install 'medseg[export]')",
)


def _model(arch, encoder):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, encoder=encoder, in_channels=3, out_channels=2, width=0.125))
    model.train()
    model(torch.randn(2, 3, 64, 64))  # non-trivial BatchNorm statistics
    return model.eval()


# the Xception encoder's export takes 11-24 s on 2 loaded cores: in the slow set
EXPORT_CASES = [pytest.param(a, e, id=f"{a}-{e}", marks=[pytest.mark.slow] if e == "xception" else []) for a, e in MODELS]


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=needs_ort)])
@pytest.mark.parametrize("arch,encoder", EXPORT_CASES)
def test_export_matches_pytorch(tmp_path, arch, encoder, fmt):
    model = _model(arch, encoder)
    path = export_model(model, tmp_path / f"model.{fmt}", fmt, torch.randn(1, 3, 64, 64))
    # the export size, another batch and a size that needs padding (dynamic axes / traced shapes)
    inputs = [torch.randn(*shape) for shape in [(1, 3, 64, 64), (2, 3, 96, 80), (1, 3, 50, 70)]]
    assert verify_export(model, path, fmt, inputs) < TOL
    with torch.no_grad():
        assert model(inputs[-1]).std() > 0


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=needs_ort)])
def test_export_command(tmp_path, capsys, fmt):
    cfg = ModelConfig(arch="unet", encoder="resnet18", in_channels=9, width=0.125)
    ckpt = save_checkpoint(tmp_path / "best.pt", build_model(cfg), cfg, {})
    out = tmp_path / "exported" / f"model.{fmt}"
    assert (
        main(["export", str(ckpt), "--format", fmt, "--out", str(out), "--height", "64", "--width", "48"])
        == 0
    )
    printed = capsys.readouterr().out
    assert out.is_file() and f"wrote {out}" in printed
    diff = float(printed.split("max abs difference to PyTorch on a random input:")[1].split()[0])
    assert diff < TOL


def test_export_command_default_path_and_errors(tmp_path, capsys):
    cfg = ModelConfig(arch="unet", encoder="resnet18", width=0.125)
    ckpt = save_checkpoint(tmp_path / "best.pt", build_model(cfg), cfg, {})
    before = ckpt.read_bytes()
    assert main(["export", str(ckpt), "--format", "torchscript", "--height", "32", "--width", "32"]) == 0
    assert (tmp_path / "best.torchscript.pt").is_file() and ckpt.read_bytes() == before
    capsys.readouterr()
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(ckpt)]) == 2
    assert "would overwrite the checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "onnx"]) == 2
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err
