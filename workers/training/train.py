"""Train the Attention U-Net on phantom frames only; reproducible from a seed.

Every sample comes from :mod:`workers.training.phantom` with its pixel-exact labels; real cine (BLUS) is
never used for weights, only for calibrating score thresholds afterwards. The run writes the best
weights (by mean held-out Dice), an ONNX export and a metrics JSON with per-epoch Dice per class.
The weights file format and its loader belong to serving (:mod:`workers.infer.unet`); training
only writes it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn import functional as F

from service.core.model_package import class_names, file_sha256
from service.core.segments import SegmentClass
from workers.infer.unet import N_CLASSES, AttentionUNet, load_model, save_weights
from workers.preprocess.grid import GridShape
from workers.training.phantom import make_sample

log = logging.getLogger(__name__)

WEIGHTS_NAME = "lus_unet.pt"
ONNX_NAME = "lus_unet.onnx"
METRICS_NAME = "metrics.json"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 3
    samples: int = 5000
    val_samples: int = 300
    batch: int = 16
    lr: float = 3e-3
    base: int = 16
    rows: int = GridShape().rows
    cols: int = GridShape().cols
    device: str = "cpu"
    threads: int = 2


def phantom_set(n: int, seed: int, shape: GridShape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (n,H,W), labels uint8 (n,H,W), scores int (n,)) from one seeded generator."""
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, shape.rows, shape.cols), np.uint8)
    labs = np.empty_like(imgs)
    scores = np.empty(n, np.int64)
    for k in range(n):
        s = make_sample(rng, shape)
        imgs[k], labs[k], scores[k] = s.image, s.labels, s.score
    return imgs, labs, scores


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int = N_CLASSES) -> dict[str, float]:
    """Dice over the whole set per class (NaN-free: a class absent from both counts as 1)."""
    out = {}
    for c in range(n_classes):
        p, t = pred == c, truth == c
        denom = p.sum() + t.sum()
        out[SegmentClass(c).name.lower()] = float(2 * (p & t).sum() / denom) if denom else 1.0
    return out


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse square-root frequency, so thin pleura and A-lines are not drowned by background."""
    freq = np.bincount(labels.ravel(), minlength=N_CLASSES).astype(np.float64) + 1.0
    w = 1.0 / np.sqrt(freq / freq.sum())
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def loss_fn(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits, target, weight=weights)
    prob = logits.softmax(1)
    onehot = F.one_hot(target, N_CLASSES).permute(0, 3, 1, 2).float()
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = 1 - (2 * inter + 1) / (denom + 1)
    return ce + dice[1:].mean()


def train(cfg: TrainConfig, out_dir: Path) -> dict[str, object]:
    """Run training; returns the metrics dict also written to ``out_dir/metrics.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device(cfg.device)
    shape = GridShape(cfg.rows, cfg.cols)
    t0 = time.perf_counter()
    with _progress() as prog:
        task = prog.add_task("phantom", total=None)
        x_tr, y_tr, _ = phantom_set(cfg.samples, cfg.seed, shape)
        x_va, y_va, _ = phantom_set(cfg.val_samples, cfg.seed + 1_000_003, shape)
        prog.update(task, completed=1, total=1)
    log.info(
        "generated %d + %d phantom frames in %.0f s", cfg.samples, cfg.val_samples, time.perf_counter() - t0
    )

    model = AttentionUNet(cfg.base).to(device)
    weights = class_weights(y_tr).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * ((cfg.samples + cfg.batch - 1) // cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.15)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, object]] = []
    best = -1.0
    with _progress() as prog:
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.randperm(cfg.samples, generator=gen).numpy()
            flips = torch.rand(cfg.samples, generator=gen).numpy() < 0.5
            task = prog.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(order))
            total = 0.0
            for k in range(0, len(order), cfg.batch):
                idx = order[k : k + cfg.batch]
                xb = np.where(flips[idx, None, None], x_tr[idx, :, ::-1], x_tr[idx])
                yb = np.where(flips[idx, None, None], y_tr[idx, :, ::-1], y_tr[idx])
                x = torch.from_numpy(xb[:, None].astype(np.float32) / 255.0).to(device)
                y = torch.from_numpy(yb.astype(np.int64)).to(device)
                loss = loss_fn(model(x), y, weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                prog.update(task, advance=len(idx))
            dice = dice_per_class(_predict(model, x_va, device), y_va)
            mean = float(np.mean([v for k, v in dice.items() if k != "background"]))
            row = {"epoch": epoch + 1, "loss": total / cfg.samples, "val_dice": dice, "val_mean_dice": mean,
                   "elapsed_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
            history.append(row)
            log.info("epoch %d loss %.4f mean dice %.3f", epoch + 1, row["loss"], mean)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1},
                       out_dir / "checkpoint.pt")  # fmt: skip
            if mean > best:
                best = mean
                save_weights(model, out_dir / WEIGHTS_NAME, shape, class_names())
    export_onnx(out_dir / WEIGHTS_NAME, out_dir / ONNX_NAME)
    metrics = {
        "config": asdict(cfg),
        "history": history,
        "best_val_mean_dice": best,
        "best_val_dice": max(history, key=lambda r: r["val_mean_dice"])["val_dice"],  # type: ignore[arg-type,return-value]
        "weights_sha256": file_sha256(out_dir / WEIGHTS_NAME),
        "onnx_sha256": file_sha256(out_dir / ONNX_NAME),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    (out_dir / METRICS_NAME).write_text(json.dumps(metrics, indent=2))
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)
    return metrics


def export_onnx(weights: Path, out: Path) -> None:
    """Dynamic batch ONNX for onnxruntime on CPU (faster than eager torch there)."""
    model, shape = load_model(weights)
    dummy = torch.zeros(1, 1, shape.rows, shape.cols)
    torch.onnx.export(
        model, (dummy,), str(out), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False,
    )  # fmt: skip


def _predict(model: AttentionUNet, x: np.ndarray, device: torch.device, batch: int = 32) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for k in range(0, len(x), batch):
            t = torch.from_numpy(x[k : k + batch, None].astype(np.float32) / 255.0).to(device)
            out.append(model(t).argmax(1).cpu().numpy().astype(np.uint8))
    return np.concatenate(out)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    )
