"""Decode every frame of a DICOM ultrasound image to grayscale uint8 ``(frames, rows, cols)``.

Ultrasound is gray-scale in the lung, so only luminance is kept. JPEG Baseline frames are decoded
with Pillow in luminance-only draft mode: libjpeg then skips the chroma planes and the YBR->RGB
conversion, which is what makes pydicom's generic path 5-7x slower on colour cine.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

from workers.preprocess.errors import InputError

log = logging.getLogger(__name__)

_RAW_SYNTAXES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian}
_PILLOW_SYNTAXES = {JPEGBaseline8Bit, JPEGExtended12Bit}
#: ITU-R BT.601 luma weights, the Y of YBR_FULL.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def frame_rate(ds: pydicom.Dataset) -> float | None:
    """Acquisition frame rate (frames/s) from FrameTime, CineRate or FrameTimeVector, if stated."""
    try:
        if "FrameTime" in ds and float(ds.FrameTime) > 0:
            return 1000.0 / float(ds.FrameTime)
        if "CineRate" in ds and float(ds.CineRate) > 0:
            return float(ds.CineRate)
        vector = [float(t) for t in ds.get("FrameTimeVector", [])[1:]]
        if vector and min(vector) > 0:
            return 1000.0 / float(np.median(vector))
    except (TypeError, ValueError):
        pass
    return None


def decode_frames(ds: pydicom.Dataset, indices: Sequence[int] | None = None) -> np.ndarray:
    """All frames, or the 0-based ``indices`` in that order, as ``(frames, rows, cols)`` uint8
    luminance; raises :class:`InputError`. JPEG frames not asked for are not decoded."""
    if "PixelData" not in ds:
        raise InputError("dataset has no pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    n = int(ds.NumberOfFrames) if ds.get("NumberOfFrames") not in (None, "") else 1
    if rows <= 0 or cols <= 0 or n <= 0:
        raise InputError(f"invalid image size {n}x{rows}x{cols}")
    meta = getattr(ds, "file_meta", None)
    syntax = (meta.get("TransferSyntaxUID") if meta is not None else None) or ExplicitVRLittleEndian
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if indices is not None and any(not 0 <= i < n for i in indices):
        raise InputError(f"frame index outside 0..{n - 1}")
    try:
        if syntax in _PILLOW_SYNTAXES and int(ds.get("BitsAllocated", 8)) == 8:
            frames = _decode_jpeg_pillow(ds, n, rows, cols, indices)
        else:
            if syntax in _RAW_SYNTAXES:
                frames = _decode_raw(ds, n, rows, cols, photometric)
            else:
                frames = _decode_pydicom(ds, n, photometric)
            if frames.shape != (n, rows, cols):
                raise InputError(f"decoded {frames.shape} does not match {n}x{rows}x{cols}")
            if indices is not None:
                frames = frames[list(indices)]
    except InputError:
        raise
    except Exception as exc:  # any codec failure means the input is unusable
        log.warning("pixel decoding failed: %s", type(exc).__name__)
        raise InputError(f"pixel data could not be decoded ({type(exc).__name__})") from exc
    if photometric == "MONOCHROME1":
        frames = 255 - frames
    expected = (n if indices is None else len(indices), rows, cols)
    if frames.shape != expected:
        raise InputError(f"decoded {frames.shape} does not match {n}x{rows}x{cols}")
    return np.ascontiguousarray(frames)


def _decode_jpeg_pillow(
    ds: pydicom.Dataset, n: int, rows: int, cols: int, indices: Sequence[int] | None = None
) -> np.ndarray:
    """Every fragment is walked (the count must match NumberOfFrames); only the frames asked for
    are decoded, into their place in ``indices``."""
    slots: dict[int, list[int]] = {}
    for k, f in enumerate(range(n) if indices is None else indices):
        slots.setdefault(int(f), []).append(k)
    out = np.empty((n if indices is None else len(indices), rows, cols), dtype=np.uint8)
    i = -1
    for i, fragment in enumerate(generate_frames(ds.PixelData, number_of_frames=n)):
        if i >= n:
            raise InputError("more encapsulated frames than NumberOfFrames")
        if i not in slots:
            continue
        img = Image.open(io.BytesIO(fragment))
        img.draft("L", (cols, rows))  # luminance only: skips chroma upsampling and colour conversion
        gray = img if img.mode == "L" else img.convert("L")
        if gray.size != (cols, rows):
            raise InputError("frame size differs from Rows/Columns")
        for k in slots[i]:
            out[k] = np.asarray(gray)
    if i + 1 != n:
        raise InputError(f"{i + 1} encapsulated frames for NumberOfFrames {n}")
    return out


def _decode_raw(ds: pydicom.Dataset, n: int, rows: int, cols: int, photometric: str) -> np.ndarray:
    bits = int(ds.get("BitsAllocated", 8))
    spp = int(ds.get("SamplesPerPixel", 1))
    if bits != 8 or photometric.startswith("PALETTE") or photometric in {"YBR_FULL_422"}:
        return _decode_pydicom(ds, n, photometric)
    data = np.frombuffer(ds.PixelData, dtype=np.uint8)
    need = n * rows * cols * spp
    if data.size < need:
        raise InputError(f"pixel data holds {data.size} bytes, {need} expected")
    data = data[:need]
    if spp == 1:
        return data.reshape(n, rows, cols)
    if spp != 3:
        raise InputError(f"unsupported SamplesPerPixel {spp}")
    if int(ds.get("PlanarConfiguration", 0)) == 1:
        planes = data.reshape(n, 3, rows, cols)
        return _to_gray(np.moveaxis(planes, 1, -1), photometric)
    return _to_gray(data.reshape(n, rows, cols, 3), photometric)


def _decode_pydicom(ds: pydicom.Dataset, n: int, photometric: str) -> np.ndarray:
    """Any other syntax through pydicom's plugins (pylibjpeg, openjpeg, rle); returns RGB for colour."""
    arr = ds.pixel_array
    if photometric.startswith("PALETTE"):
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        photometric = "RGB"
    spp = 3 if arr.ndim == (4 if n > 1 else 3) and arr.shape[-1] == 3 else 1
    if n == 1:
        arr = arr[None]
    if spp == 3:
        # pydicom converts YBR to RGB by default, so the samples are RGB here.
        arr = _to_gray(arr, "RGB")
    if arr.dtype != np.uint8:
        stored = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
        arr = np.clip(arr.astype(np.int64) >> max(stored - 8, 0), 0, 255).astype(np.uint8)
    return np.asarray(arr, dtype=np.uint8)


def _to_gray(rgb: np.ndarray, photometric: str) -> np.ndarray:
    if photometric.startswith("YBR"):
        return np.ascontiguousarray(rgb[..., 0])  # Y is the luminance already
    if rgb.dtype != np.uint8:
        rgb = rgb.astype(np.float32)
    gray = rgb @ _LUMA
    return np.clip(gray + 0.5, 0, 255).astype(np.uint8)
