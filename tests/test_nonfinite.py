"""Non-finite losses never reach a checkpoint.

The callback watches the loss of every training step on the device (no host sync) and looks at what it saw before a
checkpoint is written and at each epoch end: a NaN or infinite loss stops the run with a ``DistillationStepError``
naming the stage and the batches, and the checkpoints written before it are kept as they were.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ManualTinyNet, PlainStudent, TinyNet, loader, trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import DistillationStepError, StageScheduleCallback
from lightning_stages.distillation.step_checks import NonFiniteWatch


def tiny_loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=batch_size)


class NaNAt(TinyNet):
    """A TinyNet whose loss turns NaN at one (epoch, batch) and stays NaN after (as NaN weights would make it)."""

    def __init__(self, epoch: int, batch: int) -> None:
        super().__init__()
        self.bad_from = (epoch, batch)
        self.steps: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.steps.append((self.trainer.current_epoch, batch_idx))
        if (self.trainer.current_epoch, batch_idx) >= self.bad_from:
            loss = loss * float("nan")
        return loss


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_a_nan_at_step_k_of_a_stage_stops_before_any_checkpoint_after_it(tmp_path):
    stages = [{"name": "warm", "start_epoch": 0, "end_epoch": 1}, {"name": "main", "start_epoch": 1}]
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1,
                                  filename="{epoch}")
    model = NaNAt(epoch=2, batch=2)
    run = trainer(tmp_path, max_epochs=4, callbacks=[StageScheduleCallback(stages), checkpoints],
                  enable_checkpointing=True)
    with pytest.raises(DistillationStepError) as caught:
        run.fit(model, tiny_loader())
    message = str(caught.value)
    assert "stage 1 ('main')" in message and "at batch 2 of epoch 2" in message, message
    assert "batches 0..3" in message and "the last checkpoint written before is kept" in message
    # the epochs before are written; nothing of epoch 2 or later
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 8
    assert _all_finite(last["state_dict"])
    reference = _weights(tmp_path / "ckpt" / "epoch=1.ckpt")
    assert all(torch.equal(last["state_dict"][k], reference[k]) for k in reference)
    # the NaN step did run (the weights it made are what is kept out of the checkpoints)
    assert (2, 2) in model.steps and not _all_finite(model.state_dict())


def test_a_nan_between_step_checkpoints_is_never_written(tmp_path):
    """``every_n_train_steps=1``: the checkpoint of the NaN step is refused while it is being assembled."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    run = trainer(tmp_path, max_epochs=2, callbacks=[StageScheduleCallback(), checkpoints],
                  enable_checkpointing=True)
    with pytest.raises(DistillationStepError, match=r"at batch 1 of epoch 0 \(found before writing a checkpoint; "
                                                    r"batches 1\.\.1 were watched, global steps 2\.\.2\)"):
        run.fit(NaNAt(epoch=0, batch=1), tiny_loader())
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1 and _all_finite(last["state_dict"])


def test_an_infinite_loss_of_a_module_without_the_mixin_stops_at_the_epoch_end(tmp_path):
    class InfAt(PlainStudent):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss + (math.inf if (self.trainer.current_epoch, batch_idx) == (1, 0) else 0.0)

    run = trainer(tmp_path, max_epochs=3, callbacks=[StageScheduleCallback()])
    with pytest.raises(DistillationStepError, match=r"(?s)stage 'base'.*at batch 0 of epoch 1 \(found at the end of the "
                                                    r"epoch; batches 0\.\.1 were watched"):
        run.fit(InfAt(), loader(n=8, batch_size=4))
    assert run.current_epoch == 1


def test_no_checkpoint_on_exception_either(tmp_path):
    """``OnExceptionCheckpoint`` saves when the run stops: that checkpoint would hold the NaN weights, so it is not
    written (with a warning), the original error is what the caller sees, and Lightning's clean-up still runs."""
    from lightning.pytorch.callbacks import OnExceptionCheckpoint
    from lightning.pytorch.loggers.logger import DummyLogger

    finalized: list[str] = []

    class Logger(DummyLogger):
        def finalize(self, status: str) -> None:
            finalized.append(status)

    run = trainer(tmp_path, max_epochs=3, callbacks=[StageScheduleCallback(), OnExceptionCheckpoint(tmp_path / "exc")],
                  enable_checkpointing=True, logger=Logger())
    with pytest.warns(UserWarning, match=r"the checkpoint '.*exc.*' is not written while the run stops: its weights "
                                         r"were trained on a non-finite loss"), \
            pytest.raises(DistillationStepError, match=r"at batch 1 of epoch 1 \(found at the end of the epoch"):
        run.fit(NaNAt(epoch=1, batch=1), tiny_loader())
    assert not (tmp_path / "exc").exists() or list((tmp_path / "exc").iterdir()) == []
    assert finalized == ["failed"]  # Lightning's clean-up after the error ran (it was skipped)


def test_finite_losses_train_to_the_end_and_the_checkpoints_are_written(tmp_path):
    """Non-finite values the module holds on purpose are not weights trained on a NaN: a float attention mask buffer
    of ``-inf`` and a frozen parameter of ``inf`` (the weights read before a checkpoint are the trainable ones)."""

    class Masked(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mask", torch.full((3, 3), -math.inf).triu(1))
            self.bound = torch.nn.Parameter(torch.tensor(math.inf), requires_grad=False)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, filename="{epoch}")
    run = trainer(tmp_path, max_epochs=2, callbacks=[StageScheduleCallback(), checkpoints], enable_checkpointing=True)
    run.fit(Masked(), tiny_loader(), tiny_loader(n=8))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"]


def test_two_consecutive_stages_of_one_name_both_check_their_first_step(tmp_path):
    """The first-step check is keyed by the stage, not its name: the second 'kd' stage's NaN teacher is caught at its
    first step, with the first-step message (not only at the epoch end)."""

    class NaNTeacherFromEpoch1(TinyNet):
        def distill_losses(self, logits, x):
            losses = super().distill_losses(logits, x)
            if self.trainer.current_epoch >= 1:
                losses = {k: v * float("nan") for k, v in losses.items()}
            return losses

        def record(self, batch, batch_idx, loss):
            self.steps = [*getattr(self, "steps", []), (self.trainer.current_epoch, batch_idx)]

    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 1, "distillation": True},
              {"name": "kd", "start_epoch": 1, "end_epoch": 2, "distillation": True}]
    model = NaNTeacherFromEpoch1()
    with pytest.raises(DistillationStepError, match=r"(?s)at the first step of stage 'kd'.*is not finite at epoch 1"):
        trainer(tmp_path, max_epochs=2, callbacks=[StageScheduleCallback(stages)]).fit(model, tiny_loader())
    assert model.steps[-1] == (0, 3)  # epoch 1 stopped in its first step, before record()


def test_manual_optimization_returning_a_reused_buffer_still_stops_on_its_nan(tmp_path):
    """A manual training_step returns one buffer it writes at every step: the NaN of batch 1 is overwritten by the
    finite loss of batch 2 before the epoch ends, and the watch still stops the run, naming batch 1."""

    class ManualBuffer(ManualTinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.buffer = torch.zeros(())

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)  # stepped
            self.buffer.copy_(loss.detach() * (float("nan") if batch_idx == 1 else 1.0))
            return self.buffer

    run = trainer(tmp_path, max_epochs=1, callbacks=[StageScheduleCallback([{"name": "s", "start_epoch": 0}])])
    with pytest.raises(DistillationStepError, match="at batch 1 of epoch 0"):
        run.fit(ManualBuffer(), tiny_loader())


def test_the_watch_reads_the_first_non_finite_batch_and_forgets_it_after_a_check():
    watch = NonFiniteWatch()
    assert watch.check() is None  # nothing watched: nothing to read
    losses = [0.1, math.inf, 0.3, math.nan, 0.5]
    for batch, value in enumerate(losses):
        watch.update(torch.tensor(value), batch, step=batch + 1)
    found = watch.check()
    first_bad = next(i for i, v in enumerate(losses) if not math.isfinite(v))
    assert (found.first_bad, found.first, found.last, found.first_step, found.last_step) == (first_bad, 0, 4, 1, 5)
    watch.update(torch.tensor(1.0), 5, step=6)
    assert watch.check() == found  # found stays found: the weights trained on it are still in the module
    fresh = NonFiniteWatch()
    fresh.update(None, 5, step=6)  # a step without a loss (e.g. skipped) is not a problem
    fresh.update(torch.tensor([1.0, 2.0]), 6, step=7)
    assert fresh.check() is None


@pytest.mark.parametrize("fold_every", [1, 2, 3, 256])
def test_the_watch_finds_the_first_bad_batch_across_folds_dtypes_and_shapes(fold_every):
    """Losses are folded into the record every ``fold_every`` steps: the first non-finite batch is the same whatever
    the fold, in float16, bfloat16 and float64, for a non-scalar loss, and a huge finite float64 loss is not taken
    for an infinite one."""
    losses = [torch.tensor(1.0), torch.tensor(1e300, dtype=torch.float64), torch.tensor(2.0, dtype=torch.bfloat16),
              torch.tensor([1.0, -math.inf]), torch.tensor(math.inf, dtype=torch.float16), torch.tensor(math.nan)]
    expected = [i for i, loss in enumerate(losses) if not bool(torch.isfinite(loss).all())]
    assert expected == [3, 4, 5]  # the reference, by hand: batch 3 is the first non-finite one
    batches = [7, 8, 9, 2, 5, 0]  # batch indices are not in order (the record keeps the least non-finite one)
    watch = NonFiniteWatch(fold_every=fold_every)
    for step, (batch, loss) in enumerate(zip(batches, losses)):
        watch.update(loss, batch, step=step)
    assert watch.check().first_bad == min(batches[i] for i in expected)
    finite = NonFiniteWatch(fold_every=fold_every)
    for step, loss in enumerate(losses[:3]):
        finite.update(loss, step, step=step)
    assert finite.check() is None
    same = [torch.tensor(v) for v in (1.0, 2.0, math.nan, 3.0, math.inf)]  # scalars of one dtype: stacked at once
    watch = NonFiniteWatch(fold_every=fold_every)
    for step, loss in enumerate(same):
        watch.update(loss, 10 - step, step=step)
    assert watch.check().first_bad == min(10 - 2, 10 - 4)


def test_ddp_a_nan_on_one_rank_stops_every_rank_before_the_checkpoint(tmp_path):
    """Under DDP (2 CPU processes) the loss turns NaN on rank 1 only: both ranks stop with the same error at the end
    of that epoch, and the checkpoints written before are kept as they were."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ddp_env

    env = ddp_env()
    worker = Path(__file__).with_name("_ddp_nonfinite_worker.py")
    proc = subprocess.run([sys.executable, str(worker), "--out", str(tmp_path)], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-3000:]
    errors = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    for error in errors:  # rank 0's own losses were finite at batch 1: it stops on what rank 1 saw
        assert error.startswith("DistillationStepError: 1 problem at epoch 1 of stage 'main'"), errors
        assert "at batch 1 of epoch 1 (found at the end of the epoch" in error
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and _all_finite(last["state_dict"])


def test_a_weights_only_checkpoint_after_a_nan_is_never_written(tmp_path):
    """Lightning runs no callback's ``on_save_checkpoint`` for a weights-only save: ``save_weights_only=True`` and
    ``trainer.save_checkpoint(path, weights_only=True)`` are refused all the same, and ``last.ckpt`` stays good."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, every_n_train_steps=1,
                                  save_weights_only=True, filename="{step}")
    run = trainer(tmp_path, max_epochs=2, callbacks=[StageScheduleCallback(), checkpoints], enable_checkpointing=True)
    with pytest.raises(DistillationStepError, match=r"at batch 1 of epoch 0 \(found before writing a checkpoint"):
        run.fit(NaNAt(epoch=0, batch=1), tiny_loader())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt", "step=1.ckpt"]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1 and _all_finite(last["state_dict"])
    with pytest.raises(DistillationStepError, match="at batch 1 of epoch 0"):
        run.save_checkpoint(tmp_path / "by_hand.ckpt", weights_only=True)
    assert not (tmp_path / "by_hand.ckpt").exists()


def test_a_nan_in_a_step_stage_is_named_with_that_stage_not_the_next(tmp_path):
    """Stage 'a' covers optimizer steps 0..1 and 'b' the rest of the epoch: a NaN at batch 0 is found where 'a' ends
    (not at the epoch end, in 'b'), and the message names 'a' and its two batches."""

    class NaNAtFirstBatch(TinyNet):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 0 else loss

    stages = [{"name": "a", "start_step": 0, "end_step": 2}, {"name": "b", "start_step": 2}]
    run = trainer(tmp_path, max_epochs=-1, max_steps=8, callbacks=[StageScheduleCallback(stages)])
    with pytest.raises(DistillationStepError) as caught:
        run.fit(NaNAtFirstBatch(), tiny_loader())
    assert str(caught.value).startswith("1 problem at epoch 0 of stage 'a'"), str(caught.value)
    assert ("stage 0 ('a'): the training loss was not finite (NaN or infinite) at batch 0 of epoch 0 (found at the "
            "end of the stage; batches 0..1 were watched, global steps 1..2)") in str(caught.value)
    assert run.global_step == 2  # stopped before the first step of 'b'


def test_a_rank_that_watched_no_loss_still_joins_the_gather():
    """Under DDP every rank must call the gather alike: a rank whose batches returned no loss (``None``) takes part,
    and learns the other rank's non-finite batch."""
    gathered: list[torch.Tensor] = []

    def gather(record: torch.Tensor) -> torch.Tensor:  # what the other rank holds: batch 3 was not finite
        gathered.append(record)
        return torch.stack([record, torch.tensor(3)])

    watch = NonFiniteWatch()
    watch.update(None, 2, step=5)
    watch.update(None, 3, step=6)
    found = watch.check(gather)
    assert len(gathered) == 1 and gathered[0].item() == torch.iinfo(torch.int64).max
    assert (found.first_bad, found.first, found.last, found.first_step, found.last_step) == (3, 2, 3, 5, 6)


def test_ddp_a_rank_with_a_skipped_batch_does_not_hang_the_other_at_a_checkpoint(tmp_path):
    """Manual optimization under DDP, a checkpoint at every step: at batch 1 of epoch 1 rank 0's loss is NaN and rank
    1's training_step returns None. Both ranks stop with the same error (no hang), and no checkpoint of that step."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ddp_env

    worker = Path(__file__).with_name("_ddp_nonfinite_worker.py")
    proc = subprocess.run([sys.executable, str(worker), "--out", str(tmp_path), "--skipped"], cwd=tmp_path,
                          env=ddp_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout[-3000:]
    for rank in (0, 1):
        error = (tmp_path / f"rank{rank}.txt").read_text()
        assert error.startswith("DistillationStepError: 1 problem at epoch 1 of stage 'main'"), error
        assert "at batch 1 of epoch 1 (found before writing a checkpoint; batches 1..1" in error, error
    # 4 batches per rank and epoch: steps 1..5 were written, step 6 (batch 1 of epoch 1) was not
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"step={s}.ckpt" for s in range(1, 6)]


class NaNGradientAt(TinyNet):
    """A finite loss whose gradient is NaN at one (epoch, batch): ``sqrt(sum((0 * w) ** 2))`` is 0, and its derivative
    ``0 / sqrt(0)`` is NaN, so the optimizer step writes NaN into ``head.weight``; every loss watched up to there is
    finite (the next one is not)."""

    def __init__(self, epoch: int, batch: int) -> None:
        super().__init__()
        self.bad_at = (epoch, batch)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if (self.trainer.current_epoch, batch_idx) == self.bad_at:
            loss = loss + (self.head.weight * 0).pow(2).sum().sqrt()
            assert bool(torch.isfinite(loss))
        return loss


@pytest.mark.parametrize("weights_only", [False, True])
def test_a_finite_loss_with_a_nan_gradient_never_writes_its_weights(tmp_path, weights_only):
    """The NaN gradient comes at the epoch's last batch (3): the epoch-end checkpoint (full), or the checkpoint of that
    step (weights only), would hold NaN weights over a good ``last.ckpt``; the run stops naming the parameter, and
    ``OnExceptionCheckpoint`` does not write them either."""
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, filename="{step}",
                                  save_weights_only=weights_only, every_n_train_steps=1 if weights_only else None)
    stages = [{"name": "warm", "start_epoch": 0, "end_epoch": 1}, {"name": "main", "start_epoch": 1}]
    run = trainer(tmp_path, max_epochs=3, enable_checkpointing=True,
                  callbacks=[StageScheduleCallback(stages), checkpoints, OnExceptionCheckpoint(tmp_path / "exc")])
    with pytest.warns(UserWarning, match="is not written while the run stops: its weights are not finite"), \
            pytest.raises(DistillationStepError) as caught:
        run.fit(NaNGradientAt(epoch=1, batch=3), tiny_loader())
    message = str(caught.value)
    assert message.startswith("1 problem at epoch 1 of stage 'main'"), message
    assert ("stage 1 ('main'): the weights are not finite (`head.weight` holds NaN or infinite values) at global "
            "step 8 of epoch 1") in message, message
    assert not (tmp_path / "exc").exists() or list((tmp_path / "exc").iterdir()) == []
    written = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert written == (["last.ckpt"] + [f"step={s}.ckpt" for s in range(1, 8)] if weights_only
                       else ["last.ckpt", "step=4.ckpt"])
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == (7 if weights_only else 4) and _all_finite(last["state_dict"])
    assert not bool(torch.isfinite(run.lightning_module.head.weight).all())  # what the checkpoint would have held


def test_a_nan_before_a_validation_never_replaces_the_stages_best_weights_file(tmp_path):
    """``restore_best`` with ``best_weights="file"``: the loss is NaN at batch 1 of epoch 1, and a validation at that
    epoch's end would score the NaN weights best (NaN logits all "predict" class 0, the label of every validation
    sample). The run stops before that validation: the best-weights file still holds epoch 0's weights, which
    ``last.ckpt`` names (overwritten, a run resumed from ``last.ckpt`` would have lost them)."""

    class AccuracyOnNaN(NaNAt):
        def validation_step(self, batch, batch_idx):
            accuracy = (self(batch[0]).argmax(-1) == batch[1]).float().mean()
            self.scores = [*getattr(self, "scores", []), float(accuracy)]
            self.log("val_acc", accuracy)

    g = torch.Generator().manual_seed(1)
    val = DataLoader(TensorDataset(torch.randn(8, 4, generator=g), torch.zeros(8, dtype=torch.long)), batch_size=8)
    stages = [{"name": "a", "start_epoch": 0, "end_epoch": 3, "monitor": "val_acc", "mode": "max",
               "restore_best": True}]
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    run = trainer(tmp_path, max_epochs=3, enable_checkpointing=True,
                  callbacks=[StageScheduleCallback(stages, best_weights="file"), checkpoints])
    model = AccuracyOnNaN(epoch=1, batch=1)
    with pytest.raises(DistillationStepError, match=r"at batch 1 of epoch 1 \(found ") as caught:
        run.fit(model, tiny_loader(), val)
    assert len(model.scores) == 1 and model.scores[0] < 1.0  # the NaN weights, which would score 1.0, never scored
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert last["callbacks"]["StageScheduleCallback"]["adaptive"]["best_weights"]["step"] == 4
    best = torch.load(next(tmp_path.rglob("stage_0.pt")), weights_only=True)
    assert best["step"] == 4 and _all_finite(best["weights"])
    assert all(torch.equal(best["weights"][k], v) for k, v in last["state_dict"].items())
    assert "(found before a validation; batches 0..3 were watched" in str(caught.value)


def test_save_on_exception_never_points_last_ckpt_at_a_checkpoint_that_was_not_written(tmp_path):
    """``ModelCheckpoint(save_last="link", save_on_exception=True)``: the save made while the run stops on the NaN is
    refused, and Lightning would then link ``last.ckpt`` to that missing file (a resume from "last" started from
    scratch). ``last.ckpt`` keeps pointing at the last good checkpoint, and a resume from it starts there."""

    class Steps(TinyNet):
        def record(self, batch, batch_idx, loss):
            self.steps = [*getattr(self, "steps", []), self.trainer.global_step]

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last="link", save_top_k=-1, filename="{step}",
                                  save_on_exception=True)
    callback = StageScheduleCallback()
    run = trainer(tmp_path, max_epochs=3, callbacks=[callback, checkpoints], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DistillationStepError, match="batch 1 of epoch 1"):
        warnings.simplefilter("always")
        run.fit(NaNAt(epoch=1, batch=1), tiny_loader())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt", "step=4.ckpt"]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists(), f"last.ckpt points at the missing {last.readlink()}"
    assert any(str(w.message).startswith("StageScheduleCallback: ModelCheckpoint(save_on_exception=True) does not save "
                                         "while the run stops: its weights would not be finite (the training loss was "
                                         "not finite") for w in caught), [str(w.message) for w in caught]
    assert torch.load(last, weights_only=True)["global_step"] == 4
    resumed = Steps()
    trainer(tmp_path, max_epochs=3, callbacks=[callback, checkpoints], enable_checkpointing=True).fit(
        resumed, tiny_loader(), ckpt_path="last")
    assert resumed.steps[0] == 4 and checkpoints.save_on_exception  # set back for the next fit


def test_modelcheckpoint_never_names_as_its_best_a_checkpoint_that_was_not_written(tmp_path):
    """``ModelCheckpoint(monitor="val_acc", save_top_k=1, save_on_train_epoch_end=False)``, validation every 2 batches:
    the loss is NaN at batch 1 of epoch 1 and the validation after it scores the NaN weights best. Left to go on,
    ModelCheckpoint would take that validation's checkpoint for its new best, be refused it, and name a missing file as
    ``best_model_path`` (``test(ckpt_path="best")`` then raised FileNotFoundError). The run stops at that validation's
    end: the best stays the checkpoint written before the NaN."""

    class Accuracy(NaNAt):
        def validation_step(self, batch, batch_idx):
            self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

        test_step = validation_step

    g = torch.Generator().manual_seed(1)
    val = DataLoader(TensorDataset(torch.randn(8, 4, generator=g), torch.zeros(8, dtype=torch.long)), batch_size=8)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max", save_top_k=1,
                                  save_on_train_epoch_end=False, filename="{step}")
    run = trainer(tmp_path, max_epochs=3, enable_checkpointing=True, val_check_interval=2,
                  callbacks=[StageScheduleCallback(), checkpoints])
    with pytest.raises(DistillationStepError, match=r"at batch 1 of epoch 1 \(found ") as caught:
        run.fit(Accuracy(epoch=1, batch=1), tiny_loader(), val)
    written = list((tmp_path / "ckpt").iterdir())
    assert len(written) == 1 and checkpoints.best_model_path == str(written[0])  # the one written, before the NaN
    best = torch.load(written[0], weights_only=True)
    assert best["global_step"] <= 5 and _all_finite(best["state_dict"])
    run.test(Accuracy(epoch=9, batch=0), val, ckpt_path="best", verbose=False)  # loads it
    assert "(found before a validation" in str(caught.value)


def test_a_checkpoint_every_n_steps_refused_is_never_named_best(tmp_path):
    """``every_n_train_steps=3`` and a validation every 2 batches: the validation at step 4 improves ``val_loss`` and
    its checkpoint is due at step 6, but batch 5 (the step-6 batch) is NaN. ModelCheckpoint would take step 6 for its
    new best and be refused it (``best_model_path`` named the missing ``step=6.ckpt``); the watch is read before it
    decides, so the best stays ``step=3.ckpt``, the last one written."""

    class ValLoss(NaNAt):
        def validation_step(self, batch, batch_idx):
            value = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
            self.scores = [*getattr(self, "scores", []), float(value)]
            self.log("val_loss", value)

    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)),
                       batch_size=4)
    val = DataLoader(TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)), batch_size=8)

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1, every_n_train_steps=3,
                                  save_last=True, filename="{step}")
    run = trainer(tmp_path, max_epochs=2, enable_checkpointing=True, val_check_interval=2,
                  callbacks=[StageScheduleCallback(), checkpoints])
    with pytest.raises(DistillationStepError, match=r"at batch 5 of epoch 0 \(found before writing a checkpoint"):
        run.fit(model := ValLoss(epoch=0, batch=5), train, val)
    assert model.scores[1] < model.scores[0]  # step 4's validation improved: step 6 would have been the new best
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt", "step=3.ckpt"]
    assert checkpoints.best_model_path == str(tmp_path / "ckpt" / "step=3.ckpt")


def test_ddp_a_nan_gradient_on_one_rank_stops_every_rank_before_its_weights_are_kept(tmp_path):
    """Under DDP (2 CPU processes) every loss is finite but rank 1's gradient is NaN at the last batch of epoch 1; the
    all-reduce makes both ranks' weights NaN, and the validation after it scores them best for a ``restore_best``
    stage. Both ranks stop with the same error at that validation's end (no hang): no checkpoint of epoch 1, and the
    best-weights file still holds epoch 0's weights."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ddp_env

    worker = Path(__file__).with_name("_ddp_nonfinite_worker.py")
    proc = subprocess.run([sys.executable, str(worker), "--out", str(tmp_path), "--nan-gradient"], cwd=tmp_path,
                          env=ddp_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-3000:]
    errors = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert errors[0] == errors[1], errors
    assert errors[0].startswith("DistillationStepError: 1 problem at epoch 1 of stage 'main'"), errors[0]
    assert ("the weights are not finite (`head.weight` holds NaN or infinite values) at global step 8 of epoch 1, "
            "although no loss `training_step` returned was (found before a validation)") in errors[0]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0.ckpt", "last.ckpt"]
    assert not (tmp_path / "exc").exists() or list((tmp_path / "exc").iterdir()) == []
    best = torch.load(tmp_path / "best_weights" / "stage_0.pt", weights_only=True)
    assert best["step"] == 4 and _all_finite(best["weights"])


def test_a_nan_gradient_at_an_epochs_last_batch_never_becomes_modelcheckpoints_best(tmp_path):
    """``ModelCheckpoint(monitor="step", mode="max", save_top_k=1)`` saves at every epoch end, each a new best. The NaN
    gradient of epoch 1's last batch leaves NaN weights: the epoch-end look reads them before ModelCheckpoint takes that
    checkpoint for its best (and is refused it), so ``best_model_path`` stays the one written, epoch 0's."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="step", mode="max", save_top_k=1, filename="{step}")
    run = trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[StageScheduleCallback(), checkpoints])
    with pytest.raises(DistillationStepError, match=r"the weights are not finite \(`head.weight` .*\) at global step 8"):
        run.fit(NaNGradientAt(epoch=1, batch=3), tiny_loader())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=4.ckpt"]
    assert checkpoints.best_model_path == str(tmp_path / "ckpt" / "step=4.ckpt")


def test_manual_optimization_that_returns_no_loss_still_never_checkpoints_nan_weights(tmp_path):
    """A manual ``training_step`` that steps on a NaN loss (batch 1 of epoch 1) and returns nothing: the watch sees no
    loss, but the weights it made are read at the epoch's end, before the epoch's checkpoint."""

    class NoReturn(ManualTinyNet):
        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            loss = TinyNet.training_step(self, batch, batch_idx)
            if (self.trainer.current_epoch, batch_idx) == (1, 1):
                loss = loss * float("nan")
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, filename="{step}")
    run = trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[StageScheduleCallback(), checkpoints])
    with pytest.raises(DistillationStepError, match=r"the weights are not finite \(`body.weight` .*\) at global step 8 "
                                                    r"of epoch 1, although no loss `training_step` returned was"):
        run.fit(NoReturn(), tiny_loader())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt", "step=4.ckpt"]
    assert _all_finite(torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"])


def test_a_nan_distillation_loss_at_a_stages_first_step_on_one_ddp_rank_stops_every_rank(tmp_path):
    """The first-step check of the distillation losses ran on one rank alone: with ``save_on_exception`` both ranks
    hung, without it the other rank died on a closed connection."""
    import subprocess
    import sys

    from conftest import ddp_env

    worker = Path(__file__).with_name("_ddp_nonfinite_worker.py")
    proc = subprocess.run([sys.executable, str(worker), "--out", str(tmp_path), "--distill-first-step"], cwd=tmp_path,
                          env=ddp_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode != 0, proc.stdout[-3000:]
    errors = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert all(e.startswith("DistillationStepError: 1 problem at the first step of stage 'kd'") for e in errors), errors
    assert "`distill_losses.kd` = nan: is not finite at epoch 1" in errors[1]
    assert "`distill_losses` = 'not finite': is not finite on rank 1 at epoch 1" in errors[0]
    for path in (tmp_path / "ckpt").iterdir():  # what was saved, on the exception too, is before the NaN step
        assert _all_finite(torch.load(path, weights_only=True)["state_dict"]), path


def test_nan_weights_at_the_end_of_a_restore_best_stage_in_steps_stop_the_run(tmp_path):
    """A step schedule: stage ``a`` (steps 0..4, ``restore_best``) ends at step 5, and the batch that makes step 5
    has a finite loss with a NaN gradient. The stage-end check read the losses only, so the best weights were restored
    over the NaN ones and the run went on without a word; it now stops, naming the weights."""

    class Validated(NaNGradientAt):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

    stages = [{"name": "a", "start_step": 0, "end_step": 5, "monitor": "val_loss", "restore_best": True},
              {"name": "b", "start_step": 5}]
    run = trainer(tmp_path, max_epochs=-1, max_steps=12, val_check_interval=2,
                  callbacks=[StageScheduleCallback(stages)])
    with pytest.raises(DistillationStepError, match=r"`head.weight` holds NaN .* at global step 5 .*\(found at the "
                                                    r"end of the stage\)"):
        run.fit(Validated(epoch=1, batch=0), tiny_loader(), tiny_loader(n=8))


@pytest.mark.parametrize("early_stopping_first", [True, False])
def test_early_stopping_never_sees_a_metric_of_nan_trained_weights(tmp_path, early_stopping_first):
    """A validation every half epoch and a NaN loss at batch 1 of epoch 1: the validation after it would score NaN
    weights (``val_loss`` NaN). Lightning runs ``on_validation_end`` in the user's order, so an ``EarlyStopping``
    listed before ``StageScheduleCallback`` saw that NaN and signalled a stop; the weights are now read before the
    validation, wherever EarlyStopping stands."""

    class Scored(NaNAt):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    class Watching(EarlyStopping):
        def on_validation_end(self, trainer, pl_module):
            self.shown = [*getattr(self, "shown", []), float(trainer.callback_metrics["val_loss"])]
            super().on_validation_end(trainer, pl_module)

    early = Watching(monitor="val_loss", patience=100)
    guard = StageScheduleCallback()
    run = trainer(tmp_path, max_epochs=3, val_check_interval=0.5,
                  callbacks=[early, guard] if early_stopping_first else [guard, early])
    g = torch.Generator().manual_seed(1)
    val = DataLoader(TensorDataset(torch.randn(8, 4, generator=g), torch.zeros(8, dtype=torch.long)), batch_size=8)
    with pytest.raises(DistillationStepError, match=r"at batch 1 of epoch 1 \(found before a validation"):
        run.fit(Scored(epoch=1, batch=1), tiny_loader(), val)
    assert early.shown and all(math.isfinite(v) for v in early.shown)  # before: the last one NaN (listed first)
    assert not run.should_stop and early.stopped_epoch == 0
