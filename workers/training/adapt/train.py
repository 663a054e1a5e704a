"""Multiple-instance training of the score head from video-level expert scores.

A video's label says nothing about which frames show the finding, so each step samples a few
frames per video, scores every frame, pools them with a soft maximum (the 1% rule: the worst
frames decide) and applies an ordinal cumulative-logit loss to the pooled severity, plus weak
finding labels from the expert's comments as auxiliary targets. Strong intensity and geometry
augmentation stands in for the scanner and operator variation a single site's data lacks.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from workers.infer.scorer import ScoreNet, ScoreOutput, ScorerSpec, head_input, pool, summarize
from workers.infer.unet import AttentionUNet
from workers.training.adapt.data import Cine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaptConfig:
    seed: int = 0
    #: Encoder stages that stay frozen (0-2 encoder blocks, 3 the bottleneck, 4 = head only).
    #: Few hundred labelled videos support re-learning the deep, task-specific stages only.
    first_trainable: int = 2
    max_epochs: int = 30
    patience: int = 8  # epochs without a better inner-validation loss before stopping
    min_epochs: int = 8  # never stop before: the first epochs' flat predictions look "best" on noise
    #: Weights of this many consecutive epochs are averaged, and chosen by their mean validation
    #: loss: one epoch's loss on a few dozen videos is too noisy to pick a model by.
    window: int = 3
    #: Choose the stopping epoch on the inner validation patients; off: train max_epochs, keep the
    #: last window (validation is then only reported).
    early_stopping: bool = True
    normalize: bool = True  # per-cine brightness normalisation (ScorerSpec.normalize)
    #: Weight videos by the inverse frequency of their score in the training set (score 3 is rare):
    #: without it the head never gave score 3 on the dev split and two folds fell to constant scores.
    balance_classes: bool = True
    frames_per_video: int = 8  # frames sampled per video and step (the MIL bag)
    videos_per_batch: int = 8
    val_frames: int = 32  # evenly spaced frames per validation video
    lr_head: float = 3e-3
    lr_encoder: float = 1e-3
    weight_decay: float = 1e-2
    aux_weight: float = 0.3
    pool_tau: float = 4.0
    rows: int = 96
    threads: int = 2
    device: str = "cpu"


def method_config(method: str) -> AdaptConfig:
    """Named adaptation methods, compared on the dev split by patient-wise CV (docs/model-card.md):
    fine-tuning the deep encoder stages beat a head on frozen phantom features (near chance), a
    deeper fine-tune (from stage 1) and a fixed 16-epoch schedule without early stopping; brightness
    normalisation with class-balanced loss made the folds steadier and uses all four scores."""
    if method == "finetune":
        return AdaptConfig(first_trainable=2)
    if method == "head":  # frozen phantom features: measured near chance on real cine
        return AdaptConfig(first_trainable=4)
    raise ValueError(f"unknown adaptation method {method!r}")


class _Cuts(nn.Module):
    """Three ordered cut-points: the first free, the gaps kept positive (softplus)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Parameter(torch.tensor(-1.0))
        self.gaps = nn.Parameter(torch.tensor([0.5413, 0.5413]))  # softplus -> 1.0

    def forward(self) -> torch.Tensor:
        return torch.cat([self.first[None], self.first + torch.cumsum(F.softplus(self.gaps), 0)])


def ordinal_loss(
    video: torch.Tensor, cuts: torch.Tensor, score: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cumulative-logit loss: one binary 'score > k' decision per cut-point, sharing one severity;
    ``weight`` (per video) rebalances rare scores."""
    logits = video[:, None] - cuts[None, :]
    target = (score[:, None] > torch.arange(3, device=score.device)[None, :]).to(logits.dtype)
    w = None if weight is None else weight[:, None].expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits, target, weight=w)


def augment(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-video random gain, gamma, depth-gain ramp, noise, lateral flip and depth shift.

    ``x`` is ``(videos, frames, rows, cols)``, ``m`` the matching sector masks ``(videos, 1, rows, cols)``.
    """
    v, _, rows, _ = x.shape

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape or (v,), generator=gen)

    gain = u(0.7, 1.4)[:, None, None, None]
    gamma = torch.exp(u(-0.35, 0.35))[:, None, None, None]
    depth = torch.linspace(0.0, 1.0, rows)[None, None, :, None]
    ramp = 1.0 + u(-0.3, 0.3)[:, None, None, None] * depth
    noise = u(0.0, 0.04)[:, None, None, None] * torch.randn(x.shape, generator=gen)
    x = ((x.clamp_min(0.0) ** gamma) * gain * ramp + noise).clamp(0.0, 1.0)
    flip = torch.rand(v, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    m = torch.where(flip[:, None, None, None], m.flip(-1), m)
    shift = int(torch.randint(-6, 7, (1,), generator=gen))  # the pleura sits at varying depths
    if shift:
        x, m = torch.roll(x, shift, dims=2), torch.roll(m, shift, dims=2)
        edge = slice(0, shift) if shift > 0 else slice(rows + shift, rows)
        x[:, :, edge] = 0.0
        m[:, :, edge] = 0.0
    return x * m, m


@dataclass
class FitResult:
    model: ScoreNet
    spec: ScorerSpec
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)


class _Bags:
    """Grid frames of a set of cines as float tensors, cropped to the head's rows."""

    def __init__(self, cines: list[Cine], spec: ScorerSpec):
        self.x = [torch.from_numpy(head_input(c.frames, c.valid, spec)[0][:, 0]) for c in cines]
        self.m = [torch.from_numpy(head_input(c.frames[:1], c.valid, spec)[1][0]) for c in cines]
        self.y = torch.tensor([c.label.score for c in cines])
        self.aux = torch.tensor([[c.label.findings[k] for k in spec.aux] for c in cines], dtype=torch.float32)

    def sample(self, idx: list[int], k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        xs = []
        for i in idx:
            n = self.x[i].shape[0]
            pick = (
                torch.randperm(n, generator=gen)[:k] if n >= k else torch.randint(0, n, (k,), generator=gen)
            )
            xs.append(self.x[i][pick])
        return torch.stack(xs), torch.stack([self.m[i] for i in idx])

    def even(self, i: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.x[i].shape[0]
        pick = torch.from_numpy(np.linspace(0, n - 1, min(k, n)).round().astype(np.int64))
        return self.x[i][pick][None], self.m[i][None]


def _forward_bag(
    model: ScoreNet, x: torch.Tensor, m: torch.Tensor, frozen: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(videos, frames, rows, cols)`` -> per-frame severity ``(videos, frames)`` and aux logits."""
    v, k = x.shape[:2]
    flat = x.reshape(v * k, 1, *x.shape[2:])
    mask = m.repeat_interleave(k, dim=0)
    if frozen >= 2:  # the frozen stages need no graph: the largest saving of a CPU run
        with torch.no_grad():
            h = model.stem(flat)
        sev, aux = model.tail(h, mask)
    else:
        sev, aux = model(flat, mask)
    return sev.reshape(v, k), aux.reshape(v, k, -1)


def _losses(
    sev: torch.Tensor,
    aux: torch.Tensor,
    y: torch.Tensor,
    aux_y: torch.Tensor,
    cuts: torch.Tensor,
    cfg: AdaptConfig,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    video = pool(sev, cfg.pool_tau, dim=1)
    main = ordinal_loss(video, cuts, y, weight)
    known = ~torch.isnan(aux_y)
    if known.any():
        pooled = pool(aux.transpose(1, 2), cfg.pool_tau, dim=2)
        side = F.binary_cross_entropy_with_logits(pooled[known], aux_y[known])
    else:
        side = torch.zeros((), device=sev.device)
    return main, side


def fit(
    train: list[Cine],
    val: list[Cine] | None,
    segmenter: AttentionUNet,
    cfg: AdaptConfig,
    epochs: int | None = None,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train from the segmenter's encoder. With ``val``: keep the epoch of lowest validation loss and
    stop after ``patience`` epochs without improvement; without: run exactly ``epochs`` epochs."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    spec = ScorerSpec(base=segmenter.base, rows=cfg.rows, pool_tau=cfg.pool_tau, normalize=cfg.normalize)
    dev = torch.device(cfg.device)  # data and augmentation stay on the CPU: one seeded generator
    model = ScoreNet(spec)
    model.init_from_segmenter(segmenter)
    model.to(dev)
    cuts = _Cuts().to(dev)
    frozen = min(cfg.first_trainable, 4)
    for p in model.parameters():
        p.requires_grad_(False)
    enc_params = model.encoder_parameters(frozen)
    head_params = [*model.frame.parameters(), *model.severity.parameters(), *model.findings.parameters()]
    for p in [*enc_params, *head_params]:
        p.requires_grad_(True)
    groups = [{"params": head_params + list(cuts.parameters()), "lr": cfg.lr_head}]
    if enc_params:
        groups.append({"params": enc_params, "lr": cfg.lr_encoder})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    # The schedule depends on max_epochs only, so the final fit's first E epochs are the folds' E.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_epochs, eta_min=0.0)
    bags = _Bags(train, spec)
    vbags = _Bags(val, spec) if val else None
    class_w = _class_weights(bags.y) if cfg.balance_classes else None
    n_epochs = epochs if epochs is not None else cfg.max_epochs
    best: tuple[float, int, dict[str, Any]] | None = None
    recent: list[tuple[float, dict[str, Any]]] = []  # (validation loss, weights) of the last epochs
    history: list[dict[str, Any]] = []
    for epoch in range(1, n_epochs + 1):
        t0 = time.perf_counter()
        model.train()
        _freeze_norm(model, frozen)
        order = torch.randperm(len(train), generator=gen).tolist()
        total, steps = 0.0, 0
        for s in range(0, len(order), cfg.videos_per_batch):
            idx = order[s : s + cfg.videos_per_batch]
            x, m = bags.sample(idx, cfg.frames_per_video, gen)
            x, m = augment(x, m, gen)
            sev, aux = _forward_bag(model, x.to(dev), m.to(dev), frozen)
            w = None if class_w is None else class_w[bags.y[idx]].to(dev)
            main, side = _losses(sev, aux, bags.y[idx].to(dev), bags.aux[idx].to(dev), cuts(), cfg, w)
            loss = main + cfg.aux_weight * side
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(main.detach())
            steps += 1
        sched.step()
        row: dict[str, Any] = {"epoch": epoch, "loss": round(total / max(steps, 1), 4)}
        vloss = math.nan
        if vbags is not None:
            vloss, vpred = _validate(model, vbags, cuts().detach(), cfg, class_w)
            row["val_loss"] = round(vloss, 4)
            row["val_scores"] = vpred
        model.cutpoints.copy_(cuts().detach())  # the cut-points travel with the weights
        recent = [*recent, (vloss, copy.deepcopy(model.state_dict()))][-cfg.window :]
        if vbags is not None and cfg.early_stopping and len(recent) == cfg.window:
            mean_loss = float(np.mean([v for v, _ in recent]))
            row["window_val_loss"] = round(mean_loss, 4)
            if best is None or mean_loss < best[0] - 1e-4:
                best = (mean_loss, epoch, _average([w for _, w in recent]))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        history.append(row)
        if progress is not None:
            progress(epoch, row)
        if best is not None and epoch >= cfg.min_epochs and epoch - best[1] >= cfg.patience:
            break
    if best is not None:
        model.load_state_dict(best[2])
        best_epoch = best[1]
    else:  # no validation: the last window, as the folds' chosen models were
        model.load_state_dict(_average([w for _, w in recent]))
        best_epoch = n_epochs
    c1, c2, c3 = (float(c) for c in model.cutpoints.tolist())
    spec = dataclasses.replace(spec, cutpoints=(c1, c2, c3))
    return FitResult(model.eval(), spec, best_epoch, history)


def _average(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of floating-point weights and statistics over epochs; counters from the last epoch."""
    out = {}
    for key, last in states[-1].items():
        out[key] = torch.stack([s[key] for s in states]).mean(0) if last.is_floating_point() else last
    return out


def _freeze_norm(model: ScoreNet, frozen: int) -> None:
    """Frozen stages keep their batch-norm statistics (eval mode) while the rest trains."""
    stages = [*model.enc, model.bottom]
    for s in stages[:frozen]:
        s.eval()


def _class_weights(y: torch.Tensor) -> torch.Tensor:
    """Per-score weights, inverse to the score's frequency, averaging 1 over the training videos."""
    counts = torch.bincount(y, minlength=4).clamp_min(1).float()
    w = 1.0 / counts
    return w / (w[y].mean())


def _validate(
    model: ScoreNet, bags: _Bags, cuts: torch.Tensor, cfg: AdaptConfig, class_w: torch.Tensor | None = None
) -> tuple[float, list[int]]:
    model.eval()
    dev = cuts.device
    sevs = []
    with torch.no_grad():
        for i in range(len(bags.x)):
            x, m = bags.even(i, cfg.val_frames)
            sev, _ = _forward_bag(model, x.to(dev), m.to(dev), 4)
            sevs.append(pool(sev, cfg.pool_tau, dim=1))
    video = torch.cat(sevs)
    w = None if class_w is None else class_w[bags.y].to(dev)  # the training set's weights
    loss = float(ordinal_loss(video, cuts, bags.y.to(dev), w))
    pred = (video[:, None] > cuts[None, :]).sum(1).tolist()
    return loss, [int(p) for p in pred]


def score_cine(model: ScoreNet, spec: ScorerSpec, cine: Cine, batch: int = 64) -> ScoreOutput:
    """The deployed decision on every frame of a cine (as :class:`LearnedScorer` makes it)."""
    x, m = head_input(cine.frames, cine.valid, spec)
    sev, aux = [], []
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        mt = torch.from_numpy(m).to(dev)
        for k in range(0, len(x), batch):
            s, a = model(torch.from_numpy(x[k : k + batch]).to(dev), mt)
            sev.append(s.cpu().numpy())
            aux.append(a.cpu().numpy())
    return summarize(np.concatenate(sev), np.concatenate(aux), spec)
