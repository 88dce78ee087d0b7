"""A checkpoint written by lightning-stages 0.1 resumes with the current code, exactly.

``tests/data/checkpoint_v0_1_epoch{1,2}.ckpt`` were written by 0.1 (before the three-wing layout) with the script in
``tests/data/README.md``: the tiny ``Student``, ``distill_only`` for epochs 0-1 then ``finetune_only``, three epochs.
Resuming the first for the last epoch must give exactly the weights of the second, under the stage 0.1 applied.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import Student, loader, trainer

from lightning_stages import StageScheduleCallback

DATA = Path(__file__).with_name("data")
EPOCH1, EPOCH2 = DATA / "checkpoint_v0_1_epoch1.ckpt", DATA / "checkpoint_v0_1_epoch2.ckpt"
SCHEDULE = [  # as in the script that wrote the checkpoints
    {"name": "distill_only", "start_epoch": 0, "end_epoch": 2, "distillation": True, "lambda_coef": 1.0,
     "loss_weights": {"bce": 0, "focal": 0, "dice": 0, "iou": 0, "cls": 0}},
    {"name": "finetune_only", "start_epoch": 2, "distillation": False, "lambda_coef": 0.0},
]


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_a_0_1_checkpoint_resumes_to_exactly_the_weights_0_1_wrote_next(tmp_path):
    before, expected = _state_dict(EPOCH1), _state_dict(EPOCH2)
    assert sorted(before) == sorted(expected) and any(not torch.equal(before[k], expected[k]) for k in before)

    pl.seed_everything(0)
    model = Student()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_epochs=3, callbacks=[StageScheduleCallback(SCHEDULE, verbose=False)]).fit(
            model, loader(), ckpt_path=EPOCH1
        )

    # the callback read the 0.1 state without complaint: same schedule, nothing unreadable, nothing missing
    assert [str(w.message) for w in caught if "StageScheduleCallback" in str(w.message)] == []
    # only the last epoch trained, under the stage 0.1 applied there
    assert {(epoch, stage, distill) for epoch, stage, distill, *_ in model.seen} == {(2, "finetune_only", False)}
    assert model.stage_name == "finetune_only"
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
