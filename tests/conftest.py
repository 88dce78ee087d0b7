"""What the tests share: tiny modules, data and Trainers, and the segmentation example shrunk to seconds.

- ``Student`` (with a teacher, feature hooks and an adapter) and its plain twin ``PlainStudent``: five task losses on
  6 features, for the callback and mixin tests (and the 0.1 checkpoints in ``tests/data``, so they stay as they are).
- ``TinyNet``: 4 features -> 8 -> ``classes``, cross-entropy plus logit KD while distilling. The tests that need
  something particular (a copy-counting teacher, an extra loss, feature hooks, what each step saw) subclass it and
  override one hook.
- ``loader``, ``trainer``: the data and a quiet, deterministic Trainer; ``EpochShuffle`` and ``ResumableLoader``: a
  sampler that shuffles by epoch and a loader that keeps its position in checkpoints (exact mid-epoch resume);
  ``CrashAtStep``: a callback that stops a run like a crash before a given step.
- ``ddp_env``: the environment for a 2-rank worker script run in a subprocess (a free port, this checkout first on
  ``PYTHONPATH``, no rank variables inherited).
- The ``tiny_config`` and ``teacher_ckpt`` fixtures: the example's LightningCLI configs cut to tiny data, and a real
  (tiny) teacher checkpoint, trained once per session.

Test files import a class from here only to use or subclass it (``from conftest import TinyNet``); everything else
comes in as a fixture. A test file never imports another test file.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from examples.segmentation import SegmentationTeacher, ShapesDataModule
from lightning_stages import DistillationModule
from lightning_stages.losses import FeatureAdapter, feature_mse, logit_kd


def pytest_configure(config: pytest.Config) -> None:
    """Let the package's log lines reach pytest's handlers (``caplog``).

    This file imports ``lightning_stages`` before pytest configures logging, so the package took the fallback it
    keeps for applications that configured nothing (its own handler, no propagation). Under pytest, logging is
    configured: undo the fallback, as if the package had been imported afterwards.
    """
    logger = logging.getLogger("lightning_stages")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True


ROOT = Path(__file__).resolve().parents[1]


def ddp_env() -> dict[str, str]:
    """Environment for a DDP worker script: a free local port, and the checkout under test importable (the worker
    imports ``examples`` and ``lightning_stages`` from here, not whatever copy is installed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    for var in list(env):  # no rank, launcher or cluster variables of whatever started pytest
        if var in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "LOCAL_WORLD_SIZE",
                   "TORCHELASTIC_RUN_ID", "GROUP_RANK") or var.startswith(("SLURM_", "OMPI_", "PMI_")):
            env.pop(var)
    return env



def run_ddp_worker(main: Callable[[], Any]) -> None:
    """A DDP worker script's entry: run ``main``, end the process group, exit with ``main``'s code. Lightning leaves
    the group to the script; left to the interpreter's teardown, gloo's threads can abort the finished process
    (SIGABRT, "terminate called without an active exception")."""
    code = main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    raise SystemExit(code)


FIVE_WEIGHTS = {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}


def loader(n: int = 8, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class CountingTeacher(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.ReLU())
        self.head = nn.Linear(width, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.body(x))


def task_losses(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    p = torch.sigmoid(logits[:, 1])
    t = y.float()
    bce = F.binary_cross_entropy_with_logits(logits[:, 1], t)
    return {
        "bce": bce,
        "focal": ((1 - torch.exp(-bce)) ** 2 * bce),
        "dice": 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1),
        "iou": (p - t).abs().mean(),
        "cls": F.cross_entropy(logits, y),
    }


class PlainStudent(pl.LightningModule):
    """A student written without the plugin: fixed weights, no teacher."""

    def __init__(self, loss_weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)
        self.loss_weights = dict(loss_weights or FIVE_WEIGHTS)
        self.losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = task_losses(self(x), y)
        loss = sum(self.loss_weights[k] * v for k, v in losses.items())
        self.log("train/loss", loss)
        self.losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Student(DistillationModule, PlainStudent):
    """The same student with the plugin: a teacher, feature hooks, an adapter used only while distilling."""

    def __init__(self, loss_weights: dict[str, float] | None = None, hooks: dict | None = None) -> None:
        super().__init__(loss_weights)
        self.adapter = FeatureAdapter(4, 16)
        self.teacher_builds = 0
        self.hooks = {"student": ["body"], "teacher": ["body"]} if hooks is None else hooks
        self.seen: list[tuple[int, str, bool, float, dict]] = []  # (epoch, stage, distill, lambda, weights) per step
        self.teacher_calls_per_epoch: dict[int, int] = {}

    def configure_teachers(self):
        self.teacher_builds += 1
        with torch.random.fork_rng():
            torch.manual_seed(123)
            return {"teacher": CountingTeacher()}

    def configure_feature_hooks(self):
        return self.hooks

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        outputs = self.run_teachers(x)
        distill = {}
        if outputs:
            distill["logit_kd"] = logit_kd(logits, outputs["teacher"], temperature=2.0)
            if self.hooks:
                distill["feature"] = feature_mse(
                    self.captured_features()["body"], self.captured_features("teacher")["body"], self.adapter
                )
        losses = task_losses(logits, y)
        loss = self.weighted_loss(losses, distill)
        self.log("train/loss", loss)
        self.losses.append(loss.detach().clone())
        self.seen.append(
            (self.trainer.current_epoch, self.stage_name, self.use_distillation, self.lambda_coef, dict(self.loss_weights))
        )
        teacher = self.teachers.get("teacher")
        self.teacher_calls_per_epoch[self.trainer.current_epoch] = teacher.calls if teacher is not None else 0
        return loss


class TinyNet(DistillationModule, pl.LightningModule):
    """4 features -> 8 hidden -> ``classes`` logits; cross-entropy, plus logit KD from ``teacher()`` while distilling.

    Subclasses override one hook each: ``teacher`` (which teacher), ``task_losses``/``distill_losses`` (which
    losses), ``record`` (what a step writes down).
    """

    temperature = 1.0  # of the logit KD

    def __init__(self, classes: int = 3, loss_weights: dict[str, float] | None = None, lr: float = 0.05,
                 momentum: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, classes)
        self.classes = classes
        self.loss_weights = dict(loss_weights or {"cls": 1.0})
        self.lr, self.momentum = lr, momentum
        self.teacher_builds = 0

    def teacher(self) -> nn.Module:
        return nn.Linear(4, self.classes)

    def configure_teachers(self):
        self.teacher_builds += 1
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return {"teacher": self.teacher()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))

    def task_losses(self, logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cls": F.cross_entropy(logits, y)}

    def distill_losses(self, logits: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        teachers = self.run_teachers(x)
        return {"kd": logit_kd(logits, teachers["teacher"], temperature=self.temperature)} if teachers else {}

    def record(self, batch, batch_idx: int, loss: torch.Tensor) -> None:
        """What a step writes down for the test; nothing here."""

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.weighted_loss(self.task_losses(logits, y), self.distill_losses(logits, x))
        self.record(batch, batch_idx, loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class ManualTinyNet(TinyNet):
    """:class:`TinyNet` under manual optimization: each ``training_step`` runs one optimizer step on its loss and
    returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


class EpochShuffle(Sampler):
    """A new permutation every epoch, a pure function of the epoch (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(100 + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """A loader that keeps its position: Lightning saves its ``state_dict`` in checkpoints and restores it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.yielded, self.skip = 0, 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        self.yielded = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self.yielded += 1
                yield batch

    def state_dict(self) -> dict:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.skip = state["yielded"] if state["yielded"] < len(self) else 0


def trainer(tmp_path, max_epochs: int = 4, callbacks=(), **kwargs) -> pl.Trainer:
    defaults = {
        "default_root_dir": tmp_path,
        "max_epochs": max_epochs,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


# ---------------------------------------------------------------------------------------------- the segmentation example

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_DATA = {"num_train": 32, "num_val": 16, "num_test": 16, "image_size": 16, "batch_size": 16, "data_seed": 0}
TINY_TEACHER = {"widths": [4, 8, 16], "convs_per_block": 1}


def make_tiny_teacher(path: Path) -> Path:
    """A real (tiny) teacher checkpoint, written the way the teacher config writes one: by a Trainer."""
    model = SegmentationTeacher(**TINY_TEACHER)
    trainer = pl.Trainer(max_steps=1, enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False,
                         enable_model_summary=False, logger=False)
    trainer.fit(model, datamodule=ShapesDataModule(**TINY_DATA))
    trainer.save_checkpoint(path)
    return path


def write_tiny_config(
    name: str,
    out: Path,
    teacher: Optional[Path],
    stages: Optional[list[dict[str, Any]]] = None,
    max_epochs: int = 1,
    file_name: Optional[str] = None,
    data: Optional[dict[str, Any]] = None,
) -> Path:
    """``configs/segmentation_<name>.yaml`` shrunk to tiny data and epochs (and optionally other stages)."""
    config = yaml.safe_load((CONFIGS / f"segmentation_{name}.yaml").read_text())
    config["trainer"]["max_epochs"] = max_epochs
    config["trainer"]["logger"] = False
    config["trainer"]["enable_progress_bar"] = False
    config["trainer"]["enable_model_summary"] = False
    config["trainer"]["enable_checkpointing"] = False
    config["data"]["init_args"] = {**TINY_DATA, **(data or {})}
    config["model"]["init_args"]["teacher_checkpoint"] = str(teacher if teacher is not None else out / "missing.ckpt")
    config["model"]["init_args"]["teacher_channels"] = TINY_TEACHER["widths"][-1]
    for callback in config["trainer"].get("callbacks") or []:  # the shipped stages, cut to the tiny run
        for stage in callback["init_args"].get("stage_schedule", []):
            stage["end_epoch"] = min(stage["end_epoch"], max_epochs)
    if stages is not None:
        config["trainer"]["callbacks"] = [
            {"class_path": "lightning_stages.StageScheduleCallback", "init_args": {"stage_schedule": stages}}
        ]
    path = out / (file_name or f"{name}.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_config() -> Callable[..., Path]:
    """``tiny_config(name, out, teacher, stages=None, max_epochs=1, file_name=None, data=None) -> Path``: see
    :func:`write_tiny_config`."""
    return write_tiny_config


@pytest.fixture
def tiny_data() -> dict[str, int]:
    """The arguments of a tiny ``ShapesDataModule``: 32/16/16 samples of 16x16 pixels, one batch each."""
    return dict(TINY_DATA)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny segmentation teacher trained for one step and saved by its Trainer, shared by the whole session."""
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher.ckpt")


# ------------------------------------------------------------------------------------------ real model families (issue 9)


def tiny_bert(hidden: int = 32, layers: int = 2, labels: int = 3, seed: int = 0) -> nn.Module:
    """A ``transformers`` BERT classifier built from a tiny ``BertConfig`` with random weights; nothing downloaded.

    In transformers 5, ``bert.encoder`` returns a ``ModelOutput``, ``bert.encoder.layer.N.attention`` a tuple and
    ``bert.encoder.layer.N`` a tensor; the model itself returns a ``SequenceClassifierOutput``.
    """
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BertForSequenceClassification(config)


def token_loader(n: int = 8, length: int = 6, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Token ids, an attention mask with some padding, labels in 0..2 and each sample's index."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, -2:] = 0
    return DataLoader(TensorDataset(ids, mask, torch.randint(0, 3, (n,), generator=g), torch.arange(n)),
                      batch_size=batch_size)


class BasicBlock(nn.Module):
    """torchvision's and timm's ResNet ``BasicBlock``: ``out = bn2(...); out += identity; relu(out)`` in place."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """A stem and two ``BasicBlock``s in ``layer`` (paths ``layer.0``, ``layer.1.bn2``, ...), then a classifier."""

    def __init__(self, channels: int = 4, classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
            self.layer = nn.Sequential(BasicBlock(channels), BasicBlock(channels))
            self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer(self.stem(x)).mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------- compare's tiny runs

COMPARE_DATA = {"num_train": 16, "num_val": 8, "num_test": 8, "image_size": 16, "batch_size": 8, "data_seed": 0}
COMPARE_STUDENT = {"widths": [2, 4, 8], "convs_per_block": 1}


def compare_config(path: Path, teacher: Optional[Path], stages: Optional[list[dict[str, Any]]] = None,
                   max_epochs: int = 2, lr: float = 0.003) -> Path:
    """``configs/segmentation_joint.yaml`` shrunk to tiny data, models and epochs, with the given stages (the runs of
    the ``compare`` tests)."""
    config = yaml.safe_load((CONFIGS / "segmentation_joint.yaml").read_text())
    config["trainer"].update(max_epochs=max_epochs, logger=False, enable_checkpointing=False)
    config["data"]["init_args"] = dict(COMPARE_DATA)
    config["model"]["init_args"].update(COMPARE_STUDENT, lr=lr, teacher_channels=TINY_TEACHER["widths"][-1],
                                        teacher_checkpoint=str(teacher or path.parent / "missing.ckpt"))
    config["trainer"]["callbacks"] = [] if stages is None else [
        {"class_path": "lightning_stages.StageScheduleCallback", "init_args": {"stage_schedule": stages}}]
    path.write_text(yaml.safe_dump(config))
    return path


class Crash(Exception):
    """What :class:`CrashAtStep` raises."""


class CrashAtStep(pl.Callback):
    """Stops the run like a crash, right before the step ``step`` (after the checkpoint of step ``step``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"crash before step {self.step}")


def save_earlier_result(folder, run, fingerprint: str) -> None:
    """A ``result.json`` as a version before the eleventh session wrote it: no ``fingerprint_format``."""
    import json

    from lightning_stages.cli.run_store import RESULT_FILE, save_result

    path = save_result(folder, run, fingerprint)
    data = json.loads(path.read_text())
    data.pop("fingerprint_format")
    (path.parent / RESULT_FILE).write_text(json.dumps(data))


class Capture(Logger):
    """A logger that keeps every ``log_metrics`` call, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))
