"""Cost options of the mixin: teacher-output cache, teacher offload, teacher precision, and torch.compile.

No test here measures time (speed lives in ``benchmarks/run.py``); each checks what work is done or where
tensors live.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import (
    DistillationModule,
    DistillationStepError,
    IndexedDataset,
    StageConfigError,
    StageScheduleCallback,
    TeacherCache,
)
from lightning_stages.losses import feature_mse, logit_kd

N_SAMPLES, BATCH_SIZE = 12, 4
BATCHES_PER_EPOCH = -(-N_SAMPLES // BATCH_SIZE)


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_SAMPLES, 6, generator=g), torch.randint(0, 3, (N_SAMPLES,), generator=g)


def indexed_loader(shuffle: bool = True) -> DataLoader:
    x, y = data()
    return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=BATCH_SIZE, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(1))


class Teacher(nn.Module):
    """Counts its forwards and records whether it ran under autocast."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.calls = 0
        self.autocast: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return self.head(self.body(x))


class Student(DistillationModule, pl.LightningModule):
    def __init__(self, teacher: Teacher | None = None, cache: TeacherCache | None = None,
                 teacher_layers: tuple[str, ...] = ("body",), lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.loss_weights = {"cls": 1.0}
        self.teacher = teacher if teacher is not None else Teacher()
        self.teacher_cache = cache
        self.teacher_layers = list(teacher_layers)
        self.student_layer = "body"
        self.lr = lr
        self.seen: list[dict] = []  # per distilling training step: indices, teacher logits, captured features

    # the teacher is handed over in __init__ but must not become a submodule: keep it out of nn.Module's registry
    def __setattr__(self, name: str, value) -> None:
        if name == "teacher":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def configure_teachers(self):
        return {"teacher": self.teacher}

    def configure_feature_hooks(self):
        return {"student": [self.student_layer], "teacher": self.teacher_layers}

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        logits = self(x)
        distill = {}
        if self.use_distillation:
            teacher_logits = self.run_teachers(x, sample_index=index)["teacher"]
            distill["kd"] = logit_kd(logits, teacher_logits)
            distill["body"] = feature_mse(self.captured_features()[self.student_layer],
                                          self.captured_features("teacher")["body"])
            self.seen.append({"index": index.clone(), "logits": teacher_logits.detach().clone(),
                              "features": self.captured_features("teacher")["body"].detach().clone()})
        return self.weighted_loss({"cls": F.cross_entropy(logits, y)}, distill)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(model: pl.LightningModule, schedule: list[dict], epochs: int, callbacks=(), loader=None) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[StageScheduleCallback(stage_schedule=schedule, verbose=False), *callbacks],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", num_sanity_val_steps=0,
    )
    trainer.fit(model, train_dataloaders=loader if loader is not None else indexed_loader())
    return trainer


def prepared(teacher: Teacher, cache: TeacherCache | None, layers: tuple[str, ...] = ("body",)) -> Student:
    """A student used without a Trainer: teachers prepared, distillation on, in training mode."""
    model = Student(teacher, cache, layers)
    model.prepare_teachers()
    model.use_distillation = True
    return model.train()


def one_epoch(model: Student) -> None:
    x, _ = data()
    for index in torch.arange(N_SAMPLES).split(BATCH_SIZE):
        model.run_teachers(x[index], sample_index=index)


# ---------------------------------------------------------------------------------------------------- cache


def test_cache_fills_in_the_first_distilling_epoch_and_skips_the_teacher_afterwards():
    teacher, cache = Teacher(), TeacherCache()
    model = Student(teacher, cache)
    fit(model, [{"name": "distill", "start_epoch": 0, "distillation": True}], epochs=3)

    assert teacher.calls == BATCHES_PER_EPOCH  # epoch 0 only
    assert (cache.misses, cache.hits) == (BATCHES_PER_EPOCH, 2 * BATCHES_PER_EPOCH)
    assert len(cache) == N_SAMPLES
    # every step, read or computed, got what the teacher gives for exactly those samples (shuffled batches)
    x, _ = data()
    assert len(model.seen) == 3 * BATCHES_PER_EPOCH
    with torch.no_grad():
        for step in model.seen:
            features = teacher.body(x[step["index"]])
            torch.testing.assert_close(step["features"], features)
            torch.testing.assert_close(step["logits"], teacher.head(features))


def test_cache_is_not_used_outside_distilling_stages_nor_in_evaluation():
    teacher, cache = Teacher(), TeacherCache()
    model = Student(teacher, cache)
    fit(model, [{"name": "distill", "start_epoch": 0, "end_epoch": 1, "distillation": True},
                {"name": "finetune", "start_epoch": 1, "distillation": False}], epochs=3)
    assert teacher.calls == BATCHES_PER_EPOCH and cache.hits == 0 and len(model.seen) == BATCHES_PER_EPOCH

    model.eval()
    model.use_distillation = True
    x, _ = data()
    model.run_teachers(x[:4], sample_index=torch.arange(4))  # stored, but evaluation runs the teacher
    assert teacher.calls == BATCHES_PER_EPOCH + 1 and cache.hits == 0


@pytest.mark.parametrize("storage", ["memory", "directory"])
@pytest.mark.parametrize(
    ("change", "second_run_calls"),
    [("nothing", 0), ("weights", BATCHES_PER_EPOCH), ("layers", BATCHES_PER_EPOCH), ("buffer", BATCHES_PER_EPOCH)],
)
def test_cache_is_kept_for_the_same_teacher_and_dropped_when_weights_or_layers_change(
    tmp_path, storage, change, second_run_calls
):
    directory = tmp_path / "cache" if storage == "directory" else None
    cache = TeacherCache(directory)
    first = Teacher(seed=0)
    one_epoch(prepared(first, cache))
    assert first.calls == BATCHES_PER_EPOCH

    second = Teacher(seed=0)
    layers = ("body",)
    if change == "weights":
        with torch.no_grad():
            second.head.bias.add_(1e-3)
    elif change == "layers":
        layers = ("body.0",)
    elif change == "buffer":
        second.register_buffer("scale", torch.ones(1))
    # a new run: a new module and, for files, a new cache object reading the same directory
    second_cache = TeacherCache(directory) if directory is not None else cache
    model = prepared(second, second_cache, layers)
    one_epoch(model)
    assert second.calls == second_run_calls
    # and what the second run reads or stores is the second teacher's
    x, _ = data()
    out, features = second_cache.lookup(torch.arange(N_SAMPLES))
    with torch.no_grad():
        torch.testing.assert_close(out["teacher"], second(x))
    assert set(features["teacher"]) == set(layers)


def test_cache_files_hold_float16_and_give_back_the_teachers_dtype(tmp_path):
    cache = TeacherCache(tmp_path, dtype=torch.float16, num_samples=N_SAMPLES)
    teacher = Teacher()
    one_epoch(prepared(teacher, cache))
    # one shard of fixed-size records: logits (3 values) and the hooked body output (8 values) at 2 bytes each,
    # padded to 24 bytes, after an 8-byte sample index and 16 bytes of input and row checksums
    (shard,) = tmp_path.glob("tc2-*/*.rows")
    content = shard.read_bytes()
    length = int.from_bytes(content[8:12], "little")
    assert json.loads(content[16 : 16 + length])["record_bytes"] == 24 + 8 + 16
    assert len(content) == -(-(16 + length) // 8) * 8 + N_SAMPLES * (24 + 8 + 16)
    x, _ = data()
    out, features = cache.lookup([5, 2])
    assert out["teacher"].dtype == torch.float32
    with torch.no_grad():
        reference = teacher(x[[5, 2]])
    torch.testing.assert_close(out["teacher"], reference.half().float())
    assert features["teacher"]["body"].shape == (2, 8)


def test_cache_refuses_to_run_without_sample_index():
    teacher = Teacher()
    model = prepared(teacher, TeacherCache())
    with pytest.raises(DistillationStepError, match=r"teacher_cache.*no sample index.*sample_index=") as err:
        model.run_teachers(torch.randn(2, 6))
    assert str(err.value).startswith("1 problem at the first step of training:")  # no stage without the callback
    assert teacher.calls == 0


def test_cache_refusal_stops_a_fit_at_the_first_distilling_step():
    x, y = data()
    loader = DataLoader(TensorDataset(x, y, torch.zeros(N_SAMPLES)), batch_size=BATCH_SIZE)  # third item unused

    class NoIndexStudent(Student):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return self.weighted_loss({"cls": F.cross_entropy(self(x), y)},
                                      {"kd": logit_kd(self(x), self.run_teachers(x)["teacher"])})

    teacher = Teacher()
    with pytest.raises(DistillationStepError, match="sample_index") as err:
        fit(NoIndexStudent(teacher, TeacherCache()), [{"name": "kd", "start_epoch": 0, "distillation": True}], 1,
            loader=loader)
    assert str(err.value).startswith("1 problem at the first step of stage 'kd':")
    assert teacher.calls == 0


def test_cache_layout_mismatch_in_a_step_is_a_step_error_naming_the_stage():
    teacher = Teacher()
    model = prepared(teacher, TeacherCache())
    model.stage_name = "kd"
    x, _ = data()
    model.run_teachers(x[:4], sample_index=torch.arange(4))
    with pytest.raises(DistillationStepError) as err:  # a batch whose per-sample shape differs: 6 -> 2 x 3 values
        model.run_teachers(x[4:8].reshape(4, 1, 6).expand(4, 2, 6), sample_index=torch.arange(4, 8))
    assert str(err.value).startswith("1 problem at a training step of stage 'kd':\n  - stage 'kd': "
                                     "`teacher_cache.teacher outputs` = ")
    assert "per-sample shape" in str(err.value)


def test_cache_rejects_outputs_whose_per_sample_shape_changes():
    cache = TeacherCache()
    cache.bind("f")
    cache.store([0, 1], {"t": torch.zeros(2, 3)}, {})
    with pytest.raises(StageConfigError, match="per-sample shape"):
        cache.store([2, 3], {"t": torch.zeros(2, 4)}, {})
    with pytest.raises(StageConfigError, match="one row per sample"):
        cache.store([2, 3, 4], {"t": torch.zeros(2, 3)}, {})


# ---------------------------------------------------------------------------------------------------- offload

OFFLOAD_SCHEDULE = [
    {"name": "finetune_first", "start_epoch": 0, "end_epoch": 1, "distillation": False},
    {"name": "distill", "start_epoch": 1, "end_epoch": 2, "distillation": True},
    {"name": "finetune", "start_epoch": 2, "end_epoch": 4, "distillation": False},
]


@pytest.mark.parametrize(
    ("mode", "devices", "moves"),
    [
        # devices: where the teacher is at epochs 0-3; moves: the targets of the mixin's teacher.to() calls, the
        # first being prepare_teachers' move to the module's device (already moved there at on_fit_start)
        (False, ["meta", "meta", "meta", "meta"], ["meta"]),
        (True, ["meta", "meta", "cpu", "cpu"], ["meta", "cpu"]),  # on CPU once no current or later stage distills
        ("after_last", ["meta", "meta", "cpu", "cpu"], ["meta", "cpu"]),
        # on CPU whenever the current stage does not distill: offloaded at on_fit_start, back for the distill stage
        ("idle", ["cpu", "meta", "cpu", "cpu"], ["meta", "cpu", "meta", "cpu"]),
    ],
)
def test_offloaded_teachers_stay_on_cpu_while_the_module_moves_and_come_back_to_distill(mode, devices, moves):
    """The "meta" device stands in for an accelerator: a real device other than CPU that ``.to()`` can target.

    The sequence mirrors ``Trainer.fit``: the callback's ``setup`` (module on CPU), the strategy moving the module
    to its device, ``on_fit_start`` (which builds the teachers there), then the stage application at every epoch
    start. What is checked is where the parameters are
    (and which ``.to()`` calls the mixin made); meta tensors hold no values, so a move from meta to CPU allocates
    instead of copying, and the values themselves are not checked here (the CPU fit below checks distillation).
    """
    model = Student()
    model.offload_teachers = mode
    recorded: list[str] = []
    teacher_to = model.teacher.to

    def recording_to(device):
        recorded.append(torch.device(device).type)
        if model.teacher.head.weight.is_meta and torch.device(device).type != "meta":
            return model.teacher.to_empty(device=device)
        return teacher_to(device)

    model.teacher.__dict__["to"] = recording_to
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    callback = StageScheduleCallback(stage_schedule=OFFLOAD_SCHEDULE, verbose=False)
    callback.setup(trainer, model, "fit")
    model.to("meta")
    callback.on_fit_start(trainer, model)
    assert model.head.weight.device.type == "meta"
    seen = []
    for epoch in range(4):
        trainer.fit_loop.epoch_progress.current.completed = epoch
        callback.on_train_epoch_start(trainer, model)
        seen.append(model.teacher.head.weight.device.type)
        assert model.teachers_offloaded == (seen[-1] == "cpu")
    assert seen == devices
    assert recorded == moves


def test_offloaded_teachers_follow_dtype_casts():
    model = Student()
    model.offload_teachers = "idle"
    model.prepare_teachers()
    model.update_teacher_placement(distills_now=False, distills_later=True)
    model.to(device="meta", dtype=torch.float64)
    assert (model.teacher.head.weight.device.type, model.teacher.head.weight.dtype) == ("cpu", torch.float64)
    assert (model.head.weight.device.type, model.head.weight.dtype) == ("meta", torch.float64)


def test_offload_in_a_real_fit_still_distills():
    class Placement(Callback):
        def __init__(self):
            self.offloaded = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.offloaded.append(pl_module.teachers_offloaded)

    teacher = Teacher()
    model = Student(teacher)
    model.offload_teachers = "idle"
    placement = Placement()  # runs after the stage callback (callbacks run in list order)
    fit(model, [{"name": "d", "start_epoch": 0, "end_epoch": 1, "distillation": True},
                {"name": "f", "start_epoch": 1, "end_epoch": 2, "distillation": False},
                {"name": "d2", "start_epoch": 2, "end_epoch": 3, "distillation": True}], 3, callbacks=[placement])
    assert placement.offloaded == [False, True, False]
    assert teacher.calls == 2 * BATCHES_PER_EPOCH


def test_unknown_offload_mode_and_precision_are_refused_before_training():
    model = Student()
    model.offload_teachers = "sometimes"
    model.teacher_precision = "bf16-mix"
    with pytest.raises(StageConfigError, match=r"offload_teachers.*'sometimes'") as err:
        fit(model, [{"start_epoch": 0, "distillation": True}], 1)
    assert "did you mean `bf16-mixed`" in str(err.value)
    assert model.teacher.calls == 0


# ---------------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("precision", "expected"),
    [(None, (False, None)), ("32-true", (False, None)), ("bf16-mixed", (True, torch.bfloat16)),
     ("16-mixed", (True, torch.float16))],
)
def test_teacher_precision_runs_the_teachers_under_autocast(precision, expected):
    teacher = Teacher()
    model = Student(teacher)
    model.teacher_precision = precision
    model.prepare_teachers()
    model.use_distillation = True
    out = model.run_teachers(torch.randn(2, 6))["teacher"]
    enabled, dtype = teacher.autocast[-1]
    assert (enabled, dtype if enabled else None) == expected
    assert out.dtype == (expected[1] or torch.float32)  # nn.Linear under autocast computes in the autocast dtype
    assert not torch.is_autocast_enabled("cpu")
    assert not out.requires_grad


# ---------------------------------------------------------------------------------------------------- compile


def _compile_available() -> bool:
    try:
        import torch._dynamo

        return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()
    except Exception:  # pragma: no cover - builds without Dynamo
        return False


@pytest.mark.skipif(not _compile_available(), reason="torch.compile is not available here")
@pytest.mark.parametrize("how", ["trainer.fit(torch.compile(model))", "compiled submodule"])
def test_compiled_student_captures_features_only_while_distilling(how):
    """Hooks attached after the first compiled step (finetune first) and removed again take effect.

    By default Dynamo does not guard on hooks, so a compiled submodule would keep running without the hooks it was
    first compiled without (``KeyError`` on the features). The ``aot_eager`` backend traces with Dynamo and
    AOTAutograd like the default one but skips code generation (seconds instead of tens of seconds); whether hooks
    are seen is decided by Dynamo, the same for every backend.
    """

    class Record(Callback):
        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append((trainer.current_epoch, batch[0].clone(),
                               {k: v.detach().clone() for k, v in pl_module.captured_features().items()}))

    teacher = Teacher()
    model = Student(teacher, lr=0.0)  # weights stay as they are: the test recomputes the features eagerly
    if how == "compiled submodule":
        model.body = torch.compile(model.body, backend="aot_eager")
        model.student_layer = "body._orig_mod.0"  # hook paths are named_modules() names
    record = Record()
    schedule = [{"name": "f", "start_epoch": 0, "end_epoch": 1, "distillation": False},
                {"name": "d", "start_epoch": 1, "end_epoch": 2, "distillation": True},
                {"name": "f2", "start_epoch": 2, "end_epoch": 3, "distillation": False}]
    fit(torch.compile(model, backend="aot_eager") if how.startswith("trainer") else model, schedule, 3,
        callbacks=[record])

    assert [epoch for epoch, _, _ in record.steps] == [e for e in range(3) for _ in range(BATCHES_PER_EPOCH)]
    layer = dict(model.named_modules())[model.student_layer]
    for epoch, x, features in record.steps:
        if epoch == 1:
            with torch.no_grad():
                torch.testing.assert_close(features[model.student_layer], layer(x))
        else:
            assert features == {}
    assert teacher.calls == BATCHES_PER_EPOCH
