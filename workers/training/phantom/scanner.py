"""The imaging chain: speckle, attenuation, TGC, gain, log compression, blur, scan conversion.

Parameters are drawn widely (domain randomisation) so a network trained only on the phantom
meets real scanners' brightness, contrast and texture inside its training distribution. Images
are scan-converted to a random convex or linear sector in a source image and mapped back with
:class:`workers.preprocess.grid.Grid`, the path real DICOM takes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from workers.preprocess.grid import Grid, GridShape, scan_convert
from workers.preprocess.sector import Sector
from workers.score.lus import ScoreConfig, frame_findings
from workers.training.phantom.scene import random_scene, render


@dataclass(frozen=True)
class Chain:
    """Imaging-chain settings of one acquisition."""

    speckle_lateral: float
    speckle_axial: float
    attenuation: float
    tgc: float
    median: float
    p99: float
    dynamic_range_db: float
    blur: float
    noise: float
    #: Lateral beam/contact profile: real cine is brighter in the middle and darker at the edges
    #: at every depth, so brightness alone must not make a scan line a B-line.
    lateral_drop: float = 0.0
    lateral_power: float = 2.0
    lateral_shift: float = 0.0
    lateral_noise: float = 0.0
    lateral_bump: float = 0.0
    lateral_seed: int = 0
    #: Scanner speckle reduction (0 = raw Rayleigh speckle, 1 = none left). Real cine is often
    #: heavily smoothed, so smooth texture must not by itself mean "artefact".
    speckle_reduction: float = 0.0
    #: How much smoother artefacts (B-lines, A-lines, pleura) are than tissue, 0 to 1.
    artefact_smoothing: float = 0.5


def random_chain(rng: np.random.Generator) -> Chain:
    return Chain(
        speckle_lateral=float(rng.uniform(0.8, 4.0)),
        # Up to vertical streaks: sparse scan lines interpolated in depth look like that in the grid.
        speckle_axial=float(rng.uniform(0.3, 1.0) if rng.random() < 0.6 else rng.uniform(1.0, 4.0)),
        attenuation=float(rng.uniform(0.5, 3.0)),
        tgc=float(rng.uniform(0.3, 1.0)),
        median=float(rng.uniform(0.03, 0.25)),
        p99=float(rng.uniform(0.35, 0.9)),
        dynamic_range_db=float(rng.uniform(35, 65)),
        blur=float(rng.uniform(0.0, 1.0)),
        noise=float(rng.uniform(0.0, 4.0)),
        lateral_drop=float(rng.uniform(0.0, 0.85)),
        lateral_power=float(rng.uniform(1.2, 4.0)),
        lateral_shift=float(rng.uniform(-0.2, 0.2)),
        lateral_noise=float(rng.uniform(0.0, 0.5)),
        lateral_bump=float(rng.uniform(0.0, 1.5) if rng.random() < 0.35 else 0.0),
        lateral_seed=int(rng.integers(0, 2**31)),
        speckle_reduction=float(rng.uniform(0.0, 0.8)),
        artefact_smoothing=float(rng.uniform(0.0, 0.6)),
    )


def lateral_profile(chain: Chain, cols: int) -> np.ndarray:
    """(cols,) amplitude factor applied at every depth (chest wall and lung alike)."""
    rng = np.random.default_rng(chain.lateral_seed)
    u = np.abs(np.linspace(-1, 1, cols) - chain.lateral_shift)
    prof = np.clip(1 - chain.lateral_drop * u**chain.lateral_power, 0.05, 1)
    wobble = gaussian_filter1d(rng.normal(0, 1, cols), rng.uniform(4, 16))
    prof = prof * np.exp(chain.lateral_noise * wobble / (wobble.std() + 1e-9))
    centre, width = rng.uniform(0.1, 0.9) * cols, rng.uniform(3, 0.2 * cols)
    return prof * (1 + chain.lateral_bump * np.exp(-0.5 * ((np.arange(cols) - centre) / width) ** 2))


def random_sector(rng: np.random.Generator, rows: int, cols: int, kind: str | None = None) -> Sector:
    """A convex fan (apex above the image, often cropped by its borders, like BLUS) or a rectangle."""
    kind = kind or ("convex" if rng.random() < 0.8 else "linear")
    mm = float(rng.uniform(0.2, 0.5))
    if kind == "linear":
        x0, x1 = rng.uniform(0, 0.15) * cols, rng.uniform(0.85, 1.0) * (cols - 1)
        y0, y1 = rng.uniform(0, 0.1) * rows, rng.uniform(0.85, 1.0) * (rows - 1)
        return Sector("linear", float(x0), float(x1), float(y0), float(y1), mm_per_pixel=mm)
    half = rng.uniform(0.35, 0.7)
    depth = rng.uniform(0.85, 1.2) * rows  # r1 - r0; > rows crops the bottom
    r0 = rng.uniform(0.25, 0.9) * depth
    apex_y = rng.uniform(-0.05, 0.12) * rows - r0
    apex_x = cols / 2 + rng.uniform(-0.03, 0.03) * cols
    return Sector.convex(float(apex_x), float(apex_y), float(r0), float(r0 + depth), -half, half, mm)


def image(amp: np.ndarray, coherent: np.ndarray, chain: Chain, rng: np.random.Generator) -> np.ndarray:
    """Amplitude map -> uint8 B-mode in the grid."""
    rows, cols = amp.shape
    re = gaussian_filter(rng.normal(size=(rows, cols)), (chain.speckle_axial, chain.speckle_lateral))
    im = gaussian_filter(rng.normal(size=(rows, cols)), (chain.speckle_axial, chain.speckle_lateral))
    speckle = np.hypot(re, im)
    speckle /= speckle.mean() + 1e-9
    smooth = chain.speckle_reduction + chain.artefact_smoothing * np.clip(coherent, 0, 1)
    speckle = 1 + (speckle - 1) * (1 - np.clip(smooth, 0, 0.9))
    depth = np.arange(rows)[:, None] / rows
    att = np.exp(-chain.attenuation * depth * (1 - chain.tgc))
    env = amp * speckle * att * lateral_profile(chain, cols)[None, :]
    db = 20 * np.log10(np.maximum(env / np.quantile(env, 0.995), 1e-6))
    y = np.clip((db + chain.dynamic_range_db) / chain.dynamic_range_db, 1e-4, 1)
    # Gain and grey map: hit the drawn median and 99th percentile (real cine is mostly dark).
    q50, q99 = np.quantile(y, [0.5, 0.99])
    yn = np.clip(y / q99, 0, None)
    gamma = math.log(chain.median / chain.p99) / math.log(max(min(q50 / q99, 0.99), 1e-3))
    img = chain.p99 * 255.0 * yn ** max(gamma, 0.2)
    if chain.blur > 0.2:
        img = gaussian_filter(img, chain.blur)
    img += rng.normal(0, chain.noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class Sample:
    """One training or test frame: grid image, grid labels and its frame score."""

    image: np.ndarray  # (rows, cols) uint8 in the working grid
    labels: np.ndarray  # (rows, cols) uint8 SegmentClass
    score: int
    scenario: str


def make_sample(
    rng: np.random.Generator, shape: GridShape = GridShape(), scenario: str | None = None
) -> Sample:
    """A phantom frame that went through scan conversion and back, as real input does."""
    scene = random_scene(rng, shape.rows, shape.cols, scenario)
    amp, lab, coh = render(scene, rng)
    img = image(amp, coh, random_chain(rng), rng)
    src = (int(rng.integers(220, 420)), int(rng.integers(220, 420)))
    sector = random_sector(rng, *src)
    cart = scan_convert(img, sector, src)
    cart_lab = scan_convert(lab, sector, src, cv2.INTER_NEAREST)
    if rng.random() < 0.5:
        cart = _jpeg(cart, int(rng.integers(60, 95)))
    grid = Grid(_jitter(sector, rng), src, shape)
    g_img = grid.to_grid(cart[None])[0]
    g_lab = grid.to_grid(cart_lab[None], cv2.INTER_NEAREST)[0]
    score = frame_findings(g_lab, grid.spacing(), cfg=ScoreConfig()).score
    return Sample(g_img, g_lab, score, scene.scenario)


@dataclass
class Cine:
    """A phantom cine in source pixels with its source-pixel labels and true sector."""

    frames: np.ndarray  # (n, rows, cols) uint8
    labels: np.ndarray  # (n, rows, cols) uint8
    sector: Sector
    scenario: str


def make_cine(
    rng: np.random.Generator,
    n_frames: int = 20,
    src: tuple[int, int] = (300, 300),
    scenario: str | None = None,
    kind: str | None = None,
    shape: GridShape = GridShape(),
) -> Cine:
    """Lung sliding: the lung and its artefacts move laterally with breathing, the wall stays."""
    scene = random_scene(rng, shape.rows, shape.cols, scenario)
    chain = random_chain(rng)
    sector = random_sector(rng, *src, kind=kind)
    amp_slide = rng.uniform(0.5, 2.5)
    frames = np.empty((n_frames, *src), np.uint8)
    labels = np.empty((n_frames, *src), np.uint8)
    for t in range(n_frames):
        slide = amp_slide * math.sin(2 * math.pi * t / max(n_frames, 8))
        amp, lab, coh = render(scene, rng, slide)
        frames[t] = scan_convert(image(amp, coh, chain, rng), sector, src)
        labels[t] = scan_convert(lab, sector, src, cv2.INTER_NEAREST)
    return Cine(frames, labels, sector, scene.scenario)


def _jitter(s: Sector, rng: np.random.Generator) -> Sector:
    """Small geometry errors, as sector detection on real images makes."""
    if s.kind == "linear":
        d = rng.normal(0, 2, 4)
        return Sector(
            "linear", s.x0 + d[0], s.x1 + d[1], s.y0 + d[2], s.y1 + d[3], mm_per_pixel=s.mm_per_pixel
        )
    dt = rng.normal(0, 0.015, 2)
    ax, ay, r0, r1 = (rng.normal(0, sd) for sd in (2, 4, 2, 3))
    return Sector.convex(
        s.apex_x + ax, s.apex_y + ay, s.r0 + r0, s.r1 + r1, s.theta0 + dt[0], s.theta1 + dt[1], s.mm_per_pixel
    )


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("L"))
