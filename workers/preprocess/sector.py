"""Find the imaging sector (convex fan or linear rectangle) and the pixel spacing of a cine.

Scanners burn text, logos and rulers around the image. Those are static, while the sector's
speckle changes from frame to frame, so the sector is the largest region that is both bright
enough on average and temporally variable. SequenceOfUltrasoundRegions, when it describes a
region smaller than the image, bounds the search and supplies the physical pixel spacing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import pydicom

from service.core.dicom import ultrasound_region
from workers.preprocess.errors import InputError

log = logging.getLogger(__name__)

#: Used when the dataset states no spacing: a 350-pixel-deep lung preset is about 16 cm.
DEFAULT_MM_PER_PIXEL = 0.457


@dataclass(frozen=True)
class Sector:
    """Imaging geometry in source pixels.

    Convex: ``apex`` is the virtual centre of the fan (often above the image), ``r0``/``r1`` the
    skin and deepest radii, ``theta0``/``theta1`` the outer scan-line angles from the vertical
    (radians, positive to the right). Linear: ``x0..x1`` columns and ``y0..y1`` rows.
    """

    kind: Literal["convex", "linear"]
    x0: float
    x1: float
    y0: float
    y1: float
    apex_x: float = 0.0
    apex_y: float = 0.0
    r0: float = 0.0
    r1: float = 0.0
    theta0: float = 0.0
    theta1: float = 0.0
    mm_per_pixel: float = DEFAULT_MM_PER_PIXEL

    @staticmethod
    def convex(
        apex_x: float, apex_y: float, r0: float, r1: float, theta0: float, theta1: float, mm: float
    ) -> Sector:
        xs = [apex_x + r * math.sin(t) for r in (r0, r1) for t in (theta0, theta1)]
        return Sector(
            "convex", min(xs), max(xs), apex_y + r0 * math.cos(max(abs(theta0), abs(theta1))),
            apex_y + r1, apex_x, apex_y, r0, r1, theta0, theta1, mm,
        )  # fmt: skip


def detect_sector(frames: np.ndarray, ds: pydicom.Dataset | None = None) -> Sector:
    """Sector of ``frames`` ``(n, rows, cols)`` uint8; raises :class:`InputError` if none is found."""
    _, rows, cols = frames.shape
    mm, box = _region_info(ds, rows, cols)
    mask = _sector_mask(frames, box)
    if mask.sum() < 0.05 * rows * cols:
        raise InputError("no imaging sector found")
    sector = _fit_geometry(mask, mm)
    log.debug("sector %s", sector)
    return sector


def _region_info(ds: pydicom.Dataset | None, rows: int, cols: int) -> tuple[float, tuple[int, int, int, int]]:
    """(mm per pixel, (x0, y0, x1, y1) search box) from the ultrasound region the SEG's pixel
    spacing also comes from (:func:`service.core.dicom.ultrasound_region`), if any.

    The sector is fitted with one scale: the column spacing, as in the SEG's Pixel Spacing[1].
    """
    region = ultrasound_region(ds)
    if region is None:
        box = (0, 0, cols - 1, rows - 1)
        mm = float(ds.PixelSpacing[0]) if ds is not None and "PixelSpacing" in ds else DEFAULT_MM_PER_PIXEL
        return mm, box
    box = (max(0, region.x0), max(0, region.y0), min(cols - 1, region.x1), min(rows - 1, region.y1))
    return (DEFAULT_MM_PER_PIXEL if region.spacing_mm is None else region.spacing_mm[1]), box


def _sector_mask(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    n, rows, cols = frames.shape
    # The brightest value over time reaches above the noise floor even in rib shadows.
    mask = cv2.blur(frames.max(axis=0), (5, 5)) > 2
    if n >= 3:
        step = max(1, n // 16)  # 16 frames show what is static as well as 100, 6x cheaper
        std = cv2.blur(frames[::step].astype(np.float32).std(axis=0), (7, 7))
        mask &= std > 0.5  # burned-in text and UI do not change between frames
    x0, y0, x1, y1 = box
    inside = np.zeros_like(mask)
    inside[y0 : y1 + 1, x0 : x1 + 1] = True
    mask &= inside
    u8 = mask.astype(np.uint8)
    u8 = cv2.morphologyEx(u8, cv2.MORPH_OPEN, np.ones((9, 9), np.uint8))  # drops thin text strokes
    count, lab, stats, _ = cv2.connectedComponentsWithStats(u8, connectivity=8)
    if count <= 1:
        return np.zeros_like(mask)
    big = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    # Fans and rectangles are convex: the hull bridges dark rib shadows that reach the edge.
    hull = cv2.convexHull(cv2.findNonZero((lab == big).astype(np.uint8)))
    out = np.zeros((rows, cols), np.uint8)
    cv2.fillConvexPoly(out, hull, 1)
    return out.astype(bool)


def _fit_geometry(mask: np.ndarray, mm: float) -> Sector:
    """Straight side edges meeting above the image make a convex fan, parallel ones a rectangle."""
    cols = mask.shape[1]
    ys = np.nonzero(mask.any(axis=1))[0]
    xs = np.nonzero(mask.any(axis=0))[0]
    top, bottom = int(ys[0]), int(ys[-1])
    lin = Sector("linear", float(xs[0]), float(xs[-1]), float(top), float(bottom), mm_per_pixel=mm)
    # Side edges from the upper 40% of the sector, where the near field is bright enough to show
    # them (deep dark lung and the bottom arc bend the outline inwards), skipping rows where the
    # image border cuts the sector.
    r = np.arange(top + 2, top + int(0.4 * (bottom - top)))
    left = np.argmax(mask[r], axis=1).astype(np.float64)
    right = (cols - 1 - np.argmax(mask[r, ::-1], axis=1)).astype(np.float64)
    has = mask[r].any(axis=1)
    lok = has & (left > 1)
    rok = has & (right < cols - 2)
    if lok.sum() < 8 or rok.sum() < 8:
        return lin  # sides hidden by the image border: treat as rectangle
    al, bl = _robust_line(r[lok], left[lok])
    ar, br = _robust_line(r[rok], right[rok])
    if (abs(al) < 0.03 and abs(ar) < 0.03) or al >= ar - 0.02:
        return Sector("linear", float(np.median(left[lok])), float(np.median(right[rok])), float(top),
                      float(bottom), mm_per_pixel=mm)  # fmt: skip
    if abs(al + ar) > 0.08:
        # Unsteered convex fans are symmetric; a side that looks steeper than its twin is one
        # where dark lung or poor contact hides the edge. Keep the wider side, mirror it about
        # the sector's centre column.
        a, b = (al, bl) if abs(al) > abs(ar) else (ar, br)
        apex_x = (xs[0] + xs[-1]) / 2.0
        apex_y = (apex_x - b) / a
        al, ar = -abs(a), abs(a)
    else:
        apex_y = (br - bl) / (al - ar)
        apex_x = al * apex_y + bl
    py, px = np.nonzero(mask)
    radii = np.hypot(px - apex_x, py - apex_y)
    r0, r1 = (float(v) for v in np.percentile(radii, [0.2, 99.8]))
    if not r1 > r0 + 10:
        return lin
    return Sector.convex(float(apex_x), float(apex_y), r0, r1, float(np.arctan(al)), float(np.arctan(ar)), mm)


def _robust_line(y: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """x = a*y + b, refitted without points more than 2 px off the first fit."""
    a, b = np.polyfit(y, x, 1)
    keep = np.abs(x - (a * y + b)) < 2.0
    if keep.sum() >= 8:
        a, b = np.polyfit(y[keep], x[keep], 1)
    return float(a), float(b)
