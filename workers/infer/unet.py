"""Attention U-Net (Oktay et al. 2018): a U-Net whose skip connections pass through attention gates.

The gates let the coarse decoder features decide which skip-connection pixels matter, which
suppresses the chest wall's bright layers when the decoder is looking for the pleura and its
artefacts. Kept small (base width 16, three poolings) so a 128x128 frame runs at tens of frames
per second on two CPU cores.

The weights file format lives here too (:func:`save_weights`, :func:`load_model`), so serving,
training and adaptation read and write one format and serving needs nothing from training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from service.core.segments import SegmentClass
from workers.preprocess.grid import GridShape

N_CLASSES = len(SegmentClass)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class AttentionGate(nn.Module):
    """Additive attention: a per-pixel weight in [0, 1] for the skip features ``x`` given gate ``g``."""

    def __init__(self, x_ch: int, g_ch: int, inter: int):
        super().__init__()
        self.theta = nn.Conv2d(x_ch, inter, 1, bias=False)
        self.phi = nn.Conv2d(g_ch, inter, 1, bias=True)
        self.psi = nn.Sequential(nn.Conv2d(inter, 1, 1, bias=True), nn.Sigmoid())

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.theta(x) + self.phi(g))
        return x * self.psi(a)


class Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.reduce = nn.Conv2d(cin, cskip, 1, bias=False)
        self.gate = AttentionGate(cskip, cskip, max(cskip // 2, 4))
        self.conv = _block(2 * cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        g = self.reduce(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        return self.conv(torch.cat([self.gate(skip, g), g], dim=1))


class AttentionUNet(nn.Module):
    """Input ``(n, 1, H, W)`` float in [0, 1], H and W divisible by 8; logits ``(n, n_classes, H, W)``."""

    def __init__(self, base: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        w = [base, base * 2, base * 4, base * 8]
        self.base = base
        self.n_classes = n_classes
        self.enc = nn.ModuleList([_block(1, w[0]), _block(w[0], w[1]), _block(w[1], w[2])])
        self.bottom = _block(w[2], w[3])
        self.up = nn.ModuleList([Up(w[3], w[2], w[2]), Up(w[2], w[1], w[1]), Up(w[1], w[0], w[0])])
        self.head = nn.Conv2d(w[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, skip in zip(self.up, reversed(skips), strict=True):
            x = up(x, skip)
        return self.head(x)


def save_weights(model: AttentionUNet, path: Path, shape: GridShape, classes: Sequence[str]) -> None:
    """Weights plus what rebuilding and trusting them needs: width, input grid, class names in label order."""
    if len(classes) != model.n_classes:
        raise ValueError(f"{len(classes)} class names for a network with {model.n_classes} outputs")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"state_dict": state, "base": model.base, "rows": shape.rows, "cols": shape.cols,
            "classes": list(classes)}  # fmt: skip
    torch.save(blob, path)


def load_model(
    path: Path, device: str = "cpu", classes: Sequence[str] | None = None
) -> tuple[AttentionUNet, GridShape]:
    """The network in eval mode on ``device`` and the grid it was trained on.

    The class count comes from the weights (their output layer). With ``classes`` (the names the
    caller will interpret the label values as) weights with another number of outputs, or whose file
    records other names, raise :class:`ValueError`. Files from before names were recorded carry
    only the count.
    """
    blob = torch.load(path, map_location=device, weights_only=True)
    state = blob["state_dict"]
    n_classes = int(state["head.weight"].shape[0])
    recorded = blob.get("classes")
    if recorded is not None and len(recorded) != n_classes:
        raise ValueError(f"{path.name} records {len(recorded)} classes but has {n_classes} outputs")
    if classes is not None:
        if n_classes != len(classes):
            raise ValueError(
                f"{path.name} has {n_classes} output classes, expected {len(classes)} ({', '.join(classes)})"
            )
        if recorded is not None and list(recorded) != list(classes):
            raise ValueError(f"{path.name} was trained on classes {list(recorded)}, expected {list(classes)}")
    model = AttentionUNet(int(blob["base"]), n_classes)
    model.load_state_dict(state)
    return model.to(device).eval(), GridShape(int(blob["rows"]), int(blob["cols"]))
