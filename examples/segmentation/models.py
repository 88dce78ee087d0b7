"""The networks: a U-Net-like encoder-decoder with a mask head, a class head and an IoU-prediction head.

The teacher and the student are the same architecture at different widths and depths (the teacher has at least
10x the parameters). Both bring their deepest features to 1/4 of the input size in a submodule named
``bottleneck``, which is where the feature hint is taken.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _block(c_in: int, c_out: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SegNet(nn.Module):
    """Encoder (two downsamplings), ``bottleneck`` at 1/4 resolution, decoder with skip connections, three heads.

    Args:
        widths: channels of the two encoder levels and of the bottleneck, e.g. ``(8, 16, 32)``.
        convs_per_block: 3x3 convolutions per block.
        num_classes: image classes.

    ``forward(x)`` returns ``{"mask": (N, 1, H, W) logits, "cls": (N, num_classes) logits, "iou": (N,) in [0, 1]}``.
    """

    def __init__(self, widths: Sequence[int] = (8, 16, 32), convs_per_block: int = 1, num_classes: int = 5) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.enc1 = _block(3, w1, convs_per_block)
        self.enc2 = _block(w1, w2, convs_per_block)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(w2, w3, convs_per_block)
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = _block(2 * w2, w2, convs_per_block)
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec1 = _block(2 * w1, w1, convs_per_block)
        self.mask_head = nn.Conv2d(w1, 1, 1)
        self.cls_head = nn.Linear(w3, num_classes)
        self.iou_head = nn.Sequential(nn.Linear(w3 + w1 + 1, 16), nn.ReLU(inplace=True), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        mask = self.mask_head(d1)
        pooled = b.mean(dim=(2, 3))
        area = torch.sigmoid(mask).mean(dim=(1, 2, 3))[:, None]
        iou = torch.sigmoid(self.iou_head(torch.cat([pooled, d1.mean(dim=(2, 3)), area], dim=1)))[:, 0]
        return {"mask": mask, "cls": self.cls_head(pooled), "iou": iou}


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
