"""The teacher cache inside a fit: the input check recomputes rows of another dataset, a file as directory is refused
at setup."""

import _cache_ddp_worker as worker
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import IndexedDataset, StageConfigError, StageScheduleCallback, TeacherCache
from lightning_stages.losses import logit_kd


class EitherStudent(worker.Student):
    """The worker's student, also for stages that do not distill."""

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        outputs = self.run_teachers(x, sample_index=index)
        if outputs:
            self.seen.append({"index": index.tolist(), "logits": outputs["teacher"].detach().clone()})
            return logit_kd(self.net(x), outputs["teacher"])
        return F.cross_entropy(self.net(x), y)


class MetricsLogger(Logger):
    """Keeps every ``log_metrics`` call: ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def _fit(model, x, schedule, epochs=1, logger=False):
    labels = torch.zeros(len(x), dtype=torch.long)
    loader = DataLoader(IndexedDataset(TensorDataset(x, labels)), batch_size=worker.BATCH_SIZE, shuffle=True)
    trainer = pl.Trainer(max_epochs=epochs, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
                         callbacks=[StageScheduleCallback(stage_schedule=schedule, verbose=False)])
    trainer.fit(model, loader)
    return trainer


def test_a_fit_on_another_dataset_of_the_same_size_recomputes_every_row(tmp_path):
    model = EitherStudent(str(tmp_path))
    model.teacher_cache = TeacherCache()
    distill = [{"name": "distill", "start_epoch": 0, "distillation": True}]
    _fit(model, worker.inputs(), distill)
    other = torch.randn(worker.N_SAMPLES, 5, generator=torch.Generator().manual_seed(5))
    model.seen, model.teacher_calls = [], 0
    logger = MetricsLogger()
    _fit(model, other, distill, logger=logger)
    assert model.teacher_calls == worker.N_SAMPLES // worker.BATCH_SIZE
    # the callback logs the epoch's counts once, at its end: every sample was stored for another input
    cache_rows = [m for _, m in logger.logged if any(k.startswith("teacher_cache/") for k in m)]
    assert cache_rows == [{"teacher_cache/hits": 0.0, "teacher_cache/mismatches": float(worker.N_SAMPLES),
                           "teacher_cache/misses": 0.0}]
    teacher = worker.make_teacher()
    with torch.no_grad():
        for step in model.seen:
            torch.testing.assert_close(step["logits"], teacher(other[step["index"]]))


def test_a_file_as_cache_directory_is_refused_at_setup_before_the_first_batch(tmp_path):
    path = tmp_path / "cache"
    model = EitherStudent(str(path))
    path.write_text("a file")
    schedule = [{"name": "finetune", "start_epoch": 0, "end_epoch": 1, "distillation": False},
                {"name": "distill", "start_epoch": 1, "distillation": True}]
    with pytest.raises(StageConfigError, match=r"`directory` = '.*cache': is an existing file"):
        _fit(model, worker.inputs(), schedule, epochs=2)
    assert model.trainer.global_step == 0
