"""Fit nnU-Net's epoch schedule to a wall-clock budget: pure arithmetic, no nnU-Net import.

nnU-Net v2 trains ``num_epochs`` epochs of ``num_iterations_per_epoch`` training iterations; each
epoch also runs ``num_val_iterations_per_epoch`` validation iterations and some bookkeeping (log
lines, the progress plot, a checkpoint whenever the EMA pseudo Dice improves). Its learning rate
is the poly schedule ``lr_e = lr_0 (1 - e / num_epochs) ** 0.9``, set at the start of epoch ``e``.
Stopping a run at a time limit would leave that schedule unfinished (the learning rate still
high); the benchmark's trainer (``peer_nnunet_trainer.py``) instead measures its own iteration
time and shrinks the schedule so that its **last epoch ends at the budget**.

Rule of :func:`fit_schedule` (``t``: seconds per training iteration, ``t_val`` per validation
iteration, ``o`` seconds of bookkeeping per epoch):

====  ===========================================================================================
step  decision
====  ===========================================================================================
1     ``available = budget - elapsed - end_overhead``: what is left after set-up and measuring
      (already spent) and before the final checkpoint and shutting the data loaders
2     ``N = available / (t + VAL_FRACTION * t_val)``: training iterations the budget holds
3     epochs ``E = max(ceil(N / ITERATIONS_PER_EPOCH), min(TARGET_EPOCHS, N // MIN_ITERATIONS))``:
      nnU-Net's own 250 iterations per epoch when the budget holds more than ``TARGET_EPOCHS``
      such epochs, else ``TARGET_EPOCHS`` shorter epochs (so the poly schedule keeps at least
      10 steps) as long as each holds ``MIN_ITERATIONS``; at least 1
4     iterations per epoch ``I``: the most with ``E * (I t + V t_val + o) <= available``, where
      ``V = max(1, round(VAL_FRACTION * I))`` (validation only feeds nnU-Net's pseudo Dice log and
      its "best" checkpoint, which the benchmark does not use: it predicts with the final one);
      when ``I < MIN_ITERATIONS``, ``E`` drops until ``I >= MIN_ITERATIONS`` or ``E = 1``
5     floor: 1 epoch of ``MIN_ITERATIONS``; a budget too small even for that returns the floor
      with ``over_budget`` True (the trainer prints the predicted overrun)
====  ===========================================================================================

After every epoch :func:`refit` re-divides what is left of the budget from the epochs' measured
times (training iterations and the rest of an epoch, timed apart): the remaining epochs are as
many as fit at the current length, and their iterations per epoch grow so that they fill what is
left (never shrink, except that a last short epoch of at least ``MIN_ITERATIONS`` is added when no
full one fits). The learning rate depends only on the epoch index and ``num_epochs``, not on the
iterations per epoch; and epoch 0's rate is ``lr_0`` whatever ``num_epochs`` is, so the refit after
epoch 0 gives exactly the schedule that would have been chosen from the start. Later refits (the
machine's speed changed: the CPU is shared) move the schedule's end back onto the budget with a
small kink.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: nnU-Net's default training iterations per epoch (and its 1000 epochs: 250k iterations)
ITERATIONS_PER_EPOCH = 250
#: validation iterations per training iteration (nnU-Net: 50 / 250 = 0.2; kept small here)
VAL_FRACTION = 0.04
#: epochs wanted at least, so that the poly learning rate decays in that many steps
TARGET_EPOCHS = 10
#: fewest training iterations in one epoch (the floor is 1 epoch of this many)
MIN_ITERATIONS = 5
#: nnU-Net's poly exponent
POLY_EXPONENT = 0.9


@dataclass(frozen=True)
class Schedule:
    """What :func:`fit_schedule` chose; ``seconds``: its predicted duration from the measured
    times (epochs x one epoch), ``available_s``: the seconds it had to fit into."""

    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    seconds: float
    available_s: float
    over_budget: bool
    rule: str

    @property
    def iterations(self) -> int:
        """Training iterations in all (epochs x iterations per epoch)."""
        return self.epochs * self.iterations_per_epoch

    def as_dict(self) -> dict:
        return {**asdict(self), "iterations": self.iterations}


def val_iterations(iterations_per_epoch: int) -> int:
    """Validation iterations per epoch: ``max(1, round(VAL_FRACTION * I))``."""
    return max(1, round(VAL_FRACTION * iterations_per_epoch))


def epoch_seconds(iterations: int, t: float, t_val: float, overhead_s: float) -> float:
    """Seconds of one epoch of ``iterations`` training iterations, its validation and bookkeeping."""
    return iterations * t + val_iterations(iterations) * t_val + overhead_s


def poly_lr(epoch: int, epochs: int, lr0: float = 1e-2, exponent: float = POLY_EXPONENT) -> float:
    """nnU-Net's learning rate at the start of ``epoch`` (0-based) of ``epochs``."""
    return lr0 * (1.0 - epoch / epochs) ** exponent


def _most_iterations(epochs: int, available: float, t: float, t_val: float, overhead_s: float) -> int:
    """Largest ``I`` with ``epochs * epoch_seconds(I) <= available`` (0 when none fits)."""
    per_epoch = available / epochs
    guess = max(0, int((per_epoch - overhead_s - t_val) / (t + VAL_FRACTION * t_val)) + 2)
    while guess > 0 and epoch_seconds(guess, t, t_val, overhead_s) > per_epoch:
        guess -= 1
    return guess


def fit_schedule(
    sec_per_iteration: float,
    budget_s: float,
    *,
    elapsed_s: float = 0.0,
    sec_per_val_iteration: float | None = None,
    epoch_overhead_s: float = 0.0,
    end_overhead_s: float = 0.0,
) -> Schedule:
    """Epochs, iterations per epoch and validation iterations so that the whole poly schedule ends
    at ``budget_s`` (module docstring: the rule). ``sec_per_val_iteration`` defaults to a third of
    a training iteration (forward only). Raises ``ValueError`` for a non-positive iteration time
    or budget."""
    t = float(sec_per_iteration)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"seconds per iteration must be positive, got {sec_per_iteration}")
    if not budget_s > 0:
        raise ValueError(f"budget must be positive, got {budget_s} s")
    t_val = t / 3.0 if sec_per_val_iteration is None else max(0.0, float(sec_per_val_iteration))
    o = max(0.0, float(epoch_overhead_s))
    available = float(budget_s) - max(0.0, elapsed_s) - max(0.0, end_overhead_s)
    n = max(0.0, available) / (t + VAL_FRACTION * t_val)
    epochs = max(1, math.ceil(n / ITERATIONS_PER_EPOCH), min(TARGET_EPOCHS, int(n // MIN_ITERATIONS)))
    iterations = _most_iterations(epochs, available, t, t_val, o) if available > 0 else 0
    while iterations < MIN_ITERATIONS and epochs > 1:
        epochs -= 1
        iterations = _most_iterations(epochs, available, t, t_val, o)
    over = iterations < MIN_ITERATIONS
    iterations = max(iterations, MIN_ITERATIONS)
    seconds = epochs * epoch_seconds(iterations, t, t_val, o)
    rule = (f"{available:.0f} s left of {budget_s:.0f} s hold {n:.0f} iterations at {t:.3g} s (+{VAL_FRACTION:g} x "
            f"{t_val:.3g} s validation): {epochs} epoch(s) x {iterations} iterations (+{val_iterations(iterations)} "
            f"validation, {o:.2g} s bookkeeping per epoch)")  # fmt: skip
    if over:
        rule += f"; below the floor (1 x {MIN_ITERATIONS}): predicted {seconds:.0f} s, over the budget"
    return Schedule(epochs, iterations, val_iterations(iterations), seconds, available, over, rule)


def refit(
    done_epochs: int,
    elapsed_s: float,
    budget_s: float,
    sec_per_iteration: float,
    epoch_rest_s: float,
    iterations_per_epoch: int,
    end_overhead_s: float = 0.0,
) -> tuple[int, int]:
    """``(num_epochs, iterations_per_epoch)`` for the rest of a run after ``done_epochs`` epochs and
    ``elapsed_s`` seconds, training iterations now taking ``sec_per_iteration`` and the rest of an
    epoch (validation, bookkeeping) ``epoch_rest_s`` (module docstring)::

        left = budget - elapsed - end_overhead
        m    = floor(left / (I t + rest))            remaining epochs at the current length I
        I'   = floor((left / m - rest) / t) >= I     when m >= 1: they fill what is left
        m, I' = 1, floor((left - rest) / t)          when m = 0 and that is >= MIN_ITERATIONS
        else: (done, I) -- stop after the epochs done

    Raises ``ValueError`` for a non-positive iteration time."""
    t = float(sec_per_iteration)
    if not t > 0:
        raise ValueError(f"seconds per iteration must be positive, got {sec_per_iteration}")
    rest = max(0.0, float(epoch_rest_s))
    left = float(budget_s) - float(elapsed_s) - max(0.0, end_overhead_s)
    more = max(0, math.floor(left / (iterations_per_epoch * t + rest)))
    if more >= 1:
        return done_epochs + more, max(iterations_per_epoch, math.floor((left / more - rest) / t))
    last = math.floor((left - rest) / t) if left > rest else 0
    if last >= MIN_ITERATIONS:
        return done_epochs + 1, last
    return max(done_epochs, 1), iterations_per_epoch


def iterations_in_budget(sec_per_iteration: float, budget_s: float) -> int:
    """Training iterations ``budget_s`` holds at ``sec_per_iteration`` with nothing else counted
    (an upper bound: the 3d_fullres gate)."""
    return math.floor(budget_s / sec_per_iteration + 1e-9) if sec_per_iteration > 0 else 0  # 240 // 0.8 is 299.0
