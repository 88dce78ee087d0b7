"""Lightning's own callbacks next to ours: SWA and weights-only checkpoints never copy or save the teacher,
EarlyStopping may stop inside any stage, GradientAccumulationScheduler and BaseFinetuning run side by side."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    EarlyStopping,
    GradientAccumulationScheduler,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import StageScheduleCallback

SCHEDULE = [
    {"name": "distill", "start_epoch": 0, "end_epoch": 2, "distillation": True, "loss_weights": {"cls": 0.0}},
    {"name": "joint", "start_epoch": 2, "end_epoch": 4, "distillation": True, "lambda_coef": 0.5},
    {"name": "finetune", "start_epoch": 4, "end_epoch": 6, "distillation": False},
]
BATCHES = 4
TEACHER_WIDTH = 37  # a size no student tensor has


def by_hand(epoch: int) -> tuple[str, bool, float, float]:
    """SCHEDULE read by hand: (stage, distillation, lambda_coef, weight of cls) at ``epoch``."""
    if epoch < 2:
        return "distill", True, 1.0, 0.0
    if epoch < 4:
        return "joint", True, 0.5, 1.0
    return "finetune", False, 1.0, 1.0


class CopyCountingTeacher(nn.Module):
    """Counts every deep copy and pickle of itself."""

    copies = 0

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, TEACHER_WIDTH), nn.Tanh(), nn.Linear(TEACHER_WIDTH, 3))

    def forward(self, x):
        return self.net(x)

    def __reduce_ex__(self, protocol):
        type(self).copies += 1
        return super().__reduce_ex__(protocol)


class Net(TinyNet):
    """The shared tiny net with a copy-counting teacher; records each step's stage and accumulation."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple] = []
        self.body_by_epoch: dict[int, torch.Tensor] = {}
        self.stop_after: int | None = None

    def teacher(self) -> nn.Module:
        return CopyCountingTeacher()

    def record(self, batch, batch_idx, loss):
        self.steps.append(
            (self.current_epoch, self.stage_name, self.use_distillation, self.lambda_coef, self.loss_weights["cls"],
             self.trainer.accumulate_grad_batches)
        )

    def on_train_epoch_end(self):
        self.body_by_epoch[self.current_epoch] = self.body.weight.detach().clone()
        if self.stop_after is not None:
            self.log("signal", 0.0 if self.current_epoch >= self.stop_after else 1.0)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)),
                      batch_size=16 // BATCHES)


def fit(tmp_path, model, callbacks, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=6, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs,
    )
    trainer.fit(model, data())
    return trainer


def stages() -> StageScheduleCallback:
    return StageScheduleCallback(stage_schedule=SCHEDULE, verbose=False)


def assert_stages_by_hand(steps) -> None:
    for epoch, name, distill, lambda_coef, cls_weight, _ in steps:
        assert (name, distill, lambda_coef, cls_weight) == by_hand(epoch), epoch


@pytest.mark.parametrize("ours_first", [True, False])
def test_stochastic_weight_averaging_never_copies_the_teacher(tmp_path, ours_first):
    CopyCountingTeacher.copies = 0
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1)
    model = Net()
    fit(tmp_path, model, [stages(), swa] if ours_first else [swa, stages()])
    assert CopyCountingTeacher.copies == 0
    assert_stages_by_hand(model.steps)
    averaged = swa._average_model
    assert not averaged.teachers_prepared and dict(averaged.teachers) == {}
    assert sum(p.numel() for p in averaged.parameters()) == sum(p.numel() for p in model.parameters())
    assert model.teachers_prepared  # the trained module keeps its teacher


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


@pytest.mark.parametrize("save_weights_only", [True, False])
def test_checkpoints_never_hold_the_teacher(tmp_path, save_weights_only):
    CopyCountingTeacher.copies = 0
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_weights_only=save_weights_only, save_last=True)
    model = Net()
    fit(tmp_path, model, [stages(), checkpoint])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)  # plain data only: no pickled module inside
    assert set(saved["state_dict"]) == set(model.state_dict())
    assert not any(TEACHER_WIDTH in t.shape for t in _tensors(saved))
    assert ("optimizer_states" in saved) is not save_weights_only
    assert CopyCountingTeacher.copies == 0


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4])  # first epoch, at a boundary, inside joint, first of finetune
def test_early_stopping_can_stop_inside_any_stage(tmp_path, stop_after):
    model = Net()
    model.stop_after = stop_after
    early = EarlyStopping(monitor="signal", mode="min", stopping_threshold=0.5, patience=100,
                          check_on_train_epoch_end=True)
    trainer = fit(tmp_path, model, [stages(), early])
    assert trainer.should_stop and early.stopped_epoch == stop_after
    assert sorted({step[0] for step in model.steps}) == list(range(stop_after + 1))
    assert_stages_by_hand(model.steps)
    name, distill, lambda_coef, cls_weight = by_hand(stop_after)
    assert (model.stage_name, model.use_distillation, model.lambda_coef, model.loss_weights) == (
        name, distill, lambda_coef, {"cls": cls_weight}
    )


def test_gradient_accumulation_scheduler_runs_side_by_side(tmp_path):
    accumulation = {0: 1, 2: 2, 4: 4}  # changes at the same epochs as the stages
    model = Net()
    trainer = fit(tmp_path, model, [GradientAccumulationScheduler(scheduling=accumulation), stages()])
    assert_stages_by_hand(model.steps)
    expected_accumulation = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4}
    assert {step[0]: step[5] for step in model.steps} == expected_accumulation
    assert trainer.global_step == sum(BATCHES // a for a in expected_accumulation.values())  # 4+4+2+2+1+1


class FreezeBodyUntil(BaseFinetuning):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.body)

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == self.epoch:
            self.unfreeze_and_add_param_group(modules=pl_module.body, optimizer=optimizer)


def test_base_finetuning_runs_side_by_side(tmp_path):
    model = Net()
    initial_body = model.body.weight.detach().clone()
    fit(tmp_path, model, [FreezeBodyUntil(epoch=2), stages()])
    assert_stages_by_hand(model.steps)
    # frozen while distilling, trained from the joint stage on: the two schedules did not disturb each other
    assert torch.equal(model.body_by_epoch[0], initial_body) and torch.equal(model.body_by_epoch[1], initial_body)
    assert not torch.equal(model.body_by_epoch[2], initial_body)
    teacher = model.teachers["teacher"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
