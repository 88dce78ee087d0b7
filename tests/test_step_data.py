"""Per-stage training data in a schedule in optimizer steps: a change of ``data`` ends the running epoch at the
boundary (fixed ``end_step``, or a plateau decided at a validation), the new stage starts a new epoch with its own
loader; gradient accumulation keeps the boundary on an optimizer step; resume (mid-epoch before the boundary, and at
the epoch end the cut produced) is exact; under DDP both ranks cut at the same step."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import EpochShuffle, ResumableLoader, TinyNet, ddp_env, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import StageConfigError, StageScheduleCallback

pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")

BATCH = 4
# each data has its own size and sample ids (offset), so every batch tells which loader it came from
SIZES = {"all": 40, "labelled": 12, None: 20}
OFFSETS = {"all": 0, "labelled": 1000, None: 2000}
MAX_STEPS = 18
FIXED = [
    {"name": "kd", "start_step": 0, "end_step": 7, "distillation": True, "data": "all"},  # cut inside an epoch
    {"name": "ft", "start_step": 7, "end_step": 13, "data": "labelled"},
    {"name": "ft2", "start_step": 13, "end_step": 16, "data": "labelled"},  # a boundary where data stays
]  # then the base settings (data None) from step 16 to 18
EVERY = 2  # the plateau runs: a validation every 2 optimizer steps
# kd watches val/score at the validations of steps 2, 4, 6, 8, ...: 3.0 at step 8 does not beat 3.0 at step 6
SCRIPT = {2: 5.0, 4: 4.0, 6: 3.0, 8: 3.0}
PLATEAU = [dict(FIXED[0], end_step=12, monitor="val/score", patience=1), dict(FIXED[1], start_step=12, end_step=16)]


def dataset(data) -> TensorDataset:
    n = SIZES[data]
    g = torch.Generator().manual_seed(OFFSETS[data])
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g),
                         OFFSETS[data] + torch.arange(n))


class DataNet(TinyNet):
    """Builds its training loader from ``stage_data``; writes down every build, and per training batch its optimizer
    step, epoch, stage, ``stage_data`` and samples, per step its loss and the weights it started from."""

    def __init__(self, script=None) -> None:
        super().__init__(momentum=0.9)
        self.script = dict(SCRIPT if script is None else script)  # val/score at the validation of each step
        self.builds: list[tuple[int, object]] = []
        self.trained: list[tuple[int, int, str, object, list[int]]] = []
        self.losses: dict[int, float] = {}
        self.at_step: dict[int, dict[str, torch.Tensor]] = {}

    def train_dataloader(self):
        self.builds.append((self.trainer.global_step, self.stage_data))
        return ResumableLoader(dataset(self.stage_data), batch_size=BATCH, sampler=EpochShuffle(SIZES[self.stage_data]))

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long)), batch_size=4)

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.script.get(self.trainer.global_step, 1.0))

    def record(self, batch, batch_idx, loss):
        step = self.trainer.global_step
        self.trained.append((step, self.trainer.current_epoch, self.stage_name, self.stage_data, batch[2].tolist()))
        self.losses[step] = self.losses.get(step, 0.0) + float(loss.detach())
        self.at_step.setdefault(step, {k: v.clone() for k, v in self.state_dict().items()})


def fit(tmp_path, model, stages, callbacks=(), ckpt_path=None, validate=False, **kwargs):
    callback = StageScheduleCallback(stages, verbose=False)
    options = {"max_epochs": -1, "max_steps": MAX_STEPS, "deterministic": False, **kwargs}
    if validate:
        options = {"val_check_interval": EVERY, "check_val_every_n_epoch": None, **options}
    else:
        options["limit_val_batches"] = 0
    trainer(tmp_path, callbacks=[callback, *callbacks], **{"enable_checkpointing": False, **options}).fit(
        model, ckpt_path=ckpt_path)
    return callback


def reference(stages, ends=None, accumulate=1, max_steps=MAX_STEPS):
    """An independent walk over the run: the data and stage of every optimizer step from the schedule (``ends``:
    the plateau transitions), and the loaders as they should run. A loader runs its EpochShuffle epoch through; an
    epoch ends at the loader's end or where the data changes (then the loader is built again). An optimizer step takes
    ``accumulate`` batches, or fewer at an epoch's end. Returns the builds and the trained batches."""
    ends = ends or {}
    # a stage ended early: the next one starts right after (its end stays)
    starts = [ends.get(i - 1, stage["start_step"]) for i, stage in enumerate(stages)]

    def stage_at(step):
        for i, stage in enumerate(stages):
            if starts[i] <= step < ends.get(i, stage["end_step"]):
                return stage["name"], stage.get("data")
        return "base", None

    builds, trained = [(0, stage_at(0)[1])], []
    epoch, position, data = 0, 0, stage_at(0)[1]
    for step in range(max_steps):
        name, want = stage_at(step)
        batches = SIZES[data] // BATCH
        if want != data or position == batches:
            epoch, position = epoch + 1, 0
            if want != data:
                builds.append((step, want))
            data, batches = want, SIZES[want] // BATCH
        order = torch.randperm(SIZES[data], generator=torch.Generator().manual_seed(100 + epoch)).tolist()
        for _ in range(min(accumulate, batches - position)):
            ids = [OFFSETS[data] + i for i in order[position * BATCH:(position + 1) * BATCH]]
            trained.append((step, epoch, name, data, ids))
            position += 1
    return builds, trained


# ---------------------------------------------------------------------------------------------- where the loader changes

@pytest.mark.parametrize("accumulate", [1, 2], ids=["one batch a step", "two batches a step"])
def test_the_loader_is_rebuilt_exactly_at_a_fixed_boundary_where_data_changes(tmp_path, accumulate):
    builds, trained = reference(FIXED, accumulate=accumulate)
    # the walk itself: kd's "all" epoch is cut at step 7, ft's short epochs end by themselves (no build at 10 or 13),
    # and the change to the base's data at 16 falls on an epoch's end
    assert builds == [(0, "all"), (7, "labelled"), (16, None)]
    model = DataNet()
    fit(tmp_path, model, FIXED, accumulate_grad_batches=accumulate)
    assert model.builds == builds
    assert model.trained == trained  # every batch, its step, epoch, stage, stage_data and samples
    # all batches of one optimizer step trained under one stage, on one loader
    for step in range(MAX_STEPS):
        assert len({(e, name, data) for s, e, name, data, _ in model.trained if s == step}) == 1, step


@pytest.mark.parametrize(("accumulate", "every", "end"), [(1, 2, 8), (2, 3, 5)],
                         ids=["validation after an optimizer step", "validation inside an accumulation"])
def test_a_plateau_ends_the_epoch_where_the_next_stage_s_data_starts(tmp_path, accumulate, every, end):
    """kd ends on a plateau: with one batch a step, at the validation of step 8 (the epoch ends right there); with 2
    batches a step and a validation every 3 batches, the validation after batch 9 falls inside step 4 and kd ends
    after that step (at 5): the epoch ends with the batch that completes it."""
    model = DataNet(SCRIPT if accumulate == 1 else {1: 3.0, 3: 2.0, 4: 2.0})  # validations after batches 3, 6, 9
    callback = fit(tmp_path, model, PLATEAU, validate=True, accumulate_grad_batches=accumulate,
                   val_check_interval=every)
    assert callback.adaptive.transitions == {0: end}
    builds, trained = reference(PLATEAU, {0: end}, accumulate)
    assert builds == [(0, "all"), (end, "labelled"), (16, None)]
    assert model.builds == builds
    assert model.trained == trained


@pytest.mark.parametrize(("stages", "validate"), [(FIXED, False), (PLATEAU, True)], ids=["end_step", "plateau"])
def test_an_epoch_interval_lr_scheduler_steps_at_the_cut(tmp_path, stages, validate):
    """The cut is an epoch's end: an epoch-interval scheduler steps there, as at the loader's own end."""

    class Scheduled(DataNet):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]

        def record(self, batch, batch_idx, loss):
            super().record(batch, batch_idx, loss)
            self.lr_at = {**getattr(self, "lr_at", {}), self.trainer.global_step: self.optimizers().param_groups[0]["lr"]}

    model = Scheduled()
    fit(tmp_path, model, stages, validate=validate)
    cut = 7 if stages is FIXED else 8
    _, trained = reference(stages, {} if stages is FIXED else {0: cut})
    epoch_of = {step: epoch for step, epoch, *_ in trained}
    assert model.lr_at == {step: 0.5 ** epoch_of[step] for step in range(MAX_STEPS)}
    assert epoch_of[cut - 1] == 0 and epoch_of[cut] == 1  # halved at the cut


def test_the_cut_runs_epoch_end_hooks_but_not_lightning_s_epoch_end_validation(tmp_path):
    """With the Trainer's default validation (once an epoch, ``val_check_interval=1.0``, which Lightning counts in the
    loader's batches), the epochs that end by themselves validate and the cut epoch does not; ``on_train_epoch_end``
    (where ``ModelCheckpoint(save_on_train_epoch_end=True)`` saves) runs at every epoch's end, the cut's too."""

    class Validated(DataNet):
        def validation_step(self, batch, batch_idx):
            self.validated = [*getattr(self, "validated", []), self.trainer.global_step]
            self.log("val/score", 1.0)

        def on_train_epoch_end(self):
            self.epoch_ends = [*getattr(self, "epoch_ends", []), self.trainer.global_step]

    model = Validated()
    callback = StageScheduleCallback(FIXED, verbose=False)
    trainer(tmp_path, callbacks=[callback], max_epochs=-1, max_steps=MAX_STEPS).fit(model)
    _, trained = reference(FIXED)
    ends = [after[0] for before, after in pairwise(trained) if before[1] != after[1]]  # first steps of new epochs
    assert ends == [7, 10, 13, 16]  # the cut at 7; ft's 3-batch loader ends by itself at 10, 13 and 16
    assert model.epoch_ends == [*ends, MAX_STEPS]
    assert model.validated == [10, 13, 16]


def test_the_same_data_throughout_builds_the_loader_once(tmp_path):
    stages = [dict(stage, data="all") for stage in FIXED] + [{"name": "tail", "start_step": 16, "data": "all"}]
    model = DataNet()
    fit(tmp_path, model, stages)
    assert model.builds == [(0, "all")]
    assert {epoch for _, epoch, *_ in model.trained} == {0, 1}  # 18 steps of a 10-batch loader: no cut


class IterNet(DataNet):
    """Its ``training_step`` takes ``dataloader_iter``: Lightning then decides the epoch's last batch itself."""

    def training_step(self, dataloader_iter):
        batch, batch_idx, _ = next(dataloader_iter)
        return super().training_step(batch, batch_idx)


def test_a_data_change_with_dataloader_iter_is_refused_before_the_first_batch(tmp_path):
    model = IterNet()
    with pytest.raises(StageConfigError) as info:
        fit(tmp_path, model, FIXED)
    message = str(info.value)
    assert ("stage 1 ('ft'): `data` = 'labelled': changes the training data at step 7 ('all' -> 'labelled'), but "
            "`training_step` takes `dataloader_iter`") in message
    assert "stage 2 ('ft2'): `data` = 'labelled': changes the training data at step 16 ('labelled' -> None)" in message
    assert model.trained == []
    same = [dict(stage, data="all") for stage in FIXED] + [{"name": "tail", "start_step": 16, "data": "all"}]
    fit(tmp_path, model, same)  # no change of data: nothing to cut
    assert model.builds == [(0, "all"), (0, "all")] and len(model.trained) == MAX_STEPS


# ---------------------------------------------------------------------------------------------- resume

class SaveAt(pl.Callback):
    """A checkpoint at the end of optimizer step ``step`` (mid-epoch) and at the end of epoch ``epoch``."""

    def __init__(self, directory: Path, step: int, epoch: int) -> None:
        self.directory, self.step, self.epoch = directory, step, epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.directory / "mid-epoch.ckpt")

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.directory / "cut.ckpt")


@pytest.mark.parametrize(("stages", "validate"), [(FIXED, False), (PLATEAU, True)], ids=["end_step", "plateau"])
@pytest.mark.parametrize("checkpoint", ["mid-epoch", "cut"], ids=["before the boundary mid-epoch", "at the cut"])
def test_resume_trains_the_same_stages_samples_losses_and_weights(tmp_path, stages, validate, checkpoint):
    whole = DataNet()
    fit(tmp_path / "whole", whole, stages, callbacks=[SaveAt(tmp_path, step=5, epoch=0)], validate=validate)
    resumed = DataNet()
    fit(tmp_path / "resumed", resumed, stages, ckpt_path=tmp_path / f"{checkpoint}.ckpt", validate=validate)
    start = 5 if checkpoint == "mid-epoch" else 7 if stages is FIXED else 8  # the first step after the checkpoint
    assert min(step for step, *_ in resumed.trained) == start
    assert resumed.builds[0] == (start, "all" if checkpoint == "mid-epoch" else "labelled")
    assert resumed.builds[1:] == [build for build in whole.builds if build[0] > start]
    assert resumed.trained == [batch for batch in whole.trained if batch[0] >= start]
    for step in range(start, MAX_STEPS):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], abs=1e-6, rel=0), step
        for key, value in whole.at_step[step].items():
            assert torch.allclose(resumed.at_step[step][key], value, atol=1e-6, rtol=0), (step, key)
    for key, value in whole.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6, rtol=0), key


class EpochStarts(pl.Callback):
    """The optimizer step at which each epoch starts."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.steps.append(trainer.global_step)


LONGER_NEXT = [{"name": "kd", "start_step": 0, "end_step": 3, "distillation": True},  # 3 of the 5 batches of None
               {"name": "ft", "start_step": 3, "end_step": MAX_STEPS, "data": "all"}]  # 10 batches


@pytest.mark.parametrize(("stages", "step"), [(LONGER_NEXT, 3), (FIXED, 16)],
                         ids=["a cut, the next loader longer", "the loader's own end, where the data changes"])
def test_resume_from_the_end_of_the_last_batch_before_a_data_change(tmp_path, stages, step):
    """A checkpoint of ``on_train_batch_end`` (``every_n_train_steps``, ``last.ckpt``) on the epoch's last batch, where
    the next stage's loader is longer than the batches already trained: the resumed run starts that loader at its
    first batch, in a new epoch, as the run that never stopped does (Lightning alone would resume inside it)."""
    whole, whole_starts = DataNet(), EpochStarts()
    fit(tmp_path / "whole", whole, stages, callbacks=[SaveAt(tmp_path, step=step, epoch=-1), whole_starts])
    resumed, resumed_starts = DataNet(), EpochStarts()
    fit(tmp_path / "resumed", resumed, stages, callbacks=[resumed_starts], ckpt_path=tmp_path / "mid-epoch.ckpt")
    _, trained = reference(stages)
    assert whole.trained == trained
    assert resumed.trained == [batch for batch in trained if batch[0] >= step]
    assert resumed.trained[0][1] == whole.trained[step - 1][1] + 1  # a new epoch
    assert resumed_starts.steps == [s for s in whole_starts.steps if s >= step]
    for key, value in whole.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6, rtol=0), key


@pytest.mark.parametrize("first", [None, "labelled"], ids=["20 samples first", "12 samples first"])
def test_the_same_in_a_schedule_in_epochs(tmp_path, first):
    """An epoch schedule whose data changes to a longer loader at epoch 1, resumed from the end of epoch 0's last
    batch: the new epoch runs its whole loader (Lightning alone would end it after as many batches as epoch 0 had)."""
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 1, "data": first},
              {"name": "ft", "start_epoch": 1, "end_epoch": 3, "data": "all"}]
    step = SIZES[first] // BATCH  # epoch 0's batches: the checkpoint is written at the end of its last
    options = {"max_epochs": 3, "max_steps": -1}
    whole, whole_starts = DataNet(), EpochStarts()
    fit(tmp_path / "whole", whole, stages, callbacks=[SaveAt(tmp_path, step=step, epoch=-1), whole_starts], **options)
    resumed, resumed_starts = DataNet(), EpochStarts()
    fit(tmp_path / "resumed", resumed, stages, callbacks=[resumed_starts], ckpt_path=tmp_path / "mid-epoch.ckpt",
        **options)
    assert len(whole.trained) == step + 2 * SIZES["all"] // BATCH
    assert resumed.trained == [batch for batch in whole.trained if batch[0] >= step]
    assert resumed_starts.steps == [s for s in whole_starts.steps if s >= step]
    for key, value in whole.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6, rtol=0), key


def test_resume_from_the_validation_whose_plateau_cut_the_epoch(tmp_path):
    """The checkpoint of the validation at step 8 (kd's plateau: the epoch ends right after it)."""
    whole = DataNet()
    at_validation = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{step}",
                                    save_on_train_epoch_end=False)
    fit(tmp_path / "whole", whole, PLATEAU, callbacks=[at_validation], validate=True, enable_checkpointing=True)
    resumed = DataNet()
    callback = fit(tmp_path / "resumed", resumed, PLATEAU, ckpt_path=tmp_path / "ckpt" / "step=8.ckpt", validate=True)
    assert callback.adaptive.transitions == {0: 8}
    assert resumed.builds == [(8, "labelled"), (16, None)]
    assert resumed.trained == [batch for batch in whole.trained if batch[0] >= 8]
    assert resumed.trained[0][:3] == (8, 1, "ft")
    for key, value in whole.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6, rtol=0), key


# ---------------------------------------------------------------------------------------------- DDP

def test_both_ddp_ranks_cut_at_the_same_step(tmp_path):
    env = ddp_env()
    worker = Path(__file__).parent / "_ddp_step_data_worker.py"
    done = subprocess.run([sys.executable, str(worker), "--out", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for seen in ranks:
        # kd ("all", 8 batches a rank an epoch) is cut after step 5; ft trains "labelled" from step 5 in a new epoch
        assert seen["builds"] == [[0, "all"], [5, "labelled"]]
        assert [(step, epoch, name) for step, epoch, name, _ in seen["trained"]] == [
            (step, 0 if step < 5 else 1 + (step - 5) // 2, "kd" if step < 5 else "ft") for step in range(9)]
        assert all(sample < 1000 if step < 5 else sample >= 1000
                   for step, _, _, samples in seen["trained"] for sample in samples)
    # the ranks trained on disjoint halves of each epoch's data
    for (step, _, _, a), (_, _, _, b) in zip(ranks[0]["trained"], ranks[1]["trained"]):
        assert not set(a) & set(b), step


class _Ids(torch.utils.data.Dataset):
    """Sample ``i`` is ``(x, 0, offset + i)``."""

    def __init__(self, n: int, offset: int) -> None:
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.zeros(4), 0, self.offset + i


class _ManualEveryTwo(pl.LightningModule):
    """Manual optimization with manual accumulation: one optimizer step every 2 batches."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.lin, self.loss_weights, self.seen, self.batches = torch.nn.Linear(4, 3), {"cls": 1.0}, [], 0

    def train_dataloader(self):  # all: ids 0-15 (4 batches); labelled: ids 1000-1007 (2 batches)
        return DataLoader(_Ids(16, 0) if self.stage_data == "all" else _Ids(8, 1000), batch_size=4)

    def training_step(self, batch, batch_idx):
        self.seen.append((self.trainer.global_step, self.trainer.current_epoch, self.stage_name, batch[2].tolist()))
        self.manual_backward(torch.nn.functional.cross_entropy(self.lin(batch[0]), batch[1]) / 2)
        self.batches += 1
        if self.batches % 2 == 0:
            self.optimizers().step()
            self.optimizers().zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_under_manual_optimization_the_batch_whose_step_reaches_a_change_of_data_ends_the_epoch(tmp_path):
    stages = [{"name": "kd", "start_step": 0, "end_step": 3, "data": "all"},
              {"name": "ft", "start_step": 3, "end_step": 5, "data": "labelled"}]
    model = _ManualEveryTwo()
    pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, max_steps=5, max_epochs=-1,
               callbacks=[StageScheduleCallback(stages, verbose=False)]).fit(model)
    ids = [list(range(i, i + 4)) for i in range(0, 16, 4)]
    labelled = [list(range(1000, 1004)), list(range(1004, 1008))]
    assert model.seen == [  # step 2 takes epoch 1's first two batches, then the data changes: no batch twice or lost
        (0, 0, "kd", ids[0]), (0, 0, "kd", ids[1]), (1, 0, "kd", ids[2]), (1, 0, "kd", ids[3]),
        (2, 1, "kd", ids[0]), (2, 1, "kd", ids[1]),
        (3, 2, "ft", labelled[0]), (3, 2, "ft", labelled[1]), (4, 3, "ft", labelled[0]), (4, 3, "ft", labelled[1])]
