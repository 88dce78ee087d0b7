"""Ramps: ``lambda_coef`` and the task-loss weights going smoothly from the values in force before a stage to the
stage's own, as pure functions of the progress ``p``.

* progress: ``p = (global_step - stage_start_step) / ramp_steps`` (steps), or
  ``p = (current_epoch + batch_idx / num_training_batches - start_epoch) / ramp_epochs`` (epochs); clipped to
  ``[0, 1]``;
* shape: ``s(p) = p`` (``"linear"``) or ``s(p) = (1 - cos(pi * p)) / 2`` (``"cosine"``);
* value: ``prev + (target - prev) * s(p)``, so the first batch of the stage has the previous values and the target
  is reached at the end of the ramp.

Distillation follows the *effective* coefficient: ``lambda_coef`` where a stage distills, 0 where it does not. During
a ramp ``lambda_coef`` holds the ramped effective coefficient, and ``distillation`` is on while it is > 0 or while
the stage itself distills.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

from lightning_stages.schedule.stage import ResolvedStage, Stage

__all__ = ["effective_lambda", "epoch_progress", "ramp_fraction", "ramped", "step_progress"]


def ramp_fraction(shape: Optional[str], p: float) -> float:
    """``s(p)`` of the shape (``None``: linear), with ``p`` clipped to ``[0, 1]``.

    Example::

        >>> ramp_fraction("linear", 0.25), round(ramp_fraction("cosine", 0.5), 12), ramp_fraction(None, 2.0)
        (0.25, 0.5, 1.0)
    """
    p = min(max(p, 0.0), 1.0)
    return (1.0 - math.cos(math.pi * p)) / 2.0 if shape == "cosine" else p


def effective_lambda(resolved: ResolvedStage) -> float:
    """The distillation coefficient that counts: ``lambda_coef`` where the settings distill, else 0.

    Example::

        >>> effective_lambda(ResolvedStage("ft", 1, 2, 2, 5, None, False, 0.7, {}))
        0.0
    """
    return resolved.lambda_coef if resolved.distillation else 0.0


def epoch_progress(stage: Stage, epoch: int, batch_index: int = 0, batches_per_epoch: Optional[float] = None,
                   accumulate_grad_batches: int = 1) -> float:
    """Progress ``p`` (not clipped) of the ramp of an epoch ``stage`` at a batch.

    With ``ramp_epochs``: ``(epoch + batch_index / batches_per_epoch - start_epoch) / ramp_epochs``. With
    ``ramp_steps``: the optimizer steps since the stage's first batch over ``ramp_steps``, an epoch being
    ``ceil(batches_per_epoch / accumulate_grad_batches)`` steps.

    Raises:
        ValueError: ``batches_per_epoch`` is needed (a batch after the first, or ``ramp_steps`` after the stage's
            first epoch) and not given, or not finite.

    Example::

        >>> stage = Stage(start_epoch=2, end_epoch=6, ramp_epochs=2)
        >>> epoch_progress(stage, 3, batch_index=2, batches_per_epoch=4)
        0.75
        >>> epoch_progress(Stage(start_epoch=1, ramp_steps=4), 2, 3, batches_per_epoch=4, accumulate_grad_batches=2)
        0.75
    """
    start = stage.start_epoch or 0
    needs_batches = batch_index != 0 or (stage.ramp_steps is not None and epoch != start)
    if needs_batches and (batches_per_epoch is None or not math.isfinite(batches_per_epoch) or batches_per_epoch <= 0):
        raise ValueError(f"the ramp of this stage needs `batches_per_epoch` (a finite number > 0), got "
                         f"{batches_per_epoch!r}")
    if stage.ramp_steps is not None:
        per_epoch = math.ceil(batches_per_epoch / accumulate_grad_batches) if batches_per_epoch else 0
        return ((epoch - start) * per_epoch + batch_index // accumulate_grad_batches) / stage.ramp_steps
    fraction = batch_index / batches_per_epoch if batch_index and batches_per_epoch else 0.0
    return (epoch - start + fraction) / float(stage.ramp_epochs or 1.0)


def step_progress(stage: Stage, global_step: int) -> float:
    """Progress ``p`` (not clipped) of the ramp of a step ``stage``: ``(global_step - start_step) / ramp_steps``.

    Example::

        >>> step_progress(Stage(start_step=100, ramp_steps=40), 110)
        0.25
    """
    return (global_step - (stage.start_step or 0)) / (stage.ramp_steps or 1)


def ramped(previous: ResolvedStage, target: ResolvedStage, shape: Optional[str], p: float) -> ResolvedStage:
    """The values at progress ``p`` of a ramp from ``previous`` (the settings in force just before the stage) to
    ``target`` (the stage's own): ``target`` itself once ``p >= 1``.

    Example::

        >>> kd = ResolvedStage("kd", 0, 1, 2, 0, 4, True, 1.0, {"cls": 0.0})
        >>> ft = ResolvedStage("ft", 1, 2, 2, 4, 8, False, 0.3, {"cls": 1.0})
        >>> r = ramped(kd, ft, "linear", 0.25)
        >>> r.name, r.distillation, r.lambda_coef, r.loss_weights, r.ramping
        ('ft', True, 0.75, {'cls': 0.25}, True)
        >>> ramped(kd, ft, "cosine", 1.0) == ft
        True
    """
    if p >= 1.0:
        return target
    s = ramp_fraction(shape, p)
    before, after = effective_lambda(previous), effective_lambda(target)
    coef = before + (after - before) * s
    weights = {key: previous.loss_weights.get(key, value) + (value - previous.loss_weights.get(key, value)) * s
               for key, value in target.loss_weights.items()}
    return replace(target, distillation=coef > 0 or target.distillation, lambda_coef=coef, loss_weights=weights,
                   ramping=True)
