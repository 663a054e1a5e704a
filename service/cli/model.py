"""`lusai analyze`, `lusai train`, `lusai eval`, `lusai model`: the model from the command line.

Every command takes a model package (``--model``, service/core/model_package.py; default the shipped
one); ``lusai train`` writes one and ``lusai model package`` makes one from loose files.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from service.cli.app import app

if TYPE_CHECKING:
    from service.core.model_package import ModelPackage

log = logging.getLogger(__name__)
err = Console(stderr=True)
model_app = typer.Typer(help="Model packages: show, verify, package.", no_args_is_help=True)
app.add_typer(model_app, name="model")

_MODEL_HELP = "Model package folder (default: the package shipped with lusai)."
_WEIGHTS_HELP = "Deprecated alias of --model."


def _load(model: Path | None, weights: Path | None = None) -> ModelPackage:
    """The package to run, verified; a bad one ends the command with its reason (exit code 1)."""
    from service.core.model_package import DEFAULT_PACKAGE, PackageError, load_package

    if weights is not None:
        err.print("--weights is deprecated: use --model PACKAGE", style="yellow")
    try:
        return load_package(model or weights or DEFAULT_PACKAGE)
    except PackageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None


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
    model: Path | None = typer.Option(None, "--model", help=_MODEL_HELP),
    weights: Path | None = typer.Option(None, hidden=True, help=_WEIGHTS_HELP),
) -> None:
    """Segment and score lung-ultrasound cine; exit code 1 if any input failed."""
    from workers.pipeline import Analyzer, InputError

    files = _inputs(paths)
    analyzer = Analyzer(_load(model, weights), device)
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
        score = str(r["score"]) if r["gradable"] else f"not gradable ({r['reason']})"
        t.add_row(
            name, str(r["frames"]), score,
            f"{100 * r['b_line_fraction']:.0f}", str(r["b_line_count"]),
            "yes" if r["consolidation"] else "no", "yes" if r["effusion"] else "no",
            f"{r['timings_ms']['total']:.0f}", "",
        )  # fmt: skip
    return t


@app.command()
def train(
    out: Path | None = typer.Option(
        None,
        help="Model package folder to write (default $LUSAI_DATA_DIR/models/NAME-VERSION, outside the "
        "source tree). --out workers/infer/weights replaces the package shipped with lusai: for "
        "maintainers releasing new default weights (then refit score_config.json and re-package).",
    ),
    seed: int = typer.Option(0),
    epochs: int = typer.Option(3),
    samples: int = typer.Option(5000, help="Phantom training frames."),
    val_samples: int = typer.Option(300, help="Held-out phantom frames for Dice."),
    batch: int = typer.Option(16),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: int = typer.Option(2, help="CPU threads."),
    name: str | None = typer.Option(None, help="Package name (default: the shipped package's name)."),
    version: str | None = typer.Option(None, help="Package version (default phantom-SEED)."),
    score_config: Path | None = typer.Option(
        None, help="Score operating point to ship with the network (default: clinical cut-offs)."
    ),
    force: bool = typer.Option(False, help="Replace a non-empty --out folder that is not a package."),
) -> None:
    """Train the segmentation network on the phantom only (reproducible from --seed) into a package."""
    from service.core.model_package import (
        DEFAULT_PACKAGE,
        PackageError,
        check_identity,
        load_package,
        training_from_metrics,
        write_package,
    )
    from service.core.settings import Settings
    from workers.infer.predict import resolve_device
    from workers.training.train import METRICS_NAME, ONNX_NAME, WEIGHTS_NAME, TrainConfig
    from workers.training.train import train as run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    name = name or load_package(DEFAULT_PACKAGE, verify=False).name
    version = version or f"phantom-{seed}"
    try:
        check_identity(name, version, "lusai train")
    except PackageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    out = out or Settings().data_dir / "models" / f"{name}-{version}"
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file() and not force:
        typer.echo(f"error: {out} is not empty and not a model package (--force replaces it)", err=True)
        raise typer.Exit(code=1)  # checked before training, not after 15 minutes of it
    cfg = TrainConfig(seed=seed, epochs=epochs, samples=samples, val_samples=val_samples, batch=batch,
                      device=resolve_device(device), threads=threads)  # fmt: skip
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".train-", dir=out.absolute().parent) as tmp:
        staging = Path(tmp)
        metrics = run(cfg, staging)
        files = {"segmenter_torch": staging / WEIGHTS_NAME, "segmenter_onnx": staging / ONNX_NAME,
                 "metrics": staging / METRICS_NAME}  # fmt: skip
        if score_config is not None:
            files["score_config"] = score_config
        try:
            pkg = write_package(
                out,
                name=name,
                version=version,
                files=files,
                description=f"Attention U-Net trained by `lusai train` on phantom frames only (seed {seed}).",
                training=training_from_metrics(staging / METRICS_NAME),
                overwrite=force,
            )
        except PackageError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None
    summary = {k: metrics[k] for k in ("best_val_mean_dice", "best_val_dice", "weights_sha256")}
    Console().print_json(json.dumps({**summary, "package": str(pkg.path), **pkg.identity()}))


@app.command("eval")
def evaluate(
    folder: Path | None = typer.Argument(
        None, help="Labelled DICOM folder (labels.csv) or BLUS folder (severity.csv + mp4)."
    ),
    model: Path | None = typer.Option(None, "--model", help=_MODEL_HELP),
    weights: Path | None = typer.Option(None, hidden=True, help=_WEIGHTS_HELP),
    device: str = typer.Option("auto"),
    phantom: int = typer.Option(300, help="Held-out phantom frames for Dice per class (0 = skip)."),
    seed: int = typer.Option(12345, help="Seed of the held-out phantom set (differs from training)."),
    out: Path | None = typer.Option(None, help="Also write the report JSON here."),
    cache: Path | None = typer.Option(None, help="Keep (and reuse) per-video class maps in this folder."),
) -> None:
    """Dice per class on held-out phantom frames and video-score agreement with experts."""
    import numpy as np

    from service.core.agreement import agreement
    from workers.infer.predict import Predictor
    from workers.pipeline import operating_point
    from workers.training.calibrate import cache_segmentations, video_scores
    from workers.training.train import dice_per_class, phantom_set

    pkg = _load(model, weights)
    report: dict[str, Any] = {"model": pkg.identity()}
    predictor = Predictor(pkg, device)
    if phantom:
        x, y, _ = phantom_set(phantom, seed, predictor.grid_shape)
        pred, _ = predictor.predict(x)
        report["phantom_dice"] = dice_per_class(pred, y)
    if folder is not None and pkg.file("scorer_torch") is not None:
        report |= _eval_full_pipeline(folder, pkg, device)  # a learned head needs the frames themselves
    elif folder is not None:
        with tempfile.TemporaryDirectory() as tmp:
            data = cache_segmentations(folder, cache or Path(tmp), pkg.path, device)
        expert = np.array([d.item.score for d in data])
        scores = video_scores(data, operating_point(pkg))
        report["video_agreement"] = agreement(expert, scores).__dict__
        report["videos"] = [
            {"file": d.item.path.name, "expert": int(e), "model": int(m)}
            for d, e, m in zip(data, expert, scores, strict=True)
        ]
    text = json.dumps(report, indent=2)
    if out is not None:
        out.write_text(text)
    Console().print_json(json.dumps({k: v for k, v in report.items() if k != "videos"}))


def _eval_full_pipeline(folder: Path, pkg: Any, device: str) -> dict[str, Any]:
    """Agreement of the whole pipeline's reported score; a not-gradable cine counts as 0 (and is listed),
    so flagging cannot hide hard cine from the figure."""
    import numpy as np

    from service.core.agreement import agreement
    from workers.pipeline import Analyzer, InputError
    from workers.training.evaluate import labelled_items

    analyzer = Analyzer(pkg, device)
    videos = []
    for it in labelled_items(folder):
        try:
            score = analyzer.analyze(it.dataset()).findings.reported_score
        except (InputError, ValueError, OSError) as exc:
            log.warning("%s skipped: %s", it.path.name, exc)
            continue
        videos.append(
            {"file": it.path.name, "expert": it.score, "model": score, "gradable": score is not None}
        )
    expert = np.array([v["expert"] for v in videos])
    model = np.array([v["model"] if v["model"] is not None else 0 for v in videos])
    graded = np.array([v["gradable"] for v in videos], bool)
    return {
        "video_agreement": agreement(expert, model).__dict__,
        "video_agreement_gradable": agreement(expert[graded], model[graded]).__dict__
        if graded.any()
        else None,
        "not_gradable": int((~graded).sum()),
        "videos": videos,
    }


@model_app.command("verify")
def verify(
    package: Path | None = typer.Argument(None, help="Package folder (default: the shipped package)."),
) -> None:
    """Check a package's manifest and every file's SHA-256; exit code 1 if anything is wrong."""
    pkg = _load(package)
    typer.echo(f"ok: {pkg.name} {pkg.version} ({len(pkg.files)} files verified) package {pkg.package_sha256}")


@model_app.command("show")
def show(
    package: Path | None = typer.Argument(None, help="Package folder (default: the shipped package)."),
) -> None:
    """Print a package's manifest after verifying it (exit code 1 on a bad package)."""
    pkg = _load(package)
    Console().print_json(json.dumps({"path": str(pkg.path), "package_sha256": pkg.package_sha256,
                                     "verified": True, "manifest": pkg.manifest}))  # fmt: skip


@model_app.command("package")
def package_cmd(
    src: Path = typer.Argument(..., help="A package, or a folder of loose files (lus_unet.pt, ...)."),
    out: Path | None = typer.Option(None, help="Package folder to write (default: SRC itself)."),
    name: str | None = typer.Option(None, help="Package name (default: SRC's manifest)."),
    version: str | None = typer.Option(None, help="Package version (default: SRC's manifest)."),
    parent: Path | None = typer.Option(None, help="Package this one derives from (recorded by hash)."),
    description: str | None = typer.Option(None),
    intended_use: str | None = typer.Option(None),
    training: Path | None = typer.Option(None, help="JSON file: the training block (default from metrics)."),
    cv: Path | None = typer.Option(None, help="JSON file: cross-validated figures."),
    file: list[str] | None = typer.Option(
        None, "--file", help="ROLE=PATH to add or replace a file (repeatable), e.g. scorer_torch=s.pt."
    ),
    force: bool = typer.Option(False, help="Replace a non-empty --out folder that is not a package."),
) -> None:
    """Write (or refresh) a package's manifest and MODEL_CARD.md; idempotent when nothing changed.

    After replacing weights or score_config.json in a package, run this to record their new hashes.
    """
    from service.core.model_package import PackageError, repackage

    extra: dict[str, Path] = {}
    for item in file or []:
        role, sep, path = item.partition("=")
        if not sep or not role or not path:
            typer.echo(f"error: --file {item!r} is not ROLE=PATH", err=True)
            raise typer.Exit(code=2)
        extra[role] = Path(path)
    try:
        pkg = repackage(
            src, out, name=name, version=version, extra_files=extra,
            parent=_load(parent) if parent is not None else None,
            description=description, intended_use=intended_use,
            training=_json_file(training), cv=_json_file(cv), overwrite=force,
        )  # fmt: skip
    except PackageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"{pkg.path}: {pkg.name} {pkg.version} package {pkg.package_sha256}")


def _json_file(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {path}: {exc}", err=True)
        raise typer.Exit(code=2) from None
    if not isinstance(data, dict):
        typer.echo(f"error: {path} must hold a JSON object", err=True)
        raise typer.Exit(code=2)
    return data
