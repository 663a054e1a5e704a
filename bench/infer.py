"""Throughput of the model alone and of the whole analyze path (decode -> score), as JSON.

    python bench/infer.py [--frames 100] [--repeats 3] [--threads 2]

The cine is a phantom scan-converted to 350x350 (the BLUS/Lumify size), once uncompressed
MONOCHROME2 and once JPEG Baseline YBR_FULL_422 as most scanners export cine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pydicom
import torch
from pydicom.dataset import FileMetaDataset


def _jpeg_dataset(ds: pydicom.Dataset, frames: np.ndarray) -> pydicom.Dataset:
    from workers.preprocess.wrap import encode_jpeg_ybr422

    out = ds.copy()
    out.file_meta = FileMetaDataset(ds.file_meta)
    encode_jpeg_ybr422(out, frames, quality=90)
    return out


def _best(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ["LUSAI_THREADS"] = str(a.threads)
    torch.set_num_threads(a.threads)

    from workers.infer.predict import Predictor
    from workers.pipeline import Analyzer
    from workers.preprocess.wrap import frames_to_dataset
    from workers.training.phantom import make_cine

    cine = make_cine(
        np.random.default_rng(0), n_frames=a.frames, src=(350, 350), scenario="b_lines", kind="convex"
    )
    raw = frames_to_dataset(cine.frames, mm_per_pixel=0.457)
    jpeg = _jpeg_dataset(raw, cine.frames)
    result: dict[str, object] = {
        "frames": a.frames,
        "source": "350x350",
        "threads": a.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        backends = ["onnx", "torch"] if device == "cpu" else ["torch"]
        for backend in backends:
            pred = Predictor(device=device, backend=backend)
            grid = np.random.default_rng(1).integers(
                0, 255, (a.frames, pred.shape.rows, pred.shape.cols), np.uint8
            )
            pred.predict(grid[:16])  # warm-up
            t = _best(lambda p=pred, g=grid: p.predict(g), a.repeats)
            result[f"model_fps_{device}_{pred.backend}"] = round(a.frames / t, 1)
        an = Analyzer(device=device)
        an.analyze(raw)
        for name, ds in (("mono2_raw", raw), ("jpeg_ybr422", jpeg)):
            t = _best(lambda d=ds, z=an: z.analyze(d), a.repeats)
            result[f"pipeline_fps_{device}_{name}"] = round(a.frames / t, 1)
            result[f"pipeline_ms_per_cine_{device}_{name}"] = round(t * 1000, 1)
            result[f"stages_ms_{device}_{name}"] = an.analyze(ds).timings_ms
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
