"""`lusai adapt` on a labelled site set, timed end to end, with its nested-CV figures, as JSON.

    python bench/adapt.py [--blus ../shared/datasets/blus-dev] [--work /tmp/lusai-bench-adapt]
                          [--method finetune] [--seed 0] [--threads 2] [--out bench-adapt.json]

Converts the BLUS dev videos to DICOM as a scanner exports them (``blus_to_dicom.py``, once),
then runs the real command (`lusai adapt DICOM --labels labels.csv --out PKG`) in a subprocess
and reads the figures back from the package it wrote. The budget it is held to: the 177 dev
cine in at most 30 minutes on 2 CPU cores. The package stays under ``--work``: it is trained on
BLUS, whose licence forbids sharing derivatives, so it must never be committed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blus", type=Path, default=ROOT.parent / "shared" / "datasets" / "blus-dev")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lusai-bench-adapt"))
    ap.add_argument("--method", default="finetune")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    a = ap.parse_args()
    if not a.blus.is_dir():
        sys.exit(f"no labelled set at {a.blus}")
    dicom = a.work / "dicom"
    if not (dicom / "labels.csv").is_file():
        tool = ROOT.parent / "shared" / "tools" / "blus_to_dicom.py"
        subprocess.run([sys.executable, str(tool), str(a.blus), str(dicom), "--patients", "even"], check=True)
    pkg = a.work / f"pkg-{a.method}-{a.seed}"
    lusai = Path(sys.executable).with_name("lusai")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "LUSAI_THREADS": str(a.threads)}
    cmd = [str(lusai), "adapt", str(dicom), "--labels", str(dicom / "labels.csv"), "--out", str(pkg),
           "--method", a.method, "--seed", str(a.seed), "--threads", str(a.threads), "--device", "cpu",
           "--force"]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - t
    manifest = json.loads((pkg / "manifest.json").read_text())
    result = {
        "benchmark": "adapt",
        "command": " ".join(cmd),
        "seconds": round(seconds, 1),
        "budget_seconds": 1800,
        "within_budget": seconds <= 1800,
        "cines": manifest["training"]["cines"],
        "patients": manifest["training"]["patients"],
        "epochs_final": manifest["training"]["epochs"],
        "cv": manifest["cv"],
        "package": str(pkg),
        "scorer_sha256": manifest["files"]["scorer_torch"]["sha256"],
        "machine": {"cpus": os.cpu_count(), "threads": a.threads, "platform": platform.platform()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out is not None:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
