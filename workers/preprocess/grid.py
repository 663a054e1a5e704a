"""Map source frames to the model's polar working grid and class maps back to source pixels.

The working grid is a B-scan in (depth row, scan line) coordinates, as in Muñoz et al.: a convex
fan is unwarped so that every column is one scan line. B-lines, which follow scan lines from the
pleura to the bottom, become vertical columns, and "percentage of the pleura covered by B-lines"
is a column count. Linear probes map the same way with straight scan lines, so one model and one
scoring rule serve both probe kinds.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from workers.preprocess.sector import Sector
from workers.score.lus import GridSpacing


@dataclass(frozen=True)
class GridShape:
    rows: int = 128  # depth samples, skin to deepest
    cols: int = 128  # scan lines, left to right


class Grid:
    """Precomputed forward (source -> grid) and inverse (grid -> source) lookups for one sector."""

    def __init__(self, sector: Sector, src_shape: tuple[int, int], shape: GridShape = GridShape()):
        self.sector = sector
        self.shape = shape
        self.src_shape = src_shape
        gy, gx = _grid_to_source(sector, shape)
        self._map_x = gx.astype(np.float32)
        self._map_y = gy.astype(np.float32)
        self._inverse = _source_to_grid_index(sector, shape, src_shape)
        inv = self._inverse.reshape(src_shape)
        self._inv_x = np.where(inv >= 0, inv % shape.cols, -1).astype(np.float32)
        self._inv_y = np.where(inv >= 0, inv // shape.cols, -1).astype(np.float32)

    def spacing(self) -> GridSpacing:
        """Physical size of grid cells, so scores are in millimetres whatever the probe."""
        s, mm = self.sector, self.sector.mm_per_pixel
        d, n = self.shape.rows, self.shape.cols
        if s.kind == "convex":
            row_mm = (s.r1 - s.r0) / (d - 1) * mm
            radii = s.r0 + (s.r1 - s.r0) * np.arange(d) / (d - 1)
            col_mm = radii * abs(s.theta1 - s.theta0) / (n - 1) * mm
        else:
            row_mm = (s.y1 - s.y0) / (d - 1) * mm
            col_mm = np.full(d, (s.x1 - s.x0) / (n - 1) * mm)
        return GridSpacing(row_mm=float(row_mm), col_mm=col_mm.astype(np.float64))

    def valid_mask(self) -> np.ndarray:
        """``(rows, cols)`` bool: grid cells whose source lies inside the image.

        A convex fan's deep corners often fall outside the stored image and read as black; how much
        depends on the probe and preset, not the lung, so learned scoring pools only valid cells.
        """
        ones = np.full((1, *self.src_shape), 255, np.uint8)
        return self.to_grid(ones)[0] > 127

    def to_grid(self, frames: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """``(n, rows, cols)`` source frames -> ``(n, grid rows, grid cols)`` of the same dtype."""
        out = np.empty((frames.shape[0], self.shape.rows, self.shape.cols), dtype=frames.dtype)
        for i, f in enumerate(frames):
            out[i] = cv2.remap(f, self._map_x, self._map_y, interpolation, borderValue=0)
        return out

    def to_source(self, grid_maps: np.ndarray) -> np.ndarray:
        """``(n, grid rows, grid cols)`` class maps -> source pixel grid; outside the sector is 0."""
        n = grid_maps.shape[0]
        if grid_maps.dtype == np.uint8:  # class maps: cv2's nearest lookup is ~5x faster than numpy
            out8 = np.empty((n, *self.src_shape), np.uint8)
            for k, g in enumerate(grid_maps):
                out8[k] = cv2.remap(g, self._inv_x, self._inv_y, cv2.INTER_NEAREST, borderValue=0)
            return out8
        flat = grid_maps.reshape(n, -1)
        idx = self._inverse
        out = np.where(idx >= 0, flat[:, np.maximum(idx, 0)], 0).astype(grid_maps.dtype)
        return out.reshape(n, *self.src_shape)


def _grid_to_source(sector: Sector, shape: GridShape) -> tuple[np.ndarray, np.ndarray]:
    """Source (y, x) of every grid cell centre."""
    fi = np.arange(shape.rows)[:, None] / (shape.rows - 1)
    fj = np.arange(shape.cols)[None, :] / (shape.cols - 1)
    if sector.kind == "convex":
        r = sector.r0 + (sector.r1 - sector.r0) * fi
        t = sector.theta0 + (sector.theta1 - sector.theta0) * fj
        return sector.apex_y + r * np.cos(t), sector.apex_x + r * np.sin(t)
    y = sector.y0 + (sector.y1 - sector.y0) * fi + 0 * fj
    x = sector.x0 + (sector.x1 - sector.x0) * fj + 0 * fi
    return y, x


def _grid_fractions(sector: Sector, src_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Where each source pixel falls in the grid, as fractions of its depth (rows) and width (cols):
    0..1 inside the sector. The one inverse of the unwarping, for scan conversion and indexing."""
    yy, xx = np.mgrid[0 : src_shape[0], 0 : src_shape[1]].astype(np.float64)
    if sector.kind == "convex":
        fi = (np.hypot(yy - sector.apex_y, xx - sector.apex_x) - sector.r0) / (sector.r1 - sector.r0)
        fj = (np.arctan2(xx - sector.apex_x, yy - sector.apex_y) - sector.theta0) / (
            sector.theta1 - sector.theta0
        )
    else:
        fi = (yy - sector.y0) / max(sector.y1 - sector.y0, 1e-6)
        fj = (xx - sector.x0) / max(sector.x1 - sector.x0, 1e-6)
    return fi, fj


def _source_to_grid_index(sector: Sector, shape: GridShape, src_shape: tuple[int, int]) -> np.ndarray:
    """Flat grid index of the cell nearest to each source pixel, -1 outside the sector."""
    fi, fj = _grid_fractions(sector, src_shape)
    i = np.rint(fi * (shape.rows - 1)).astype(np.int64)
    j = np.rint(fj * (shape.cols - 1)).astype(np.int64)
    ok = (i >= 0) & (i < shape.rows) & (j >= 0) & (j < shape.cols)
    return np.where(ok, i * shape.cols + j, -1).ravel()


def scan_convert(
    grid_img: np.ndarray, sector: Sector, src_shape: tuple[int, int], interpolation: int = cv2.INTER_LINEAR
) -> np.ndarray:
    """Render a grid image ``(grid rows, grid cols)`` into source pixels, as a scanner would."""
    rows, cols = grid_img.shape
    fi, fj = _grid_fractions(sector, src_shape)
    my = (fi * (rows - 1)).astype(np.float32)
    mx = (fj * (cols - 1)).astype(np.float32)
    return cv2.remap(grid_img, mx, my, interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
