"""Lightning's distributed strategies.

DDP across stage boundaries: two CPU processes (gloo), finetune -> distill -> finetune, with an adapter used only
while distilling. Each run is a subprocess (``tests/_ddp_worker.py``) so this process never joins a process group.
Sharded strategies (FSDP, DeepSpeed, ModelParallel) refuse stages with teachers at setup."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import _ddp_worker as worker
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import ddp_env
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch.utils.data import DistributedSampler

from lightning_stages import StageConfigError, StageScheduleCallback

WORKER = Path(__file__).with_name("_ddp_worker.py")
RUNS = {"ddp": 1, "ddp_spawn": 2}  # strategy -> accumulate_grad_batches (ddp_spawn also checks accumulation)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start both runs at once, wait for both, and return ``{strategy: (out_dir, [rank0, rank1])}``."""
    procs = {}
    for strategy, accumulate in RUNS.items():
        out = tmp_path_factory.mktemp(strategy)
        env = ddp_env()
        cmd = [sys.executable, str(WORKER), "--strategy", strategy, "--out", str(out), "--accumulate", str(accumulate)]
        proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs[strategy] = (out, proc)
    results = {}
    for strategy, (out, proc) in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{strategy} run failed:\n{output[-4000:]}"
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        results[strategy] = (out, ranks)
    return results


def _expected_stage(epoch: int) -> tuple[str, bool, float, dict]:
    """The schedule written out by hand: finetune (epoch 0), distill (epoch 1), finetune (epoch 2)."""
    if epoch == 1:
        return "distill", True, 1.0, {"cls": 0.0}
    return ("finetune_first" if epoch == 0 else "finetune_last"), False, 0.0, {"cls": 1.0}


@pytest.mark.parametrize("strategy", list(RUNS))
def test_ddp_crosses_both_boundaries_without_find_unused_parameters(runs, strategy):
    _, ranks = runs[strategy]
    batches_per_epoch = worker.N_SAMPLES // 2 // worker.BATCH_SIZE
    for rank, result in enumerate(ranks):
        assert result["rank"] == rank and result["world_size"] == 2
        assert result["wrapper"] == "DistributedDataParallel"
        assert result["find_unused_parameters"] is False
        assert result["global_step"] == worker.MAX_EPOCHS * batches_per_epoch // RUNS[strategy]


@pytest.mark.parametrize("strategy", list(RUNS))
def test_both_ranks_apply_the_same_stage_every_epoch(runs, strategy):
    _, (rank0, rank1) = runs[strategy]
    assert rank0["seen"] == rank1["seen"]
    assert len(rank0["seen"]) == worker.MAX_EPOCHS * worker.N_SAMPLES // 2 // worker.BATCH_SIZE
    for step in rank0["seen"]:
        name, distill, lambda_coef, weights = _expected_stage(step["epoch"])
        got = (step["stage"], step["distill"], step["lambda"], step["weights"])
        assert got == (name, distill, lambda_coef, weights)


@pytest.mark.parametrize("strategy", list(RUNS))
def test_teacher_is_never_wrapped_by_ddp(runs, strategy):
    _, ranks = runs[strategy]
    for result in ranks:
        assert result["teacher_params_in_wrapper"] == 0
        assert result["teacher_module_in_wrapper"] is False
        assert result["teacher_requires_grad"] is False


@pytest.mark.parametrize("strategy", list(RUNS))
def test_rank_zero_alone_writes_log_lines_and_tensorboard(runs, strategy):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, (rank0, rank1) = runs[strategy]
    assert [line.split(":")[0] for line in rank0["lines"]] == ["epoch 0", "epoch 1", "epoch 2"]
    assert "'distill'" in rank0["lines"][1]
    assert rank1["lines"] == []
    event_files = sorted(out.glob("tb/**/events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    events = EventAccumulator(str(event_files[0]), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("stage/use_distillation")] == [0, 2 // RUNS[strategy], 4 // RUNS[strategy]]
    assert [e.value for e in events.Scalars("stage/use_distillation")] == [0.0, 1.0, 0.0]
    assert len(events.Tensors("stage/text_summary")) == 3  # one text per stage change, not one per rank


def _reference_weights(accumulate: int) -> dict[str, torch.Tensor]:
    """Single-process training written by hand: what 2-rank DDP must equal (mean of rank means = mean of the union).

    Lightning gives each rank a ``DistributedSampler`` (shuffled, seed 0, ``set_epoch`` every epoch); one DDP step
    is one step over the union of the ranks' micro-batches of that step.
    """
    model, teacher = worker.Student(), worker.make_teacher()
    data = worker.dataset()
    x, y = data.tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=worker.LR)
    per_step = worker.BATCH_SIZE * accumulate
    for epoch in range(worker.MAX_EPOCHS):
        shards = []
        for rank in (0, 1):
            sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        for start in range(0, len(shards[0]), per_step):
            index = torch.tensor(shards[0][start : start + per_step] + shards[1][start : start + per_step])
            xb, yb = x[index], y[index]
            features = model.body(xb)
            logits = model.head(torch.relu(features))
            if epoch == 1:  # distill: 0 * cls + 1.0 * (KL(teacher || student) + feature mse through the adapter)
                with torch.no_grad():
                    hidden = torch.tanh(teacher[0](xb))
                    p_teacher = torch.softmax(teacher[2](hidden), dim=1)
                kl = (p_teacher * (p_teacher.log() - torch.log_softmax(logits, dim=1))).sum(dim=1).mean()
                mse = ((model.adapter(features) - hidden) ** 2).mean()
                loss = 0.0 * F.cross_entropy(logits, yb) + kl + mse
            else:
                loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {name: p.detach().flatten() for name, p in model.named_parameters()}


@pytest.mark.parametrize("strategy", list(RUNS))
def test_ddp_training_equals_a_hand_written_single_process_reference(runs, strategy):
    _, (rank0, rank1) = runs[strategy]
    reference = _reference_weights(RUNS[strategy])
    last = str(worker.MAX_EPOCHS - 1)
    assert rank0["weights_by_epoch"] == rank1["weights_by_epoch"]
    for name, expected in reference.items():
        got = torch.tensor(rank0["weights_by_epoch"][last][name])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=name)
    # the adapter learned while distilling, and did not move while fine-tuning
    adapter = [rank0["weights_by_epoch"][str(e)]["adapter.weight"] for e in range(worker.MAX_EPOCHS)]
    initial = worker.Student().adapter.weight.detach().flatten().tolist()
    assert adapter[0] == initial and adapter[1] != initial and adapter[2] == adapter[1]


@pytest.mark.parametrize(
    "make_strategy",
    [FSDPStrategy, ModelParallelStrategy, lambda: DeepSpeedStrategy.__new__(DeepSpeedStrategy)],  # no DeepSpeed here
    ids=["FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"],
)
def test_sharded_strategies_refuse_teachers_at_setup_and_accept_schedules_without_them(make_strategy):
    """FSDP needs a GPU in Lightning and DeepSpeed is not installed: the refusal is checked on a stand-in Trainer."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=worker.MAX_EPOCHS, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    strategy = make_strategy()
    trainer._accelerator_connector.strategy = strategy
    model = worker.Student()
    with pytest.raises(StageConfigError) as err:
        StageScheduleCallback(stage_schedule=worker.SCHEDULE).setup(trainer, model, "fit")
    message = str(err.value)
    assert f"distillation is not supported under {type(strategy).__name__}" in message
    assert "stage 1 ('distill')" in message and "strategy='ddp'" in message
    assert not model.teachers_prepared
    # stages that only change loss weights and lambda need no teacher: accepted
    weights_only = [{"start_epoch": 0, "end_epoch": 1, "loss_weights": {"cls": 0.5}}, {"start_epoch": 1}]
    callback = StageScheduleCallback(stage_schedule=weights_only, verbose=False)
    callback.setup(trainer, model, "fit")
    assert model.loss_weights == {"cls": 0.5} and not model.teachers_prepared


class _GradProbe(pl.Callback):
    def __init__(self) -> None:
        self.adapter_grads: list[tuple[int, object]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grad = pl_module.adapter.weight.grad
        self.adapter_grads.append((trainer.current_epoch, None if grad is None else float(grad.abs().sum())))


def _fit_in_process(tmp_path, monkeypatch, as_if_ddp: bool):
    import lightning_stages.distillation.distillation_module as distillation_module

    walks = []
    if as_if_ddp:  # what the mixin does under DDP, here on one process: walk the graph, add the zero term
        monkeypatch.setattr(distillation_module, "_ddp_needs_every_parameter", lambda trainer: True)
        walk = distillation_module.unreached_parameters
        monkeypatch.setattr(distillation_module, "unreached_parameters",
                            lambda *args: walks.append(1) or walk(*args))
    probe, model = _GradProbe(), worker.Student()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=worker.MAX_EPOCHS,
        accumulate_grad_batches=2,
        callbacks=[StageScheduleCallback(stage_schedule=worker.SCHEDULE, verbose=False), probe], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(worker.dataset(), batch_size=worker.BATCH_SIZE))
    return model, probe.adapter_grads, len(walks)


def test_single_device_adds_nothing_and_the_zero_term_changes_no_result(tmp_path, monkeypatch):
    plain, plain_grads, _ = _fit_in_process(tmp_path, monkeypatch, as_if_ddp=False)
    kept, kept_grads, walks = _fit_in_process(tmp_path, monkeypatch, as_if_ddp=True)
    # one device: the adapter has no gradient outside the distill stage (nothing was added to the loss)
    assert [g for e, g in plain_grads if e != 1] == [None] * 4 and all(g for e, g in plain_grads if e == 1)
    # with the zero term: a zero gradient instead, which DDP needs; and one graph walk per stage, not per step
    assert [g for e, g in kept_grads if e != 1] == [0.0] * 4
    assert walks == 3
    # under gradient accumulation the weights come out the same as without the term
    for (name, a), b in zip(plain.named_parameters(), kept.parameters()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------- stages in steps

def test_a_step_schedule_with_a_ramp_gives_both_ranks_the_same_values_at_every_step(tmp_path):
    """``tests/_steps_ddp_worker.py``: distill for steps [0, 3), then finetune with a 3-step ramp; accumulation 2."""
    import _steps_ddp_worker as steps_worker

    env = ddp_env()
    cmd = [sys.executable, str(WORKER.with_name("_steps_ddp_worker.py")), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["global_step"] == rank1["global_step"] == steps_worker.MAX_STEPS
    values = [[(s["step"], s["stage"], s["distill"], s["lambda"], s["weights"]) for s in r["seen"]]
              for r in (rank0, rank1)]
    assert values[0] == values[1]  # the same values at every batch of every step, on both ranks
    assert len(values[0]) == steps_worker.MAX_STEPS * steps_worker.ACCUMULATE
    for step, stage, distill, lambda_coef, weights in values[0]:
        if step < 3:  # the stage changes at step 3 on both ranks
            assert (stage, distill, lambda_coef, weights) == ("distill", True, 1.0, {"cls": 0.0})
            continue
        p = min((step - 3) / 3, 1.0)  # linear ramp: effective coefficient 1 -> 0, cls weight 0 -> 1
        assert stage == "finetune" and distill is (p < 1)
        assert lambda_coef == pytest.approx(1.0 - p) and weights["cls"] == pytest.approx(p)
