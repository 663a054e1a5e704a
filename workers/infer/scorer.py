"""Learned video score head: grid frames -> per-frame severity -> pooled video score (0-3).

The segmentation network is trained on the phantom only and does not see what a site's experts
see on their scanner. :class:`ScoreNet` reuses its encoder (initialised from the shipped weights)
and is fine-tuned by ``lusai adapt`` on the site's own labelled cine with video-level scores only
(multiple-instance learning). Each frame gets one severity value; a video's severity is a soft
maximum over its frames (:func:`pool`), so "the highest score present in enough frames" decides
the video, and three ordered cut-points turn severity into the Soldati score (an ordinal,
cumulative-logit head). Masks and measurements still come from the segmentation network: the
learned head replaces only the decision rule.

Only the sub-pleural part of the grid matters for the score and the deep corners of a convex fan
fall outside the image, so the head sees the top :attr:`ScorerSpec.rows` rows, with pixels
outside the imaged sector masked out of the pooling (their share varies with probe geometry, not
with the lung).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from workers.infer.predict import ort_session
from workers.infer.unet import AttentionUNet

log = logging.getLogger(__name__)

#: Weak finding labels the head also predicts (auxiliary targets derived from expert comments).
AUX_FINDINGS = ("a_lines", "b_lines", "pleura_abnormal", "consolidation", "confluent")
N_SCORES = 4


@dataclass(frozen=True)
class ScorerSpec:
    """Everything needed to rebuild and apply a trained head (stored with its weights)."""

    base: int = 16  # encoder width, as the segmentation network it starts from
    rows: int = 96  # grid rows (from the skin) the head looks at; rows and cols divisible by 8
    cols: int = 128
    pool_tau: float = 4.0  # soft-max temperature over frames (large: max, small: mean)
    #: Scale each cine so its bright echoes (99th percentile inside the sector) sit at one level:
    #: gain and preset differ between operators and scanners, the lung's pattern does not.
    normalize: bool = False
    cutpoints: tuple[float, float, float] = (-1.0, 0.0, 1.0)  # severity thresholds for scores 1, 2, 3
    aux: tuple[str, ...] = AUX_FINDINGS
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cutpoints"] = list(self.cutpoints)
        d["aux"] = list(self.aux)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> ScorerSpec:
        return ScorerSpec(
            base=int(d["base"]), rows=int(d["rows"]), cols=int(d["cols"]), pool_tau=float(d["pool_tau"]),
            normalize=bool(d.get("normalize", False)),
            cutpoints=tuple(float(c) for c in d["cutpoints"]),  # type: ignore[arg-type]
            aux=tuple(d.get("aux", AUX_FINDINGS)), extra=dict(d.get("extra", {})),
        )  # fmt: skip


def _masked_pool(x: torch.Tensor, mask: torch.Tensor, stride: int) -> torch.Tensor:
    """Mean and max of each channel over the masked pixels: ``(n, c, h, w)`` -> ``(n, 2c)``.

    ``stride`` is the feature map's downsampling of the mask (a constant, so the graph exports).
    """
    m = F.avg_pool2d(mask, stride)
    w = m / m.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    avg = (x * w).sum(dim=(-2, -1))
    mx = (x - 1e4 * (m < 0.5).to(x.dtype)).amax(dim=(-2, -1))
    return torch.cat([avg, mx], dim=1)


class ScoreNet(nn.Module):
    """Frames ``(n, 1, rows, cols)`` in [0, 1] and sector mask -> (severity ``(n,)``, aux logits)."""

    cutpoints: torch.Tensor

    def __init__(self, spec: ScorerSpec):
        super().__init__()
        w = [spec.base, spec.base * 2, spec.base * 4, spec.base * 8]
        unet = AttentionUNet(spec.base)
        self.enc = unet.enc
        self.bottom = unet.bottom
        feat = 2 * (w[2] + w[3])
        self.frame = nn.Sequential(nn.Dropout(0.3), nn.Linear(feat, 64), nn.ReLU(inplace=True))
        self.severity = nn.Linear(64, 1)
        self.findings = nn.Linear(64, len(spec.aux))
        self.register_buffer("cutpoints", torch.tensor(spec.cutpoints, dtype=torch.float32))

    def init_from_segmenter(self, unet: AttentionUNet) -> None:
        """Start from the segmentation network's encoder: its filters already know the phantom."""
        self.enc.load_state_dict(unet.enc.state_dict())
        self.bottom.load_state_dict(unet.bottom.state_dict())

    def encoder_parameters(self, first_trainable: int) -> list[nn.Parameter]:
        """Parameters of encoder stages from ``first_trainable`` on (0-2 enc blocks, 3 bottom)."""
        stages = [*self.enc, self.bottom]
        return [p for s in stages[first_trainable:] for p in s.parameters()]

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tail(self.stem(image), mask)

    def stem(self, image: torch.Tensor) -> torch.Tensor:
        """Encoder stages 1-2 (frozen by default adaptation: training runs them without a graph)."""
        h = image
        for enc in self.enc[:2]:
            h = F.max_pool2d(enc(h), 2)
        return h

    def tail(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.enc[2](h)
        deep = self.bottom(F.max_pool2d(mid, 2))
        z = self.frame(torch.cat([_masked_pool(mid, mask, 4), _masked_pool(deep, mask, 8)], dim=1))
        return self.severity(z)[:, 0], self.findings(z)


def pool(severity: torch.Tensor, tau: float, dim: int = -1) -> torch.Tensor:
    """Soft maximum over frames, independent of how many frames there are (log-mean-exp)."""
    n = severity.shape[dim]
    return (torch.logsumexp(tau * severity, dim=dim) - float(np.log(n))) / tau


def scores_from_severity(severity: np.ndarray, cutpoints: np.ndarray) -> np.ndarray:
    """Ordinal decision: the score is the number of cut-points the severity exceeds."""
    return (np.asarray(severity)[..., None] > np.sort(cutpoints)).sum(axis=-1)


#: Where :attr:`ScorerSpec.normalize` puts a cine's 99th-percentile echo (of 1.0).
BRIGHT_LEVEL = 0.8


def head_input(grid_frames: np.ndarray, valid: np.ndarray, spec: ScorerSpec) -> tuple[np.ndarray, np.ndarray]:
    """Network input (float32 ``(n, 1, rows, cols)``) and sector mask (``(1, 1, rows, cols)``)."""
    x = grid_frames[:, None, : spec.rows, : spec.cols].astype(np.float32) * (1.0 / 255.0)
    m = valid[None, None, : spec.rows, : spec.cols].astype(np.float32)
    if spec.normalize and m.any():
        bright = float(np.percentile(x[::4, 0][:, m[0, 0] > 0], 99))
        x = np.clip(x * (BRIGHT_LEVEL / max(bright, 0.05)), 0.0, 1.0)
    return x * m, m


@dataclass(frozen=True)
class ScoreOutput:
    score: int
    frame_scores: np.ndarray  # (n,) int: each frame's own ordinal score
    frame_severity: np.ndarray  # (n,) float
    severity: float  # pooled video severity
    probabilities: tuple[float, ...]  # P(score = 0..3) from the cumulative logits
    findings: dict[str, float]  # P(finding present) per auxiliary finding, pooled over frames


def save_scorer(model: ScoreNet, spec: ScorerSpec, path: Path) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "spec": json.dumps(spec.to_json())}, path)


def load_scorer(path: Path, device: str = "cpu") -> tuple[ScoreNet, ScorerSpec]:
    blob = torch.load(path, map_location=device, weights_only=True)
    spec = ScorerSpec.from_json(json.loads(blob["spec"]))
    model = ScoreNet(spec)
    model.load_state_dict(blob["state_dict"])
    spec = ScorerSpec(**{**asdict(spec), "cutpoints": tuple(model.cutpoints.tolist())})
    return model.to(device).eval(), spec


def export_scorer_onnx(weights: Path, out: Path) -> None:
    """Per-frame severity and finding logits as an ONNX graph (pooling and cut-points stay in numpy)."""
    model, spec = load_scorer(weights)
    image = torch.zeros(2, 1, spec.rows, spec.cols)
    mask = torch.ones(1, 1, spec.rows, spec.cols)
    torch.onnx.export(
        model, (image, mask), str(out), input_names=["image", "mask"],
        output_names=["severity", "findings"],
        dynamic_axes={"image": {0: "n"}, "severity": {0: "n"}, "findings": {0: "n"}},
        opset_version=17, dynamo=False,
    )  # fmt: skip


class LearnedScorer:
    """Applies a trained head to a cine; onnxruntime on CPU when the export is there, torch otherwise."""

    def __init__(self, weights: Path, onnx: Path | None = None, device: str = "cpu", batch: int = 32):
        self.model, self.spec = load_scorer(weights, device)
        self.device = device
        self.batch = batch
        use_ort = onnx is not None and onnx.exists() and device == "cpu"  # as the segmenter does
        self._ort = ort_session(onnx) if use_ort and onnx is not None else None

    def frame_outputs(self, grid_frames: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(severity ``(n,)``, finding logits ``(n, aux)``) for every frame."""
        x, m = head_input(grid_frames, valid, self.spec)
        sev, aux = [], []
        for k in range(0, len(x), self.batch):
            xb = x[k : k + self.batch]
            if self._ort is not None:
                s, a = self._ort.run(None, {"image": xb, "mask": m})
            else:
                with torch.inference_mode():
                    st, at = self.model(
                        torch.from_numpy(xb).to(self.device), torch.from_numpy(m).to(self.device)
                    )
                s, a = st.float().cpu().numpy(), at.float().cpu().numpy()
            sev.append(np.asarray(s, np.float32))
            aux.append(np.asarray(a, np.float32))
        return np.concatenate(sev), np.concatenate(aux)

    def score(self, grid_frames: np.ndarray, valid: np.ndarray) -> ScoreOutput:
        sev, aux = self.frame_outputs(grid_frames, valid)
        return summarize(sev, aux, self.spec)


def summarize(sev: np.ndarray, aux: np.ndarray, spec: ScorerSpec) -> ScoreOutput:
    """Pool frame outputs into the video decision (shared by inference and cross-validation)."""
    cut = np.sort(np.asarray(spec.cutpoints, np.float64))
    video = float(pool(torch.from_numpy(sev.astype(np.float64)), spec.pool_tau))
    above = 1.0 / (1.0 + np.exp(-(video - cut)))  # P(score >= 1, 2, 3)
    probs = -np.diff(np.concatenate([[1.0], above, [0.0]]))
    pooled_aux = pool(torch.from_numpy(aux.astype(np.float64).T), spec.pool_tau).numpy()
    return ScoreOutput(
        score=int(scores_from_severity(np.array(video), cut)),
        frame_scores=scores_from_severity(sev, cut).astype(np.int64),
        frame_severity=sev,
        severity=round(video, 4),
        probabilities=tuple(round(float(p), 4) for p in probs),
        findings={
            k: round(float(1 / (1 + np.exp(-v))), 4) for k, v in zip(spec.aux, pooled_aux, strict=True)
        },
    )
