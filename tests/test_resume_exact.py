"""Resume is exact: a run stopped at any stage boundary, or in the middle of an epoch of any stage, and resumed
from its checkpoint, trains every later step exactly like the run that was never stopped."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
from conftest import Crash, CrashAtStep, EpochShuffle, ResumableLoader, TinyNet
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import StageScheduleCallback

# resuming without the ModelCheckpoint that wrote the checkpoint is deliberate here
pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")

MAX_EPOCHS = 6
N_SAMPLES, BATCH_SIZE = 32, 8
BATCHES = N_SAMPLES // BATCH_SIZE  # 4 steps per epoch
SCHEDULE = [
    {"name": "distill", "start_epoch": 0, "end_epoch": 2, "distillation": True, "lambda_coef": 1.0,
     "loss_weights": {"cls": 0.0, "aux": 0.0}},
    {"name": "joint", "start_epoch": 2, "end_epoch": 4, "distillation": True, "lambda_coef": 0.5},
    {"name": "finetune", "start_epoch": 4, "distillation": False, "lambda_coef": 0.0},
]


@dataclass(frozen=True)
class Step:
    epoch: int
    batch_idx: int
    stage: str
    distillation: bool
    lambda_coef: float
    weights: tuple
    loss: float
    samples: tuple


class Net(TinyNet):
    """The shared tiny net with an extra task loss, momentum, and a record of every step and evaluation batch."""

    temperature = 2.0

    def __init__(self) -> None:
        super().__init__(loss_weights={"cls": 1.0, "aux": 0.5}, momentum=0.9)  # momentum: optimizer state resumes too
        self.steps: list[Step] = []
        self.eval_settings: list[tuple] = []

    def task_losses(self, logits, y):
        return {**super().task_losses(logits, y), "aux": logits.pow(2).mean()}

    def record(self, batch, batch_idx, loss):
        self.steps.append(
            Step(self.current_epoch, batch_idx, self.stage_name, self.use_distillation, self.lambda_coef,
                 tuple(sorted(self.loss_weights.items())), loss.item(), tuple(batch[2].tolist()))
        )

    def _record_eval(self, x):
        self.eval_settings.append(
            (self.stage_name, self.use_distillation, self.lambda_coef, dict(self.loss_weights),
             bool(self.run_teachers(x)))
        )

    def validation_step(self, batch, batch_idx):
        self._record_eval(batch[0])

    def test_step(self, batch, batch_idx):
        self._record_eval(batch[0])

    def predict_step(self, batch, batch_idx):
        self._record_eval(batch[0])
        return self(batch[0])


def _data(resumable: bool) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(N_SAMPLES, 4, generator=g), torch.randint(0, 3, (N_SAMPLES,), generator=g),
                         torch.arange(N_SAMPLES))
    return (ResumableLoader if resumable else DataLoader)(data, batch_size=BATCH_SIZE, sampler=EpochShuffle(N_SAMPLES))



def _trainer(tmp_path, callbacks=(), max_epochs=MAX_EPOCHS, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path, max_epochs=max_epochs, callbacks=list(callbacks), logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )


def _stage_callback(schedule=SCHEDULE) -> StageScheduleCallback:
    return StageScheduleCallback(stage_schedule=schedule, verbose=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[tuple[int, int], Step]:
    """The reference: the same training, never stopped (resumable and plain loaders train alike)."""
    model = Net()
    _trainer(tmp_path_factory.mktemp("uninterrupted"), [_stage_callback()]).fit(model, _data(resumable=True))
    assert len(model.steps) == MAX_EPOCHS * BATCHES
    return {(s.epoch, s.batch_idx): s for s in model.steps}


def _stop_and_resume(tmp_path, stop_step: int, mid_epoch: bool, resumable: bool):
    """Train until a crash right after ``stop_step`` optimizer steps; resume from the checkpoint written there."""
    ckpt_dir = tmp_path / "ckpt"
    if mid_epoch:
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=stop_step, save_top_k=-1)
    else:
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    first = Net()
    with pytest.raises(Crash):
        _trainer(tmp_path, [_stage_callback(), checkpoint, CrashAtStep(stop_step)]).fit(first, _data(resumable))
    epoch = (stop_step - 1) // BATCHES
    ckpt = ckpt_dir / f"epoch={epoch}-step={stop_step}.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in ckpt_dir.iterdir())
    second = Net()
    _trainer(tmp_path, [_stage_callback()]).fit(second, _data(resumable), ckpt_path=ckpt)
    return first.steps, second.steps


def _assert_same_steps(got: list[Step], uninterrupted: dict, check_data: bool = True) -> None:
    for step in got:
        ref = uninterrupted[(step.epoch, step.batch_idx)]
        assert (step.stage, step.distillation, step.lambda_coef, step.weights) == (
            ref.stage, ref.distillation, ref.lambda_coef, ref.weights
        ), (step.epoch, step.batch_idx)
        if check_data:
            assert step.samples == ref.samples, (step.epoch, step.batch_idx)
            assert step.loss == pytest.approx(ref.loss, abs=1e-6, rel=0), (step.epoch, step.batch_idx)


@pytest.mark.parametrize(
    ("stop_step", "mid_epoch", "where"),
    [
        (2 * BATCHES, False, "boundary distill -> joint"),
        (4 * BATCHES, False, "boundary joint -> finetune"),
        (1 * BATCHES + 2, True, "mid-epoch in distill"),
        (2 * BATCHES + 1, True, "mid-epoch in the first epoch of joint"),
        (4 * BATCHES + 3, True, "mid-epoch in finetune"),
    ],
)
def test_stopped_and_resumed_run_equals_the_uninterrupted_run(tmp_path, uninterrupted, stop_step, mid_epoch, where):
    before, after = _stop_and_resume(tmp_path, stop_step, mid_epoch, resumable=mid_epoch)
    # the resumed run trains exactly the steps that were left, in order
    done = [(s.epoch, s.batch_idx) for s in before]
    left = [(s.epoch, s.batch_idx) for s in after]
    assert done + left == sorted(uninterrupted), where
    assert len(done) == stop_step
    _assert_same_steps(before, uninterrupted)
    _assert_same_steps(after, uninterrupted)


def test_plain_dataloader_restarts_its_data_on_mid_epoch_resume(tmp_path, uninterrupted):
    """Lightning's behaviour, stated in the README: stages stay exact, the batches of that epoch start over."""
    stop_step = 2 * BATCHES + 1  # after batch 0 of epoch 2
    with pytest.warns(UserWarning, match="not resumable"):
        _, after = _stop_and_resume(tmp_path, stop_step, mid_epoch=True, resumable=False)
    _assert_same_steps(after, uninterrupted, check_data=False)
    resumed_epoch = [s for s in after if s.epoch == 2]
    assert [s.batch_idx for s in resumed_epoch] == [1, 2, 3]
    # the epoch's data begins again from its first batch instead of going on from the second
    assert [s.samples for s in resumed_epoch] == [uninterrupted[(2, i)].samples for i in range(3)]
    # later epochs are whole and exact in their data again
    assert [s.samples for s in after if s.epoch == 3] == [uninterrupted[(3, i)].samples for i in range(BATCHES)]


def test_resuming_under_a_changed_schedule_warns_and_names_the_change(tmp_path, uninterrupted):
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    with pytest.raises(Crash):
        _trainer(tmp_path, [_stage_callback(), checkpoint, CrashAtStep(2 * BATCHES)]).fit(Net(), _data(False))
    changed = [dict(stage) for stage in SCHEDULE]
    changed[1]["lambda_coef"] = 0.25
    model = Net()
    with pytest.warns(UserWarning, match=r"stage 1 \('joint'\): lambda_coef 0\.5 -> 0\.25"):
        _trainer(tmp_path, [_stage_callback(changed)]).fit(model, _data(False),
                                                           ckpt_path=ckpt_dir / "epoch=1-step=8.ckpt")
    assert {s.lambda_coef for s in model.steps if s.stage == "joint"} == {0.25}  # the schedule given now applies
    assert model.steps[0].epoch == 2


def test_checkpoint_written_without_the_callback_resumes_with_a_warning(tmp_path, uninterrupted):
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    plain = Net()
    _trainer(tmp_path, [checkpoint], max_epochs=2).fit(plain, _data(False))
    assert {s.stage for s in plain.steps} == {None} and plain.teacher_builds == 0
    model = Net()
    with pytest.warns(UserWarning, match="written without this callback"):
        _trainer(tmp_path, [_stage_callback()]).fit(model, _data(False), ckpt_path=ckpt_dir / "epoch=1-step=8.ckpt")
    assert [s.epoch for s in model.steps] == [e for e in range(2, MAX_EPOCHS) for _ in range(BATCHES)]
    _assert_same_steps(model.steps, uninterrupted, check_data=False)


def test_training_twice_with_the_same_trainer(tmp_path, uninterrupted):
    model = Net()
    trainer = _trainer(tmp_path, [_stage_callback()], max_epochs=5)
    trainer.fit(model, _data(False))
    assert len(model.steps) == 5 * BATCHES
    _assert_same_steps(model.steps, uninterrupted)
    # fit again with the same Trainer, for more epochs: it goes on with the stage of each new epoch
    trainer.fit_loop.max_epochs = MAX_EPOCHS
    trainer.fit(model, _data(False))
    assert [s.epoch for s in model.steps] == [e for e in range(MAX_EPOCHS) for _ in range(BATCHES)]
    _assert_same_steps(model.steps, uninterrupted, check_data=False)
    # the weights carry over; (Lightning builds fresh optimizers per fit, so later steps lose the momentum)
    _assert_same_steps(model.steps[: 5 * BATCHES + 1], uninterrupted)
    assert model.teacher_builds == 1  # the teacher is built once per module, not once per fit
    # a third fit has nothing left to do and changes nothing
    trainer.fit(model, _data(False))
    assert len(model.steps) == MAX_EPOCHS * BATCHES and trainer.current_epoch == MAX_EPOCHS


@pytest.mark.parametrize("run", ["validate", "test", "predict"])
@pytest.mark.parametrize("base_distillation", [False, True])
def test_evaluation_before_any_fit_runs_on_the_base_settings(tmp_path, run, base_distillation):
    model = Net()
    callback = StageScheduleCallback(stage_schedule=SCHEDULE, distillation=base_distillation, lambda_coef=0.7,
                                     verbose=False)
    getattr(_trainer(tmp_path, [callback]), run)(model, DataLoader(_data(False).dataset, batch_size=16))
    assert len(model.eval_settings) == 2
    expected = ("base", base_distillation, 0.7, {"cls": 1.0, "aux": 0.5}, base_distillation)
    assert set(map(repr, model.eval_settings)) == {repr(expected)}
    # no stage distills here: the teacher is built only when the base flag asks for it
    assert model.teacher_builds == int(base_distillation)
    assert model.teachers_prepared is base_distillation
