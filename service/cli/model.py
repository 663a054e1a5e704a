"""`lusai analyze`, `lusai train`, `lusai eval`: the model from the command line, no server needed."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from service.cli.app import app

log = logging.getLogger(__name__)
err = Console(stderr=True)


def _inputs(paths: list[Path]) -> list[Path]:
    """Files as given, folders expanded to the DICOM files inside them (sorted, recursive)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and _looks_dicom(f))
        else:
            out.append(p)
    return out


def _looks_dicom(path: Path) -> bool:
    if path.suffix.lower() in {".dcm", ".dicom"}:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


@app.command()
def analyze(
    paths: list[Path] = typer.Argument(..., help="DICOM files or folders of them."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per input per line on stdout."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    weights: Path | None = typer.Option(None, help="Weights file or folder (default: shipped weights)."),
) -> None:
    """Segment and score lung-ultrasound cine; exit code 1 if any input failed."""
    from workers.pipeline import Analyzer, InputError

    files = _inputs(paths)
    analyzer = Analyzer(weights, device)
    failed = 0
    rows: list[tuple[str, dict[str, Any]]] = []
    with Progress(console=err, disable=as_json) as prog:
        task = prog.add_task("analysing", total=len(files))
        for f in files:
            try:
                result = analyzer.analyze_file(f).to_json()
            except (InputError, FileNotFoundError) as exc:
                failed += 1
                result = {"path": str(f), "error": str(exc)}
            else:
                result = {"path": str(f), **result}
            if as_json:
                sys.stdout.write(json.dumps(result) + "\n")
                sys.stdout.flush()
            rows.append((f.name, result))
            prog.advance(task)
    if not as_json:
        Console().print(_table(rows))
    if failed or not files:
        raise typer.Exit(code=1)


def _table(rows: list[tuple[str, dict[str, Any]]]) -> Table:
    t = Table("file", "frames", "score", "B-line %", "B-lines", "consolidation", "effusion", "ms", "error")
    for name, r in rows:
        if "error" in r:
            t.add_row(name, "", "", "", "", "", "", "", r["error"])
            continue
        t.add_row(
            name, str(r["frames"]), str(r["score"]),
            f"{100 * r['b_line_fraction']:.0f}", str(r["b_line_count"]),
            "yes" if r["consolidation"] else "no", "yes" if r["effusion"] else "no",
            f"{r['timings_ms']['total']:.0f}", "",
        )  # fmt: skip
    return t


@app.command()
def train(
    out: Path = typer.Option(
        Path("workers/infer/weights"), help="Folder for weights, ONNX and metrics.json."
    ),
    seed: int = typer.Option(0),
    epochs: int = typer.Option(3),
    samples: int = typer.Option(5000, help="Phantom training frames."),
    val_samples: int = typer.Option(300, help="Held-out phantom frames for Dice."),
    batch: int = typer.Option(16),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: int = typer.Option(2, help="CPU threads."),
) -> None:
    """Train the segmentation network on the phantom only (reproducible from --seed)."""
    from workers.infer.predict import resolve_device
    from workers.infer.train import TrainConfig
    from workers.infer.train import train as run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = TrainConfig(seed=seed, epochs=epochs, samples=samples, val_samples=val_samples, batch=batch,
                      device=resolve_device(device), threads=threads)  # fmt: skip
    metrics = run(cfg, out)
    Console().print_json(
        json.dumps({k: metrics[k] for k in ("best_val_mean_dice", "best_val_dice", "weights_sha256")})
    )


@app.command("eval")
def evaluate(
    folder: Path | None = typer.Argument(
        None, help="Labelled DICOM folder (labels.csv) or BLUS folder (severity.csv + mp4)."
    ),
    weights: Path | None = typer.Option(None, help="Weights file or folder (default: shipped weights)."),
    device: str = typer.Option("auto"),
    phantom: int = typer.Option(300, help="Held-out phantom frames for Dice per class (0 = skip)."),
    seed: int = typer.Option(12345, help="Seed of the held-out phantom set (differs from training)."),
    out: Path | None = typer.Option(None, help="Also write the report JSON here."),
    cache: Path | None = typer.Option(None, help="Keep (and reuse) per-video class maps in this folder."),
) -> None:
    """Dice per class on held-out phantom frames and video-score agreement with experts."""
    import numpy as np

    from workers.infer.calibrate import cache_segmentations, video_scores
    from workers.infer.evaluate import agreement
    from workers.infer.predict import Predictor
    from workers.infer.train import dice_per_class, phantom_set
    from workers.pipeline import operating_point

    report: dict[str, Any] = {}
    predictor = Predictor(weights, device)
    if phantom:
        x, y, _ = phantom_set(phantom, seed, predictor.grid_shape)
        pred, _ = predictor.predict(x)
        report["phantom_dice"] = dice_per_class(pred, y)
    if folder is not None:
        with tempfile.TemporaryDirectory() as tmp:
            data = cache_segmentations(folder, cache or Path(tmp), weights, device)
        expert = np.array([d.item.score for d in data])
        model = video_scores(data, operating_point(predictor.weights_path))
        report["video_agreement"] = agreement(expert, model).__dict__
        report["videos"] = [
            {"file": d.item.path.name, "expert": int(e), "model": int(m)}
            for d, e, m in zip(data, expert, model, strict=True)
        ]
    text = json.dumps(report, indent=2)
    if out is not None:
        out.write_text(text)
    Console().print_json(json.dumps({k: v for k, v in report.items() if k != "videos"}))
