"""Dice + BCE / Dice + CE loss and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.config import LossConfig, OptimizerConfig, ScheduleConfig
from medseg.engine.ema import build_ema, ema_decay_at
from medseg.engine.optim import build_optimizer, build_scheduler, lr_factor
from medseg.losses import SegmentationLoss


def target() -> torch.Tensor:
    y = torch.zeros(2, 1, 16, 16)
    y[0, 0, 4:10, 4:10] = 1
    return y


def test_binary_loss_is_dice_plus_bce():
    y = target()
    good = (y * 2 - 1) * 8.0  # confident and right
    bad = -good
    loss = SegmentationLoss(1)
    assert loss(good, y) < 0.01 < 1.0 < loss(bad, y)
    dice_only = SegmentationLoss(1, LossConfig(ce_weight=0.0))
    bce_only = SegmentationLoss(1, LossConfig(dice_weight=0.0))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(bad, y)
    torch.testing.assert_close(bce_only(bad, y), bce)
    torch.testing.assert_close(loss(bad, y), dice_only(bad, y) + bce)


def test_batch_dice_ignores_empty_slices_per_slice_dice_does_not():
    y = target()  # the second slice is empty
    logits = (y * 2 - 1) * 8.0
    batch = SegmentationLoss(1, LossConfig(ce_weight=0.0, batch_dice=True))(logits, y)
    per_slice = SegmentationLoss(1, LossConfig(ce_weight=0.0, batch_dice=False))(logits, y)
    assert batch < 0.01
    assert per_slice > 0.4  # the empty slice's tiny residual probabilities make its own Dice ~0


def test_multiclass_loss_takes_class_indices():
    y = target().long()
    logits = torch.cat([(1 - y) * 8.0, y * 8.0], dim=1).float()
    loss = SegmentationLoss(2)
    assert loss(logits, y) < 0.01 < 1.0 < loss(logits.flip(1), y)
    with pytest.raises(ValueError, match="channels"):
        loss(logits[:, :1], y)


def test_bf16_logits_are_scored_in_float32():
    y = target()
    logits = ((y * 2 - 1) * 3.0).to(torch.bfloat16)
    out = SegmentationLoss(1)(logits, y)
    assert out.dtype == torch.float32


def test_warmup_then_poly_and_cosine():
    poly = ScheduleConfig(name="poly", warmup_epochs=1, warmup_start=0.1, power=1.0)
    assert lr_factor(0, 100, 10, poly) == pytest.approx(0.1)
    assert lr_factor(5, 100, 10, poly) == pytest.approx(0.55)
    assert lr_factor(10, 100, 10, poly) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, poly) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, poly) == pytest.approx(0.0)
    cosine = ScheduleConfig(name="cosine", warmup_epochs=0, min_lr_ratio=0.1)
    assert lr_factor(0, 100, 0, cosine) == pytest.approx(1.0)
    assert lr_factor(50, 100, 0, cosine) == pytest.approx(0.55)
    assert lr_factor(100, 100, 0, cosine) == pytest.approx(0.1)
    assert lr_factor(70, 100, 0, ScheduleConfig(name="constant")) == 1.0


def test_scheduler_steps_per_iteration_and_no_decay_on_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=0.5))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert len(opt.param_groups[0]["params"]) == 1  # the conv weight; bias and norm are not decayed
    sched = build_scheduler(opt, ScheduleConfig(warmup_epochs=1, warmup_start=0.5, power=1.0), steps_per_epoch=4, epochs=2)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.05) and lrs[4] == pytest.approx(0.1)
    assert lrs[7] == pytest.approx(0.1 * 1 / 4)
    assert all(math.isfinite(v) for v in lrs)
    sgd = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.01, momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]


def test_ema_warms_up_then_averages():
    assert ema_decay_at(0.99, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.99, 10_000) == 0.99
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = build_ema(model, 0.5)
    ema.update_parameters(model)  # first update copies
    torch.testing.assert_close(ema.module[0].weight, model[0].weight)
    old = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(4, 2))  # moves the BatchNorm statistics and its integer counter
    ema.update_parameters(model)
    d = ema_decay_at(0.5, 1)
    torch.testing.assert_close(ema.module[0].weight, d * old + (1 - d) * model[0].weight)
    assert int(ema.module[1].num_batches_tracked) == int(model[1].num_batches_tracked) == 1


def test_fitted_schedule_decays_to_zero_at_the_new_end_and_survives_a_state_dict():
    from medseg.config import ScheduleConfig
    from medseg.engine.optim import epochs_within_budget, fit_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="poly", power=1.0, warmup_epochs=0), 10, 8)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 - 10 / 80)
    fit_scheduler(scheduler, 2)  # 20 steps in all
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 - 10 / 20)
    state = scheduler.state_dict()
    fresh_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fresh = build_scheduler(fresh_opt, ScheduleConfig(name="poly", power=1.0, warmup_epochs=0), 10, 8)
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0].total_steps == 20
    for _ in range(10):
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    # 25 minutes, 4 min spent on the first epoch of 4 min: 5 more fit with the 5% margin
    assert epochs_within_budget(1, 240.0, 240.0, 25.0) == 1 + 5
    assert epochs_within_budget(3, 1500.0, 240.0, 25.0) == 3
