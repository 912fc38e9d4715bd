"""Checkpoints: round trip, weights_only loading, atomic writes, clear errors naming the file."""

from __future__ import annotations

import pytest
import torch

from medseg import __version__
from medseg.config import ModelConfig
from medseg.errors import MedsegError
from medseg.models import build_model
from medseg.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

CFG = ModelConfig(arch="unet_inception", encoder="resnet18", in_channels=9, out_channels=2, width=0.125)


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    model = build_model(CFG)
    model.train()
    model(torch.randn(2, 9, 64, 64))  # move the BatchNorm running statistics away from their init
    path = save_checkpoint(tmp_path / "run" / "best.pt", model, CFG, {"epoch": 3, "dice": 0.71, "lr": [1e-3]})
    return model.eval(), path


def test_round_trip(trained):
    model, path = trained
    loaded, cfg = model_from_checkpoint(path)
    assert cfg == CFG and not loaded.training
    x = torch.randn(1, 9, 48, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    payload = load_checkpoint(path)
    assert payload["medseg_version"] == __version__
    assert payload["extra"] == {"epoch": 3, "dice": 0.71, "lr": [1e-3]}
    assert payload["model"]["arch"] == "unet_inception"
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp file left behind


def test_failed_save_keeps_the_old_checkpoint(trained):
    model, path = trained
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"extra\.optimizer: SGD cannot go into a checkpoint"):
        save_checkpoint(path, model, CFG, {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]


def test_pretrained_path_is_not_read_again(tmp_path):
    weights = tmp_path / "enc.pt"
    torch.save(build_model(CFG).encoder.state_dict(), weights)
    cfg = CFG.model_copy(update={"pretrained": str(weights)})
    path = save_checkpoint(tmp_path / "c.pt", build_model(cfg), cfg, {})
    weights.unlink()
    _, loaded_cfg = model_from_checkpoint(path)
    assert loaded_cfg.pretrained is None


def test_missing_checkpoint(tmp_path):
    with pytest.raises(MedsegError, match="absent.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_corrupt_and_truncated_checkpoints(trained, tmp_path):
    _, path = trained
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(MedsegError, match=r"corrupt.pt: not a checkpoint \(not a PyTorch file, or truncated\)"):
        model_from_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MedsegError, match=r"truncated.pt: not a checkpoint \(not a PyTorch file, or truncated\)"):
        model_from_checkpoint(truncated)


def test_foreign_files_are_rejected(tmp_path):
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(MedsegError, match="tensor.pt: not a medseg checkpoint"):
        load_checkpoint(tensor_file)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "medseg-checkpoint", "obj": ModelConfig()}, pickled)  # arbitrary object: unsafe
    with pytest.raises(MedsegError, match="pickled.pt: not a medseg checkpoint: it holds Python objects") as caught:
        load_checkpoint(pickled)
    assert "weights_only" not in str(caught.value)  # never the advice to turn safe loading off


def test_config_and_weights_mismatch(trained, tmp_path):
    model, _ = trained
    path = save_checkpoint(tmp_path / "bad.pt", model, CFG.model_copy(update={"encoder": "resnet34"}), {})
    with pytest.raises(MedsegError, match="bad.pt: weights do not match the model in its config"):
        model_from_checkpoint(path)
    payload = load_checkpoint(path)
    payload["model"]["arch"] = "no_such_arch"
    torch.save(payload, path)
    with pytest.raises(MedsegError, match=r"bad.pt \(model config\): arch: .*unknown arch 'no_such_arch'"):
        model_from_checkpoint(path)
