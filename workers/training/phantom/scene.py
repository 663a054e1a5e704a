"""Random lung anatomy in the polar B-scan grid: echo amplitude plus pixel-exact class labels.

Everything is drawn in (depth row, scan line) coordinates, the model's working grid, where
reverberation artefacts are straight: A-lines repeat the pleura at multiples of its depth, B-lines
run down whole scan lines. :mod:`workers.training.phantom.scanner` adds speckle, the imaging chain and the
scan conversion to a convex or linear probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d

from service.core.segments import SegmentClass as C

#: Scenario names and their sampling weights; balanced so every Soldati score is common.
SCENARIOS: dict[str, float] = {
    "normal": 0.24,
    "b_lines": 0.24,
    "confluent": 0.18,
    "white_lung": 0.12,
    "subpleural": 0.12,
    "lobar": 0.10,
}


@dataclass
class Scene:
    """One random lung: geometry of every structure, re-rendered per cine frame with sliding."""

    rows: int
    cols: int
    scenario: str
    pleura_row: np.ndarray  # (cols,) float: depth of the pleural line per scan line
    pleura_thick: int
    pleura_drawn: np.ndarray  # (cols,) bool: False in breaks and under ribs
    pleura_gain: float
    ribs: list[tuple[float, float, float]]  # (centre col, half width, surface row)
    a_line_gain: float
    b_lines: list[tuple[float, float, float, float]]  # (centre col, width, gain, fade depth fraction)
    consolidations: list[tuple[float, float, float, float]]  # (centre col, half width, depth rows, kind)
    effusion: tuple[float, float, float] | None  # (first col, last col, thickness rows)
    wall_layers: list[tuple[float, float, float]] = field(default_factory=list)  # (row, width, gain)
    wall_gain: float = 0.4
    lung_gain: float = 0.12
    #: Reverberation haze under a normal pleura fades with depth faster than tissue does, so
    #: "bright just below the pleura, darker deeper" must not read as consolidation.
    haze_decay: float = 0.0
    #: Muscle striations: short thin bright streaks in the chest wall, (row, first col, length, gain).
    #: Real walls are textured tissue; without it the network calls textured wall "consolidation".
    wall_streaks: list[tuple[float, float, float, float]] = field(default_factory=list)
    #: Broad soft reverberation haze in the lung, (centre col, half width, gain, decay depth fraction).
    #: It is brightest under the pleura and fades with depth, A-lines show through it, and it is
    #: background: on real scanners this is what a phantom-trained network mistook for B-lines.
    haze_bands: list[tuple[float, float, float, float]] = field(default_factory=list)


def random_scene(rng: np.random.Generator, rows: int, cols: int, scenario: str | None = None) -> Scene:
    names = list(SCENARIOS)
    if scenario is None:
        p = np.array([SCENARIOS[n] for n in names])
        scenario = str(rng.choice(names, p=p / p.sum()))
    p0 = rng.uniform(0.07, 0.3) * rows
    x = np.arange(cols)
    curve = rng.uniform(-0.15, 0.15) * rows * ((x - cols / 2) / cols) ** 2 * 4
    tilt = rng.uniform(-0.06, 0.06) * (x - cols / 2)
    wave = gaussian_filter1d(rng.normal(0, 1, cols), 12) * rng.uniform(0, 6)
    irregular = scenario in {"confluent", "white_lung", "subpleural", "lobar"} and rng.random() < 0.8
    rough = (
        gaussian_filter1d(rng.normal(0, 1, cols), rng.uniform(1, 3)) * rng.uniform(1.0, 2.5)
        if irregular
        else 0
    )
    pleura_row = np.clip(p0 + curve + tilt + wave + rough, 4, rows * 0.45)
    thick = int(rng.integers(1, 5) + (2 if irregular and rng.random() < 0.5 else 0))
    drawn = np.ones(cols, dtype=bool)
    if irregular or rng.random() < 0.1:
        for _ in range(int(rng.integers(1, 5))):
            c, w = rng.integers(0, cols), rng.integers(2, 9)
            drawn[c : c + w] = False

    ribs: list[tuple[float, float, float]] = []
    for _ in range(int(rng.choice([0, 1, 2], p=[0.35, 0.4, 0.25]))):
        cen = rng.choice([rng.uniform(-0.05, 0.25), rng.uniform(0.75, 1.05)]) * cols
        ribs.append((float(cen), float(rng.uniform(6, 18)), float(p0 - rng.uniform(1, 5))))

    b_lines: list[tuple[float, float, float, float]] = []
    cons: list[tuple[float, float, float, float]] = []
    effusion = None
    a_gain = float(rng.uniform(0.4, 1.0))
    if scenario == "b_lines":
        for _ in range(int(rng.integers(1, 4))):
            b_lines.append(_b_line(rng, cols, 3.0, 16.0))
        a_gain *= rng.uniform(0.3, 1.0)
    elif scenario == "confluent":
        b_lines.append(_b_line(rng, cols, 0.12 * cols, 0.4 * cols))
        for _ in range(int(rng.integers(0, 3))):
            b_lines.append(_b_line(rng, cols, 2.0, 6.0))
        a_gain *= rng.uniform(0.0, 0.6)
    elif scenario == "white_lung":
        b_lines.append((cols * rng.uniform(0.4, 0.6), cols * rng.uniform(0.65, 1.1), rng.uniform(0.8, 1.6),
                        rng.uniform(0.6, 1.0)))  # fmt: skip
        a_gain *= rng.uniform(0.0, 0.3)
    elif scenario == "subpleural":
        for _ in range(int(rng.integers(1, 3))):
            cons.append((rng.uniform(0.15, 0.85) * cols, rng.uniform(3, 10), rng.uniform(3, 9), 0.0))
        for _ in range(int(rng.integers(0, 4))):
            b_lines.append(_b_line(rng, cols, 2.0, 8.0))
        a_gain *= rng.uniform(0.0, 0.6)
    elif scenario == "lobar":
        cons.append(
            (rng.uniform(0.3, 0.7) * cols, rng.uniform(0.2, 0.45) * cols, rng.uniform(0.2, 0.5) * rows, 1.0)
        )
        a_gain = 0.0
    if (scenario in {"lobar", "subpleural", "white_lung"} and rng.random() < 0.35) or rng.random() < 0.04:
        first = rng.uniform(0.0, 0.4) * cols
        effusion = (
            float(first),
            float(first + rng.uniform(0.3, 0.8) * cols),
            float(rng.uniform(4, 0.25 * rows)),
        )
        a_gain = 0.0
    if scenario == "normal" and rng.random() < 0.15:
        a_gain *= 0.2  # normal lungs without visible A-lines exist (thick chest wall, low gain)

    streaks = [(float(rng.uniform(0.05, 0.97) * p0), float(rng.uniform(-0.1, 0.9) * cols),
                float(rng.uniform(0.08, 0.5) * cols), float(rng.uniform(0.2, 1.0)))
               for _ in range(int(rng.integers(0, 25)))]  # fmt: skip
    bands = [(float(rng.uniform(0.1, 0.9) * cols), float(rng.uniform(0.08, 0.3) * cols),
              float(rng.uniform(0.5, 2.5)), float(rng.uniform(0.1, 0.45)))
             for _ in range(int(rng.choice([0, 1, 2, 3], p=[0.35, 0.35, 0.2, 0.1])))]  # fmt: skip
    layers = [(float(rng.uniform(0.1, 0.95) * p0), float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.3, 1.2)))
              for _ in range(int(rng.integers(2, 7)))]  # fmt: skip
    return Scene(rows, cols, scenario, pleura_row, thick, drawn, float(rng.uniform(1.2, 2.6)), ribs,
                 a_gain, b_lines, cons, effusion, layers, float(rng.uniform(0.25, 0.55)),
                 float(rng.uniform(0.12, 0.9)), float(rng.uniform(0.0, 5.0)), streaks, bands)  # fmt: skip


def _b_line(
    rng: np.random.Generator, cols: int, wmin: float, wmax: float
) -> tuple[float, float, float, float]:
    centre = float(rng.uniform(0.08, 0.92) * cols)
    width = float(rng.uniform(wmin, wmax))
    gain = float(rng.uniform(0.4, 1.8))  # faint B-lines too: brightness alone must not decide
    return (centre, width, gain, float(rng.uniform(0.7, 1.6)))


def render(
    scene: Scene, rng: np.random.Generator, slide: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(amplitude, labels, coherent) for one frame; ``slide`` shifts the lung laterally (columns).

    ``coherent`` marks where artefacts (B-lines, A-lines, pleura) make speckle less grainy.
    """
    rows, cols = scene.rows, scene.cols
    i = np.arange(rows, dtype=np.float64)[:, None]
    j = np.arange(cols, dtype=np.float64)[None, :]
    pr = scene.pleura_row[None, :]
    amp = np.empty((rows, cols))
    lab = np.zeros((rows, cols), dtype=np.uint8)
    coherent = np.zeros((rows, cols))

    # Chest wall: soft tissue with bright fascia layers parallel to the skin.
    wall = np.full((rows, cols), scene.wall_gain)
    for row, width, gain in scene.wall_layers:
        wall += gain * np.exp(-0.5 * ((i - row - 0.3 * (pr - pr.mean())) / width) ** 2)
    for row, first, length, gain in scene.wall_streaks:
        ends = np.clip(np.minimum(j - first, first + length - j) / 4.0, 0, 1)
        wall += gain * ends * np.exp(-0.5 * ((i - row - 0.3 * (pr - pr.mean())) / 0.7) ** 2)
    wall += 0.8 * np.exp(-0.5 * (i / 1.2) ** 2)  # skin line
    above = i < pr
    haze = scene.lung_gain * np.exp(-scene.haze_decay * np.clip(i - pr, 0, None) / rows)
    for cen, half, gain, decay in scene.haze_bands:
        lateral = np.exp(-0.5 * ((j - cen) / half) ** 2)
        haze = haze + gain * scene.lung_gain * lateral * np.exp(-np.clip(i - pr, 0, None) / (decay * rows))
    amp[:] = np.where(above, wall, haze)

    # Lung: low-level haze, A-lines at multiples of the pleural depth.
    t = scene.pleura_thick
    a_mask = np.zeros((rows, cols), dtype=bool)
    if scene.a_line_gain > 0.05:
        for k in (2, 3, 4):
            a_row = k * pr
            band = (i >= a_row) & (i < a_row + t)
            gain = scene.a_line_gain * scene.pleura_gain * 0.75 ** (k - 1)
            amp += np.where(band, gain, 0.0)
            if gain > 0.35:
                a_mask |= band
    lab[a_mask] = C.A_LINE

    # B-lines: bright scan-line bands from the pleura down, erasing A-lines; they slide with the lung.
    b_label = np.zeros((rows, cols), dtype=bool)
    for cen, width, gain, fade in scene.b_lines:
        d = np.abs(j - cen - slide)
        prof = (
            np.clip(1.2 - d / max(width / 2, 0.5), 0, 1) ** 1.5
            if width > 8
            else np.exp(-0.5 * (d / (width / 2.5)) ** 2)
        )
        depth = np.clip((i - pr) / (rows * fade), 0, None)
        shape = prof * np.exp(-1.2 * depth**2) * (i > pr)
        amp = amp * (1 - 0.9 * np.clip(shape * 1.5, 0, 1) * a_mask) + gain * 2.0 * scene.lung_gain * shape
        coherent = np.maximum(coherent, shape)
        b_label |= (prof >= 0.45) & (i > pr + t - 1) & (np.exp(-1.2 * depth**2) > 0.25)
    lab[b_label] = C.B_LINE

    # Effusion thickness per scan line: consolidated lung floats beneath the fluid.
    eff_thick = np.zeros((1, cols))
    if scene.effusion is not None:
        first, last, thick = scene.effusion
        taper = np.clip(np.minimum(j - first, last - j) / 6.0, 0, 1)
        eff_thick = thick * taper

    # Consolidations: tissue-like lung under the pleura, irregular (shred) deep border.
    pr_lung = pr + eff_thick
    for cen, half, depth, kind in scene.consolidations:
        c = cen + slide * 0.5
        rel = (j - c) / half
        border = depth * np.sqrt(np.clip(1 - rel**2, 0, 1))
        border = border + gaussian_filter1d(rng.normal(0, 1, cols), 1.5)[None, :] * (1.0 + 0.1 * depth)
        inside = (i > pr_lung + t - 1) & (i < pr_lung + border) & (np.abs(rel) < 1)
        tissue = rng.uniform(0.35, 0.7)
        amp = np.where(inside, tissue, amp)
        if kind > 0 or rng.random() < 0.5:  # air bronchograms: bright specks and branches
            n = int(inside.sum() / 40)
            ys, xs = np.nonzero(inside)
            if n and ys.size:
                pick = rng.integers(0, ys.size, n)
                for y, x in zip(ys[pick], xs[pick], strict=True):
                    ln = int(rng.integers(1, 4))
                    amp[y, max(x - ln, 0) : x + ln] = rng.uniform(1.0, 2.0)
        shred = (i >= pr_lung + border) & (i < pr_lung + border + 2) & (np.abs(rel) < 1)
        amp = np.where(shred, amp + 0.8, amp)
        lab[inside] = C.CONSOLIDATION
        lab[(lab == C.A_LINE) & (np.abs(rel) < 1)] = C.BACKGROUND
        amp = np.where(inside | ~(i > pr), amp, np.where(np.abs(rel) < 1, amp * 0.5, amp))

    # Effusion: anechoic space under the parietal pleura, lung (line) beneath it.
    if scene.effusion is not None:
        first, last, _ = scene.effusion
        inside_cols = (j >= first) & (j <= last)
        bottom = pr + t + eff_thick
        eff = inside_cols & (i > pr + t - 1) & (i < bottom)
        amp = np.where(eff, 0.015, amp)
        amp = np.where(inside_cols & (i >= bottom) & (i < bottom + 2), amp + 0.9, amp)
        lab[eff] = C.EFFUSION
        lab[(lab == C.A_LINE) & inside_cols] = C.BACKGROUND

    # Pleural line on top of everything beneath it.
    pl = (i >= pr) & (i < pr + t) & scene.pleura_drawn[None, :]
    amp = np.where(pl, scene.pleura_gain * (0.8 + 0.4 * rng.random((1, cols))), amp)
    coherent = np.maximum(coherent, pl * 0.5)
    lab[pl] = C.PLEURAL_LINE

    # Ribs: bright curved surface, acoustic shadow to the bottom.
    for cen, half, surf in scene.ribs:
        rel = (j - cen) / half
        top = surf + 3.0 * rel**2
        across = np.abs(rel) < 1
        edge = np.clip((1 - np.abs(rel)) * 4, 0, 1)
        shadow = across & (i >= top)
        amp = np.where(shadow, amp * (1 - 0.93 * edge), amp)
        amp = np.where(across & (i >= top) & (i < top + 2), 1.4 * edge + amp, amp)
        lab[shadow & (edge > 0.5)] = C.RIB_SHADOW
    return amp, lab, coherent
