"""The teachers' cost options: ``teacher_precision`` (the autocast the teachers run under), ``offload_teachers`` and
``teacher_cache``: their values, their checks and what they decide; and the strategies teachers cannot run under."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_stages.distillation.teacher_cache import TeacherCache
from lightning_stages.errors import StageConfigError, StageProblem, did_you_mean

__all__ = ["AUTOCAST_DTYPES", "OFFLOAD_MODES", "autocast_in_force", "check_cost_options", "refuse_sharded_strategy",
           "wants_offload"]

#: ``teacher_precision`` values and the autocast dtype each runs the teachers under (``None``: no autocast)
AUTOCAST_DTYPES: dict[Optional[str], Optional[torch.dtype]] = {
    None: None, "32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16,
}
#: ``offload_teachers`` values
OFFLOAD_MODES = (False, True, "after_last", "idle")


def autocast_in_force(device_type: str, precision: Optional[str] = None) -> Optional[torch.dtype]:
    """The dtype of the autocast that teachers run under on ``device_type`` (``None``: no autocast):
    ``teacher_precision``'s own, else the caller's (e.g. a ``Trainer(precision="bf16-mixed")``'s, which
    :meth:`Teachers.run` leaves in force).

    Example::

        >>> autocast_in_force("cpu"), autocast_in_force("cpu", "16-mixed")
        (None, torch.float16)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_in_force("cpu"), autocast_in_force("cpu", "32-true"), autocast_in_force("cpu", "16-mixed")
        (torch.bfloat16, torch.bfloat16, torch.float16)
    """
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is not None:
        return dtype
    try:
        enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: one pair of functions per device type, cuda's named without it ("gpu")
        kind = "" if device_type == "cuda" else f"{device_type}_"
        is_enabled = getattr(torch, f"is_autocast_{kind}enabled", None)
        get_dtype = getattr(torch, f"get_autocast_{kind or 'gpu_'}dtype", None)
        if is_enabled is None or get_dtype is None:
            return None  # no autocast for this device type in this torch
        enabled, dtype = is_enabled(), get_dtype()
    return dtype if enabled else None


def check_cost_options(precision: Any, offload: Any, cache: Any, where: str) -> None:
    """Check ``teacher_precision``, ``offload_teachers`` and ``teacher_cache`` together.

    Raises:
        StageConfigError: naming each option with an unknown value, and ``where``.

    Example::

        >>> check_cost_options("bf16-mixed", "idle", None, "stage 0")
        >>> check_cost_options("bf16", False, None, "stage 0")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_stages.errors.StageConfigError: 1 problem ...: `teacher_precision` = 'bf16': is not a teacher precision; ...
    """
    problems = []
    if not isinstance(precision, (str, type(None))) or precision not in AUTOCAST_DTYPES:
        problems.append(StageProblem("is not a teacher precision", name=where, field="teacher_precision",
                                     value=precision, hint=did_you_mean(str(precision), [k for k in AUTOCAST_DTYPES if k])
                                     or "use None, 'bf16-mixed' or '16-mixed'"))
    if not isinstance(offload, (bool, str)) or offload not in OFFLOAD_MODES:
        problems.append(StageProblem("is not an offload mode", name=where, field="offload_teachers", value=offload,
                                     hint="use False, True, 'after_last' or 'idle'"))
    if cache is not None and not isinstance(cache, TeacherCache):
        problems.append(StageProblem(f"must be a TeacherCache or None, not {type(cache).__name__}", name=where,
                                     field="teacher_cache", value=cache))
    if problems:
        raise StageConfigError(problems)
    if cache is not None:
        cache.check_directory()  # a file, or not writable: refused before the first batch


def wants_offload(mode: Union[bool, str], distills_now: bool, distills_later: bool, where: str) -> bool:
    """Whether ``offload_teachers=mode`` keeps the teachers on CPU now.

    Raises:
        StageConfigError: ``mode`` is not an offload mode (as :func:`check_cost_options` says it, naming ``where``).

    Example::

        >>> [wants_offload(mode, False, True, "stage 0") for mode in ("idle", True, False)]
        [True, False, False]
    """
    if not isinstance(mode, (bool, str)) or mode not in OFFLOAD_MODES:
        check_cost_options(None, mode, None, where)
    if not mode:
        return False
    if mode == "idle":
        return not distills_now
    return not (distills_now or distills_later)


def refuse_sharded_strategy(trainer: Any, needed_by: str) -> None:
    """Teachers live outside the module that FSDP, DeepSpeed and ModelParallel shard; refuse them there, at setup."""
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise StageConfigError(
            StageProblem(
                f"distillation is not supported under {type(strategy).__name__}: the teachers are kept outside the "
                "module this strategy shards, so every rank would hold a whole, unsharded copy that the strategy "
                "neither shards nor places on the device",
                name=needed_by, field="distillation", value=True,
                hint="use strategy='ddp' (or 'ddp_spawn'), or a schedule whose stages do not distill",
            )
        )
