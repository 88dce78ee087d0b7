"""Loading a teacher's weights in ``configure_teachers``, with errors that name the teacher and the file."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = ["load_teacher_checkpoint"]

_SHOWN = 4  # keys listed per kind of mismatch


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _prefix_hint(own: Mapping[str, Any], saved: Mapping[str, Any]) -> Optional[str]:
    """If the saved keys are the module's keys under one prefix (``"net."``), say so."""
    if not own:
        return None
    first = next(iter(own))
    for key in saved:
        if key.endswith("." + first):
            prefix = key[: -len(first)]
            if all(prefix + k in saved for k in own):
                return f"the checkpoint holds these weights under {prefix!r}: pass prefix={prefix!r}"
    return None


def load_teacher_checkpoint(
    module: nn.Module,
    path: Union[str, os.PathLike[str]],
    name: str = "teacher",
    prefix: Optional[str] = None,
    weights_only: bool = True,
) -> nn.Module:
    """Load a teacher's weights from a file, for use in ``configure_teachers``.

    The file is a ``state_dict`` saved with ``torch.save`` or a Lightning checkpoint (its ``"state_dict"`` entry is
    used). Every key must fit: a checkpoint of another architecture is refused. Raised inside
    ``configure_teachers``, the error reaches the user as a :class:`~lightning_stages.StageConfigError` naming the
    stage that needed the teacher, at setup, before the first training batch.

    Args:
        module: the teacher, built with its architecture; its weights are replaced in place.
        path: the file.
        name: the teacher's name in ``configure_teachers``; named in errors.
        prefix: use only the keys under this prefix, with it removed (e.g. ``"net."`` for the Lightning checkpoint
            of a module that keeps the teacher's network in ``self.net``).
        weights_only: passed to ``torch.load``; set ``False`` only for a trusted file that holds other objects.

    Returns:
        ``module``, with the checkpoint's weights.

    Raises:
        FileNotFoundError: nothing at ``path``; the message names the teacher and the path.
        ValueError: the file is not a checkpoint, or its weights do not fit ``module`` (missing, unexpected and
            mis-shaped keys are listed); the message names the teacher and the path.

    Example::

        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "teacher.pt"
        >>> torch.save(nn.Linear(4, 2).state_dict(), path)
        >>> teacher = load_teacher_checkpoint(nn.Linear(4, 2), path)
        >>> load_teacher_checkpoint(nn.Linear(4, 3), path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: teacher 'teacher': the checkpoint '...teacher.pt' does not fit Linear: shape mismatch weight: ...
    """
    path = Path(path)
    where = f"teacher {name!r}: the checkpoint {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"teacher {name!r}: no checkpoint file at {str(path)!r}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
        cause = next((line for line in lines[1:] if "Unsupported global" in line or "WeightsUnpickler" in line), "")
        advice = "; if you trust the file, pass weights_only=False" if weights_only and cause else ""
        raise ValueError(f"{where} cannot be read as a checkpoint: {type(err).__name__}: "
                         + (cause or (lines[0] if lines else "")) + advice) from err
    if isinstance(saved, Mapping) and isinstance(saved.get("state_dict"), Mapping):
        saved = saved["state_dict"]  # a Lightning checkpoint
    if not isinstance(saved, Mapping):
        raise ValueError(f"{where} holds a {type(saved).__name__}, not a state_dict")
    if prefix is not None:
        saved = {k[len(prefix):]: v for k, v in saved.items() if isinstance(k, str) and k.startswith(prefix)}
    own = module.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [str(k) for k in saved if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != own[k].shape
    ]
    not_tensors = [f"{k} ({type(saved[k]).__name__})" for k, v in own.items()  # not extra state (get_extra_state)
                   if k in saved and isinstance(v, torch.Tensor) and not isinstance(saved[k], torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{where} holds values that are no tensors under {_listed(not_tensors)}")
    if missing or unexpected or mismatched:
        parts = [f"shape mismatch {_listed(mismatched)}"] if mismatched else []
        parts += [f"missing keys {_listed(missing)}"] if missing else []
        parts += [f"unexpected keys {_listed(unexpected)}"] if unexpected else []
        hint = _prefix_hint(own, saved) if missing and prefix is None else None
        raise ValueError(
            f"{where} does not fit {type(module).__name__}: " + "; ".join(parts) + (f" ({hint})" if hint else "")
        )
    module.load_state_dict(saved)
    return module
