"""The LightningModules: a teacher trained on the five task losses, and a student that can also distill.

The student declares its task losses as ``self.loss_weights`` and reads ``loss_weights``, ``use_distillation`` and
``lambda_coef`` in its step; ``StageScheduleCallback`` sets them per stage. Distillation goes through the
``DistillationModule`` mixin (teacher built lazily, forward hooks on named layers) and ``lightning_stages.losses``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryJaccardIndex, MulticlassAccuracy
from torchmetrics.segmentation import DiceScore

from examples.segmentation.data import CLASSES
from examples.segmentation.models import SegNet
from lightning_stages import DistillationModule, load_teacher_checkpoint
from lightning_stages.losses import FeatureAdapter, logit_kd, mask_kd

#: the seed's base weights (``train.loss_weights``)
DEFAULT_LOSS_WEIGHTS = {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}
#: where the teacher config saves the teacher, and the command that makes it
TEACHER_CHECKPOINT = "checkpoints/segmentation_teacher.ckpt"
TEACHER_COMMAND = "python -m examples.segmentation fit --config configs/segmentation_teacher.yaml"


def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (Lin et al.), mean over pixels."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * ce).mean()


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """``1 - soft Dice`` of the mask probabilities, per image, averaged."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def mask_iou(logits: Tensor, target: Tensor) -> Tensor:
    """Per-image IoU of the thresholded mask with the target (no gradient); 1 when both are empty."""
    pred = (logits.detach() > 0).flatten(1).float()
    t = target.flatten(1)
    inter = (pred * t).sum(1)
    union = pred.sum(1) + t.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def task_losses(out: Mapping[str, Tensor], mask: Tensor, label: Tensor) -> dict[str, Tensor]:
    """The seed's five task losses: ``bce``, ``focal``, ``dice``, ``iou`` (IoU head vs true IoU, MSE), ``cls``."""
    logits = out["mask"]
    return {
        "bce": F.binary_cross_entropy_with_logits(logits, mask),
        "focal": sigmoid_focal_loss(logits, mask),
        "dice": dice_loss(logits, mask),
        "iou": F.mse_loss(out["iou"], mask_iou(logits, mask)),
        "cls": F.cross_entropy(out["cls"], label),
    }


def labelled_task_losses(
    out: Mapping[str, Tensor], mask: Tensor, label: Tensor, labelled: Optional[Tensor] = None
) -> dict[str, Tensor]:
    """:func:`task_losses` over the images whose ``labelled`` flag is set (all when ``labelled`` is ``None``).

    A batch without a labelled image gives zero losses that keep the graph, so the step can still backpropagate.

    Example::

        >>> out = {"mask": torch.zeros(2, 1, 4, 4), "iou": torch.zeros(2), "cls": torch.zeros(2, 5)}
        >>> losses = labelled_task_losses(out, torch.zeros(2, 1, 4, 4), torch.tensor([0, -1]),
        ...                               torch.tensor([True, False]))
        >>> round(losses["cls"].item(), 4)  # log(5): only the labelled image's class counts
        1.6094
    """
    if labelled is None or bool(labelled.all()):
        return task_losses(out, mask, label)
    if not bool(labelled.any()):
        zero = out["mask"].sum() * 0.0
        return dict.fromkeys(DEFAULT_LOSS_WEIGHTS, zero)
    return task_losses({k: v[labelled] for k, v in out.items()}, mask[labelled], label[labelled])


class SegmentationTask(pl.LightningModule):
    """Shared training, metrics and optimizer of teacher and student.

    Args:
        widths: channels of the network's two encoder levels and bottleneck.
        convs_per_block: 3x3 convolutions per block.
        loss_weights: weight of each task loss (the seed's ``train.loss_weights``); defaults to
            ``bce=1, focal=15, dice=1, iou=1, cls=1``.
        lr: Adam learning rate at the start; it decays to zero over ``max_epochs`` (cosine).
    """

    def __init__(
        self,
        widths: Sequence[int] = (6, 12, 24),
        convs_per_block: int = 2,
        loss_weights: Optional[dict[str, float]] = None,
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        self.net = SegNet(tuple(widths), convs_per_block, num_classes=len(CLASSES))
        self.loss_weights = dict(DEFAULT_LOSS_WEIGHTS if loss_weights is None else loss_weights)
        self.lr = lr
        with warnings.catch_warnings():  # DiceScore warns about its default even when `average` is given
            warnings.filterwarnings("ignore", message=".*DiceScore metric currently defaults.*")
            metrics = MetricCollection(
                {
                    "iou": BinaryJaccardIndex(),
                    "dice": DiceScore(num_classes=1, average="micro", aggregation_level="global"),
                    "acc": MulticlassAccuracy(num_classes=len(CLASSES), average="micro"),
                }
            )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.net(x)

    def distillation_losses(self, x: Tensor, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Distillation losses of this batch; none for a plain model."""
        return {}

    def combine(self, task: Mapping[str, Tensor], distill: Mapping[str, Tensor]) -> Tensor:
        """``sum(w_k * L_k)`` over the task losses (the student adds ``lambda_coef * sum(distill)``)."""
        return sum(self.loss_weights[k] * v for k, v in task.items())  # type: ignore[return-value]

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Task losses over the batch's labelled images only; distillation losses over all of them.

        A batch is ``(image, mask, class, labelled)`` (``ShapesDataModule``), or ``(image, mask, class)``, every
        image labelled.
        """
        x, mask, label = batch[:3]
        out = self(x)
        task = labelled_task_losses(out, mask, label, batch[3] if len(batch) > 3 else None)
        distill = self.distillation_losses(x, out)
        loss = self.combine(task, distill)
        logged = {f"train/loss_{k}": v.detach() for k, v in {**task, **distill}.items()}
        self.log_dict({"train/loss": loss.detach(), **logged}, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor, Tensor], metrics: MetricCollection) -> None:
        x, mask, label = batch
        out = self(x)
        pred = (out["mask"] > 0).long()
        metrics["iou"].update(pred, mask.long())
        metrics["dice"].update(pred, mask.long())
        metrics["acc"].update(out["cls"], label)
        self.log_dict(metrics, on_step=False, on_epoch=True)

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def configure_optimizers(self) -> dict:
        """Adam with a cosine decay of the learning rate over the run's epochs (a stable last epoch to compare)."""
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        epochs = self.trainer.max_epochs if self._trainer is not None and self.trainer.max_epochs else 1
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class SegmentationTeacher(SegmentationTask):
    """The teacher: a wider, deeper U-Net trained once on the task losses (``configs/segmentation_teacher.yaml``).

    Args:
        widths: channels of the two encoder levels and bottleneck.
        convs_per_block: 3x3 convolutions per block.
        loss_weights: weight of each task loss.
        lr: Adam learning rate.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 104),
        convs_per_block: int = 2,
        loss_weights: Optional[dict[str, float]] = None,
        lr: float = 3e-3,
    ) -> None:
        super().__init__(widths, convs_per_block, loss_weights, lr)
        self.save_hyperparameters()


class SegmentationStudent(DistillationModule, SegmentationTask):
    """The student: a small U-Net that learns from the labels, from the teacher, or both, as the stage says.

    Distillation losses (summed, scaled by ``lambda_coef`` by ``weighted_loss``):

    * ``mask_kd``: the student's mask logits against the teacher's probabilities, at ``mask_temperature``;
    * ``cls_kd``: the student's class logits against the teacher's (Hinton KD at ``temperature``);
    * ``hint``: the student's ``net.bottleneck`` output, through a learned ``FeatureAdapter``, against the
      teacher's ``bottleneck`` output (MSE), times ``hint_weight``.

    The teacher is only a path here: ``configure_teachers`` loads it when a stage first needs it, so a schedule
    without distillation never reads the checkpoint.

    Args:
        widths: channels of the student's two encoder levels and bottleneck.
        convs_per_block: 3x3 convolutions per block.
        loss_weights: base weight of each task loss.
        lr: Adam learning rate.
        teacher_checkpoint: the teacher's Lightning checkpoint (made by ``configs/segmentation_teacher.yaml``).
        teacher_channels: channels of the teacher's ``bottleneck`` (the adapter's output).
        temperature: softening temperature of ``cls_kd``.
        mask_temperature: softening temperature of ``mask_kd``.
        hint_weight: weight of the feature hint inside the distillation sum.
        use_distillation: base distillation flag (the seed's ``distillation.enable``), used without a schedule.
        lambda_coef: base distillation coefficient (the seed's ``distillation.lambda_coef``).
    """

    def __init__(
        self,
        widths: Sequence[int] = (6, 12, 24),
        convs_per_block: int = 2,
        loss_weights: Optional[dict[str, float]] = None,
        lr: float = 3e-3,
        teacher_checkpoint: str = TEACHER_CHECKPOINT,
        teacher_channels: int = 104,
        temperature: float = 2.0,
        mask_temperature: float = 1.0,
        hint_weight: float = 1.0,
        use_distillation: bool = False,
        lambda_coef: float = 1.0,
    ) -> None:
        super().__init__(widths, convs_per_block, loss_weights, lr)
        self.save_hyperparameters()
        self.hint_adapter = FeatureAdapter(tuple(widths)[-1], teacher_channels)
        self.teacher_checkpoint = teacher_checkpoint
        self.temperature = temperature
        self.mask_temperature = mask_temperature
        self.hint_weight = hint_weight
        self.use_distillation = use_distillation
        self.lambda_coef = lambda_coef

    def configure_teachers(self) -> dict[str, nn.Module]:
        path = Path(self.teacher_checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"the teacher checkpoint {str(path)!r} does not exist; make it with `{TEACHER_COMMAND}`"
            )
        # the teacher's architecture is in the checkpoint's hyper-parameters; its weights are under "net."
        shape = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters") or {}
        if "widths" not in shape:
            raise ValueError(f"{str(path)!r} holds no teacher hyper-parameters (`widths`); make it with "
                             f"`{TEACHER_COMMAND}`")
        teacher = SegNet(tuple(shape["widths"]), shape.get("convs_per_block", 2), num_classes=len(CLASSES))
        channels = teacher.bottleneck[0].out_channels
        if channels != self.hparams.teacher_channels:
            raise ValueError(
                f"the teacher's bottleneck has {channels} channels but `teacher_channels` is "
                f"{self.hparams.teacher_channels}; set model.init_args.teacher_channels: {channels}"
            )
        return {"teacher": load_teacher_checkpoint(teacher, path, name="teacher", prefix="net.")}

    def configure_feature_hooks(self) -> dict[str, list[str]]:
        return {"student": ["net.bottleneck"], "teacher": ["bottleneck"]}

    def distillation_losses(self, x: Tensor, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        teacher_out = self.run_teachers(x).get("teacher")
        if teacher_out is None:  # not distilling in this stage
            return {}
        # the one hooked pair of configure_feature_hooks: "net.bottleneck__teacher.bottleneck"
        (hint,) = self.feature_losses(adapters={"net.bottleneck": self.hint_adapter}).values()
        return {
            "mask_kd": mask_kd(out["mask"], teacher_out["mask"], self.mask_temperature),
            "cls_kd": logit_kd(out["cls"], teacher_out["cls"], self.temperature),
            "hint": self.hint_weight * hint,
        }

    def combine(self, task: Mapping[str, Tensor], distill: Mapping[str, Tensor]) -> Tensor:
        return self.weighted_loss(task, distill)
